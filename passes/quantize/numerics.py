"""Int8 numerics of the `quantize` pass: weight quantization and activation parameters.

`weight_axis` names a layer weight's output-channel axis; `quantize_weight` quantizes
a weight symmetrically to int8 in [-127, 127] (per channel or per tensor) and
`dequantize` is DequantizeLinear in numpy; `QParams` are one activation tensor's
quantization parameters, made by `symmetric_qparams` (int8, zero point 0) or
`asymmetric_qparams` (uint8 with a zero point, the scale nudged so the representable
range stays inside the calibrated one). Pure numpy: no graphs here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "QParams",
    "asymmetric_qparams",
    "dequantize",
    "quantize_weight",
    "symmetric_qparams",
    "weight_axis",
]

#: Smallest scale written (a zero scale would divide by zero in QuantizeLinear).
MIN_SCALE = 1e-12


def weight_axis(op: str, attrs: Mapping[str, Any], rank: int) -> int | None:
    """The output-channel axis of a weight of `op` (None: no per-channel axis)."""
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if int(attrs.get("transB", 0)) else 1
    if op == "MatMul":
        return rank - 1 if rank >= 2 else None
    return None


def quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in [-127, 127]: (q int8, scale float32). `axis` None: one scale;
    else one scale per index of `axis` (shape (w.shape[axis],)). A zero channel gets
    scale 1."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        amax = np.asarray(np.abs(w).max() if w.size else 0.0, dtype=np.float32)
    else:
        others = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=others) if w.size else np.zeros(w.shape[axis], np.float32)
    scale = (amax.astype(np.float64) / 127.0).astype(np.float32)
    scale = np.where(scale > 0, np.maximum(scale, MIN_SCALE), 1.0).astype(np.float32)
    shaped = (
        scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    )
    q = np.clip(np.rint(w / shaped), -127, 127).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: Any = 0, axis: int | None = None):
    """DequantizeLinear in numpy: (q - zero_point) * scale, per `axis` when given."""
    q = np.asarray(q).astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.asarray(zero_point).astype(np.float32)
    if axis is not None and scale.ndim == 1:
        shape = [-1 if i == axis else 1 for i in range(q.ndim)]
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if zp.ndim == 1 else zp
    return (q - zp) * scale


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one activation tensor."""

    scale: float
    zero_point: int
    dtype: str  # "int8" | "uint8"
    amax: float
    method: str
    min: float | None = None
    max: float | None = None
    sqnr_db: float | None = None  # estimated from the calibration histogram


def symmetric_qparams(amax: float, method: str) -> QParams:
    scale = amax / 127.0 if amax > 0 else 1.0
    return QParams(float(np.float32(max(scale, MIN_SCALE))), 0, "int8", amax, method)


def asymmetric_qparams(lo: float, hi: float, amax: float, method: str) -> QParams:
    lo, hi = min(max(lo, -amax), 0.0), max(min(hi, amax), 0.0)
    scale = (hi - lo) / 255.0
    if scale <= 0:
        return QParams(1.0, 0, "uint8", amax, method, lo, hi)
    s32 = np.float32(max(scale, MIN_SCALE))
    zp = int(np.clip(np.rint(-lo / float(s32)), 0, 255))
    # Keep the representable range inside [lo, hi] after rounding the scale to float32,
    # so ONNX Runtime can fold a preceding Relu/Clip(0, 6) into the QuantizeLinear.
    for _ in range(4):
        if s32 * np.float32(255 - zp) <= np.float32(hi) or hi <= 0:
            break
        s32 = np.nextafter(s32, np.float32(0))
    return QParams(float(s32), zp, "uint8", amax, method, lo, hi)
