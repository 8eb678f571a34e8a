"""distill: KD losses against numpy, each legalization rewrite against the original op,
the cpu-flavor error, and (train flavor) training end to end on tiny models: a student
learns its teacher, pruning masks and 2:4 patterns stay exact, an interrupted run
resumes on the same trajectory, a Q/DQ model fine-tuned stays lint-clean, bad input
gives one line, and the CLI path prune -> distill works.

Losses and rewrites are plain ONNX, checked in any ONNX Runtime; training needs the
`train` extra (onnxruntime-training-cpu 1.19.2) and is skipped elsewhere with the reason.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge import Context, Pipeline, cli
from onnxslim_edge.errors import ConfigError, DataError, UnsupportedError
from onnxslim_edge.passes.distill.distill import Distill
from onnxslim_edge.passes.distill.engine import TRAIN_EXTRA_MESSAGE, available_engines
from onnxslim_edge.passes.distill.legalize import REWRITES, blocked, legalize
from onnxslim_edge.passes.distill.losses import (
    LABELS_INPUT,
    LOSS_OUTPUT,
    FeaturePair,
    LossSpec,
    OutputLoss,
    build_loss_model,
    teacher_input,
)
from onnxslim_edge.runtime import make_session

ENGINES = available_engines()
HAS_ORT = "onnxruntime-training" in ENGINES
needs_engine = pytest.mark.skipif(not ENGINES, reason=TRAIN_EXTRA_MESSAGE)
needs_ort = pytest.mark.skipif(not HAS_ORT, reason=TRAIN_EXTRA_MESSAGE)


@pytest.fixture(params=ENGINES or [None])
def engine(request: pytest.FixtureRequest) -> str:
    """Every gradient engine installed here (ORT training in the train flavor, onnx-ad)."""
    if request.param is None:
        pytest.skip(TRAIN_EXTRA_MESSAGE)
    return request.param


# --------------------------------------------------------------------------- models


def _vi(name: str, shape: list) -> Any:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(nodes: list, inits: dict, inputs: list, outputs: list, opset: int = 13) -> Any:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _mlp(seed: int = 0, noise: float = 0.0) -> Any:
    """x (N, 8) -> Gemm 16 -> Relu -> Gemm 4 = logits; `noise` perturbs the first layer."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 16)).astype(np.float32)
    w2 = rng.normal(size=(16, 4)).astype(np.float32)
    if noise:
        w1 = w1 + np.random.default_rng(seed).normal(size=w1.shape).astype(np.float32) * noise
    inits = {"W1": w1, "b1": np.full(16, 0.1, np.float32), "W2": w2, "b2": np.zeros(4, np.float32)}
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["logits"], name="fc2"),
    ]
    return _model(nodes, inits, [_vi("x", ["N", 8])], [_vi("logits", ["N", 4])])


def _cnn(seed: int = 0) -> Any:
    """x (N, 1, 8, 8) -> Conv 8 -> Relu -> Conv 8 -> Relu -> GAP -> Flatten -> Gemm 4."""
    rng = np.random.default_rng(seed)
    inits = {
        "c1.w": rng.normal(size=(8, 1, 3, 3)).astype(np.float32) * 0.5,
        "c1.b": rng.normal(size=8).astype(np.float32) * 0.1,
        "c2.w": rng.normal(size=(8, 8, 3, 3)).astype(np.float32) * 0.2,
        "c2.b": rng.normal(size=8).astype(np.float32) * 0.1,
        "fc.w": rng.normal(size=(8, 4)).astype(np.float32),
        "fc.b": np.zeros(4, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["a"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="r1"),
        helper.make_node("Conv", ["ar", "c2.w", "c2.b"], ["b"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["br"], name="r2"),
        helper.make_node("GlobalAveragePool", ["br"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc"),
    ]
    return _model(nodes, inits, [_vi("x", ["N", 1, 8, 8])], [_vi("logits", ["N", 4])])


def _inputs(n: int = 256, shape: tuple = (8,), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _init(model: Any, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _summary(report: Any) -> dict:
    return next(d for d in report.details if d.get("kind") == "summary")


# --------------------------------------------------------------------------- losses


def _loss(spec: LossSpec, student: Any, feeds: dict) -> float:
    shapes = {
        k[len(teacher_input("")) :]: ["N", *v.shape[1:]]
        for k, v in feeds.items()
        if k.startswith(teacher_input(""))
    }
    model = build_loss_model(student, spec, shapes)
    onnx.checker.check_model(model, full_check=True)
    session = make_session(model)
    return float(session.run([LOSS_OUTPUT], feeds)[0])


def _identity(name: str = "s", shape: list | None = None) -> Any:
    shape = shape or ["N", 2]
    return _model(
        [helper.make_node("Identity", ["x"], [name])], {}, [_vi("x", shape)], [_vi(name, shape)]
    )


def test_kd_loss_equals_the_textbook_kl() -> None:
    """p = (0.8, 0.2) teacher, q = (0.7, 0.3) student: KL(p || q) = 0.0257 nats."""
    p, q = np.array([[0.8, 0.2]], np.float32), np.array([[0.7, 0.3]], np.float32)
    spec = LossSpec(outputs=(OutputLoss("s", "kd"),), temperature=1.0)
    got = _loss(spec, _identity(), {"x": np.log(q), teacher_input("s"): np.log(p)})
    assert got == pytest.approx(0.8 * np.log(0.8 / 0.7) + 0.2 * np.log(0.2 / 0.3), rel=1e-5)
    assert round(got, 4) == 0.0257


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_kd_with_temperature_and_labels_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    s, t = (
        rng.normal(size=(6, 5)).astype(np.float32),
        rng.normal(size=(6, 5)).astype(np.float32) * 3,
    )
    labels = rng.integers(0, 5, 6)
    onehot = np.eye(5, dtype=np.float32)[labels]
    T, alpha = 3.0, 0.7
    spec = LossSpec(outputs=(OutputLoss("s", "kd", 2.0),), temperature=T, alpha=alpha, labels=True)
    got = _loss(
        spec, _identity(shape=["N", 5]), {"x": s, teacher_input("s"): t, LABELS_INPUT: onehot}
    )
    lp, lq = _log_softmax(t / T), _log_softmax(s / T)
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    ce = -_log_softmax(s)[np.arange(6), labels].mean()
    assert got == pytest.approx(2.0 * (alpha * T**2 * kl + (1 - alpha) * ce), rel=1e-5)


def test_mse_cosine_and_feature_terms_equal_numpy() -> None:
    rng = np.random.default_rng(1)
    s, t = (
        rng.normal(size=(4, 3, 2)).astype(np.float32),
        rng.normal(size=(4, 3, 2)).astype(np.float32),
    )
    student = _model(
        [helper.make_node("Identity", ["x"], ["s"]), helper.make_node("Neg", ["x"], ["feat"])],
        {},
        [_vi("x", ["N", 3, 2])],
        [_vi("s", ["N", 3, 2])],
    )
    norm = float(np.mean(t.astype(np.float64) ** 2))
    feeds = {"x": s, teacher_input("s"): t, teacher_input("tf"): t}
    spec = LossSpec(
        outputs=(OutputLoss("s", "mse", 0.5), OutputLoss("s", "cosine")),
        features=(FeaturePair("feat", "tf", 2.0),),
        norms={"s": norm, "tf": norm},
    )
    sf, tf = s.reshape(4, -1).astype(np.float64), t.reshape(4, -1).astype(np.float64)
    cos = (sf * tf).sum(1) / np.sqrt((sf * sf).sum(1) * (tf * tf).sum(1))
    want = (
        0.5 * np.mean((s - t) ** 2) / norm + (1 - cos.mean()) + 2.0 * np.mean((-s - t) ** 2) / norm
    )
    assert _loss(spec, student, feeds) == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- legalize

_CASES = {
    "HardSigmoid": ({"alpha": 0.3, "beta": 0.4}, []),
    "HardSwish": ({}, []),
    "PRelu": ({}, [("slope", np.array([0.1, -0.2, 0.3], np.float32).reshape(3, 1, 1))]),
    "Softplus": ({}, []),
    "Mish": ({}, []),
    "Elu": ({"alpha": 0.7}, []),
    "Selu": ({}, []),
    "Softsign": ({}, []),
    "LayerNormalization": (
        {"epsilon": 1e-3},
        [
            ("scale", np.linspace(0.5, 1.5, 5, dtype=np.float32)),
            ("bias", np.full(5, 0.1, np.float32)),
        ],
    ),
    "Dropout": ({}, [("ratio", np.array(0.4, np.float32))]),
    "InstanceNormalization": (
        {"epsilon": 1e-3},
        [
            ("scale", np.array([1.5, 0.5, -1.0], np.float32)),
            ("bias", np.array([0.1, 0.0, -0.2], np.float32)),
        ],
    ),
}


def test_every_rewrite_is_tested() -> None:
    assert set(_CASES) == set(REWRITES)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("op", sorted(_CASES))
def test_rewrite_equals_the_original_op(op: str, opset: int) -> None:
    if op in ("Mish",) and opset < 18:
        pytest.skip("Mish exists from opset 18")
    if op == "LayerNormalization" and opset < 17:
        pytest.skip("LayerNormalization exists from opset 17")
    if op == "HardSwish" and opset < 14:
        opset = 14
    attrs, extra = _CASES[op]
    inits = dict(extra)
    node = helper.make_node(op, ["x", *inits], ["y"], name="op", **attrs)
    shape = [2, 3, 4, 5]
    model = _model([node], inits, [_vi("x", shape)], [_vi("y", shape)], opset=opset)
    legal = legalize(model)
    assert legal.rewrites == {op: 1}
    if op == "LayerNormalization":  # kept, with the optional outputs ORT's gradient reads
        assert [len(n.output) for n in legal.model.graph.node] == [3]
    else:
        assert op not in {n.op_type for n in legal.model.graph.node}
    onnx.checker.check_model(legal.model, full_check=True)
    # values past every kink and the overflow of exp: -30..30 plus a dense middle
    x = np.concatenate([np.linspace(-30, 30, 60), np.linspace(-4, 4, 60)]).astype(np.float32)
    x = x.reshape(shape)
    want = make_session(model).run(None, {"x": x})[0]
    got = make_session(legal.model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


def test_blocked_names_the_node_and_the_weights_before_it() -> None:
    w = np.ones((4, 4), np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["a"], name="mm0"),
        helper.make_node("Einsum", ["a"], ["b"], name="ein", equation="ij->ij"),
        helper.make_node("MatMul", ["b", "W1"], ["y"], name="mm1"),
    ]
    model = _model(nodes, {"W0": w, "W1": w}, [_vi("x", [2, 4])], [_vi("y", [2, 4])])
    assert blocked(model, ["W0", "W1"]) == {"Einsum 'ein'": {"W0"}}


# --------------------------------------------------------------------------- cpu flavor


def test_without_an_engine_the_error_names_the_train_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxslim_edge.passes.distill import engine as engines

    monkeypatch.setattr(engines, "available_engines", lambda: [])
    with pytest.raises(UnsupportedError, match=r"install the 'train' extra"):
        Pipeline([Distill()]).run(_mlp(), Context(data=[{"x": _inputs(8)}]))
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_mlp(), src)
    np.savez(tmp_path / "d.npz", x=_inputs(8))
    calib = str(tmp_path / "d.npz")
    rc = cli.main(
        ["optimize", str(src), "-o", str(out), "--pass", "distill", "--calib", calib, "-q"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'train' extra" in err[0]
    assert not out.exists()


# --------------------------------------------------------------------------- training


def _distill(
    student: Any,
    teacher: Any,
    x: np.ndarray,
    name: str = "x",
    progress: bool = False,
    **options: Any,
) -> Any:
    options.setdefault("threads", 1)
    ctx = Context(data=[{name: x}], reference=teacher, progress=progress)
    return Pipeline([Distill(**options)]).run(student, ctx)


def test_a_tiny_student_learns_its_teacher(engine: str) -> None:
    """The student is the teacher with its first layer perturbed; it can match exactly, so
    the relative MSE on the logits goes to ~0 (1.9e-1 -> 1.7e-3 measured)."""
    teacher, student = _mlp(), _mlp(seed=3, noise=0.5)
    result = _distill(
        student,
        teacher,
        _inputs(),
        epochs=30,
        lr=0.05,
        patience=0,
        losses=("logits=mse",),
        engine=engine,
    )
    report = result.report.passes[0]
    summary = _summary(report)
    epochs = [d for d in report.details if d.get("kind") == "epoch"]
    assert summary["heldout_loss_before"] > 0.1
    assert summary["heldout_loss_after"] < 0.005
    assert epochs[-1]["train_loss"] < 0.005
    assert summary["fidelity_after"] > summary["fidelity_before"]
    assert report.modified and not report.warnings
    assert report.details[0] == {**report.details[0], "kind": "engine", "engine": engine}
    # the returned weights are the ones scored: fresh inputs agree with the teacher
    x = _inputs(128, seed=9)
    out = make_session(result.model).run(None, {"x": x})[0]
    ref = make_session(teacher).run(None, {"x": x})[0]
    assert np.mean(np.argmax(out, 1) == np.argmax(ref, 1)) >= 0.9
    assert np.mean((out - ref) ** 2) / np.mean(ref**2) < 0.01
    assert len(summary["loss_curve"]) > 10 and summary["steps"] == 30 * 8
    assert all(e["samples_per_s"] > 0 and e["wall_s"] > 0 for e in epochs)


@needs_engine
def test_feature_pairs_train_and_bad_names_are_one_line() -> None:
    teacher, student, x = _mlp(), _mlp(seed=3, noise=0.5), _inputs(64)
    result = _distill(student, teacher, x, epochs=8, lr=0.02, patience=0, features=("r=r:0.5",))
    summary = _summary(result.report.passes[0])
    assert summary["heldout_loss_after"] < 0.5 * summary["heldout_loss_before"]
    with pytest.raises(ConfigError, match="'nope' is no tensor of the student"):
        _distill(student, teacher, x, features=("nope=r",))
    with pytest.raises(ConfigError, match="'nope' is no tensor of the teacher"):
        _distill(student, teacher, x, features=("r=nope",))
    with pytest.raises(
        UnsupportedError, match=r"'h' is \(16,\) per sample in the teacher but 'logits' is \(4,\)"
    ):
        _distill(student, teacher, x, features=("logits=h",))


@needs_engine
def test_labels_add_cross_entropy(tmp_path: Path) -> None:
    teacher, student, x = _mlp(), _mlp(seed=3, noise=0.5), _inputs(64)
    labels = np.argmax(make_session(teacher).run(None, {"x": x})[0], 1)
    np.savez(tmp_path / "train.npz", x=x, label=labels)
    data = str(tmp_path / "train.npz")
    options = dict(data=data, epochs=8, lr=0.02, patience=0)
    summary = _summary(_distill(student, teacher, x, labels="label", **options).report.passes[0])
    assert summary["fidelity_after"] > summary["fidelity_before"]
    assert summary["heldout_loss_after"] < 0.5 * summary["heldout_loss_before"]
    with pytest.raises(DataError, match="has no array 'lbl'"):
        _distill(student, teacher, x, labels="lbl", **options)
    np.savez(tmp_path / "bad.npz", x=x, label=labels.astype(np.float32))
    with pytest.raises(DataError, match="must be integers"):
        _distill(student, teacher, x, labels="label", data=str(tmp_path / "bad.npz"))


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero() -> None:
    from onnxslim_edge.passes.distill.trainer import learning_rate

    lrs = [learning_rate(i, 100, 1.0, 0.1, "cosine") for i in range(100)]
    assert lrs[:10] == pytest.approx([(i + 1) / 11 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + np.cos(np.pi * 45 / 90)))
    assert lrs[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 89 / 90))) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert learning_rate(50, 100, 0.3, 0.1, "constant") == 0.3


@needs_engine
def test_steps_and_early_stopping() -> None:
    teacher, x = _mlp(), _inputs(64)
    steps = _distill(_mlp(seed=3, noise=0.5), teacher, x, steps=5, patience=0).report.passes[0]
    assert steps.counters["steps"] == 5 and _summary(steps)["epochs"] == 3  # 2 steps an epoch
    # the student is the teacher: nothing can improve, so patience 1 stops after one epoch
    same = _distill(_mlp(), teacher, x, epochs=10, patience=1, lr=0.01).report.passes[0]
    summary = _summary(same)
    assert summary["stopped_early"] and summary["epochs"] == 1 and not same.modified
    assert any("kept the input model" in w for w in same.warnings)


def test_layer_norm_and_dropout_train(engine: str) -> None:
    """ORT training needs LayerNormalization's optional outputs: legalization adds them."""
    rng = np.random.default_rng(0)
    inits = {
        "W": rng.normal(size=(8, 6)).astype(np.float32),
        "g": np.ones(6, np.float32),
        "b": np.zeros(6, np.float32),
        "ratio": np.array(0.3, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
        helper.make_node("LayerNormalization", ["a", "g", "b"], ["y"], name="ln", axis=-1),
        helper.make_node("Dropout", ["y", "ratio"], ["z"], name="drop"),
    ]
    teacher = _model(nodes, inits, [_vi("x", ["N", 8])], [_vi("z", ["N", 6])], opset=17)
    inits["W"] = inits["W"] + rng.normal(size=(8, 6)).astype(np.float32)
    student = _model(nodes, inits, [_vi("x", ["N", 8])], [_vi("z", ["N", 6])], opset=17)
    result = _distill(student, teacher, _inputs(64), epochs=3, lr=0.02, patience=0, engine=engine)
    report = result.report.passes[0]
    assert report.modified and report.counters["legalized_LayerNormalization"] == 1
    assert [n.op_type for n in result.model.graph.node] == [
        "MatMul",
        "LayerNormalization",
        "Dropout",
    ]


@pytest.mark.skipif("onnx-ad" not in ENGINES, reason="needs the onnx-ad package")
def test_onnx_ad_freezes_grouped_conv_weights_and_trains_the_rest() -> None:
    rng = np.random.default_rng(0)
    inits = {
        "dw.w": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "pw.w": rng.normal(size=(4, 4, 1, 1)).astype(np.float32),
        "pw.b": np.zeros(4, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "dw.w"], ["a"], name="dw", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "pw.w", "pw.b"], ["b"], name="pw"),
        helper.make_node("GlobalAveragePool", ["b"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["y"], name="flat"),
    ]
    teacher = _model(nodes, inits, [_vi("x", ["N", 4, 6, 6])], [_vi("y", ["N", 4])])
    inits["pw.w"] = inits["pw.w"] + rng.normal(size=(4, 4, 1, 1)).astype(np.float32)
    student = _model(nodes, inits, [_vi("x", ["N", 4, 6, 6])], [_vi("y", ["N", 4])])
    x = _inputs(64, (4, 6, 6))
    result = _distill(student, teacher, x, epochs=4, lr=0.02, patience=0, engine="onnx-ad")
    report = result.report.passes[0]
    assert report.counters["engine_frozen_tensors"] == 1
    assert any("grouped convolutions: 1 weight(s)" in w and "dw.w" in w for w in report.warnings)
    np.testing.assert_array_equal(_init(result.model, "dw.w"), inits["dw.w"])
    assert report.modified and not np.array_equal(_init(result.model, "pw.w"), inits["pw.w"])


def test_augmentation_crops_resizes_and_flips() -> None:
    from onnxslim_edge.passes.distill.samples import augment_images

    x = np.random.default_rng(0).random((16, 3, 32, 40), dtype=np.float32)
    a = augment_images(x, np.random.default_rng(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= x.min() and a.max() <= x.max()  # bilinear: convex combinations
    np.testing.assert_array_equal(a, augment_images(x, np.random.default_rng(1)))
    assert not np.array_equal(a, x)
    const = np.ones((2, 1, 32, 32), np.float32)
    np.testing.assert_allclose(augment_images(const, np.random.default_rng(2)), const, atol=1e-6)


@needs_engine
def test_images_of_32_pixels_are_augmented_by_default() -> None:
    teacher, student = _cnn(), _cnn(seed=1)
    x = _inputs(48, (1, 32, 32))
    for vi in [*teacher.graph.input, *student.graph.input]:
        vi.type.tensor_type.shape.dim[2].dim_value = vi.type.tensor_type.shape.dim[3].dim_value = 32
    result = _distill(student, teacher, x, epochs=2, lr=0.01, patience=0)
    report = result.report.passes[0]
    assert report.config["augment"] == "auto" and _summary(report)["steps"] == 4
    assert report.counters.get("augmented") == 1


def test_a_model_with_a_fixed_batch_trains_in_batches_of_it(engine: str) -> None:
    fixed = _mlp(seed=3, noise=0.5)
    for vi in [*fixed.graph.input, *fixed.graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    options = dict(epochs=2, lr=0.02, patience=0, engine=engine, teacher_cache_mb=0)
    result = _distill(fixed, _mlp(), _inputs(41), **options)  # teacher run on every batch
    report = result.report.passes[0]
    assert report.modified and report.counters["steps"] == 2 * 37  # 37 of 41 train, 4 held out
    assert any("fixes its batch to 1" in w for w in report.warnings)
    summary = _summary(report)
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def _cnn_data(n: int = 96) -> np.ndarray:
    return _inputs(n, (1, 8, 8), seed=4)


@pytest.mark.parametrize(
    "compress",
    [
        "prune-channels:ratio=0.5,round_to=1,mode=zero",
        "prune-magnitude:sparsity=0.6",
        "sparsify-nm",
    ],
)
def test_masks_stay_exactly_zero(compress: str, engine: str) -> None:
    from onnxslim_edge.analysis.sparsity_nm import check_nm

    teacher = _cnn()
    x = _cnn_data()
    pruned = (
        Pipeline([compress], target="onnxruntime-cpu").run(teacher, Context(data=[{"x": x}])).model
    )
    zeros = {
        t.name: numpy_helper.to_array(t) == 0
        for t in pruned.graph.initializer
        if t.name.endswith(".w")
    }
    assert sum(int(z.sum()) for z in zeros.values()) > 0
    result = _distill(
        pruned, teacher, x, epochs=3, lr=0.01, patience=0, engine=engine, progress=True
    )
    report = result.report.passes[0]
    assert report.modified and report.counters["masked_weights"] == sum(
        int(z.sum()) for z in zeros.values()
    )
    for name, zero in zeros.items():
        after = _init(result.model, name)
        assert np.all(after[zero] == 0), name
        assert not np.array_equal(after, _init(pruned, name)), f"{name} did not train"
    if compress == "sparsify-nm":
        nm = {r.node: r.ok for r in check_nm(result.model)}
        assert nm == {r.node: r.ok for r in check_nm(pruned)} and any(nm.values())


def test_resume_continues_the_same_trajectory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    """Ctrl-C at step 11 keeps the best model and saves; a second run with the same
    checkpoint folder finishes the same 18 steps to the same weights as an uninterrupted run."""
    import importlib

    from onnxslim_edge.passes.distill.engine import ENGINES as REGISTRY

    module = REGISTRY[engine].partition(":")[0]
    program = {
        "onnxruntime-training": "OrtTrainingProgram",
        "onnx-ad": "OnnxAdProgram",
    }[engine]
    program_cls = getattr(importlib.import_module(module), program)
    teacher, student, x = _mlp(), _mlp(seed=3, noise=0.5), _inputs(128)
    options = dict(epochs=3, lr=0.02, patience=0, batch_size=16, holdout=0.25, engine=engine)
    straight = _distill(student, teacher, x, **options).model

    real_step = program_cls.step
    calls = {"n": 0}

    def interrupting(self: Any, feeds: Any, lr: float) -> float:
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return real_step(self, feeds, lr)

    monkeypatch.setattr(program_cls, "step", interrupting)
    ckpt = tmp_path / "ckpt"
    first = _distill(student, teacher, x, checkpoint_dir=str(ckpt), **options)
    report = first.report.passes[0]
    assert _summary(report)["interrupted"] and _summary(report)["steps"] == 10
    assert any("interrupted after 10 steps" in w for w in report.warnings)
    assert (ckpt / "progress.json").is_file()
    monkeypatch.setattr(program_cls, "step", real_step)
    second = _distill(student, teacher, x, checkpoint_dir=str(ckpt), **options)
    summary = _summary(second.report.passes[0])
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 18
    for name in ("W1", "b1", "W2", "b2"):
        np.testing.assert_allclose(
            _init(second.model, name), _init(straight, name), rtol=0, atol=1e-6
        )
    with pytest.raises(ConfigError, match="holds a distill run of another model"):
        _distill(_mlp(seed=5, noise=0.3), teacher, x, checkpoint_dir=str(ckpt), **options)


def test_qdq_model_fine_tuned_stays_lint_clean(engine: str) -> None:
    """Quantization-aware mode: int8 weights re-quantized on their own scales, every Q/DQ
    node kept, TensorRT lint clean, held-out fidelity not below the PTQ model's."""
    from onnxslim_edge.analysis.qdq_lint import lint_qdq

    teacher, x = _cnn(), _cnn_data(128)
    student = onnx.ModelProto()
    student.CopyFrom(teacher)  # a student that lost something before int8: c2.w perturbed
    for t in student.graph.initializer:
        if t.name == "c2.w":
            w = numpy_helper.to_array(t)
            noise = np.random.default_rng(7).normal(size=w.shape).astype(np.float32) * 0.1
            t.CopyFrom(numpy_helper.from_array(w + noise, t.name))
    ctx = Context(data=[{"x": x}])
    quantized = Pipeline(["quantize:method=minmax"], target="tensorrt").run(student, ctx).model
    assert not [v for v in lint_qdq(quantized) if v.severity == "error"]
    result = _distill(
        quantized, teacher, x, epochs=3, lr=0.002, patience=0, losses=("logits=mse",), engine=engine
    )
    report = result.report.passes[0]
    summary = _summary(report)
    assert report.counters["fake_quant_weights"] == 3
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in quantized.graph.node]
    assert not [v for v in lint_qdq(result.model) if v.severity == "error"]
    before = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    int_weights = [k for k, v in before.items() if v.dtype == np.int8 and v.ndim == 4]
    assert int_weights and all(after[k].dtype == np.int8 for k in int_weights)
    assert any(not np.array_equal(after[k], before[k]) for k in int_weights)
    scales = [k for k, v in before.items() if v.dtype == np.float32 and "scale" in k]
    assert scales and all(np.array_equal(after[k], before[k]) for k in scales)
    # measured: held-out relative MSE 0.75 -> 0.05, top-1 agreement 0.15 -> 0.92
    assert summary["heldout_loss_after"] < 0.2 * summary["heldout_loss_before"]
    assert summary["fidelity_after"] > summary["fidelity_before"]


@needs_engine
def test_a_worse_result_keeps_the_input() -> None:
    teacher, student, x = _mlp(), _mlp(seed=3, noise=0.05), _inputs(64)
    result = _distill(
        student, teacher, x, epochs=2, lr=50.0, patience=0, optimizer="sgd", losses=("logits=mse",)
    )
    report = result.report.passes[0]
    assert not report.modified
    assert any("kept the input model" in w for w in report.warnings)


@needs_ort
def test_no_gradient_op_is_named_or_frozen() -> None:
    rng = np.random.default_rng(0)
    inits = {
        "W0": rng.normal(size=(4, 4)).astype(np.float32),
        "W1": rng.normal(size=(4, 3)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["a"], name="mm0"),
        helper.make_node("Einsum", ["a"], ["b"], name="ein", equation="ij->ij"),
        helper.make_node("MatMul", ["b", "W1"], ["y"], name="mm1"),
    ]
    teacher = _model(nodes, inits, [_vi("x", ["N", 4])], [_vi("y", ["N", 3])], opset=13)
    inits["W1"] = inits["W1"] + rng.normal(size=(4, 3)).astype(np.float32)
    student = _model(nodes, inits, [_vi("x", ["N", 4])], [_vi("y", ["N", 3])], opset=13)
    x = _inputs(64, (4,))
    ort = "onnxruntime-training"
    with pytest.raises(
        UnsupportedError, match=r"no gradient through Einsum 'ein'.*no_gradient=freeze"
    ):
        _distill(student, teacher, x, engine=ort)
    options = dict(no_gradient="freeze", epochs=5, lr=0.05, patience=0)
    result = _distill(student, teacher, x, engine=ort, **options)
    report = result.report.passes[0]
    assert any("Einsum 'ein'" in w and "froze 1" in w for w in report.warnings)
    np.testing.assert_array_equal(_init(result.model, "W0"), inits["W0"])
    assert not np.array_equal(_init(result.model, "W1"), inits["W1"])
    if "onnx-ad" in ENGINES:  # standard-op gradients exist for Einsum: both layers train
        result = _distill(student, teacher, x, engine="onnx-ad", **options)
        assert not result.report.passes[0].warnings
        assert not np.array_equal(_init(result.model, "W0"), inits["W0"])


@needs_engine
def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_mlp(), src)
    # no data
    assert cli.main(["optimize", str(src), "-o", str(out), "--pass", "distill", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill needs training data" in err[0]
    # teacher and student disagree on outputs
    other = _model(
        [helper.make_node("Gemm", ["x", "W"], ["other"], name="fc")],
        {"W": np.ones((8, 4), np.float32)},
        [_vi("x", ["N", 8])],
        [_vi("other", ["N", 4])],
    )
    onnx.save(other, tmp_path / "teacher.onnx")
    np.savez(tmp_path / "d.npz", x=_inputs(16))
    argv = ["optimize", str(src), "-o", str(out), "--calib", str(tmp_path / "d.npz"), "-q"]
    assert cli.main([*argv, "--pass", f"distill:teacher={tmp_path / 'teacher.onnx'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher/student output mismatch" in err[0] and "'logits'" in err[0]
    assert cli.main([*argv, "--pass", "distill:losses=nope=kd"]) == 2
    assert "'nope' is not an output of the student" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(DataError, match="at least 2 samples"):
        _distill(_mlp(), _mlp(), _inputs(1))


@needs_engine
def test_cli_prune_then_distill_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out, report = tmp_path / "cnn.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(_cnn(), src)
    np.savez(tmp_path / "calib.npz", x=_cnn_data(128))
    rc = cli.main(
        [
            "optimize",
            str(src),
            "-o",
            str(out),
            "--target",
            "onnxruntime-cpu",
            "--pass",
            "prune-channels:ratio=0.5,round_to=1",
            "--pass",
            "distill:epochs=4,lr=0.01,threads=1",
            "--calib",
            str(tmp_path / "calib.npz"),
            "--report",
            str(report),
            "-q",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(report.read_text())
    distill = next(p for p in doc["passes"] if p["name"] == "distill")
    summary = next(d for d in distill["details"] if d.get("kind") == "summary")
    assert distill["modified"] and summary["fidelity_after"] > summary["fidelity_before"]
    assert summary["heldout_loss_after"] < 0.5 * summary["heldout_loss_before"]
    pruned = (
        Pipeline(["prune-channels:ratio=0.5,round_to=1"], target="onnxruntime-cpu")
        .run(str(src))
        .model
    )
    assert _init(onnx.load(out), "c2.w").shape == _init(pruned, "c2.w").shape == (4, 4, 3, 3)


@needs_ort
def test_if_on_the_gradient_path_is_named_not_a_crash() -> None:
    """ORT training aborts the process on If: the pass names it before compiling, and the
    engine's child process turns the abort into one error line when asked anyway."""
    from onnxslim_edge.passes.distill.engine import OptimizerSpec
    from onnxslim_edge.passes.distill.ort_engine import OrtTrainingEngine

    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["t"])], "then", [], [_vi("t", ["N", 3])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["e"])], "else", [], [_vi("e", ["N", 3])]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
        helper.make_node("ReduceSum", ["x"], ["s"], name="rs", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    inits = {"W": w, "zero": np.array(0.0, np.float32)}
    model = _model(nodes, inits, [_vi("x", ["N", 4])], [_vi("y", ["N", 3])])
    with pytest.raises(UnsupportedError, match=r"no gradient through If 'branch'"):
        _distill(model, model, _inputs(16, (4,)))
    loss = build_loss_model(model, LossSpec(outputs=(OutputLoss("y", "mse"),)), {"y": ["N", 3]})
    with (
        tempfile.TemporaryDirectory() as tmp,
        pytest.raises(
            UnsupportedError, match=r"^ONNX Runtime training crashed \(SIGABRT\).*the graph has If"
        ),
    ):
        OrtTrainingEngine().compile(
            loss, trainable=["W"], optimizer=OptimizerSpec(), workdir=Path(tmp)
        )


@needs_ort
def test_the_artifact_child_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from onnxslim_edge.passes.distill.ort_engine import import_training_without_torch\n"
        "artifacts, onnxblock = import_training_without_torch()\n"
        "assert callable(artifacts.generate_artifacts) and 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)


@needs_engine
def test_distillation_docs_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "distillation.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "distillation.md", "exec"), {"__name__": "docs_example"})


@needs_engine
def test_validation_data_decides_and_a_worse_model_is_refused(tmp_path: Path) -> None:
    """With `validation`, the best epoch and the never-worse check are scored on that data,
    not on a split of the training data. Here training improves the training split, but at
    x = 0 the student (only its first layer perturbed) already equals the teacher, so any
    trained model is worse on that validation set and the input comes back unchanged."""
    teacher, student, x = _mlp(), _mlp(seed=3, noise=0.5), _inputs(128)
    options = dict(epochs=3, lr=0.05, patience=0, losses=("logits=kd",))
    plain = _distill(student, teacher, x, **options).report.passes[0]
    assert plain.modified and _summary(plain)["scored_on"] == "holdout"
    val = tmp_path / "val.npz"
    np.savez(val, x=np.zeros((16, 8), np.float32))
    result = _distill(student, teacher, x, validation=str(val), **options)
    report = result.report.passes[0]
    summary = _summary(report)
    assert summary["scored_on"] == "validation" and summary["scored_samples"] == 16
    assert summary["fidelity_before"] == 1.0 and summary["heldout_loss_before"] < 1e-6
    assert summary["best_epoch"] == 0 and not report.modified
    assert any("kept the input model" in w for w in report.warnings)
    for name in ("W1", "b1", "W2", "b2"):
        np.testing.assert_array_equal(_init(result.model, name), _init(student, name))
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 5), np.float32))
    with pytest.raises(DataError, match=r"bad.npz: array 'x' has shape \(4, 5\)"):
        _distill(student, teacher, x, validation=str(tmp_path / "bad.npz"), **options)
