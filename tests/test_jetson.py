"""bundle: the static JetPack checks on good and bad models for every JetPack, and the
hand-off folder (written atomically, trtexec flags, nothing on failure, --force)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.cli import main
from onnxslim_edge.demo import DIGITS_MODEL
from onnxslim_edge.engine import parse_profile
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.jetson import JETPACKS, Finding, bundle, check_jetpack, target_for

ALL = ("5.1", "6.0", "6.1", "6.2", "7")


def one_op(
    op: str,
    opset: int,
    *,
    domain: str = "",
    inputs: int = 1,
    outputs: int = 1,
    shape: tuple[int, ...] = (1, 4),
    **attrs: object,
) -> onnx.ModelProto:
    """x -> op -> y: one node of `op` at `opset` (extra inputs: constants of x's last dim)."""
    inits = [
        numpy_helper.from_array(np.ones(shape[-1:], np.float32), f"c{i}") for i in range(1, inputs)
    ]
    outs = ["y", *(f"extra{i}" for i in range(1, outputs))]
    node = helper.make_node(op, ["x", *(i.name for i in inits)], outs, domain=domain, **attrs)
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [
            helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, [f"d{i}" for i in range(len(shape))]
            )
        ],
        inits,
    )
    imports = [helper.make_opsetid("", opset)]
    if domain:
        imports.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return model


def errors(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.check, f.message) for f in findings if f.severity == "error"]


def test_jetpack_targets() -> None:
    assert JETPACKS == ALL
    assert [target_for(jp).tensorrt for jp in ALL] == [
        "8.5.2",
        "8.6.2",
        "10.3.0",
        "10.3.0",
        "10.13",
    ]
    assert [(target_for(jp).min_opset, target_for(jp).max_opset) for jp in ALL] == [
        (1, 17), (1, 17), (9, 20), (9, 20), (9, 22),
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"--jetpack 4.6: unknown; known: 5.1, 6.0, 6.1, 6.2, 7"):
        target_for("4.6")


@pytest.mark.parametrize("jetpack", ALL)
def test_digits_cnn_passes_with_a_profile(jetpack: str) -> None:
    findings = check_jetpack(
        DIGITS_MODEL, jetpack, profiles=parse_profile("image=1x1x8x8:8x1x8x8:32x1x8x8")
    )
    assert findings == []


@pytest.mark.parametrize(
    ("op", "opset", "attrs", "inputs", "fails_on"),
    [
        ("Relu", 13, {}, 1, ()),
        ("LayerNormalization", 17, {}, 2, ("5.1",)),
        ("Gelu", 20, {}, 1, ("5.1", "6.0")),
        ("Mish", 18, {}, 1, ("5.1", "6.0")),
        ("DynamicQuantizeLinear", 13, {"outputs": 3}, 1, ALL),
        ("Relu", 21, {}, 1, ("5.1", "6.0", "6.1", "6.2")),
        ("Relu", 8, {}, 1, ("6.1", "6.2", "7")),
    ],
)
def test_ops_and_opsets_per_jetpack(
    op: str, opset: int, attrs: dict, inputs: int, fails_on: tuple[str, ...]
) -> None:
    model = one_op(op, opset, inputs=inputs, **attrs)
    for jetpack in ALL:
        found = errors(check_jetpack(model, jetpack))
        assert bool(found) == (jetpack in fails_on), (jetpack, found)
        t = target_for(jetpack)
        if op not in t.ops:
            assert (
                "ops",
                f"{op} (1 node(s): {op}#0) is not parsed by TensorRT {t.tensorrt}'s ONNX parser",
            ) in found
        if not t.min_opset <= opset <= t.max_opset:
            assert any(c == "opset" and m.startswith(f"opset {opset}: ") for c, m in found)


@pytest.mark.parametrize(
    ("op", "inputs"),
    [("QLinearConv", 8), ("ConvInteger", 2), ("MatMulInteger", 2), ("QLinearMatMul", 8)],
)
def test_integer_ops_are_parsed_by_no_jetpack(op: str, inputs: int) -> None:
    model = one_op(op, 13, inputs=inputs)
    for jetpack in ALL:
        assert [c for c, _ in errors(check_jetpack(model, jetpack))] == ["ops"], jetpack


def test_contrib_domain_ops_fail() -> None:
    model = one_op("FusedGemm", 13, domain="com.microsoft")
    (found,) = errors(check_jetpack(model, "6.1"))
    assert found == (
        "ops",
        "com.microsoft.FusedGemm (1 node(s): FusedGemm#0) is not parsed by TensorRT 10.3.0's ONNX parser",
    )


def _int64_model(value: int, *, slice_end: bool) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [8])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["n"])
    c = numpy_helper.from_array(np.array([value], np.int64), "c")
    if slice_end:
        start = numpy_helper.from_array(np.array([0], np.int64), "s")
        nodes = [helper.make_node("Slice", ["x", "s", "c"], ["y"])]
        inits = [start, c]
    else:
        nodes = [helper.make_node("Add", ["x", "c"], ["y"])]
        inits = [c]
    model = helper.make_model(
        helper.make_graph(nodes, "i64", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    return model


def test_int64_weights_on_tensorrt_8_only() -> None:
    big = _int64_model(2**40, slice_end=False)
    for jetpack in ("5.1", "6.0"):
        found = check_jetpack(big, jetpack)
        assert [f.severity for f in found] == ["warning", "error"]
        assert found[1].message.startswith("INT64 initializer 'c' holds values outside the INT32")
    for jetpack in ("6.1", "6.2", "7"):
        assert check_jetpack(big, jetpack) == []
    # Slice bounds past INT32 (INT64_MAX = "to the end") are clamped: a warning only
    ends = check_jetpack(_int64_model(2**63 - 1, slice_end=True), "5.1")
    assert [(f.check, f.severity) for f in ends] == [("int64", "warning")]
    assert (
        ends[0].message == "2 INT64 initializer(s) (s, c) will be cast to INT32 by TensorRT 8.5.2"
    )


def _qdq_model(zero_point_dtype: int) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(w)): uint8 activations are ORT-CPU's layout, int8 TensorRT's."""
    np_dtype = np.uint8 if zero_point_dtype == TensorProto.UINT8 else np.int8
    w = np.random.default_rng(0).integers(-100, 100, (4, 2, 1, 1)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np_dtype), "zp"),
        numpy_helper.from_array(w, "wq"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wzp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("jetpack", ALL)
def test_qdq_rules(jetpack: str) -> None:
    assert errors(check_jetpack(_qdq_model(TensorProto.INT8), jetpack, int8=True)) == []
    found = errors(check_jetpack(_qdq_model(TensorProto.UINT8), jetpack))
    assert [c for c, _ in found] == ["qdq", "qdq"]
    assert all(m.startswith("non-int8 ") for _, m in found)
    assert errors(check_jetpack(one_op("Relu", 13), jetpack, int8=True)) == [
        (
            "int8",
            "int8 asked, but the model has no QuantizeLinear/DequantizeLinear nodes: TensorRT int8 "
            "comes only from explicit quantization (optimize --pass quantize)",
        )
    ]


def _conv(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_sparsity_eligibility() -> None:
    dense = np.random.default_rng(0).standard_normal((8, 8, 1, 1)).astype(np.float32)
    sparse = dense.copy()
    sparse[:, 0::4] = sparse[:, 1::4] = 0  # 2 of every 4 input channels zero
    assert check_jetpack(_conv(sparse), "6.1", sparsity=True) == []
    (found,) = check_jetpack(_conv(dense), "6.1", sparsity=True)
    assert (found.check, found.severity) == ("sparsity", "error")
    assert check_jetpack(_conv(dense), "6.1") == []  # not asked: not checked


def test_dla_constraints() -> None:
    model = one_op("Erf", 13)
    assert errors(check_jetpack(model, "7", dla=True, fp16=True)) == [
        ("dla", "JetPack 7's Jetson (Thor) has no DLA")
    ]
    assert errors(check_jetpack(model, "6.1", dla=True)) == [
        ("dla", "the DLA runs fp16 or int8 only: add --fp16 or --int8")
    ]
    found = check_jetpack(model, "6.1", dla=True, fp16=True)
    assert [(f.severity, f.message) for f in found] == [
        ("warning", "Erf (1 node(s)) does not run on the DLA; it falls back to the GPU")
    ]
    pool = one_op("MaxPool", 13, shape=(1, 4, 16), kernel_shape=[9])
    (warn,) = check_jetpack(pool, "5.1", dla=True, int8=False, fp16=True)
    assert warn.message == "MaxPool '': pooling window [9] over the DLA's 8; it runs on the GPU"
    dyn = check_jetpack(
        DIGITS_MODEL,
        "6.0",
        dla=True,
        fp16=True,
        profiles=parse_profile("image=1x1x8x8:2x1x8x8:4x1x8x8"),
    )
    assert ("dla", "input 'image': the DLA needs static shapes (min = opt = max)") in errors(dyn)


# --------------------------------------------------------------------------- bundle


PROFILE = "image=1x1x8x8:8x1x8x8:32x1x8x8"


@pytest.fixture
def digits_data(tmp_path: Path) -> Path:
    images = np.load(DIGITS_MODEL.parent / "digits_test.npz")["image"][:4]
    np.savez(tmp_path / "digits.npz", image=images)
    return tmp_path / "digits.npz"


def test_bundle_writes_the_hand_off_folder(tmp_path: Path, digits_data: Path) -> None:
    out = tmp_path / "jetson"
    result = bundle(
        DIGITS_MODEL, "6.1", out, data=digits_data, profiles=parse_profile(PROFILE), fp16=True
    )
    assert result.passed and result.path == out
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        result.files
    )
    assert onnx.load(out / "model.onnx").graph == onnx.load(DIGITS_MODEL).graph
    build = (out / "build_engine.sh").read_text()
    assert (
        '"$TRTEXEC" --onnx=model.onnx --saveEngine=model.engine --timingCacheFile=timing.cache '
        "--fp16 --minShapes=image:1x1x8x8 --optShapes=image:8x1x8x8 --maxShapes=image:32x1x8x8 "
        '"$@"'
    ) in build
    assert os.access(out / "build_engine.sh", os.X_OK) and os.access(out / "compare.sh", os.X_OK)
    assert (
        "polygraphy run model.engine --model-type engine --trt --load-inputs golden/inputs.json "
        "--load-outputs golden/outputs.json --rtol 0.01 --atol 0.01"
    ) in (out / "compare.sh").read_text()
    readme = (out / "README.md").read_text()
    assert "JetPack 6.1 (TensorRT 10.3.0)" in readme
    assert "Nothing here was run on a Jetson or a GPU yet" in readme
    assert json.loads((out / "checks.json").read_text())["passed"] is True
    # the golden outputs are ONNX Runtime's on the given inputs
    from onnxslim_edge.polygraphy_io import load_inputs, load_run_results
    from onnxslim_edge.runtime import make_session

    sess = make_session(DIGITS_MODEL)
    for feed, outs in zip(load_inputs(out / "golden" / "inputs.json"),
                          load_run_results(out / "golden" / "outputs.json")):  # fmt: skip
        np.testing.assert_allclose(outs["logits"], sess.run(None, feed)[0], rtol=1e-6, atol=1e-6)


def test_build_script_passes_its_flags_to_trtexec(tmp_path: Path, digits_data: Path) -> None:
    out = tmp_path / "jetson"
    bundle(DIGITS_MODEL, "5.1", out, data=digits_data, profiles=parse_profile("image=2x1x8x8"),
           int8=False, fp16=True, dla=True)  # fmt: skip
    fake = tmp_path / "trtexec"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@"\n')
    fake.chmod(0o755)
    done = subprocess.run(
        [str(out / "build_engine.sh"), "--verbose"],
        env={**os.environ, "TRTEXEC": str(fake)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines() == [
        str(out), "--onnx=model.onnx", "--saveEngine=model.engine", "--timingCacheFile=timing.cache",
        "--fp16", "--minShapes=image:2x1x8x8", "--optShapes=image:2x1x8x8",
        "--maxShapes=image:2x1x8x8", "--useDLACore=0", "--allowGPUFallback", "--verbose",
    ]  # fmt: skip


def test_bundle_int8_from_qdq(tmp_path: Path) -> None:
    result = bundle(_qdq_model(TensorProto.INT8), "6.0", tmp_path / "q", samples=2)
    assert result.passed
    assert " --int8 " in (tmp_path / "q" / "build_engine.sh").read_text()
    assert "random, a smoke test only" in (tmp_path / "q" / "README.md").read_text()


def test_failed_checks_write_nothing_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.onnx"
    onnx.save(one_op("LayerNormalization", 17, inputs=2), bad)
    out = tmp_path / "jp51"
    assert main(["bundle", str(bad), "--jetpack", "5.1", "-o", str(out)]) == 1
    text = capsys.readouterr().out
    assert "error    ops" in text and "LayerNormalization (1 node(s): LayerNormalization#0)" in text
    assert "nothing written (fix the errors, or pass --force)" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]
    assert main(["bundle", str(bad), "--jetpack", "5.1", "-o", str(out), "--force", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["written"] == str(out) and report["passed"] is False
    assert "Written with --force despite the errors above" in (out / "README.md").read_text()
    # an existing folder is not replaced without --overwrite
    assert main(["bundle", str(bad), "--jetpack", "6.0", "-o", str(out)]) == 2
    assert "folder exists and is not empty" in capsys.readouterr().err
    assert main(["bundle", str(bad), "--jetpack", "6.0", "-o", str(out), "--overwrite"]) == 0
    assert json.loads((out / "checks.json").read_text())["jetpack"] == "6.0"


def test_bundle_error_mid_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxslim_edge.polygraphy_io

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(onnxslim_edge.polygraphy_io, "save_run_results", boom)
    with pytest.raises(OSError, match="disk full"):
        bundle(one_op("Relu", 13), "6.1", tmp_path / "deep" / "out", samples=1)
    assert list(tmp_path.iterdir()) == []


def test_bundle_bad_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bundle", str(DIGITS_MODEL), "-o", str(tmp_path / "o")]
    assert main([*argv, "--jetpack", "4.6"]) == 2
    assert "argument --jetpack: invalid choice: '4.6'" in capsys.readouterr().err
    assert main([*argv, "--jetpack", "6.1", "--profile", "image=1x1"]) == 1  # rank: a finding
    assert "--profile image: rank 2, but the input has rank 4" in capsys.readouterr().out
    assert main([*argv, "--jetpack", "6.1", "--profile", "image"]) == 2
    assert "expected NAME=MIN:OPT:MAX" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
