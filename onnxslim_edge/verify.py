"""Compare two models' outputs on the same inputs, through Polygraphy's ONNX Runtime runner.

`compare(reference, candidate, data)` runs both models batch by batch with
`polygraphy.backend.onnxrt.OnnxrtRunner` and accumulates, per output name, error
metrics that need no stored outputs (memory stays flat however many samples):

- max_abs_error, mean_abs_error, max_rel_error = max |c - r| / max(|r|, tiny);
- cosine similarity and SQNR = 10 log10(sum r^2 / sum (r - c)^2) over all elements of
  all samples (SQNR is +inf for identical outputs; `to_dict` writes non-finite numbers
  as null);
- for 2-D float outputs (N, classes > 1): top-1 agreement and the mean KL divergence
  KL(softmax(r) || softmax(c));
- pass/fail: |c - r| <= atol_eff + rtol |r| at every element, atol_eff = atol
  ("absolute") or atol * max |r| over the whole output ("range"). NaN in both at the
  same place counts as equal, as do equal infinities; any other NaN/inf mismatch fails.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from onnxslim_edge.data import _model_inputs, open_data
from onnxslim_edge.errors import ConfigError, UnsupportedError, first_line
from onnxslim_edge.model import PROTOBUF_LIMIT, ModelSource, load_model, model_bytes, model_on_disk

__all__ = ["FLOOR_KEYS", "OutputMetrics", "VerifyResult", "compare"]

log = logging.getLogger(__name__)

#: Floors `VerifyResult.check_floors` understands.
FLOOR_KEYS = ("min_top1_agreement", "min_cosine", "min_sqnr_db", "max_abs_error")

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
        self.top1_agree += int((np.argmax(r, axis=1) == np.argmax(c, axis=1)).sum())
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


@dataclass
class VerifyResult:
    """Per-output metrics and the verdict of one comparison."""

    outputs: dict[str, OutputMetrics]
    samples: int
    synthetic: bool
    rtol: float
    atol: float
    atol_mode: str
    data: str = ""
    messages: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.messages and all(m.passed for m in self.outputs.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable; non-finite numbers (e.g. SQNR of identical outputs) are null."""
        return {
            "passed": self.passed,
            "samples": self.samples,
            "synthetic": self.synthetic,
            "data": self.data,
            "rtol": self.rtol,
            "atol": self.atol,
            "atol_mode": self.atol_mode,
            "messages": list(self.messages),
            "outputs": {name: m.to_dict() for name, m in self.outputs.items()},
        }

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
                limit = (
                    f"atol {self.atol:g} x range {m.range:.3g}"
                    if self.atol_mode == "range"
                    else f"atol {self.atol:g}"
                )
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
        """Misses of fidelity floors (see FLOOR_KEYS), each applied to every output where
        the metric is defined; empty when all are met."""
        unknown = sorted(set(floors) - set(FLOOR_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown floor(s) {', '.join(unknown)}; valid: {', '.join(FLOOR_KEYS)}"
            )
        checks = {
            "min_top1_agreement": ("top1_agreement", "top-1 agreement", 1),
            "min_cosine": ("cosine", "cosine", 1),
            "min_sqnr_db": ("sqnr_db", "SQNR", 1),
            "max_abs_error": ("max_abs_error", "max abs error", -1),
        }
        misses = list(self.messages) if floors else []
        for m in self.outputs.values():
            if m.error is not None:
                misses.append(m.error)
                continue
            for key, floor in floors.items():
                attr, label, sign = checks[key]
                value = getattr(m, attr)
                if value is None:
                    continue
                if m.nonfinite_mismatches:
                    misses.append(
                        f"output '{m.name}': {m.nonfinite_mismatches} NaN/inf mismatch(es)"
                    )
                    break
                if sign > 0 and value < floor:
                    misses.append(f"output '{m.name}': {label} {value:.6g} < floor {floor:g}")
                elif sign < 0 and value > floor:
                    misses.append(f"output '{m.name}': {label} {value:.6g} > limit {floor:g}")
        return misses


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
    """An activated Polygraphy OnnxrtRunner for `model` (bytes, or a file when over 2 GB)."""
    from polygraphy.backend.onnxrt import SessionFromOnnx

    from onnxslim_edge.runtime import serialized

    with contextlib.ExitStack() as stack:
        if model_bytes(model) >= PROTOBUF_LIMIT:
            source: Any = str(stack.enter_context(model_on_disk(model)))
        else:
            source = serialized(model)
        runner = _runner_class()(SessionFromOnnx(source, providers=["cpu"]), name=label)
        try:
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


def compare(
    reference: ModelSource,
    candidate: ModelSource,
    data: Any = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
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
    to some of the reference's outputs. Raises UnsupportedError when ONNX Runtime
    cannot run the reference; candidate failures give a failed result instead.
    """
    if atol_mode not in ("absolute", "range"):
        raise ConfigError(f"atol_mode must be absolute or range, not {atol_mode!r}")
    if rtol < 0 or atol < 0:
        raise ConfigError(f"rtol and atol must be >= 0 (got rtol {rtol}, atol {atol})")
    ref_model = load_model(reference)
    cand_model = load_model(candidate)
    if data is None:
        data = "random"
        if max_samples is None:
            max_samples = _DEFAULT_RANDOM_SAMPLES
    source = open_data(
        data,
        ref_model,
        batch_size=batch_size,
        limit=max_samples,
        input_shapes=input_shapes,
        seed=seed,
    )
    ref_outputs = [o.name for o in ref_model.graph.output]
    if output_names is not None:
        unknown = [n for n in output_names if n not in ref_outputs]
        if unknown:
            raise ConfigError(
                f"unknown output(s) {', '.join(repr(n) for n in unknown)}; the reference's "
                f"outputs: {', '.join(ref_outputs)}"
            )
        names = list(output_names)
    else:
        names = ref_outputs
    cand_outputs = {o.name for o in cand_model.graph.output}
    cand_specs = _model_inputs(cand_model)
    cand_inputs = {s.name for s in cand_specs}
    cand_required = [s.name for s in cand_specs if not s.optional]
    acc = {n: _Accumulator(n) for n in names}
    messages: list[str] = []
    for n in names:
        if n not in cand_outputs:
            acc[n].fail(f"output '{n}' is missing from the candidate")
    live = [n for n in names if n in cand_outputs]
    samples = 0
    with _quiet_polygraphy(), contextlib.ExitStack() as stack:
        ref_runner = stack.enter_context(_runner(ref_model, "reference"))
        cand_runner = None
        try:
            cand_runner = stack.enter_context(_runner(cand_model, "candidate"))
        except UnsupportedError as exc:
            messages.append(str(exc))
        batches: Any = source.counted()
        if progress:
            from tqdm.auto import tqdm

            n = source.num_samples
            total = None if n is None else -(-n // source.batch_size)
            batches = tqdm(batches, total=total, desc="verify", unit="batch", leave=False)
        for count, feed in batches:
            if cand_runner is None:
                break
            try:
                ref_out = ref_runner.infer(feed, check_inputs=False)
            except Exception as exc:
                raise UnsupportedError(
                    f"reference: ONNX Runtime failed on the batch from sample {samples}: "
                    f"{first_line(exc)}"
                ) from exc
            missing = [k for k in cand_required if k not in feed]
            if missing:
                messages.append(
                    f"candidate: needs input(s) the reference does not take: {', '.join(missing)}"
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
                acc[n].update(ref_out[n], cand_out[n], rtol)
            samples += count
    if samples == 0 and not messages:
        messages.append(
            "no samples were compared (the data is empty, or a one-shot iterator already used)"
        )
    result = VerifyResult(
        outputs={n: a.finish(rtol, atol, atol_mode) for n, a in acc.items()},
        samples=samples,
        synthetic=source.is_synthetic,
        rtol=rtol,
        atol=atol,
        atol_mode=atol_mode,
        data=source.describe(),
        messages=messages,
    )
    if messages:
        for m in result.outputs.values():
            m.passed = False
    log.info("verify: %s", result.summary())
    return result
