"""equalize: cross-layer equalization of Conv -> act -> Conv chains.

Positive cases check that ONNX Runtime outputs stay within rtol 1e-5 and atol 1e-5 x
the output's range, that channel ranges become more uniform and that per-tensor int8
weight quantization hurts the outputs less. Negative cases check the model is
untouched and the skip says why.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.passes.quantize.equalize import Equalize, channel_ranges
from onnxslim_edge.pipeline import Pipeline
from onnxslim_edge.runtime import make_session

RTOL = 1e-5
ATOL_OF_RANGE = 1e-5


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return make_session(model, threads=1, optimization="disable").run(None, {"x": x})[0]


def _assert_same(a: np.ndarray, b: np.ndarray) -> None:
    atol = ATOL_OF_RANGE * float(b.max() - b.min())
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=atol)


def _fake_quant_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every Conv weight quantized per tensor, symmetric int8, and dequantized (numpy)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {n.input[1] for n in out.graph.node if n.op_type == "Conv"}
    for init in out.graph.initializer:
        if init.name in weights:
            w = numpy_helper.to_array(init)
            step = np.abs(w).max() / 127
            init.CopyFrom(
                numpy_helper.from_array((np.round(w / step) * step).astype(w.dtype), init.name)
            )
    return out


def _chain(
    act: str, *, c: int = 8, second_group: int = 1, share: bool = False, cin2: int | None = None
) -> onnx.ModelProto:
    """x -> Conv(W1, B1) -> act -> Conv(W2, B2) -> y, with deliberately uneven channels."""
    rng = np.random.default_rng(0)
    gain = np.exp(rng.uniform(-2.5, 2.5, c)).astype(np.float32)
    w1 = rng.normal(size=(c, 3, 3, 3)).astype(np.float32) * gain[:, None, None, None]
    cin2 = c if cin2 is None else cin2
    w2 = rng.normal(size=(6 if second_group == 1 else c, cin2 // second_group, 3, 3))
    inits = [
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "B1"),
    ]
    if share:  # conv2 reads W1 as its weight too
        w2 = w1
    else:
        inits.append(numpy_helper.from_array(w2.astype(np.float32), "W2"))
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1] * 4)]
    if act == "Clip":
        inits += [
            numpy_helper.from_array(np.array(0, np.float32), "lo"),
            numpy_helper.from_array(np.array(6, np.float32), "hi"),
        ]
        nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["a"], name="act"))
    elif act == "none":
        nodes.append(helper.make_node("Identity", ["c1"], ["a"], name="act"))
    else:
        nodes.append(helper.make_node(act, ["c1"], ["a"], name="act"))
    if act == "none":  # no activation at all: Conv -> Conv
        nodes = nodes[:1]
        nodes[0].output[0] = "a"
    w2_name = "W1" if share else "W2"
    nodes.append(
        helper.make_node(
            "Conv", ["a", w2_name], ["y"], name="conv2", pads=[1] * 4, group=second_group
        )
    )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, w2.shape[0], 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, 3, 8, 8)).astype(np.float32)


def _equalize(model: onnx.ModelProto, **options: Any) -> tuple[onnx.ModelProto, Any]:
    result = Pipeline([Equalize(**options)], max_samples=2).run(model)
    return result.model, result.report.passes[0]


# --------------------------------------------------------------------------- positive


@pytest.mark.parametrize("act", ["Relu", "LeakyRelu", "Clip", "none"])
@pytest.mark.parametrize("second_group", [1, 8])
def test_pair_is_exact_and_equal_ranges(act: str, second_group: int) -> None:
    model = _chain(act, second_group=second_group)
    new, report = _equalize(model)
    assert report.modified and report.counters["pairs_equalized"] == 1
    assert report.validation["passed"]  # the Pipeline's own lossless check
    onnx.checker.check_model(new, full_check=True)
    x = _x()
    _assert_same(_run(new, x), _run(model, x))
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    conv1, conv2 = (n for n in new.graph.node if n.op_type == "Conv")
    r1 = channel_ranges(inits[conv1.input[1]])
    r2 = channel_ranges(inits[conv2.input[1]], second_group, axis="in")
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # one pair converges to equal ranges
    detail = report.details[0]
    assert detail["range_ratio_w1_after"] < detail["range_ratio_w1_before"] / 3
    if act == "Clip":  # ReLU6 became Relu -> Min(per-channel bound)
        assert [n.op_type for n in new.graph.node] == ["Conv", "Relu", "Min", "Conv"]
        assert report.counters["clips_rewritten"] == 1


def test_second_run_changes_nothing() -> None:
    model, _ = _equalize(_chain("Clip", second_group=8))
    _again, report = _equalize(model)
    assert report.modified is False
    assert [s.node for s in report.skips if "already equalized" in s.reason] == ["conv1"]


def test_relu_mode_replaces_relu6_and_is_not_lossless() -> None:
    model = _chain("Clip")
    p = Equalize(clip="relu")
    assert p.lossless is False and Equalize().lossless is True
    new, report = _equalize(model, clip="relu")
    assert report.counters["clips_to_relu"] == 1 and report.validation is None
    assert [n.op_type for n in new.graph.node] == ["Conv", "Relu", "Conv"]


def _uneven_batchnorm(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """BN gamma and beta times exp(U(-2, 2)) per channel: after folding, channel ranges
    spread ~50-100x as in trained MobileNets (the fixture's random init spreads ~4x)."""
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            gamma, beta = (numpy_helper.to_array(inits[n]) for n in node.input[1:3])
            k = np.exp(rng.uniform(-2, 2, gamma.size)).astype(np.float32)
            for name, value in zip(node.input[1:3], (gamma * k, beta * k)):
                inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return model


def test_mobilenetv2_outputs_unchanged_ranges_uniform_quant_error_drops(torch_model) -> None:
    model = _uneven_batchnorm(onnx.load(torch_model("mobilenetv2")))
    folded = Pipeline(["fold-batchnorm"], max_samples=1).run(model).model
    result = Pipeline(["fold-batchnorm", "equalize"], max_samples=2).run(model)
    report = result.report.passes[1]
    assert report.validation["passed"]
    # 3 inverted residuals x (expand -> dw, dw -> project), all through ReLU6.
    assert report.counters == {"pairs_equalized": 6, "clips_rewritten": 6, "clips_to_relu": 0}
    assert all(d["depthwise"] for d in report.details)
    for d in report.details:  # the worse of the two layers' channel spreads shrinks
        before = max(d["range_ratio_w1_before"], d["range_ratio_w2_before"])
        after = max(d["range_ratio_w1_after"], d["range_ratio_w2_after"])
        assert after < 0.5 * before
    xs = np.random.default_rng(3).normal(size=(8, 1, 3, 16, 16)).astype(np.float32)

    def outputs(m: onnx.ModelProto) -> np.ndarray:
        session = make_session(m, threads=1, optimization="disable")
        return np.concatenate([session.run(None, {"x": x})[0] for x in xs])

    ref = outputs(folded)
    _assert_same(outputs(result.model), ref)

    def quant_error(m: onnx.ModelProto) -> float:
        return float(np.sqrt(np.mean((outputs(_fake_quant_weights(m)) - ref) ** 2)))

    before, after = quant_error(folded), quant_error(result.model)
    assert after < 0.6 * before, (before, after)  # measured: 0.0112 -> 0.0049
    # Idempotent up to the tolerance: the second run leaves the model alone.
    again = Pipeline(["equalize"], max_samples=1).run(result.model).report.passes[0]
    assert again.modified is False


# --------------------------------------------------------------------------- negative


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"act": "Sigmoid"}, "followed by Sigmoid, not a positively homogeneous activation"),
        ({"act": "Relu", "cin2": 4}, "conv1 makes 8 channels, conv2 reads 4"),
        ({"act": "Relu", "share": True, "c": 3}, "weight is shared with another node"),
    ],
)
def test_left_alone_with_reason(kwargs: dict, reason: str) -> None:
    model = _chain(**kwargs)
    _new, report = _equalize(model)
    assert report.modified is False and report.counters["pairs_equalized"] == 0
    assert reason in next(s.reason for s in report.skips if s.node == "conv1")


def test_batchnorm_between_is_named() -> None:
    model = _chain("Relu")
    c = 8
    rng = np.random.default_rng(5)
    for name, v in (("g", 1.5), ("b", 0.1), ("m", 0.2), ("v", 2.0)):
        model.graph.initializer.append(
            numpy_helper.from_array((rng.uniform(0.5, 1, c) * v).astype(np.float32), name)
        )
    model.graph.node[0].output[0] = "c0"
    model.graph.node.insert(
        1, helper.make_node("BatchNormalization", ["c0", "g", "b", "m", "v"], ["c1"], name="bn")
    )
    _, report = _equalize(model)
    assert report.modified is False
    assert report.skips[0].reason == "a BatchNormalization follows: run fold-batchnorm first"


def test_depthwise_excluded_on_request() -> None:
    _, report = _equalize(_chain("Relu", second_group=8), include_depthwise=False)
    assert report.modified is False
    assert report.skips[0].reason == "depthwise pair and include_depthwise is false"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"iterations": 0}, "equalize.iterations: must be >= 1"),
        ({"min_scale": 2.0}, "need min_scale <= 1 <= max_scale"),
        ({"tolerance": -1.0}, "equalize.tolerance: must be a positive number"),
        ({"clip": "maybe"}, "'maybe' is not one of"),
    ],
)
def test_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Equalize(**options)
