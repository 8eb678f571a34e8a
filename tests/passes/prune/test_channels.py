"""The prune-channels pass: valid models, kept I/O shapes, MAC targets, hard == zero mode."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from fixtures import corpus, torch_models
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge import ConfigError, Context, Pipeline
from onnxslim_edge.analysis.channels import analyze_channels
from onnxslim_edge.passes.prune.channels import PruneChannels
from onnxslim_edge.passes.prune.mechanics import remove_channels, zero_channels
from onnxslim_edge.pipeline import parse_pass_spec
from onnxslim_edge.runtime import make_session

from . import models as prune_models

TOL = 1e-5


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return make_session(model, threads=1).run(None, feeds)


def _assert_equal_range(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """|got - want| <= 1e-5 * max|want| + 1e-5 * |want| elementwise; returns the worst ratio."""
    worst = 0.0
    for g, w in zip(got, want):
        assert g.shape == w.shape
        err = np.abs(g.astype(np.float64) - w)
        bound = TOL * np.abs(w).max() + TOL * np.abs(w)
        assert np.all(err <= bound), f"max error {err.max()} over range {np.abs(w).max()}"
        worst = max(worst, float(err.max() / max(np.abs(w).max(), 1e-30)))
    return worst


def _io_shapes(model: onnx.ModelProto) -> list:
    dims = lambda vi: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    inits = {t.name for t in model.graph.initializer}
    return [(vi.name, dims(vi)) for vi in model.graph.input if vi.name not in inits] + [
        (vi.name, dims(vi)) for vi in model.graph.output
    ]


def _weight_shapes(model: onnx.ModelProto) -> list:
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return sorted(str((n.op_type, [inits.get(i) for i in n.input])) for n in model.graph.node)


def _target_detail(report) -> dict:
    return next(d for d in report.details if "target" in d)


@functools.cache
def _torch_source(name: str, folder: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The exported fixture after the lossless clean-up (folds transposed weights etc.)."""
    path = Path(folder) / f"{name}.onnx"
    if name in prune_models.ARCHITECTURES:
        prune_models.export(name, path)
        x = prune_models.example_input(name)
    else:
        torch_models.export(name, path)
        x = torch_models.example_input(name)
    model = Pipeline(["cleanup"]).run(onnx.load(str(path))).model
    return model, {"x": x}


TORCH_ARCHS = (
    "resnet",
    "mobilenetv2",
    "densenet",
    "unet",
    "transformer",
    "mlp",
    "dynamic",
    "yolo",
    "shufflenet",
)


@pytest.mark.needs_torch
@pytest.mark.parametrize("name", TORCH_ARCHS)
def test_torch_architectures_30_percent_macs(name, tmp_path_factory):
    pytest.importorskip("torch")
    model, feeds = _torch_source(name, str(tmp_path_factory.getbasetemp()))
    results = {}
    for mode in ("remove", "zero"):
        result = Pipeline(
            [PruneChannels(macs_reduction=0.3, mode=mode, round_to=1)], target="onnxruntime-cpu"
        ).run(model)  # validates: ONNX checker + an ONNX Runtime session
        onnx.checker.check_model(result.model, full_check=True)
        assert _io_shapes(result.model) == _io_shapes(model)
        results[mode] = result
    hard, zero = results["remove"], results["zero"]
    report = hard.report.passes[0]
    assert report.modified and report.counters["channels_removed"] > 0
    achieved = 1 - report.cost_after["macs"] / report.cost_before["macs"]
    detail = _target_detail(report)
    assert 0.3 <= achieved <= 0.3 + detail["last_step"] + 1e-9
    assert detail["achieved"] == pytest.approx(achieved, abs=1e-9)
    # zero mode: same shapes, same MACs, only masked weights
    assert zero.report.passes[0].cost_after["macs"] == report.cost_before["macs"]
    assert _weight_shapes(zero.model) == _weight_shapes(model)
    assert zero.report.passes[0].counters["channels_zeroed"] == report.counters["channels_removed"]
    # the exactness rule: removed == masked
    _assert_equal_range(_run(hard.model, feeds), _run(zero.model, feeds))
    assert not np.allclose(_run(hard.model, feeds)[0], _run(model, feeds)[0])


@pytest.mark.needs_torch
def test_channel_shuffle_freezes_its_group_and_says_why(tmp_path_factory):
    pytest.importorskip("torch")
    model, _ = _torch_source("shufflenet", str(tmp_path_factory.getbasetemp()))
    analysis = analyze_channels(model)
    frozen = {s: g.frozen for g in analysis.groups for s in g.sources}
    shuffled = frozen["/units/units.0/branch/branch.2/branch.2.0/Conv"]
    assert shuffled.startswith("Reshape '/units/units.0/Reshape'") and "channel shuffle" in shuffled
    assert frozen["/units/units.0/branch/branch.0/branch.0.0/Conv"] is None
    result = Pipeline([PruneChannels(ratio=0.5, round_to=1)], target="onnxruntime-cpu").run(model)
    report = result.report.passes[0]
    assert any(s.op == "Reshape" and "channel shuffle" in s.reason for s in report.skips)
    details = {tuple(d["sources"]): d for d in report.details if "group" in d}
    assert details[("/units/units.0/branch/branch.2/branch.2.0/Conv",)]["kept"] == 8
    assert details[("/units/units.0/branch/branch.0/branch.0.0/Conv",)]["kept"] == 4


def test_yolo_split_concat_keeps_split_sizes_rounded(tmp_path_factory):
    pytest.importorskip("torch")
    model, feeds = _torch_source("yolo", str(tmp_path_factory.getbasetemp()))
    result = Pipeline([PruneChannels(ratio=0.5, round_to=4)]).run(model)
    graph = gs.import_onnx(result.model)
    (split,) = [n for n in graph.nodes if n.op == "Split"]
    assert split.inputs[1].values.tolist() == [4, 4]
    for node in graph.nodes:
        if node.op == "Conv" and node.outputs[0].name:
            cout = node.inputs[1].values.shape[0]
            assert cout % 4 == 0, node.name
    ref = _run(model, feeds)[0]
    assert _run(result.model, feeds)[0].shape == ref.shape


# --------------------------------------------------------------------------- corpus

CORPUS_FAST = ("light_squeezenet", "light_inception_v1", "light_shufflenet")
CORPUS_SLOW = ("light_resnet50", "light_densenet121", "light_inception_v2", "light_vgg19")


def _corpus_case(name: str) -> corpus.CorpusCase:
    return next(c for c in corpus.corpus_cases(("light",)) if c.name == name)


@pytest.mark.parametrize(
    "name", [*CORPUS_FAST, *(pytest.param(n, marks=pytest.mark.slow) for n in CORPUS_SLOW)]
)
def test_light_corpus_30_percent_macs(name):
    case = _corpus_case(name)
    feeds, _ = case.original_run()
    spec = "prune-channels:macs_reduction=0.3,round_to=1"
    result = Pipeline(["cleanup", spec], target="onnxruntime-cpu", verify_lossless=False).run(
        case.load_model()
    )
    original = case.load_model()
    assert _io_shapes(result.model) == _io_shapes(original)
    report = result.report.passes[1]
    if name == "light_shufflenet":  # every layer is a grouped conv or feeds a shuffle
        assert not report.modified
        assert report.warnings == ["every channel group is frozen: nothing to prune"]
        assert report.counters["groups_frozen"] == report.counters["groups"]
        assert any("grouped convolution" in s.reason for s in report.skips)
        return
    achieved = 1 - report.cost_after["macs"] / report.cost_before["macs"]
    assert 0.3 <= achieved <= 0.3 + _target_detail(report)["last_step"] + 1e-9
    hard = _run(result.model, feeds)
    if name in CORPUS_FAST:
        zero = Pipeline(
            ["cleanup", spec + ",mode=zero"], target="onnxruntime-cpu", verify_lossless=False
        ).run(original)
        _assert_equal_range(hard, _run(zero.model, feeds))
    assert all(np.all(np.isfinite(h)) for h in hard)


# --------------------------------------------------------------------------- small nets


def _residual_net(seed: int, channels: int = 12, pad_consumer: bool = True) -> onnx.ModelProto:
    """Conv-BN-ReLU, a residual block (3x3 with padding), a 1x1 head, GAP, Gemm."""
    rng = np.random.default_rng(seed)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)

    def bn(name, c):
        return [
            numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), f"{name}_s"),
            numpy_helper.from_array((rng.random(c) - 0.5).astype(np.float32), f"{name}_b"),
            numpy_helper.from_array((rng.random(c) - 0.5).astype(np.float32), f"{name}_m"),
            numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), f"{name}_v"),
        ]

    c = channels
    pads = [1, 1, 1, 1] if pad_consumer else [0, 0, 0, 0]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c0", "bn0_s", "bn0_b", "bn0_m", "bn0_v"], ["n0"], name="bn0"
        ),
        helper.make_node("Relu", ["n0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", pads=pads),
        helper.make_node(
            "BatchNormalization", ["c1", "bn1_s", "bn1_b", "bn1_m", "bn1_v"], ["n1"], name="bn1"
        ),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["r0", "c2"], ["s"], name="residual"),
        helper.make_node("Conv", ["s", "w3", "b3"], ["c3"], name="head"),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    k = 3 if pad_consumer else 1
    inits = [
        w("w0", c, 3, 3, 3),
        w("b0", c),
        *bn("bn0", c),
        w("w1", c, c, k, k),
        *bn("bn1", c),
        w("w2", c, c, 3, 3),
        w("b2", c),
        w("w3", 16, c, 1, 1),
        w("b3", 16),
        w("wf", 5, 16),
        w("bf", 5),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 3, 8, 8)).astype(np.float32)}


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ratio=st.floats(0.05, 0.9),
    seed=st.integers(0, 10_000),
    round_to=st.sampled_from([1, 2, 4]),
    pad=st.booleans(),
    importance=st.sampled_from(["l1", "l2", "bn_gamma"]),
)
def test_property_random_ratios_valid_shapes_kept_hard_equals_zero(
    ratio, seed, round_to, pad, importance
):
    model = _residual_net(seed, pad_consumer=pad)
    feeds = _feeds(seed)
    outs = {}
    for mode in ("remove", "zero"):
        cfg = PruneChannels(ratio=ratio, round_to=round_to, mode=mode, importance=importance)
        result = Pipeline([cfg]).run(model)
        assert _io_shapes(result.model) == _io_shapes(model)
        outs[mode] = (result, _run(result.model, feeds))
    hard, zero = outs["remove"], outs["zero"]
    _assert_equal_range(hard[1], zero[1])
    assert _weight_shapes(zero[0].model) == _weight_shapes(model)
    for detail in hard[0].report.passes[0].details:
        if detail["frozen"] is None and detail["kept"] < detail["channels"]:
            assert detail["kept"] % round_to == 0 and detail["kept"] >= 1
            assert detail["kept"] >= detail["channels"] - np.floor(ratio * detail["channels"])


def test_folding_keeps_constant_channels_exact_without_padding():
    """conv1 (no padding) reads removed stem channels: their relu(BN(b)) is folded."""
    model = _residual_net(3, pad_consumer=False)
    graph = gs.import_onnx(model)
    analysis = analyze_channels(graph)
    keep = np.ones(analysis.num_classes, bool)
    group = analysis.group_of("stem")
    keep[group.classes[:4]] = False
    from onnxslim_edge.passes.prune.mechanics import removed_constants

    feeds = [_feeds(0), _feeds(1)]
    constants = removed_constants(graph, analysis, keep, feeds)
    folded = {analysis.consumers[i].kind for i, v in constants.items() if np.isfinite(v).any()}
    assert "Conv" in folded  # conv1 and head have no padding
    hard, zero = graph.copy(), graph.copy()
    counts = remove_channels(hard, analysis, keep, constants)
    zcounts = zero_channels(zero, analysis, keep, constants)
    # stem and conv2 share the classes (residual Add): 4 channels leave each
    assert counts["channels_removed"] == 8 and counts["biases_folded"] >= 1
    assert zcounts["channels_zeroed"] == 8
    to_model = lambda g: gs.export_onnx(g.cleanup().toposort(), do_type_check=False)  # noqa: E731
    h, z = to_model(hard), to_model(zero)
    h.ir_version = z.ir_version = 8
    onnx.checker.check_model(h, full_check=True)
    _assert_equal_range(_run(h, feeds[0]), _run(z, feeds[0]))
    # without the folded biases the removed model is measurably different
    bare = graph.copy()
    remove_channels(bare, analysis, keep)
    b = to_model(bare)
    b.ir_version = 8
    assert not np.allclose(_run(b, feeds[0])[0], _run(h, feeds[0])[0], atol=1e-4)


def test_l1_removes_the_filters_with_the_smallest_norm():
    model = _residual_net(5)
    graph = gs.import_onnx(model)
    w1 = graph.tensors()["w3"].values  # the head's filters: 16 x C
    norms = np.abs(w1).reshape(16, -1).sum(1)
    result = Pipeline([PruneChannels(ratio=0.25, round_to=1)]).run(model)
    pruned = gs.import_onnx(result.model)
    (head,) = [n for n in pruned.nodes if n.name == "head"]
    kept = head.inputs[1].values
    expected = np.sort(np.argsort(norms, kind="stable")[4:])
    # the kept filters are the original rows with the largest L1 norms, in order
    assert np.array_equal(kept.reshape(12, -1)[:, 0], w1[expected].reshape(12, -1)[:, 0])


def test_activation_importance_uses_calibration_data():
    model = _residual_net(7)
    data = [_feeds(s) for s in range(3)]
    result = Pipeline([PruneChannels(ratio=0.5, importance="activation", round_to=1)]).run(
        model, Context(data=data, target="onnxruntime-cpu")
    )
    assert result.report.passes[0].counters["channels_removed"] > 0
    with pytest.raises(ConfigError, match="needs calibration data"):
        Pipeline([PruneChannels(ratio=0.5, importance="activation", round_to=1)]).run(model)


def test_tensorrt_target_rounds_to_8_and_never_empties_a_layer():
    model = _residual_net(1, channels=16)
    result = Pipeline([PruneChannels(ratio=0.9)]).run(model)  # target tensorrt: round_to 8
    for d in result.report.passes[0].details:
        if d["frozen"] is None:
            assert d["kept"] in (8, 16)
    assert any(d["kept"] == 8 for d in result.report.passes[0].details)


def test_params_reduction_target():
    model = _residual_net(2, channels=16)
    result = Pipeline([PruneChannels(params_reduction=0.25, round_to=1)]).run(model)
    report = result.report.passes[0]
    achieved = 1 - report.cost_after["params"] / report.cost_before["params"]
    assert 0.25 <= achieved <= 0.25 + _target_detail(report)["last_step"] + 1e-9


def test_unreachable_target_is_reported():
    model = _residual_net(2, channels=8)
    result = Pipeline([PruneChannels(macs_reduction=0.95, round_to=4)]).run(model)
    report = result.report.passes[0]
    assert any("not reachable" in w for w in report.warnings)
    assert _target_detail(report)["steps"] == _target_detail(report)["steps_available"]


def test_excluded_nodes_and_frozen_graph_leave_model_untouched():
    model = _residual_net(4)
    names = ("stem", "conv1", "head")
    result = Pipeline([PruneChannels(ratio=0.5, exclude_nodes=names)]).run(model)
    report = result.report.passes[0]
    assert report.modified is False
    assert report.warnings == ["every channel group is frozen: nothing to prune"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of ratio, macs_reduction, params_reduction"),
        ({"ratio": 0.2, "macs_reduction": 0.3}, "exactly one"),
        ({"ratio": 1.5}, "must be in [0, 1)"),
        ({"ratio": 0.2, "round_to": 0}, "round_to"),
        ({"ratio": 0.2, "min_channels": 0}, "min_channels"),
        ({"ratio": 0.2, "mode": "soft"}, "mode"),
    ],
)
def test_config_errors(options, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        PruneChannels(**options)


def test_cli_spec_parses():
    p = parse_pass_spec("prune-channels:macs_reduction=0.3,mode=zero,exclude_nodes=a|b")
    assert isinstance(p, PruneChannels)
    assert p.config.macs_reduction == 0.3 and p.config.mode == "zero"
    assert p.config.exclude_nodes == ("a", "b")


def test_macs_target_is_met_at_the_data_shape_when_height_and_width_are_symbolic() -> None:
    """Paddle-style exports leave H and W symbolic: MACs must be counted at the shape the
    calibration data has, not with every unknown dim as 1 (which makes the classifier
    look like most of the cost)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxslim_edge.analysis import model_cost
    from onnxslim_edge.pipeline import Context, Pipeline

    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1000])],
        [w("w1", 32, 8, 3, 3), w("w2", 32, 32, 3, 3), w("w3", 1000, 32)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    data = [{"x": rng.standard_normal((1, 8, 32, 32)).astype(np.float32)}]
    ctx = Context(data=data, target="onnxruntime-cpu")
    pruned = Pipeline(["prune-channels:macs_reduction=0.3,round_to=1"]).run(model, ctx).model
    shape = {"x": (1, 8, 32, 32)}
    before, after = (
        model_cost(model, input_shapes=shape).macs,
        model_cost(pruned, input_shapes=shape).macs,
    )
    reduction = 1 - after / before
    assert 0.3 <= reduction < 0.4, reduction
    onnx.checker.check_model(pruned)
