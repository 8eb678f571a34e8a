"""Regression checks for CI: snapshot a model's signature, then compare a candidate with it.

`snapshot(model, data, "golden/")` writes a golden folder, whole or not at all (a
temporary sibling folder renamed at the end):

    golden/model.onnx       the golden model itself (latency budgets re-time it)
    golden/inputs.json      the inputs, Polygraphy's JSON (a list of feed dicts)
    golden/outputs.json     its outputs on them, a Polygraphy `RunResults`
    golden/signature.json   I/O names/dtypes/shapes, op histogram, nodes, params,
                            size, MACs, the model's SHA-256, optionally a latency
                            figure with the machine it was measured on

so `polygraphy run golden/model.onnx --onnxrt --load-inputs golden/inputs.json
--load-outputs golden/outputs.json` replays the check without this package.

`regress(candidate, "golden/", budget="size=+2%,macs=0,nodes=+0,latency=+10%")`
compares: the interface (a renamed, retyped or reshaped input/output is a regression),
the cost against the budget, the outputs on the stored inputs against the stored
outputs (element-wise tolerances, or fidelity floors such as a minimum cosine), and,
for a latency budget, the candidate timed side by side with the golden model in the
same run (`onnxslim_edge.timing.measure_latency`): a stored absolute time is never a
reference, only a note of what the snapshot machine measured.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxslim_edge import polygraphy_io
from onnxslim_edge.errors import ConfigError, DataError, OnnxSlimEdgeError, first_line
from onnxslim_edge.model import ModelSource, load_model, new_file_mode, save_model

__all__ = [
    "BUDGET_KEYS",
    "GOLDEN_FILES",
    "Change",
    "Limit",
    "RegressResult",
    "Snapshot",
    "atomic_folder",
    "load_golden",
    "model_signature",
    "parse_budget",
    "regress",
    "snapshot",
]

log = logging.getLogger(__name__)

#: The files of a golden folder.
GOLDEN_FILES = ("model.onnx", "inputs.json", "outputs.json", "signature.json")
#: Budget keys: cost figures of the signature and the side-by-side latency ratio.
BUDGET_KEYS = ("nodes", "params", "size", "macs", "latency")
_SIGNATURE_KEYS = {"nodes": "nodes", "params": "params", "size": "size_bytes", "macs": "macs"}
_FORMAT = 1


# --------------------------------------------------------------------------- folders


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one
    rename, on any error it is removed and `path` is left as it was (missing parent
    folders are created, and removed again on error).

    An existing non-empty `path` needs `overwrite` (raises ConfigError otherwise)."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"{target}: folder exists and is not empty; pass overwrite to replace it")
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    if any(p.exists() and not p.is_dir() for p in parent.parents):
        raise ConfigError(f"{target}: a parent of it is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{target}: cannot create folder {parent} ({exc.strerror})") from exc
    done = False
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    os.chmod(tmp, new_file_mode(executable=True))  # mkdtemp makes it private; a result is not
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.replace(target, old / "previous")
        os.replace(tmp, target)
        done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for folder in created:  # innermost first: remove the parents made for it
                with contextlib.suppress(OSError):
                    folder.rmdir()


# --------------------------------------------------------------------------- signature


def model_signature(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Any]:
    """The comparable facts of a model: interface, op histogram and cost (analysis.cost)."""
    from onnxslim_edge.analysis import io_info, model_cost

    cost = model_cost(model, input_shapes=input_shapes)
    inputs, outputs = io_info(model)
    return {
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [_tensor(t) for t in inputs],
        "outputs": [_tensor(t) for t in outputs],
        "nodes": cost.nodes,
        "params": cost.params,
        "size_bytes": cost.size_bytes,
        "macs": cost.macs,
        "ops": cost.ops,
    }


def _tensor(t: Any) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _machine() -> dict[str, Any]:
    """What a latency figure was measured on (for reading it, never for comparing)."""
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


# --------------------------------------------------------------------------- running


def _run_outputs(
    model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]
) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """Outputs (and inference times) per feed, from Polygraphy's ONNX Runtime runner."""
    from onnxslim_edge.verify import _quiet_polygraphy, _runner

    results, times = [], []
    with _quiet_polygraphy(), _runner(model, "golden") as runner:
        for i, feed in enumerate(feeds):
            try:
                out = runner.infer(feed, check_inputs=False)
            except Exception as exc:
                raise DataError(
                    f"ONNX Runtime failed on input batch {i}: {first_line(exc)}"
                ) from exc
            results.append({k: np.array(v) for k, v in out.items()})
            times.append(runner.last_inference_time())
    return results, times


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """A golden folder: its path and signature (`signature.json`)."""

    path: Path
    signature: dict[str, Any]


def snapshot(
    model: ModelSource,
    data: Any,
    output: str | os.PathLike,
    *,
    samples: int | None = None,
    batch_size: int = 1,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    latency_runs: int = 0,
    overwrite: bool = False,
    seed: int = 0,
) -> Snapshot:
    """Write the golden folder `output` for `model` on `data` (see the module docstring).

    `data`: anything `open_data` accepts ("random" gives synthetic inputs, marked so).
    `latency_runs` > 0 also records the model's median latency and the machine.
    `overwrite` replaces an existing non-empty folder (atomically).
    """
    from onnxslim_edge.data import open_data

    if latency_runs < 0:
        raise ConfigError(f"latency_runs must be >= 0, not {latency_runs}")
    proto = load_model(model)
    source = open_data(
        data, proto, batch_size=batch_size, limit=samples, input_shapes=input_shapes, seed=seed
    )
    feeds = [dict(feed) for feed in source]
    if not feeds:
        raise DataError(f"{source.describe()}: no samples to record")
    count = sum(next(iter(f.values())).shape[0] if f else 0 for f in feeds)
    results, times = _run_outputs(proto, feeds)
    signature = model_signature(proto, input_shapes)
    signature.update(
        {
            "format": _FORMAT,
            "model": Path(model).name if isinstance(model, (str, os.PathLike)) else "<model>",
            "samples": count,
            "batches": len(feeds),
            "data": source.describe(),
            "synthetic": source.is_synthetic,
            "latency": None,
        }
    )
    if latency_runs:
        from onnxslim_edge.timing import measure_latency

        stats = measure_latency({"golden": proto}, feeds[0], runs=latency_runs)["golden"]
        signature["latency"] = {
            **stats.to_dict(),
            "machine": _machine(),
            "note": "for reading only: a latency budget re-times the golden model",
        }
    with atomic_folder(output, overwrite=overwrite) as tmp:
        save_model(proto, tmp / "model.onnx")
        polygraphy_io.save_inputs(feeds, tmp / "inputs.json")
        polygraphy_io.save_run_results(results, tmp / "outputs.json", runtimes=times)
        signature["model_sha256"] = _sha256(tmp / "model.onnx")
        (tmp / "signature.json").write_text(json.dumps(signature, indent=2) + "\n")
    log.info("snapshot of %s: %d sample(s) in %s", signature["model"], count, output)
    return Snapshot(path=Path(output), signature=signature)


# --------------------------------------------------------------------------- golden


@dataclass(frozen=True, kw_only=True)
class Golden:
    """A loaded golden folder."""

    path: Path
    signature: dict[str, Any]
    model_path: Path
    inputs: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]


def load_golden(path: str | os.PathLike) -> Golden:
    """Read and check a golden folder; DataError naming the file for anything wrong."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: golden folder not found (create it with snapshot)")
    missing = [n for n in GOLDEN_FILES if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"{folder}: missing {', '.join(missing)}; not a golden folder (create it with snapshot)"
        )
    try:
        signature = json.loads((folder / "signature.json").read_text(encoding="utf-8"))
        if not isinstance(signature, dict) or signature.get("format") != _FORMAT:
            raise ValueError(f"not a format-{_FORMAT} signature")
        for key in ("inputs", "outputs", "model_sha256", *_SIGNATURE_KEYS.values()):
            if key not in signature:
                raise ValueError(f"no '{key}'")
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{folder / 'signature.json'}: malformed ({first_line(exc)})") from exc
    model_path = folder / "model.onnx"
    if _sha256(model_path) != signature["model_sha256"]:
        raise DataError(
            f"{model_path}: does not match the SHA-256 in signature.json (edited by hand?); "
            "re-create the folder with snapshot"
        )
    inputs = polygraphy_io.load_inputs(folder / "inputs.json")
    outputs = polygraphy_io.load_run_results(folder / "outputs.json")
    if len(outputs) != len(inputs):
        raise DataError(
            f"{folder}: {len(inputs)} input batch(es) but {len(outputs)} output batch(es)"
        )
    return Golden(
        path=folder, signature=signature, model_path=model_path, inputs=inputs, outputs=outputs
    )


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True, kw_only=True)
class Limit:
    """How much a figure may grow: `value` percent (`percent`) or units over the golden."""

    value: float
    percent: bool

    def allowed(self, golden: float) -> float:
        return golden * (1 + self.value / 100) if self.percent else golden + self.value

    def __str__(self) -> str:
        text = f"{self.value:+g}"
        return text + "%" if self.percent else text


_LIMIT = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*(%?)\s*$")


def parse_budget(spec: str | Mapping[str, Any] | None) -> dict[str, Limit]:
    """`"size=+2%,macs=0,nodes=+0,latency=+10%"` -> {key: Limit}.

    A value is how much the figure may grow over the golden one: `+2%`, `0` (no
    growth), `+100` (units), `-5%` (must shrink by 5 %). `latency` takes percent only:
    it is judged as the ratio of side-by-side medians. A mapping may hold Limits or
    the same strings. Raises ConfigError naming the bad item."""
    if spec is None:
        return {}
    items = spec.items() if isinstance(spec, Mapping) else _budget_items(spec)
    out: dict[str, Limit] = {}
    for key, value in items:
        if key not in BUDGET_KEYS:
            raise ConfigError(f"budget: unknown key '{key}'; valid: {', '.join(BUDGET_KEYS)}")
        if key in out:
            raise ConfigError(f"budget: '{key}' given twice")
        if isinstance(value, Limit):
            limit = value
        else:
            match = _LIMIT.match(str(value))
            if not match:
                raise ConfigError(
                    f"budget: {key}={value}: expected a number with an optional sign and %, "
                    "e.g. +2% or 0"
                )
            limit = Limit(value=float(match.group(1)), percent=bool(match.group(2)))
        if not math.isfinite(limit.value):
            raise ConfigError(f"budget: {key}={value}: not a finite number")
        if key == "latency" and not limit.percent:
            raise ConfigError(
                f"budget: latency={value}: give a percentage (e.g. +10%); latency is judged "
                "as a side-by-side ratio, never in absolute time"
            )
        if limit.percent and limit.value <= -100:
            raise ConfigError(f"budget: {key}={value}: a figure cannot shrink by 100% or more")
        out[key] = limit
    return out


def _budget_items(text: str) -> Iterator[tuple[str, str]]:
    if not text.strip():
        raise ConfigError("budget: empty; expected KEY=LIMIT[,KEY=LIMIT...]")
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"budget: '{item.strip()}': expected KEY=LIMIT, e.g. size=+2%")
        yield key.strip(), value.strip()


# --------------------------------------------------------------------------- result


@dataclass(kw_only=True)
class Change:
    """One figure, golden vs candidate, and its budget (None: reported, not judged)."""

    key: str
    golden: float
    candidate: float
    limit: Limit | None = None

    @property
    def delta(self) -> float:
        return self.candidate - self.golden

    @property
    def percent(self) -> float | None:
        return 100 * self.delta / self.golden if self.golden else None

    @property
    def broken(self) -> bool:
        return self.limit is not None and self.candidate > self.limit.allowed(self.golden) + 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "golden": self.golden,
            "candidate": self.candidate,
            "delta": self.delta,
            "percent": self.percent,
            "budget": str(self.limit) if self.limit is not None else None,
            "broken": self.broken,
        }


def _human(key: str, value: float) -> str:
    if key == "latency":
        return f"{value:.3f} ms"
    return f"{int(value):,}" + (" B" if key == "size" else "")


@dataclass(kw_only=True)
class RegressResult:
    """The comparison of a candidate with a golden folder; `passed` when nothing regressed."""

    golden: str
    candidate: str
    changes: list[Change]
    interface: list[str]
    ops: dict[str, tuple[int, int]]
    fidelity: Any  # verify.VerifyResult
    fidelity_misses: list[str]
    criterion: str
    latency: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "golden": self.golden,
            "candidate": self.candidate,
            "problems": list(self.problems),
            "changes": [c.to_dict() for c in self.changes],
            "interface": list(self.interface),
            "ops": {op: {"golden": g, "candidate": c} for op, (g, c) in self.ops.items()},
            "fidelity": {
                "criterion": self.criterion,
                "misses": list(self.fidelity_misses),
                **self.fidelity.to_dict(),
            },
            "latency": self.latency,
        }

    def to_text(self) -> str:
        lines = [f"regress {self.candidate} against {self.golden}"]
        rows = [("", "golden", "candidate", "change", "budget", "")]
        for c in self.changes:
            pct = c.percent
            change = f"{c.delta:+g}" if c.key != "latency" else f"{c.delta:+.3f} ms"
            if pct is not None:
                change += f" ({pct:+.1f}%)"
            rows.append(
                (
                    c.key,
                    _human(c.key, c.golden),
                    _human(c.key, c.candidate),
                    change if c.delta else "=",
                    str(c.limit) if c.limit is not None else "-",
                    "BROKEN" if c.broken else "",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  " + "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
        if self.latency is not None:
            lines.append(
                f"  latency timed side by side in this run ({self.latency['runs']} runs each): "
                f"candidate/golden = {self.latency['ratio']:.3f}"
            )
        if self.ops:
            diff = ", ".join(f"{op} {g} -> {c}" for op, (g, c) in self.ops.items())
            lines.append(f"  ops: {diff}")
        lines.append("  interface: " + ("; ".join(self.interface) or "unchanged"))
        lines.append(f"  outputs: {self.fidelity.summary()}")
        if "min_" in self.criterion or "max_abs" in self.criterion:
            lines.append(f"  judged by: {self.criterion}")
        if self.fidelity_misses:
            lines.extend(f"    {m}" for m in self.fidelity_misses)
        if self.problems:
            lines.append("REGRESSION: " + "; ".join(self.problems))
        else:
            lines.append("OK: no regression")
        return "\n".join(lines)


# --------------------------------------------------------------------------- regress


def _interface_changes(golden: Mapping[str, Any], cand: Mapping[str, Any]) -> list[str]:
    changes = []
    for kind in ("inputs", "outputs"):
        old = {t["name"]: t for t in golden[kind]}
        new = {t["name"]: t for t in cand[kind]}
        noun = kind[:-1]
        changes += [f"{noun} '{n}' removed" for n in old if n not in new]
        changes += [f"{noun} '{n}' added" for n in new if n not in old]
        for name in old.keys() & new.keys():
            a, b = old[name], new[name]
            if a["dtype"] != b["dtype"]:
                changes.append(f"{noun} '{name}': dtype {a['dtype']} -> {b['dtype']}")
            if list(a["shape"]) != list(b["shape"]):
                changes.append(f"{noun} '{name}': shape {a['shape']} -> {b['shape']}")
    return changes


def _op_changes(golden: Mapping[str, int], cand: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    ops = sorted(set(golden) | set(cand))
    return {
        op: (golden.get(op, 0), cand.get(op, 0))
        for op in ops
        if golden.get(op, 0) != cand.get(op, 0)
    }


def _fidelity(
    golden: Golden,
    candidate: onnx.ModelProto,
    *,
    rtol: float,
    atol: float,
    atol_mode: str,
) -> Any:
    """Candidate outputs on the stored inputs against the stored outputs (a VerifyResult)."""
    from onnxslim_edge.errors import UnsupportedError
    from onnxslim_edge.verify import _quiet_polygraphy, _runner

    wanted = {i.name for i in candidate.graph.input}
    messages: list[str] = []
    outputs: list[dict[str, np.ndarray]] = []
    samples = 0
    with _quiet_polygraphy(), contextlib.ExitStack() as stack:
        try:
            runner = stack.enter_context(_runner(candidate, "candidate"))
        except UnsupportedError as exc:
            runner = None
            messages.append(str(exc))
        for feed in golden.inputs:
            if runner is None:
                break
            try:
                out = runner.infer(
                    {k: v for k, v in feed.items() if k in wanted}, check_inputs=False
                )
            except Exception as exc:
                messages.append(f"candidate: ONNX Runtime failed: {first_line(exc)}")
                break
            outputs.append(dict(out))
            samples += next(iter(feed.values())).shape[0] if feed else 1
    from onnxslim_edge.verify import compare_outputs

    return compare_outputs(
        golden.outputs[: len(outputs)],
        outputs,
        samples=samples,
        rtol=rtol,
        atol=atol,
        atol_mode=atol_mode,
        names=[t["name"] for t in golden.signature["outputs"]],
        data=str(golden.path / "inputs.json"),
        synthetic=bool(golden.signature.get("synthetic")),
        messages=messages,
    )


def regress(
    candidate: ModelSource,
    golden: str | os.PathLike,
    *,
    budget: str | Mapping[str, Any] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    atol_mode: str = "range",
    floors: Mapping[str, float] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    latency_runs: int = 30,
) -> RegressResult:
    """Compare `candidate` with the golden folder `golden` (see the module docstring).

    Outputs are judged element-wise (`rtol`, `atol`; defaults 1e-5 and 1e-5 of each
    output's range) unless `floors` (verify.FLOOR_KEYS, e.g. {"min_cosine": 0.999}) are
    given, which then judge alone unless rtol/atol are also given. Raises DataError /
    ConfigError / InvalidModelError for bad input; a regression is a result, not an error.
    """
    from onnxslim_edge.verify import FLOOR_KEYS

    limits = parse_budget(budget)
    floors = dict(floors or {})
    unknown = sorted(set(floors) - set(FLOOR_KEYS))
    if unknown:
        raise ConfigError(f"unknown floor(s) {', '.join(unknown)}; valid: {', '.join(FLOOR_KEYS)}")
    bad = [f"{k}={v}" for k, v in floors.items() if not math.isfinite(float(v))]
    if bad:
        raise ConfigError(f"fidelity floors must be finite numbers (got {', '.join(bad)})")
    elementwise = not floors or rtol is not None or atol is not None
    rtol = 1e-5 if rtol is None else rtol
    atol = 1e-5 if atol is None else atol
    if rtol < 0 or atol < 0 or not (math.isfinite(rtol) and math.isfinite(atol)):
        raise ConfigError(f"rtol and atol must be finite and >= 0 (got {rtol}, {atol})")
    if atol_mode not in ("absolute", "range"):
        raise ConfigError(f"atol_mode must be absolute or range, not {atol_mode!r}")
    if latency_runs < 1:
        raise ConfigError(f"latency_runs must be >= 1, not {latency_runs}")
    gold = load_golden(golden)
    cand = load_model(candidate)
    label = str(candidate) if isinstance(candidate, (str, os.PathLike)) else "<candidate>"
    sig = model_signature(cand, input_shapes)
    changes = [
        Change(
            key=key,
            golden=float(gold.signature[field_]),
            candidate=float(sig[field_]),
            limit=limits.get(key),
        )
        for key, field_ in _SIGNATURE_KEYS.items()
    ]
    problems = [
        f"{c.key} {c.delta:+g}"
        + (f" ({c.percent:+.1f}%)" if c.percent is not None else "")
        + f" exceeds budget {c.limit}"
        for c in changes
        if c.broken
    ]
    interface = _interface_changes(gold.signature, sig)
    problems += [f"interface: {x}" for x in interface]
    fidelity = _fidelity(gold, cand, rtol=rtol, atol=atol, atol_mode=atol_mode)
    misses = fidelity.check_floors(floors) if floors else []
    parts = []
    if elementwise:
        parts.append(fidelity._tolerance())
        if not fidelity.passed:
            problems.append(f"outputs: {fidelity.summary()}")
    if floors:
        parts.append(", ".join(f"{k} {v:g}" for k, v in floors.items()))
        problems += [f"outputs: {m}" for m in dict.fromkeys(misses)]
    latency = None
    if "latency" in limits and fidelity.messages:
        problems.append("latency: not timed, the candidate does not run on the golden inputs")
    elif "latency" in limits:
        latency = _latency(gold, cand, latency_runs)
        change = Change(
            key="latency",
            golden=latency["golden_ms"],
            candidate=latency["candidate_ms"],
            limit=limits["latency"],
        )
        changes.append(change)
        if change.broken:
            problems.append(
                f"latency x{latency['ratio']:.3f} side by side exceeds budget {change.limit}"
            )
    return RegressResult(
        golden=str(gold.path),
        candidate=label,
        changes=changes,
        interface=interface,
        ops=_op_changes(gold.signature.get("ops", {}), sig["ops"]),
        fidelity=fidelity,
        fidelity_misses=misses,
        criterion="; ".join(parts),
        latency=latency,
        problems=problems,
    )


def _latency(gold: Golden, cand: onnx.ModelProto, runs: int) -> dict[str, Any]:
    from onnxslim_edge.timing import measure_latency

    feed = gold.inputs[0]
    try:
        stats = measure_latency(
            {"golden": load_model(gold.model_path), "candidate": cand}, feed, runs=runs
        )
    except OnnxSlimEdgeError:
        raise
    except Exception as exc:  # a candidate ORT cannot run on the golden inputs
        raise DataError(f"latency: cannot time the models: {first_line(exc)}") from exc
    g, c = stats["golden"].median_ms, stats["candidate"].median_ms
    return {
        "golden_ms": g,
        "candidate_ms": c,
        "ratio": c / g if g > 0 else math.inf,
        "runs": runs,
        "golden": stats["golden"].to_dict(),
        "candidate": stats["candidate"].to_dict(),
    }
