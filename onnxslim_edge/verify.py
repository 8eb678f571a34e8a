"""The fidelity engine: one way to measure a candidate model against a reference.

`Evaluator(reference, data)` runs the reference through Polygraphy's ONNX Runtime
runner (`polygraphy.backend.onnxrt.OnnxrtRunner`) on the data and `score(candidate)`
runs a candidate on the same inputs, batch by batch, accumulating per output name error
metrics that need no stored outputs, so batches may differ in shape (text lines of
other widths, crops of other sizes):

- max_abs_error, mean_abs_error, max_rel_error = max |c - r| / max(|r|, tiny);
- cosine similarity and SQNR = 10 log10(sum r^2 / sum (r - c)^2) over all elements of
  all samples (SQNR is +inf for identical outputs; `to_dict` writes non-finite numbers
  as null);
- for 2-D float outputs (N, classes > 1): top-1 agreement over all rows and the mean KL
  divergence KL(softmax(r) || softmax(c)) over the rows finite in both;
- task metrics from a callback `task(feed, reference_outputs, candidate_outputs) ->
  {name: value}` per batch, averaged over batches weighted by their samples;
- pass/fail: |c - r| <= atol_eff + rtol |r| at every element, atol_eff = atol
  ("absolute") or atol * max |r| over the whole output ("range"); `atol` may also map
  output names to absolute tolerances (the lossless checks' per-output noise floors),
  reported as each output's `tolerance`.

Non-finite values, one rule everywhere: NaN in both at the same place counts as equal,
as do equal infinities; the metrics above are taken over the elements finite in both;
every other NaN/inf (e.g. NaN in the candidate where the reference is finite) is a
*mismatch*, counted in `nonfinite_mismatches`: the output fails its tolerance, misses
every fidelity floor (`FLOOR_KEYS`, `Fidelity.misses`), its rows count as top-1
disagreements, and rankings (`Fidelity.rank_key`) put it below any finite result.

With `cache=True` (the default) the evaluator keeps the reference outputs and the
feeds of at most `max_samples` samples, for scoring many candidates (the quantize
fallback, sensitivity ranking, held-out evaluation); with `cache=False` it keeps
nothing and re-runs the reference beside each candidate, so memory stays flat however
many samples (`compare`, one candidate, any amount of data).

`compare(reference, candidate, data)` is `Evaluator(..., cache=False).score(candidate)`.
Outputs missing from the candidate, shape changes and a candidate ONNX Runtime cannot
run give a failed result with a message, not an exception.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from onnxslim_edge.data import _model_inputs, open_data
from onnxslim_edge.errors import ConfigError, UnsupportedError, first_line
from onnxslim_edge.model import (
    STREAM_THRESHOLD,
    ModelSource,
    load_model,
    model_bytes,
    model_on_disk,
)

__all__ = [
    "FLOOR_KEYS",
    "FLOOR_SPECS",
    "Evaluator",
    "Fidelity",
    "OutputMetrics",
    "TaskMetric",
    "VerifyResult",
    "compare",
    "compare_outputs",
]

log = logging.getLogger(__name__)

#: Fidelity floors `Fidelity.misses` understands: key -> (OutputMetrics attribute, label,
#: +1 for a lower bound / -1 for an upper bound).
_FLOORS = {
    "min_top1_agreement": ("top1_agreement", "top-1 agreement", 1),
    "min_cosine": ("cosine", "cosine", 1),
    "min_sqnr_db": ("sqnr_db", "SQNR", 1),
    "max_abs_error": ("max_abs_error", "max abs error", -1),
}
#: The fidelity floors a recipe, a pass or a caller may demand (the one list).
FLOOR_KEYS = tuple(_FLOORS)
#: Each floor's (Fidelity attribute of its worst output, label, +1 lower / -1 upper bound).
FLOOR_SPECS = dict(_FLOORS)

#: A task metric: `task(feed, reference_outputs, candidate_outputs) -> {name: value}`
#: for one batch; the values are averaged over batches, weighted by their samples.
TaskMetric = Callable[
    [Mapping[str, np.ndarray], Mapping[str, np.ndarray], Mapping[str, np.ndarray]],
    Mapping[str, float],
]

_TINY = float(np.finfo(np.float32).tiny)
_DEFAULT_RANDOM_SAMPLES = 4


@dataclass
class OutputMetrics:
    """Fidelity of one output over every sample compared.

    Metrics are None where undefined (no elements, non-numeric output, a failure that
    stopped the comparison; top-1/KL for anything but 2-D float logits). `shape` is the
    reference output's shape for the first batch; `elements` counts all compared.
    """

    name: str
    shape: tuple[int, ...] | None = None
    elements: int = 0
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    mean_abs_error: float | None = None
    cosine: float | None = None
    sqnr_db: float | None = None
    top1_agreement: float | None = None
    kl_divergence: float | None = None
    range: float | None = None
    #: The absolute tolerance this output was held to (atol_eff), where numeric.
    tolerance: float | None = None
    nonfinite_mismatches: int = 0
    passed: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape) if self.shape is not None else None
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        return out


class _Accumulator:
    """Running sums for one output; `update` per batch, `finish` once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.shape: tuple[int, ...] | None = None
        self.numeric = True
        self.error: str | None = None
        self.n = 0
        self.n_finite = 0
        self.sum_abs = 0.0
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.dot = self.rr = self.cc = self.ee = 0.0
        self.range = 0.0
        self.worst = -math.inf  # max over elements of |c - r| - rtol |r|
        self.nonfinite = 0
        self.top1_rows = self.top1_agree = 0
        self.kl_rows = 0
        self.kl_sum = 0.0
        self.logits: bool | None = None
        self.exact_mismatch = False

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message

    def update(self, ref: np.ndarray, cand: np.ndarray, rtol: float) -> None:
        if self.error is not None:
            return
        ref, cand = np.asarray(ref), np.asarray(cand)
        if self.shape is None:
            self.shape = tuple(ref.shape)
        if ref.shape != cand.shape:
            self.fail(
                f"output '{self.name}': shape {_shape(ref.shape)} in the reference but "
                f"{_shape(cand.shape)} in the candidate"
            )
            return
        self.n += ref.size
        if ref.dtype.kind not in "biuf" or cand.dtype.kind not in "biuf":
            self.numeric = False
            if not np.array_equal(ref, cand):
                self.exact_mismatch = True
            return
        if self.logits is None:
            self.logits = ref.ndim == 2 and ref.shape[1] > 1 and ref.dtype.kind == "f"
        r = ref.astype(np.float64, copy=False).ravel()
        c = cand.astype(np.float64, copy=False).ravel()
        finite = np.isfinite(r) & np.isfinite(c)
        if not finite.all():
            bad = ~finite
            same = (r[bad] == c[bad]) | (np.isnan(r[bad]) & np.isnan(c[bad]))
            self.nonfinite += int((~same).sum())
            r, c = r[finite], c[finite]
        if r.size:
            diff = np.abs(c - r)
            absr = np.abs(r)
            self.n_finite += r.size
            self.sum_abs += float(diff.sum())
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_rel = max(self.max_rel, float((diff / np.maximum(absr, _TINY)).max()))
            self.dot += float(r @ c)
            self.rr += float(r @ r)
            self.cc += float(c @ c)
            self.ee += float(diff @ diff)
            self.range = max(self.range, float(absr.max()))
            self.worst = max(self.worst, float((diff - rtol * absr).max()))
        if self.logits:
            self._update_logits(ref, cand)

    def _update_logits(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r = ref.astype(np.float64, copy=False)
        c = cand.astype(np.float64, copy=False)
        self.top1_rows += r.shape[0]
        agree = np.argmax(r, axis=1) == np.argmax(c, axis=1)
        same = (r == c) | (np.isnan(r) & np.isnan(c))
        mismatch = ~(np.isfinite(r) & np.isfinite(c)) & ~same
        self.top1_agree += int((agree & ~mismatch.any(axis=1)).sum())
        rows = np.isfinite(r).all(axis=1) & np.isfinite(c).all(axis=1)
        if rows.any():
            r, c = r[rows], c[rows]
            log_p = r - _logsumexp(r)
            log_q = c - _logsumexp(c)
            kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
            self.kl_rows += int(rows.sum())
            self.kl_sum += float(kl.sum())

    def finish(self, rtol: float, atol: float, atol_mode: str) -> OutputMetrics:
        m = OutputMetrics(name=self.name, shape=self.shape, elements=self.n, error=self.error)
        if self.error is not None:
            return m
        if not self.numeric:
            m.passed = not self.exact_mismatch
            if self.exact_mismatch:
                m.error = f"output '{self.name}': non-numeric values differ"
            return m
        m.nonfinite_mismatches = self.nonfinite
        if self.n_finite:
            m.max_abs_error = self.max_abs
            m.max_rel_error = self.max_rel
            m.mean_abs_error = self.sum_abs / self.n_finite
            m.range = self.range
            if self.rr == 0 and self.cc == 0:
                m.cosine = 1.0
            elif self.rr == 0 or self.cc == 0:
                m.cosine = 0.0
            else:
                m.cosine = max(-1.0, min(1.0, self.dot / math.sqrt(self.rr * self.cc)))
            if self.ee == 0:
                m.sqnr_db = math.inf
            elif self.rr == 0:
                m.sqnr_db = -math.inf
            else:
                m.sqnr_db = 10 * math.log10(self.rr / self.ee)
        if self.top1_rows:
            m.top1_agreement = self.top1_agree / self.top1_rows
        if self.kl_rows:
            m.kl_divergence = self.kl_sum / self.kl_rows
        atol_eff = atol * self.range if atol_mode == "range" else atol
        m.tolerance = atol_eff
        m.passed = self.nonfinite == 0 and self.worst <= atol_eff
        return m


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=1, keepdims=True))


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


@dataclass(kw_only=True)
class Fidelity:
    """Per-output metrics of one candidate against the reference, and the floor check.

    `messages` are failures of the whole comparison (the candidate cannot run, needs
    inputs the reference does not take, no samples); `task` the task metrics' means.
    """

    outputs: dict[str, OutputMetrics]
    samples: int
    messages: list[str] = field(default_factory=list)
    task: dict[str, float] = field(default_factory=dict)

    def _worst(self, attr: str, pick: Callable[..., Any]) -> float | None:
        values = [getattr(m, attr) for m in self.outputs.values()]
        defined = [v for v in values if v is not None]
        return pick(defined) if defined else None

    @property
    def sqnr_db(self) -> float | None:
        """The lowest SQNR of any output (None where no output has one)."""
        return self._worst("sqnr_db", min)

    @property
    def cosine(self) -> float | None:
        """The lowest cosine of any output."""
        return self._worst("cosine", min)

    @property
    def top1_agreement(self) -> float | None:
        """The lowest top-1 agreement of any 2-D logits output."""
        return self._worst("top1_agreement", min)

    @property
    def kl_divergence(self) -> float | None:
        """The largest KL divergence of any 2-D logits output."""
        return self._worst("kl_divergence", max)

    @property
    def max_abs_error(self) -> float | None:
        """The largest max abs error of any output."""
        return self._worst("max_abs_error", max)

    @property
    def nonfinite_mismatches(self) -> int:
        """NaN/inf mismatches over all outputs (see the module docstring)."""
        return sum(m.nonfinite_mismatches for m in self.outputs.values())

    @property
    def failed(self) -> bool:
        """True when the comparison could not be made or some output has an error or a
        NaN/inf mismatch: every floor is missed, whatever the metrics say."""
        return bool(self.messages) or any(
            m.error is not None or m.nonfinite_mismatches for m in self.outputs.values()
        )

    def rank_key(self, metric: str = "sqnr_db") -> tuple[int, float]:
        """Sort key, lowest = worst: failed candidates first, then by the worst output's
        `metric` (sqnr_db, cosine, top1_agreement: low is bad; kl_divergence: high is
        bad). A metric no output defines sorts last among the finite."""
        if metric not in ("sqnr_db", "cosine", "top1_agreement", "kl_divergence"):
            raise ConfigError(f"unknown fidelity metric {metric!r}")
        value = getattr(self, metric)
        if value is None:
            return (int(not self.failed), math.inf)
        return (int(not self.failed), -value if metric == "kl_divergence" else value)

    def misses(self, floors: Mapping[str, float]) -> list[str]:
        """Misses of fidelity floors (see FLOOR_KEYS), each applied to every output where
        the metric is defined; empty when all are met. An output with an error or a
        NaN/inf mismatch misses every floor."""
        unknown = sorted(set(floors) - set(FLOOR_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown floor(s) {', '.join(unknown)}; valid: {', '.join(FLOOR_KEYS)}"
            )
        if not floors:
            return []
        misses = list(self.messages)
        for m in self.outputs.values():
            if m.error is not None:
                misses.append(m.error)
                continue
            if m.nonfinite_mismatches:
                misses.append(f"output '{m.name}': {m.nonfinite_mismatches} NaN/inf mismatch(es)")
                continue
            for key, floor in floors.items():
                attr, label, sign = _FLOORS[key]
                value = getattr(m, attr)
                if value is None:
                    continue
                if sign > 0 and value < floor:
                    misses.append(f"output '{m.name}': {label} {value:.6g} < floor {floor:.10g}")
                elif sign < 0 and value > floor:
                    misses.append(f"output '{m.name}': {label} {value:.6g} > limit {floor:.10g}")
        return misses

    def worst_metrics(self) -> dict[str, Any]:
        """The worst output's metrics and the task metrics, JSON-safe (non-finite: null)."""
        out: dict[str, Any] = {
            "sqnr_db": self.sqnr_db,
            "cosine": self.cosine,
            "top1_agreement": self.top1_agreement,
            "kl_divergence": self.kl_divergence,
            "max_abs_error": self.max_abs_error,
            "nonfinite_mismatches": self.nonfinite_mismatches,
            "samples": self.samples,
            **self.task,
        }
        return {k: _finite_or_none(v) for k, v in out.items()}


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass(kw_only=True)
class VerifyResult(Fidelity):
    """Per-output metrics and the verdict of one comparison at stated tolerances."""

    synthetic: bool = False
    rtol: float = 1e-5
    atol: float | Mapping[str, float] = 1e-5
    atol_mode: str = "absolute"
    data: str = ""

    @property
    def passed(self) -> bool:
        return not self.messages and all(m.passed for m in self.outputs.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable; non-finite numbers (e.g. SQNR of identical outputs) are null."""
        out = {
            "passed": self.passed,
            "samples": self.samples,
            "synthetic": self.synthetic,
            "data": self.data,
            "rtol": self.rtol,
            "atol": self.atol if isinstance(self.atol, (int, float)) else dict(self.atol),
            "atol_mode": self.atol_mode,
            "messages": list(self.messages),
            "outputs": {name: m.to_dict() for name, m in self.outputs.items()},
        }
        if self.task:
            out["task"] = {k: _finite_or_none(v) for k, v in self.task.items()}
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_table(self) -> str:
        """One row per output."""
        head = (
            "output",
            "shape",
            "max abs",
            "max rel",
            "mean abs",
            "cosine",
            "SQNR dB",
            "top-1",
            "KL",
            "range",
            "ok",
        )
        rows = [head]
        for m in self.outputs.values():
            rows.append(
                (
                    m.name,
                    _shape(m.shape) if m.shape is not None else "-",
                    _fmt(m.max_abs_error),
                    _fmt(m.max_rel_error),
                    _fmt(m.mean_abs_error),
                    _fmt(m.cosine),
                    _fmt(m.sqnr_db),
                    _fmt(m.top1_agreement),
                    _fmt(m.kl_divergence),
                    _fmt(m.range),
                    "yes" if m.passed else "NO",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        kind = "synthetic " if self.synthetic else ""
        lines.append(f"{self.samples} {kind}sample(s); {self._tolerance()}")
        lines.extend(self.messages)
        return "\n".join(lines)

    def _tolerance(self) -> str:
        if not isinstance(self.atol, (int, float)):
            return f"rtol {self.rtol:g}, atol per output (noise floor)"
        if self.atol_mode == "range":
            return f"rtol {self.rtol:g}, atol {self.atol:g} x output range"
        return f"rtol {self.rtol:g}, atol {self.atol:g}"

    def summary(self) -> str:
        """One line: what failed and why, or that all outputs match."""
        problems = list(self.messages)
        for m in self.outputs.values():
            if m.passed:
                continue
            if m.error is not None:
                if m.error not in problems:
                    problems.append(m.error)
            elif m.nonfinite_mismatches:
                problems.append(f"output '{m.name}': {m.nonfinite_mismatches} NaN/inf mismatch(es)")
            elif m.max_abs_error is not None:
                if not isinstance(self.atol, (int, float)):
                    limit = f"atol {m.tolerance:.2g} from the model's noise"
                elif self.atol_mode == "range":
                    limit = f"atol {self.atol:g} x range {m.range:.3g}"
                else:
                    limit = f"atol {self.atol:g}"

                problems.append(
                    f"output '{m.name}': max abs err {m.max_abs_error:.2g} > tolerance "
                    f"(rtol {self.rtol:g}, {limit})"
                )
        kind = "synthetic " if self.synthetic else ""
        if problems:
            return "; ".join(problems) + f" on {self.samples} {kind}sample(s)"
        errs = [m.max_abs_error for m in self.outputs.values() if m.max_abs_error is not None]
        worst = f", max abs err {max(errs):.2g}" if errs else ""
        return (
            f"all {len(self.outputs)} output(s) match on {self.samples} {kind}sample(s)"
            f"{worst} ({self._tolerance()})"
        )

    def check_floors(self, floors: Mapping[str, float]) -> list[str]:
        """`misses(floors)`: one line per missed floor, empty when all are met."""
        return self.misses(floors)


# --------------------------------------------------------------------------- running


@functools.cache
def _runner_class() -> type:
    """OnnxrtRunner for numpy feeds. Its stock `infer_impl` asks every input whether it
    is a torch tensor, which imports torch (seconds, and a heavy dependency) when it is
    installed; feeds here are always numpy."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    class NumpyOnnxrtRunner(OnnxrtRunner):
        def infer_impl(self, feed_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            start = time.perf_counter()
            outputs = self.sess.run(None, dict(feed_dict))
            self.inference_time = time.perf_counter() - start
            return {node.name: out for node, out in zip(self.sess.get_outputs(), outputs)}

    return NumpyOnnxrtRunner


@contextlib.contextmanager
def _runner(model: onnx.ModelProto, label: str) -> Iterator[Any]:
    """An activated Polygraphy OnnxrtRunner for `model` (bytes, or a file from 64 MB)."""
    from polygraphy.backend.onnxrt import SessionFromOnnx

    from onnxslim_edge.runtime import no_fallback_chatter, serialized

    with contextlib.ExitStack() as stack:
        if model_bytes(model) >= STREAM_THRESHOLD:  # no serialized copy; weights held once
            source: Any = str(stack.enter_context(model_on_disk(model, external=True)))
        else:
            source = serialized(model)
        runner = _runner_class()(SessionFromOnnx(source, providers=["cpu"]), name=label)
        try:
            with no_fallback_chatter():  # ORT's "EP Error" banner stays off stdout
                runner.activate()
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise UnsupportedError(
                f"{label}: ONNX Runtime cannot load the model: {first_line(exc)}"
            ) from exc
        try:
            yield runner
        finally:
            runner.deactivate()


def _quiet_polygraphy() -> Any:
    from polygraphy.logger import G_LOGGER

    return G_LOGGER.verbosity(G_LOGGER.CRITICAL + 10)


class Evaluator:
    """The reference model on some data, and scores of candidates against it.

    `data`: anything `open_data` accepts; None means random data (`max_samples`
    default 4) and results marked synthetic. `max_samples` bounds the samples used
    (and, with `cache`, kept in memory). `output_names` restricts the comparison to
    some of the reference's outputs. `task` adds task metrics (see `TaskMetric`).
    `rtol`, `atol`, `atol_mode` set the pass/fail tolerance of each output. Raises
    UnsupportedError when ONNX Runtime cannot run the reference.
    """

    def __init__(
        self,
        reference: ModelSource,
        data: Any = None,
        *,
        max_samples: int | None = None,
        batch_size: int = 1,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        seed: int = 0,
        output_names: Sequence[str] | None = None,
        task: TaskMetric | None = None,
        cache: bool = True,
        rtol: float = 1e-5,
        atol: float | Mapping[str, float] = 1e-5,
        atol_mode: Literal["absolute", "range"] = "absolute",
        progress: bool = False,
    ) -> None:
        if atol_mode not in ("absolute", "range"):
            raise ConfigError(f"atol_mode must be absolute or range, not {atol_mode!r}")
        atols = atol.values() if isinstance(atol, Mapping) else [atol]
        if rtol < 0 or any(a < 0 for a in atols):
            raise ConfigError(f"rtol and atol must be >= 0 (got rtol {rtol}, atol {atol})")
        if isinstance(atol, Mapping) and atol_mode != "absolute":
            raise ConfigError("atol per output needs atol_mode='absolute'")
        self.reference = load_model(reference)
        self.rtol, self.atol, self.atol_mode = rtol, atol, atol_mode
        self.task = task
        self.progress = progress
        if data is None:
            data = "random"
            if max_samples is None:
                max_samples = _DEFAULT_RANDOM_SAMPLES
        self.source = open_data(
            data,
            self.reference,
            batch_size=batch_size,
            limit=max_samples,
            input_shapes=input_shapes,
            seed=seed,
        )
        ref_outputs = [o.name for o in self.reference.graph.output]
        if output_names is not None:
            unknown = [n for n in output_names if n not in ref_outputs]
            if unknown:
                raise ConfigError(
                    f"unknown output(s) {', '.join(repr(n) for n in unknown)}; the reference's "
                    f"outputs: {', '.join(ref_outputs)}"
                )
            self.names = list(output_names)
        else:
            self.names = ref_outputs
        self._cached: list[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]] | None = None
        if cache:
            with _quiet_polygraphy(), _runner(self.reference, "reference") as runner:
                self._cached = [
                    (count, feed, {n: out[n] for n in self.names})
                    for count, feed, out in self._reference_batches(runner)
                ]

    @property
    def samples(self) -> int | None:
        """Samples scored per candidate (without a cache: None where the data's length
        is not known before reading it)."""
        if self._cached is not None:
            return sum(count for count, _, _ in self._cached)
        return self.source.num_samples

    def _reference_batches(
        self, runner: Any
    ) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]]:
        batches: Any = self.source.counted()
        if self.progress:
            from tqdm.auto import tqdm

            n = self.source.num_samples
            total = None if n is None else -(-n // self.source.batch_size)
            batches = tqdm(batches, total=total, desc="verify", unit="batch", leave=False)
        done = 0
        for count, feed in batches:
            try:
                out = runner.infer(feed, check_inputs=False)
            except Exception as exc:
                raise UnsupportedError(
                    f"reference: ONNX Runtime failed on the batch from sample {done}: "
                    f"{first_line(exc)}"
                ) from exc
            done += count
            yield count, feed, out

    def _atol(self, name: str) -> float:
        if isinstance(self.atol, Mapping):
            return float(self.atol.get(name, 0.0))
        return self.atol

    def score(self, candidate: ModelSource) -> VerifyResult:
        """Run `candidate` on the data and measure it against the reference."""
        cand_model = load_model(candidate)
        cand_outputs = {o.name for o in cand_model.graph.output}
        cand_specs = _model_inputs(cand_model)
        cand_inputs = {s.name for s in cand_specs}
        cand_required = [s.name for s in cand_specs if not s.optional]
        acc = {n: _Accumulator(n) for n in self.names}
        messages: list[str] = []
        for n in self.names:
            if n not in cand_outputs:
                acc[n].fail(f"output '{n}' is missing from the candidate")
        live = [n for n in self.names if n in cand_outputs]
        task_sums: dict[str, float] = {}
        samples = 0
        with _quiet_polygraphy(), contextlib.ExitStack() as stack:
            if self._cached is not None:
                batches: Any = iter(self._cached)
            else:
                ref_runner = stack.enter_context(_runner(self.reference, "reference"))
                batches = self._reference_batches(ref_runner)
            cand_runner = None
            try:
                cand_runner = stack.enter_context(_runner(cand_model, "candidate"))
            except UnsupportedError as exc:
                messages.append(str(exc))
            for count, feed, ref_out in batches:
                if cand_runner is None:
                    break
                missing = [k for k in cand_required if k not in feed]
                if missing:
                    messages.append(
                        "candidate: needs input(s) the reference does not take: "
                        + ", ".join(missing)
                    )
                    break
                try:
                    cand_out = cand_runner.infer(
                        {k: v for k, v in feed.items() if k in cand_inputs}, check_inputs=False
                    )
                except Exception as exc:
                    messages.append(f"candidate: ONNX Runtime failed: {first_line(exc)}")
                    break
                for n in live:
                    acc[n].update(ref_out[n], cand_out[n], self.rtol)
                if self.task is not None:
                    for key, value in self.task(feed, ref_out, cand_out).items():
                        task_sums[key] = task_sums.get(key, 0.0) + float(value) * count
                samples += count
        if samples == 0 and not messages:
            messages.append(
                "no samples were compared (the data is empty, or a one-shot iterator already used)"
            )
        return _result(
            {n: a.finish(self.rtol, self._atol(n), self.atol_mode) for n, a in acc.items()},
            samples=samples,
            messages=messages,
            task={k: v / samples for k, v in task_sums.items()} if samples else {},
            synthetic=self.source.is_synthetic,
            rtol=self.rtol,
            atol=self.atol,
            atol_mode=self.atol_mode,
            data=self.source.describe(),
        )


def _result(
    outputs: dict[str, OutputMetrics], *, messages: list[str], **fields: Any
) -> VerifyResult:
    """The VerifyResult of finished per-output metrics; any message fails every output."""
    if messages:
        for m in outputs.values():
            m.passed = False
    return VerifyResult(outputs=outputs, messages=messages, **fields)


def compare_outputs(
    reference: Sequence[Mapping[str, np.ndarray]],
    candidate: Sequence[Mapping[str, np.ndarray]],
    *,
    samples: int,
    rtol: float,
    atol: float | Mapping[str, float],
    atol_mode: str = "range",
    names: Sequence[str] | None = None,
    data: str = "",
    synthetic: bool = False,
    messages: Sequence[str] = (),
) -> Any:
    """verify's metrics (a VerifyResult) of outputs already computed, batch by batch;
    `names` defaults to the reference's outputs. `messages` fail the result. `atol` may
    be given per output (a mapping; 0 for one it does not name)."""
    if names is None:
        names = list(reference[0]) if reference else []
    acc = {n: _Accumulator(n) for n in names}
    for ref, cand in zip(reference, candidate):
        for n in names:
            if n not in cand:
                acc[n].fail(f"output '{n}' is missing from the candidate")
            elif n in ref:
                acc[n].update(ref[n], cand[n], rtol)
    return _result(
        {
            n: a.finish(
                rtol, float(atol.get(n, 0.0)) if isinstance(atol, Mapping) else atol, atol_mode
            )
            for n, a in acc.items()
        },
        samples=samples,
        messages=list(messages),
        synthetic=synthetic,
        rtol=rtol,
        atol=atol,
        atol_mode=atol_mode,
        data=data,
    )


def compare(
    reference: ModelSource,
    candidate: ModelSource,
    data: Any = None,
    *,
    rtol: float = 1e-5,
    atol: float | Mapping[str, float] = 1e-5,
    atol_mode: Literal["absolute", "range"] = "absolute",
    max_samples: int | None = None,
    batch_size: int = 1,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    progress: bool = False,
    output_names: Sequence[str] | None = None,
) -> VerifyResult:
    """Run both models on the same inputs and compare their outputs by name.

    `data`: anything `open_data` accepts; None means random data (`max_samples`
    default 4) and a result marked synthetic. `output_names` restricts the comparison
    to some of the reference's outputs. Streams the data once and keeps nothing
    (`Evaluator(..., cache=False)`). Raises UnsupportedError when ONNX Runtime cannot
    run the reference; candidate failures give a failed result instead.
    """
    evaluator = Evaluator(
        reference,
        data,
        max_samples=max_samples,
        batch_size=batch_size,
        input_shapes=input_shapes,
        seed=seed,
        output_names=output_names,
        cache=False,
        rtol=rtol,
        atol=atol,
        atol_mode=atol_mode,
        progress=progress,
    )
    result = evaluator.score(candidate)
    log.info("verify: %s", result.summary())
    return result
