"""Options of the `quantize` pass: `QuantizeConfig` and its validation.

`QuantizeConfig` is the frozen, keyword-only set of options (calibration method and
percentile, per-channel weights, activation dtype, exclusions, the calibration cache,
per-tensor amax overrides, fidelity floors and the fallback budget); `parse_override`
reads one `"tensor=amax"` override. Everything here validates input and raises
ConfigError; nothing touches a graph.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.passes.quantize.calibrate import threshold_method

__all__ = ["DEFAULT_FLOORS", "QuantizeConfig", "parse_override"]

#: The fidelity guard's floors (`fidelity_guard`, on by default): a quantized model
#: below them is repaired by fallback or refused (FidelityError). Floors set in the
#: options (`min_cosine`, `min_sqnr_db`, `min_top1_agreement`) replace them.
DEFAULT_FLOORS = {"min_cosine": 0.95, "min_sqnr_db": 10.0}


def _is_float(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_override(text: str) -> tuple[str, float]:
    """`"tensor=amax"` -> (tensor, amax)."""
    name, sep, value = str(text).rpartition("=")
    if not sep or not name.strip():
        raise ConfigError(f"quantize.overrides: expected 'tensor=amax', got {text!r}")
    try:
        amax = float(value)
    except ValueError:
        raise ConfigError(
            f"quantize.overrides: amax of {name!r} is not a number: {value!r}"
        ) from None
    if not math.isfinite(amax) or amax < 0:
        raise ConfigError(f"quantize.overrides: amax of {name!r} must be finite and >= 0")
    return name.strip(), amax


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """Options of the `quantize` pass (see docs/quantization.md).

    - `method`: how activation ranges are calibrated: minmax, percentile, entropy
      (TensorRT's KL search) or mse.
    - `percentile`: the percentile of |x| kept by `method="percentile"`, in (0, 100].
    - `per_channel`: one weight scale per output channel (false: one per tensor).
    - `activation_dtype`: auto (int8 for tensorrt, uint8 for onnxruntime-cpu), int8 or uint8.
    - `exclude_nodes`: node names or regexes (full match) left in float.
    - `exclude_ops`: op types left in float (e.g. `Add`).
    - `keep_first`: leave the first weight layer in float.
    - `keep_last`: leave the last weight layer in float.
    - `calibration_cache`: a JSON file of ranges: read when it exists (those tensors are
      not calibrated again), then written with every range used.
    - `overrides`: `tensor=amax` entries fixing a tensor's range (amax >= 0).
    - `max_calibration_samples`: calibration samples read (None: all).
    - `min_top1_agreement`: fidelity floor in [0, 1] for automatic float fallback; any
      floor set replaces the guard's defaults.
    - `min_sqnr_db`: fidelity floor, output SQNR in dB, for automatic float fallback.
    - `min_cosine`: fidelity floor in [-1, 1] for automatic float fallback.
    - `fallback_max_layers`: the most layers fallback may leave in float (>= 0).
    - `consumer_ranges`: narrow a tensor's range to the part its consumers can tell apart.
    - `fidelity_guard`: always measure the result; with no floor set, check cosine 0.95
      and SQNR 10 dB (`DEFAULT_FLOORS`) and fall back or refuse below them.
    - `guard_samples`: samples the floors are checked on (>= 1; held back from
      calibration when the data has them).
    - `smooth`: SmoothQuant-style smoothing of MatMul/Gemm activations into their
      weights before calibrating (`smooth.smooth_graph`, exact on the float model):
      "auto" (on for tensorrt when the graph has a LayerNorm, i.e. a transformer:
      its symmetric per-tensor activations are what smoothing helps most; off for
      onnxruntime-cpu, where its extra Mul nodes may cost latency, and for CNNs and
      MLPs), "on" or "off".
    - `smooth_alpha`: SmoothQuant's migration strength in [0, 1] (0.5: the square root
      of the activation / weight channel ratio; 0.75 measured best on the guard's
      held-back sentences of all-MiniLM-L6-v2 on both targets, see
      docs/quantization.md).
    """

    method: Literal["minmax", "percentile", "entropy", "mse"] = "percentile"
    percentile: float = 99.99
    per_channel: bool = True
    activation_dtype: Literal["auto", "int8", "uint8"] = "auto"
    exclude_nodes: tuple[str, ...] = ()  # node names or regexes (full match)
    exclude_ops: tuple[str, ...] = ()
    keep_first: bool = False
    keep_last: bool = False
    calibration_cache: str | None = None  # JSON: read when it exists, then (re)written
    overrides: tuple[str, ...] = ()  # "tensor=amax"
    max_calibration_samples: int | None = 512
    min_top1_agreement: float | None = None
    min_sqnr_db: float | None = None
    min_cosine: float | None = None
    fallback_max_layers: int = 8
    consumer_ranges: bool = True  # clamp ranges to what the consumers can tell apart
    fidelity_guard: bool = True  # always measure; below DEFAULT_FLOORS: fallback or error
    guard_samples: int = 16  # samples the guard measures (held back when the data has them)
    smooth: Literal["auto", "on", "off"] = "auto"
    smooth_alpha: float = 0.75

    def __post_init__(self) -> None:
        try:
            threshold_method(self.method)
        except ConfigError as exc:
            raise ConfigError(f"quantize.method: {exc}") from None
        if not _is_float(self.percentile) or not 0 < self.percentile <= 100:
            raise ConfigError(f"quantize.percentile: expected 0 < p <= 100, got {self.percentile}")
        for key in ("per_channel", "keep_first", "keep_last", "consumer_ranges", "fidelity_guard"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"quantize.{key} must be true or false")
        if self.activation_dtype not in ("auto", "int8", "uint8"):
            raise ConfigError("quantize.activation_dtype must be auto, int8 or uint8")
        for pattern in self.exclude_nodes:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(
                    f"quantize.exclude_nodes: bad regex {pattern!r} ({exc})"
                ) from None
        for text in self.overrides:
            parse_override(text)
        n = self.max_calibration_samples
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"quantize.max_calibration_samples must be >= 1, got {n!r}")
        for key, lo, hi in (
            ("min_top1_agreement", 0.0, 1.0),
            ("min_cosine", -1.0, 1.0),
            ("min_sqnr_db", -math.inf, math.inf),
        ):
            value = getattr(self, key)
            if value is not None and (not _is_float(value) or not lo <= value <= hi):
                raise ConfigError(f"quantize.{key} must be a number in [{lo}, {hi}]")
        m = self.fallback_max_layers
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ConfigError(f"quantize.fallback_max_layers must be >= 0, got {m!r}")
        if self.smooth not in ("auto", "on", "off"):
            raise ConfigError(f"quantize.smooth must be auto, on or off, got {self.smooth!r}")
        if not _is_float(self.smooth_alpha) or not 0 <= self.smooth_alpha <= 1:
            raise ConfigError(f"quantize.smooth_alpha must be in [0, 1], got {self.smooth_alpha!r}")
        g = self.guard_samples
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ConfigError(f"quantize.guard_samples must be >= 1, got {g!r}")

    @property
    def user_floors(self) -> dict[str, float]:
        """The fidelity floors set in the options."""
        keys = ("min_top1_agreement", "min_sqnr_db", "min_cosine")
        return {k: float(getattr(self, k)) for k in keys if getattr(self, k) is not None}

    @property
    def floors(self) -> dict[str, float]:
        """The floors the pass enforces: those set in the options, else (with
        `fidelity_guard`) the guard's `DEFAULT_FLOORS`."""
        if self.user_floors:
            return self.user_floors
        return dict(DEFAULT_FLOORS) if self.fidelity_guard else {}
