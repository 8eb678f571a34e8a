"""Int8 post-training quantization: calibration, Q/DQ placement and insertion, sensitivity.

- `calibrate`: streamed activation statistics (`TensorStats`, `Calibrator`), threshold
  methods (minmax, percentile, entropy, mse), scales and the JSON calibration cache.
- `qdq`: the `quantize` pass (`Quantize`); its parts: `config` (`QuantizeConfig`),
  `numerics` (int8 arithmetic), `placement` (where Q/DQ go per target), `ranges`
  (range narrowing), `builder` (the graph rewrite), `quantizer` (calibrated builds).
- `sensitivity`: `layer_sensitivity(model, data)` ranks layers by the fidelity lost when
  each is quantized alone (used by the pass's automatic fallback).

`lint_qdq` (the TensorRT Q/DQ linter, `onnxslim_edge.analysis.qdq_lint`) is re-exported.
"""

from onnxslim_edge.analysis.qdq_lint import RULES, Violation, format_violations, lint_qdq
from onnxslim_edge.passes.quantize.calibrate import (
    METHODS,
    Calibrator,
    TensorStats,
    compute_amax,
    load_cache,
    save_cache,
    scale_from_amax,
)
from onnxslim_edge.passes.quantize.config import QuantizeConfig
from onnxslim_edge.passes.quantize.qdq import Quantize
from onnxslim_edge.passes.quantize.sensitivity import LayerSensitivity, layer_sensitivity

__all__ = [
    "METHODS",
    "RULES",
    "Calibrator",
    "LayerSensitivity",
    "Quantize",
    "QuantizeConfig",
    "TensorStats",
    "Violation",
    "compute_amax",
    "format_violations",
    "layer_sensitivity",
    "lint_qdq",
    "load_cache",
    "save_cache",
    "scale_from_amax",
]
