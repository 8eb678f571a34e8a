"""benchmarks/lowrank_stack.py: variants share their built prefixes; the committed
Markdown is rendered from the committed JSON, whose derived columns match its numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import lowrank_stack

_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
_JSON = _RESULTS / "lowrank_stack_minilm.json"


def test_variants_build_a_shared_prefix_once(tmp_path: Path) -> None:
    from onnxslim_edge.demo import DIGITS_MODEL
    from onnxslim_edge.model import load_model

    built: dict = {}
    lowrank = "lowrank:ranks=/block2/conv1/Conv=4"
    path_a, row_a = lowrank_stack._build(Path(DIGITS_MODEL), ["cleanup"], {}, built, tmp_path)
    path_b, row_b = lowrank_stack._build(
        Path(DIGITS_MODEL), ["cleanup", lowrank], {}, built, tmp_path
    )
    assert list(built) == [("cleanup",), ("cleanup", lowrank)]  # cleanup ran once
    assert row_b["passes"] == ["cleanup", lowrank] and row_b["layers_split"] == 1
    assert row_b["build_s"] >= row_a["build_s"]  # the shared step's time counts for both
    ops = [n.op_type for n in load_model(path_b).graph.node]
    assert len(ops) == len(load_model(path_a).graph.node) + 1  # the conv became two convs


@pytest.mark.skipif(not _JSON.exists(), reason="benchmark not run yet")
def test_committed_markdown_is_rendered_from_the_json() -> None:
    results = json.loads(_JSON.read_text(encoding="utf-8"))
    md = _JSON.with_suffix(".md").read_text(encoding="utf-8")
    assert md == lowrank_stack.render(results) + "\n"
    rows = results["rows"]
    base = rows["fp32"]
    for row in rows.values():
        assert row["size_vs_fp32"] == pytest.approx(row["bytes"] / base["bytes"])
        assert row["macs_removed"] == pytest.approx(1 - row["macs"] / base["macs"])
        if "distill" in row:  # the never-worse check: distillation did not lower its score
            assert row["distill"]["fidelity_after"] >= row["distill"]["fidelity_before"]
