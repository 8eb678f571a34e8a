"""The benchmark harness: every method on every model, measured the same way.

What is measured comes from elsewhere, as data: the models with their data, task
metrics and targets from `benchmarks.specs`, the methods from `benchmarks.methods`.
This module only measures; `benchmarks.report` renders.

`run_model(spec, settings)` measures, per method:

- the method's own wall time and peak memory: each method runs in a fresh `spawn`
  child process, which reports its peak resident set (VmHWM, including the Python
  interpreter and the libraries it imported) and its resident set before the call;
- file size on disk, params, MACs (at the batch-1 latency shape) and node count
  (`onnxslim_edge.analysis.model_cost`);
- ONNX Runtime CPU latency at batch 1 and 8 (`onnxslim_edge.timing.measure_latency`:
  every method's model and the fp32 baseline in the same interleaved loop, 2 threads,
  warm-up, median with p10/p90), and each median's ratio to the fp32 model's;
- fidelity: the spec's task metrics on the evaluation data, and a per-output
  comparison with the fp32 model (`onnxslim_edge.verify.compare`: cosine, SQNR, max
  abs error, top-1 agreement, KL) with an `equal` flag at rtol = atol = 1e-5
  (relative to each output's range).

`calibration_memory` measures quantization time and peak memory at two calibration-set
sizes (ours with minmax, ORT's MinMax), each in its own child.

A method that fails (import error, a tool's exception, a crash, a model ONNX Runtime
cannot run) is recorded with its status and error; the other methods go on.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.util
import logging
import math
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.methods import CALIBRATION_MEMORY_METHODS, METHODS, MethodSpec, recipe_path
from benchmarks.specs import CALIBRATION_MEMORY_FLAT_RATIO, ModelSpec, build_spec

__all__ = [
    "FIDELITY_TOLERANCE",
    "BenchmarkSettings",
    "calibration_memory",
    "cleanup_workdir",
    "default_workdir",
    "environment",
    "load_feeds",
    "prefer_installed_package",
    "run_in_child",
    "run_model",
    "save_feeds",
]

log = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: rtol and atol (relative to each output's range) of the `equal` flag.
FIDELITY_TOLERANCE = 1e-5


def prefer_installed_package() -> None:
    """Let an installed `onnxslim_edge` win over the source folder; call before importing it.

    `python -m benchmarks.run` (or `.scaling`) from the repository root puts the root
    first on `sys.path`, so `import onnxslim_edge` would find the source folder, where
    `passes/` sits beside the package instead of inside it; an install (wheel or strict
    editable, `scripts/_venv.sh`) maps it to `onnxslim_edge.passes`. When an installed
    copy is found elsewhere on the path, the root moves to the end: `onnxslim_edge`
    then imports from the install, the code users get, and `benchmarks` (never
    installed) still from the root. Spawned method children inherit the reordered path
    (and call this again). Without an installed copy nothing changes.
    """
    import importlib.machinery
    import sys

    if "onnxslim_edge" in sys.modules:
        return
    root = REPO_ROOT.resolve()
    here = [p for p in sys.path if Path(p or ".").resolve() == root]
    others = [p for p in sys.path if Path(p or ".").resolve() != root]
    if here and importlib.machinery.PathFinder.find_spec("onnxslim_edge", others) is not None:
        sys.path[:] = others + here
        # Children started by the `forkserver` method (onnxslim_edge.sandbox) get no
        # sys.path from us (CPython 3.11's forkserver.main ignores it) and would put the
        # current folder, the root, first again: PYTHONSAFEPATH keeps it out of theirs.
        os.environ.setdefault("PYTHONSAFEPATH", "1")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class BenchmarkSettings:
    """How much to measure. `quick` marks a reduced run in the results."""

    runs: int = 30
    warmup: int = 5
    threads: int = 2
    calibration_samples: int = 32
    quick: bool = False
    methods: tuple[str, ...] | None = None  # None: every method
    method_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError("runs and threads must be >= 1, warmup >= 0")
        if self.calibration_samples < 1:
            raise ValueError("calibration_samples must be >= 1")

    @classmethod
    def quick_mode(cls, **overrides: Any) -> BenchmarkSettings:
        values: dict[str, Any] = {"runs": 10, "warmup": 2, "quick": True}
        values.update(overrides)
        return cls(**values)


# --------------------------------------------------------------------------- child processes


def save_feeds(feeds: Sequence[Feed], path: Path) -> None:
    """A list of feed dicts as one `.npz` (keys `00000__name`); shapes may differ per feed."""
    arrays = {
        f"{i:05d}__{name}": np.asarray(v)
        for i, feed in enumerate(feeds)
        for name, v in feed.items()
    }
    np.savez(path, **arrays)


def load_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    """The feeds `save_feeds` wrote, in order."""
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            index, _, name = key.partition("__")
            out.setdefault(int(index), {})[name] = data[key]
    return [out[i] for i in sorted(out)]


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss_mb() -> float:
    """This process's peak resident set in MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process image alone.
    (`ru_maxrss` is no good in a spawned child: Linux carries the forked parent's resident
    set across exec into it.) Elsewhere `ru_maxrss` (KiB on Linux, bytes on macOS).
    """
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if platform.system() == "Darwin" else peak / 1024


def _rss_mb() -> float:
    """Current resident set in MiB (the peak so far where /proc is missing)."""
    rss = _proc_status_mb("VmRSS")
    return rss if rss is not None else _peak_rss_mb()


def _child_rss_mb(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _child_main(
    conn: Any, function: str, args: tuple, params: dict, feeds_path: str | None
) -> None:
    """Run `function(*args, calibration, **params)` and send back timing, memory and notes."""
    try:
        prefer_installed_package()
        logging.basicConfig(level=logging.WARNING)
        module_name, _, attr = function.partition(":")
        fn = getattr(importlib.import_module(module_name), attr)
        import onnx  # noqa: F401  (imported before the baseline: every method needs it)

        calibration = load_feeds(Path(feeds_path)) if feeds_path else []
        baseline = _rss_mb()
        t0 = time.perf_counter()
        notes = fn(*args, calibration, **params) or {}
        wall = time.perf_counter() - t0
        conn.send(
            {
                "status": "ok",
                "wall_s": wall,
                "peak_rss_mb": _peak_rss_mb(),
                "rss_before_mb": baseline,
                "notes": notes,
            }
        )
    except BaseException as exc:
        lines = str(exc).strip().splitlines()
        conn.send(
            {
                "status": "failed",
                "error": f"{type(exc).__name__}: {lines[0] if lines else ''}".strip(),
                "traceback": traceback.format_exc(limit=8),
            }
        )
    finally:
        conn.close()


def run_in_child(
    function: str,
    args: tuple,
    *,
    params: Mapping[str, Any] | None = None,
    feeds_path: Path | None = None,
    timeout_s: float = 1800.0,
    max_rss_mb: float | None = None,
) -> dict[str, Any]:
    """Call `function` ("module:attr") in a fresh spawn child; return what it reported.

    The result has `status` ("ok" or "failed"), and when ok `wall_s`, `peak_rss_mb`
    (the child's whole peak resident set, see `_peak_rss_mb`), `rss_before_mb` (its
    resident set after imports and loading the calibration data, just before the call)
    and `notes` (what the call returned). With `max_rss_mb` the child is killed (and the
    result says so) once its resident set passes that many MiB, checked every 0.2 s.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child_main,
        args=(child, function, args, dict(params or {}), str(feeds_path) if feeds_path else None),
        daemon=True,
    )
    proc.start()
    child.close()
    result: dict[str, Any] | None = None
    deadline = time.monotonic() + timeout_s
    over = None
    while time.monotonic() < deadline:
        if max_rss_mb is not None:
            rss = _child_rss_mb(proc.pid)
            if rss is not None and rss > max_rss_mb:
                over = rss
                break
        if parent.poll(0.2 if max_rss_mb is not None else 1.0):
            try:
                result = parent.recv()
            except EOFError:
                result = None
            break
        if not proc.is_alive():
            break
    if over is not None:
        proc.kill()
        proc.join(10)
        return {
            "status": "failed",
            "error": f"stopped at {over:.0f} MB resident, over the {max_rss_mb:.0f} MB cap",
        }
    if result is None and proc.is_alive():
        proc.kill()
        proc.join(10)
        return {"status": "failed", "error": f"timed out after {timeout_s:.0f} s"}
    proc.join(60)
    if result is None:
        code = proc.exitcode
        why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return {"status": "failed", "error": f"child process died ({why}), e.g. out of memory"}
    return result


# --------------------------------------------------------------------------- environment


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Versions, CPU, git commit and date of this run."""
    import onnx

    from benchmarks.peers import peer_versions

    status = _git("status", "--porcelain", "--untracked-files=no")
    versions = peer_versions()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": versions["onnxruntime"],
        "onnxslim": versions["onnxslim"],
        "onnxsim": versions["onnxsim"],
    }


# --------------------------------------------------------------------------- measuring


def _file_size(path: Path) -> int:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


def _cost(path: Path, shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    from onnxslim_edge.analysis import model_cost
    from onnxslim_edge.model import load_model

    model = load_model(path)
    wanted = {i.name for i in model.graph.input}
    try:
        cost = model_cost(model, {k: v for k, v in shapes.items() if k in wanted})
    except Exception as exc:  # e.g. shapes that a quantized graph's inference rejects
        log.warning("cost at the latency shape failed (%s); symbolic dims count as 1", exc)
        cost = model_cost(model)
    ops = sorted(cost.ops.items(), key=lambda kv: -kv[1])
    return {
        "size_bytes": _file_size(path),
        "params": cost.params,
        "weights": _weight_elements(model),
        "macs": cost.macs,
        "nodes": cost.nodes,
        "ops": dict(ops),
    }


def _weight_elements(model: Any) -> int:
    """Elements of every constant tensor of rank >= 1, any dtype (int8 weights included)."""
    total = sum(math.prod(t.dims) for t in model.graph.initializer if len(t.dims) >= 1)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and len(attr.t.dims) >= 1:
                    total += math.prod(attr.t.dims)
    return total


def _verify(spec: ModelSpec, candidate: Path) -> dict[str, Any]:
    from onnxslim_edge.verify import compare

    data = spec.evaluation[: spec.verify_limit] if spec.verify_limit else spec.evaluation
    result = compare(
        spec.path,
        candidate,
        data=data,
        rtol=FIDELITY_TOLERANCE,
        atol=FIDELITY_TOLERANCE,
        atol_mode="range",
    )
    outputs = {}
    for name, m in result.outputs.items():
        d = m.to_dict()
        outputs[name] = {
            k: d.get(k)
            for k in ("cosine", "sqnr_db", "max_abs_error", "top1_agreement", "kl_divergence")
        }
    return {
        "equal": bool(result.passed),
        "samples": result.samples,
        "outputs": outputs,
        "messages": list(result.messages),
    }


def _kind(method: MethodSpec) -> str:
    """The method's kind; for our recipes "quantize" once the recipe holds a lossy pass."""
    recipe = {"ours-lossless": "lossless", "ours-edge": "edge"}.get(method.name)
    if recipe is None:
        return method.kind
    from onnxslim_edge.pipeline import load_recipe

    try:
        passes = load_recipe(recipe_path(recipe)).passes
    except Exception:  # a recipe naming a pass that is not there yet: the run will say so
        return method.kind
    return method.kind if all(p.lossless for p in passes) else "quantize"


def _available(method: MethodSpec) -> str | None:
    for module in method.requires:
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        except ModuleNotFoundError:
            return f"{module.partition('.')[0]} is not installed"
    return None


def run_model(spec: ModelSpec, settings: BenchmarkSettings, workdir: Path) -> dict[str, Any]:
    """Every method on `spec`; returns the JSON-ready results (see the module docstring)."""
    methods = [
        m
        for m in METHODS
        if (settings.methods is None or m.name in settings.methods or m.kind == "baseline")
        and (m.models is None or spec.name in m.models)
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    feeds_path = workdir / "calibration.npz"
    save_feeds(spec.calibration, feeds_path)
    shapes1 = {k: tuple(v.shape) for k, v in spec.latency_feeds[1].items()}
    results: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    for method in methods:
        entry: dict[str, Any] = {
            "label": method.label,
            "kind": _kind(method),
            "tool": method.tool,
            "params": dict(method.params),
            "status": "ok",
            "error": None,
        }
        results[method.name] = entry
        if method.function is None:
            paths[method.name] = spec.path
            entry["optimize"] = None
            continue
        missing = _available(method)
        if missing:
            entry.update(status="unavailable", error=missing)
            log.warning("%s/%s: %s", spec.name, method.name, missing)
            continue
        out = workdir / f"{method.name}.onnx"
        log.info("%s: running %s", spec.name, method.name)
        child = run_in_child(
            method.function,
            (spec.path, out),
            params=method.params,
            feeds_path=feeds_path,
            timeout_s=settings.method_timeout_s,
        )
        if child["status"] != "ok":
            entry.update(status="failed", error=child["error"], stage="optimize")
            log.warning("%s/%s failed: %s", spec.name, method.name, child["error"])
            continue
        entry["optimize"] = {
            "wall_s": child["wall_s"],
            "peak_rss_mb": child["peak_rss_mb"],
            "rss_before_mb": child["rss_before_mb"],
        }
        entry["notes"] = child.get("notes", {})
        paths[method.name] = out

    for name, path in list(paths.items()):
        entry = results[name]
        try:
            entry["cost"] = _cost(path, shapes1)
            entry["fidelity"] = spec.fidelity(spec.path, path)
            entry["verify"] = _verify(spec, path)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            entry.update(status="failed", error=f"{type(exc).__name__}: {first}", stage="evaluate")
            log.warning("%s/%s evaluation failed: %s", spec.name, name, first)
            del paths[name]

    latency: dict[str, dict[str, Any]] = {name: {} for name in paths}
    for batch, feeds in sorted(spec.latency_feeds.items()):
        stats = _measure(paths, feeds, settings, results)
        for name, s in stats.items():
            latency[name][f"batch_{batch}"] = s.to_dict() | {
                "shape": {k: list(v.shape) for k, v in feeds.items()}
            }
    base = latency.get("fp32", {})
    for name in paths:
        entry = results[name]
        if entry["status"] != "ok":
            continue
        entry["latency"] = latency[name]
        entry["latency_ratio"] = {
            key: (s["median_ms"] / base[key]["median_ms"]) if key in base else None
            for key, s in latency[name].items()
        }
    for entry in results.values():
        if entry["status"] == "ok" and ("latency" not in entry or len(entry["latency"]) < 2):
            entry.update(status="failed", error="latency was not measured", stage="latency")

    return {
        "model": spec.name,
        "title": spec.title,
        "source": spec.source,
        "primary": spec.primary,
        "primary_label": spec.primary_label,
        "data": {
            "notes": spec.data_notes,
            "calibration_samples": len(spec.calibration),
            "evaluation_feeds": len(spec.evaluation),
            "verify_feeds": min(len(spec.evaluation), spec.verify_limit or len(spec.evaluation)),
        },
        "settings": dataclasses.asdict(settings) | {"tolerance": FIDELITY_TOLERANCE},
        "environment": environment(),
        "methods": results,
    }


def calibration_memory(
    name: str,
    settings: BenchmarkSettings,
    workdir: Path,
    *,
    sizes: Sequence[int] = (32, 128),
) -> dict[str, Any]:
    """Quantization wall time and peak memory with calibration sets of each size in `sizes`.

    The model spec is built once with the largest size; each smaller set is its first
    samples. Each quantizer (ours with `minmax`, ORT's MinMax) runs in a fresh child per
    size. `flat` compares the largest set's peak resident set with the smallest's (within
    10 %); `growth_mb` is the difference, `call_growth_mb` the same for the memory the call
    itself added (peak minus the resident set before the call, which holds the feeds).
    """
    spec = build_spec(name, dataclasses.replace(settings, calibration_samples=max(sizes)))
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"sizes": list(sizes), "methods": {}}
    for label, function, params in CALIBRATION_MEMORY_METHODS:
        runs: dict[str, Any] = {}
        for n in sizes:
            feeds_path = workdir / f"calibration-{n}.npz"
            if not feeds_path.exists():
                save_feeds(spec.calibration[:n], feeds_path)
            child = run_in_child(
                function,
                (spec.path, workdir / f"{label}-{n}.onnx"),
                params=params,
                feeds_path=feeds_path,
                timeout_s=settings.method_timeout_s,
            )
            runs[str(n)] = {k: child.get(k) for k in ("status", "error", "wall_s")} | {
                "peak_rss_mb": child.get("peak_rss_mb"),
                "rss_before_mb": child.get("rss_before_mb"),
            }
        small, large = runs[str(min(sizes))], runs[str(max(sizes))]
        entry: dict[str, Any] = {"runs": runs}
        if small["status"] == "ok" and large["status"] == "ok":
            entry["growth_mb"] = large["peak_rss_mb"] - small["peak_rss_mb"]
            entry["peak_ratio"] = large["peak_rss_mb"] / small["peak_rss_mb"]
            entry["call_growth_mb"] = (large["peak_rss_mb"] - large["rss_before_mb"]) - (
                small["peak_rss_mb"] - small["rss_before_mb"]
            )
            entry["flat"] = entry["peak_ratio"] <= CALIBRATION_MEMORY_FLAT_RATIO
        out["methods"][label] = entry
    return out


def _measure(
    paths: dict[str, Path],
    feeds: Mapping[str, np.ndarray],
    settings: BenchmarkSettings,
    results: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Interleaved latency of every model; a model ONNX Runtime refuses is dropped and marked."""
    from onnxslim_edge.timing import measure_latency

    live = paths
    while live:
        try:
            return measure_latency(
                live, feeds, runs=settings.runs, warmup=settings.warmup, threads=settings.threads
            )
        except Exception as exc:
            bad = _first_unrunnable(live, feeds, settings.threads)
            if bad is None:
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            results[bad].update(status="failed", error=f"latency: {first}", stage="latency")
            del live[bad]
    return {}


def _first_unrunnable(
    paths: Mapping[str, Path], feeds: Mapping[str, np.ndarray], threads: int
) -> str | None:
    from onnxslim_edge.runtime import make_session

    for name, path in paths.items():
        try:
            sess = make_session(path, threads=threads)
            wanted = {i.name for i in sess.get_inputs()}
            sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
        except Exception:
            return name
    return None


def cleanup_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def default_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="onnxslim-edge-bench-"))
