"""infer_shapes / io_info: ONNX inference, ONNX Runtime fallback, input_shapes checks."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim_edge.analysis.shapes as shapes_mod
import onnxslim_edge.sandbox
from onnxslim_edge.analysis import TensorInfo, infer_shapes, io_info
from onnxslim_edge.errors import DataError
from onnxslim_edge.graph import clear_shapes_cache

OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET, ir_version=8):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def conv_model(batch="N") -> onnx.ModelProto:
    """x[batch,3,8,8] -Conv(4x3x3x3, pad 1)-> c -Relu-> y, all inferable by ONNX."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    return make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])],
        [w],
    )


def opaque_reshape_model(batch="N", factor=1.0) -> onnx.ModelProto:
    """x[batch,3,8,8] -> Reshape to [batch*factor, -1] through float shape arithmetic
    (Shape -> Cast -> Mul -> Cast), which ONNX's data propagation cannot follow."""
    scale = numpy_helper.from_array(np.array([factor, 1, 1, 1], np.float32), "scale")
    return make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["sf", "scale"], ["sf2"]),
            helper.make_node("Cast", ["sf2"], ["si"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["x", "si"], ["r"]),
            helper.make_node("Relu", ["r"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [scale],
    )


@pytest.fixture(autouse=True)
def _fresh_shapes_cache():
    """Each test infers from scratch (results are cached per model state)."""
    clear_shapes_cache()


@pytest.fixture
def sessions(monkeypatch):
    """Counts ONNX Runtime runs (each in a budgeted child: onnxslim_edge.sandbox)."""
    calls = []
    real = onnxslim_edge.sandbox.output_shapes

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxslim_edge.sandbox, "output_shapes", counting)
    return calls


def test_static_model_every_tensor():
    infos = infer_shapes(conv_model(batch=2))
    assert infos["x"] == TensorInfo("x", "float32", (2, 3, 8, 8))
    assert infos["w"] == TensorInfo("w", "float32", (4, 3, 3, 3))
    assert infos["c"] == TensorInfo("c", "float32", (2, 4, 8, 8))
    assert infos["y"] == TensorInfo("y", "float32", (2, 4, 8, 8))
    assert infos["c"].is_static and infos["c"].numel == 2 * 4 * 64


def test_symbolic_dims_stay_symbolic_without_input_shapes(sessions):
    infos = infer_shapes(conv_model())
    assert infos["c"].shape == ("N", 4, 8, 8)
    assert not infos["c"].is_static and infos["c"].numel is None
    assert sessions == []


def test_input_shapes_resolved_by_onnx_need_no_session(sessions):
    infos = infer_shapes(conv_model(), {"x": (4, 3, 8, 8)})
    assert infos["x"].shape == (4, 3, 8, 8)
    assert infos["c"].shape == (4, 4, 8, 8)
    assert infos["y"].shape == (4, 4, 8, 8)
    assert sessions == []


def test_onnx_leaves_reshape_unknown():
    infos = infer_shapes(opaque_reshape_model())
    assert infos["r"].shape == (None, None, None, None)  # ONNX's unk__N dims read as None
    assert infos["si"].shape == (4,)


def test_input_shapes_via_one_runtime_session(sessions):
    model = opaque_reshape_model()
    infos = infer_shapes(model, {"x": (4, 3, 8, 8)})
    assert len(sessions) == 1
    assert infos["r"] == TensorInfo("r", "float32", (4, 3, 8, 8))
    assert infos["y"] == TensorInfo("y", "float32", (4, 3, 8, 8))
    assert infos["s"] == TensorInfo("s", "int64", (4,))
    assert infos["x"].shape == (4, 3, 8, 8)


def test_static_inputs_use_runtime_for_unknown_intermediates(sessions):
    infos = infer_shapes(opaque_reshape_model(batch=2))
    assert len(sessions) == 1
    assert infos["y"].shape == (2, 3, 8, 8)


def test_symbolic_inputs_without_input_shapes_start_no_session(sessions):
    infos = infer_shapes(opaque_reshape_model())
    assert sessions == []
    assert infos["x"].shape == ("N", 3, 8, 8)


def test_runtime_failure_keeps_onnx_shapes(caplog):
    # A doubled batch cannot be reshaped from the input: ONNX Runtime fails at run time.
    model = opaque_reshape_model(factor=2.0)
    with caplog.at_level(logging.WARNING, logger="onnxslim_edge.analysis.shapes"):
        infos = infer_shapes(model, {"x": (3, 3, 8, 8)})
    assert infos["r"].shape == (None, None, None, None)
    assert infos["x"].shape == (3, 3, 8, 8)
    assert "ONNX Runtime could not compute concrete shapes" in caplog.text


def test_other_inputs_take_the_same_symbol_else_one(sessions):
    model = make_model(
        [
            helper.make_node("Add", ["a", "b"], ["s"]),
            helper.make_node("Shape", ["s"], ["sh"]),
            helper.make_node("Cast", ["sh"], ["shf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["shf", "ones"], ["shf2"]),
            helper.make_node("Cast", ["shf2"], ["shi"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["s", "shi"], ["r"]),
            helper.make_node("Reshape", ["c", "cshape"], ["rc"]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 5]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 5]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["other", 2]),
        ],
        [
            helper.make_tensor_value_info("r", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("rc", TensorProto.FLOAT, None),
        ],
        [
            numpy_helper.from_array(np.array([-1], np.int64), "cshape"),
            numpy_helper.from_array(np.ones(2, np.float32), "ones"),
        ],
    )
    infos = infer_shapes(model, {"a": (3, 5)})
    assert len(sessions) == 1
    assert infos["b"].shape == (3, 5)
    assert infos["c"].shape == (1, 2)
    assert infos["r"].shape == (3, 5)
    assert infos["rc"].shape == (2,)


def test_caller_model_unchanged():
    for model, given in (
        (conv_model(), {"x": (4, 3, 8, 8)}),
        (opaque_reshape_model(), {"x": (4, 3, 8, 8)}),
        (opaque_reshape_model(batch=2), None),
    ):
        before = model.SerializeToString()
        infer_shapes(model, given)
        assert model.SerializeToString() == before


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"z": (1, 3, 8, 8)}, "input_shapes names 'z', which is not a model input (inputs: x)"),
        ({"x": (1, 3, 8)}, "input_shapes['x'] has rank 3; the model declares rank 4"),
        ({"x": (1, 4, 8, 8)}, "input_shapes['x'] gives 4 at axis 1; the model declares 3"),
        ({"x": (1, -3, 8, 8)}, "input_shapes['x'] has a negative dim"),
        ({"x": "abc"}, "input_shapes['x'] must be a sequence of ints"),
    ],
)
def test_bad_input_shapes(given, message):
    with pytest.raises(DataError) as err:
        infer_shapes(conv_model(), given)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_skeleton_gives_the_shapes_of_the_full_model(monkeypatch):
    """Inference runs on a skeleton (large tensors without their data): same answer."""
    import onnxslim_edge.model as model_mod

    model = conv_model()
    monkeypatch.setattr(model_mod, "SKELETON_THRESHOLD", 0)  # every tensor a stand-in
    assert not shapes_mod.skeleton(model).graph.initializer[0].HasField("raw_data")
    stubbed = infer_shapes(model, {"x": (2, 3, 8, 8)})
    monkeypatch.setattr(model_mod, "SKELETON_THRESHOLD", 2**40)  # keep every tensor's data
    assert infer_shapes(model, {"x": (2, 3, 8, 8)}) == stubbed
    assert stubbed["w"].shape == (4, 3, 3, 3) and stubbed["y"].shape == (2, 4, 8, 8)


def test_dtypes():
    model = make_model(
        [
            helper.make_node("Cast", ["h"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Shape", ["f"], ["s"]),
            helper.make_node("Greater", ["f", "f"], ["g"]),
        ],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT16, [2, 3])],
        [
            helper.make_tensor_value_info("s", TensorProto.INT64, None),
            helper.make_tensor_value_info("g", TensorProto.BOOL, None),
        ],
    )
    infos = infer_shapes(model)
    assert [infos[n].dtype for n in ("h", "f", "s", "g")] == ["float16", "float32", "int64", "bool"]
    assert infos["g"].shape == (2, 3)


def test_io_info_excludes_initializers_of_ir3_models():
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [w],
        opset=7,
        ir_version=3,
    )
    inputs, outputs = io_info(model)
    assert inputs == [TensorInfo("x", "float32", ("N", 3, 8, 8))]
    assert outputs == [TensorInfo("y", "float32", ("N", 4, 6, 6))]
    infos = infer_shapes(model, {"x": (2, 3, 8, 8)})
    assert infos["y"].shape == (2, 4, 6, 6)


def test_empty_input_shapes_default_symbolic_dims_to_one(sessions):
    infos = infer_shapes(conv_model(), {})
    assert infos["x"].shape == (1, 3, 8, 8)
    assert infos["y"].shape == (1, 4, 8, 8)
    assert sessions == []
    assert infer_shapes(opaque_reshape_model(), {})["y"].shape == (1, 3, 8, 8)
    assert len(sessions) == 1
