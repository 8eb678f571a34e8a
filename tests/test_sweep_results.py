"""The Pareto front, the best pick and the result files (onnxslim_edge/sweep/results.py),
on made-up trials: no Ray, no model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from onnxslim_edge.sweep.results import front_layers, pick_best, write_results
from onnxslim_edge.sweep.run import SweepResult, Trial
from onnxslim_edge.sweep.space import load_space

SPACE = """
[[pass]]
name = "quantize"
method = ["minmax", "percentile", "entropy", "mse"]

[objectives]
cost = ["size", "macs"]

[constraints]
min_top1_agreement = 0.9
"""


def _trial(
    tid: str, size: float | None, top1: float | None, macs: int = 1, ok: bool = True
) -> Trial:
    metrics = {
        "status": "ok" if ok else "failed",
        "size": size,
        "top1_agreement": top1,
        "macs": macs,
    }
    if not ok:
        metrics = {"status": "failed", "reason": "boom"}
    return Trial(
        tid, {"quantize.method": tid}, {"pass": [{"name": "quantize"}]}, Path(tid), metrics
    )


def test_front_layers_are_non_dominated_in_order() -> None:
    space = load_space(SPACE)
    a, b, c, d, e = (
        _trial("a", 10, 0.90),
        _trial("b", 20, 0.99),
        _trial("c", 20, 0.95),  # dominated by b (same size, less faithful)
        _trial("d", 30, 0.95),  # dominated by b and c
        _trial("e", 5, 0.50),
    )
    layers = front_layers([a, b, c, d, e], space)
    assert [[t.id for t in layer] for layer in layers] == [["e", "a", "b"], ["c"], ["d"]]


def test_best_is_the_cheapest_meeting_the_constraints() -> None:
    space = load_space(SPACE)
    trials = [
        _trial("small_bad", 5, 0.5),  # misses the floor
        _trial("tie_less_faithful", 10, 0.91, macs=1),
        _trial("tie_more_macs", 10, 0.99, macs=9),
        _trial("tie_fewer_macs", 10, 0.99, macs=5),  # same size and fidelity: macs decide
        _trial("big", 50, 1.0),
        _trial("broken", None, None, ok=False),
    ]
    best = pick_best(trials, space)
    assert best.id == "tie_fewer_macs"
    assert best in front_layers(trials[1:5], space)[0]
    assert pick_best([trials[0], trials[-1]], space) is None


def test_write_results_without_a_qualifying_trial(tmp_path: Path) -> None:
    space = load_space(SPACE)
    (tmp_path / "best.toml").write_text("# stale\n")
    trials = [_trial("bad", 5, 0.5), _trial("broken", None, None, ok=False)]
    result = SweepResult(tmp_path, space, trials, ran=2, resumed=0, wall_time_s=1.0)
    write_results(result)
    assert result.best is None and not (tmp_path / "best.toml").exists()
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["best"] is None and summary["failed"] == 1
    assert [r["trial"] for r in summary["rows"]] == ["bad", "broken"]
    text = (tmp_path / "results.md").read_text()
    assert "none meets the constraints" in text and "failed: boom" in text
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:  # the train flavor: no plot, and the rest still written
        assert not (tmp_path / "front.png").exists()
    else:
        assert (tmp_path / "front.png").read_bytes().startswith(b"\x89PNG")


def test_pick_best_reads_only_id_ok_and_metrics() -> None:
    # SimpleNamespace trials work too: only id, ok and metrics are read.
    space = load_space(SPACE)
    t = SimpleNamespace(id="x", ok=True, metrics={"size": 1, "top1_agreement": 0.95, "macs": 1})
    assert pick_best([t], space) is t
