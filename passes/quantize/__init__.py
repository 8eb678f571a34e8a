"""Int8 post-training quantization: calibration statistics and the TensorRT Q/DQ linter.

- `calibrate`: streamed activation statistics (`TensorStats`, `Calibrator`), threshold
  methods (minmax, percentile, entropy, mse), scales and the JSON calibration cache.
- `lint`: `lint_qdq(model)` checks any Q/DQ model against TensorRT's placement rules.
"""

from onnxslim_edge.passes.quantize.calibrate import (
    METHODS,
    Calibrator,
    TensorStats,
    compute_amax,
    load_cache,
    save_cache,
    scale_from_amax,
)
from onnxslim_edge.passes.quantize.lint import RULES, Violation, format_violations, lint_qdq

__all__ = [
    "METHODS",
    "RULES",
    "Calibrator",
    "TensorStats",
    "Violation",
    "compute_amax",
    "format_violations",
    "lint_qdq",
    "load_cache",
    "save_cache",
    "scale_from_amax",
]
