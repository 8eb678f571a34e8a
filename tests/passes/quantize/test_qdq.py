"""quantize: Q/DQ insertion with calibrated scales, per target.

Scales and int8 weights are checked against values computed by hand; quantized models
run in ONNX Runtime and are compared with the float model (cosine, top-1 accuracy);
every TensorRT-target output passes `lint_qdq` without errors.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from fixtures import corpus, torch_models
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.analysis import model_cost
from onnxslim_edge.errors import ConfigError, DataError
from onnxslim_edge.passes.quantize import lint_qdq
from onnxslim_edge.passes.quantize.numerics import dequantize, quantize_weight, weight_axis
from onnxslim_edge.passes.quantize.qdq import Quantize, QuantizeConfig
from onnxslim_edge.pipeline import Context, Pipeline
from onnxslim_edge.runtime import make_session

F = TensorProto.FLOAT


# --------------------------------------------------------------------------- helpers


def _model(nodes, inputs, outputs, inits=(), opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    inferred = onnx.shape_inference.infer_shapes(model)
    for out, known in zip(model.graph.output, inferred.graph.output):
        if not out.type.tensor_type.HasField("shape"):
            out.CopyFrom(known)  # outputs given without a shape get the inferred one
    return model


def _run(model, feeds):
    return make_session(model).run(None, feeds)


def _quantize(model, data, target="tensorrt", **options):
    result = Pipeline([Quantize(**options)], target=target).run(
        model, Context(data=data, target=target)
    )
    return result.model, result.report.passes[0]


def _nodes(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _errors(model):
    return [v for v in lint_qdq(model) if v.severity == "error"]


def _weight_dq(model, node_op):
    """(int8 values, scales, axis) of the weight DequantizeLinear feeding the `node_op`."""
    inits = _inits(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    node = _nodes(model, node_op)[0]
    dq = producer[node.input[1]]
    assert dq.op_type == "DequantizeLinear"
    axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
    return inits[dq.input[0]], inits[dq.input[1]], axis


# --------------------------------------------------------------------------- numerics


def test_weight_round_trip_per_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w[2] = 0.0  # an all-zero channel gets scale 1 and stays zero
    q, scale = quantize_weight(w, 0)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    expected = np.abs(w).reshape(4, -1).max(axis=1) / 127
    expected[2] = 1.0
    np.testing.assert_allclose(scale, expected, rtol=1e-6)
    for c in (0, 1, 3):  # the largest magnitude of each channel lands on +-127
        assert np.abs(q[c]).max() == 127
    back = dequantize(q, scale, 0, axis=0)
    assert np.all(np.abs(back - w) <= scale.reshape(-1, 1, 1, 1) / 2 + 1e-7)
    assert np.all(back[2] == 0)


def test_weight_round_trip_per_tensor_and_ort_dequantize():
    w = np.array([[0.5, -1.27], [0.01, 1.0]], np.float32)
    q, scale = quantize_weight(w, None)
    assert scale.shape == () and float(scale) == pytest.approx(0.01)
    np.testing.assert_array_equal(q, [[50, -127], [1, 100]])
    # ONNX Runtime's DequantizeLinear gives the same values as ours
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)
    qc, sc = quantize_weight(w, 1)
    model = _model(
        [node],
        [],
        [helper.make_tensor_value_info("y", F, [2, 2])],
        [
            numpy_helper.from_array(qc, "q"),
            numpy_helper.from_array(sc, "s"),
            numpy_helper.from_array(np.zeros(2, np.int8), "z"),
        ],
    )
    np.testing.assert_array_equal(_run(model, {})[0], dequantize(qc, sc, 0, axis=1))


@pytest.mark.parametrize(
    ("op", "attrs", "rank", "axis"),
    [
        ("Conv", {}, 4, 0),
        ("ConvTranspose", {"group": 2}, 4, 1),
        ("Gemm", {"transB": 1}, 2, 0),
        ("Gemm", {}, 2, 1),
        ("MatMul", {}, 2, 1),
        ("MatMul", {}, 3, 2),
        ("MatMul", {}, 1, None),
    ],
)
def test_weight_axis(op, attrs, rank, axis):
    assert weight_axis(op, attrs, rank) == axis


# --------------------------------------------------------------------------- hand-computed


def _tiny_conv():
    w = np.array(
        [[[[1.0, -0.5], [0.25, 0.0]]], [[[0.0, 0.1], [-0.2, 0.05]]]], np.float32
    )  # (2, 1, 2, 2)
    b = np.array([0.5, -0.25], np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")
    return (
        _model(
            [node],
            [helper.make_tensor_value_info("x", F, ["n", 1, 3, 3])],
            [helper.make_tensor_value_info("y", F, ["n", 2, 2, 2])],
            [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
        ),
        w,
        b,
    )


def _known_activations():
    x = np.linspace(-1.0, 3.0, 18, dtype=np.float32).reshape(2, 1, 3, 3)  # min -1, max 3
    return [{"x": x[:1]}, {"x": x[1:]}]


def test_scales_by_hand_tensorrt():
    model, _, b = _tiny_conv()
    q, report = _quantize(model, _known_activations(), method="minmax")
    inits = _inits(q)
    (qnode,) = _nodes(q, "QuantizeLinear")
    assert qnode.input[0] == "x"
    assert inits[qnode.input[1]] == np.float32(3.0 / 127)  # amax = max |x| = 3
    assert inits[qnode.input[2]].dtype == np.int8 and inits[qnode.input[2]] == 0
    wq, ws, axis = _weight_dq(q, "Conv")
    assert axis == 0
    np.testing.assert_allclose(ws, [1.0 / 127, 0.2 / 127], rtol=1e-6)
    np.testing.assert_array_equal(wq[0, 0], [[127, -64], [32, 0]])  # round(0.5*127)=64
    np.testing.assert_array_equal(wq[1, 0], [[0, 64], [-127, 32]])
    conv = _nodes(q, "Conv")[0]
    assert conv.input[2] == "b"  # the bias stays float
    assert not _errors(q)
    detail = report.details[0]
    assert detail["node"] == "conv" and detail["inputs"]["x"]["amax"] == 3.0
    assert detail["inputs"]["x"]["method"] == "minmax"
    assert 40 < detail["inputs"]["x"]["sqnr_db"] < 55  # no clipping: ~47 dB of rounding
    # int8 weights and the Q/DQ'd input reproduce a hand-computed fake-quantized conv
    x = np.concatenate([f["x"] for f in _known_activations()])
    xs = np.float32(3.0 / 127)
    xq = np.clip(np.rint(x / xs), -128, 127) * xs
    fake = _model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])],
        [helper.make_tensor_value_info("x", F, ["n", 1, 3, 3])],
        [helper.make_tensor_value_info("y", F, None)],
        [
            numpy_helper.from_array(dequantize(wq, ws, 0, axis=0).astype(np.float32), "w"),
            numpy_helper.from_array(b, "b"),
        ],
    )
    np.testing.assert_allclose(
        _run(q, {"x": x})[0], _run(fake, {"x": xq.astype(np.float32)})[0], rtol=1e-5, atol=1e-6
    )


def test_scales_by_hand_onnxruntime_uint8():
    model, _, b = _tiny_conv()
    q, _ = _quantize(model, _known_activations(), target="onnxruntime-cpu", method="minmax")
    inits = _inits(q)
    qnodes = {n.input[0]: n for n in _nodes(q, "QuantizeLinear")}
    xq = qnodes["x"]
    scale = np.float32(4.0 / 255)  # [-1, 3] on 255 steps
    assert inits[xq.input[1]] == scale
    assert inits[xq.input[2]].dtype == np.uint8 and inits[xq.input[2]] == 64  # rint(1/scale)
    # ORT layout: the bias is int32 with scale x_scale * w_scale, the output is Q/DQ'd too
    conv = _nodes(q, "Conv")[0]
    producer = {o: n for n in q.graph.node for o in n.output}
    bias_dq = producer[conv.input[2]]
    assert bias_dq.op_type == "DequantizeLinear"
    _, ws, _ = _weight_dq(q, "Conv")
    np.testing.assert_allclose(inits[bias_dq.input[1]], scale * ws, rtol=1e-6)
    np.testing.assert_array_equal(
        inits[bias_dq.input[0]], np.rint(b / (scale * ws)).astype(np.int32)
    )
    assert q.graph.output[0].name == "y" and producer["y"].op_type == "Conv"  # outputs stay float
    x = np.concatenate([f["x"] for f in _known_activations()])
    assert _cosine(_run(q, {"x": x})[0], _run(model, {"x": x})[0]) > 0.999


def test_uint8_range_thresholds_each_sign_alone():
    """onnxruntime-cpu, percentile: the uint8 grid spans [-p(neg), p(pos)], each side's
    own 99.99th percentile. The symmetric |x| percentile would clip the rare, long
    positive side (0.5 % of the values) about 20 % short of its largest values."""
    from onnxslim_edge.passes.quantize.calibrate import TensorStats, amax_percentile, compute_range

    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [helper.make_tensor_value_info("x", F, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", F, None)],
        [w],
    )
    rng = np.random.default_rng(3)
    x = -rng.uniform(0, 1, (4, 1, 100, 100)).astype(np.float32)
    tail = rng.random(x.shape) < 0.005
    x[tail] = rng.exponential(5.0, int(tail.sum())).astype(np.float32)
    q, report = _quantize(model, [{"x": x[i : i + 1]} for i in range(4)], target="onnxruntime-cpu")
    stats = TensorStats()
    stats.update(x)
    lo, hi = compute_range(stats, "percentile")
    assert hi > 1.2 * amax_percentile(stats, 99.99)  # |x|'s percentile clips the tail
    assert -1.0 <= lo < -0.99
    inits = _inits(q)
    xq = next(n for n in _nodes(q, "QuantizeLinear") if n.input[0] == "x")
    scale, zp = float(inits[xq.input[1]]), int(inits[xq.input[2]])
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert zp == round(-lo / scale)
    assert report.details[0]["inputs"]["x"]["amax"] == pytest.approx(hi)


def test_per_tensor_weights_when_asked():
    model, _, _ = _tiny_conv()
    q, _ = _quantize(model, _known_activations(), per_channel=False)
    _, ws, axis = _weight_dq(q, "Conv")
    assert axis is None and ws.shape == () and ws == np.float32(1.0 / 127)


# --------------------------------------------------------------------------- weight axes


def _layer_model(op, opset=13, **attrs):
    rng = np.random.default_rng(1)
    if op == "Conv":
        w, x, inputs = rng.normal(size=(4, 3, 3, 3)), (2, 3, 6, 6), ["x", "w"]
    elif op == "ConvTranspose":
        group = attrs.get("group", 1)
        w, x, inputs = rng.normal(size=(4, 6 // group, 3, 3)), (2, 4, 5, 5), ["x", "w"]
    elif op == "Gemm":
        w = rng.normal(size=(6, 5) if attrs.get("transB") else (5, 6))
        x, inputs = (3, 5), ["x", "w"]
    else:
        w, x, inputs = rng.normal(size=(5, 6)), (2, 3, 5), ["x", "w"]
    node = helper.make_node(op, inputs, ["y"], name="layer", **attrs)
    model = _model(
        [node],
        [helper.make_tensor_value_info("x", F, list(x))],
        [helper.make_tensor_value_info("y", F, None)],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
        opset=opset,
    )
    feeds = [{"x": rng.normal(size=x).astype(np.float32)} for _ in range(3)]
    return model, feeds, w.astype(np.float32)


@pytest.mark.parametrize(
    ("op", "attrs", "axis"),
    [
        ("Conv", {}, 0),
        ("ConvTranspose", {"group": 1}, 1),
        ("ConvTranspose", {"group": 2}, 1),
        ("Gemm", {"transB": 1}, 0),
        ("Gemm", {"transB": 0}, 1),
        ("MatMul", {}, 1),
    ],
)
@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime-cpu"])
def test_weight_axis_per_op(op, attrs, axis, target):
    model, feeds, w = _layer_model(op, **attrs)
    q, report = _quantize(model, feeds, target=target, method="minmax")
    wq, ws, got_axis = _weight_dq(q, op)
    assert got_axis == axis and wq.dtype == np.int8
    others = tuple(i for i in range(w.ndim) if i != axis)
    np.testing.assert_allclose(ws, np.abs(w).max(axis=others) / 127, rtol=1e-6)
    if op == "ConvTranspose" and attrs["group"] == 2:
        assert ws.shape == (3,)  # Cout / group scales, each over both groups
    if target == "tensorrt":
        assert not _errors(q)
    x = feeds[0]["x"]
    assert _cosine(_run(q, {"x": x})[0], _run(model, {"x": x})[0]) > 0.999
    assert report.counters["layers_quantized"] == 1


def test_matmul_of_two_activations_quantizes_both():
    a = helper.make_tensor_value_info("a", F, [2, 4, 8])
    b = helper.make_tensor_value_info("b", F, [2, 8, 4])
    model = _model(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
        [a, b],
        [helper.make_tensor_value_info("y", F, None)],
    )
    rng = np.random.default_rng(0)
    feeds = [
        {"a": rng.normal(size=(2, 4, 8)).astype(np.float32),
         "b": rng.normal(size=(2, 8, 4)).astype(np.float32)}
    ]  # fmt: skip
    q, _ = _quantize(model, feeds)
    assert sorted(n.input[0] for n in _nodes(q, "QuantizeLinear")) == ["a", "b"]
    assert not _errors(q)


def test_old_opset_is_upgraded_for_per_channel_weights():
    model, feeds, _ = _layer_model("Conv", opset=11)
    q, report = _quantize(model, feeds)
    assert report.counters["opset_upgraded"] == 1
    assert {o.version for o in q.opset_import if o.domain in ("", "ai.onnx")} == {13}
    assert _weight_dq(q, "Conv")[2] == 0
    assert not _errors(q)


# --------------------------------------------------------------------------- architectures


ARCHS = ("resnet", "mobilenetv2", "densenet", "unet", "transformer", "mlp")


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_fixtures(arch, torch_model):
    model = onnx.load(torch_model(arch))
    data = [{"x": torch_models.example_input(arch, seed=s)} for s in range(4)]
    x = torch_models.example_input(arch, seed=9)
    ref = _run(model, {"x": x})[0]
    trt, report = _quantize(model, data, method="minmax")
    errors = _errors(trt)
    assert not errors, errors
    assert report.counters["layers_quantized"] >= 2
    assert _cosine(_run(trt, {"x": x})[0], ref) > 0.99
    cost_before, cost_after = model_cost(model), model_cost(trt)
    # the only new parameters: smoothing's vectors (the transformer; a Mul's 1/s, or a
    # LayerNorm's own gamma and beta where the export shared one pair between norms)
    smoothed = next((d["smoothing"] for d in report.details if "smoothing" in d), [])
    assert bool(smoothed) == (arch == "transformer")
    budget = sum(2 * d["channels"] for d in smoothed)
    assert cost_before.params <= cost_after.params <= cost_before.params + budget
    assert _nodes(trt, "DequantizeLinear")
    ort_model, _ = _quantize(model, data, target="onnxruntime-cpu", method="minmax")
    assert _cosine(_run(ort_model, {"x": x})[0], ref) > 0.99


def test_residual_add_quantizes_skip_input_only(torch_model):
    model = onnx.load(torch_model("resnet"))
    data = [{"x": torch_models.example_input("resnet", seed=s)} for s in range(2)]
    q, _ = _quantize(model, data)
    producer = {o: n for n in q.graph.node for o in n.output}
    adds = _nodes(q, "Add")
    assert adds
    for add in adds:
        from_dq = [producer[t].op_type == "DequantizeLinear" for t in add.input]
        assert from_dq.count(True) == 1, add.name


def test_concat_inputs_share_one_scale(torch_model):
    model = onnx.load(torch_model("densenet"))
    data = [{"x": torch_models.example_input("densenet", seed=s)} for s in range(2)]
    _, report = _quantize(model, data)
    methods = [
        (name, info)
        for d in report.details
        if "inputs" in d
        for name, info in d["inputs"].items()
        if info["method"].endswith("+concat")
    ]
    assert len(methods) >= 2
    # a dense block: its input and both Concat outputs get the group's (largest) amax
    amaxes = {round(info["amax"], 6) for _, info in methods}
    assert len(amaxes) <= 2  # two dense blocks, one scale each


def test_model_file_shrinks():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 64, 3, 3)).astype(np.float32)
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", F, [1, 64, 8, 8])],
        [helper.make_tensor_value_info("y", F, None)],
        [numpy_helper.from_array(w, "w")],
    )
    q, _ = _quantize(model, [{"x": rng.normal(size=(1, 64, 8, 8)).astype(np.float32)}])
    before, after = model_cost(model), model_cost(q)
    assert after.params == before.params == w.size
    assert after.size_bytes < 0.27 * before.size_bytes


# --------------------------------------------------------------------------- digits demo


@pytest.fixture(scope="module")
def digits():
    from onnxslim_edge.demo import DIGITS_MODEL, digits_accuracy, load_digits_test

    images, _ = load_digits_test()
    model = onnx.load(DIGITS_MODEL)
    return model, [{"image": images[:64]}], digits_accuracy


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime-cpu"])
def test_digits_accuracy_within_one_point(digits, target):
    model, calib, accuracy = digits
    fp32 = accuracy(model)
    assert fp32 == pytest.approx(0.9933, abs=1e-4)
    result = Pipeline(["fold-batchnorm", "quantize"], target=target).run(
        model, Context(data=calib, target=target)
    )
    q = result.model
    assert accuracy(q) >= fp32 - 0.01
    if target == "tensorrt":
        assert not _errors(q)
    else:  # the ORT layout: uint8 activations, int32 biases
        dtypes = {_inits(q)[n.input[2]].dtype for n in _nodes(q, "QuantizeLinear")}
        assert dtypes == {np.dtype(np.uint8)}


def test_cli_end_to_end(digits, tmp_path):
    from onnxslim_edge.cli import main

    model, calib, accuracy = digits
    src, out, npz = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "data.npz"
    onnx.save(model, src)
    np.savez(npz, image=calib[0]["image"])
    report = tmp_path / "report.json"
    argv = ["optimize", str(src), "-o", str(out), "--pass", "quantize:method=minmax"]
    code = main([*argv, "--calib", str(npz), "--report", str(report), "--quiet"])
    assert code == 0 and out.is_file()
    q = onnx.load(out)
    assert _nodes(q, "QuantizeLinear") and accuracy(q) >= accuracy(model) - 0.01
    passes = json.loads(report.read_text())["passes"]
    assert (
        passes[0]["name"] == "quantize" and passes[0]["counters"]["layers_quantized"] == 7
    )  # 6 Conv + Gemm


# --------------------------------------------------------------------------- control


def _mlp3():
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    nodes[-1].output[0] = "y"
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["n", 8])],
        [helper.make_tensor_value_info("y", F, None)],
        inits,
    )
    return model, [{"x": rng.normal(size=(16, 8)).astype(np.float32)}]


def _float_layers(model):
    producer = {o: n for n in model.graph.node for o in n.output}
    return sorted(
        n.name
        for n in _nodes(model, "MatMul")
        if n.input[1] not in producer or producer[n.input[1]].op_type != "DequantizeLinear"
    )


@pytest.mark.parametrize(
    ("options", "floating", "reason"),
    [
        ({"exclude_nodes": ("fc1",)}, ["fc1"], "excluded by name pattern 'fc1'"),
        ({"exclude_nodes": ("fc[02]",)}, ["fc0", "fc2"], "excluded by name pattern 'fc[02]'"),
        ({"exclude_ops": ("MatMul",)}, None, "excluded by op type MatMul"),
        ({"keep_first": True}, ["fc0"], "kept in float: first layer (keep_first)"),
        ({"keep_last": True}, ["fc2"], "kept in float: last layer (keep_last)"),
        ({"keep_first": True, "keep_last": True}, ["fc0", "fc2"], None),
    ],
)
def test_exclusions(options, floating, reason):
    model, data = _mlp3()
    q, report = _quantize(model, data, **options)
    if floating is None:  # nothing left to quantize: the model is untouched
        assert not report.modified and report.warnings == ["nothing to quantize"]
        assert {s.reason for s in report.skips} == {reason}
        return
    assert _float_layers(q) == floating
    if reason is not None:
        assert {s.node for s in report.skips if s.reason == reason} == set(floating)
    assert not _errors(q)


def test_calibration_cache_and_overrides(tmp_path):
    model, data = _mlp3()
    cache = tmp_path / "calib.json"
    _quantize(model, data, method="minmax", calibration_cache=str(cache))
    entries = json.loads(cache.read_text())
    assert entries["x"]["amax"] == pytest.approx(float(np.abs(data[0]["x"]).max()))
    entries["x"]["amax"] = 12.7  # edited by hand: reused instead of calibrating
    cache.write_text(json.dumps(entries))
    q, _ = _quantize(model, data, method="minmax", calibration_cache=str(cache))
    scales = {n.input[0]: _inits(q)[n.input[1]] for n in _nodes(q, "QuantizeLinear")}
    assert scales["x"] == np.float32(0.1)
    # The override clips r0 (output cosine 0.93): the fidelity guard would keep a layer
    # in float (its own test: test_guard_catches_a_bad_override); off, it is used as given.
    q2, _ = _quantize(model, data, method="minmax", overrides=("r0=2.54",), fidelity_guard=False)
    scales = {n.input[0]: _inits(q2)[n.input[1]] for n in _nodes(q2, "QuantizeLinear")}
    assert scales["r0"] == np.float32(0.02)


def test_needs_data_and_valid_config():
    model, _ = _mlp3()
    with pytest.raises(DataError, match=r"quantize needs calibration data \(--calib\)"):
        Pipeline([Quantize()]).run(model)
    with pytest.raises(ConfigError, match="overrides"):
        QuantizeConfig(overrides=("x",))
    with pytest.raises(ConfigError, match="bad regex"):
        QuantizeConfig(exclude_nodes=("fc[",))
    with pytest.raises(ConfigError, match="method"):
        Quantize(method="kl")
    with pytest.raises(ConfigError, match="tensorrt needs int8"):
        _quantize(model, [{"x": np.ones((1, 8), np.float32)}], activation_dtype="uint8")


# --------------------------------------------------------------------------- corpus


@pytest.mark.parametrize("case", corpus.corpus_cases(("light",)), ids=lambda c: c.name)
def test_light_corpus(case):
    """Old exports (opset 9) whose weights are built by ConstantOfShape at run time: every
    weight op is skipped with its reason and no Q/DQ is added; whatever the pipeline
    exports still runs in ONNX Runtime."""
    model = case.load_model()
    sets = case.data_sets()
    feeds = sets[0].inputs if sets else corpus.random_inputs(model)
    result = Pipeline([Quantize()], validate="none").run(model, Context(data=[feeds]))
    report = result.report.passes[0]
    weight_ops = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    if not report.counters.get("layers_quantized"):
        assert {s.node for s in report.skips} == {n.name or n.op_type for n in weight_ops}
        assert {s.reason for s in report.skips} <= {
            "weight is computed at run time (ConstantOfShape)",
            "weight is not a constant",
            "opset 9 has no QuantizeLinear (needs 10)",  # the opset converter failed (warned)
        }
        assert not _nodes(result.model, "QuantizeLinear")
        if not report.modified:
            return
    out = make_session(result.model).run(None, feeds)
    assert all(np.isfinite(o).all() for o in out)


_OTHER_KINDS = ("simple", "pytorch-converted", "pytorch-operator")


@pytest.mark.parametrize("case", corpus.corpus_cases(_OTHER_KINDS), ids=lambda c: c.id)
def test_rest_of_the_corpus_quantizes_or_skips_cleanly(case):
    """Every other corpus model ONNX Runtime runs: quantized (lint-clean for TensorRT) or
    left alone with reasons, never broken. Calibrated on the case's own inputs."""
    from onnxslim_edge.analysis.qdq_lint import lint_qdq
    from onnxslim_edge.errors import UnsupportedError

    if case.skip_reason():
        pytest.skip(case.skip_reason())
    feeds, _ = case.original_run()
    try:
        result = Pipeline(["cleanup", Quantize()], validate="none").run(
            case.load_model(), Context(data=[feeds])
        )
    except UnsupportedError as exc:  # refused as a whole, with the reason: clean
        assert str(exc)
        return
    report = result.report.passes[-1]
    if report.counters.get("layers_quantized"):
        assert [v for v in lint_qdq(result.model) if v.severity == "error"] == []
    else:
        assert not _nodes(result.model, "QuantizeLinear")
    out = make_session(result.model).run(None, feeds)
    assert len(out) == len(case.load_model().graph.output)


# --------------------------------------------------------------------------- consumer ranges


def _conv_then(kind):
    """x -> Conv(1x1, 2 channels) -> y, then `kind` reads y: decomposed HardSwish (y *
    Clip(y + 3, 0, 6) / 6), HardSigmoid(alpha 0.2, beta 0.5) or a plain Mul by x."""
    w = numpy_helper.from_array(np.array([[[[4.0]]], [[[-3.0]]]], np.float32), "w")
    k3, k0, k6 = (
        numpy_helper.from_array(np.array(v, np.float32), n)
        for v, n in ((3.0, "k3"), (0.0, "k0"), (6.0, "k6"))
    )
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    inits = [w, k3, k0, k6]
    if kind == "hardswish":
        nodes += [
            helper.make_node("Add", ["y", "k3"], ["a"], name="add"),
            helper.make_node("Clip", ["a", "k0", "k6"], ["c"], name="clip"),
            helper.make_node("Mul", ["y", "c"], ["m"], name="mul"),
            helper.make_node("Div", ["m", "k6"], ["z"], name="div"),
        ]
    elif kind == "hardsigmoid":
        nodes += [helper.make_node("HardSigmoid", ["y"], ["z"], name="hs", alpha=0.2, beta=0.5)]
    else:
        nodes += [helper.make_node("Mul", ["y", "y"], ["z"], name="sq")]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("z", F, None)],
        inits,
    )
    rng = np.random.default_rng(3)
    data = [{"x": (rng.standard_normal((4, 1, 4, 4)) * 2.5).astype(np.float32)} for _ in range(4)]
    return model, data


def _qparams_of(model, tensor):
    inits = _inits(model)
    node = next(n for n in _nodes(model, "QuantizeLinear") if n.input[0] == tensor)
    return float(inits[node.input[1]]), int(inits[node.input[2]])


def test_useful_range_rules():
    import onnx_graphsurgeon as gs

    from onnxslim_edge.passes.quantize.ranges import useful_range

    for kind, expected in (("hardswish", (-3.0, np.inf)), ("hardsigmoid", (-2.5, 2.5))):
        model, _ = _conv_then(kind)
        y = gs.import_onnx(model).tensors()["y"]
        lo, hi = useful_range(y)
        assert lo == pytest.approx(expected[0]) and hi == pytest.approx(expected[1])
    model, _ = _conv_then("square")
    assert useful_range(gs.import_onnx(model).tensors()["y"]) is None
    graph = gs.import_onnx(_conv_then("hardswish")[0])
    y = graph.tensors()["y"]
    # the Add chain is not followed into a graph output, and only listed consumers count
    assert useful_range(y, outputs=frozenset({"a"})) is None
    add = next(n for n in graph.nodes if n.name == "add")
    assert useful_range(y, [add]) == (-3.0, 3.0)


@pytest.mark.parametrize("kind", ["hardswish", "hardsigmoid"])
def test_consumer_ranges_narrow_the_scale_exactly(kind):
    model, data = _conv_then(kind)
    x = np.concatenate([f["x"] for f in data])
    y = _run(helper_model_y(model), {"x": x})[0]
    q, _ = _quantize(model, data, target="onnxruntime-cpu", method="minmax")
    wide, _ = _quantize(
        model, data, target="onnxruntime-cpu", method="minmax", consumer_ranges=False
    )
    lo, hi = (-3.0, float(y.max())) if kind == "hardswish" else (-2.5, 2.5)
    scale, zp = _qparams_of(q, "y")
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert zp == round(-lo / scale)
    wide_scale, _ = _qparams_of(wide, "y")
    assert wide_scale == pytest.approx((y.max() - y.min()) / 255, rel=1e-6)
    assert wide_scale > 1.5 * scale
    # clamping only where the consumers are flat: a better model, not a different one
    ref = _run(model, {"x": x})[0]
    err = float(np.abs(_run(q, {"x": x})[0] - ref).max())
    err_wide = float(np.abs(_run(wide, {"x": x})[0] - ref).max())
    assert err < err_wide
    report = _quantize(model, data, target="onnxruntime-cpu", method="minmax")[1]
    methods = {d["node"]: d["inputs"] for d in report.details if d.get("node") == "conv"}
    assert methods["conv"]["x"]["method"] == "minmax"  # x feeds the Conv: not clamped


def test_consumer_ranges_leave_other_tensors_alone():
    model, data = _conv_then("square")
    q, _ = _quantize(model, data, target="onnxruntime-cpu", method="minmax")
    ref, _ = _quantize(
        model, data, target="onnxruntime-cpu", method="minmax", consumer_ranges=False
    )
    assert _qparams_of(q, "y") == _qparams_of(ref, "y")
    with pytest.raises(ConfigError, match="consumer_ranges must be true or false"):
        QuantizeConfig(consumer_ranges="yes")


def helper_model_y(model):
    """`model` with its Conv output `y` as the only graph output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info("y", F, None))
    return out


def test_ort_layout_quantizes_the_constant_of_an_add_exactly(tmp_path):
    """HardSwish's `x + 3`: on onnxruntime-cpu the constant is stored as uint8 behind a
    DequantizeLinear that gives back exactly 3, so ONNX Runtime fuses a QLinearAdd
    instead of a float Add between a DequantizeLinear and a QuantizeLinear."""
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    six = numpy_helper.from_array(np.array(6.0, np.float32), "six")
    model = _model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["c", "three"], ["a"], name="add3"),
            helper.make_node("Clip", ["a", "zero", "six"], ["g"], name="clip"),
            helper.make_node("Mul", ["c", "g"], ["y"], name="mul"),
        ],
        [helper.make_tensor_value_info("x", F, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", F, None)],
        [w, three, zero, six],
    )
    data = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    q, _ = _quantize(model, data, target="onnxruntime-cpu", method="minmax")
    add = next(n for n in q.graph.node if n.op_type == "Add")
    producer = {o: n for n in q.graph.node for o in n.output}
    const_dq = producer[add.input[1]]
    assert const_dq.op_type == "DequantizeLinear"
    inits = _inits(q)
    value, scale, zp = (inits[i] for i in const_dq.input)
    assert value.dtype == np.uint8 and zp.dtype == np.uint8
    assert (value.astype(np.float32) - zp) * scale == np.float32(3.0)
    assert producer[add.input[0]].op_type == "DequantizeLinear"  # the activation side too
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    from onnxslim_edge.runtime import serialized

    ort.InferenceSession(serialized(q), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node}
    assert "QLinearAdd" in ops and "Add" not in ops
    x = np.concatenate([d["x"] for d in data])
    assert _cosine(_run(q, {"x": x})[0], _run(model, {"x": x})[0]) > 0.999


# ------------------------------------------------------------ calibration cache


def test_cache_of_another_method_is_refused(tmp_path):
    """An existing cache no longer overrides `method` silently: it is refused."""
    model, data = _mlp3()
    cache = tmp_path / "calib.json"
    _quantize(model, data, method="minmax", calibration_cache=str(cache))
    before = cache.read_text()
    assert {e["method"] for e in json.loads(before).values()} == {"minmax"}
    with pytest.raises(
        ConfigError,
        match=r"calib\.json: calibration cache entry '.+' was measured with minmax, but "
        r"quantize\.method is percentile:99\.9; delete the cache to re-calibrate",
    ):
        _quantize(model, data, method="percentile", percentile=99.9, calibration_cache=str(cache))
    assert cache.read_text() == before  # the refused cache is left as it was
    q, _ = _quantize(model, data, method="minmax", calibration_cache=str(cache))
    assert not _errors(q)  # the method it was made with still reads it


def test_cache_of_other_data_is_refused(tmp_path):
    """Entries record the data they were measured on (its path or kind and sample
    count); another data file is refused."""
    model, data = _mlp3()
    np.savez(tmp_path / "a.npz", x=data[0]["x"])
    np.savez(tmp_path / "b.npz", x=data[0]["x"][:8])
    cache = tmp_path / "calib.json"
    _quantize(model, str(tmp_path / "a.npz"), method="minmax", calibration_cache=str(cache))
    [recorded] = {e["data"] for e in json.loads(cache.read_text()).values()}
    assert "a.npz" in recorded and "16 samples" in recorded and "batch" not in recorded
    with pytest.raises(ConfigError, match=r"was measured on .*a\.npz.*, not on .*b\.npz.*; delete"):
        _quantize(model, str(tmp_path / "b.npz"), method="minmax", calibration_cache=str(cache))


def test_cache_without_a_data_record_is_used_and_reported(tmp_path):
    model, data = _mlp3()
    cache = tmp_path / "calib.json"
    _quantize(model, data, method="minmax", calibration_cache=str(cache))
    entries = json.loads(cache.read_text())
    for entry in entries.values():
        del entry["data"]  # a cache from before data was recorded, or written by hand
    entries["x"]["amax"] = 12.7
    cache.write_text(json.dumps(entries))
    q, report = _quantize(
        model, [{"x": data[0]["x"][:8]}], method="minmax", calibration_cache=str(cache)
    )
    scales = {n.input[0]: _inits(q)[n.input[1]] for n in _nodes(q, "QuantizeLinear")}
    assert scales["x"] == np.float32(0.1)
    assert report.warnings == [
        f"calibration cache {cache}: {len(entries)} entries with no record of their data "
        "(e.g. 'r0') used as they are"
    ]
