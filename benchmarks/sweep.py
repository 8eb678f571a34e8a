"""Sweep benchmark: a space on a model with 1 and 2 Ray workers; the front and the pick.

    nice -n 10 python -m benchmarks.sweep [--model digits|efficientnet_lite0] [--workers 1,2]
        [--out benchmarks/results/sweep_<model>.json]

- `digits`: the shipped space `onnxslim_edge/recipes/edge.space.toml` (24 trials:
  pruning off or at 10/20/30 % of the MACs x 3 calibration methods x 2 fallback floors,
  latency timed per trial) on the bundled digits CNN, calibrated on the first 128
  images of its test split and evaluated on the other 322, with the accuracy on their
  labels as a custom metric (a metrics_callback).
- `efficientnet_lite0`: the benchmark's EfficientNet-Lite0 and data (benchmarks.specs:
  32 augmented photos calibrate, 56 others evaluate) over `EFFICIENTNET_SPACE` (8 trials:
  pruning off or 10 % of the MACs (activation importance, round_to 16) x minmax / percentile x fallback floor
  0.9 / 0.95).

Each worker count runs in a fresh folder (nothing resumed); the wall time of each
`run_sweep` call includes Ray's start and stop. Reports the speed-up, and the trials of
the last run with the Pareto front first and the chosen recipe. Writes the JSON and a
Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("digits", "efficientnet_lite0")

EFFICIENTNET_SPACE = """
target = "onnxruntime-cpu"

[[pass]]
name = "cleanup"

[[pass]]
name = "fold-batchnorm"

[[pass]]
name = "cleanup"

[[pass]]
name = "prune-channels"
enabled = [false, true]
macs_reduction = 0.1
importance = "activation"
round_to = 16

[[pass]]
name = "quantize"
method = ["minmax", "percentile"]
min_top1_agreement = [0.9, 0.95]

[objectives]
cost = ["size", "latency"]
fidelity = "top1_agreement"
latency_runs = 30

[constraints]
min_top1_agreement = 0.95
"""


class _Accuracy:
    """metrics_callback: top-1 accuracy on the evaluation images' labels (picklable)."""

    def __init__(self, images: Any, labels: Any) -> None:
        self.images, self.labels = images, labels

    def __call__(self, candidate: Any, original: Any) -> dict[str, float]:
        import numpy as np

        from onnxslim_edge.runtime import make_session

        scores = make_session(candidate).run(None, {"image": self.images})[0]
        return {"accuracy": float(np.mean(np.argmax(scores, axis=1) == self.labels))}


def _digits(workdir: Path) -> dict[str, Any]:
    import numpy as np

    from onnxslim_edge.demo import DIGITS_MODEL, DIGITS_TEST, digits_accuracy

    with np.load(DIGITS_TEST) as d:
        images, labels = d["image"], d["label"]
    np.savez(workdir / "calib.npz", image=images[:128])
    np.savez(workdir / "eval.npz", image=images[128:])
    return {
        "model": DIGITS_MODEL,
        "space": Path(str(DIGITS_MODEL.parent.parent / "recipes" / "edge.space.toml")),
        "space_label": "onnxslim_edge/recipes/edge.space.toml",
        "callback": _Accuracy(images[128:], labels[128:]),
        "notes": "the digits CNN, calibrated on 128 test images, evaluated on the other 322",
        "original_accuracy": digits_accuracy(DIGITS_MODEL, data=DIGITS_TEST),
    }


def _efficientnet(workdir: Path) -> dict[str, Any]:
    import numpy as np

    from benchmarks.harness import BenchmarkSettings
    from benchmarks.specs import build_spec

    spec = build_spec("efficientnet_lite0", BenchmarkSettings())
    name = next(iter(spec.calibration[0]))
    np.savez(workdir / "calib.npz", **{name: np.concatenate([f[name] for f in spec.calibration])})
    np.savez(workdir / "eval.npz", **{name: np.concatenate([f[name] for f in spec.evaluation])})
    return {
        "model": spec.path,
        "space": EFFICIENTNET_SPACE,
        "space_label": "benchmarks/sweep.py EFFICIENTNET_SPACE",
        "callback": None,
        "notes": f"EfficientNet-Lite0; data: {spec.data_notes}",
        "original_accuracy": None,
    }


def run(model: str, workers: Sequence[int], workdir: Path) -> dict[str, Any]:
    from onnxslim_edge.sweep import load_space, run_sweep

    setup = _digits(workdir) if model == "digits" else _efficientnet(workdir)
    space = load_space(setup["space"])
    calib, evaluation, callback = workdir / "calib.npz", workdir / "eval.npz", setup["callback"]
    runs = []
    result = None
    for n in workers:
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        result = run_sweep(
            setup["model"],
            space,
            data=calib,
            eval_data=evaluation,
            out=workdir / f"sweep-w{n}",
            workers=n,
            metrics_callback=callback,
        )
        wall = time.perf_counter() - t0
        trial_time = sum(t.metrics.get("wall_time_s", 0.0) for t in result.trials)
        runs.append(
            {
                "workers": n,
                "wall_time_s": round(wall, 2),
                "trials": len(result.trials),
                "ran": result.ran,
                "failed": sum(not t.ok for t in result.trials),
                "trial_time_s": round(trial_time, 2),
                # Other people's work on the machine: 1-minute load average before, after.
                "load_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            }
        )
        log.info("workers %d: %.1f s", n, wall)
    assert result is not None
    base = runs[0]["wall_time_s"]
    for r in runs:
        r["speedup"] = round(base / r["wall_time_s"], 2)
    summary = json.loads((result.out / "results.json").read_text())
    recipes = {t.id: t.recipe for t in result.trials}

    def prune(tid: str) -> str:
        for p in recipes[tid]["pass"]:
            if p["name"] == "prune-channels":
                return f"{p['macs_reduction']:.0%}"
        return "off"

    rows = [
        {
            "trial": r["trial"],
            "prune": prune(r["trial"]),
            "reason": r["metrics"].get("reason"),
            "front": r["front"],
            "best": r["best"],
            "meets_constraints": r["meets_constraints"],
            "point": r["point"],
            **{
                k: r["metrics"].get(k)
                for k in ("size", "size_ratio", "macs_ratio", "latency_ratio", "top1_agreement")
            },
            "accuracy": r["metrics"].get("accuracy"),
            "status": r["status"],
        }
        for r in summary["rows"]
    ]
    best = result.best
    return {
        "model": model,
        "space": setup["space_label"],
        "notes": setup["notes"],
        "runs": runs,
        "front": summary["front"],
        "best": None
        if best is None
        else {
            "trial": best.id,
            "point": best.point,
            "recipe": (best.folder / "recipe.toml").read_text(),
            "metrics": best.metrics,
        },
        "original_accuracy": setup["original_accuracy"],
        "rows": rows,
    }


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def render(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "## Sweeps on Ray (issue 14), `python -m benchmarks.sweep`",
        "",
        f"Measured at commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''} on "
        f"{env['cpu']} ({env['affinity']} cores available), ONNX Runtime {env['onnxruntime']}, "
        f"{env['date']}; command: `{results['command']}`. Space `{results['space']}` "
        f"({results['runs'][0]['trials']} trials) on {results['notes']}; each run in a fresh "
        "folder, Ray started and stopped inside the timed call.",
        "",
        "| workers | wall time (s) | speed-up | trials | failed | sum of trial times (s) "
        "| load average (1 min) before, after |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['workers']} | {r['wall_time_s']:.1f} | {r['speedup']:.2f}x | {r['trials']} "
            f"| {r['failed']} | {r['trial_time_s']:.1f} "
            f"| {r['load_1m'][0]:.2f}, {r['load_1m'][1]:.2f} |"
        )
    lines += [
        "",
        "Trials of the last run, Pareto front (size vs top-1 agreement, among trials meeting "
        "min_top1_agreement 0.95) first:",
        "",
        "| trial | front | prune | quantize method | fallback floor | size | size ratio "
        "| MACs ratio | latency ratio | top-1 agreement | accuracy | |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results["rows"]:
        p = r["point"]
        if r["status"] != "ok":
            note = f"failed: {r['reason']}".replace("|", "/")
        else:
            note = "best" if r["best"] else ("" if r["meets_constraints"] else "misses the floor")
        lines.append(
            f"| {r['trial']} | {'*' if r['front'] else ''} | {r['prune']} "
            f"| {p.get('quantize.method')} | {p.get('quantize.min_top1_agreement')} "
            f"| {_f(r['size'], 'd')} | {_f(r['size_ratio'])} "
            f"| {_f(r['macs_ratio'])} | {_f(r['latency_ratio'], '.2f')} "
            f"| {_f(r['top1_agreement'])} | {_f(r['accuracy'])} | {note} |"
        )
    lines.append("")
    if results["original_accuracy"] is not None:
        lines.append(f"fp32 accuracy on all 450 test images: {results['original_accuracy']:.4f}.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__)
    parser.add_argument("--model", choices=MODELS, default="digits")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/sweep_<model>.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from benchmarks.harness import environment

    env = environment()  # the commit that runs, before anything can change the tree
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        results = run(args.model, workers, Path(tmp))
    results["environment"] = env
    results["command"] = "nice -n 10 python -m benchmarks.sweep " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.out is None:
        args.out = RESULTS / f"sweep_{args.model}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(render(results), encoding="utf-8")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
