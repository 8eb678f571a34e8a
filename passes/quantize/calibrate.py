"""Activation statistics for int8 calibration, streamed batch by batch, and thresholds.

`TensorStats` keeps, per tensor, the exact running min/max and a fixed-size histogram
of |x| (the absolute value: symmetric int8 only needs magnitudes, as in TensorRT's
calibrators), plus the same histogram of the negative values alone (|x| of x < 0), so
each sign's magnitudes are known. The histograms span [0, R) with R the smallest power
of two strictly above the largest |x| seen so far. When a batch exceeds R, the range
doubles as often as needed and each group of 2^k adjacent bins merges into one;
because every range is a power of two, the bins of a wider range are unions of bins of
a narrower one (no mass is smeared across bin edges). So the histogram of a data set
does not depend on how it was split into batches or in which order the parts were
merged (bit-exact when the bin count is a power of two), and its memory is two arrays
of `bins` counts however many batches arrive.

Threshold methods turn the statistics into the symmetric `amax` (the int8 scale is
amax / 127, TensorRT's [-127, 127]); `THRESHOLDS` is the one table from a method's
name to its implementation (symmetric amax and per-sign threshold), and an unknown
name is a ConfigError listing the valid ones:

- `minmax`: the largest |x| seen (exact, not rounded to bins).
- `percentile`: the p-th percentile of |x|, interpolated linearly within its bin.
- `entropy`: TensorRT's KL-divergence search, run on each sign's histogram of
  magnitudes separately (amax is the larger of the two thresholds, each capped at that
  sign's largest magnitude m). The first bin is levelled with its neighbour (the exact
  zeros of a ReLU). For each candidate i from 128 to the bin holding m (TensorRT's
  histograms end at the largest value): P = hist[:i] with the outliers (hist[i:])
  added to its last bin; Q = hist[:i] (without the outliers)
  quantized into 128 levels spread evenly over the i bins (level l covers the bins j
  with floor(j * 128 / i) == l, as TensorRT's linspace mapping) and spread evenly back
  over the bins where P is non-zero; zeros of Q are smoothed as MXNet/ONNX Runtime do
  (eps = 1e-4 counts to each zero bin, taken evenly from the non-zero bins, so Q keeps
  its sum). P and Q are both divided by the whole count, so the clipped values are
  missing from Q instead of being renormalized away: the divergence is TensorRT's
  KL(P || Q) plus -log(kept fraction) >= 0. The threshold is i bin widths for the i with
  the smallest divergence. All candidates are scored at once from prefix sums, in
  O(candidates x 128), not by building P and Q for each.
- `mse`: the threshold t = i bin widths minimizing the expected squared error
  of quantizing the histogram: values below t get rounding noise step^2 / 12 with
  step = t / 127, values above t are clipped to t (error (center - t)^2 per value).

Among candidates whose score equals the best within floating-point noise, the
smallest threshold wins. Histogram thresholds are capped at the largest |x| seen.

`Calibrator` exposes chosen intermediate tensors as extra outputs of a copy of the
model, runs one ONNX Runtime session over the calibration batches and updates one
`TensorStats` per tensor; activations are never stored. The calibration cache is a
JSON file `{tensor: {"amax", "method", "min", "max", "lo", "hi"}}`
(plus "data": the calibration data it was measured on) that can be edited by hand;
`load_cache` validates it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx

from onnxslim_edge.errors import ConfigError, DataError

__all__ = [
    "CACHE_KEYS",
    "METHODS",
    "THRESHOLDS",
    "Calibrator",
    "TensorStats",
    "Threshold",
    "amax_entropy",
    "amax_minmax",
    "amax_mse",
    "amax_percentile",
    "cache_entry",
    "collect_stats",
    "compute_amax",
    "compute_range",
    "entropy_bin",
    "entropy_divergences",
    "estimated_sqnr_db",
    "free_batch",
    "load_cache",
    "method_label",
    "mse_bin",
    "mse_errors",
    "save_cache",
    "scale_from_amax",
    "threshold_method",
]

log = logging.getLogger(__name__)

#: Keys of one calibration-cache entry ("amax" and "method" required; "data" names the
#: calibration data the entry was measured on).
CACHE_KEYS = ("amax", "method", "min", "max", "lo", "hi", "data")

#: Default number of histogram bins (as TensorRT and ONNX Runtime's entropy calibrators).
DEFAULT_BINS = 2048

#: Candidates whose score is within this of the best count as tied (smallest wins).
_TIE_RTOL = 1e-9
_TIE_ATOL = 1e-10


# --------------------------------------------------------------------------- stats


class TensorStats:
    """Running min, max, count and mergeable histograms of |x| for one tensor.

    `hist[k]` counts the finite values with k * bin_width <= |x| < (k + 1) * bin_width,
    where bin_width = hist_max / bins and hist_max is a power of two (None while every
    value seen is 0; such zeros are counted in bin 0). `neg[k]` counts the negative
    values among them, so `hist - neg` is the histogram of the values >= 0. Non-finite
    values are counted in `nonfinite` and left out of everything else.
    """

    __slots__ = ("_exp", "bins", "count", "hist", "max", "min", "neg", "nonfinite")

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ConfigError(f"histogram bins: expected an integer >= 1, got {bins!r}")
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nonfinite = 0
        self._exp: int | None = None  # hist_max == 2.0 ** _exp

    def __repr__(self) -> str:
        return (
            f"TensorStats(count={self.count}, min={self.min:.6g}, max={self.max:.6g}, "
            f"bins={self.bins}, hist_max={self.hist_max:.6g})"
        )

    @property
    def absmax(self) -> float:
        """The largest |x| seen (0.0 before any value)."""
        return max(-self.min, self.max) if self.count else 0.0

    @property
    def hist_max(self) -> float:
        """Upper edge of the histogram (0.0 while all values seen are zero)."""
        return 0.0 if self._exp is None else math.ldexp(1.0, self._exp)

    @property
    def bin_width(self) -> float:
        """Width of one histogram bin (0.0 while all values seen are zero)."""
        return self.hist_max / self.bins

    @property
    def edges(self) -> np.ndarray:
        """The `bins + 1` bin edges, from 0 to `hist_max`."""
        return np.arange(self.bins + 1, dtype=np.float64) * self.bin_width

    def copy(self) -> TensorStats:
        """An independent copy."""
        other = TensorStats(self.bins)
        other.hist = self.hist.copy()
        other.neg = self.neg.copy()
        other.min, other.max, other.count = self.min, self.max, self.count
        other.nonfinite, other._exp = self.nonfinite, self._exp
        return other

    def update(self, array: Any) -> None:
        """Add the values of one batch (any shape, any real dtype)."""
        a = np.asarray(array)
        if a.dtype.kind not in "fiub":
            raise DataError(f"cannot collect statistics of {a.dtype} values")
        if a.dtype.kind != "f" or a.dtype.itemsize < 4:
            a = a.astype(np.float64 if a.dtype.itemsize >= 4 else np.float32)
        a = a.reshape(-1)
        finite = np.isfinite(a)
        if not finite.all():
            bad = int(a.size - np.count_nonzero(finite))
            if not self.nonfinite:
                log.warning("%d non-finite values left out of the statistics", bad)
            self.nonfinite += bad
            a = a[finite]
        if a.size == 0:
            return
        lo, hi = float(a.min()), float(a.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += int(a.size)
        top = max(-lo, hi)
        if top > 0 and (self._exp is None or top >= self.hist_max):
            self._widen(math.frexp(top)[1])  # top < 2**exp
        if self._exp is None:  # all zeros so far
            self.hist[0] += a.size
            return
        negative = a[a < 0]
        if negative.size:
            self.neg += _bin_counts(-negative, self._exp, self.bins)
        self.hist += _bin_counts(np.abs(a), self._exp, self.bins)

    def merge(self, other: TensorStats) -> None:
        """Add another TensorStats (same bin count) into this one."""
        if other.bins != self.bins:
            raise ConfigError(f"cannot merge histograms of {other.bins} and {self.bins} bins")
        hist, neg = other.hist, other.neg
        if other._exp is not None:
            if self._exp is None or other._exp > self._exp:
                self._widen(other._exp)
            hist = _rebinned(hist, self._exp - other._exp)  # type: ignore[operator]
            neg = _rebinned(neg, self._exp - other._exp)  # type: ignore[operator]
        self.hist += hist
        self.neg += neg
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.count += other.count
        self.nonfinite += other.nonfinite

    def _widen(self, exp: int) -> None:
        """Grow the range to 2**exp (a power-of-two multiple of the current one)."""
        if self._exp is not None:
            self.hist = _rebinned(self.hist, exp - self._exp)
            self.neg = _rebinned(self.neg, exp - self._exp)
        self._exp = exp


def _rebinned(hist: np.ndarray, shift: int) -> np.ndarray:
    """`hist` on a range 2**shift times wider: groups of 2**shift bins merged."""
    if shift <= 0:
        return hist
    n = hist.size
    if shift >= 62 or (1 << shift) >= n:
        out = np.zeros_like(hist)
        out[0] = hist.sum()
        return out
    k = 1 << shift
    pad = (-n) % k
    grouped = np.concatenate([hist, np.zeros(pad, hist.dtype)]).reshape(-1, k).sum(axis=1)
    out = np.zeros_like(hist)
    out[: grouped.size] = grouped
    return out


def _bin_counts(absx: np.ndarray, exp: int, bins: int) -> np.ndarray:
    """Counts of |x| values (all < 2**exp) in `bins` equal bins over [0, 2**exp)."""
    scale = math.ldexp(bins, -exp)  # bins / 2**exp, exact when bins is a power of two
    if absx.dtype == np.float32 and scale < 2.0**100:
        idx = np.multiply(absx, np.float32(scale), out=absx)
    else:
        idx = absx.astype(np.float64) / math.ldexp(1.0, exp) * bins
    pos = idx.astype(np.intp)
    np.minimum(pos, bins - 1, out=pos)  # rounding guard for bin counts that are not 2**k
    return np.bincount(pos, minlength=bins)


# ----------------------------------------------------------------------- thresholds


def _first_best(scores: np.ndarray) -> int:
    """Index of the first score within floating-point noise of the minimum."""
    best = float(np.min(scores))
    if not math.isfinite(best):
        return int(np.argmin(scores))
    tol = _TIE_ATOL + _TIE_RTOL * abs(best)
    return int(np.flatnonzero(scores <= best + tol)[0])


def _xlogx(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float64)
    pos = x > 0
    out[pos] = x[pos] * np.log(x[pos])
    return out


def entropy_divergences(
    hist: Any, *, num_levels: int = 128, eps: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) of every candidate bin count i in [num_levels, len(hist)].

    Returns `(candidates, kl)`; `kl` is inf where Q cannot be formed (no counts below i).
    P and Q are in units of the whole count (Q sums to the kept fraction); see the
    module docstring for P, Q and the smoothing.
    """
    h = np.asarray(hist, dtype=np.float64)
    n = h.size
    if num_levels < 1 or n < num_levels:
        raise ConfigError(f"entropy: need at least {num_levels} histogram bins, got {n}")
    total = float(h.sum())
    cand = np.arange(num_levels, n + 1)
    if total <= 0:
        return cand, np.full(cand.size, np.inf)
    csum = np.concatenate([[0.0], np.cumsum(h)])  # csum[k] = h[:k].sum()
    cnz = np.concatenate([[0], np.cumsum(h > 0)])  # non-zero bins in h[:k]
    clog = np.concatenate([[0.0], np.cumsum(_xlogx(h))])

    kept = csum[cand]  # sum of h[:i] == sum of Q
    outliers = total - kept
    last = h[cand - 1] + outliers  # P[i - 1]
    p_logp = clog[cand - 1] + _xlogx(last)  # sum P log P

    # level l of candidate i covers bins [ceil(l * i / L), ceil((l + 1) * i / L))
    bounds = -((-np.arange(num_levels + 1)[None, :] * cand[:, None]) // num_levels)
    starts, stops = bounds[:, :-1], bounds[:, 1:]
    level_sum = csum[stops] - csum[starts]  # Q's counts per level (no outliers)
    level_nz = (cnz[stops] - cnz[starts]).astype(np.float64)  # P's non-zero bins per level
    level_nz[:, -1] += (last > 0).astype(np.float64) - (h[cand - 1] > 0)
    p_sum = level_sum.copy()
    p_sum[:, -1] += outliers

    filled = level_sum > 0
    q_nonzero = np.where(filled, level_nz, 0.0).sum(axis=1)  # bins where Q > 0
    q_zero = cand - q_nonzero
    with np.errstate(divide="ignore", invalid="ignore"):
        eps1 = eps * q_zero / q_nonzero
        q_level = np.where(filled, level_sum / level_nz - eps1[:, None], eps)
        used = p_sum > 0
        bad = (used & (q_level <= 0)).any(axis=1) | (q_nonzero == 0)
        cross = np.where(used, p_sum * np.log(np.where(used & (q_level > 0), q_level, 1.0)), 0.0)
        kl = (p_logp - cross.sum(axis=1)) / total
    kl = np.where(bad, np.inf, kl)
    return cand, kl


def entropy_bin(hist: Any, *, num_levels: int = 128, eps: float = 1e-4) -> int:
    """The number of bins i (threshold = i bin widths) with the smallest KL divergence."""
    cand, kl = entropy_divergences(hist, num_levels=num_levels, eps=eps)
    if not np.isfinite(kl).any():
        return int(cand[-1])
    return int(cand[_first_best(kl)])


def mse_errors(hist: Any, *, levels: int = 127) -> np.ndarray:
    """Expected squared error (in bin widths^2, summed over values) of each threshold
    t = i bin widths, i = 1..len(hist): rounding noise (t/levels)^2/12 for each value
    below t, (center - t)^2 for each clipped value."""
    h = np.asarray(hist, dtype=np.float64)
    n = h.size
    t = np.arange(1, n + 1, dtype=np.float64)
    center = np.arange(n, dtype=np.float64) + 0.5
    # suffix sums over bins k >= i, for i = 1..n (index i - 1 .. n - 1 -> use i)
    s0 = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])[1:]
    s1 = np.concatenate([np.cumsum((h * center)[::-1])[::-1], [0.0]])[1:]
    s2 = np.concatenate([np.cumsum((h * center**2)[::-1])[::-1], [0.0]])[1:]
    inside = np.cumsum(h)  # values in bins k < i
    clipped = np.maximum(s2 - 2.0 * t * s1 + t * t * s0, 0.0)
    return inside * (t / levels) ** 2 / 12.0 + clipped


def mse_bin(hist: Any, *, levels: int = 127) -> int:
    """The number of bins i (threshold = i bin widths) with the smallest expected MSE."""
    return _first_best(mse_errors(hist, levels=levels)) + 1


def amax_minmax(stats: TensorStats) -> float:
    """The largest |x| seen."""
    return float(stats.absmax)


def _hist_percentile(hist: np.ndarray, width: float, top: float, p: float) -> float:
    """The p-th percentile of a magnitude histogram, interpolated within its bin."""
    total = int(hist.sum())
    if total == 0 or width == 0:
        return 0.0
    cum = np.cumsum(hist)
    target = total * (p / 100.0)
    k = min(int(np.searchsorted(cum, target, side="left")), len(hist) - 1)
    before = float(cum[k - 1]) if k else 0.0
    frac = (target - before) / float(hist[k]) if hist[k] else 1.0
    return float(min((k + min(max(frac, 0.0), 1.0)) * width, top))


def _check_percentile(p: Any) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
        raise ConfigError(f"percentile: expected 0 < p <= 100, got {p!r}")


def amax_percentile(stats: TensorStats, p: float = 99.99) -> float:
    """The p-th percentile of |x| (0 < p <= 100), interpolated within its bin."""
    _check_percentile(p)
    return _hist_percentile(stats.hist, stats.bin_width, stats.absmax, p)


def _entropy_side(hist: np.ndarray, top: float, width: float, num_levels: int) -> float:
    """The KL threshold of one sign's magnitude histogram, capped at its largest value."""
    if top <= 0 or not hist.any():
        return 0.0
    # The exact zeros of a ReLU output pile up in the first bin; left in, that spike
    # dominates P and the KL search clips half the positive range (ReLU(N(0,1)): amax
    # 1.5 instead of ~4). Level it with its neighbour, as TensorRT's tools do.
    # Candidates end at the bin holding `top` (TensorRT's histograms end at the largest
    # value): the power-of-two range leaves up to half the bins empty above it.
    used = min(len(hist), max(num_levels, math.ceil(top / width)))
    hist = hist[:used].copy()
    if len(hist) > 1:
        hist[0] = min(hist[0], hist[1])
    return float(min(entropy_bin(hist, num_levels=num_levels) * width, top))


def amax_entropy(stats: TensorStats, *, num_levels: int = 128) -> float:
    """TensorRT's KL-divergence threshold, the larger of the two signs' (module docstring).

    Searching each sign alone keeps a one-sided bulk (the negative half of a HardSwish,
    a bias pile-up near the minimum) from outweighing the other sign's tail, which the
    asymmetric uint8 grid of the onnxruntime-cpu layout and the symmetric int8 grid
    both have to cover.
    """
    if stats.bin_width == 0:
        return 0.0
    width = stats.bin_width
    positive = _entropy_side(stats.hist - stats.neg, max(stats.max, 0.0), width, num_levels)
    negative = _entropy_side(stats.neg, max(-stats.min, 0.0), width, num_levels)
    return max(positive, negative)


def amax_mse(stats: TensorStats, *, levels: int = 127) -> float:
    """The threshold minimizing the expected quantization MSE of the histogram."""
    if stats.bin_width == 0:
        return 0.0
    i = mse_bin(stats.hist, levels=levels)
    return float(min(i * stats.bin_width, stats.absmax))


def _mse_side(hist: np.ndarray, top: float, width: float, percentile: float) -> float:
    used = min(len(hist), max(1, math.ceil(top / width)))
    return float(min(mse_bin(hist[:used]) * width, top))


@dataclass(frozen=True)
class Threshold:
    """One calibration method: `amax(stats, percentile)` the symmetric threshold of a
    tensor, `side(hist, top, width, percentile)` the threshold of one sign's magnitude
    histogram (its largest magnitude `top`), for uint8 grids with a zero point."""

    amax: Callable[[TensorStats, float], float]
    side: Callable[[np.ndarray, float, float, float], float]


#: The calibration methods, by name: the one table every caller dispatches through.
THRESHOLDS: Mapping[str, Threshold] = MappingProxyType(
    {
        "minmax": Threshold(lambda s, p: amax_minmax(s), lambda h, top, w, p: float(top)),
        "percentile": Threshold(
            lambda s, p: amax_percentile(s, p), lambda h, top, w, p: _hist_percentile(h, w, top, p)
        ),
        "entropy": Threshold(
            lambda s, p: amax_entropy(s), lambda h, top, w, p: _entropy_side(h, top, w, 128)
        ),
        "mse": Threshold(lambda s, p: amax_mse(s), _mse_side),
    }
)

#: Threshold method names (the keys of `THRESHOLDS`).
METHODS = tuple(THRESHOLDS)


def threshold_method(name: Any) -> Threshold:
    """The `Threshold` called `name`; ConfigError listing the valid names otherwise."""
    method = THRESHOLDS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ConfigError(f"unknown calibration method {name!r}; valid: {', '.join(METHODS)}")
    return method


def method_label(method: str, percentile: float = 99.99) -> str:
    """How a cache entry records `method`: the name, with the percentile for `percentile`."""
    threshold_method(method)
    return f"percentile:{percentile:g}" if method == "percentile" else method


def _side_threshold(stats: TensorStats, negative: bool, method: str, percentile: float) -> float:
    """One sign's threshold (a magnitude) by `method`, capped at its largest magnitude."""
    side = threshold_method(method).side
    top = max(-stats.min, 0.0) if negative else max(stats.max, 0.0)
    width = stats.bin_width
    if top <= 0 or width == 0:
        return 0.0
    hist = stats.neg if negative else stats.hist - stats.neg
    return side(hist, top, width, percentile)


def compute_range(
    stats: TensorStats, method: str = "minmax", *, percentile: float = 99.99
) -> tuple[float, float]:
    """The asymmetric range (lo <= 0 <= hi) of a uint8 grid with a zero point: each
    sign's magnitudes thresholded by `method` alone, so a one-sided bulk (a HardSwish's
    small negative half) neither stretches nor clips the other side.

    `mse` scores each side with 127 levels, as int8 would: sharing the 255 uint8 steps
    between the sides in proportion clipped harder and lost fidelity (PP-OCRv4
    detection map cosine 0.935 -> 0.910)."""
    threshold_method(method)
    if method == "percentile":
        _check_percentile(percentile)
    neg = _side_threshold(stats, True, method, percentile)
    pos = _side_threshold(stats, False, method, percentile)
    return -neg, pos


def estimated_sqnr_db(stats: TensorStats, scale: float, qmin: float, qmax: float) -> float | None:
    """The SQNR (dB) of quantizing the histogram on the grid scale * [qmin, qmax] (zero
    point already subtracted): rounding noise scale^2 / 12 for values inside, the squared
    distance to the bound for clipped ones; values at their bin centres. None without
    data; inf for an all-zero tensor."""
    if stats.count == 0:
        return None
    if stats.bin_width == 0:
        return math.inf
    centres = (np.arange(stats.bins) + 0.5) * stats.bin_width
    pos, neg = (stats.hist - stats.neg).astype(np.float64), stats.neg.astype(np.float64)
    signal = float(((pos + neg) * centres**2).sum())
    noise = 0.0
    for counts, bound in ((pos, qmax * scale), (neg, -qmin * scale)):
        inside = centres <= bound
        noise += float(counts[inside].sum()) * scale**2 / 12.0
        noise += float((counts[~inside] * (centres[~inside] - max(bound, 0.0)) ** 2).sum())
    return 10.0 * math.log10(signal / noise) if noise > 0 else math.inf


def compute_amax(stats: TensorStats, method: str = "minmax", *, percentile: float = 99.99) -> float:
    """The symmetric amax of `stats` by one of `METHODS`."""
    return threshold_method(method).amax(stats, percentile)


def scale_from_amax(amax: float, bits: int = 8, symmetric: bool = True) -> float:
    """The quantization scale for a range of [-amax, amax].

    Symmetric: amax / (2**(bits-1) - 1), i.e. amax / 127 for int8 on TensorRT's
    [-127, 127] grid. Not symmetric: the full 2**bits-level grid spans the range,
    2 * amax / (2**bits - 1) (255 steps for 8 bits). An amax of 0 (an all-zero
    tensor) gives scale 1.0: every scale represents zeros exactly.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ConfigError(f"quantization bits: expected an integer in [2, 16], got {bits!r}")
    amax = float(amax)
    if not math.isfinite(amax) or amax < 0:
        raise ConfigError(f"amax: expected a finite value >= 0, got {amax!r}")
    if amax == 0:
        return 1.0
    if symmetric:
        return amax / float(2 ** (bits - 1) - 1)
    return 2.0 * amax / float(2**bits - 1)


# ---------------------------------------------------------------------------- cache


def cache_entry(stats: TensorStats, method: str = "minmax", *, percentile: float = 99.99) -> dict:
    """One calibration-cache entry: {"amax", "method", "min", "max", "lo", "hi"}: the
    symmetric threshold, the exact extremes and each sign's threshold (`compute_range`)."""
    amax = compute_amax(stats, method, percentile=percentile)
    lo, hi = compute_range(stats, method, percentile=percentile) if stats.count else (None,) * 2
    label = method_label(method, percentile)
    return {
        "amax": amax,
        "method": label,
        "min": float(stats.min) if stats.count else None,
        "max": float(stats.max) if stats.count else None,
        "lo": lo,
        "hi": hi,
    }


def _number(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(float(value))
    )


def _validated(cache: Any, origin: str) -> dict[str, dict[str, Any]]:
    if not isinstance(cache, Mapping):
        raise DataError(f"{origin}: calibration cache must be a JSON object of tensor entries")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in cache.items():
        where = f"{origin}: tensor {name!r}"
        if not isinstance(name, str) or not name:
            raise DataError(f"{origin}: tensor names must be non-empty strings, got {name!r}")
        if not isinstance(entry, Mapping):
            raise DataError(f"{where}: entry must be an object with keys {', '.join(CACHE_KEYS)}")
        unknown = sorted(set(entry) - set(CACHE_KEYS))
        if unknown:
            raise DataError(f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(CACHE_KEYS)}")
        for key in ("amax", "method"):
            if key not in entry:
                raise DataError(f"{where}: missing {key!r}")
        amax = entry["amax"]
        if not _number(amax) or float(amax) < 0:
            raise DataError(f"{where}: 'amax' must be a finite number >= 0, got {amax!r}")
        method = entry["method"]
        if not isinstance(method, str) or not method:
            raise DataError(f"{where}: 'method' must be a non-empty string, got {method!r}")
        clean: dict[str, Any] = {"amax": float(amax), "method": method}
        for key in ("min", "max", "lo", "hi"):
            value = entry.get(key)
            if value is not None and not _number(value):
                raise DataError(f"{where}: {key!r} must be a finite number or null, got {value!r}")
            clean[key] = None if value is None else float(value)
        if clean["min"] is not None and clean["max"] is not None and clean["min"] > clean["max"]:
            raise DataError(f"{where}: 'min' {clean['min']} is greater than 'max' {clean['max']}")
        if (clean["lo"] or 0.0) > 0 or (clean["hi"] or 0.0) < 0:
            raise DataError(f"{where}: 'lo' must be <= 0 and 'hi' >= 0")
        data = entry.get("data")
        if data is not None:
            if not isinstance(data, str) or not data:
                raise DataError(f"{where}: 'data' must be a non-empty string or null, got {data!r}")
            clean["data"] = data
        out[name] = clean
    return out


def save_cache(path: str | os.PathLike, cache: Mapping[str, Mapping[str, Any]]) -> None:
    """Write a calibration cache as JSON, atomically (validated first)."""
    target = Path(path)
    entries = _validated(cache, str(target))
    text = json.dumps(entries, indent=2, sort_keys=True, allow_nan=False) + "\n"
    from onnxslim_edge.model import write_text_atomic

    write_text_atomic(target, text)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a number")


def load_cache(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read and validate a calibration cache: {tensor: {"amax", "method", "min", "max"}}."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{source}: calibration cache not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: cannot read calibration cache ({exc})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{source}: calibration cache is not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    except ValueError as exc:
        raise DataError(f"{source}: calibration cache is not valid JSON ({exc})") from None
    return _validated(data, str(source))


# ----------------------------------------------------------------------- calibrator


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element types of the model's tensors, from `graph.infer_shapes` where it
    knows them (best effort: ONNX Runtime infers the others)."""
    from onnxslim_edge.graph import infer_shapes

    types: dict[str, int] = {}
    for name, info in infer_shapes(model).items():
        if info.numpy_dtype is not None:
            types[name] = onnx.helper.np_dtype_to_tensor_dtype(info.numpy_dtype)
    return types


#: Bytes of exposed tensors one calibration run may fetch (see `Calibrator`).
FETCH_BUDGET = 16 << 20


def free_batch(model: onnx.ModelProto) -> bool:
    """True when no graph input fixes its first dimension (runs may be cut on axis 0)."""
    inits = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in inits or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return False
    return True


class Calibrator:
    """Collects `TensorStats` of chosen tensors over calibration batches.

    The tensors may be graph inputs (read from the feeds), initializers (counted once
    per `collect`) or outputs of main-graph nodes (exposed as extra outputs of a copy
    of the model; the caller's model is not changed). One ONNX Runtime session is
    created on first use and reused for every batch and every `collect` call.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        tensors: Sequence[str],
        *,
        bins: int = DEFAULT_BINS,
        progress: bool = False,
        threads: int | None = None,
    ) -> None:
        TensorStats(bins)  # validates `bins`
        self.bins = bins
        self.progress = progress
        self.threads = threads
        self.tensors = list(dict.fromkeys(tensors))
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        inputs = {i.name for i in graph.input}
        produced = {out for node in graph.node for out in node.output if out}
        self._inputs = [n for n in self.tensors if n in inputs]
        self._constants = {n: inits[n] for n in self.tensors if n in inits}
        self._fetch = [n for n in self.tensors if n in produced and n not in inputs]
        missing = [
            n for n in self.tensors if n not in inputs and n not in inits and n not in produced
        ]
        if missing:
            raise ConfigError(f"calibration tensor {missing[0]!r} is not in the model's main graph")
        self._model = model
        self._session: Any = None
        # Samples per run: exposing every intermediate stops ONNX Runtime reusing
        # buffers, so a batch of 8 EfficientNet-Lite0 images peaked at 1050 MB against
        # 514 MB one at a time. Runs are cut so the fetched tensors stay within
        # `fetch_budget` bytes (sized on the first sample); small models keep big runs.
        self.fetch_budget = FETCH_BUDGET
        self._rows: int | None = None
        self._split = free_batch(model)

    def _make_session(self) -> Any:
        from onnxslim_edge.graph import exposing_session

        existing = {o.name for o in self._model.graph.output}
        new = [n for n in self._fetch if n not in existing]
        types = _value_types(self._model) if new else None
        return exposing_session(self._model, new, types=types, threads=self.threads)

    def _parts(self, feed: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """`feed` cut on axis 0 into runs of at most `_rows` samples (the first run of a
        batch is one sample while `_rows` is unknown); whole when the model fixes its
        batch dimension or the arrays disagree on axis 0."""
        arrays = {k: np.asarray(v) for k, v in feed.items()}
        sizes = {a.shape[0] if a.ndim else None for a in arrays.values()}
        if not self._split or len(sizes) != 1 or None in sizes:
            yield arrays
            return
        (n,) = sizes
        start = 0
        while start < n:
            step = 1 if self._rows is None else self._rows
            yield {k: a[start : start + step] for k, a in arrays.items()}
            start += step

    def collect(
        self, data: Iterable[Mapping[str, Any]], *, total: int | None = None
    ) -> dict[str, TensorStats]:
        """Run every batch (a feed dict) and return fresh stats: {tensor: TensorStats}."""
        stats = {name: TensorStats(self.bins) for name in self.tensors}
        pending = dict(self._constants)  # initializers, counted once unless fed
        for name in [n for n in pending if n not in self._inputs]:
            stats[name].update(onnx.numpy_helper.to_array(pending.pop(name)))
        if self._fetch and self._session is None:
            self._session = self._make_session()
        batches: Iterable[Mapping[str, Any]] = data
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(data, total=total, desc="calibrate", unit="batch", leave=False)
        count = 0
        for count, feed in enumerate(batches, start=1):
            if not isinstance(feed, Mapping):
                raise DataError(f"calibration batch {count}: expected a dict of input arrays")
            for name in self._inputs:
                if name in feed:
                    stats[name].update(feed[name])
                    pending.pop(name, None)
                elif name in pending:
                    stats[name].update(onnx.numpy_helper.to_array(pending.pop(name)))
                elif name not in self._constants:
                    raise DataError(f"calibration batch {count}: input {name!r} is missing")
            if not self._fetch:
                continue
            for part in self._parts(feed):
                try:
                    values = self._session.run(self._fetch, part)
                except Exception as exc:  # ORT raises its own types for bad feeds
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                    raise DataError(
                        f"calibration batch {count}: ONNX Runtime failed: {first}"
                    ) from None
                if self._rows is None:  # sized on the first run of one sample
                    fetched = sum(getattr(v, "nbytes", 0) for v in values)
                    self._rows = max(1, self.fetch_budget // max(fetched, 1))
                for name, value in zip(self._fetch, values):
                    stats[name].update(value)
                del values
        if count == 0:
            raise DataError("calibration data is empty: no batches")
        log.info("calibrated %d tensors over %d batches", len(stats), count)
        return stats


def collect_stats(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    data: Iterable[Mapping[str, Any]],
    *,
    bins: int = DEFAULT_BINS,
    progress: bool = False,
) -> dict[str, TensorStats]:
    """`Calibrator(model, tensors, bins=bins, progress=progress).collect(data)`."""
    return Calibrator(model, tensors, bins=bins, progress=progress).collect(data)
