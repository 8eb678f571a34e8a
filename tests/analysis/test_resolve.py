"""Shape resolution: explicit > data > metadata > a ladder validated on the original
model; symbolic-dim models that cannot run at size 1 now optimize losslessly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.analysis import model_cost
from onnxslim_edge.analysis.resolve import resolve_input_shapes
from onnxslim_edge.cli import main

F = TensorProto.FLOAT


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _bn(prefix, c, rng, x, out):
    inits = [
        _init(f"{prefix}_s", rng.uniform(0.5, 1.5, c)),
        _init(f"{prefix}_b", rng.normal(0, 0.1, c)),
        _init(f"{prefix}_m", rng.normal(0, 0.1, c)),
        _init(f"{prefix}_v", rng.uniform(0.5, 1.5, c)),
    ]
    node = helper.make_node(
        "BatchNormalization", [x] + [t.name for t in inits], [out], epsilon=1e-5
    )
    return node, inits


def two_branch_model(metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """x [N, 3, H, W] -> a: Conv s1 + BN; b: Conv s2 -> Resize x2; Concat(a, b).

    At H = W = 1 branch b is 1 -> 2 wide after the Resize: the Concat cannot run."""
    rng = np.random.default_rng(0)
    wa = _init("wa", rng.normal(0, 0.3, (4, 3, 3, 3)))
    wb = _init("wb", rng.normal(0, 0.3, (4, 3, 3, 3)))
    bn, bn_inits = _bn("bn", 4, rng, "a0", "a")
    scales = _init("scales", [1, 1, 2, 2])
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a0"], pads=[1, 1, 1, 1]),
        bn,
        helper.make_node("Conv", ["x", "wb"], ["b0"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["b0"], ["b1"]),
        helper.make_node("Resize", ["b1", "", "scales"], ["b"], mode="nearest"),
        helper.make_node("Concat", ["a", "b"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "two_branch",
        [helper.make_tensor_value_info("x", F, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("y", F, ["batch", None, None, None][:4])],
        [wa, wb, scales, *bn_inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    return model


def reflect_pad_model() -> onnx.ModelProto:
    """x [batch, sequence] -> Unsqueeze -> reflect Pad 2 -> Conv1d + BN: needs S > 2."""
    rng = np.random.default_rng(1)
    w = _init("w", rng.normal(0, 0.3, (4, 1, 5)))
    bn, bn_inits = _bn("bn", 4, rng, "c", "y")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    pads = numpy_helper.from_array(np.array([0, 0, 2, 0, 0, 2], np.int64), "pads")
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axes"], ["u"]),
        helper.make_node("Pad", ["u", "pads"], ["p"], mode="reflect"),
        helper.make_node("Conv", ["p", "w"], ["c"]),
        bn,
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [helper.make_tensor_value_info("x", F, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", F, ["batch", None, None, None][:3])],
        [w, axes, pads, *bn_inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_ladder_validated_on_the_original() -> None:
    r = resolve_input_shapes(two_branch_model())
    # Stride 2 implied by the graph: 224 is already a multiple.
    assert r.shapes == {"x": (1, 3, 224, 224)}
    assert r.origins == {"x": "ladder"}
    assert r.assumed and any("assumed input shape" in w for w in r.warnings)


def test_sequence_ladder() -> None:
    r = resolve_input_shapes(reflect_pad_model())
    assert r.shapes == {"x": (1, 16)}
    assert r.origins == {"x": "ladder"}


def _conv1d_model(dims: list) -> onnx.ModelProto:
    """Reflect Pad 4 + Conv1d on a float (batch, channels, time)-like input."""
    w = np.random.default_rng(0).standard_normal((16, 80, 3)).astype(np.float32)
    w = numpy_helper.from_array(w, "w")
    pads = numpy_helper.from_array(np.array([0, 0, 4, 0, 0, 4], np.int64), "pads")
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
        helper.make_node("Conv", ["p", "w"], ["y"], strides=[2]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv1d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, "t2"])],
        [w, pads],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_sequence_ladder_on_channels_first_time_axes() -> None:
    """(batch, 80 mel bins, time): the time axis is a sequence (16, 128, 512), not 1;
    the MACs are counted there."""
    model = _conv1d_model(["batch", 80, "time"])
    r = resolve_input_shapes(model)
    assert r.shapes == {"x": (1, 80, 16)} and r.origins == {"x": "ladder"}
    cost = model_cost(model, input_shapes=dict(r.shapes))
    assert cost.macs == 16 * 80 * 3 * ((16 + 8 - 3) // 2 + 1)  # Cout Cin k x output length


def test_metadata_imgsz_and_batch() -> None:
    r = resolve_input_shapes(two_branch_model({"imgsz": "[320, 256]", "batch": "2"}))
    assert r.shapes == {"x": (2, 3, 320, 256)}
    assert r.origins == {"x": "metadata"}
    assert not r.assumed and r.warnings == ()


def test_explicit_beats_data_beats_metadata() -> None:
    model = two_branch_model({"imgsz": "[320, 320]"})
    data = [{"x": np.zeros((1, 3, 64, 64), np.float32)}]
    r = resolve_input_shapes(model, {"x": (1, 3, 32, 32)}, data)
    assert (r.shapes["x"], r.origins["x"]) == ((1, 3, 32, 32), "explicit")
    r = resolve_input_shapes(model, None, data)
    assert (r.shapes["x"], r.origins["x"]) == ((1, 3, 64, 64), "data")
    r = resolve_input_shapes(model, None, lambda: data)  # a factory is called only if needed
    assert (r.shapes["x"], r.origins["x"]) == ((1, 3, 64, 64), "data")
    r = resolve_input_shapes(model)
    assert (r.shapes["x"], r.origins["x"]) == ((1, 3, 320, 320), "metadata")


def test_static_model_needs_no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxslim_edge.analysis.resolve as resolve

    model = two_branch_model()
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", F, [1, 3, 8, 8]))
    monkeypatch.setattr(resolve, "_runs", lambda *a: pytest.fail("ran the model"))
    called = []
    r = resolve.resolve_input_shapes(model, None, lambda: called.append(1))
    assert r.shapes == {"x": (1, 3, 8, 8)} and r.origins == {"x": "static"}
    assert not called and not r.symbolic


def test_nothing_runs_falls_back_to_default() -> None:
    model = two_branch_model()
    # Concat with a fixed 5x5 map: no ladder size fits.
    model.graph.node[-1].input[1] = "fixed"
    model.graph.initializer.append(_init("fixed", np.zeros((1, 4, 5, 5))))
    r = resolve_input_shapes(model)
    assert r.shapes == {"x": (1, 3, 1, 1)}
    assert r.origins == {"x": "default"}
    assert any("no candidate input shape ran the model" in w for w in r.warnings)


def test_macs_at_resolved_shape() -> None:
    model = two_branch_model()
    cost = model_cost(model, resolve_input_shapes(model).shapes)  # ladder: 224
    hw = 224 * 224
    conv_a = hw * 4 * 27
    conv_b = (hw // 4) * 4 * 27
    assert cost.macs >= conv_a + conv_b
    assert cost.macs == conv_a + conv_b + 2 * hw * 4 + hw // 4 * 4  # + BN, Relu


@pytest.mark.parametrize("build", [two_branch_model, reflect_pad_model])
def test_lossless_optimize_without_options(
    build, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(build(), src)
    argv = ["optimize", str(src), "-o", str(out), "--report", str(rep)]
    assert main([*argv, "--pass", "cleanup", "--pass", "fold-batchnorm"]) == 0
    assert "(ladder)" in capsys.readouterr().out
    assert "assumed input shape(s) x=1x" in caplog.text
    report = json.loads(rep.read_text())
    assert report["input_shapes"]["x"]["origin"] == "ladder"
    folded = onnx.load(out)
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}
    assert report["passes"][1]["validation"]["passed"]


def test_inspect_shows_shapes_and_origin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(two_branch_model({"imgsz": "[320, 320]"}), src)
    assert main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_shapes"] == {"x": {"shape": [1, 3, 320, 320], "origin": "metadata"}}
    hw = 320 * 320
    assert info["macs"] == hw * 4 * 27 + (hw // 4) * 4 * 27 + 2 * hw * 4 + hw // 4 * 4
    assert main(["inspect", str(src), "--input-shape", "x=1,3,64,64"]) == 0
    assert "x (1, 3, 64, 64) (explicit)" in capsys.readouterr().out
