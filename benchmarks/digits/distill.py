"""Issue 11 benchmark: the digits CNN pruned by 50 % of its MACs, then recovered by `distill`.

    .venv-cpu/bin/python -m benchmarks.digits.distill prepare      # needs scikit-learn
    nice -n 10 .venv-train/bin/python -m benchmarks.digits.distill run  # needs the train extra

`prepare` writes the training split the shipped model was trained on (1,347 images,
scikit-learn's digits, the split of `benchmarks.digits.train`) to
`benchmarks/cache/digits_train.npz`; the test split shipped with the package (450 images)
is disjoint from it and is only used to measure accuracy. `run` prunes the teacher
(`cleanup`, `fold-batchnorm`, `prune-channels:macs_reduction=0.5`, target tensorrt:
channel counts multiples of 8), distills on the *unlabeled* training images, quantizes
to int8 (TensorRT placement), fine-tunes through the Q/DQ nodes, and writes every row's
test accuracy, MACs, and the distill runs' epochs, wall time per epoch and samples/s to
`benchmarks/results/distill_digits.json` (`--out` elsewhere); it prints the markdown table
RESULTS.md holds. The gradient engine is the flavor's: ONNX Runtime training in `train`,
onnx-ad in `cpu` (`.venv-cpu/bin/python -m benchmarks.digits.distill run --out ...`).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import prefer_installed_package

prefer_installed_package()  # before anything imports onnxslim_edge (see its docstring)

__all__ = ["DISTILL", "QAT", "main"]

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "benchmarks" / "cache" / "digits_train.npz"
OUT = ROOT / "benchmarks" / "results" / "distill_digits.json"
PRUNE = ["cleanup", "fold-batchnorm", "cleanup", "prune-channels:macs_reduction=0.5"]
DISTILL = "distill:epochs=40,lr=0.003,patience=0"
QUANTIZE = "quantize:method=percentile"
QAT = "distill:epochs=5,lr=0.0001,patience=0"


def prepare() -> Path:
    from benchmarks.digits.train import TrainConfig, load_split

    x_train, y_train, _, _ = load_split(TrainConfig())
    TRAIN.parent.mkdir(parents=True, exist_ok=True)
    np.savez(TRAIN, image=x_train, label=y_train)
    return TRAIN


def _row(name: str, model: Any, started: float | None, report: Any = None) -> dict[str, Any]:
    from onnxslim_edge.analysis import model_cost
    from onnxslim_edge.demo import digits_accuracy

    row = {
        "method": name,
        "accuracy": digits_accuracy(model),
        "macs": model_cost(model).macs,
        "wall_s": None if started is None else time.perf_counter() - started,
    }
    if report is not None:
        summary = next(d for d in report.details if d.get("kind") == "summary")
        row.update(
            epochs=summary["epochs"],
            best_epoch=summary["best_epoch"],
            wall_s_per_epoch=float(np.median(summary["wall_s_per_epoch"])),
            samples_per_s=float(np.median(summary["samples_per_s"])),
            heldout_fidelity=[summary["fidelity_before"], summary["fidelity_after"]],
            loss_curve=summary["loss_curve"],
            compile_s=next(d for d in report.details if d.get("kind") == "engine")["compile_s"],
            engine=next(d for d in report.details if d.get("kind") == "engine")["engine"],
        )
    return row


def run(out: Path = OUT) -> dict[str, Any]:
    from onnxslim_edge import Context, Pipeline
    from onnxslim_edge.demo import DIGITS_MODEL
    from onnxslim_edge.model import load_model

    if not TRAIN.is_file():
        raise SystemExit(f"{TRAIN} missing: run `python -m benchmarks.digits.distill prepare`")
    images = np.load(TRAIN)["image"]
    teacher = load_model(DIGITS_MODEL)
    rows = [_row("fp32 (teacher)", teacher, None)]

    def step(name: str, passes: list[str], model: Any) -> Any:
        t0 = time.perf_counter()
        ctx = Context(data=[{"image": images}], reference=teacher, target="tensorrt")
        result = Pipeline(passes, target="tensorrt").run(model, ctx)
        distill = [p for p in result.report.passes if p.name == "distill"]
        rows.append(_row(name, result.model, t0, distill[-1] if distill else None))
        return result.model

    pruned = step("pruned (macs_reduction=0.5)", PRUNE, teacher)
    step("pruned + distill (defaults)", ["distill"], pruned)
    distilled = step(f"pruned + {DISTILL}", [DISTILL], pruned)
    quantized = step(f"... + {QUANTIZE}", [QUANTIZE], distilled)
    step(f"... + {QAT} (quantization-aware)", [QAT], quantized)
    step(f"pruned + {QUANTIZE} (no recovery)", [QUANTIZE], pruned)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    doc = {
        "commit": commit,
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "train_samples": len(images),
        "rows": rows,
    }
    import onnxruntime

    doc["onnxruntime"] = onnxruntime.__version__
    doc["engine"] = next(r["engine"] for r in rows if "engine" in r)
    out.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return doc


def markdown(doc: dict[str, Any]) -> str:
    base = doc["rows"][0]
    lines = [
        "| method | test accuracy | vs teacher | MACs | epochs (best) | s/epoch | samples/s "
        "| compile s | wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["rows"]:
        epochs = f"{r['epochs']} ({r['best_epoch']})" if "epochs" in r else "-"
        per_epoch = f"{r['wall_s_per_epoch']:.2f}" if "epochs" in r else "-"
        rate = f"{r['samples_per_s']:.0f}" if "epochs" in r else "-"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
        compile_s = f"{r['compile_s']:.1f}" if "epochs" in r else "-"
        lines.append(
            f"| {r['method']} | {r['accuracy']:.4f} | {(r['accuracy'] - base['accuracy']) * 100:+.2f} pt "
            f"| {r['macs'] / base['macs']:.1%} | {epochs} | {per_epoch} | {rate} | {compile_s} | {wall} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.digits.distill")
    parser.add_argument("command", choices=("prepare", "run"))
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON results (default {OUT})")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print(prepare())
        return 0
    doc = run(args.out)
    print(
        f"commit {doc['commit']}, engine {doc['engine']} (onnxruntime {doc['onnxruntime']}), "
        f"{doc['train_samples']} training images\n"
    )
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
