"""The TensorRT Q/DQ linter on a correct model and on one broken variant per rule."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.analysis.qdq_lint import RULES, Violation, format_violations, lint_qdq
from onnxslim_edge.runtime import make_session

C = 4  # channels


def qdq_conv_model(
    *,
    zero_point: int = 0,
    act_type: int = TensorProto.INT8,
    quantized_bias: bool = False,
    weight_axis: int = 0,
    weight_min: int = -127,
    q_output: bool = False,
    skip_quantized: bool = True,
    conv_input_quantized: bool = True,
    concat_scales: tuple[float, float] = (0.05, 0.05),
    per_tensor_weight: bool = False,
) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(int8 W), B) -> Add(conv, DQ skip) -> 2 x (Q -> DQ) -> Concat."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(C, C, 3, 3)).astype(np.int8)
    w.flat[0] = weight_min
    np_act = np.int8 if act_type == TensorProto.INT8 else np.uint8
    w_scale = np.full(1 if per_tensor_weight else C, 0.01, np.float32)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(zero_point, np_act), "x_zp"),
        numpy_helper.from_array(w, "W_q"),
        numpy_helper.from_array(w_scale, "W_scale"),
        numpy_helper.from_array(np.zeros(w_scale.size, np.int8), "W_zp"),
        numpy_helper.from_array(np.array(concat_scales[0], np.float32), "a_scale"),
        numpy_helper.from_array(np.array(concat_scales[1], np.float32), "b_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
    ]
    w_dq_attrs = {} if per_tensor_weight else {"axis": weight_axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_x"),
        helper.make_node(
            "DequantizeLinear", ["W_q", "W_scale", "W_zp"], ["W"], name="dq_w", **w_dq_attrs
        ),
    ]
    if quantized_bias:
        inits += [
            numpy_helper.from_array(np.arange(C, dtype=np.int32), "B_q"),
            numpy_helper.from_array(np.full(C, 0.0002, np.float32), "B_scale"),
        ]
        nodes.append(
            helper.make_node("DequantizeLinear", ["B_q", "B_scale"], ["B"], name="dq_b", axis=0)
        )
    else:
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, C).astype(np.float32), "B"))
    conv_in = "x_dq" if conv_input_quantized else "x"
    nodes += [
        helper.make_node("Conv", [conv_in, "W", "B"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["conv", "x_dq" if skip_quantized else "x"], ["res"], name="add"),
        helper.make_node("QuantizeLinear", ["res", "a_scale", "zero"], ["a_q"], name="q_a"),
        helper.make_node("DequantizeLinear", ["a_q", "a_scale", "zero"], ["a"], name="dq_a"),
        helper.make_node("QuantizeLinear", ["res", "b_scale", "zero"], ["b_q"], name="q_b"),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale", "zero"], ["b"], name="dq_b2"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
    ]
    out_name, out_type = "cat", TensorProto.FLOAT
    if q_output:
        nodes.append(
            helper.make_node("QuantizeLinear", ["cat", "a_scale", "zero"], ["y"], name="q_y")
        )
        out_name, out_type = "y", TensorProto.INT8
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 6, 6])],
        [helper.make_tensor_value_info(out_name, out_type, [1, 2 * C, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def rules(model: onnx.ModelProto) -> set[str]:
    return {v.rule for v in lint_qdq(model)}


def test_correct_model_has_no_violations_and_runs() -> None:
    model = qdq_conv_model()
    onnx.checker.check_model(model, full_check=True)
    assert lint_qdq(model) == []
    x = np.random.default_rng(1).standard_normal((1, C, 6, 6)).astype(np.float32)
    (y,) = make_session(model).run(None, {"x": x})
    assert y.shape == (1, 2 * C, 6, 6) and y.dtype == np.float32


def test_float_model_has_no_violations() -> None:
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)],
        "float",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.ones((2, 3), np.float32), "W")],
    )
    assert lint_qdq(helper.make_model(graph)) == []


@pytest.mark.parametrize(
    ("variant", "rule", "node"),
    [
        ({"zero_point": 3}, "zero-point-nonzero", "q_x"),
        ({"act_type": TensorProto.UINT8}, "non-int8", "q_x"),
        ({"quantized_bias": True}, "quantized-bias", "conv"),
        ({"weight_axis": 1}, "weight-axis", "dq_w"),
        ({"weight_min": -128}, "weight-range", "dq_w"),
        ({"q_output": True}, "quantized-output", "q_y"),
        ({"skip_quantized": False}, "residual-skip-unquantized", "add"),
        ({"conv_input_quantized": False}, "unquantized-input", "conv"),
        ({"concat_scales": (0.05, 0.07)}, "concat-scale-mismatch", "concat"),
        ({"per_tensor_weight": True}, "per-tensor-weight", "dq_w"),
    ],
)
def test_each_broken_variant_gives_exactly_its_rule(variant: dict, rule: str, node: str) -> None:
    model = qdq_conv_model(**variant)
    onnx.checker.check_model(model)
    found = lint_qdq(model)
    assert {v.rule for v in found} == {rule}
    assert node in {v.node for v in found}
    for v in found:
        assert v.node in v.message and v.rule in RULES
    assert all(v.severity == ("warning" if rule == "per-tensor-weight" else "error") for v in found)


def test_quantize_without_zero_point_is_uint8() -> None:
    model = qdq_conv_model()
    for node in model.graph.node:
        if node.name in ("q_x", "dq_x"):
            del node.input[2]
    found = lint_qdq(model)
    assert {(v.rule, v.node) for v in found} == {("non-int8", "q_x"), ("non-int8", "dq_x")}
    assert "UINT8 (no zero point" in next(v.message for v in found if v.node == "q_x")


def weight_model(op: str, w_shape: tuple[int, ...], axis: int, **attrs: int) -> onnx.ModelProto:
    x_shape = {"Conv": [1, 2, 4, 4], "ConvTranspose": [1, 2, 4, 4]}.get(op, [3, 2])
    w = np.ones(w_shape, np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
        numpy_helper.from_array(w, "Wq"),
        numpy_helper.from_array(np.full(w_shape[axis], 0.1, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(w_shape[axis], np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["W"], name="dqw", axis=axis),
        helper.make_node(op, ["xd", "W"], ["y"], name="layer", **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize(
    ("op", "w_shape", "attrs", "good", "bad"),
    [
        ("Conv", (3, 2, 1, 1), {}, 0, 1),
        ("ConvTranspose", (2, 3, 1, 1), {}, 1, 0),
        ("Gemm", (5, 2), {"transB": 1}, 0, 1),
        ("Gemm", (2, 5), {}, 1, 0),
        ("MatMul", (2, 5), {}, 1, 0),
        ("MatMul", (2, 5), {}, -1, 0),
    ],
)
def test_weight_axis_per_op(op: str, w_shape: tuple, attrs: dict, good: int, bad: int) -> None:
    assert lint_qdq(weight_model(op, w_shape, good, **attrs)) == []
    found = lint_qdq(weight_model(op, w_shape, bad, **attrs))
    assert [(v.rule, v.node) for v in found] == [("weight-axis", "dqw")]
    want = good % len(w_shape)
    assert f"axis {bad}; the output channels are axis {want}" in found[0].message


def test_weight_range_of_fake_quantized_float_weight() -> None:
    # Q(float W) -> DQ, as some tools emit: -128 appears after rounding W / scale
    model = weight_model("Gemm", (5, 2), 0, transB=1)
    graph = model.graph
    for init in graph.initializer:
        if init.name == "Wq":
            w = np.full((5, 2), 0.5, np.float32)
            w[2, 1] = -12.8  # / 0.1 -> -128
            init.CopyFrom(numpy_helper.from_array(w, "Wf"))
    graph.node.insert(
        0, helper.make_node("QuantizeLinear", ["Wf", "ws", "wz"], ["Wq"], name="qw", axis=0)
    )
    found = lint_qdq(model)
    assert [(v.rule, v.node) for v in found] == [("weight-range", "dqw")]
    assert "1 value(s) of -128" in found[0].message


def test_half_quantized_and_float_layers() -> None:
    model = weight_model("MatMul", (2, 5), 1)
    # a second MatMul kept entirely in float: a warning, not an error
    model.graph.initializer.append(numpy_helper.from_array(np.ones((5, 4), np.float32), "W2"))
    model.graph.node.append(helper.make_node("MatMul", ["y", "W2"], ["z"], name="float_mm"))
    model.graph.output[0].name = "z"
    found = lint_qdq(model)
    assert [(v.rule, v.node, v.severity) for v in found] == [
        ("unquantized-input", "float_mm", "warning")
    ]


def test_unnamed_nodes_are_named_by_op_and_index() -> None:
    model = qdq_conv_model(zero_point=3)
    for node in model.graph.node:
        node.name = ""
    assert {v.node for v in lint_qdq(model)} == {"QuantizeLinear#0", "DequantizeLinear#1"}


def test_onnxruntime_quantize_static_output_is_flagged(tmp_path) -> None:
    quantization = pytest.importorskip("onnxruntime.quantization")
    # a float model for ONNX Runtime to quantize with uint8 activations, int8 weights
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv")],
        "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        [
            numpy_helper.from_array(
                np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2, 1, 1), "W"
            ),
            numpy_helper.from_array(np.array([0.1, -0.2, 0.3], np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(2)
            self.feeds = iter(
                [{"x": rng.standard_normal((1, 2, 4, 4), dtype=np.float32)} for _ in range(2)]
            )

        def get_next(self):
            return next(self.feeds, None)

    quantization.quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=quantization.QuantFormat.QDQ,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        per_channel=False,
    )
    found = rules(onnx.load(dst))
    assert found == {"non-int8", "zero-point-nonzero", "quantized-bias", "per-tensor-weight"}


def test_format_violations() -> None:
    assert format_violations([]) == "no violations"
    text = format_violations(
        [
            Violation("q_x", "zero-point-nonzero", "QuantizeLinear 'q_x' has zero point 3"),
            Violation("dq_w", "per-tensor-weight", "weight ...", "warning"),
        ]
    )
    lines = text.splitlines()
    assert lines[0].startswith("error    zero-point-nonzero  q_x: QuantizeLinear 'q_x'")
    assert lines[1].startswith("warning  per-tensor-weight   dq_w: weight")
    assert lines[-1] == "1 error(s), 1 warning(s)"
