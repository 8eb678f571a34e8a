"""build-engine: the profile parser, argument checks, the Polygraphy loaders it composes,
the path without TensorRT or a GPU (absent and fake `tensorrt` modules), and - marked
`gpu`, skipped here with the reason - a real build of the digits CNN in fp16 and int8
compared with ONNX Runtime."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from onnxslim_edge.cli import main
from onnxslim_edge.demo import DIGITS_MODEL
from onnxslim_edge.engine import (
    EngineConfig,
    ShapeProfile,
    build_engine,
    check_profiles,
    loaders,
    parse_profile,
    tensorrt_unavailable,
)
from onnxslim_edge.errors import ConfigError, UnsupportedError
from onnxslim_edge.model import load_model

DIGITS_PROFILE = "image=1x1x8x8:8x1x8x8:32x1x8x8"


def test_parse_profile() -> None:
    assert parse_profile([DIGITS_PROFILE, "mask=1,4:2,4:8,4"]) == {
        "image": ShapeProfile(name="image", min=(1, 1, 8, 8), opt=(8, 1, 8, 8), max=(32, 1, 8, 8)),
        "mask": ShapeProfile(name="mask", min=(1, 4), opt=(2, 4), max=(8, 4)),
    }
    (fixed,) = parse_profile("x=4x3").values()
    assert fixed.static and fixed.min == fixed.max == (4, 3)
    assert fixed.trtexec("opt") == "x:4x3"
    for bad, message in [
        ("image", "--profile image: expected NAME=MIN:OPT:MAX with shapes like 1x3x224x224"),
        ("image=1x8:2x8", "--profile image=1x8:2x8: expected NAME=MIN:OPT:MAX with shapes like 1x3x224x224"),
        ("image=ax8:1x8:1x8", "--profile image=ax8:1x8:1x8: expected NAME=MIN:OPT:MAX with shapes like 1x3x224x224"),
        ("x=1x2:1x2x3:1x2", "profile x: min, opt and max must have the same rank (got 1x2, 1x2x3, 1x2)"),
        ("x=4x2:2x2:8x2", "profile x: need 0 <= min <= opt <= max in every dim (got 4x2:2x2:8x2)"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            parse_profile(bad)
        assert str(err.value) == message
    with pytest.raises(ConfigError, match="input 'x' given twice"):
        parse_profile(["x=1", "x=2"])


def test_check_profiles_against_the_model() -> None:
    model = load_model(DIGITS_MODEL)
    assert check_profiles(model, parse_profile(DIGITS_PROFILE)) == []
    assert check_profiles(model, {}) == [
        "input 'image' has dynamic dims (batch) in shape ['batch', 1, 8, 8]: TensorRT needs an "
        "optimization profile, give --profile image=MIN:OPT:MAX"
    ]
    assert check_profiles(model, parse_profile("image=1x3x8x8:1x3x8x8:2x3x8x8")) == [
        "--profile image: dim 1 is fixed to 1 by the model, the profile gives 3:3:3"
    ]
    assert check_profiles(model, parse_profile(["image=1x1x8x8", "other=1"])) == [
        "--profile other: the model has no input 'other' (inputs: image)"
    ]
    assert check_profiles(model, parse_profile("image=1x8x8")) == [
        "--profile image: rank 3, but the input has rank 4 ['batch', 1, 8, 8]"
    ]


def test_loaders_compose_polygraphy_as_configured(tmp_path: Path) -> None:
    """The lazy Polygraphy loaders carry every option; nothing imports tensorrt yet."""
    imported = "tensorrt" in sys.modules  # e.g. by the gpu test's skip condition
    cache = tmp_path / "timing.cache"
    config = EngineConfig(
        fp16=True, sparsity=True, timing_cache=str(cache), profiles=parse_profile(DIGITS_PROFILE)
    )
    network, engine = loaders(DIGITS_MODEL, config, qdq=True)
    assert network.path == str(DIGITS_MODEL)
    assert engine._network is network
    trt_config = engine._config
    assert (trt_config.fp16, trt_config.int8, trt_config.sparse_weights) == (True, True, True)
    assert trt_config.timing_cache_path is None  # no cache to read yet
    assert engine.timing_cache_path == str(cache)  # ... but one to write
    (profile,) = trt_config.profiles
    shapes = profile["image"]
    assert (tuple(shapes.min), tuple(shapes.opt), tuple(shapes.max)) == (
        (1, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8),
    )  # fmt: skip
    cache.write_bytes(b"cache")
    _, engine = loaders(DIGITS_MODEL, EngineConfig(timing_cache=str(cache)), qdq=False)
    assert engine._config.timing_cache_path == str(cache)
    assert (engine._config.fp16, engine._config.int8) == (False, False)
    assert imported or "tensorrt" not in sys.modules


def test_unavailable_without_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    assert tensorrt_unavailable() == (
        "TensorRT is not available: cannot import tensorrt (import of tensorrt halted; None in "
        "sys.modules); install 'onnxslim-edge[trt]' on a machine with an NVIDIA GPU"
    )


def test_unavailable_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0"

    class Logger:
        ERROR = 1

        def __init__(self, level: int) -> None:
            pass

    def builder(logger: object) -> None:
        raise RuntimeError("CUDA initialization failure with error: 35")

    fake.Logger = Logger
    fake.Builder = builder
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert tensorrt_unavailable() == (
        "TensorRT 10.3.0 cannot create a builder: CUDA initialization failure with error: 35 "
        "(no usable NVIDIA GPU)"
    )


def test_cli_without_tensorrt_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "digits.engine"
    argv = [
        "build-engine",
        str(DIGITS_MODEL),
        "-o",
        str(out),
        "--fp16",
        "--profile",
        DIGITS_PROFILE,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("onnxslim-edge: error: TensorRT is not available: cannot import tensorrt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UnsupportedError, match="TensorRT is not available"):
        build_engine(DIGITS_MODEL, out, EngineConfig(profiles=parse_profile(DIGITS_PROFILE)))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--int8"], "--int8: the model has no QuantizeLinear/DequantizeLinear nodes"),
        ([], "input 'image' has dynamic dims (batch)"),
        (["--profile", "image=1x1x8"], "--profile image: rank 3, but the input has rank 4"),
        (["--profile", "image=2x1x8x8:1x1x8x8:4x1x8x8"], "need 0 <= min <= opt <= max"),
        (["--timing-cache", "/nowhere/t.cache"], "--timing-cache /nowhere/t.cache: folder does not exist"),
        (["--workspace", "0"], "workspace_mib must be >= 1, not 0"),
        (["--samples", "0"], "samples must be a positive int, not 0"),
        (["--rtol", "nan"], "rtol must be finite and >= 0, not nan"),
    ],
)  # fmt: skip
def test_cli_argument_checks_come_before_tensorrt(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["build-engine", str(DIGITS_MODEL), "-o", str(tmp_path / "e.engine"), *extra]
    if "--profile" not in extra and "dynamic" not in message:
        argv += ["--profile", DIGITS_PROFILE]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- GPU


def _gpu_reason() -> str:
    return tensorrt_unavailable() or ""


@pytest.mark.gpu
@pytest.mark.skipif(bool(_gpu_reason()), reason=_gpu_reason() or "TensorRT is available")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_real_build_digits_cnn(tmp_path: Path, precision: str) -> None:
    """Build the digits CNN with TensorRT and compare with ONNX Runtime on its test set."""
    images = np.load(DIGITS_MODEL.parent / "digits_test.npz")["image"][:64]
    data = tmp_path / "digits.npz"
    np.savez(data, image=images)
    model = DIGITS_MODEL
    if precision == "int8":
        from onnxslim_edge import Context, Pipeline, save_model

        result = Pipeline(["cleanup", "fold-batchnorm", "quantize"], target="tensorrt").run(
            DIGITS_MODEL, Context(data=str(data), target="tensorrt")
        )
        model = save_model(result.model, tmp_path / "digits.int8.onnx")
    config = EngineConfig(
        fp16=precision == "fp16", int8=precision == "int8", profiles=parse_profile(DIGITS_PROFILE)
    )
    out = build_engine(model, tmp_path / "digits.engine", config, data=data, samples=64)
    assert out.path.stat().st_size > 0
    metrics = out.comparison.outputs["logits"]
    assert out.passed, out.comparison.summary()
    assert metrics.cosine > (0.999 if precision == "fp16" else 0.99)
    assert metrics.top1_agreement >= (0.98 if precision == "fp16" else 0.95)
