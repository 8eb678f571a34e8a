"""cleanup: Identity/Dropout removal, dead nodes, budgeted constant folding, merging.

Positive cases check the op sequence, the full ONNX checker, graph output names and
that ONNX Runtime (optimizations off) gives the original's outputs within rtol 1e-5 and
atol 1e-5 x max|reference|.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from fixtures.equivalence import ATOL_OF_MAX, RTOL
from fixtures.equivalence import assert_equivalent as _assert_equivalent
from fixtures.equivalence import run as _run
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.model import min_ir_version, model_bytes
from onnxslim_edge.passes.cleanup import Cleanup
from onnxslim_edge.pipeline import Context, Pipeline, get_pass, model_from_graph
from onnxslim_edge.runtime import make_session

OPSETS = (13, 17)
MiB = 2**20


# --------------------------------------------------------------------------- helpers


def _init(name: str, array: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(array, order="C"), name)  # keeps 0-d arrays 0-d


def _model(
    nodes: list,
    inputs: dict[str, tuple[int, ...]],
    outputs: list[str],
    inits: list,
    opset: int,
    output_shapes: dict[str, tuple[int, ...]] | None = None,
) -> onnx.ModelProto:
    """A float model; output shapes come from shape inference unless given."""
    shapes = output_shapes or {}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes.get(n)) for n in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.output[:]
    inferred = onnx.shape_inference.infer_shapes(bare, data_prop=True)
    infos = {v.name: v for v in inferred.graph.value_info}
    for out in model.graph.output:
        if out.name in infos and out.name not in shapes:
            out.type.CopyFrom(infos[out.name].type)
    return model


def _clean(model: onnx.ModelProto, **options: Any) -> tuple[onnx.ModelProto, Any]:
    graph = gs.import_onnx(model)
    report = Cleanup(**options).run(graph, Context())
    out = model_from_graph(graph, model)
    out.ir_version = max(out.ir_version, min_ir_version(out))
    return out, report


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# --------------------------------------------------------------------------- folding


@pytest.mark.parametrize("opset", OPSETS)
def test_constant_chain_folds(opset: int) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [
        helper.make_node("Constant", [], ["k"], value=_init("kv", np.float32(0.5))),
        helper.make_node("Mul", ["a", "k"], ["ak"]),
        helper.make_node("Exp", ["ak"], ["e"]),
        helper.make_node("Transpose", ["e"], ["et"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "et"], ["y"]),
    ]
    model = _model(nodes, {"x": (4, 3)}, ["y"], [_init("a", a)], opset)
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["MatMul"]
    assert report.counters["folded"] == 3
    (folded,) = cleaned.graph.initializer
    np.testing.assert_allclose(numpy_helper.to_array(folded), np.exp(a * 0.5).T, rtol=1e-6)
    _assert_equivalent(model, cleaned)


def _movement_case(op: str, opset: int) -> tuple[list, list, tuple[int, ...]]:
    """(nodes, initializers, x shape) for `op` on an initializer `w`, then MatMul(x, .)."""
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5
    inits = [_init("w", w)]
    axes_as_input = opset >= 13
    if op == "Transpose":
        nodes = [helper.make_node("Transpose", ["w"], ["m"], perm=[2, 0, 1])]  # (4, 2, 3)
        x = (4, 5, 2)
    elif op == "Reshape":
        inits.append(_init("s", np.array([0, -1, 2], np.int64)))  # 0 copies the dim: (2, 6, 2)
        nodes = [helper.make_node("Reshape", ["w", "s"], ["m"])]
        x = (2, 3, 6)
    elif op == "Flatten":
        nodes = [helper.make_node("Flatten", ["w"], ["m"], axis=-1)]  # (6, 4)
        x = (3, 6)
    elif op == "Unsqueeze":
        if axes_as_input:
            inits.append(_init("ax", np.array([0, -2], np.int64)))
            nodes = [helper.make_node("Unsqueeze", ["w", "ax"], ["m"])]
        else:
            nodes = [helper.make_node("Unsqueeze", ["w"], ["m"], axes=[0, -2])]
        x = (1, 2, 3, 5, 1)  # m: (1, 2, 3, 1, 4)
    else:  # Squeeze of an Unsqueeze: two movement folds in a row
        nodes = [helper.make_node("Unsqueeze", ["w", "ax"], ["u"])]
        inits.append(_init("ax", np.array([1], np.int64)))
        nodes.append(helper.make_node("Squeeze", ["u", "ax"], ["m"]))
        x = (2, 5, 3)
    nodes.append(helper.make_node("MatMul", ["x", "m"], ["y"]))
    return nodes, inits, x


@pytest.mark.parametrize("op", ["Transpose", "Reshape", "Flatten", "Unsqueeze", "Squeeze"])
def test_data_movement_of_weights_folds_in_numpy_exactly(op: str, monkeypatch) -> None:
    """Transposed/reshaped weights fold without onnx-graphsurgeon's ONNX Runtime export
    (which holds several copies of each weight at once), bit-exactly."""
    opset = 11 if op == "Unsqueeze" else 13
    nodes, inits, x = _movement_case(op, opset if op != "Squeeze" else 13)
    model = _model(nodes, {"x": x}, ["y"], inits, opset if op != "Squeeze" else 13)
    calls = []
    real = gs.Graph.fold_constants
    monkeypatch.setattr(
        gs.Graph,
        "fold_constants",
        lambda self, **k: calls.append(sum(1 for n in self.nodes if n.outputs)) or real(self, **k),
    )
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["MatMul"]
    assert report.counters["folded"] == len(nodes) - 1
    feed = {"x": np.random.default_rng(0).standard_normal(x).astype(np.float32)}
    np.testing.assert_array_equal(_run(cleaned, feed)[0], _run(model, feed)[0])
    # onnx-graphsurgeon still runs, but had nothing left to evaluate: only MatMul remained
    assert calls and all(n == 1 for n in calls)


def test_data_movement_fold_keeps_a_scalar_a_scalar() -> None:
    """Squeeze/Reshape to rank 0 (Range, Pow exponents need scalars): the folded
    initializer has shape (), not (1,)."""
    nodes = [
        helper.make_node("Squeeze", ["one"], ["s"]),
        helper.make_node("Reshape", ["two", "empty"], ["r"]),
        helper.make_node("Range", ["s", "r", "s"], ["steps"]),
        helper.make_node("Cast", ["steps"], ["y"], to=TensorProto.FLOAT),
    ]
    inits = [
        _init("one", np.array([1], np.int64)),
        _init("two", np.array([[5]], np.int64)),
        _init("empty", np.zeros((0,), np.int64)),
    ]
    graph = helper.make_graph(
        nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    cleaned, _ = _clean(model, fold_constants=True)
    assert "Squeeze" not in _ops(cleaned) and "Reshape" not in _ops(cleaned)
    np.testing.assert_array_equal(_run(cleaned, {})[0], [1, 2, 3, 4])


def test_data_movement_fold_respects_the_budget_and_graph_outputs() -> None:
    w = np.ones((64, 64), np.float32)
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    model = _model(nodes, {"x": (1, 64)}, ["y", "wt"], [_init("w", w)], 13)
    cleaned, _ = _clean(model)
    assert "Transpose" in _ops(cleaned)  # a graph output keeps its producer
    model = _model(nodes, {"x": (1, 64)}, ["y"], [_init("w", w)], 13)
    cleaned, _ = _clean(model, fold_size_limit=1024)
    assert "Transpose" in _ops(cleaned)  # 16 KiB > the 1 KiB budget


@pytest.mark.parametrize("opset", OPSETS)
def test_static_shape_arithmetic_folds(opset: int) -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = [
        _init("zero", np.int64(0)),
        _init("zero1", np.array([0], np.int64)),
        _init("minus1", np.array([-1], np.int64)),
    ]
    model = _model(nodes, {"x": (2, 3, 4)}, ["y"], inits, opset, {"y": (2, 12)})
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["Reshape"]
    assert report.counters["folded"] == 4
    shape = next(t for t in cleaned.graph.initializer if t.name == cleaned.graph.node[0].input[1])
    assert numpy_helper.to_array(shape).tolist() == [2, -1]
    _assert_equivalent(model, cleaned)


def test_fold_size_limit_keeps_large_tensors_computed() -> None:
    # ConstantOfShape -> Tile makes a 4 MiB tensor from a few bytes.
    nodes = [
        helper.make_node(
            "ConstantOfShape", ["shape"], ["z"], value=_init("v", np.array([1.5], np.float32))
        ),
        helper.make_node("Tile", ["z", "reps"], ["big"]),
        helper.make_node("Add", ["x", "big"], ["y"]),
    ]
    inits = [
        _init("shape", np.array([1, 1024], np.int64)),
        _init("reps", np.array([1024, 1], np.int64)),
    ]
    model = _model(nodes, {"x": (1024, 1024)}, ["y"], inits, 13)

    small, report = _clean(model, fold_size_limit=1 * MiB)
    assert _ops(small) == ["Tile", "Add"]  # the 4 KiB ConstantOfShape output is folded
    assert report.counters["folded"] == 1
    assert model_bytes(small) < 8 * 1024

    big, report = _clean(model, fold_size_limit=4 * MiB)
    assert _ops(big) == ["Add"]
    assert report.counters["folded"] == 2
    assert model_bytes(big) == 4 * MiB
    _assert_equivalent(model, big)


def test_budget_holds_even_when_shapes_are_unknown() -> None:
    # Range's length is data-dependent for shape inference; the size is known only after
    # evaluating it, and the 4 MiB result must still be refused.
    nodes = [
        helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
        helper.make_node("Add", ["x", "r"], ["y"]),
    ]
    inits = [
        _init("start", np.float32(0)),
        _init("limit", np.float32(2**20)),
        _init("delta", np.float32(1)),
    ]
    model = _model(nodes, {"x": (1,)}, ["y"], inits, 13)
    cleaned, report = _clean(model, fold_size_limit=MiB)
    assert _ops(cleaned) == ["Range", "Add"]
    assert report.counters["folded"] == 0 and report.warnings == []
    assert model_bytes(cleaned) < 1024


def test_light_vgg19_stays_within_budget() -> None:
    path = Path(onnx.__file__).parent / "backend/test/data/light/light_vgg19.onnx"
    model = onnx.load(str(path))
    assert path.stat().st_size < 20_000
    cleaned, report = _clean(model)
    limit = Cleanup.Config().fold_size_limit
    sizes = [numpy_helper.to_array(t).nbytes for t in cleaned.graph.initializer]
    assert max(sizes) <= limit
    # fc6 (392 MiB) and fc7 (64 MiB) stay ConstantOfShape; under a plain fold: 575 MB.
    ops = collections.Counter(_ops(cleaned))
    assert ops["ConstantOfShape"] == 2
    assert ops["Dropout"] == 0 and report.counters["dropouts_removed"] == 2
    assert report.counters["folded"] == 34
    assert model_bytes(cleaned) < 48 * MiB
    onnx.checker.check_model(cleaned, full_check=True)
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    (got,) = make_session(cleaned).run(None, {"data_0": x})
    (ref,) = make_session(model).run(None, {"data_0": x})
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL_OF_MAX * float(np.max(np.abs(ref))))


def test_random_ops_and_graph_outputs_are_not_folded() -> None:
    nodes = [
        helper.make_node("RandomUniformLike", ["a"], ["r"], seed=1.0),
        helper.make_node("Add", ["x", "r"], ["y"]),
        helper.make_node("Neg", ["a"], ["z"]),  # a graph output computed from a constant
    ]
    model = _model(nodes, {"x": (3,)}, ["y", "z"], [_init("a", np.ones(3, np.float32))], 13)
    cleaned, report = _clean(model)
    assert sorted(_ops(cleaned)) == ["Add", "Neg", "RandomUniformLike"]
    assert report.counters["folded"] == 0


def test_folding_failure_is_reported_and_leaves_a_valid_graph() -> None:
    # A constant fed to an op ONNX Runtime does not know, next to a foldable chain.
    nodes = [
        helper.make_node("Mystery", ["a"], ["m"], domain="example.custom"),
        helper.make_node("Neg", ["a"], ["na"]),
        helper.make_node("Add", ["x", "m"], ["y1"]),
        helper.make_node("Add", ["x", "na"], ["y2"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("y1", "y2")],
        [_init("a", np.arange(3, dtype=np.float32))],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("example.custom", 1)],
    )
    model.ir_version = 8
    cleaned, report = _clean(model)
    assert any("failed as a whole" in w for w in report.warnings), report.warnings
    assert _ops(cleaned) == ["Mystery", "Add", "Add"]  # Neg folded part by part
    assert report.counters["folded"] == 1
    onnx.checker.check_model(cleaned)


def test_constants_inside_subgraphs_fold() -> None:
    then_graph = helper.make_graph(
        [
            helper.make_node("Neg", ["a"], ["na"]),  # reads the outer constant a
            helper.make_node("RandomUniformLike", ["a"], ["r"]),  # never folded
            helper.make_node("Mul", ["na", "r"], ["nr"]),
            helper.make_node("Add", ["x", "nr"], ["t"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [_init("a", np.arange(3, dtype=np.float32))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    cleaned, report = _clean(model)
    branch = next(a.g for a in cleaned.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["RandomUniformLike", "Mul", "Add"]
    assert report.warnings == []
    onnx.checker.check_model(cleaned, full_check=True)
    x = np.array([1.0, -2.0, 3.0], np.float32)
    feeds = {"x": x, "c": np.array(False)}
    np.testing.assert_array_equal(_run(cleaned, feeds)[0], np.abs(x))


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [(1, 3, [3, 4]), (-3, None, [3, 4, 5]), (0, -1, [2, 3, 4]), (3, 1, [])],
)
def test_shape_with_start_and_end_folds_to_the_slice(
    start: int, end: int | None, expected: list[int]
) -> None:
    # onnx-graphsurgeon's own shape folding ignores start/end and folds the whole shape.
    bounds = {"start": start} if end is None else {"start": start, "end": end}
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], **bounds),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["b", "sf"], ["y"]),
    ]
    model = _model(nodes, {"x": (2, 3, 4, 5), "b": (len(expected),)}, ["y"], [], 15)
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["Add"]
    assert report.counters["folded"] == 2
    (folded,) = cleaned.graph.initializer
    assert numpy_helper.to_array(folded).tolist() == expected
    _assert_equivalent(model, cleaned)


def test_int_float_int_cast_pairs_keep_their_arithmetic() -> None:
    # onnx-graphsurgeon's shape-tensor cast elision would compute x * int(0.5) = 0.
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "half"], ["h"]),
        helper.make_node("Cast", ["h"], ["y"], to=TensorProto.INT64),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [5])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [5])],
        [_init("half", np.float32(0.5))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["Cast", "Mul", "Cast"]
    assert report.counters["folded"] == 0
    x = np.array([3, 4, 7, -5, 10], np.int64)
    np.testing.assert_array_equal(_run(cleaned, {"x": x})[0], [1, 2, 3, -2, 5])


def _branch(name: str, nodes: list, outputs: list[str]) -> onnx.GraphProto:
    infos = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in outputs]
    return helper.make_graph(nodes, name, [], infos)


def _constant_if_model(then_graph: onnx.GraphProto, after: list, outputs: list[str]) -> Any:
    """If(c) with c an initializer equal to true, returning o0, o1 ...; then `after`."""
    n = len(then_graph.output)
    else_graph = _branch(
        "else",
        [helper.make_node("Abs", ["x"], [f"e{i}"]) for i in range(n)],
        [f"e{i}" for i in range(n)],
    )
    node = helper.make_node(
        "If", ["c"], [f"o{i}" for i in range(n)], then_branch=then_graph, else_branch=else_graph
    )
    graph = helper.make_graph(
        [node, *after],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("c2", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [3]) for o in outputs],
        [_init("c", np.bool_(True)), _init("one", np.ones(3, np.float32))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _assert_same_for_both_c2(model: onnx.ModelProto, cleaned: onnx.ModelProto) -> None:
    onnx.checker.check_model(cleaned, full_check=True)
    x = np.array([0.5, -2.0, 3.0], np.float32)
    for c2 in (True, False):
        feeds = {"x": x, "c2": np.array(c2)}
        for ref, got in zip(_run(model, feeds), _run(cleaned, feeds), strict=True):
            np.testing.assert_array_equal(got, ref)


def test_if_with_a_constant_condition_is_replaced_by_its_branch() -> None:
    # The branch returns `a` and reads it too (gs's own flattening loses `a` then), a
    # nested If reads the branch's own tensor `a` from its outer scope, and the branch's
    # constant arithmetic folds after flattening.
    nested = {
        "then_branch": _branch("nt", [helper.make_node("Neg", ["a"], ["na"])], ["na"]),
        "else_branch": _branch("ne", [helper.make_node("Exp", ["a"], ["ea"])], ["ea"]),
    }
    then_graph = _branch(
        "then",
        [
            helper.make_node("Neg", ["one"], ["minus"]),  # folds once flattened
            helper.make_node("Add", ["x", "minus"], ["a"]),
            helper.make_node("Mul", ["a", "a"], ["b"]),
            helper.make_node("If", ["c2"], ["n"], **nested),
        ],
        ["a", "b", "n"],
    )
    model = _constant_if_model(
        then_graph, [helper.make_node("Neg", ["o0"], ["y"])], ["y", "o1", "o2"]
    )
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["Add", "Mul", "If", "Neg"]
    assert report.counters["ifs_flattened"] == 1
    assert report.counters["folded"] == 1
    assert [o.name for o in cleaned.graph.output] == ["y", "o1", "o2"]
    _assert_same_for_both_c2(model, cleaned)


def test_if_whose_graph_output_would_need_rerouting_is_kept() -> None:
    # o0 must keep its name, but the branch's t is also read by the branch's Abs.
    then_graph = _branch(
        "then",
        [helper.make_node("Neg", ["x"], ["t"]), helper.make_node("Abs", ["t"], ["u"])],
        ["t", "u"],
    )
    model = _constant_if_model(then_graph, [], ["o0", "o1"])
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["If"]
    assert report.counters["ifs_flattened"] == 0
    reason = "If with a constant condition kept: its output 'o0' keeps its name but 't' is shared"
    assert [(s.op, s.reason) for s in report.skips] == [("If", reason)]
    _assert_same_for_both_c2(model, cleaned)


def test_flattened_branches_get_unique_names_and_the_input_model_is_unchanged() -> None:
    # Both branches name their tensors t, u and their initializer k: flattening both
    # into one scope must rename the second set (k by a copy: renaming an imported
    # initializer in place would rename it in the caller's ModelProto).
    def branch(scale: float) -> onnx.GraphProto:
        graph = _branch(
            "then",
            [
                helper.make_node("Mul", ["x", "k"], ["t"]),
                helper.make_node("Add", ["t", "t"], ["u"]),
            ],
            ["u"],
        )
        graph.initializer.append(_init("k", np.full(3, scale, np.float32)))
        return graph

    else_graph = _branch("else", [helper.make_node("Abs", ["x"], ["e"])], ["e"])
    nodes = [
        helper.make_node("If", ["c"], [f"y{i}"], then_branch=branch(s), else_branch=else_graph)
        for i, s in enumerate((2.0, 3.0))
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("y0", "y1")],
        [_init("c", np.bool_(True))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    before = model.SerializeToString()
    cleaned, report = _clean(model)
    assert model.SerializeToString() == before
    assert report.counters["ifs_flattened"] == 2
    assert sorted(_ops(cleaned)) == ["Add", "Add", "Mul", "Mul"]
    assert len({t.name for t in cleaned.graph.initializer}) == 2  # both k, renamed apart
    onnx.checker.check_model(cleaned, full_check=True)
    x = np.array([0.5, -2.0, 3.0], np.float32)
    y0, y1 = _run(cleaned, {"x": x})
    np.testing.assert_array_equal(y0, 4 * x)
    np.testing.assert_array_equal(y1, 6 * x)


# --------------------------------------------------------------------------- Identity / Dropout


@pytest.mark.parametrize("opset", OPSETS)
def test_identities_are_bypassed_and_output_names_kept(opset: int) -> None:
    nodes = [
        helper.make_node("Identity", ["x"], ["i1"]),
        helper.make_node("Relu", ["i1"], ["r"]),
        helper.make_node("Identity", ["r"], ["i2"]),
        helper.make_node("Neg", ["i2"], ["n"]),
        helper.make_node("Identity", ["n"], ["y"]),  # graph output: Neg now writes "y"
        helper.make_node("Identity", ["r"], ["z"]),  # graph output, r also feeds Identity i2
    ]
    model = _model(nodes, {"x": (2, 3)}, ["y", "z"], [], opset)
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["Relu", "Neg"]
    assert report.counters["identities_removed"] == 4
    relu, neg = cleaned.graph.node
    assert list(relu.input) == ["x"] and list(relu.output) == ["z"]
    assert list(neg.input) == ["z"] and list(neg.output) == ["y"]
    _assert_equivalent(model, cleaned)


def test_identity_between_graph_inputs_and_outputs_is_kept() -> None:
    nodes = [
        helper.make_node("Identity", ["x"], ["y"], name="in_to_out"),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Identity", ["r"], ["z"]),
        helper.make_node("Identity", ["z"], ["w"], name="out_to_out"),
    ]
    model = _model(nodes, {"x": (2,)}, ["y", "z", "w"], [], 13)
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["Identity", "Relu", "Identity"]
    assert report.counters["identities_removed"] == 1
    assert sorted((s.node, s.reason) for s in report.skips) == [
        ("in_to_out", "copies a graph input/output to a graph output (keeps the interface names)"),
        ("out_to_out", "copies a graph input/output to a graph output (keeps the interface names)"),
    ]
    _assert_equivalent(model, cleaned)


@pytest.mark.parametrize("opset", OPSETS)
def test_inference_dropout_is_removed(opset: int) -> None:
    nodes = [
        helper.make_node("Dropout", ["x", "ratio"], ["d", "mask"]),  # mask unused
        helper.make_node("Relu", ["d"], ["y"]),
    ]
    inits = [_init("ratio", np.float32(0.3))]
    model = _model(nodes, {"x": (4, 5)}, ["y"], inits, opset)
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["Relu"]
    assert report.counters["dropouts_removed"] == 1
    _assert_equivalent(model, cleaned)


def test_dropout_with_used_mask_or_training_mode_is_kept() -> None:
    nodes = [
        helper.make_node("Dropout", ["x"], ["d", "mask"], name="masked"),
        helper.make_node("Dropout", ["x", "ratio", "train"], ["e"], name="training"),
        helper.make_node("Dropout", ["x", "ratio", "mode"], ["f"], name="fed"),
    ]
    inits = [_init("ratio", np.float32(0.5)), _init("train", np.bool_(True))]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("mode", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("d", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [2]),
            helper.make_tensor_value_info("e", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("f", TensorProto.FLOAT, [2]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["Dropout"] * 3
    assert report.counters["dropouts_removed"] == 0
    assert sorted((s.node, s.reason) for s in report.skips) == [
        ("fed", "Dropout training_mode is not a constant"),
        ("masked", "Dropout mask output is used"),
        ("training", "Dropout training_mode is true"),
    ]


def test_identity_read_inside_a_subgraph_is_rewired() -> None:
    then_graph = helper.make_graph(
        [helper.make_node("Neg", ["i"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Abs", ["i"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    nodes = [
        helper.make_node("Identity", ["x"], ["i"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    cleaned, report = _clean(model)
    assert _ops(cleaned) == ["If"]
    assert report.counters["identities_removed"] == 1
    onnx.checker.check_model(cleaned, full_check=True)
    x = np.array([1.0, -2.0], np.float32)
    for cond in (True, False):
        feeds = {"x": x, "c": np.array(cond)}
        np.testing.assert_array_equal(_run(cleaned, feeds)[0], _run(model, feeds)[0])


# --------------------------------------------------------------------------- merging


@pytest.mark.parametrize("opset", OPSETS)
def test_duplicate_constants_are_merged(opset: int) -> None:
    w = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    inits = [
        _init("w1", w),
        _init("w2", w.copy()),
        _init("w3", w.reshape(9, 1)),  # same bytes, other shape: kept
        _init("w4", w.astype(np.float64).astype(np.float32) + 0),  # equal values again
        _init("b", np.zeros(3, np.float32)),
        _init("b_neg", -np.zeros(3, np.float32)),  # -0.0 has other bytes: kept
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["b1"]),
        helper.make_node("MatMul", ["b1", "w4"], ["b2"]),
        helper.make_node("Add", ["b2", "b"], ["c"]),
        helper.make_node("Add", ["c", "b_neg"], ["d"]),
        helper.make_node("Reshape", ["d", "shape"], ["e"]),
        helper.make_node("MatMul", ["e", "w3"], ["y"]),
    ]
    inits.append(_init("shape", np.array([2, 9], np.int64)))
    model = _model(nodes, {"x": (6, 3)}, ["y"], inits, opset)
    cleaned, report = _clean(model)
    assert report.counters["constants_merged"] == 2
    assert sorted(t.name for t in cleaned.graph.initializer) == ["b", "b_neg", "shape", "w1", "w3"]
    assert [n.input[1] for n in cleaned.graph.node[:3]] == ["w1", "w1", "w1"]
    _assert_equivalent(model, cleaned)


def test_constant_nodes_merge_when_folding_is_off() -> None:
    value = _init("v", np.array([2.0, 3.0], np.float32))
    nodes = [
        helper.make_node("Constant", [], ["k1"], value=value),
        helper.make_node("Constant", [], ["k2"], value=value),
        helper.make_node("Mul", ["x", "k1"], ["a"]),
        helper.make_node("Mul", ["a", "k2"], ["y"]),
    ]
    model = _model(nodes, {"x": (2,)}, ["y"], [], 13)
    cleaned, report = _clean(model, fold_constants=False)
    assert _ops(cleaned) == ["Constant", "Mul", "Mul"]
    assert report.counters["constants_merged"] == 1
    _assert_equivalent(model, cleaned)


def test_steps_can_be_switched_off() -> None:
    a = np.ones(3, np.float32)
    nodes = [
        helper.make_node("Identity", ["x"], ["i"]),
        helper.make_node("Neg", ["a"], ["na"]),
        helper.make_node("Add", ["i", "na"], ["s"]),
        helper.make_node("Add", ["s", "a2"], ["y"]),
    ]
    model = _model(nodes, {"x": (3,)}, ["y"], [_init("a", a), _init("a2", a)], 13)
    cleaned, report = _clean(
        model, fold_constants=False, remove_identity=False, merge_constants=False
    )
    assert _ops(cleaned) == ["Identity", "Neg", "Add", "Add"]
    assert sum(report.counters.values()) == 0


# --------------------------------------------------------------------------- contract


def test_second_run_changes_nothing(torch_model: Any) -> None:
    model = onnx.load(str(torch_model("transformer")))
    result = Pipeline([Cleanup(), Cleanup()], verify_lossless=False).run(model)
    first, second = result.report.passes
    assert first.modified
    assert first.counters["identities_removed"] > 0
    assert first.counters["folded"] > 0
    assert first.counters["constants_merged"] > 0
    assert not second.modified
    assert sum(second.counters.values()) == 0
    _assert_equivalent(model, result.model)


def test_pipeline_runs_cleanup_with_lossless_check() -> None:
    nodes = [
        helper.make_node("Identity", ["x"], ["i"]),
        helper.make_node("Exp", ["a"], ["e"]),
        helper.make_node("Mul", ["i", "e"], ["y"]),
    ]
    model = _model(nodes, {"x": (2, 3)}, ["y"], [_init("a", np.full(3, 0.5, np.float32))], 13)
    result = Pipeline(["cleanup"]).run(model)
    (report,) = result.report.passes
    assert report.modified and report.nodes_removed == 2
    assert report.validation is not None and report.validation["passed"]
    assert _ops(result.model) == ["Mul"]


def test_registry_and_config() -> None:
    assert get_pass("cleanup") is Cleanup
    assert Cleanup.lossless
    assert Cleanup.Config().fold_size_limit == 16 * MiB
    with pytest.raises(ConfigError, match="fold_size_limit"):
        Cleanup(fold_size_limit=-1)
    with pytest.raises(ConfigError, match="fold_size_limit"):
        Cleanup(fold_size_limit="lots")
    with pytest.raises(ConfigError, match="unknown option"):
        Cleanup(fold=True)
    with pytest.raises(ConfigError, match="remove_identity"):
        Cleanup.Config(remove_identity="yes")
    assert Cleanup(fold_size_limit="1024").config.fold_size_limit == 1024


# --------------------------------------------------------------------------- pad fusion


def _pad_conv_model(pads, *, value=0.0, mode="constant", opset=13, conv_pads=(0, 0, 0, 0)):
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    p = onnx.numpy_helper.from_array(np.array(pads, np.int64), "pads")
    v = onnx.numpy_helper.from_array(np.array(value, np.float32), "v")
    nodes = [
        onnx.helper.make_node("Pad", ["x", "pads", "v"], ["p"], mode=mode, name="pad"),
        onnx.helper.make_node(
            "Conv", ["p", "w"], ["y"], strides=[2, 2], pads=list(conv_pads), name="conv"
        ),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 9, 9])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [w, p, v],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


@pytest.mark.parametrize(
    "pads",
    [(0, 0, 0, 0, 0, 0, 1, 1), (0, 0, 1, 0, 0, 0, 1, 2)],  # TF "SAME" at stride 2: asymmetric
)
def test_zero_pad_fuses_into_conv(pads) -> None:
    model = _pad_conv_model(pads, conv_pads=(1, 0, 0, 1))
    result = Pipeline([Cleanup()]).run(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    conv = result.model.graph.node[0]
    got = next(a.ints for a in conv.attribute if a.name == "pads")
    assert list(got) == [1 + pads[2], pads[3], pads[6], 1 + pads[7]]
    assert result.report.passes[0].counters["pads_fused"] == 1
    x = np.random.default_rng(1).standard_normal((1, 3, 9, 9)).astype(np.float32)
    np.testing.assert_allclose(
        make_session(result.model).run(None, {"x": x})[0],
        make_session(model).run(None, {"x": x})[0],
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"pads": (0, 0, 1, 1, 0, 0, 1, 1), "value": 1.0}, "pads with a nonzero value"),
        ({"pads": (0, 0, 1, 1, 0, 0, 1, 1), "mode": "reflect"}, "not constant padding"),
        ({"pads": (0, 1, 0, 0, 0, 0, 0, 0)}, "pads the batch or channel axis"),
        ({"pads": (0, 0, -1, 0, 0, 0, 0, 0)}, "crops (negative pads)"),
    ],
)
def test_pad_that_cannot_fuse_is_left_with_a_reason(kwargs, reason) -> None:
    model = _pad_conv_model(**kwargs)
    result = Pipeline([Cleanup()]).run(model)
    assert [n.op_type for n in result.model.graph.node] == ["Pad", "Conv"]
    assert ("pad", reason) in {(s.node, s.reason) for s in result.report.passes[0].skips}
