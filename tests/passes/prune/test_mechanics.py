"""Pruning mechanics on a hand-built Conv chain: exact slicing, zero mode equals remove mode."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.analysis.channels import analyze_channels
from onnxslim_edge.graph import expose_outputs
from onnxslim_edge.passes.prune.mechanics import (
    kept_positions,
    remove_channels,
    removed_constants,
    zero_channels,
)
from onnxslim_edge.runtime import make_session

RNG = np.random.default_rng(0)
X_SHAPE = (2, 3, 6, 6)
REMOVE_A = [1, 4, 6]  # of a's 8 output channels
REMOVE_B = [0, 3]  # of b's 5


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value.astype(np.float32), name)


def _chain() -> onnx.ModelProto:
    """x -> Conv a (8, 1x1) -> Relu -> Conv b (5, 3x3, pads 1) -> Relu -> Conv c (4, 1x1) -> y.

    b pads, so a's removed channels cannot be folded into it; c does not, so b's removed
    channels (each a constant relu(bias) once its filters are zero) fold into c's bias.
    """
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["t1"], name="a", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["t1"], ["r1"], name="relu1"),
        helper.make_node(
            "Conv", ["r1", "wb", "bb"], ["t2"], name="b", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["t2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "wc", "bc"], ["y"], name="c", kernel_shape=[1, 1]),
    ]
    inits = [
        _init("wa", RNG.standard_normal((8, 3, 1, 1))),
        _init("ba", RNG.standard_normal(8)),
        _init("wb", RNG.standard_normal((5, 8, 3, 3))),
        _init("bb", np.abs(RNG.standard_normal(5)) + 0.5),  # relu(bias) > 0: folds matter
        _init("wc", RNG.standard_normal((4, 5, 1, 1))),
        _init("bc", RNG.standard_normal(4)),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [X_SHAPE[0], 4, 6, 6])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _keep(analysis, removed: dict[str, list[int]]) -> np.ndarray:
    keep = np.ones(analysis.num_classes, dtype=bool)
    for src in analysis.sources:
        if src.node in removed:
            atoms = np.arange(src.start, src.start + src.size)
            keep[analysis.atom_class[atoms[removed[src.node]]]] = False
    return keep


def _run(graph: gs.Graph, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    model = expose_outputs(gs.export_onnx(graph.copy(), do_type_check=False), names)
    session = make_session(model, threads=1)
    return dict(zip(names, session.run(names, {"x": x})))


def _setup():
    graph = gs.import_onnx(_chain())
    analysis = analyze_channels(graph)
    keep = _keep(analysis, {"a": REMOVE_A, "b": REMOVE_B})
    return graph, analysis, keep


def test_kept_positions_follow_the_keep_mask():
    _, analysis, keep = _setup()
    a = next(s for s in analysis.sources if s.node == "a")
    mask = kept_positions(analysis, np.arange(a.start, a.start + a.size), keep)
    assert mask.tolist() == [i not in REMOVE_A for i in range(8)]


def test_remove_slices_weights_and_keeps_kept_channels_exact():
    graph, analysis, keep = _setup()
    x = RNG.standard_normal(X_SHAPE).astype(np.float32)
    before = _run(graph, x, ["r1", "y"])
    pruned = graph.copy()
    counts = remove_channels(pruned, analysis, keep)
    assert counts == {"channels_removed": 5, "biases_folded": 0}
    weights = {n.name: n.inputs[1].values.shape for n in pruned.nodes if n.op == "Conv"}
    assert weights == {"a": (5, 3, 1, 1), "b": (3, 5, 3, 3), "c": (4, 3, 1, 1)}
    biases = {n.name: n.inputs[2].values.shape for n in pruned.nodes if n.op == "Conv"}
    assert biases == {"a": (5,), "b": (3,), "c": (4,)}
    after = _run(pruned, x, ["r1", "y"])
    kept_a = [i for i in range(8) if i not in REMOVE_A]
    # a's kept channels come from the same filters and biases: equal up to float noise
    np.testing.assert_allclose(after["r1"], before["r1"][:, kept_a], rtol=1e-6, atol=1e-6)
    assert after["y"].shape == before["y"].shape
    # the input graph is untouched (the pruned one is a copy)
    assert next(n for n in graph.nodes if n.name == "a").inputs[1].values.shape == (8, 3, 1, 1)


def test_zero_mode_equals_remove_mode_with_folded_constants():
    graph, analysis, keep = _setup()
    feeds = [{"x": RNG.standard_normal(X_SHAPE).astype(np.float32)} for _ in range(2)]
    constants = removed_constants(graph, analysis, keep, feeds)
    c_index = next(i for i, c in enumerate(analysis.consumers) if c.node_index == 4)
    b_index = next(i for i, c in enumerate(analysis.consumers) if c.node_index == 2)
    assert b_index not in constants  # b pads: not foldable, so not measured
    bias_b = next(n for n in graph.nodes if n.name == "b").inputs[2].values
    want = np.full(5, np.nan)
    want[REMOVE_B] = np.maximum(bias_b[REMOVE_B], 0)  # relu(bias) once the filters are zero
    np.testing.assert_allclose(constants[c_index], want, rtol=1e-6)

    removed, zeroed, unfolded = graph.copy(), graph.copy(), graph.copy()
    assert remove_channels(removed, analysis, keep, constants) == {
        "channels_removed": 5,
        "biases_folded": 1,
    }
    assert zero_channels(zeroed, analysis, keep, constants) == {
        "channels_zeroed": 5,
        "consumers_masked": 1,  # b's input weights of a's removed channels
    }
    remove_channels(unfolded, analysis, keep)
    # zero mode keeps every shape
    shapes = {n.name: n.inputs[1].values.shape for n in zeroed.nodes if n.op == "Conv"}
    assert shapes == {"a": (8, 3, 1, 1), "b": (5, 8, 3, 3), "c": (4, 5, 1, 1)}
    x = RNG.standard_normal(X_SHAPE).astype(np.float32)
    y_removed = _run(removed, x, ["y"])["y"]
    y_zeroed = _run(zeroed, x, ["y"])["y"]
    y_unfolded = _run(unfolded, x, ["y"])["y"]
    scale = float(np.abs(y_zeroed).max())
    np.testing.assert_allclose(y_removed, y_zeroed, rtol=1e-5, atol=1e-5 * scale)
    # without the fold, the removed channels' constant contribution is lost
    assert float(np.abs(y_unfolded - y_zeroed).max()) > 1e-2 * scale


def test_removing_nothing_changes_nothing():
    graph, analysis, _ = _setup()
    keep = np.ones(analysis.num_classes, dtype=bool)
    x = RNG.standard_normal(X_SHAPE).astype(np.float32)
    before = _run(graph, x, ["y"])["y"]
    same = graph.copy()
    assert remove_channels(same, analysis, keep) == {"channels_removed": 0, "biases_folded": 0}
    assert removed_constants(graph, analysis, keep, [{"x": x}]) == {}
    np.testing.assert_array_equal(_run(same, x, ["y"])["y"], before)


def test_expose_outputs_adds_each_name_once_on_a_copy():
    model = _chain()
    exposed = expose_outputs(model, ["r1", "y", "r1"])
    assert [o.name for o in exposed.graph.output] == ["y", "r1"]
    assert [o.name for o in model.graph.output] == ["y"]
