"""Tests for onnxslim_edge.verify: metrics against hand-computed values, verdicts, reports."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.verify import compare


def _graph_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _affine(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """y = x @ w + b, x: (N, in)."""
    return _graph_model(
        [helper.make_node("MatMul", ["x", "W"], ["t"]), helper.make_node("Add", ["t", "B"], ["y"])],
        [_vi("x", ("N", w.shape[0]))],
        [_vi("y", ("N", w.shape[1]))],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )


W = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
B = np.full(3, 10.0, np.float32)  # outputs near 10: relative errors well defined


def test_identical_models_pass_exactly():
    model = _affine(W, B)
    result = compare(model, model)
    assert result.passed and result.synthetic and result.samples == 4
    m = result.outputs["y"]
    assert m.max_abs_error == 0.0 and m.max_rel_error == 0.0 and m.mean_abs_error == 0.0
    assert m.cosine == 1.0 and m.sqnr_db == math.inf
    assert m.top1_agreement == 1.0 and m.kl_divergence == 0.0
    assert m.elements == 12 and m.passed
    doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert doc["outputs"]["y"]["sqnr_db"] is None  # infinite SQNR is written as null
    assert doc["passed"] is True and doc["synthetic"] is True and doc["samples"] == 4
    assert result.summary().startswith("all 1 output(s) match on 4 synthetic sample(s)")


def test_perturbed_initializer_fails_tight_passes_loose(tmp_path):
    ref = _affine(W, B)
    cand = _affine(W, B + np.float32(1e-3))
    data = [{"x": np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)}]
    tight = compare(ref, cand, data, rtol=1e-5, atol=1e-5, batch_size=4)
    assert not tight.passed and tight.samples == 6 and not tight.synthetic
    m = tight.outputs["y"]
    assert m.max_abs_error == pytest.approx(1e-3, abs=2e-6)
    assert m.mean_abs_error == pytest.approx(1e-3, abs=2e-6)
    assert tight.summary().startswith(
        "output 'y': max abs err 0.001 > tolerance (rtol 1e-05, atol 1e-05)"
    )
    loose = compare(ref, cand, data, rtol=1e-1, atol=0)
    assert loose.passed and loose.outputs["y"].max_abs_error == m.max_abs_error
    # models given as paths work the same
    onnx.save(ref, tmp_path / "ref.onnx")
    onnx.save(cand, tmp_path / "cand.onnx")
    by_path = compare(tmp_path / "ref.onnx", str(tmp_path / "cand.onnx"), data)
    assert by_path.outputs["y"].max_abs_error == m.max_abs_error


def _scaled(offset: float) -> onnx.ModelProto:
    """y = 1000 x + offset."""
    return _graph_model(
        [helper.make_node("Mul", ["x", "K"], ["t"]), helper.make_node("Add", ["t", "C"], ["y"])],
        [_vi("x", ("N", 1))],
        [_vi("y", ("N", 1))],
        [
            numpy_helper.from_array(np.array(1000, np.float32), "K"),
            numpy_helper.from_array(np.array(offset, np.float32), "C"),
        ],
    )


def test_range_mode_scales_atol_by_the_whole_outputs_range():
    ref, cand = _scaled(0.0), _scaled(0.01)
    # the largest |r| (3000) comes in the last batch; the first batch alone has range 1
    data = [{"x": np.array([[0.001]], np.float32)}, {"x": np.array([[3.0]], np.float32)}]
    absolute = compare(ref, cand, data, rtol=0, atol=1e-3)
    assert not absolute.passed
    assert absolute.outputs["y"].range == 3000.0
    ranged = compare(ref, cand, data, rtol=0, atol=1e-5, atol_mode="range")  # 0.03 allowed
    assert ranged.passed
    assert not compare(ref, cand, data, rtol=0, atol=1e-6, atol_mode="range").passed  # 0.003
    assert (
        "atol 1e-06 x range 3e+03"
        in compare(ref, cand, data, rtol=0, atol=1e-6, atol_mode="range").summary()
    )
    with pytest.raises(ConfigError, match="atol_mode must be absolute or range"):
        compare(ref, cand, data, atol_mode="relative")


def _classifier(weight: np.ndarray) -> onnx.ModelProto:
    return _graph_model(
        [helper.make_node("Gemm", ["x", "W"], ["logits"], transB=1)],
        [_vi("x", ("N", 4))],
        [_vi("logits", ("N", 4))],
        [numpy_helper.from_array(weight.astype(np.float32), "W")],
    )


def test_top1_agreement_and_kl_on_a_crafted_classifier():
    eye = np.eye(4, dtype=np.float32)
    swapped = eye[[1, 0, 2, 3]]  # the candidate swaps the logits of classes 0 and 1
    winners = [0, 1, 2, 3, 2, 3, 2, 3, 0, 3]  # 3 samples win class 0 or 1: they flip
    x = np.full((10, 4), 0.1, np.float32)
    x[np.arange(10), winners] = 2.0
    x[np.arange(10), 3 - np.array(winners)] += 0.5  # no ties
    result = compare(_classifier(eye), _classifier(swapped), [{"x": x}], batch_size=3)
    m = result.outputs["logits"]
    assert m.top1_agreement == pytest.approx(0.7, abs=0)
    r = x.astype(np.float64)
    c = r[:, [1, 0, 2, 3]]
    log_p = r - np.log(np.exp(r).sum(1, keepdims=True))
    log_q = c - np.log(np.exp(c).sum(1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(1).mean()
    assert m.kl_divergence == pytest.approx(kl, rel=1e-9)
    assert result.check_floors({"min_top1_agreement": 0.7}) == []
    assert result.check_floors({"min_top1_agreement": 0.71}) == [
        "output 'logits': top-1 agreement 0.7 < floor 0.71"
    ]


def test_metrics_match_hand_computed_values():
    noise = np.array([0.01, -0.02, 0.03], np.float32)
    ident = _graph_model(
        [helper.make_node("Identity", ["x"], ["y"])], [_vi("x", ("N", 3))], [_vi("y", ("N", 3))]
    )
    noisy = _graph_model(
        [helper.make_node("Add", ["x", "E"], ["y"])],
        [_vi("x", ("N", 3))],
        [_vi("y", ("N", 3))],
        [numpy_helper.from_array(noise, "E")],
    )
    x = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    result = compare(ident, noisy, [{"x": x}], batch_size=2)
    m = result.outputs["y"]
    r = x.astype(np.float64)
    c = (x + noise).astype(np.float64)  # the same float32 sum ONNX Runtime computes
    e = c - r
    assert m.sqnr_db == pytest.approx(10 * np.log10((r**2).sum() / (e**2).sum()), rel=1e-12)
    assert m.cosine == pytest.approx(
        (r * c).sum() / np.sqrt((r**2).sum() * (c**2).sum()), rel=1e-12
    )
    assert m.max_abs_error == pytest.approx(np.abs(e).max(), rel=1e-12)
    assert m.mean_abs_error == pytest.approx(np.abs(e).mean(), rel=1e-12)
    assert m.max_rel_error == pytest.approx((np.abs(e) / np.abs(r)).max(), rel=1e-12)
    assert m.range == pytest.approx(np.abs(r).max(), rel=0)
    assert m.top1_agreement == pytest.approx((r.argmax(1) == c.argmax(1)).mean())
    assert result.samples == 5 and m.elements == 15
    table = result.to_table()
    assert table.splitlines()[0].split() == [
        "output",
        "shape",
        "max",
        "abs",
        "max",
        "rel",
        "mean",
        "abs",
        "cosine",
        "SQNR",
        "dB",
        "top-1",
        "KL",
        "range",
        "ok",
    ]
    assert table.splitlines()[2].startswith("y ") and table.splitlines()[2].endswith("NO")
    assert f"{m.sqnr_db:.4g}" in table


def test_missing_output_and_shape_change_fail_with_messages():
    ref = _graph_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])],
        [_vi("x", ("N", 4))],
        [_vi("y", ("N", 4)), _vi("z", ("N", 4))],
    )
    shape = numpy_helper.from_array(np.array([-1, 2, 2], np.int64), "S")
    cand = _graph_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "S"], ["z"])],
        [_vi("x", ("N", 4))],
        [_vi("z", ("N", 2, 2))],
        [shape],
    )
    result = compare(ref, cand)
    assert not result.passed
    assert result.outputs["y"].error == "output 'y' is missing from the candidate"
    assert (
        result.outputs["z"].error
        == "output 'z': shape (1, 4) in the reference but (1, 2, 2) in the candidate"
    )
    summary = result.summary()
    assert "output 'y' is missing from the candidate" in summary and "output 'z': shape" in summary
    assert "\n" not in summary
    assert "output 'y' is missing from the candidate" in result.check_floors({"min_cosine": 0.5})
    doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert doc["passed"] is False and doc["outputs"]["y"]["error"].startswith("output 'y'")
    only_z = compare(ref, ref, output_names=["z"])
    assert list(only_z.outputs) == ["z"] and only_z.passed
    with pytest.raises(
        ConfigError, match="unknown output\\(s\\) 'nope'; the reference's outputs: y, z"
    ):
        compare(ref, ref, output_names=["nope"])


def test_candidate_onnx_runtime_cannot_run_gives_failed_result():
    ref = _graph_model(
        [helper.make_node("Relu", ["x"], ["y"])], [_vi("x", ("N", 4))], [_vi("y", ("N", 4))]
    )
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")],
        "g",
        [_vi("x", ("N", 4))],
        [_vi("y", ("N", 4))],
    )
    cand = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    result = compare(ref, cand)
    assert not result.passed
    assert result.messages and result.messages[0].startswith(
        "candidate: ONNX Runtime cannot load the model"
    )
    assert result.summary().startswith("candidate: ONNX Runtime cannot load the model")


def test_nan_and_inf_handling():
    ref = _graph_model(
        [helper.make_node("Log", ["x"], ["y"])], [_vi("x", ("N", 3))], [_vi("y", ("N", 3))]
    )
    same = _graph_model(
        [helper.make_node("Log", ["x"], ["s"]), helper.make_node("Identity", ["s"], ["y"])],
        [_vi("x", ("N", 3))],
        [_vi("y", ("N", 3))],
    )
    fixed = _graph_model(
        [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Log", ["a"], ["y"])],
        [_vi("x", ("N", 3))],
        [_vi("y", ("N", 3))],
    )
    # finite inputs (data readers refuse NaN/inf); Log gives NaN at -1 and -9, -inf at 0
    x = np.array([[4.0, -1.0, 0.0], [-9.0, 1.0, 0.25]], np.float32)
    both_nan = compare(ref, same, [{"x": x}], batch_size=2)
    assert both_nan.passed  # NaN where both are NaN, inf where both are inf
    assert both_nan.outputs["y"].max_abs_error == 0.0 and both_nan.outputs["y"].elements == 6
    one_nan = compare(ref, fixed, [{"x": x}])
    assert not one_nan.passed
    assert one_nan.outputs["y"].nonfinite_mismatches == 2
    assert one_nan.outputs["y"].max_abs_error == 0.0  # the finite elements agree
    assert one_nan.summary().startswith("output 'y': 2 NaN/inf mismatch(es)")


def test_check_floors():
    ref = _affine(W, B)
    cand = _affine(W, B + np.float32(1e-2))
    result = compare(ref, cand, max_samples=2)
    assert result.samples == 2
    m = result.outputs["y"]
    assert result.check_floors({"min_cosine": 0.99, "max_abs_error": 0.02, "min_sqnr_db": 40}) == []
    misses = result.check_floors(
        {"min_cosine": 1.0, "max_abs_error": 1e-3, "min_sqnr_db": 80, "min_top1_agreement": 1.0}
    )
    assert misses == [
        f"output 'y': cosine {m.cosine:.6g} < floor 1",
        f"output 'y': max abs error {m.max_abs_error:.6g} > limit 0.001",
        f"output 'y': SQNR {m.sqnr_db:.6g} < floor 80",
    ]
    with pytest.raises(
        ConfigError, match="unknown floor\\(s\\) min_psnr; valid: min_top1_agreement"
    ):
        result.check_floors({"min_psnr": 1})


def test_real_data_file_and_old_ir_runtime(tmp_path):
    ref = _affine(W, B)
    ref.ir_version = onnx.IR_VERSION  # newer than ONNX Runtime 1.19 accepts; lowered on the way
    x = np.random.default_rng(3).standard_normal((9, 4))
    np.savez(tmp_path / "calib.npz", x=x)
    result = compare(ref, ref, tmp_path / "calib.npz", batch_size=4, max_samples=7)
    assert result.passed and result.samples == 7 and not result.synthetic
    assert "calib.npz" in result.data


def test_imports_stay_lazy_and_compare_does_not_import_torch():
    import importlib.metadata
    import subprocess
    import sys

    training = any(
        d.metadata["Name"] == "onnxruntime-training-cpu" for d in importlib.metadata.distributions()
    )
    script = """
import sys
import onnxslim_edge.data, onnxslim_edge.verify
heavy = [m for m in ("onnxruntime", "polygraphy", "torch", "PIL") if m in sys.modules]
assert not heavy, heavy
if not TRAINING:  # onnxruntime-training's own import pulls in torch
    from onnx import TensorProto, helper
    vi = helper.make_tensor_value_info
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [vi("x", TensorProto.FLOAT, ["N", 2])], [vi("y", TensorProto.FLOAT, ["N", 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert onnxslim_edge.verify.compare(m, m).passed
    assert "onnxruntime" in sys.modules and "torch" not in sys.modules
print("ok")
""".replace("TRAINING", str(training))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- Evaluator


def _dynamic_identity(op: str = "Identity") -> onnx.ModelProto:
    """y = op(x) for x of shape (N, 3, W): batches of different widths."""
    model = _graph_model(
        [helper.make_node(op, ["x"], ["y"])], [_vi("x", ("N", 3, "W"))], [_vi("y", ("N", 3, "W"))]
    )
    model.ir_version = 7
    return model


def _widths(n: int = 5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [
        {"x": rng.standard_normal((1, 3, 4 + 2 * (i % 3))).astype(np.float32)} for i in range(n)
    ]


def test_evaluator_cached_and_streamed_agree_over_batches_of_different_shapes():
    from onnxslim_edge.verify import Evaluator

    ref, cand = _dynamic_identity(), _dynamic_identity("Sin")
    data = _widths()
    cached = Evaluator(ref, data)
    streamed = Evaluator(ref, data, cache=False)
    first, again, flat = cached.score(cand), cached.score(cand), streamed.score(cand)
    assert first.to_dict() == again.to_dict() == flat.to_dict()
    assert first.to_dict() == compare(ref, cand, data).to_dict()
    r = np.concatenate([f["x"].ravel() for f in data]).astype(np.float64)
    c = np.sin(np.concatenate([f["x"].ravel() for f in data])).astype(np.float64)
    m = first.outputs["y"]
    assert m.sqnr_db == pytest.approx(10 * np.log10((r @ r) / ((r - c) @ (r - c))), rel=1e-9)
    assert m.cosine == pytest.approx(r @ c / np.sqrt((r @ r) * (c @ c)), rel=1e-9)
    assert first.sqnr_db == m.sqnr_db and first.samples == 5 and cached.samples == 5
    # max_samples bounds what is measured (and, cached, what is kept)
    three = Evaluator(ref, data, max_samples=3)
    assert three.samples == 3 and three.score(cand).samples == 3


def test_evaluator_task_metric_is_averaged_over_samples():
    from onnxslim_edge.verify import Evaluator

    ref, cand = _classifier(np.eye(4)), _classifier(np.eye(4)[[1, 0, 2, 3]])
    x = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 2]] + 0.1
    seen = []

    def agree(feed, r, c):
        seen.append(len(feed["x"]))
        return {"task_top1": float((r["logits"].argmax(1) == c["logits"].argmax(1)).mean())}

    result = Evaluator(ref, [{"x": x}], batch_size=2, task=agree).score(cand)
    assert seen == [2, 2, 1]  # batches of 2, 2, 1: a mean of means would say 1/3
    assert result.task == {"task_top1": pytest.approx(3 / 5)}
    assert result.task["task_top1"] == pytest.approx(result.outputs["logits"].top1_agreement)
    assert result.worst_metrics()["task_top1"] == pytest.approx(0.6)


def test_nan_in_the_candidate_where_the_reference_is_finite_is_a_failure():
    """The one rule for non-finite values: a NaN/inf mismatch fails the output, misses
    every floor (also floors whose metric the output does not have), counts as a top-1
    disagreement and ranks below every finite candidate."""
    from onnxslim_edge.verify import FLOOR_KEYS, Evaluator

    ref = _graph_model(
        [helper.make_node("Identity", ["x"], ["y"])], [_vi("x", ("N", 3))], [_vi("y", ("N", 3))]
    )
    # y = x / (x - 5): NaN nowhere in the reference; the candidate divides 0 by 0 at x = 5
    cand = _graph_model(
        [
            helper.make_node("Sub", ["x", "F"], ["d"]),
            helper.make_node("Div", ["d", "d"], ["q"]),
            helper.make_node("Mul", ["x", "q"], ["y"]),
        ],
        [_vi("x", ("N", 3))],
        [_vi("y", ("N", 3))],
        [numpy_helper.from_array(np.array(5.0, np.float32), "F")],
    )
    x = np.array([[0.0, 5.0, 1.0], [3.0, 1.0, 2.0]], np.float32)  # row 0's argmax is the NaN
    evaluator = Evaluator(ref, [{"x": x}])
    bad, good = evaluator.score(cand), evaluator.score(ref)
    m = bad.outputs["y"]
    assert m.nonfinite_mismatches == 1 and not m.passed and bad.failed and not good.failed
    assert m.max_abs_error == 0.0 and m.cosine == pytest.approx(1.0)  # the finite elements
    assert m.top1_agreement == 0.5  # the row holding the NaN disagrees
    line = "output 'y': 1 NaN/inf mismatch(es)"
    assert bad.misses({"min_cosine": -1.0}) == [line]
    assert bad.misses({"max_abs_error": 1.0}) == [line]
    assert good.misses({"min_cosine": 1.0, "min_sqnr_db": 200}) == []
    assert bad.misses({}) == []
    # a 3-D output has no top-1: the floor used to be skipped with the NaN along with it
    ref3, cand3 = _dynamic_identity(), _dynamic_identity("Log")
    feeds = [{"x": np.abs(_widths(1)[0]["x"]) + 1.0}]
    feeds[0]["x"][0, 0, 0] = -1.0  # log(-1) = NaN
    three = Evaluator(ref3, feeds).score(cand3)
    assert three.outputs["y"].top1_agreement is None
    assert three.misses({"min_top1_agreement": 0.5}) == ["output 'y': 1 NaN/inf mismatch(es)"]
    assert three.check_floors({"min_top1_agreement": 0.5}) == three.misses(
        {"min_top1_agreement": 0.5}
    )
    assert sorted([good, bad], key=lambda f: f.rank_key("sqnr_db"))[0] is bad
    assert sorted([good, bad], key=lambda f: f.rank_key("kl_divergence"))[0] is bad
    assert set(FLOOR_KEYS) == {"min_top1_agreement", "min_cosine", "min_sqnr_db", "max_abs_error"}
    with pytest.raises(ConfigError, match="unknown floor\\(s\\) min_psnr; valid: min_top1"):
        bad.misses({"min_psnr": 1.0})
