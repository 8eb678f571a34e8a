"""The graph toolkit: constants, names, uses, one cached shape inference, exposing
sessions, the IR clamp, and the fingerprint behind `modified`."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.shape_inference
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.graph import (
    clamp_ir,
    clear_shapes_cache,
    const_value,
    export_graph,
    export_skeleton,
    exposing_session,
    fingerprint,
    graph_from_model,
    infer_shapes,
    model_from_graph,
    replace_uses,
    unique_name,
)


def _model(ir: int = 8) -> onnx.ModelProto:
    """x[2,3] + Constant(value_floats) -> Identity -> Relu -> y; w an initializer."""
    nodes = [
        helper.make_node("Constant", [], ["k"], value_floats=[1.0, 2.0, 3.0]),
        helper.make_node("Constant", [], ["s"], value_int=7),
        helper.make_node("Identity", ["w"], ["w_id"]),
        helper.make_node("Add", ["x", "k"], ["a"], name="add"),
        helper.make_node("Mul", ["a", "w_id"], ["m"], name="mul"),
        helper.make_node("Relu", ["m"], ["y"], name="relu"),
    ]
    w = numpy_helper.from_array(np.full((2, 3), 0.5, np.float32), "w")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = ir
    return model


def test_const_value_reads_initializers_constant_nodes_and_identity_chains() -> None:
    graph = gs.import_onnx(_model())
    t = graph.tensors()
    np.testing.assert_array_equal(const_value(t["k"]), np.array([1, 2, 3], np.float32))
    assert const_value(t["k"]).dtype == np.float32
    assert const_value(t["s"]).dtype == np.int64 and int(const_value(t["s"])) == 7
    np.testing.assert_array_equal(const_value(t["w_id"]), np.full((2, 3), 0.5, np.float32))
    assert const_value(t["x"]) is None and const_value(t["a"]) is None
    assert const_value(None) is None


def test_unique_name_and_replace_uses() -> None:
    graph = gs.import_onnx(_model())
    assert unique_name(graph, "fresh") == "fresh"
    taken: set[str] = set()
    assert [unique_name(graph, "a", taken), unique_name(graph, "a", taken)] == ["a", "a_1"]
    t = graph.tensors()
    assert replace_uses(t["a"], t["x"]) == 1
    assert graph.nodes[-2].inputs[0] is t["x"]  # Mul reads x now


def test_infer_shapes_on_a_model_or_its_graph_is_one_cached_answer(monkeypatch) -> None:
    calls = []
    real = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(
        onnx.shape_inference, "infer_shapes", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    clear_shapes_cache()
    model = _model()
    infos = infer_shapes(model)
    assert infos["m"].shape == (2, 3) and infos["m"].dtype == "float32"
    shape, dtype = infos["a"]  # unpacks as (shape, numpy dtype)
    assert shape == (2, 3) and dtype == np.float32
    assert infer_shapes(gs.import_onnx(model)) == infos  # the same state: no new inference
    assert len(calls) == 1
    changed = _model()
    changed.graph.node[3].op_type = "Sub"
    infer_shapes(changed)
    assert len(calls) == 2  # another state: inferred again
    infer_shapes(changed)
    assert len(calls) == 2  # cached too
    assert infer_shapes(model, {"x": (2, 3)})["y"].shape == (2, 3)
    assert len(calls) == 3


def test_measured_shapes_are_marked() -> None:
    """Reshape to a shape computed through float arithmetic: ONNX cannot follow it, one
    ONNX Runtime run measures it (and says so)."""
    clear_shapes_cache()
    infos = infer_shapes(_measured_matmul_model())
    assert infos["r"].shape == (2, 64) and infos["r"].measured
    assert not infos["s"].measured


def _measured_matmul_model() -> onnx.ModelProto:
    """x -> Reshape(shape through float arithmetic) -> MatMul(big w) -> y: ONNX cannot
    follow the Reshape, so shape inference needs one ONNX Runtime run, with w's values."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    scale = numpy_helper.from_array(np.array([1, 1], np.float32), "scale")
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["sf", "scale"], ["sm"]),
        helper.make_node("Cast", ["sm"], ["si"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "si"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, scale],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_export_skeleton_stands_in_for_big_constants_and_leaves_the_graph() -> None:
    model = _measured_matmul_model()
    graph = gs.import_onnx(model)
    before = export_graph(graph).SerializeToString()
    skel = export_skeleton(graph)
    by_name = {t.name: t for t in skel.graph.initializer}
    assert by_name["w"].data_location == TensorProto.EXTERNAL and not by_name["w"].raw_data
    assert list(by_name["w"].dims) == [64, 64]
    np.testing.assert_array_equal(numpy_helper.to_array(by_name["scale"]), [1, 1])  # small: kept
    assert export_graph(graph).SerializeToString() == before  # the graph is unchanged
    assert skel.ByteSize() < 1024 < model.ByteSize()


def test_infer_shapes_of_a_graph_measures_with_the_real_weights() -> None:
    """A graph's shapes come from its skeleton; the one ONNX Runtime run still gets the
    weights (a stand-in cannot run), and the answer equals the model's."""
    model = _measured_matmul_model()
    clear_shapes_cache()
    from_model = infer_shapes(model, {"x": (2, 64)})
    clear_shapes_cache()
    from_graph = infer_shapes(gs.import_onnx(model), {"x": (2, 64)})
    assert from_graph == from_model
    assert from_graph["y"].shape == (2, 64) and from_graph["r"].measured


def test_exposing_session_returns_intermediates_without_changing_the_model() -> None:
    model = _model()
    before = model.SerializeToString()
    session = exposing_session(model, ["a", "m"], types={"a": TensorProto.FLOAT})
    names = [o.name for o in session.get_outputs()]
    assert names == ["y", "a", "m"]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y, a, m = session.run(names, {"x": x})
    np.testing.assert_allclose(a, x + np.array([1, 2, 3], np.float32))
    np.testing.assert_allclose(m, a * 0.5)
    np.testing.assert_allclose(y, np.maximum(m, 0))
    assert model.SerializeToString() == before


def test_clamp_ir_and_the_export_round_trip() -> None:
    model = _model(ir=11)
    assert clamp_ir(model) is model and model.ir_version <= 10
    out = model_from_graph(graph_from_model(_model(ir=8)), _model(ir=8))
    assert out.ir_version == 8  # the input's IR kept: opset 13 needs no higher one


def test_fingerprint_sees_values_not_storage() -> None:
    model = _model()
    same = export_graph(graph_from_model(model))  # gs round trip
    assert same.SerializeToString() != model.SerializeToString()
    assert fingerprint(same) == fingerprint(model)
    other = _model()
    other.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.full((2, 3), 0.25, np.float32), "w")
    )
    assert fingerprint(other) != fingerprint(model)


def test_a_skeletons_fingerprint_is_its_models() -> None:
    """Shapes are cached by fingerprint: a graph's skeleton and its full export must
    agree, and a changed weight must still change it."""
    model = _measured_matmul_model()
    graph = gs.import_onnx(model)
    assert fingerprint(export_skeleton(graph)) == fingerprint(export_graph(graph))
    assert fingerprint(export_skeleton(graph)) == fingerprint(model)
    w = graph.tensors()["w"]
    w.values = np.array(w.values) * 1.0001
    assert fingerprint(export_skeleton(graph)) != fingerprint(model)
    assert fingerprint(export_skeleton(graph)) == fingerprint(export_graph(graph))


def test_exposing_session_retries_when_ort_fuses_an_exposed_tensor_away(monkeypatch) -> None:
    """ONNX Runtime 1.32 at optimization "all" can drop an exposed tensor and refuse the
    session (the digits CNN after fold-batchnorm + quantize, tests/test_cli.py): the
    session is made again at "extended"; other refusals and other levels still raise."""
    import pytest

    import onnxslim_edge.runtime as runtime
    from onnxslim_edge.errors import UnsupportedError

    real = runtime.make_session
    levels: list[str] = []
    refusal = {"text": "Failed to find node output or a constant initializer producing output: a."}

    def flaky(model, *, optimization="all", **kwargs):
        levels.append(optimization)
        if optimization in ("all", "basic"):
            raise UnsupportedError(f"ONNX Runtime cannot load the model: {refusal['text']}")
        return real(model, optimization=optimization, **kwargs)

    monkeypatch.setattr(runtime, "make_session", flaky)
    session = exposing_session(_model(), ["a"])
    assert levels == ["all", "extended"]
    assert [o.name for o in session.get_outputs()] == ["y", "a"]
    levels.clear()
    with pytest.raises(UnsupportedError, match="Failed to find node output"):
        exposing_session(_model(), ["a"], optimization="basic")  # asked for: no retry
    assert levels == ["basic"]
    levels.clear()
    refusal["text"] = "Could not find an implementation for Foo"
    with pytest.raises(UnsupportedError, match="implementation for Foo"):
        exposing_session(_model(), ["a"])
    assert levels == ["all"]
    # a Q/DQ model starts at "extended" (ORT 1.19.2 returns None for such a tensor at "all")
    qdq = _model()
    qdq.graph.initializer.append(numpy_helper.from_array(np.array(0.1, np.float32), "sc"))
    qdq.graph.node[3].output[0] = "a_f"
    qdq.graph.node.insert(4, helper.make_node("QuantizeLinear", ["a_f", "sc"], ["a_q"]))
    qdq.graph.node.insert(5, helper.make_node("DequantizeLinear", ["a_q", "sc"], ["a"]))
    levels.clear()
    session = exposing_session(qdq, ["a_f"])
    assert levels == ["extended"]
    assert [o.name for o in session.get_outputs()] == ["y", "a_f"]


@pytest.mark.parametrize("lazy", [True, False])
def test_export_of_constants_over_the_protobuf_limit(monkeypatch, lazy: bool) -> None:
    """onnx's make_graph serializes each initializer to copy it, which fails past 2 GB:
    such constants are exported as stand-ins and given their bytes in place. Checked
    with the limit lowered to 1 KiB (a real 2 GB tensor is benchmarks' work)."""
    import onnxslim_edge.model as model_mod

    model = _measured_matmul_model()
    graph = gs.import_onnx(model)
    if not lazy:
        w = graph.tensors()["w"]
        w.values = np.array(w.values)  # a numpy array, as after a pass rewrote it
    expected = export_graph(graph).SerializeToString()
    monkeypatch.setattr(model_mod, "PROTOBUF_LIMIT", 1024)
    seen = []
    real = gs.export_onnx

    def spy(g, **kwargs):
        values = g.tensors()["w"]._values
        seen.append(getattr(getattr(values, "tensor", None), "data_location", None))
        return real(g, **kwargs)

    monkeypatch.setattr(gs, "export_onnx", spy)
    exported = export_graph(graph)
    assert seen == [TensorProto.EXTERNAL]  # exported as a stand-in
    assert exported.SerializeToString() == expected
    assert graph.tensors()["w"]._values is not None  # the graph keeps its values
    by_name = {t.name: t for t in exported.graph.initializer}
    assert not by_name["w"].external_data and by_name["w"].data_location == 0
    clean = model_from_graph(gs.import_onnx(model), model)
    assert {t.name for t in clean.graph.initializer} >= {"w"}
    # a skeleton of such a graph keeps its stand-in (no bytes to put back into it)
    skel = {t.name: t for t in export_skeleton(graph).graph.initializer}
    assert skel["w"].data_location == TensorProto.EXTERNAL
    assert fingerprint(export_skeleton(graph)) == fingerprint(export_graph(graph))
