"""TensorRT engine builds through Polygraphy's TensorRT backend, then a check against ONNX Runtime.

`build_engine(model, "model.engine", EngineConfig(fp16=True))` composes Polygraphy's
lazy loaders — `NetworkFromOnnxPath` -> `CreateConfig` -> `EngineFromNetwork` ->
`SaveEngine` — builds, then runs the engine (`TrtRunner`) and ONNX Runtime
(`OnnxrtRunner`) on the same inputs with Polygraphy's `Comparator` and reports the
fidelity metrics of `verify` (max abs/rel error, cosine, SQNR, top-1 agreement).

Int8 comes only from the model's own Q/DQ nodes (explicit quantization): implicit
calibrators are deprecated since TensorRT 10.1 and TensorRT 11 is strongly typed, so
`int8=True` on a model without QuantizeLinear/DequantizeLinear is refused, and a Q/DQ
model gets the int8 flag TensorRT needs to run those layers in int8. Optimization
profiles come from `parse_profile("x=1x3x224x224:8x3x224x224:16x3x224x224")`.

Without the `tensorrt` module or a GPU, `tensorrt_unavailable()` says why in one line
and `build_engine` raises UnsupportedError with it (the CLI exits 2). This path was
written and tested on machines without a GPU: tests cover the loaders' configuration,
argument checks and the unavailable path; `tests/test_engine.py::test_real_build_*`
(marker `gpu`) builds the digits CNN where a GPU is present.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxslim_edge.errors import ConfigError, UnsupportedError, first_line
from onnxslim_edge.model import ModelSource, load_model

__all__ = [
    "EngineConfig",
    "EngineResult",
    "ShapeProfile",
    "build_engine",
    "has_qdq",
    "parse_profile",
    "tensorrt_unavailable",
]

log = logging.getLogger(__name__)

_QDQ = ("QuantizeLinear", "DequantizeLinear")


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True, kw_only=True)
class ShapeProfile:
    """One input's optimization-profile shapes: min <= opt <= max, dim by dim."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        shapes = (self.min, self.opt, self.max)
        if len({len(s) for s in shapes}) != 1:
            raise ConfigError(
                f"profile {self.name}: min, opt and max must have the same rank "
                f"(got {_dims(self.min)}, {_dims(self.opt)}, {_dims(self.max)})"
            )
        for lo, mid, hi in zip(*shapes):
            if not 0 <= lo <= mid <= hi:
                raise ConfigError(
                    f"profile {self.name}: need 0 <= min <= opt <= max in every dim "
                    f"(got {_dims(self.min)}:{_dims(self.opt)}:{_dims(self.max)})"
                )

    @property
    def static(self) -> bool:
        return self.min == self.opt == self.max

    def trtexec(self, which: str) -> str:
        """`name:1x3x8x8` as trtexec's --minShapes/--optShapes/--maxShapes take it."""
        return f"{self.name}:{_dims(getattr(self, which))}"


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


_SHAPE = re.compile(r"^\d+(?:[x,]\d+)*$")


def parse_profile(items: str | Sequence[str]) -> dict[str, ShapeProfile]:
    """`NAME=MIN:OPT:MAX` (repeatable, one per input), each shape `1x3x224x224` (or
    `1,3,224,224`); `NAME=SHAPE` alone fixes min = opt = max. Raises ConfigError."""
    if isinstance(items, str):
        items = [items]
    out: dict[str, ShapeProfile] = {}
    for item in items:
        name, sep, spec = item.rpartition("=")
        name = name.strip()
        parts = [p.strip() for p in spec.split(":")]
        if (
            not sep
            or not name
            or len(parts) not in (1, 3)
            or not all(_SHAPE.match(p) for p in parts)
        ):
            raise ConfigError(
                f"--profile {item}: expected NAME=MIN:OPT:MAX with shapes like 1x3x224x224"
            )
        if name in out:
            raise ConfigError(f"--profile {item}: input '{name}' given twice")
        shapes = [tuple(int(d) for d in re.split("[x,]", p)) for p in parts]
        lo, mid, hi = shapes if len(shapes) == 3 else shapes * 3
        out[name] = ShapeProfile(name=name, min=lo, opt=mid, max=hi)
    return out


def check_profiles(model: onnx.ModelProto, profiles: Mapping[str, ShapeProfile]) -> list[str]:
    """Problems of `profiles` against `model`'s inputs: unknown inputs, ranks, fixed dims,
    and dynamic inputs left without a profile. Empty when they fit."""
    from onnxslim_edge.analysis import io_info

    inputs, _ = io_info(model)
    by_name = {t.name: t for t in inputs}
    problems = [
        f"--profile {n}: the model has no input '{n}' (inputs: {', '.join(by_name)})"
        for n in profiles
        if n not in by_name
    ]
    for t in inputs:
        shape = list(t.shape)
        dynamic = [d for d in shape if not isinstance(d, int) or d < 0]
        p = profiles.get(t.name)
        if p is None:
            if dynamic:
                dims = ", ".join(str(d) for d in dynamic)
                problems.append(
                    f"input '{t.name}' has dynamic dims ({dims}) in shape {shape}: TensorRT needs "
                    f"an optimization profile, give --profile {t.name}=MIN:OPT:MAX"
                )
            continue
        if len(p.min) != len(shape):
            problems.append(
                f"--profile {t.name}: rank {len(p.min)}, but the input has rank {len(shape)} {shape}"
            )
            continue
        for axis, d in enumerate(shape):
            if (
                isinstance(d, int)
                and d >= 0
                and not (p.min[axis] == p.opt[axis] == p.max[axis] == d)
            ):
                problems.append(
                    f"--profile {t.name}: dim {axis} is fixed to {d} by the model, the profile "
                    f"gives {p.min[axis]}:{p.opt[axis]}:{p.max[axis]}"
                )
    return problems


def has_qdq(model: onnx.ModelProto) -> bool:
    from onnxslim_edge.model import iter_graphs

    return any(n.op_type in _QDQ for g in iter_graphs(model.graph) for n in g.node)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """What TensorRT is asked to build (see the module docstring for int8)."""

    fp16: bool = False
    int8: bool = False
    sparsity: bool = False
    timing_cache: str | None = None
    profiles: Mapping[str, ShapeProfile] = field(default_factory=dict)
    workspace_mib: int | None = None

    def __post_init__(self) -> None:
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise ConfigError(f"workspace_mib must be >= 1, not {self.workspace_mib}")
        if self.timing_cache is not None:
            folder = Path(self.timing_cache).resolve().parent
            if not folder.is_dir():
                raise ConfigError(f"--timing-cache {self.timing_cache}: folder does not exist")


def tensorrt_unavailable() -> str | None:
    """Why no TensorRT engine can be built here (one line), or None when one can."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return (
            f"TensorRT is not available: cannot import tensorrt ({first_line(exc)}); install "
            "'onnxslim-edge[trt]' on a machine with an NVIDIA GPU"
        )
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        if builder is None:
            raise RuntimeError("no builder (is a CUDA GPU visible?)")
    except Exception as exc:  # CUDA initialization failure without a GPU or driver
        return f"TensorRT {getattr(trt, '__version__', '?')} cannot create a builder: {first_line(exc)} (no usable NVIDIA GPU)"
    return None


def loaders(model_path: str | os.PathLike, config: EngineConfig, *, qdq: bool) -> tuple[Any, Any]:
    """The lazy Polygraphy loaders for `config`: (network loader, engine loader). Nothing
    is built until the engine loader is called (which imports tensorrt)."""
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
    )

    network = NetworkFromOnnxPath(str(model_path))
    profiles = []
    if config.profiles:
        profile = Profile()
        for p in config.profiles.values():
            profile.add(p.name, min=p.min, opt=p.opt, max=p.max)
        profiles.append(profile)
    kwargs: dict[str, Any] = {
        "fp16": config.fp16,
        "int8": config.int8 or qdq,
        "sparse_weights": config.sparsity,
        "profiles": profiles or None,
        "load_timing_cache": config.timing_cache
        if config.timing_cache and Path(config.timing_cache).is_file()
        else None,
    }
    if config.workspace_mib:
        import tensorrt as trt

        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: config.workspace_mib << 20}
    trt_config = CreateConfig(**kwargs)
    engine = EngineFromNetwork(network, config=trt_config, save_timing_cache=config.timing_cache)
    return network, engine


# --------------------------------------------------------------------------- build


@dataclass(kw_only=True)
class EngineResult:
    """A built engine and its comparison with ONNX Runtime on the same inputs."""

    path: Path
    config: EngineConfig
    int8_from_qdq: bool
    comparison: Any  # verify.VerifyResult
    tensorrt_version: str

    @property
    def passed(self) -> bool:
        return self.comparison.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": str(self.path),
            "tensorrt": self.tensorrt_version,
            "fp16": self.config.fp16,
            "int8": self.config.int8 or self.int8_from_qdq,
            "sparsity": self.config.sparsity,
            "comparison": self.comparison.to_dict(),
        }


def default_tolerance(config: EngineConfig, qdq: bool) -> tuple[float, float]:
    """(rtol, atol x output range) that an engine of this precision is held to."""
    if config.int8 or qdq:
        return 5e-2, 5e-2
    if config.fp16:
        return 1e-2, 1e-2
    return 1e-3, 1e-4  # TF32 and tactic choice reorder float math


def validate(model: onnx.ModelProto, config: EngineConfig) -> bool:
    """Refuse what TensorRT would refuse later; returns whether the model has Q/DQ."""
    qdq = has_qdq(model)
    if config.int8 and not qdq:
        raise ConfigError(
            "--int8: the model has no QuantizeLinear/DequantizeLinear nodes; TensorRT int8 "
            "here comes only from explicit quantization (onnxslim-edge optimize --pass "
            "quantize --target tensorrt)"
        )
    problems = check_profiles(model, config.profiles)
    if problems:
        raise ConfigError(problems[0])
    return qdq


def build_engine(
    model: ModelSource,
    output: str | os.PathLike,
    config: EngineConfig | None = None,
    *,
    data: Any = None,
    samples: int = 16,
    rtol: float | None = None,
    atol: float | None = None,
) -> EngineResult:
    """Build a TensorRT engine for `model` into `output`, then compare it with ONNX Runtime
    on `data` (None: random inputs at the profiles' opt shapes, marked synthetic).

    Raises ConfigError for bad options, UnsupportedError when TensorRT or a GPU is
    missing or TensorRT refuses the model. The engine file is written atomically."""
    config = config or EngineConfig()
    if not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples must be a positive int, not {samples!r}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name} must be finite and >= 0, not {value}")
    out = Path(output)
    if out.is_dir() or not out.resolve().parent.is_dir():
        raise ConfigError(f"{out}: give an engine file in an existing folder")
    proto = load_model(model)
    qdq = validate(proto, config)
    reason = tensorrt_unavailable()
    if reason is not None:
        raise UnsupportedError(reason)
    import tensorrt as trt

    from onnxslim_edge.model import model_on_disk
    from onnxslim_edge.verify import _quiet_polygraphy

    default_rtol, default_atol = default_tolerance(config, qdq)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_polygraphy())
        path = (
            Path(model)
            if isinstance(model, (str, os.PathLike))
            else stack.enter_context(model_on_disk(proto))
        )
        _, engine_loader = loaders(path, config, qdq=qdq)
        try:
            engine = engine_loader()
        except Exception as exc:
            raise UnsupportedError(
                f"TensorRT could not build the engine: {first_line(exc)}"
            ) from exc
        _save_engine(engine, out)
        comparison = _compare(
            engine,
            proto,
            data,
            samples=samples,
            input_shapes={n: p.opt for n, p in config.profiles.items()},
            rtol=default_rtol if rtol is None else rtol,
            atol=default_atol if atol is None else atol,
        )
    return EngineResult(
        path=out,
        config=config,
        int8_from_qdq=qdq and not config.int8,
        comparison=comparison,
        tensorrt_version=trt.__version__,
    )


def _save_engine(engine: Any, out: Path) -> None:
    """The serialized engine, written whole or not at all."""
    import tempfile

    from onnxslim_edge.model import new_file_mode

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(bytes(engine.serialize()))
        os.chmod(tmp, new_file_mode())  # mkstemp's 0o600 would make the engine private
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _compare(
    engine: Any,
    model: onnx.ModelProto,
    data: Any,
    *,
    samples: int,
    input_shapes: Mapping[str, Sequence[int]],
    rtol: float,
    atol: float,
) -> Any:
    """Polygraphy's TrtRunner and OnnxrtRunner on the same feeds, scored with verify's
    metrics, ONNX Runtime as the reference."""
    from polygraphy.backend.trt import TrtRunner

    from onnxslim_edge.data import open_data
    from onnxslim_edge.verify import _runner, compare_outputs

    source = open_data(
        "random" if data is None else data, model, limit=samples, input_shapes=input_shapes or None
    )
    feeds = [dict(f) for f in source]
    reference, candidate = [], []
    with _runner(model, "onnxruntime") as ort_runner, TrtRunner(engine, name="tensorrt") as trt:
        for feed in feeds:
            reference.append(
                {k: np.array(v) for k, v in ort_runner.infer(feed, check_inputs=False).items()}
            )
            candidate.append({k: np.array(v) for k, v in trt.infer(feed).items()})
    return compare_outputs(
        reference,
        candidate,
        samples=sum(next(iter(f.values())).shape[0] for f in feeds if f),
        rtol=rtol,
        atol=atol,
        data=source.describe(),
        synthetic=source.is_synthetic,
    )
