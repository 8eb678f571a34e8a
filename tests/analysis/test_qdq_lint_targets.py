"""`lint --target`: a model is checked against the Q/DQ rules of the runtime it was
quantized for; the ONNX Runtime CPU layout fails TensorRT's rules by design and passes
its own, and TensorRT's layout passes both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.analysis.qdq_lint import ORT_CPU_RULES, TARGETS, lint_qdq
from onnxslim_edge.cli import main
from onnxslim_edge.demo import DIGITS_MODEL
from onnxslim_edge.errors import ConfigError


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits CNN quantized by our pass for each target (64 calibration samples)."""
    from onnxslim_edge import Context, Pipeline, save_model

    folder = tmp_path_factory.mktemp("lint_targets")
    data = folder / "calib.npz"
    np.savez(data, image=np.load(DIGITS_MODEL.parent / "digits_test.npz")["image"][:64])
    out = {}
    for target in TARGETS:
        result = Pipeline(["cleanup", "fold-batchnorm", "quantize"], target=target).run(
            DIGITS_MODEL, Context(data=str(data), target=target)
        )
        out[target] = save_model(result.model, folder / f"{target}.onnx")
    return out


def test_each_layout_passes_its_own_target(
    quantized: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ort, trt = quantized["onnxruntime-cpu"], quantized["tensorrt"]
    assert main(["lint", str(ort), "--target", "onnxruntime-cpu"]) == 0
    assert capsys.readouterr().out.startswith("ONNX Runtime CPU Q/DQ rules: no violations")
    assert main(["lint", str(ort)]) == 1  # default target: tensorrt, by design
    rules = {v.rule for v in lint_qdq(onnx.load(ort)) if v.severity == "error"}
    assert {"zero-point-nonzero", "quantized-bias"} <= rules
    capsys.readouterr()
    assert main(["lint", str(trt), "--target", "tensorrt"]) == 0
    assert lint_qdq(onnx.load(trt), "onnxruntime-cpu") == []


def _conv_qdq(
    weight_type: int, act_type: int = TensorProto.UINT8, axis: int = 0
) -> onnx.ModelProto:
    np_w = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}
    np_a = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16}
    w = np.random.default_rng(0).integers(0, 100, (4, 2, 1, 1)).astype(np_w[weight_type])
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(3, np_a[act_type]), "zp"),
        numpy_helper.from_array(w, "wq"),
        numpy_helper.from_array(np.full(w.shape[axis], 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(w.shape[axis], np_w[weight_type]), "wzp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], axis=axis),
        helper.make_node("Conv", ["xd", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_onnxruntime_cpu_rules() -> None:
    assert set(ORT_CPU_RULES) == {
        "weight-axis", "per-tensor-weight", "unfused-type", "uint8-weights", "quantized-output",
    }  # fmt: skip
    assert lint_qdq(_conv_qdq(TensorProto.INT8), "onnxruntime-cpu") == []
    (u8,) = lint_qdq(_conv_qdq(TensorProto.UINT8), "onnxruntime-cpu")
    assert (u8.rule, u8.severity) == ("uint8-weights", "warning")
    (axis,) = lint_qdq(_conv_qdq(TensorProto.INT8, axis=1), "onnxruntime-cpu")
    assert (axis.rule, axis.severity) == ("weight-axis", "error")
    found = lint_qdq(_conv_qdq(TensorProto.INT8, act_type=TensorProto.INT16), "onnxruntime-cpu")
    assert [(v.rule, v.severity) for v in found] == [("unfused-type", "warning")] * 2
    assert "uses INT16; ONNX Runtime's CPU integer kernels take int8/uint8" in found[0].message


def test_unknown_target(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(
        ConfigError, match="unknown lint target 'cuda'; valid: tensorrt, onnxruntime-cpu"
    ):
        lint_qdq(_conv_qdq(TensorProto.INT8), "cuda")
    assert main(["lint", str(DIGITS_MODEL), "--target", "cuda"]) == 2
    assert "invalid choice: 'cuda'" in capsys.readouterr().err
