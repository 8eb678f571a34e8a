"""Low-rank benchmark: does removing MACs with `lowrank` remove latency, and at what fidelity.

    nice -n 10 python -m benchmarks.lowrank [--models ppocr_rec,efficientnet_lite0,minilm]
        [--budgets 0.2,0.3,0.5] [--runs 30] [--out benchmarks/results/lowrank.json]

Per model (the harness's model specs: same data, same task metrics) and MAC budget it
runs `lowrank:macs_reduction=B` for the `onnxruntime-cpu` target (ranks rounded to 16)
on the lossless model (`cleanup, fold-batchnorm`), counting MACs at the batch-1
latency shape, with weight error and, as a second row, with the data-aware error on
the spec's calibration feeds.
Then it times every variant and the lossless fp32 model (`cleanup, fold-batchnorm`)
interleaved in one loop (`onnxslim_edge.timing.measure_latency`, 2 threads) at batch 1
and 8, and reports per variant MACs removed, latency saved, their ratio (latency saved
/ MACs removed; 1 means the MACs turn into time one for one), the spec's task fidelity
and the output cosine against fp32. No recovery training (`distill` is separate).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import prefer_installed_package

prefer_installed_package()

__all__ = ["main", "render", "run_model"]

log = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lowrank.json"
MODELS = ("ppocr_rec", "efficientnet_lite0", "minilm")
TARGET = "onnxruntime-cpu"


def _build(spec: Any, fp32: Path, budget: float, data_aware: bool, out: Path) -> dict[str, Any]:
    """`lowrank` on the lossless model `fp32` (the output of cleanup, fold-batchnorm)."""
    from onnxslim_edge import Context, Pipeline
    from onnxslim_edge.errors import ConfigError

    b1 = spec.latency_feeds[1]
    shapes = {k: tuple(v.shape) for k, v in b1.items()}
    options = f"macs_reduction={budget}" + (",data_aware=true" if data_aware else "")
    passes = ["cleanup", "fold-batchnorm", f"lowrank:{options}"]
    ctx = Context(target=TARGET, input_shapes=shapes, data=spec.calibration if data_aware else None)
    t0 = time.perf_counter()
    try:
        result = Pipeline([passes[-1]], target=TARGET).run(fp32, ctx)
    except ConfigError as exc:
        return {"status": "not reachable", "error": str(exc), "passes": passes}
    result.save(out)
    report = result.report.passes[-1]
    layers = [d for d in report.details if "layer" in d]
    forms: dict[str, int] = {}
    for d in layers:
        forms[d["form"]] = forms.get(d["form"], 0) + 1
    return {
        "status": "ok",
        "passes": passes,
        "build_s": round(time.perf_counter() - t0, 2),
        "layers_split": len(layers),
        "forms": forms,
        "layers": [
            {k: d[k] for k in ("layer", "form", "rank", "weight", "energy", "weight_error")}
            for d in layers
        ],
    }


def _flush_subnormals(src: Path, out: Path) -> int:
    """`src` with its float32 weights' subnormal values set to zero (as `lowrank` does to
    its factors); returns how many were flushed. The fair baseline for the latency ratio:
    some real models carry subnormal weights that slow x86 kernels by themselves."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    flushed = 0
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT:
            continue
        a = numpy_helper.to_array(t).copy()
        mask = (a != 0) & (np.abs(a) < np.finfo(np.float32).tiny)
        if mask.any():
            a[mask] = 0
            flushed += int(mask.sum())
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(model, str(out))
    return flushed


def _macs(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    from onnxslim_edge.analysis.cost import model_cost
    from onnxslim_edge.model import load_model

    return model_cost(load_model(path), shapes).macs


def _cosine(spec: Any, ref: Path, cand: Path) -> float | None:
    from onnxslim_edge.verify import compare

    result = compare(ref, cand, data=spec.evaluation, max_samples=spec.verify_limit or 16)
    values = [m.cosine for m in result.outputs.values() if m.cosine is not None]
    return min(values) if values else None


def run_model(name: str, budgets: Sequence[float], runs: int, workdir: Path) -> dict[str, Any]:
    from benchmarks.harness import BenchmarkSettings, build_spec
    from onnxslim_edge import Pipeline
    from onnxslim_edge.timing import measure_latency

    settings = BenchmarkSettings(runs=runs)
    spec = build_spec(name, settings)
    shapes = {k: tuple(v.shape) for k, v in spec.latency_feeds[1].items()}
    fp32 = workdir / f"{name}.fp32.onnx"
    Pipeline(["cleanup", "fold-batchnorm"], target=TARGET).run(spec.path).save(fp32)
    ftz = workdir / f"{name}.fp32-ftz.onnx"
    flushed = _flush_subnormals(fp32, ftz)
    rows: dict[str, dict[str, Any]] = {
        "fp32": {"status": "ok", "macs": _macs(fp32, shapes)},
        "fp32-ftz": {"status": "ok", "macs": _macs(ftz, shapes), "flushed": flushed},
    }
    paths = {"fp32": fp32, "fp32-ftz": ftz}
    for budget in budgets:
        for aware in (False, True):
            key = f"lowrank-{round(budget * 100)}" + ("-data" if aware else "")
            path = workdir / f"{name}.{key}.onnx"
            row = _build(spec, fp32, budget, aware, path)
            row["budget"] = budget
            row["data_aware"] = aware
            rows[key] = row
            if row["status"] == "ok":
                row["macs"] = _macs(path, shapes)
                paths[key] = path
            log.info("%s %s: %s", name, key, row["status"])
    for batch, feeds in sorted(spec.latency_feeds.items()):
        lat = measure_latency(paths, feeds, runs=runs, warmup=settings.warmup, threads=2)
        for key, stats in lat.items():
            rows[key][f"latency_b{batch}"] = stats.to_dict()
    base, fair = rows["fp32"], rows["fp32-ftz"]
    for key, path in paths.items():
        row = rows[key]
        row["fidelity"] = spec.fidelity(fp32, path)
        row["output_cosine"] = 1.0 if key == "fp32" else _cosine(spec, fp32, path)
        removed = 1.0 - row["macs"] / base["macs"]
        row["macs_removed"] = removed
        for batch in spec.latency_feeds:
            ms = row[f"latency_b{batch}"]["median_ms"]
            saved = 1.0 - ms / base[f"latency_b{batch}"]["median_ms"]
            saved_ftz = 1.0 - ms / fair[f"latency_b{batch}"]["median_ms"]
            row[f"latency_saved_b{batch}"] = saved
            row[f"ratio_b{batch}"] = saved / removed if removed > 0 else None
            row[f"ratio_ftz_b{batch}"] = saved_ftz / removed if removed > 0 else None
    return {
        "model": name,
        "title": spec.title,
        "primary": spec.primary,
        "primary_label": spec.primary_label,
        "target": TARGET,
        "runs": runs,
        "rows": rows,
    }


def render(results: dict[str, Any]) -> str:
    """The RESULTS.md section: one table per model."""
    env = results["environment"]
    lines = [
        "## Low-rank splitting (issue 12), `python -m benchmarks.lowrank`",
        "",
        f"Measured at commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''} on "
        f"{env['cpu']} ({env['affinity']} cores available), ONNX Runtime {env['onnxruntime']}, "
        f"{env['date']}; command: `{results['command']}`. Target onnxruntime-cpu (ranks "
        "multiples of 16), MACs at the batch-1 latency shape, latency interleaved with the "
        "lossless fp32 model (2 threads, median). ratio = latency saved / MACs removed. "
        "fp32-ftz: fp32 with subnormal weights set to zero, as `lowrank` does in its factors; "
        "`ratio vs ftz` uses it as the baseline. No recovery training (distill is built "
        "separately).",
        "",
    ]
    for model in results["models"]:
        rows = model["rows"]
        lines += [
            f"### {model['title']}",
            "",
            f"| variant | MACs removed | layers split (forms) | b1 ms | saved b1 | ratio b1 | ratio b1 vs ftz | b8 ms | saved b8 | ratio b8 | ratio b8 vs ftz | {model['primary_label']} | output cosine |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, r in rows.items():
            if r["status"] != "ok":
                lines.append(
                    f"| {key} | {r['status']}: {r.get('error', '')} | | | | | | | | | | | |"
                )
                continue

            def pct(v: float | None) -> str:
                return "-" if v is None else f"{v * 100:.1f}%"

            def num(v: float | None, fmt: str = ".2f") -> str:
                return "-" if v is None else format(v, fmt)

            forms = ", ".join(f"{k} {v}" for k, v in r.get("forms", {}).items())
            split = f"{r.get('layers_split', 0)} ({forms})" if forms else "-"
            lines.append(
                f"| {key} | {pct(r['macs_removed'])} | {split} | "
                f"{num(r['latency_b1']['median_ms'])} | {pct(r['latency_saved_b1'])} | {num(r['ratio_b1'])} | {num(r['ratio_ftz_b1'])} | "
                f"{num(r['latency_b8']['median_ms'])} | {pct(r['latency_saved_b8'])} | {num(r['ratio_b8'])} | {num(r['ratio_ftz_b8'])} | "
                f"{num(r['fidelity'].get(model['primary']), '.3f')} | {num(r['output_cosine'], '.4f')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lowrank", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budgets", default="0.2,0.3,0.5")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from benchmarks.harness import environment

    budgets = [float(b) for b in args.budgets.split(",")]
    env = environment()  # the commit that runs, before anything can change the tree
    models = []
    with tempfile.TemporaryDirectory(prefix="lowrank-bench-") as tmp:
        for name in args.models.split(","):
            t0 = time.perf_counter()
            models.append(run_model(name, budgets, args.runs, Path(tmp)))
            log.info("%s done in %.0f s", name, time.perf_counter() - t0)
    results = {
        "environment": env,
        "command": "nice -n 10 python -m benchmarks.lowrank " + " ".join(argv or sys.argv[1:]),
        "models": models,
    }
    args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(render(results) + "\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
