"""The report renders the targets of `benchmarks.specs` from the committed results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report, specs

_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _target_lines(result: dict) -> list[str]:
    lines = report._int8_model(result)
    return [line for line in lines if line.startswith("- ")]


def _load(name: str) -> dict:
    return json.loads((_RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def test_fidelity_floor_comes_from_the_targets_data(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _load("efficientnet_lite0")
    line = next(x for x in _target_lines(result) if "top-1 agreement >=" in x)
    assert line.startswith("- top-1 agreement >= 0.95: ")
    assert " - met; " in line
    monkeypatch.setattr(
        report,
        "TARGETS",
        {
            "efficientnet_lite0": specs.ModelTargets(
                int8_fidelity=specs.FidelityTarget(metric="top-1 agreement", floor=1.5),
                int8_speedup_b8=100.0,
                speedup_methods=("ours-int8-ort",),
            )
        },
    )
    lines = _target_lines(result)
    fid = next(x for x in lines if "top-1 agreement >=" in x)
    assert fid.startswith("- top-1 agreement >= 1.5: ") and " - missed by " in fid
    speed = [x for x in lines if "faster than fp32 at b8" in x]
    assert len(speed) == 1 and speed[0].startswith(
        "- >= 100x faster than fp32 at b8 (`ours-int8-ort`"
    )
    assert "missed by" in speed[0]


def test_relative_target_is_stated_against_fp32() -> None:
    result = _load("ppocr_rec")
    fp32 = report._primary(result, result["methods"]["fp32"])
    line = next(x for x in _target_lines(result) if x.startswith("- exact match within"))
    assert line.startswith(
        f"- exact match within 2 points of fp32 ({report._num(fp32)}, so >= "
        f"{report._num(fp32 - 0.02)}): "
    )


def test_a_model_without_targets_gets_only_the_shared_ones() -> None:
    result = _load("ppocr_cls")
    assert "ppocr_cls" not in specs.TARGETS
    lines = _target_lines(result)
    assert lines and all("latency <= ORT's fastest" in x or "` vs `" in x for x in lines)


def test_fidelity_target_needs_exactly_one_bound() -> None:
    with pytest.raises(ValueError, match="exactly one of floor and below_fp32"):
        specs.FidelityTarget(metric="x")
    with pytest.raises(ValueError, match="exactly one of floor and below_fp32"):
        specs.FidelityTarget(metric="x", floor=1.0, below_fp32=0.1)


def test_report_order_is_the_specs_model_order(tmp_path: Path) -> None:
    models, _ = report.load_results(_RESULTS)
    assert [m["model"] for m in models] == list(specs.MODEL_NAMES)
