"""bias-correct: the mean quantization error per channel is measured and removed.

The quantized model is built here (no dependency on the quantize pass): int8 weights
rounded *down* (floor), so the weight error has mean -step/2 and, on the non-negative
inputs a ReLU gives, the layer outputs a biased error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.errors import ConfigError, DataError
from onnxslim_edge.passes.quantize.bias_correct import BiasCorrect
from onnxslim_edge.pipeline import Context, Pipeline
from onnxslim_edge.runtime import make_session

SHAPE = (1, 3, 8, 8)


def _float_model(head: str = "conv") -> onnx.ModelProto:
    """x -> Conv(W1, B1) -> Relu -> Conv(W2) [-> Relu -> Flatten -> MatMul(W3)] -> y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3, "W1"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32) * 0.1, "B1"),
        numpy_helper.from_array(rng.normal(size=(8, 8, 3, 3)).astype(np.float32) * 0.2, "W2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1] * 4),
    ]
    out_shape: list[int] = [1, 8, 8, 8]
    if head == "matmul":
        inits.append(
            numpy_helper.from_array(rng.normal(size=(512, 5)).astype(np.float32) * 0.05, "W3")
        )
        nodes += [
            helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
            helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
            helper.make_node("MatMul", ["f", "W3"], ["y"], name="fc"),
        ]
        out_shape = [1, 5]
    else:
        nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _fake_quantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights of Conv/MatMul -> int8 by floor (biased) + DequantizeLinear per channel."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    new_nodes = []
    for node in out.graph.node:
        if node.op_type in ("Conv", "MatMul"):
            name = node.input[1]
            w = numpy_helper.to_array(inits[name])
            axis = 0 if node.op_type == "Conv" else 1
            amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))
            scale = (amax / 127).astype(np.float32)
            shape = [-1 if i == axis else 1 for i in range(w.ndim)]
            q = np.clip(np.floor(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            out.graph.initializer.remove(inits[name])
            out.graph.initializer.extend(
                [
                    numpy_helper.from_array(q, f"{name}_q"),
                    numpy_helper.from_array(scale, f"{name}_scale"),
                    numpy_helper.from_array(np.zeros(scale.size, np.int8), f"{name}_zp"),
                ]
            )
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{name}_q", f"{name}_scale", f"{name}_zp"],
                    [name],
                    name=f"{name}_dq",
                    axis=axis,
                )
            )
        new_nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    return out


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, SHAPE).astype(np.float32)} for _ in range(n)]


def _outputs(model: onnx.ModelProto, feeds: list) -> np.ndarray:
    session = make_session(model, threads=1)
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def _correct(q: onnx.ModelProto, ref: onnx.ModelProto, data: Any, **options: Any) -> Any:
    ctx = Context(data=data, reference=ref)
    return Pipeline([BiasCorrect(**options)]).run(q, ctx)


def _errors(model: onnx.ModelProto, ref_out: np.ndarray, feeds: list) -> tuple[float, float]:
    """(largest |mean error| over output channels, MSE) on held-out data."""
    err = _outputs(model, feeds) - ref_out
    axes = tuple(i for i in range(err.ndim) if i != 1)
    return float(np.abs(err.mean(axis=axes)).max()), float(np.mean(err**2))


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("head", ["conv", "matmul"])
def test_mean_error_and_mse_drop(sequential: bool, head: str) -> None:
    ref = _float_model(head)
    q = _fake_quantize(ref)
    held_out = _feeds(32, seed=2)
    ref_out = _outputs(ref, held_out)
    bias_before, mse_before = _errors(q, ref_out, held_out)
    result = _correct(q, ref, _feeds(32, seed=1), sequential=sequential)
    report = result.report.passes[0]
    layers = 3 if head == "matmul" else 2
    assert report.modified and report.counters["layers_corrected"] == layers
    assert [d["layer"] for d in report.details] == ["conv1", "conv2", "fc"][:layers]
    onnx.checker.check_model(result.model, full_check=True)
    bias_after, mse_after = _errors(result.model, ref_out, held_out)
    if sequential:  # measured: mean error / 81 (conv) and / 31 (matmul), MSE / 7.6 and / 32
        assert bias_after < bias_before / 10, (bias_before, bias_after)
        assert mse_after < mse_before / 4, (mse_before, mse_after)
    else:  # one shot over-corrects inherited error: mean / 1.4 and / 2, MSE / 2.7 and / 3.9
        assert bias_after < bias_before / 1.2, (bias_before, bias_after)
        assert mse_after < mse_before / 2, (mse_before, mse_after)
    conv2 = next(n for n in result.model.graph.node if n.name == "conv2")
    assert len(conv2.input) == 3  # a bias was added where the layer had none
    if head == "matmul":  # MatMul has no bias input: an Add now follows it
        assert [n.op_type for n in result.model.graph.node][-2:] == ["MatMul", "Add"]
        assert result.model.graph.output[0].name == "y"


def test_float_model_is_left_alone() -> None:
    ref = _float_model()
    result = _correct(ref, ref, None)  # no data needed when there is nothing to correct
    report = result.report.passes[0]
    assert report.modified is False
    assert report.skips[0].reason == "no QuantizeLinear/DequantizeLinear: not a quantized model"


def test_needs_data() -> None:
    ref = _float_model()
    with pytest.raises(DataError, match="bias-correct needs calibration data"):
        _correct(_fake_quantize(ref), ref, None)


def test_unmatched_layers_are_skipped() -> None:
    ref = _float_model()
    q = _fake_quantize(ref)
    for node in q.graph.node:
        if node.name == "conv2":
            node.name = "renamed"
    result = _correct(q, ref, _feeds(4, seed=1))
    report = result.report.passes[0]
    assert report.counters["layers_corrected"] == 1
    assert [(s.node, s.reason) for s in report.skips] == [
        ("renamed", "no node of this name in the reference model")
    ]


def test_rescaled_layer_is_not_corrected() -> None:
    """A layer whose output the reference computes at another scale is skipped."""
    ref = _float_model()
    q = _fake_quantize(ref)
    for init in q.graph.initializer:
        if init.name == "W2_scale":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3, init.name))
    report = _correct(q, ref, _feeds(4, seed=1)).report.passes[0]
    assert [d["layer"] for d in report.details] == ["conv1"]
    assert "the tensors do not correspond" in report.skips[0].reason


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_samples": 0}, "bias-correct.max_samples: expected a positive integer"),
        ({"sequential": "x"}, "bias-correct.sequential: expected true/false"),
    ],
)
def test_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BiasCorrect(**options)
