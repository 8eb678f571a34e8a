"""Channel dependency groups on small hand-built graphs: exact groups, maps and barriers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.analysis.channels import analyze_channels

RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes, inits, x_shape=(1, 3, 6, 6), y_shape=None, opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model


def _conv_node(name, x, y, w, k=1, group=1):
    return helper.make_node(
        "Conv", [x, w], [y], name=name, kernel_shape=[k, k], pads=[k // 2] * 4, group=group
    )


def _groups(analysis):
    return {tuple(g.sources): g for g in analysis.groups if g.sources}


def test_residual_add_ties_both_inputs_into_one_group():
    model = _model(
        [
            _conv_node("a", "x", "t1", "wa"),
            helper.make_node("Relu", ["t1"], ["r1"], name="relu"),
            _conv_node("b", "r1", "t2", "wb", k=3),
            helper.make_node("Add", ["r1", "t2"], ["s"], name="add"),
            _conv_node("c", "s", "y", "wc"),
        ],
        [_w("wa", 8, 3, 1, 1), _w("wb", 8, 8, 3, 3), _w("wc", 4, 8, 1, 1)],
    )
    analysis = analyze_channels(model)
    groups = _groups(analysis)
    assert set(groups) == {("a", "b"), ("c",)}
    ab = groups[("a", "b")]
    assert ab.channels == 8 and ab.frozen is None and [len(b) for b in ab.blocks] == [8]
    assert groups[("c",)].frozen == "graph output 'y'"
    # position i of both Add inputs is one class
    classes = analysis.class_map
    assert np.array_equal(
        classes(analysis.tensor_maps["r1"].atoms), classes(analysis.tensor_maps["t2"].atoms)
    )
    # b reads and writes the same group: its weight is sliced on both axes
    b_edits = {(e.index, e.axis, e.role) for e in analysis.edits if e.node_index == 2}
    assert b_edits == {(1, 0, "out"), (1, 1, "in")}


def test_concat_maps_channels_by_offset():
    model = _model(
        [
            _conv_node("a", "x", "ta", "wa"),
            _conv_node("b", "x", "tb", "wb"),
            helper.make_node("Concat", ["ta", "tb"], ["cat"], axis=1, name="cat"),
            _conv_node("c", "cat", "y", "wc"),
        ],
        [_w("wa", 4, 3, 1, 1), _w("wb", 6, 3, 1, 1), _w("wc", 5, 10, 1, 1)],
    )
    analysis = analyze_channels(model)
    a, b = analysis.sources[0], analysis.sources[1]
    expected = np.r_[np.arange(a.start, a.start + 4), np.arange(b.start, b.start + 6)]
    assert np.array_equal(analysis.tensor_maps["cat"].atoms, expected)
    groups = _groups(analysis)
    assert groups[("a",)].channels == 4 and groups[("b",)].channels == 6
    assert groups[("a",)].frozen is None and groups[("b",)].frozen is None
    (consumer,) = analysis.consumers
    assert consumer.kind == "Conv" and consumer.weight_axis == 1 and consumer.foldable


def test_depthwise_conv_couples_input_and_output_channels():
    model = _model(
        [
            _conv_node("a", "x", "t", "wa"),
            _conv_node("dw", "t", "d", "wd", k=3, group=8),
            _conv_node("c", "d", "y", "wc"),
        ],
        [_w("wa", 8, 3, 1, 1), _w("wd", 8, 1, 3, 3), _w("wc", 4, 8, 1, 1)],
    )
    analysis = analyze_channels(model)
    assert np.array_equal(analysis.tensor_maps["t"].atoms, analysis.tensor_maps["d"].atoms)
    kinds = {(e.kind, e.node_index, e.role) for e in analysis.edits}
    assert ("group", 1, "param") in kinds and ("slice", 1, "param") in kinds
    assert _groups(analysis)[("a",)].frozen is None
    # the consumer after the depthwise pads nothing but reads padded values: foldable
    # is decided per consumer (no padding in c itself)
    assert [c.node_index for c in analysis.consumers] == [2]


def test_grouped_conv_freezes_its_input_group():
    model = _model(
        [
            _conv_node("a", "x", "t", "wa"),
            _conv_node("g", "t", "y", "wg", group=2),
        ],
        [_w("wa", 8, 3, 1, 1), _w("wg", 4, 4, 1, 1)],
    )
    group = _groups(analyze_channels(model))[("a",)]
    assert group.frozen == "Conv 'g': grouped convolution (group=2)"


def test_channel_shuffle_freezes_the_group_naming_the_reshape():
    shape5 = numpy_helper.from_array(np.array([1, 2, 4, 6, 6], np.int64), "s5")
    shape4 = numpy_helper.from_array(np.array([1, 8, 6, 6], np.int64), "s4")
    model = _model(
        [
            _conv_node("a", "x", "t", "wa"),
            helper.make_node("Reshape", ["t", "s5"], ["r5"], name="shuffle_split"),
            helper.make_node("Transpose", ["r5"], ["tr"], perm=[0, 2, 1, 3, 4], name="tp"),
            helper.make_node("Reshape", ["tr", "s4"], ["r4"], name="shuffle_merge"),
            _conv_node("c", "r4", "y", "wc"),
        ],
        [_w("wa", 8, 3, 1, 1), _w("wc", 4, 8, 1, 1), shape5, shape4],
    )
    analysis = analyze_channels(model)
    group = _groups(analysis)[("a",)]
    assert group.frozen_by == "shuffle_split"
    assert group.frozen.startswith(
        "Reshape 'shuffle_split': reshape [1, 8, 6, 6] -> [1, 2, 4, 6, 6]"
    )
    assert ("shuffle_split", "Reshape") in {(n, op) for n, op, _ in analysis.barriers}


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        (helper.make_node("LRN", ["t"], ["u"], size=3, name="lrn"), "op LRN is not understood"),
        (
            helper.make_node("Softmax", ["t"], ["u"], axis=1, name="sm"),
            "normalizes over the channel axis",
        ),
        (
            helper.make_node("ReduceMean", ["t"], ["u"], axes=[1], name="rm"),
            "reduces over the channel axis",
        ),
        (helper.make_node("DepthToSpace", ["t"], ["u"], blocksize=2, name="d2s"), "DepthToSpace"),
    ],
)
def test_channel_mixing_ops_are_barriers(node, reason):
    model = _model(
        [_conv_node("a", "x", "t", "wa"), node, helper.make_node("Relu", ["u"], ["y"])],
        [_w("wa", 8, 3, 1, 1)],
    )
    group = _groups(analyze_channels(model))[("a",)]
    assert group.frozen is not None and reason in group.frozen and node.name in group.frozen


def test_flatten_after_spatial_map_repeats_each_channel_over_its_block():
    model = _model(
        [
            _conv_node("a", "x", "t", "wa"),
            helper.make_node("MaxPool", ["t"], ["p"], kernel_shape=[3, 3], strides=[3, 3]),
            helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flat"),
            helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1, name="fc"),
        ],
        [_w("wa", 4, 3, 1, 1), _w("wf", 3, 16)],
    )
    analysis = analyze_channels(model)
    a = analysis.sources[0]
    assert np.array_equal(
        analysis.tensor_maps["f"].atoms, np.repeat(np.arange(a.start, a.start + 4), 4)
    )
    (consumer,) = analysis.consumers
    assert consumer.kind == "Gemm" and consumer.weight_axis == 1


def test_split_and_slice_cut_maps_at_their_offsets():
    split = numpy_helper.from_array(np.array([3, 5], np.int64), "split")
    bounds = [
        numpy_helper.from_array(np.array([v], np.int64), n)
        for n, v in (("st", 2), ("en", 7), ("ax", 1))
    ]
    model = _model(
        [
            _conv_node("a", "x", "t", "wa"),
            helper.make_node("Split", ["t", "split"], ["s0", "s1"], axis=1, name="split"),
            helper.make_node("Slice", ["t", "st", "en", "ax"], ["sl"], name="slice"),
            helper.make_node("Concat", ["s1", "s0", "sl"], ["cat"], axis=1),
            _conv_node("c", "cat", "y", "wc"),
        ],
        [_w("wa", 8, 3, 1, 1), _w("wc", 4, 13, 1, 1), split, *bounds],
    )
    analysis = analyze_channels(model)
    atoms = np.arange(analysis.sources[0].start, analysis.sources[0].start + 8)
    assert np.array_equal(analysis.tensor_maps["s0"].atoms, atoms[:3])
    assert np.array_equal(analysis.tensor_maps["sl"].atoms, atoms[2:7])
    assert np.array_equal(
        analysis.tensor_maps["cat"].atoms, np.r_[atoms[3:], atoms[:3], atoms[2:7]]
    )
    group = _groups(analysis)[("a",)]
    # blocks: classes that appear in the same tensors: [0,1], [2], [3..6], [7]
    assert sorted(len(b) for b in group.blocks) == [1, 1, 2, 4]


def test_excluded_node_freezes_its_group_and_graph_is_not_changed():
    model = _model(
        [_conv_node("a", "x", "t", "wa"), _conv_node("c", "t", "y", "wc")],
        [_w("wa", 8, 3, 1, 1), _w("wc", 4, 8, 1, 1)],
    )
    graph = gs.import_onnx(model)
    before = gs.export_onnx(graph).SerializeToString()
    analysis = analyze_channels(graph, exclude_nodes=("a",))
    assert _groups(analysis)[("a",)].frozen == "node 'a' is excluded"
    assert gs.export_onnx(graph).SerializeToString() == before
