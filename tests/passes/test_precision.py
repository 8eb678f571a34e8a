"""fp16: float32 -> float16 conversion with float32 I/O on request and blocked ops.

Measured on the torch fixtures (ORT CPU, max |error| / output range vs float32): resnet
1.8e-4, mobilenetv2 3.4e-4, transformer 6.1e-5, unet 2.5e-4 with float32 I/O; the
tests hold them to 2e-3. ONNX Runtime's CPU provider lacks float16 kernels for some
ops (it then inserts Casts to float32 itself), so every model must load and run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from fixtures import torch_models
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.passes.precision import ConvertFP16
from onnxslim_edge.pipeline import Pipeline, model_from_graph
from onnxslim_edge.runtime import make_session

TOL_OF_RANGE = 2e-3


def _convert(model: onnx.ModelProto, **options: Any) -> tuple[onnx.ModelProto, Any]:
    result = Pipeline([ConvertFP16(**options)]).run(model)
    return result.model, result.report.passes[0]


def _io_types(model: onnx.ModelProto) -> tuple[list[int], list[int]]:
    inits = {t.name for t in model.graph.initializer}
    ins = [i.type.tensor_type.elem_type for i in model.graph.input if i.name not in inits]
    return ins, [o.type.tensor_type.elem_type for o in model.graph.output]


def _float_bytes(model: onnx.ModelProto) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for t in model.graph.initializer:
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            n = int(np.prod(t.dims)) * (4 if t.data_type == TensorProto.FLOAT else 2)
            sizes[t.data_type] = sizes.get(t.data_type, 0) + n
    return sizes


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "transformer", "unet"])
def test_torch_fixtures_convert_and_run(name: str, torch_model) -> None:
    model = onnx.load(torch_model(name))
    x = torch_models.example_input(name)
    ref = make_session(model).run(None, {"x": x})[0]
    half, _report = _convert(model)
    onnx.checker.check_model(half, full_check=True)
    assert _io_types(half) == ([TensorProto.FLOAT], [TensorProto.FLOAT])
    out = make_session(half).run(None, {"x": x})[0]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=TOL_OF_RANGE * float(np.ptp(ref)))
    # Weights halve: whatever stays float32 is only what blocked ops read.
    before, after = _float_bytes(model), _float_bytes(half)
    assert after.get(TensorProto.FLOAT16, 0) > 0
    assert sum(after.values()) < 0.52 * sum(before.values())
    # The whole file shrinks less: these fixtures are tiny, so graph structure dominates.
    assert len(half.SerializeToString()) < len(model.SerializeToString())
    # Float16 I/O on request.
    half_io, _ = _convert(model, keep_io_types=False)
    assert _io_types(half_io) == ([TensorProto.FLOAT16], [TensorProto.FLOAT16])
    out16 = make_session(half_io).run(None, {"x": x.astype(np.float16)})[0]
    assert out16.dtype == np.float16
    np.testing.assert_allclose(out16, ref, rtol=0, atol=TOL_OF_RANGE * float(np.ptp(ref)))
    # Idempotent: nothing float32 is left to convert.
    assert _convert(half)[1].modified is False
    assert _convert(half_io, keep_io_types=False)[1].modified is False


def test_blocked_ops_in_transformer_stay_float32(torch_model) -> None:
    model = onnx.load(torch_model("transformer"))
    half, report = _convert(model)
    skipped = {s.op for s in report.skips}
    assert skipped == {"Pow", "ReduceMean"}  # the decomposed LayerNorm's statistics
    pow_node = next(n for n in half.graph.node if n.op_type == "Pow")
    producer = {o: n for n in half.graph.node for o in n.output}
    cast = producer[pow_node.input[0]]
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT


def test_unet_resize_scales_stay_float32(torch_model) -> None:
    half, report = _convert(onnx.load(torch_model("unet")))
    resize = next(n for n in half.graph.node if n.op_type == "Resize")
    producer = {o: n for n in half.graph.node for o in n.output}
    assert producer[resize.input[2]].op_type == "Concat"  # computed in float32, no Cast
    assert ("Concat", "computes a float32-only input (e.g. Resize scales)") in {
        (s.op, s.reason) for s in report.skips
    }


def _small(nodes: list, inits: list, out_shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_shared_constant_blocked_node_cast_and_clamp() -> None:
    w = np.array([[1.0, -2.0], [3.0, 1e6], [0.5, 1e-9], [2.0, 2.0]], np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mm_half"),
        helper.make_node("MatMul", ["x", "W"], ["b"], name="mm_float"),
        helper.make_node("Cast", ["a"], ["ac"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Add", ["ac", "b"], ["y"], name="add"),
    ]
    model = _small(nodes, [numpy_helper.from_array(w, "W")], [2, 2])
    half, report = _convert(model, node_block_list=("mm_float",))
    inits = {t.name: numpy_helper.to_array(t) for t in half.graph.initializer}
    nodes_by = {n.name: n for n in half.graph.node}
    assert inits[nodes_by["mm_float"].input[1]].dtype == np.float32  # original kept
    w16 = inits[nodes_by["mm_half"].input[1]]
    assert w16.dtype == np.float16 and w16[1, 1] == 65504  # 1e6 clamped
    assert report.counters["clamped"] == 1 and report.counters["underflowed"] == 1
    assert nodes_by["cast"].attribute[0].i == TensorProto.FLOAT16  # inside the fp16 region
    assert ("mm_float", "in node_block_list") in {(s.node, s.reason) for s in report.skips}
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    got = make_session(half).run(None, {"x": x})[0]
    w_ref = np.where(np.abs(w) > 65504, 65504, w)
    expected = x @ w_ref.astype(np.float16).astype(np.float32) + x @ w
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.ptp(expected))


def test_control_flow_model_is_left_alone() -> None:
    then = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 4])],
    )
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["c"], to=TensorProto.BOOL),
        helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=then),
    ]
    model = _small(nodes, [], [2, 4])
    model = model_from_graph(gs.import_onnx(model), model)  # as the pipeline exports it
    _half, report = _convert(model)
    assert report.modified is False
    assert report.skips[0].reason == "If has subgraphs: model left unchanged"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep_io_types": "perhaps"}, "fp16.keep_io_types: expected true/false"),
        ({"op_block_list": (1, 2)}, "fp16.op_block_list"),
    ],
)
def test_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ConvertFP16(**options)
