"""quantize on a BERT-style encoder, and the default fidelity guard.

The encoder (`torch_models.export_text_encoder`: embeddings, two
`nn.TransformerEncoderLayer` with a -inf key padding mask, mean pooling) is quantized
on both targets and compared with fp32 on held-out token batches of other lengths.
The guard is checked on a small MLP whose hand-set range ruins it: it falls back and
meets the floor, raises the documented error when it may not, and changes nothing
on a model that meets the floor.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fixtures import torch_models
from onnx import numpy_helper

from onnxslim_edge.analysis.qdq_lint import lint_qdq
from onnxslim_edge.passes.quantize.qdq import Quantize
from onnxslim_edge.pipeline import Context, FidelityError, Pipeline
from onnxslim_edge.runtime import make_session

from .test_qdq import _mlp3  # 3 MatMul+Relu layers, 16 samples

TARGETS = ("onnxruntime-cpu", "tensorrt")


STYLES = ("bert", "torch")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("enc")
    return {s: str(torch_models.export_text_encoder(folder / f"{s}.onnx", style=s)) for s in STYLES}


def _calib():
    feed = torch_models.text_encoder_inputs(32, seed=1)
    return [{k: v[i : i + 8] for k, v in feed.items()} for i in range(0, 32, 8)]


def _quantize(model, data, target, **options):
    result = Pipeline([Quantize(**options)], target=target).run(
        model, Context(data=data, target=target)
    )
    return result.model, result.report.passes[0]


def _row_cosines(reference, candidate, feed):
    r = make_session(reference).run(None, feed)[0].astype(np.float64)
    c = make_session(candidate).run(None, feed)[0].astype(np.float64)
    return (r * c).sum(1) / np.linalg.norm(r, axis=1) / np.linalg.norm(c, axis=1)


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("target", TARGETS)
def test_encoder_keeps_embeddings(encoders, style, target):
    encoder = encoders[style]
    q, report = _quantize(encoder, _calib(), target)
    # per layer: Q, K, V (one packed in_proj MatMul in torch's), out, FFN up/down, QK^T, AV
    assert report.counters["layers_quantized"] == (16 if style == "bert" else 12)
    lengths = ((12, 2), (7, 3), (16, 4)) if style == "bert" else ((12, 2), (12, 3))
    for seq, seed in lengths:  # held out; dynamic sequence (bert): 16 is longer than calib
        feed = torch_models.text_encoder_inputs(16, seed=seed, seq=seq)
        cos = _row_cosines(encoder, q, feed)
        assert cos.min() >= 0.99, (seq, cos.min())
    producers = _producers(q)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    # weights: int8, one scale per output channel
    for node in q.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in producers:
            dq = producers[node.input[1]]
            if dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                assert inits[dq.input[0]].dtype == np.int8
                assert inits[dq.input[1]].ndim == 1 and inits[dq.input[1]].size > 1
    # LayerNorm, Softmax, Erf read float tensors, never a DequantizeLinear
    for node in q.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Erf"):
            assert all(
                producers.get(i) is None or producers[i].op_type != "DequantizeLinear"
                for i in node.input
            ), node.name
    # the -inf mask is never quantized (it would come back as 0: no masking at all)
    for node in q.graph.node:
        if node.op_type == "QuantizeLinear":
            src = producers.get(node.input[0])
            assert src is None or src.op_type not in ("Where", "Cast"), node.name
    if target == "tensorrt":
        assert not [v for v in lint_qdq(q) if v.severity == "error"]
    guard = next(d for d in report.details if "fidelity" in d)
    assert guard["kept_float"] == [] and guard["fidelity"]["cosine"] >= 0.99


@pytest.mark.parametrize("style", STYLES)
def test_ort_residual_and_mask_adds_stay_float(encoders, style):
    q, _ = _quantize(encoders[style], _calib(), "onnxruntime-cpu")
    producers = _producers(q)
    consumers = {}
    for n in q.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for node in q.graph.node:
        if node.op_type != "Add":
            continue
        reads_norm = any(
            c.op_type == "LayerNormalization" for c in consumers.get(node.output[0], [])
        )
        feeds_softmax = any(c.op_type == "Softmax" for c in consumers.get(node.output[0], []))
        if reads_norm or feeds_softmax:  # residual sums and the mask Add: float in, float out
            assert not any(c.op_type == "QuantizeLinear" for c in consumers[node.output[0]])
            assert all(
                producers.get(i) is None or producers[i].op_type != "DequantizeLinear"
                for i in node.input
            ), node.name


# --------------------------------------------------------------------------- the guard


#: A hand-set range that clips r0 to a fifth of its span: output cosine 0.93 (< 0.95).
_BAD = ("r0=2.54",)


def _cosine(reference, candidate, feed):
    r = make_session(reference).run(None, feed)[0].ravel().astype(np.float64)
    c = make_session(candidate).run(None, feed)[0].ravel().astype(np.float64)
    return float(r @ c / np.linalg.norm(r) / np.linalg.norm(c))


def test_guard_catches_a_bad_override():
    model, data = _mlp3()
    unguarded, report = _quantize(model, data, "tensorrt", overrides=_BAD, fidelity_guard=False)
    assert _cosine(model, unguarded, data[0]) < 0.95  # what the guard exists for
    assert not any("fidelity" in d for d in report.details)
    q, report = _quantize(model, data, "tensorrt", overrides=_BAD)
    assert report.counters["fallback_layers"] >= 1
    guard = next(d for d in report.details if "fidelity" in d)
    assert guard["floors"] == {"min_cosine": 0.95, "min_sqnr_db": 10.0}
    assert guard["fidelity"]["cosine"] >= 0.95 and guard["fidelity"]["sqnr_db"] >= 10
    assert _cosine(model, q, data[0]) >= 0.95
    assert any(
        w.startswith("fidelity floor missed with every layer quantized") for w in report.warnings
    )


def test_guard_raises_when_fallback_may_not_help():
    model, data = _mlp3()
    with pytest.raises(FidelityError) as info:
        _quantize(model, data, "tensorrt", overrides=_BAD, fallback_max_layers=0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "quantize: cannot meet min_cosine=0.95, min_sqnr_db=10 (the fidelity guard's default "
        "floors: set min_cosine/min_sqnr_db to change them, fidelity_guard=false to skip the "
        "check) with 0 layer(s) kept in float (fallback_max_layers=0): output 'y': cosine 0.9"
    )


def test_guard_floor_is_an_option():
    model, data = _mlp3()
    _, report = _quantize(model, data, "tensorrt", overrides=_BAD, min_cosine=0.9)
    guard = next(d for d in report.details if "fidelity" in d)
    assert guard["floors"] == {"min_cosine": 0.9} and guard["kept_float"] == []
    assert "fallback_layers" not in report.counters or report.counters["fallback_layers"] == 0


@pytest.mark.parametrize("target", TARGETS)
def test_guard_changes_nothing_that_meets_the_floor(target):
    model, data = _mlp3()
    guarded, report = _quantize(model, data, target)
    unguarded, _ = _quantize(model, data, target, fidelity_guard=False)
    assert guarded.graph.SerializeToString() == unguarded.graph.SerializeToString()
    guard = next(d for d in report.details if "fidelity" in d)
    # 16 samples, all used for calibration too: the data has none past the limit
    assert guard["fidelity_data"] == "calibration" and guard["fidelity_samples"] == 16


def test_guard_measures_held_back_samples():
    model, data = _mlp3()
    extra = np.random.default_rng(5).normal(size=(24, 8)).astype(np.float32)
    more = [{"x": np.concatenate([data[0]["x"], extra])}]
    _, report = _quantize(model, more, "tensorrt", max_calibration_samples=16, guard_samples=8)
    guard = next(d for d in report.details if "fidelity" in d)
    assert guard["fidelity_data"] == "held-back" and guard["fidelity_samples"] == 8


def test_guard_on_the_command_line(tmp_path, capsys):
    from onnxslim_edge.cli import main

    model, data = _mlp3()
    src, out, calib = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    np.savez(calib, x=data[0]["x"])
    code = main(
        [
            "optimize",
            str(src),
            "-o",
            str(out),
            "--target",
            "tensorrt",
            "--calib",
            str(calib),
            "--pass",
            "quantize:overrides=r0=2.54,fallback_max_layers=0",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and "the fidelity guard's default floors" in err[0]
