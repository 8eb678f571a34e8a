"""Model runs the tool starts on its own initiative, in a child process under a budget.

Some analyses run a model nobody asked to run (shape analysis running ONNX Runtime to
size tensors that ONNX inference left open). An untrusted model can make such a run
last forever (a Loop of 10^9 iterations) or allocate without bound (a ConstantOfShape
of GBs from a 200-byte file). `output_shapes` runs one ONNX Runtime session in a child
process with an address-space limit (RLIMIT_AS, `MEMORY_BUDGET` beyond the child's
own baseline) and a wall-clock limit (`TIME_BUDGET_S`); only output shapes travel
back, and the child is killed when its time is up or when the parent is interrupted.
Children start from a fork server (spawn where there is none), so the parent's threads
and ONNX Runtime state are never forked. A run over budget raises `BudgetExceeded`;
the caller says what it could not compute.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from typing import Any

import onnx

from onnxslim_edge.errors import first_line
from onnxslim_edge.model import PROTOBUF_LIMIT, model_bytes, model_on_disk

__all__ = ["MEMORY_BUDGET", "TIME_BUDGET_S", "BudgetExceeded", "RunFailed", "output_shapes"]

log = logging.getLogger(__name__)

#: Seconds a run started on the tool's own initiative may take.
TIME_BUDGET_S = 20.0
#: Bytes of address space such a run may add to the child's own baseline, besides twice the
#: model's tensor bytes (its weights, held once by protobuf and once by the runtime).
MEMORY_BUDGET = 1 << 30

_PRELOAD = ["numpy", "onnx", "onnxruntime", "onnxslim_edge.runtime", "onnxslim_edge.sandbox"]


class BudgetExceeded(RuntimeError):
    """The run took too long, needed too much memory, or its child process died."""


class RunFailed(RuntimeError):
    """ONNX Runtime refused the model or failed while running it (its first line)."""


_context: Any = None


def _mp_context() -> Any:
    global _context
    if _context is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(_PRELOAD)
        else:
            _context = multiprocessing.get_context("spawn")
    return _context


def _vm_size() -> int | None:
    """This process's virtual memory size in bytes (Linux), else None."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _limit_memory(budget: int) -> None:
    try:
        import resource
    except ImportError:  # not POSIX: the time limit still holds
        return
    base = _vm_size()
    if base is None:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = base + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _child(conn: Any, source: bytes | str, names: list[str], feeds: dict, budget: int) -> None:
    """Run in the child: one session, one run; send ("ok", {name: (dtype, shape)}) or an error."""
    try:
        import numpy as np
        import onnxruntime as ort

        from onnxslim_edge.runtime import make_session

        ort.set_default_logger_severity(4)  # the parent reports the failure, once
        _limit_memory(budget)
        model: onnx.ModelProto | str = source if isinstance(source, str) else onnx.ModelProto()
        if isinstance(model, onnx.ModelProto):
            model.ParseFromString(source)
        session = make_session(model, threads=1, optimization="disable")
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4
        values = session.run(names, feeds, quiet)
        shapes = {
            n: (v.dtype.name, tuple(int(d) for d in v.shape))
            for n, v in zip(names, values)
            if isinstance(v, np.ndarray)
        }
        conn.send(("ok", shapes))
    except MemoryError:
        conn.send(("budget", f"needed more than its {budget >> 20} MiB memory budget"))
    except BaseException as exc:  # everything goes back as text: the parent decides
        text = first_line(exc)
        if any(s in text for s in ("bad_alloc", "bad allocation", "Failed to allocate")):
            conn.send(("budget", f"needed more than its {budget >> 20} MiB memory budget"))
        else:
            conn.send(("failed", text))
    finally:
        conn.close()


def output_shapes(
    model: onnx.ModelProto | str | os.PathLike,
    names: Sequence[str],
    feeds: Mapping[str, Any],
    *,
    time_s: float | None = None,
    memory: int | None = None,
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{output name: (dtype name, shape)} from one run of `model` (a ModelProto under 2 GB
    or a path) on `feeds`, in a child process within `time_s` seconds and `memory` bytes
    (defaults: TIME_BUDGET_S, and MEMORY_BUDGET plus twice the model's tensor bytes). Raises BudgetExceeded past the time or memory budget
    and RunFailed with ONNX Runtime's own error (its first line)."""
    time_s = TIME_BUDGET_S if time_s is None else time_s
    if memory is None:
        weights = model_bytes(model) if isinstance(model, onnx.ModelProto) else _file_bytes(model)
        memory = MEMORY_BUDGET + 2 * weights
    with contextlib.ExitStack() as stack:
        source: bytes | str
        if not isinstance(model, onnx.ModelProto):
            source = os.fspath(model)
        elif model_bytes(model) >= PROTOBUF_LIMIT:
            source = str(stack.enter_context(model_on_disk(model)))
        else:
            from onnxslim_edge.runtime import serialized

            source = serialized(model)
        return _run(source, names, feeds, time_s, memory)


def _file_bytes(path: str | os.PathLike) -> int:
    """A model file's size plus its folder's `.data` files (a bound on its external data)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    data = path + ".data"
    return size + (os.path.getsize(data) if os.path.isfile(data) else 0)


def _run(
    source: bytes | str, names: Sequence[str], feeds: Mapping[str, Any], time_s: float, memory: int
) -> dict[str, tuple[str, tuple[int, ...]]]:
    ctx = _mp_context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child, args=(send, source, list(names), dict(feeds), memory), daemon=True
    )
    proc.start()
    send.close()
    try:
        if not receive.poll(time_s):
            raise BudgetExceeded(f"did not finish within its {time_s:g} s time budget")
        try:
            status, payload = receive.recv()
        except EOFError:
            proc.join(5)
            raise BudgetExceeded(
                f"stopped its process (exit code {proc.exitcode}); "
                f"beyond its {memory >> 20} MiB memory budget?"
            ) from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        receive.close()
    if status == "budget":
        raise BudgetExceeded(payload)
    if status != "ok":
        raise RunFailed(payload)
    return payload
