"""SmoothQuant-style smoothing (`passes/quantize/smooth.py`) and its use by quantize.

The rewrite must leave the float model's outputs unchanged (BERT-style encoder with a
decomposed LayerNorm, the torch encoder with LayerNormalization, a pre-norm graph
whose LayerNorm gamma/beta absorb the division); quantize smooths transformers by
default on tensorrt (on request on onnxruntime-cpu), lints clean, and on an encoder with LayerNorm outlier channels (as trained
BERTs have) keeps embeddings where the unsmoothed int8 model does not.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from fixtures import torch_models
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.analysis.qdq_lint import lint_qdq
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.graph import const_value
from onnxslim_edge.passes.quantize.config import QuantizeConfig
from onnxslim_edge.passes.quantize.qdq import Quantize
from onnxslim_edge.passes.quantize.smooth import channel_amax, smooth_graph, smooth_targets
from onnxslim_edge.pipeline import Context, Pipeline
from onnxslim_edge.runtime import make_session


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("smooth")
    return {
        s: onnx.load(str(torch_models.export_text_encoder(folder / f"{s}.onnx", style=s)))
        for s in ("bert", "torch")
    }


def _calib(n=32, seed=1):
    feed = torch_models.text_encoder_inputs(n, seed=seed)
    return [{k: v[i : i + 8] for k, v in feed.items()} for i in range(0, n, 8)]


def _smoothed(model, data, alpha=0.5):
    graph = gs.import_onnx(model)
    targets = smooth_targets(graph)
    details = smooth_graph(graph, channel_amax(model, list(targets), data), alpha=alpha)
    return gs.export_onnx(graph), details


def _run(model, feed):
    return make_session(model).run(None, feed)


def _row_cosines(reference, candidate, feed):
    r = _run(reference, feed)[0].astype(np.float64)
    c = _run(candidate, feed)[0].astype(np.float64)
    return (r * c).sum(1) / np.linalg.norm(r, axis=1) / np.linalg.norm(c, axis=1)


def _quantize(model, data, target, **options):
    result = Pipeline([Quantize(**options)], target=target).run(
        model, Context(data=data, target=target)
    )
    return result.model, result.report.passes[0]


@pytest.mark.parametrize("style", ["bert", "torch"])
def test_smoothing_is_exact_on_the_float_model(encoders, style):
    model = encoders[style]
    smoothed, details = _smoothed(model, _calib())
    onnx.checker.check_model(smoothed, full_check=True)
    # Q, K, V read one tensor (bert; torch packs them); post-norm: the LayerNorm output
    # also feeds the residual Add, so the division is a Mul in front of the layers.
    # torch's Transpose(W) weights are folded into the scaled constants.
    assert details and all(d["placed"] == "mul" for d in details)
    muls = sum(n.op_type == "Mul" for n in smoothed.graph.node)
    assert muls == sum(n.op_type == "Mul" for n in model.graph.node) + len(details)
    spread = [d["amax_max_over_median"] for d in details]
    assert any(after < before for before, after in spread)
    feed = torch_models.text_encoder_inputs(8, seed=5)
    for want, got in zip(_run(model, feed), _run(smoothed, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # a second run finds every channel balanced already: nothing moves, no node added
    again, more = _smoothed(smoothed, _calib())
    assert more == [] and len(again.graph.node) == len(smoothed.graph.node)


def _prenorm(k=8, n=6, seed=0):
    """x -> LayerNormalization(gamma, beta) -> MatMul(W1), MatMul(W2) -> Add -> y: the
    LayerNorm output is read by the two MatMuls only (a pre-norm block)."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, k).astype(np.float32)
    gamma[2] = 40.0  # an outlier channel
    inits = [
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln"),
        helper.make_node("MatMul", ["h", "w1"], ["a"], name="mm1"),
        helper.make_node("MatMul", ["h", "w2"], ["b"], name="mm2"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "prenorm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_layernorm_gamma_beta_absorb_the_division():
    model = _prenorm()
    data = [
        {"x": np.random.default_rng(i).standard_normal((4, 5, 8)).astype(np.float32)}
        for i in range(2)
    ]
    smoothed, details = _smoothed(model, data)
    onnx.checker.check_model(smoothed, full_check=True)
    assert [(d["tensor"], d["placed"], d["layers"]) for d in details] == [
        ("h", "folded", ["mm1", "mm2"])
    ]
    assert [n.op_type for n in smoothed.graph.node] == [n.op_type for n in model.graph.node]
    feed = {"x": np.random.default_rng(9).standard_normal((3, 5, 8)).astype(np.float32)}
    np.testing.assert_allclose(_run(smoothed, feed)[0], _run(model, feed)[0], rtol=1e-4, atol=1e-4)
    # the outlier channel's spread moved into the weights: the activation is flatter
    before, after = details[0]["amax_max_over_median"]
    assert after < before / 3
    # smoothing the result again at the same alpha finds nothing left to move
    _, more = _smoothed(smoothed, data)
    assert more == []


def test_nothing_to_smooth_leaves_the_graph_alone():
    model = _prenorm()
    graph = gs.import_onnx(model)
    assert smooth_graph(graph, {}, alpha=0.5) == []  # no statistics: untouched
    assert len(graph.nodes) == 4


@pytest.mark.parametrize(("target", "smooth"), [("tensorrt", "auto"), ("onnxruntime-cpu", "on")])
def test_quantize_smooths_transformers(encoders, target, smooth):
    model = encoders["bert"]
    q, report = _quantize(model, _calib(), target, smooth=smooth)
    # per layer: the Q/K/V input, the attention output's, FFN up's and FFN down's
    assert report.counters["smoothed_activations"] == 8
    detail = next(d for d in report.details if "smoothing" in d)
    assert detail["smooth_alpha"] == 0.75
    lint = "tensorrt" if target == "tensorrt" else "onnxruntime-cpu"
    assert not [v for v in lint_qdq(q, target=lint) if v.severity == "error"]
    feed = torch_models.text_encoder_inputs(16, seed=4, seq=12)
    assert _row_cosines(model, q, feed).min() >= 0.99
    for off in ("off", "auto") if target == "onnxruntime-cpu" else ("off",):
        _, report = _quantize(model, _calib(), target, smooth=off)
        assert "smoothed_activations" not in report.counters


def _with_outliers(model, factor=40.0):
    """The encoder with LayerNorm outlier channels: channels 3 and 17 of the gamma and
    beta of every LayerNorm but the last scaled by `factor` (trained BERTs grow such
    channels; the last stays, so they do not dominate the embedding itself)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = gs.import_onnx(out)
    norms = [
        n
        for n in graph.nodes
        if n.op == "Div" and n.inputs[0].inputs and n.inputs[0].inputs[0].op == "Sub"
    ]
    assert len(norms) == 5  # the embeddings' LayerNorm, two per layer
    for node in norms[:-1]:
        mul = node.outputs[0].outputs[0]  # decomposed LayerNorm: Div -> Mul(gamma)
        add = mul.outputs[0].outputs[0]  # -> Add(beta)
        assert (mul.op, add.op) == ("Mul", "Add")
        for op in (mul, add):
            slot = next(i for i, t in enumerate(op.inputs) if const_value(t) is not None)
            v = const_value(op.inputs[slot]).copy()
            v[[3, 17]] *= factor
            op.inputs[slot] = gs.Constant(f"{op.name}_outliers", v)
    return gs.export_onnx(graph.cleanup())


def test_smoothing_keeps_embeddings_with_outlier_channels(encoders):
    model = _with_outliers(encoders["bert"])
    held = torch_models.text_encoder_inputs(16, seed=3, seq=12)
    plain, _ = _quantize(model, _calib(), "tensorrt", smooth="off")
    smooth, _ = _quantize(model, _calib(), "tensorrt")
    without, with_ = _row_cosines(model, plain, held), _row_cosines(model, smooth, held)
    # measured at alpha 0.5: unsmoothed mean 0.99916 / min 0.9891, smoothed 0.99994 / 0.99959
    assert without.min() < 0.995  # the outliers do hurt int8 here
    assert with_.min() >= 0.999, with_.min()
    assert 1 - with_.mean() < (1 - without.mean()) / 4, (without.mean(), with_.mean())


@pytest.mark.parametrize(
    ("key", "value"), [("smooth", "yes"), ("smooth_alpha", 1.5), ("smooth_alpha", True)]
)
def test_bad_smoothing_options_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"quantize.{key}"):
        QuantizeConfig(**{key: value})
