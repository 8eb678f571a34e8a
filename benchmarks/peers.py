"""Peer tools the benchmark runs side by side with onnxslim-edge, on the same models and data.

Each function takes the input model's path, the path to write, and the calibration
feeds (a list of `{input_name: array}`), writes the optimized model and returns notes
as a dict (empty when there is nothing to say). They raise on failure; the harness
records the failure as a result.

- `onnxslim_slim`: `onnxslim.slim(model)` (lossless graph clean-up).
- `onnxsim_simplify`: `onnxsim.simplify(model)` -> (model, check_ok) (lossless clean-up).
- `ort_quantize`: ONNX Runtime's `quantize_static` in QDQ format, weights QInt8 per
  channel (symmetric), activations QInt8 symmetric or QUInt8 asymmetric, calibrated
  with MinMax, Entropy or Percentile over the calibration feeds. The model first goes
  through `quant_pre_process` (symbolic shape inference and ONNX Runtime's graph
  optimizations, which fold BatchNormalization into convolutions), as ONNX Runtime's
  documentation recommends (retried without symbolic shape inference when that fails;
  the raw model is quantized when both fail); the notes say which.

Every model is written with `onnxslim_edge.model.save_model`, so every method's file
has the same IR-version handling and on-disk format.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PEER_VERSIONS", "onnxsim_simplify", "onnxslim_slim", "ort_quantize", "peer_versions"]

log = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]

#: Distribution name of each peer tool (for versions in the results).
PEER_VERSIONS: Mapping[str, str] = {
    "onnxslim": "onnxslim",
    "onnxsim": "onnxsim",
    "onnxruntime": "onnxruntime",
}


def peer_versions() -> dict[str, str | None]:
    """Installed version of each peer tool, None where it is not installed."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for key, dist in PEER_VERSIONS.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    if out["onnxruntime"] is None:
        for dist in ("onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime-gpu"):
            try:
                out["onnxruntime"] = f"{metadata.version(dist)} ({dist})"
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _save(model: Any, out_path: Path) -> None:
    from onnxslim_edge.model import save_model

    save_model(model, out_path)


def onnxslim_slim(model_path: Path, out_path: Path, calibration: Sequence[Feed]) -> dict[str, Any]:
    """`onnxslim.slim` with its defaults."""
    import onnxslim

    slimmed = onnxslim.slim(str(model_path))
    if slimmed is None:
        raise RuntimeError("onnxslim.slim returned no model")
    _save(slimmed, out_path)
    return {}


def onnxsim_simplify(
    model_path: Path, out_path: Path, calibration: Sequence[Feed]
) -> dict[str, Any]:
    """`onnxsim.simplify` with its defaults; its own output check is recorded as `check_ok`."""
    import onnx
    import onnxsim

    model = onnx.load(str(model_path))
    simplified, ok = onnxsim.simplify(model)
    _save(simplified, out_path)
    return {"check_ok": bool(ok)}


def _at_least_opset(path: Path, tmp: Path, notes: dict[str, Any], opset: int = 13) -> Path:
    """`path`, or a copy converted to `opset` when its default-domain opset is lower:
    per-channel QDQ needs DequantizeLinear's `axis`, which came with opset 13."""
    import onnx

    from onnxslim_edge.model import convert_opset, save_model

    model = onnx.load(str(path))
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current >= opset:
        return path
    save_model(convert_opset(model, opset), tmp)
    notes["opset"] = f"converted from opset {current} to {opset} (per-channel QDQ needs 13)"
    return tmp


class _Reader:
    """A `CalibrationDataReader` over a list of feed dicts (built lazily: ORT imports it)."""

    def __new__(cls, feeds: Sequence[Feed]) -> Any:
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self, feeds: Sequence[Feed]) -> None:
                self._feeds = list(feeds)
                self._it: Iterator[Feed] = iter(self._feeds)

            def get_next(self) -> dict[str, np.ndarray] | None:
                item = next(self._it, None)
                return None if item is None else dict(item)

            def rewind(self) -> None:
                self._it = iter(self._feeds)

        return Reader(feeds)


def ort_quantize(
    model_path: Path,
    out_path: Path,
    calibration: Sequence[Feed],
    *,
    calibrate_method: str = "MinMax",
    activation: str = "QInt8",
) -> dict[str, Any]:
    """`quantize_static` (QDQ, per-channel QInt8 weights) after `quant_pre_process`.

    `calibrate_method`: "MinMax", "Entropy" or "Percentile". `activation`: "QInt8"
    (symmetric, zero point 0, as TensorRT wants) or "QUInt8" (asymmetric).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if activation not in ("QInt8", "QUInt8"):
        raise ValueError(f"activation must be QInt8 or QUInt8, not {activation!r}")
    method = getattr(CalibrationMethod, calibrate_method)
    import onnx

    notes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ort-quant-") as tmp:
        model_path = _at_least_opset(Path(model_path), Path(tmp) / "opset13.onnx", notes)
        pre = Path(tmp) / "pre.onnx"
        source = Path(model_path)
        for skip_symbolic in (False, True):
            try:
                quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=skip_symbolic)
            except Exception as exc:  # symbolic shape inference fails on some graphs
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                notes["pre_process"] = f"failed ({first}), quantized the raw model"
                log.warning("quant_pre_process failed on %s: %s", model_path, first)
                continue
            source = pre
            notes["pre_process"] = (
                "without symbolic shape inference (it failed)" if skip_symbolic else "full"
            )
            break
        raw_out = Path(tmp) / "quant.onnx"
        quantize_static(
            str(source),
            str(raw_out),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=getattr(QuantType, activation),
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            extra_options={
                "ActivationSymmetric": activation == "QInt8",
                "WeightSymmetric": True,
            },
        )
        _save(onnx.load(str(raw_out)), out_path)
    return notes
