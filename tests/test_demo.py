"""The demo (README's first command): the demo recipe (prune + distill + int8) on the bundled digits CNN."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from onnxslim_edge.analysis.qdq_lint import lint_qdq
from onnxslim_edge.cli import main
from onnxslim_edge.demo import digits_accuracy, run_demo


def test_demo_keeps_accuracy_and_shrinks_the_model(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "out", runs=3, echo=False)
    report = json.loads(result.report_path.read_text())
    demo = report["demo"]
    assert demo["accuracy_after"] >= demo["accuracy_before"] - 0.01  # within 1 point
    assert demo["accuracy_after"] == pytest.approx(digits_accuracy(result.model_path))
    assert report["cost_after"]["size_bytes"] < 0.5 * report["cost_before"]["size_bytes"]
    assert [p["name"] for p in report["passes"]] == [
        "cleanup",
        "fold-batchnorm",
        "cleanup",
        "prune-channels",
        "distill",
        "quantize",
    ]
    assert report["cost_after"]["macs"] < 0.7 * report["cost_before"]["macs"]
    assert report["fidelity"]["floors_missed"] == []
    ops = {n.op_type for n in onnx.load(str(result.model_path)).graph.node}
    assert "BatchNormalization" not in ops and "QuantizeLinear" in ops
    assert set(demo["latency"]) == {"batch_1", "batch_8"}


def test_demo_tensorrt_target_is_lint_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(tmp_path), "--runs", "2", "--target", "tensorrt"]) == 0
    out = capsys.readouterr().out
    assert "target tensorrt" in out and "top-1 accuracy" in out and "speed x" in out
    model = onnx.load(str(tmp_path / "digits_cnn.optimized.onnx"))
    assert [v for v in lint_qdq(model) if v.severity == "error"] == []
    assert json.loads((tmp_path / "report.json").read_text())["demo"]["target"] == "tensorrt"


def test_demo_quiet_prints_nothing_and_takes_the_recipes_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One target rule for optimize and demo: --target, else the recipe's, else tensorrt
    (demo.toml says onnxruntime-cpu)."""
    from onnxslim_edge.demo import DEMO_RECIPE
    from onnxslim_edge.recipe import load_recipe

    assert load_recipe(DEMO_RECIPE).target == "onnxruntime-cpu"
    assert main(["demo", "--out", str(tmp_path), "--runs", "2", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["demo"]["target"] == report["target"] == "onnxruntime-cpu"
