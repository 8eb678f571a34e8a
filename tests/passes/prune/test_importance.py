"""Channel importance on weights chosen by hand: each criterion ranks them as it should."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.analysis.channels import analyze_channels
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.passes.prune.importance import class_importance, filter_norms

# a's filter c is (c + 1) * SIGNS: L1 = 3 (c + 1), L2 = sqrt(3) (c + 1); shuffled order
ORDER = np.array([3, 0, 5, 1, 4, 2])
SIGNS = np.array([1.0, -1.0, 1.0])


def _model(*, bn_gamma: np.ndarray | None = None, bias: np.ndarray | None = None) -> gs.Graph:
    """x (1, 3, 4, 4) -> Conv a (6, 1x1) [-> BatchNormalization] -> Relu -> Conv b (2, 1x1) -> y."""
    wa = (ORDER[:, None] + 1.0) * SIGNS[None, :]
    inits = [
        numpy_helper.from_array(wa.reshape(6, 3, 1, 1).astype(np.float32), "wa"),
        numpy_helper.from_array((np.zeros(6) if bias is None else bias).astype(np.float32), "ba"),
        numpy_helper.from_array(np.ones((2, 6, 1, 1), np.float32), "wb"),
    ]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["t"], name="a", kernel_shape=[1, 1])]
    act_in = "t"
    if bn_gamma is not None:
        for name, value in (
            ("g", bn_gamma),
            ("beta", np.zeros(6)),
            ("mean", np.zeros(6)),
            ("var", np.ones(6)),
        ):
            inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        nodes.append(
            helper.make_node("BatchNormalization", ["t", "g", "beta", "mean", "var"], ["n"])
        )
        act_in = "n"
    nodes += [
        helper.make_node("Relu", [act_in], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wb"], ["y"], name="b", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return gs.import_onnx(model)


def _a_classes(analysis) -> np.ndarray:
    a = next(s for s in analysis.sources if s.node == "a")
    return analysis.atom_class[np.arange(a.start, a.start + a.size)]


def test_l1_and_l2_rank_filters_by_their_norm():
    graph = _model()
    analysis = analyze_channels(graph)
    classes = _a_classes(analysis)
    l1 = class_importance(graph, analysis, "l1")[classes]
    l2 = class_importance(graph, analysis, "l2")[classes]
    np.testing.assert_allclose(l1, 3.0 * (ORDER + 1))
    np.testing.assert_allclose(l2, np.sqrt(3.0) * (ORDER + 1))
    # the least important filter first: the one scaled by 1, then 2, ...
    assert np.argsort(l1).tolist() == np.argsort(ORDER).tolist()


def test_filter_norms_give_one_contribution_per_prunable_source():
    graph = _model()
    analysis = analyze_channels(graph)
    contribs = filter_norms(graph, analysis)
    assert len(contribs) == 2  # a and b (b's group is frozen by the output, still scored)
    classes, norms = contribs[0]
    np.testing.assert_array_equal(classes, _a_classes(analysis))
    np.testing.assert_allclose(norms, 3.0 * (ORDER + 1))


def test_bn_gamma_ranks_by_abs_gamma():
    gamma = np.array([0.5, -3.0, 1.0, 0.1, -2.0, 4.0])
    graph = _model(bn_gamma=gamma)
    analysis = analyze_channels(graph)
    scores = class_importance(graph, analysis, "bn_gamma")[_a_classes(analysis)]
    np.testing.assert_allclose(scores, np.abs(gamma))
    assert np.argsort(scores).tolist() == [3, 0, 2, 4, 1, 5]


def test_bn_gamma_falls_back_to_l1_without_batchnorm():
    graph = _model()
    analysis = analyze_channels(graph)
    np.testing.assert_allclose(
        class_importance(graph, analysis, "bn_gamma"), class_importance(graph, analysis, "l1")
    )


def test_activation_is_mean_abs_input_of_the_consumer():
    # x = 0: channel c of b's input is relu(bias[c]) at every position
    bias = np.array([0.3, -1.0, 2.0, 0.7, 0.0, 1.5])
    graph = _model(bias=bias)
    analysis = analyze_channels(graph)
    batches = [{"x": np.zeros((1, 3, 4, 4), np.float32)} for _ in range(3)]
    scores = class_importance(graph, analysis, "activation", batches=batches)
    np.testing.assert_allclose(scores[_a_classes(analysis)], np.maximum(bias, 0), rtol=1e-6)


def test_aggregates_combine_coupled_sources():
    """Two convs tied by a residual Add share classes: sum, mean and max of their norms."""
    wa = np.array([1.0, 2.0, 3.0, 4.0])[:, None] * np.ones((4, 3))
    wb = np.array([4.0, 1.0, 1.0, 1.0])[:, None] * np.ones((4, 4))
    inits = [
        numpy_helper.from_array(wa.reshape(4, 3, 1, 1).astype(np.float32), "wa"),
        numpy_helper.from_array(wb.reshape(4, 4, 1, 1).astype(np.float32), "wb"),
        numpy_helper.from_array(np.ones((2, 4, 1, 1), np.float32), "wc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["t1"], name="a", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["t1", "wb"], ["t2"], name="b", kernel_shape=[1, 1]),
        helper.make_node("Add", ["t1", "t2"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "wc"], ["y"], name="c", kernel_shape=[1, 1]),
    ]
    g = helper.make_graph(
        nodes,
        "res",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])],
        initializer=inits,
    )
    graph = gs.import_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    analysis = analyze_channels(graph)
    classes = _a_classes(analysis)
    la, lb = 3.0 * np.array([1, 2, 3, 4]), 4.0 * np.array([4, 1, 1, 1])
    got = {
        how: class_importance(graph, analysis, "l1", how)[classes] for how in ("sum", "mean", "max")
    }
    np.testing.assert_allclose(got["sum"], la + lb)
    np.testing.assert_allclose(got["mean"], (la + lb) / 2)
    np.testing.assert_allclose(got["max"], np.maximum(la, lb))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"criterion": "taylor"},
            "unknown importance 'taylor'; valid: l1, l2, bn_gamma, activation",
        ),
        ({"aggregate": "median"}, "unknown aggregate 'median'; valid: sum, mean, max"),
        (
            {"criterion": "activation"},
            "prune-channels: importance='activation' needs calibration data (Context.data)",
        ),
        (
            {"criterion": "activation", "batches": []},
            "prune-channels: importance='activation' got no calibration batches",
        ),
    ],
)
def test_bad_options_are_config_errors(kwargs: dict, message: str):
    graph = _model()
    analysis = analyze_channels(graph)
    with pytest.raises(ConfigError) as info:
        class_importance(graph, analysis, **kwargs)
    assert str(info.value) == message


def test_the_fixture_models_pass_the_full_checker():
    for graph in (_model(), _model(bn_gamma=np.ones(6))):
        onnx.checker.check_model(gs.export_onnx(graph), full_check=True)
