"""Sweep benchmark: the shipped space on the digits CNN with 1 and 2 Ray workers.

    nice -n 10 python -m benchmarks.sweep [--workers 1,2] [--out benchmarks/results/sweep_digits.json]

Runs `onnxslim_edge/recipes/edge.space.toml` (24 trials: pruning off or at 10/20/30 %
of the MACs x 3 calibration methods x 2 fallback floors, latency timed per trial) on
the bundled digits CNN, calibrated on the first 128 images of its test split and
evaluated on the other 322, once per worker count, each in a fresh folder (nothing
resumed). Reports the wall time of each `run_sweep` call (Ray's start and stop
included) and the speed-up, the Pareto front and the chosen recipe of the last run,
with its accuracy on the evaluation images' labels (a metrics_callback). Writes the
JSON and a Markdown table beside it.
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

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sweep_digits.json"


class _Accuracy:
    """metrics_callback: top-1 accuracy on the evaluation images' labels (picklable)."""

    def __init__(self, images: Any, labels: Any) -> None:
        self.images, self.labels = images, labels

    def __call__(self, candidate: Any, original: Any) -> dict[str, float]:
        import numpy as np

        from onnxslim_edge.runtime import make_session

        scores = make_session(candidate).run(None, {"image": self.images})[0]
        return {"accuracy": float(np.mean(np.argmax(scores, axis=1) == self.labels))}


def run(workers: Sequence[int], workdir: Path) -> dict[str, Any]:
    import numpy as np

    from onnxslim_edge.demo import DIGITS_MODEL, DIGITS_TEST, digits_accuracy
    from onnxslim_edge.sweep import load_space, run_sweep

    space_path = Path(str(DIGITS_MODEL.parent.parent / "recipes" / "edge.space.toml"))
    space = load_space(space_path)
    with np.load(DIGITS_TEST) as d:
        images, labels = d["image"], d["label"]
    calib, evaluation = workdir / "calib.npz", workdir / "eval.npz"
    np.savez(calib, image=images[:128])
    np.savez(evaluation, image=images[128:])
    callback = _Accuracy(images[128:], labels[128:])
    runs = []
    result = None
    for n in workers:
        t0 = time.perf_counter()
        result = run_sweep(
            DIGITS_MODEL,
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
            }
        )
        log.info("workers %d: %.1f s", n, wall)
    assert result is not None
    base = runs[0]["wall_time_s"]
    for r in runs:
        r["speedup"] = round(base / r["wall_time_s"], 2)
    summary = json.loads((result.out / "results.json").read_text())
    rows = [
        {
            "trial": r["trial"],
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
        "model": "digits_cnn",
        "space": "onnxslim_edge/recipes/edge.space.toml",
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
        "original_accuracy": digits_accuracy(DIGITS_MODEL, data=DIGITS_TEST),
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
        f"{env['date']}; command: `{results['command']}`. The shipped space "
        f"(`{results['space']}`, 24 trials) on the digits CNN, calibrated on 128 test images, "
        "evaluated on the other 322; each run in a fresh folder, Ray started and stopped inside "
        "the timed call.",
        "",
        "| workers | wall time (s) | speed-up | trials | failed | sum of trial times (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['workers']} | {r['wall_time_s']:.1f} | {r['speedup']:.2f}x | {r['trials']} "
            f"| {r['failed']} | {r['trial_time_s']:.1f} |"
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
        prune = (
            f"{p.get('prune-channels.macs_reduction'):.0%}"
            if p.get("prune-channels.enabled")
            else "off"
        )
        note = "best" if r["best"] else ("" if r["meets_constraints"] else "misses the floor")
        lines.append(
            f"| {r['trial']} | {'*' if r['front'] else ''} | {prune} | {p.get('quantize.method')} "
            f"| {p.get('quantize.min_top1_agreement')} | {r['size']} | {_f(r['size_ratio'])} "
            f"| {_f(r['macs_ratio'])} | {_f(r['latency_ratio'], '.2f')} "
            f"| {_f(r['top1_agreement'])} | {_f(r['accuracy'])} | {note} |"
        )
    lines.append("")
    lines.append(f"fp32 accuracy on the same 450-image split: {results['original_accuracy']:.4f}.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from benchmarks.harness import environment

    env = environment()  # the commit that runs, before anything can change the tree
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        results = run(workers, Path(tmp))
    results["environment"] = env
    results["command"] = "nice -n 10 python -m benchmarks.sweep " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(render(results), encoding="utf-8")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
