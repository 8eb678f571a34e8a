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
    """Options of the `quantize` pass (see docs/quantization.md)."""

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
