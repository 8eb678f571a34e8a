"""ONNX Runtime sessions, created the same way everywhere.

The `onnxruntime` module comes from one of several distributions (`onnxruntime`,
`onnxruntime-training-cpu` 1.19.2, `onnxruntime-gpu`); code here runs on all of them.
Models are handed over as bytes after lowering `ir_version` (ONNX Runtime 1.19 refuses
IR > 10), or, from 64 MB (`model.STREAM_THRESHOLD`), through a temporary file written
tensor by tensor (external data when over 2 GB): serializing would double the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import onnx

from onnxslim_edge.errors import ConfigError, InvalidModelError, UnsupportedError, first_line
from onnxslim_edge.model import STREAM_THRESHOLD, lower_ir_version, model_bytes, model_on_disk

__all__ = [
    "OPTIMIZATION_LEVELS",
    "make_session",
    "no_fallback_chatter",
    "ort_log_severity",
    "serialized",
    "set_ort_log_severity",
]

log = logging.getLogger(__name__)

#: `make_session(optimization=...)` values, from none to every graph optimization.
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

#: ONNX Runtime's default logger severity as last set here (ORT has no getter): 2 = warnings.
_ORT_SEVERITY = 2


def set_ort_log_severity(level: int) -> None:
    """Set ONNX Runtime's default logger severity (0 verbose .. 4 fatal) and remember it,
    so `ort_log_severity` restores this level, not ORT's default."""
    global _ORT_SEVERITY
    import onnxruntime as ort

    ort.set_default_logger_severity(level)
    _ORT_SEVERITY = level


@contextlib.contextmanager
def ort_log_severity(level: int) -> Iterator[None]:
    """ONNX Runtime's default logger severity set to `level` inside the block; the level
    before it (as set by `set_ort_log_severity`, else ORT's default 2) restored after."""
    import onnxruntime as ort

    previous = _ORT_SEVERITY
    ort.set_default_logger_severity(level)
    try:
        yield
    finally:
        ort.set_default_logger_severity(previous)


@contextlib.contextmanager
def no_fallback_chatter() -> Iterator[None]:
    """Keep ONNX Runtime's provider-fallback banner off stdout while a session is made.

    When a session cannot be created, `onnxruntime.InferenceSession` prints "EP Error ...
    Falling back to ['CPUExecutionProvider'] and retrying." to stdout and tries again
    (pointless on CPU); the refusal itself still raises, with its message. On stdout the
    banner would corrupt `--json` output and break `-q`; it goes to the debug log instead.
    """
    import io

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:
            log.debug("onnxruntime: %s", " ".join(text.split()))


def serialized(model: onnx.ModelProto) -> bytes:
    """The model as bytes ONNX Runtime 1.19+ accepts (IR lowered on a copy-free basis)."""
    ir = model.ir_version
    try:
        lower_ir_version(model)
        return model.SerializeToString()
    finally:
        model.ir_version = ir


#: glibc's M_MMAP_THRESHOLD (mallopt parameter number).
_M_MMAP_THRESHOLD = -3


def return_freed_memory(threshold: int = 2**20) -> bool:
    """Have glibc's malloc serve blocks of `threshold` bytes or more by mmap, so freed
    weights and session buffers go back to the system (by default the threshold grows
    with each large free, and big freed blocks then stay in the heap: a run's resident
    memory only ever grows). For the CLI's process; False where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def make_session(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    threads: int | None = None,
    spinning: bool = False,
    optimization: str = "all",
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> Any:
    """An `onnxruntime.InferenceSession`.

    `spinning=False` stops idle threads busy-waiting, which otherwise inflates times
    about 3x when sessions alternate on few cores. `optimization` is one of
    `OPTIMIZATION_LEVELS` (else ConfigError). Raises InvalidModelError for a missing
    file and UnsupportedError naming ONNX Runtime's reason when it refuses the model.
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ConfigError(
            f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, not {optimization!r}"
        )
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts.graph_optimization_level = levels[optimization]
    try:
        with no_fallback_chatter():
            return _session(ort, model, opts, providers)
    except (InvalidModelError, UnsupportedError):
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        first = first_line(exc)
        raise UnsupportedError(f"ONNX Runtime cannot load the model: {first}") from exc


def _session(ort: Any, model: Any, opts: Any, providers: tuple[str, ...]) -> Any:
    if isinstance(model, onnx.ModelProto):
        if model_bytes(model) >= STREAM_THRESHOLD:
            # Written without a serialized copy, weights as external data: ONNX Runtime
            # then holds them once (from bytes it keeps the parsed proto too).
            with model_on_disk(model, external=True) as path:
                return ort.InferenceSession(str(path), opts, providers=list(providers))
        return ort.InferenceSession(serialized(model), opts, providers=list(providers))
    if not os.path.exists(model):
        raise InvalidModelError(f"{model}: model file not found")
    return ort.InferenceSession(str(model), opts, providers=list(providers))
