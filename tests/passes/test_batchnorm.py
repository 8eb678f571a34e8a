"""fold-batchnorm: BN / per-channel Mul / Add folded into Conv, ConvTranspose, Gemm, MatMul.

Each positive case checks the op sequence, the full ONNX checker, and that ONNX Runtime
(graph optimizations off, so the reference really runs the BatchNormalization) gives
the original's outputs within rtol 1e-5 and atol 1e-5 x max|reference|. Negative cases
check that the model is untouched and the skip says why.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from fixtures.equivalence import assert_equivalent as _assert_equivalent
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.passes.batchnorm import FoldBatchNorm
from onnxslim_edge.pipeline import Context, Pipeline, get_pass, model_from_graph

OPSETS = (13, 17)


# --------------------------------------------------------------------------- helpers


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(array, order="C"), name)  # keeps 0-d arrays 0-d


def _bn_inits(prefix: str, c: int, rng: np.random.Generator, dtype: Any = np.float32) -> list:
    return [
        _init(f"{prefix}_gamma", rng.uniform(0.5, 2.0, c).astype(dtype)),
        _init(f"{prefix}_beta", rng.normal(size=c).astype(dtype)),
        _init(f"{prefix}_mean", rng.normal(size=c).astype(dtype)),
        _init(f"{prefix}_var", rng.uniform(0.1, 3.0, c).astype(dtype)),
    ]


def _bn(x: str, y: str, prefix: str, **attrs: Any) -> onnx.NodeProto:
    names = [f"{prefix}_{p}" for p in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *names], [y], name=prefix, **attrs)


def _model(
    nodes: list,
    inputs: dict[str, tuple[int, ...]],
    outputs: list[str],
    inits: list,
    opset: int,
    dtype: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, dtype, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, dtype, None) for n in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return _with_output_shapes(model)


def _with_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Declare the graph outputs' shapes (the checker wants them) from shape inference."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.output[:]
    inferred = onnx.shape_inference.infer_shapes(bare)
    infos = {v.name: v for v in inferred.graph.value_info}
    for out in model.graph.output:
        if out.name in infos:
            out.type.CopyFrom(infos[out.name].type)
    return model


def _fold(model: onnx.ModelProto, **options: Any) -> tuple[onnx.ModelProto, Any]:
    graph = gs.import_onnx(model)
    report = FoldBatchNorm(**options).run(graph, Context())
    return model_from_graph(graph, model), report


def _roundtrip(model: onnx.ModelProto) -> onnx.ModelProto:
    return model_from_graph(gs.import_onnx(model), model)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# --------------------------------------------------------------------------- Conv


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize(("cin", "cout", "group"), [(4, 8, 1), (4, 8, 2), (4, 4, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folds(opset: int, cin: int, cout: int, group: int, bias: bool) -> None:
    rng = np.random.default_rng(1)
    inits = [_init("W", rng.normal(size=(cout, cin // group, 3, 3)).astype(np.float32))]
    conv_in = ["x", "W"]
    if bias:
        inits.append(_init("B", rng.normal(size=cout).astype(np.float32)))
        conv_in.append("B")
    inits += _bn_inits("bn", cout, rng)
    nodes = [
        helper.make_node("Conv", conv_in, ["c"], group=group, pads=[1, 1, 1, 1], name="conv"),
        _bn("c", "b", "bn", epsilon=1e-3),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    model = _model(nodes, {"x": (2, cin, 6, 6)}, ["y"], inits, opset)
    folded, report = _fold(model)
    assert _ops(folded) == ["Conv", "Relu"]
    assert report.counters["folded_batchnorm"] == 1
    assert report.details[0]["into"] == "conv"
    assert len(folded.graph.node[0].input) == 3  # a bias is created when missing
    _assert_equivalent(model, folded)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn_folds(opset: int, group: int) -> None:
    rng = np.random.default_rng(2)
    cin, cout_g = 4, 3
    cout = cout_g * group
    inits = [
        _init("W", rng.normal(size=(cin, cout_g, 3, 3)).astype(np.float32)),
        _init("B", rng.normal(size=cout).astype(np.float32)),
        *_bn_inits("bn", cout, rng),
    ]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W", "B"], ["c"], group=group, strides=[2, 2]),
        _bn("c", "y", "bn"),
    ]
    model = _model(nodes, {"x": (1, cin, 5, 5)}, ["y"], inits, opset)
    folded, report = _fold(model)
    assert _ops(folded) == ["ConvTranspose"]
    assert folded.graph.node[0].output[0] == "y"  # the BN output, a graph output, keeps its name
    assert report.counters["folded_batchnorm"] == 1
    _assert_equivalent(model, folded)


# --------------------------------------------------------------------------- Gemm / MatMul


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 5), (3, 1), ()])
def test_gemm_bn_folds(opset: int, trans_b: int, c_shape: tuple[int, ...] | None) -> None:
    rng = np.random.default_rng(3)
    k, n = 6, 5
    w = rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [_init("W", w), *_bn_inits("bn", n, rng)]
    gemm_in = ["x", "W"]
    if c_shape is not None:
        inits.append(_init("C", np.asarray(rng.normal(size=c_shape), dtype=np.float32)))
        gemm_in.append("C")
    nodes = [
        helper.make_node("Gemm", gemm_in, ["g"], transB=trans_b, alpha=0.7, beta=0.5),
        _bn("g", "y", "bn"),
    ]
    model = _model(nodes, {"x": (3, k)}, ["y"], inits, opset)
    folded, report = _fold(model)
    assert _ops(folded) == ["Gemm"]
    assert report.counters["folded_batchnorm"] == 1
    _assert_equivalent(model, folded)


@pytest.mark.parametrize("opset", OPSETS)
def test_matmul_bn_becomes_matmul_add(opset: int) -> None:
    rng = np.random.default_rng(4)
    inits = [_init("B", rng.normal(size=(6, 4)).astype(np.float32)), *_bn_inits("bn", 4, rng)]
    nodes = [helper.make_node("MatMul", ["x", "B"], ["m"]), _bn("m", "y", "bn")]
    model = _model(nodes, {"x": (5, 6)}, ["y"], inits, opset)
    folded, report = _fold(model)
    assert _ops(folded) == ["MatMul", "Add"]
    assert report.counters["folded_batchnorm"] == 1
    _assert_equivalent(model, folded)


def test_matmul_rank3_bn_is_skipped() -> None:
    rng = np.random.default_rng(5)
    inits = [_init("B", rng.normal(size=(6, 4)).astype(np.float32)), *_bn_inits("bn", 5, rng)]
    nodes = [helper.make_node("MatMul", ["x", "B"], ["m"]), _bn("m", "y", "bn")]
    model = _model(nodes, {"x": (2, 5, 6)}, ["y"], inits, 13)
    folded, report = _fold(model)
    assert folded == _roundtrip(model)
    assert report.counters["folded_batchnorm"] == 0
    assert [s.reason for s in report.skips] == [
        "BatchNormalization has 5 channels, MatMul produces 4"
    ]
    # With 4 BN channels the shapes still do not line up: axis 1 is not the last axis.
    inits = [_init("B", rng.normal(size=(6, 4)).astype(np.float32)), *_bn_inits("bn", 4, rng)]
    model = _model(nodes, {"x": (2, 4, 6)}, ["y"], inits, 13)
    folded, report = _fold(model)
    assert folded == _roundtrip(model)
    assert [s.reason for s in report.skips] == [
        "MatMul output rank is 3: BatchNormalization axis 1 is not its last axis"
    ]


# --------------------------------------------------------------------------- Mul / Add


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize(
    ("mul_shape", "add_shape", "add_op"),
    [((8, 1, 1), (1, 8, 1, 1), "Add"), ((), (8, 1, 1), "Sub"), ((1, 8, 1, 1), (1,), "Add")],
)
def test_conv_mul_add_fold(
    opset: int, mul_shape: tuple[int, ...], add_shape: tuple[int, ...], add_op: str
) -> None:
    rng = np.random.default_rng(6)
    inits = [
        _init("W", rng.normal(size=(8, 3, 3, 3)).astype(np.float32)),
        _init("m", np.asarray(rng.uniform(-2, 2, mul_shape), dtype=np.float32)),
        _init("a", np.asarray(rng.normal(size=add_shape), dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        helper.make_node("Mul", ["m", "c"], ["p"]),  # constant first: Mul commutes
        helper.make_node(add_op, ["p", "a"], ["q"]),
        helper.make_node("Relu", ["q"], ["y"]),
    ]
    model = _model(nodes, {"x": (1, 3, 7, 7)}, ["y"], inits, opset)
    folded, report = _fold(model)
    assert _ops(folded) == ["Conv", "Relu"]
    assert report.counters["folded_mul"] == 1
    assert report.counters["folded_add"] == 1
    _assert_equivalent(model, folded)


@pytest.mark.parametrize("opset", OPSETS)
def test_gemm_and_matmul_mul_add(opset: int) -> None:
    rng = np.random.default_rng(7)
    inits = [
        _init("W", rng.normal(size=(5, 6)).astype(np.float32)),
        _init("C", rng.normal(size=5).astype(np.float32)),
        _init("s", rng.normal(size=(1, 5)).astype(np.float32)),
        _init("t", rng.normal(size=5).astype(np.float32)),
        _init("B", rng.normal(size=(5, 4)).astype(np.float32)),
        _init("s2", rng.normal(size=4).astype(np.float32)),
        _init("t2", rng.normal(size=4).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W", "C"], ["g"], transB=1, beta=2.0),
        helper.make_node("Mul", ["g", "s"], ["gs"]),
        helper.make_node("Add", ["gs", "t"], ["h"]),
        helper.make_node("MatMul", ["h", "B"], ["m"]),
        helper.make_node("Mul", ["m", "s2"], ["ms"]),
        helper.make_node("Add", ["ms", "t2"], ["y"]),
    ]
    model = _model(nodes, {"x": (3, 6)}, ["y"], inits, opset)
    folded, report = _fold(model)
    # MatMul + Add is already the bias pattern: only the Mul folds into the MatMul.
    assert _ops(folded) == ["Gemm", "MatMul", "Add"]
    assert report.counters == {"folded_batchnorm": 0, "folded_mul": 2, "folded_add": 1}
    _assert_equivalent(model, folded)


@pytest.mark.parametrize("opset", OPSETS)
def test_mul_add_fold_into_standalone_bn(opset: int) -> None:
    # DenseNet's pre-activation: Concat -> BN -> Mul -> Add -> Relu, BN itself unfoldable.
    rng = np.random.default_rng(15)
    inits = [
        *_bn_inits("bn", 6, rng),
        _init("m", rng.uniform(-2, 2, (6, 1, 1)).astype(np.float32)),
        _init("a", rng.normal(size=(1, 6, 1, 1)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Concat", ["x1", "x2"], ["c"], axis=1),
        _bn("c", "b", "bn"),
        helper.make_node("Mul", ["b", "m"], ["p"]),
        helper.make_node("Add", ["p", "a"], ["q"]),
        helper.make_node("Relu", ["q"], ["y"]),
    ]
    model = _model(nodes, {"x1": (2, 4, 3, 3), "x2": (2, 2, 3, 3)}, ["y"], inits, opset)
    folded, report = _fold(model)
    assert _ops(folded) == ["Concat", "BatchNormalization", "Relu"]
    assert report.counters == {"folded_batchnorm": 0, "folded_mul": 1, "folded_add": 1}
    assert [(s.node, s.reason) for s in report.skips] == [
        ("bn", "input is not produced by Conv/ConvTranspose/Gemm/MatMul")
    ]
    _assert_equivalent(model, folded)


def test_spatial_mul_is_skipped() -> None:
    rng = np.random.default_rng(8)
    inits = [
        _init("W", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
        _init("m", rng.normal(size=(1, 1, 5, 5)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        helper.make_node("Mul", ["c", "m"], ["y"]),
    ]
    model = _model(nodes, {"x": (1, 3, 7, 7)}, ["y"], inits, 13)
    folded, report = _fold(model)
    assert folded == _roundtrip(model)
    assert [s.reason for s in report.skips] == [
        "Mul constant of shape (1, 1, 5, 5) is not per-channel"
    ]


def test_fold_mul_add_off_leaves_mul() -> None:
    rng = np.random.default_rng(9)
    inits = [
        _init("W", rng.normal(size=(4, 3, 1, 1)).astype(np.float32)),
        _init("m", rng.normal(size=(4, 1, 1)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        helper.make_node("Mul", ["c", "m"], ["y"]),
    ]
    model = _model(nodes, {"x": (1, 3, 4, 4)}, ["y"], inits, 13)
    folded, report = _fold(model, fold_mul_add=False)
    assert folded == _roundtrip(model)
    assert report.skips == []


# --------------------------------------------------------------------------- negatives


def _conv_bn_model(
    extra_nodes: list, outputs: list[str], *, weight_input: bool = False, bn_channels: int = 4
) -> onnx.ModelProto:
    rng = np.random.default_rng(10)
    inits = [*_bn_inits("bn", bn_channels, rng)]
    inputs = {"x": (1, 3, 5, 5)}
    if weight_input:
        inputs["W"] = (4, 3, 3, 3)
    else:
        inits.append(_init("W", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)))
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), *extra_nodes]
    return _model(nodes, inputs, outputs, inits, 13)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (
            _conv_bn_model(
                [_bn("c", "y", "bn"), helper.make_node("Relu", ["c"], ["z"])], ["y", "z"]
            ),
            "Conv output has other consumers or is a graph output",
        ),
        (
            _conv_bn_model([_bn("c", "y", "bn")], ["y", "c"]),
            "Conv output has other consumers or is a graph output",
        ),
        (
            _conv_bn_model([_bn("x", "y", "bn")], ["y", "c"], bn_channels=3),
            "input is not produced by Conv/ConvTranspose/Gemm/MatMul",
        ),
        (
            _conv_bn_model([_bn("c", "y", "bn")], ["y"], weight_input=True),
            "Conv weight is not a constant",
        ),
    ],
    ids=["shared-output", "graph-output", "graph-input", "weight-input"],
)
def test_unfoldable_bn_is_left_alone(model: onnx.ModelProto, reason: str) -> None:
    folded, report = _fold(model)
    assert folded == _roundtrip(model)
    assert report.counters["folded_batchnorm"] == 0
    assert [(s.node, s.op, s.reason) for s in report.skips] == [
        ("bn", "BatchNormalization", reason)
    ]


def test_training_mode_and_nonconstant_params_are_skipped() -> None:
    rng = np.random.default_rng(11)
    w = _init("W", rng.normal(size=(4, 3, 3, 3)).astype(np.float32))
    # opset 13: extra outputs mean training mode.
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        helper.make_node(
            "BatchNormalization",
            ["c", "bn_gamma", "bn_beta", "bn_mean", "bn_var"],
            ["y", "rm", "rv"],
            name="bn",
        ),
    ]
    model = _model(nodes, {"x": (2, 3, 5, 5)}, ["y"], [w, *_bn_inits("bn", 4, rng)], 13)
    folded, report = _fold(model)
    assert folded == _roundtrip(model)
    assert [s.reason for s in report.skips] == ["training-mode BatchNormalization (3 outputs)"]
    # opset 15: the training_mode attribute.
    nodes[1] = _bn("c", "y", "bn", training_mode=1)
    model = _model(nodes, {"x": (2, 3, 5, 5)}, ["y"], [w, *_bn_inits("bn", 4, rng)], 15)
    folded, report = _fold(model)
    assert folded == _roundtrip(model)
    assert [s.reason for s in report.skips] == ["BatchNormalization has training_mode=1"]
    # running mean fed at run time.
    nodes[1] = _bn("c", "y", "bn")
    inits = [w, *(t for t in _bn_inits("bn", 4, rng) if t.name != "bn_mean")]
    model = _model(nodes, {"x": (2, 3, 5, 5), "bn_mean": (4,)}, ["y"], inits, 13)
    folded, report = _fold(model)
    assert folded == _roundtrip(model)
    assert [s.reason for s in report.skips] == ["BatchNormalization parameters are not constants"]


def test_shared_weight_is_copied_not_mutated() -> None:
    rng = np.random.default_rng(12)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    inits = [_init("W", w), *_bn_inits("bn1", 4, rng), *_bn_inits("bn2", 4, rng)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1"),
        _bn("c1", "y1", "bn1"),
        helper.make_node("Conv", ["x", "W"], ["c2"], name="conv2"),
        _bn("c2", "y2", "bn2"),
        helper.make_node("Conv", ["x", "W"], ["y3"], name="conv3"),  # no BN: W must stay
    ]
    model = _model(nodes, {"x": (1, 3, 6, 6)}, ["y1", "y2", "y3"], inits, 13)
    folded, report = _fold(model)
    assert _ops(folded) == ["Conv", "Conv", "Conv"]
    assert report.counters["folded_batchnorm"] == 2
    weights = {n.output[0]: n.input[1] for n in folded.graph.node}
    assert len(set(weights.values())) == 3
    assert weights["y3"] == "W"
    kept = next(t for t in folded.graph.initializer if t.name == "W")
    np.testing.assert_array_equal(numpy_helper.to_array(kept), w)
    _assert_equivalent(model, folded)


def test_float16_weights_fold_in_float64() -> None:
    rng = np.random.default_rng(13)
    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float16)
    bn = _bn_inits("bn", 4, rng, np.float16)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), _bn("c", "y", "bn", epsilon=1e-3)]
    model = _model(nodes, {"x": (1, 3, 2, 2)}, ["y"], [_init("W", w), *bn], 13, TensorProto.FLOAT16)
    folded, report = _fold(model)
    assert report.counters["folded_batchnorm"] == 1
    onnx.checker.check_model(folded, full_check=True)
    g, b, m, v = (numpy_helper.to_array(t).astype(np.float64) for t in bn)
    s = g / np.sqrt(v + 1e-3)
    arrays = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    conv = folded.graph.node[0]
    new_w, new_b = arrays[conv.input[1]], arrays[conv.input[2]]
    assert new_w.dtype == np.float16 and new_b.dtype == np.float16
    # Rounded once from the float64 value.
    np.testing.assert_array_equal(
        new_w, (w.astype(np.float64) * s[:, None, None, None]).astype(np.float16)
    )
    np.testing.assert_array_equal(new_b, (b - m * s).astype(np.float16))


# --------------------------------------------------------------------------- torch exports


def _torch_cases() -> dict[str, Any]:
    from torch import nn

    return {
        "conv": (
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            (2, 3, 8, 8),
        ),
        "grouped": (nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8)), (1, 4, 8, 8)),
        "depthwise": (
            nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8)),
            (1, 8, 6, 6),
        ),
        "convtranspose": (
            nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6)),
            (1, 4, 5, 5),
        ),
        "convtranspose-g2": (
            nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6)),
            (1, 4, 5, 5),
        ),
        "linear": (nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10), nn.ReLU()), (4, 12)),
    }


_EXPECTED_OPS = {
    "conv": ["Conv", "Relu"],
    "grouped": ["Conv"],
    "depthwise": ["Conv"],
    "convtranspose": ["ConvTranspose"],
    "convtranspose-g2": ["ConvTranspose"],
    "linear": ["Gemm", "Relu"],
}


def _export(module: Any, shape: tuple[int, ...], opset: int) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 2.0, generator=gen)
                m.bias.normal_(generator=gen)
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.2, 3.0, generator=gen)
    module.eval()
    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (torch.zeros(shape),),
        buf,
        dynamo=False,
        opset_version=opset,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        input_names=["x"],
        output_names=["y"],
    )
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("case", list(_EXPECTED_OPS))
def test_torch_exports_fold(case: str, opset: int) -> None:
    pytest.importorskip("torch")
    module, shape = _torch_cases()[case]
    model = _export(module, shape, opset)
    assert "BatchNormalization" in _ops(model)
    folded, report = _fold(model)
    assert report.counters["folded_batchnorm"] == 1
    assert [op for op in _ops(folded) if op != "Identity"] == _EXPECTED_OPS[case]
    _assert_equivalent(model, folded)


# --------------------------------------------------------------------------- contract


def test_second_run_changes_nothing() -> None:
    rng = np.random.default_rng(14)
    inits = [
        _init("W", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
        _init("m", rng.normal(size=(4, 1, 1)).astype(np.float32)),
        *_bn_inits("bn", 4, rng),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        _bn("c", "b", "bn"),
        helper.make_node("Mul", ["b", "m"], ["y"]),
    ]
    model = _model(nodes, {"x": (1, 3, 5, 5)}, ["y"], inits, 13)
    once, first = _fold(model)
    twice, second = _fold(once)
    assert first.counters == {"folded_batchnorm": 1, "folded_mul": 1, "folded_add": 0}
    assert sum(second.counters.values()) == 0 and second.skips == []
    assert twice == once


def test_pipeline_reports_second_run_unmodified() -> None:
    model = _conv_bn_model([_bn("c", "y", "bn")], ["y"])
    result = Pipeline([FoldBatchNorm(), FoldBatchNorm()]).run(model)
    first, second = result.report.passes
    assert first.modified and first.counters["folded_batchnorm"] == 1
    assert first.validation is not None and first.validation["passed"]
    assert first.nodes_removed == 1
    assert not second.modified
    _assert_equivalent(model, result.model)


def test_registry_and_config() -> None:
    assert get_pass("fold-batchnorm") is FoldBatchNorm
    assert FoldBatchNorm.lossless
    with pytest.raises(ConfigError, match="fold_mul_add"):
        FoldBatchNorm(fold_mul_add="sometimes")
    with pytest.raises(ConfigError, match="unknown option"):
        FoldBatchNorm(axis=1)
    with pytest.raises(ConfigError, match="fold_mul_add"):
        FoldBatchNorm.Config(fold_mul_add=1)
    with pytest.raises(TypeError):
        FoldBatchNorm.Config(True)
