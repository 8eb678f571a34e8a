"""cleanup's simplification: CSE, shape-chain folding, Transpose/Reshape/Cast/Gemm merging.

Each rewrite is checked on a small graph with symbolic dims at two or more input sizes
(ONNX Runtime, optimizations off, outputs equal within the lossless tolerances of
tests/fixtures/equivalence.py): a rewrite that baked a symbolic dim into a constant
gives a wrong shape or an error at the second size. The torch exports (BERT-style
encoder, CRNN, ViT block) are compared with onnxslim's node count when it is installed.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from fixtures.equivalence import ATOL_OF_MAX, RTOL
from fixtures.equivalence import run as _run
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.model import min_ir_version
from onnxslim_edge.passes.cleanup import Cleanup
from onnxslim_edge.pipeline import Context, model_from_graph

# --------------------------------------------------------------------------- helpers


def _init(name: str, array: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(array, order="C"), name)


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return _init(name, np.array(values, dtype=np.int64))


def _model(
    nodes: list, inputs: dict[str, tuple[Any, ...]], outputs: list[str], inits: list
) -> onnx.ModelProto:
    """A float model at opset 17 whose input dims may be symbols (strings)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.output[:]  # inferred output types land in value_info
    inferred = onnx.shape_inference.infer_shapes(bare, data_prop=True)
    types = {v.name: v.type for v in inferred.graph.value_info}
    for out in model.graph.output:
        if out.name in types:
            out.type.CopyFrom(types[out.name])
    return model


def _clean(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Any]:
    graph = gs.import_onnx(model)
    report = Cleanup().run(graph, Context())
    out = model_from_graph(graph, model)
    out.ir_version = max(out.ir_version, min_ir_version(out))
    onnx.checker.check_model(out, full_check=True)
    return out, report


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _assert_same(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for ref, got in zip(_run(a, feeds), _run(b, feeds), strict=True):
        assert got.shape == ref.shape
        atol = ATOL_OF_MAX * float(np.max(np.abs(ref))) if ref.size else 0.0
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=atol)


def _at_sizes(a: onnx.ModelProto, b: onnx.ModelProto, *shape_sets: dict[str, tuple]) -> None:
    rng = np.random.default_rng(0)
    for shapes in shape_sets:
        feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
        _assert_same(a, b, feeds)


def _shape_gather(src: str, index: int, out: str) -> list:
    """Shape(src) -> Gather(index) -> Unsqueeze(0): dim `index` of `src` as a 1-element tensor."""
    return [
        helper.make_node("Shape", [src], [f"{out}_s"]),
        helper.make_node("Gather", [f"{out}_s", f"i{index}"], [f"{out}_g"], axis=0),
        helper.make_node("Unsqueeze", [f"{out}_g", "ax0"], [out]),
    ]


def _index_inits(*indices: int) -> list:
    return [_init(f"i{i}", np.int64(i)) for i in indices] + [_ints("ax0", [0])]


# --------------------------------------------------------------------------- CSE


def test_equal_nodes_are_computed_once() -> None:
    """Relu(x) twice -> once; then the two Exp of it merge too. Exact."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r1"]),
        helper.make_node("Relu", ["x"], ["r2"]),
        helper.make_node("Exp", ["r1"], ["e1"]),
        helper.make_node("Exp", ["r2"], ["e2"]),
        helper.make_node("Softmax", ["e1"], ["s0"], axis=0),
        helper.make_node("Softmax", ["e2"], ["s1"], axis=1),  # other attrs: kept
        helper.make_node("Add", ["s0", "s1"], ["y"]),
    ]
    model = _model(nodes, {"x": ("n", 5)}, ["y"], [])
    cleaned, report = _clean(model)
    assert collections.Counter(_ops(cleaned)) == {"Relu": 1, "Exp": 1, "Softmax": 2, "Add": 1}
    assert report.counters["nodes_merged"] == 2
    _at_sizes(model, cleaned, {"x": (2, 5)}, {"x": (7, 5)})


def test_random_ops_and_graph_outputs_are_not_merged() -> None:
    nodes = [
        helper.make_node("RandomNormalLike", ["x"], ["r1"], seed=1.0),
        helper.make_node("RandomNormalLike", ["x"], ["r2"], seed=1.0),
        helper.make_node("Add", ["r1", "r2"], ["y"]),
        helper.make_node("Neg", ["x"], ["z1"]),
        helper.make_node("Neg", ["x"], ["z2"]),
    ]
    model = _model(nodes, {"x": ("n", 3)}, ["y", "z1", "z2"], [])
    cleaned, _ = _clean(model)
    assert collections.Counter(_ops(cleaned)) == {"RandomNormalLike": 2, "Add": 1, "Neg": 2}
    assert [o.name for o in cleaned.graph.output] == ["y", "z1", "z2"]


# --------------------------------------------------------------------------- shape chains


def test_reshape_shape_chain_keeps_symbolic_dim_as_zero() -> None:
    """Reshape(x, [dim0(x), dim2(x), dim1(x)]), x (N, 4, 6) -> Reshape(x, [0, 6, 4]). Exact."""
    nodes = [
        *_shape_gather("x", 0, "d0"),
        *_shape_gather("x", 2, "d2"),
        *_shape_gather("x", 1, "d1"),
        helper.make_node("Concat", ["d0", "d2", "d1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    model = _model(nodes, {"x": ("n", 4, 6)}, ["y"], _index_inits(0, 1, 2))
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["Reshape"]
    assert report.counters["reshape_shapes_rewritten"] == 1
    (shape,) = cleaned.graph.initializer
    assert numpy_helper.to_array(shape).tolist() == [0, 6, 4]
    _at_sizes(model, cleaned, {"x": (1, 4, 6)}, {"x": (5, 4, 6)})


def test_dim_of_another_input_with_the_same_symbol_is_copied() -> None:
    """x (N, 12), y (N, 3): Reshape(x, [dim0(y), 3, 4]) -> Reshape(x, [0, 3, 4]). Exact."""
    nodes = [
        *_shape_gather("y", 0, "d0"),
        helper.make_node("Concat", ["d0", "rest"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Unsqueeze", ["y", "ax2"], ["y3"]),
        helper.make_node("Mul", ["r", "y3"], ["out"]),
    ]
    inits = [*_index_inits(0), _ints("rest", [3, 4]), _ints("ax2", [2])]
    model = _model(nodes, {"x": ("n", 12), "y": ("n", 3)}, ["out"], inits)
    cleaned, _ = _clean(model)
    assert "Shape" not in _ops(cleaned)
    reshape = next(n for n in cleaned.graph.node if n.op_type == "Reshape")
    shape = next(t for t in cleaned.graph.initializer if t.name == reshape.input[1])
    assert numpy_helper.to_array(shape).tolist() == [0, 3, 4]
    _at_sizes(model, cleaned, {"x": (2, 12), "y": (2, 3)}, {"x": (6, 12), "y": (6, 3)})


def test_one_unknown_dim_becomes_minus_one() -> None:
    """x (K, 8), y (M,): Reshape(x, [dim0(y), 8]) -> Reshape(x, [-1, 8]); M is not baked in."""
    nodes = [
        *_shape_gather("y", 0, "d0"),
        helper.make_node("Concat", ["d0", "eight"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Unsqueeze", ["y", "ax1"], ["y2"]),
        helper.make_node("Add", ["r", "y2"], ["out"]),
    ]
    inits = [*_index_inits(0), _ints("eight", [8]), _ints("ax1", [1])]
    model = _model(nodes, {"x": ("k", 8), "y": ("m",)}, ["out"], inits)
    cleaned, _ = _clean(model)
    reshape = next(n for n in cleaned.graph.node if n.op_type == "Reshape")
    shape = next(t for t in cleaned.graph.initializer if t.name == reshape.input[1])
    assert numpy_helper.to_array(shape).tolist() == [-1, 8]
    _at_sizes(model, cleaned, {"x": (3, 8), "y": (3,)}, {"x": (9, 8), "y": (9,)})


def test_one_shape_read_by_two_reshapes_gets_two_constants() -> None:
    """The same computed shape becomes [0, 3, 4] for x and [-1, 3, 4] for y (other symbol):
    two constants with distinct names (the checker refuses duplicates)."""
    nodes = [
        *_shape_gather("x", 0, "d0"),
        helper.make_node("Concat", ["d0", "rest"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["rx"]),
        helper.make_node("Reshape", ["y", "shape"], ["ry"]),
        helper.make_node("Add", ["rx", "ry"], ["out"]),
    ]
    inits = [*_index_inits(0), _ints("rest", [3, 4])]
    model = _model(nodes, {"x": ("n", 12), "y": ("m", 12)}, ["out"], inits)
    cleaned, _ = _clean(model)
    targets = {
        n.input[0]: numpy_helper.to_array(
            next(t for t in cleaned.graph.initializer if t.name == n.input[1])
        ).tolist()
        for n in cleaned.graph.node
        if n.op_type == "Reshape"
    }
    assert targets == {"x": [0, 3, 4], "y": [-1, 3, 4]}
    _at_sizes(model, cleaned, {"x": (2, 12), "y": (2, 12)}, {"x": (5, 12), "y": (5, 12)})


def test_two_unknown_dims_stay_computed() -> None:
    """x (N, T, 8) -> [dim1, dim0, 8]: two dims neither copied nor inferable: kept."""
    nodes = [
        *_shape_gather("x", 1, "d1"),
        *_shape_gather("x", 0, "d0"),
        helper.make_node("Concat", ["d1", "d0", "eight"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    model = _model(nodes, {"x": ("n", "t", 8)}, ["y"], [*_index_inits(0, 1), _ints("eight", [8])])
    cleaned, _ = _clean(model)
    assert "Shape" in _ops(cleaned)
    _at_sizes(model, cleaned, {"x": (2, 3, 8)}, {"x": (3, 5, 8)})


def test_known_dims_of_a_dynamic_tensor_fold() -> None:
    """ConstantOfShape([dim1(x)]), x (N, 6) -> a constant of 6 values (dim 1 is known)."""
    nodes = [
        *_shape_gather("x", 1, "d1"),
        helper.make_node(
            "ConstantOfShape", ["d1"], ["ones"], value=_init("v", np.array([2.0], np.float32))
        ),
        helper.make_node("Mul", ["x", "ones"], ["y"]),
    ]
    model = _model(nodes, {"x": ("n", 6)}, ["y"], _index_inits(1))
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["Mul"]
    assert report.counters["shapes_folded"] >= 1
    _at_sizes(model, cleaned, {"x": (1, 6)}, {"x": (4, 6)})


# --------------------------------------------------------------------------- layout


def test_transpose_pairs_merge_and_identity_transposes_go() -> None:
    nodes = [
        helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 2, 0]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 2, 0]),  # -> perm [2, 0, 1]
        helper.make_node("Transpose", ["x"], ["u1"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["u1"], ["u2"], perm=[0, 2, 1]),  # -> identity
        helper.make_node("Transpose", ["u2"], ["u3"], perm=[2, 0, 1]),
        helper.make_node("Add", ["t2", "u3"], ["y"]),
    ]
    model = _model(nodes, {"x": ("n", 3, 3)}, ["y"], [])
    cleaned, report = _clean(model)
    # the merged [2, 0, 1] and the remaining u3 are then equal nodes: one Transpose
    assert _ops(cleaned) == ["Transpose", "Add"]
    assert list(cleaned.graph.node[0].attribute[0].ints) == [2, 0, 1]
    assert report.counters["transposes_merged"] >= 1
    _at_sizes(model, cleaned, {"x": (3, 3, 3)})  # Add needs n == 3


def test_reshape_of_reshape_merges_unless_it_copies_a_dim() -> None:
    nodes = [
        helper.make_node("Reshape", ["x", "s1"], ["r1"]),
        helper.make_node("Reshape", ["r1", "s2"], ["r2"]),  # merges: Reshape(x, [-1, 6])
        helper.make_node("Reshape", ["x", "s3"], ["q1"]),
        helper.make_node("Reshape", ["q1", "s4"], ["q2"]),  # copies dim 0 of q1: kept
        helper.make_node("Reshape", ["q2", "s2"], ["q3"]),
        helper.make_node("Add", ["r2", "q3"], ["y"]),
    ]
    inits = [_ints("s1", [-1, 2, 3]), _ints("s2", [-1, 6]), _ints("s3", [6, -1])]
    inits.append(_ints("s4", [0, -1, 1]))
    model = _model(nodes, {"x": ("n", 6)}, ["y"], inits)
    cleaned, report = _clean(model)
    assert report.counters["reshapes_merged"] >= 1
    assert _ops(cleaned).count("Reshape") < 5
    _at_sizes(model, cleaned, {"x": (6, 6)}, {"x": (12, 6)})


def test_noop_casts_go_and_real_casts_stay() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["c"], ["h"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT),
    ]
    model = _model(nodes, {"x": ("n", 4)}, ["y"], [])
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["Cast", "Cast"]
    assert report.counters["noop_nodes_removed"] == 1
    _at_sizes(model, cleaned, {"x": (2, 4)}, {"x": (5, 4)})


def test_matmul_add_on_2d_input_becomes_gemm() -> None:
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["y"]),
        helper.make_node("MatMul", ["z", "w"], ["m3"]),  # 3-D input: stays MatMul + Add
        helper.make_node("Add", ["m3", "b"], ["y3"]),
    ]
    inits = [_init("w", w), _init("b", b.astype(np.float32))]
    model = _model(nodes, {"x": ("n", 4), "z": ("n", 2, 4)}, ["y", "y3"], inits)
    cleaned, report = _clean(model)
    assert collections.Counter(_ops(cleaned)) == {"Gemm": 1, "MatMul": 1, "Add": 1}
    assert report.counters["gemms_fused"] == 1
    _at_sizes(model, cleaned, {"x": (1, 4), "z": (1, 2, 4)}, {"x": (6, 4), "z": (3, 2, 4)})


def test_zero_initial_states_of_recurrent_ops_are_omitted() -> None:
    """LSTM(x, W, R, B, _, h0 = ConstantOfShape([2, N, 3]) of zeros, c0 likewise) -> no h0/c0."""
    rng = np.random.default_rng(2)
    nodes = [
        *_shape_gather("x", 1, "n"),
        helper.make_node("Concat", ["two", "n", "three"], ["state_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["state_shape"], ["h0"]),
        helper.make_node(
            "ConstantOfShape", ["state_shape"], ["c0"], value=_init("z", np.zeros(1, np.float32))
        ),
        helper.make_node(
            "LSTM",
            ["x", "w", "r", "b", "", "h0", "c0"],
            ["y"],
            hidden_size=3,
            direction="bidirectional",
        ),
    ]
    inits = [
        *_index_inits(1),
        _ints("two", [2]),
        _ints("three", [3]),
        _init("w", rng.standard_normal((2, 12, 4)).astype(np.float32)),
        _init("r", rng.standard_normal((2, 12, 3)).astype(np.float32)),
        _init("b", rng.standard_normal((2, 24)).astype(np.float32)),
    ]
    model = _model(nodes, {"x": ("t", "n", 4)}, ["y"], inits)
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["LSTM"]
    assert report.counters["zero_states_dropped"] == 1
    assert list(cleaned.graph.node[0].input) == ["x", "w", "r", "b"]
    _at_sizes(model, cleaned, {"x": (5, 1, 4)}, {"x": (3, 4, 4)})


# --------------------------------------------------------------------------- torch exports


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "crnn", "vit"])
def test_sequence_exports_at_or_below_onnxslim(arch: str, tmp_path: Any) -> None:
    """cleanup + fold-batchnorm on a dynamic-axes export: outputs equal at two sizes, and no
    more nodes than onnxslim leaves (when it is installed)."""
    pytest.importorskip("torch")
    from fixtures.seq_models import example_inputs, export

    from onnxslim_edge import create_pass

    path = export(arch, tmp_path / f"{arch}.onnx")
    model = onnx.load(path)
    ours = create_pass("cleanup")(model).model
    ours = create_pass("fold-batchnorm")(ours).model
    for batch, length in ((1, 5), (3, 12)):
        _assert_same(model, ours, example_inputs(arch, batch=batch, length=length))
    try:
        import onnxslim
    except ImportError:
        return
    theirs = onnxslim.slim(onnx.load(path))
    assert len(ours.graph.node) <= len(theirs.graph.node)
