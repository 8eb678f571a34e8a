"""Issue 11 benchmark: EfficientNet-Lite0 pruned or quantized, then recovered by `distill`.

    .venv-cpu/bin/python -m benchmarks.efficientnet_distill prepare   # bench extra
    nice -n 15 .venv-train/bin/python -m benchmarks.efficientnet_distill run --part prune
    nice -n 15 .venv-train/bin/python -m benchmarks.efficientnet_distill run --part qat
    .venv-cpu/bin/python -m benchmarks.efficientnet_distill run --part plot

`prepare` writes, under `benchmarks/cache/distill_efficientnet/` (never committed):

- `eval.npz`, `calib.npz`: the evaluation and calibration feeds of the benchmark's
  EfficientNet-Lite0 spec (`benchmarks.specs`: the 7 bundled photos and augmented copies,
  56 evaluation feeds, 32 calibration feeds), so the numbers compare with RESULTS.md;
- `train.npz`, `val.npz`: unlabeled *training* and *validation* images for `distill`, made
  only from other pictures (`TRAIN_SOURCES`, `VAL_SOURCES`: scikit-image's and
  matplotlib's other bundled images, and photos inside the PyPI wheels `imgaug` and
  `ultralytics`, fetched with `benchmarks.models.fetch` and never installed). No source is
  one of the evaluation photos or a near-copy of one (`near_duplicates` checks every pair
  on 16 x 16 grey thumbnails; `skimage.data.cat` is Chelsea, `motorcycle_right` the other view
  of the evaluation motorcycle: both are left out). Validation sources are not training
  sources either, so `distill:validation=val.npz` picks the best epoch, and refuses a
  model worse than its input, on photos the student never trained on.

`run --part prune` prunes 30 % of the MACs (`prune-channels`, activation importance,
round_to 16, onnxruntime-cpu, as the `ours-prune30-r16` row), then runs `distill` with the
spec given by `--distill` (default `DISTILL`); `--part qat` quantizes for the `tensorrt`
target (percentile) and fine-tunes through the Q/DQ nodes (`--distill`, default `QAT`).
Each run adds (or replaces, same part and spec) one row of
`benchmarks/results/distill_efficientnet_lite0.json`: top-1 agreement with the fp32
model on the 56 evaluation feeds before and after, the pass's validation fidelity per
epoch, wall time per epoch, the loss curve. `--part plot` draws the loss curves and
validation fidelity to `distill_efficientnet_lite0.png` beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import prefer_installed_package

prefer_installed_package()  # before anything imports onnxslim_edge (see its docstring)

__all__ = [
    "DISTILL",
    "PRUNE",
    "QAT",
    "QUANTIZE",
    "TRAIN_SOURCES",
    "VAL_SOURCES",
    "main",
    "near_duplicates",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distill_efficientnet_lite0.json"
PLOT = RESULTS.with_suffix(".png")

PRUNE = [
    "cleanup",
    "fold-batchnorm",
    "cleanup",
    "prune-channels:macs_reduction=0.3,importance=activation,round_to=16",
    "cleanup",
]
PRUNE_TARGET = "onnxruntime-cpu"
QUANTIZE = ["cleanup", "fold-batchnorm", "cleanup", "quantize:method=percentile"]
QUANTIZE_TARGET = "tensorrt"
#: `{val}` becomes the validation file's path.
DISTILL = "distill:epochs=4,lr=0.0003,augment=off,patience=0,validation={val}"
#: Residual-stream tensors pruning leaves at the teacher's shape (block outputs at 28,
#: 14 and 7 pixels): `FEATURES` matches them besides the logits.
FEATURE_TENSORS = (
    "/_blocks.4/Add_output_0",
    "/_blocks.10/Add_output_0",
    "/_blocks.15/_bn2/BatchNormalization_output_0",
)
FEATURES = DISTILL + ",features=" + "|".join(f"{t}={t}" for t in FEATURE_TENSORS)
QAT = "distill:epochs=1,lr=0.00003,augment=off,patience=0,validation={val}"

#: Pictures that train (name -> where it comes from). None is an evaluation photo.
TRAIN_SOURCES: dict[str, str] = {
    "quokka": "imgaug 0.4.0 wheel, imgaug/quokka.jpg: a quokka",
    "zidane": "ultralytics wheel, ultralytics/assets/zidane.jpg: two men in suits",
    "hubble": "skimage.data.hubble_deep_field: galaxies",
    "retina": "skimage.data.retina: a human retina",
    "ihc": "skimage.data.immunohistochemistry: stained tissue",
    "colorwheel": "skimage.data.colorwheel",
    "camera": "skimage.data.camera: a cameraman (grey)",
    "coins": "skimage.data.coins (grey)",
    "moon": "skimage.data.moon (grey)",
    "brick": "skimage.data.brick (grey texture)",
    "grass": "skimage.data.grass (grey texture)",
    "gravel": "skimage.data.gravel (grey texture)",
    "cell": "skimage.data.cell (grey)",
    "clock": "skimage.data.clock (grey)",
}
#: Pictures that only score (`distill:validation`): neither training nor evaluation ones.
VAL_SOURCES: dict[str, str] = {
    "bus": "ultralytics wheel, ultralytics/assets/bus.jpg: a bus and people in a street",
    "grace_hopper": "matplotlib sample_data/grace_hopper.jpg: a portrait",
}
#: Colour photos are drawn this many times as often as the others.
PHOTO_WEIGHT = {"quokka": 4.0, "zidane": 4.0}
TRAIN_CROPS = 2000
VAL_CROPS = 160
DUPLICATE_CORRELATION = 0.75


def cache_dir() -> Path:
    from benchmarks.models.fetch import cache_root

    return cache_root() / "distill_efficientnet"


# --------------------------------------------------------------------------- data


def _rgb(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)


def _wheel_image(wheel: str, pattern: str) -> np.ndarray:
    from PIL import Image

    from benchmarks.models.fetch import find_in_wheel

    with Image.open(find_in_wheel(wheel, pattern)) as im:
        return _rgb(np.asarray(im.convert("RGB")))


def source_images(names: Sequence[str]) -> dict[str, np.ndarray]:
    """The pictures `names` (of `TRAIN_SOURCES` / `VAL_SOURCES`), H x W x 3 uint8 RGB."""
    import skimage.data

    def grace_hopper() -> np.ndarray:
        import matplotlib.cbook
        from PIL import Image

        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
            return _rgb(np.asarray(im.convert("RGB")))

    loaders: dict[str, Callable[[], np.ndarray]] = {
        "quokka": lambda: _wheel_image("imgaug", "imgaug/quokka.jpg"),
        "zidane": lambda: _wheel_image("ultralytics", "ultralytics/assets/zidane.jpg"),
        "bus": lambda: _wheel_image("ultralytics", "ultralytics/assets/bus.jpg"),
        "grace_hopper": grace_hopper,
        "hubble": skimage.data.hubble_deep_field,
        "ihc": skimage.data.immunohistochemistry,
    }
    out = {}
    for name in names:
        loader = loaders.get(name) or getattr(skimage.data, name)
        out[name] = _rgb(loader())
    return out


def _thumb(img: np.ndarray, size: int = 16) -> np.ndarray:
    from PIL import Image

    grey = Image.fromarray(_rgb(img)).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(grey, dtype=np.float64)
    x = x - x.mean()
    return x / (np.linalg.norm(x) + 1e-9)


def near_duplicates(
    candidates: Mapping[str, np.ndarray],
    references: Mapping[str, np.ndarray],
    threshold: float = DUPLICATE_CORRELATION,
) -> list[tuple[str, str, float]]:
    """(candidate, reference, correlation) for every pair whose 16 x 16 grey thumbnails
    (also mirrored) correlate above `threshold`: the same picture, resized or mirrored."""
    refs = {k: _thumb(v) for k, v in references.items()}
    found = []
    for name, img in candidates.items():
        t = _thumb(img)
        for ref_name, r in refs.items():
            corr = max(float((t * r).sum()), float((t[:, ::-1] * r).sum()))
            if corr > threshold:
                found.append((name, ref_name, corr))
    return found


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation each times U(0.7, 1.3)."""
    from PIL import Image, ImageEnhance

    pil = Image.fromarray(img)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        pil = enhance(pil).enhance(float(rng.uniform(0.7, 1.3)))
    return np.asarray(pil, dtype=np.uint8)


def _crop(img: np.ndarray, rng: np.random.Generator, min_area: float) -> np.ndarray:
    """The benchmark's photo augmentation (`specs.augment_photo`) from `min_area` of the
    area, sides at least 16, then colour-jittered."""
    from benchmarks.specs import augment_photo

    return _jitter(augment_photo(img, rng, min_area=min_area, min_side=16), rng)


def make_crops(
    images: Mapping[str, np.ndarray], count: int, seed: int, *, min_area: float = 0.1
) -> tuple[np.ndarray, list[str]]:
    """`count` preprocessed crops (count, 3, 224, 224) float32, and each one's source."""
    from benchmarks.models.photos import preprocess

    rng = np.random.default_rng(seed)
    names = list(images)
    weights = np.array([PHOTO_WEIGHT.get(n, 1.0) for n in names])
    picks = rng.choice(len(names), size=count, p=weights / weights.sum())
    out = np.empty((count, 3, 224, 224), dtype=np.float32)
    for i, k in enumerate(picks):
        out[i] = preprocess(_crop(images[names[k]], rng, min_area))[0]
    return out, [names[k] for k in picks]


def prepare() -> Path:
    """Write the feeds and the training/validation images (see the module docstring)."""
    from benchmarks.harness import BenchmarkSettings, save_feeds
    from benchmarks.models.photos import photos
    from benchmarks.specs import build_spec

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    spec = build_spec("efficientnet_lite0", BenchmarkSettings())
    evaluation = photos()
    train = source_images(list(TRAIN_SOURCES))
    val = source_images(list(VAL_SOURCES))
    for group, refs in ((train, evaluation), (val, evaluation), (val, train)):
        dup = near_duplicates(group, refs)
        if dup:
            a, b, c = dup[0]
            raise SystemExit(f"{a} is a near-copy of {b} (correlation {c:.2f}): not disjoint")
    save_feeds(spec.evaluation, folder / "eval.npz")
    save_feeds(spec.calibration, folder / "calib.npz")
    x_train, from_train = make_crops(train, TRAIN_CROPS, seed=11)
    x_val, from_val = make_crops(val, VAL_CROPS, seed=12, min_area=0.3)
    np.savez(folder / "train.npz", input=x_train)
    np.savez(folder / "val.npz", input=x_val)
    manifest = {
        "eval_photos": list(evaluation),
        "eval_feeds": len(spec.evaluation),
        "calibration_feeds": len(spec.calibration),
        "train_sources": TRAIN_SOURCES,
        "val_sources": VAL_SOURCES,
        "train_crops": {n: from_train.count(n) for n in TRAIN_SOURCES},
        "val_crops": {n: from_val.count(n) for n in VAL_SOURCES},
        "model": str(spec.path),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------- runs


class MissingData(Exception):
    """Prepared data (or results to plot) not found."""


def _need(path: Path) -> Path:
    if not path.is_file():
        raise MissingData(
            f"{path} missing: run `python -m benchmarks.efficientnet_distill prepare` first"
        )
    return path


def _commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def _agreement(teacher: Any, candidate: Any, feeds: Sequence[Mapping[str, np.ndarray]]) -> float:
    from onnxslim_edge.runtime import make_session

    def logits(model: Any) -> np.ndarray:
        sess = make_session(model, threads=2)
        name = sess.get_outputs()[0].name
        return np.concatenate([sess.run([name], dict(f))[0] for f in feeds])

    return float((logits(teacher).argmax(1) == logits(candidate).argmax(1)).mean())


def _summary(report: Any) -> dict[str, Any]:
    summary = next(d for d in report.details if d.get("kind") == "summary")
    engine = next(d for d in report.details if d.get("kind") == "engine")
    epochs = [d for d in report.details if d.get("kind") == "epoch"]
    return {
        "engine": engine["engine"],
        "compile_s": engine["compile_s"],
        "validation_fidelity_before": summary["fidelity_before"],
        "validation_fidelity_after": summary["fidelity_after"],
        "validation_per_epoch": [e["metric"] for e in epochs],
        "train_loss_per_epoch": [e["train_loss"] for e in epochs],
        "validation_loss_per_epoch": [e["heldout_loss"] for e in epochs],
        "best_epoch": summary["best_epoch"],
        "epochs": summary["epochs"],
        "steps": summary["steps"],
        "wall_s_per_epoch": summary["wall_s_per_epoch"],
        "samples_per_s": summary["samples_per_s"],
        "loss_curve": summary["loss_curve"],
        "kept_input": summary["best_epoch"] == 0,
        "warnings": list(report.warnings),
    }


def run_part(
    part: str, distill: str | None = None, out: Path = RESULTS, *, calib: str = "spec"
) -> dict[str, Any]:
    """One row: compress (prune or quantize), measure, distill, measure; saved to `out`.

    `calib`: what calibrates the compression (pruning importance, int8 ranges): `spec`,
    the benchmark's 32 calibration feeds (crops of the *evaluation* photos, as in
    RESULTS.md), or `train`, the first 32 training crops (disjoint from them).
    """
    from benchmarks.harness import load_feeds
    from onnxslim_edge import Context, Pipeline
    from onnxslim_edge.model import load_model

    folder = cache_dir()
    manifest = json.loads(_need(folder / "manifest.json").read_text(encoding="utf-8"))
    evaluation = load_feeds(_need(folder / "eval.npz"))
    calibration = load_feeds(_need(folder / "calib.npz"))
    train, val = _need(folder / "train.npz"), _need(folder / "val.npz")
    if calib == "train":
        with np.load(train) as data:
            first = data["input"][: len(calibration)]
        calibration = [{"input": first[i : i + 1]} for i in range(len(first))]
    spec = (distill or (DISTILL if part == "prune" else QAT)).format(val=val)
    teacher = load_model(manifest["model"])
    passes, target = (PRUNE, PRUNE_TARGET) if part == "prune" else (QUANTIZE, QUANTIZE_TARGET)
    shapes = {k: tuple(v.shape) for k, v in calibration[0].items()}
    ctx = Context(data=calibration, target=target, input_shapes=shapes)
    compressed = Pipeline(passes, target=target).run(teacher, ctx).model
    before = _agreement(teacher, compressed, evaluation)
    t0 = time.perf_counter()
    ctx = Context(data=str(train), reference=teacher, target=target, progress=False)
    result = Pipeline([spec], target=target).run(compressed, ctx)
    wall = time.perf_counter() - t0
    after = _agreement(teacher, result.model, evaluation)
    from onnxslim_edge.analysis import model_cost

    at = {"input": (1, 3, 224, 224)}
    row = {
        "part": part,
        "compress": passes,
        "target": target,
        "calib": calib,
        "distill": spec.replace(str(val), "val.npz"),
        "eval_top1_agreement_before": before,
        "eval_top1_agreement_after": after,
        "macs_ratio": model_cost(result.model, at).macs / model_cost(teacher, at).macs,
        "wall_s": wall,
        "commit": _commit(),
        **_summary(result.report.passes[-1]),
    }
    doc = _load(out)
    key = ("part", "calib", "distill")
    doc["rows"] = [r for r in doc["rows"] if [r.get(k) for k in key] != [row[k] for k in key]]
    doc["rows"].append(row)
    import onnxruntime

    doc.update(
        machine=f"{platform.machine()}, Python {platform.python_version()}",
        onnxruntime=onnxruntime.__version__,
        data={
            "eval_feeds": len(evaluation),
            "calibration_feeds": len(calibration),
            "train_crops": manifest["train_crops"],
            "val_crops": manifest["val_crops"],
            "train_sources": manifest["train_sources"],
            "val_sources": manifest["val_sources"],
            "eval_photos": manifest["eval_photos"],
        },
    )
    out.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return row


def _load(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"rows": []}


def _short_label(row: Mapping[str, Any]) -> str:
    """`prune (calib spec): epochs=4,lr=0.0003 +3 features` for a legend."""
    options = row["distill"].removeprefix("distill").lstrip(":").split(",")
    keep = [o for o in options if o.split("=")[0] in ("epochs", "steps", "lr")]
    features = [o for o in options if o.startswith("features=")]
    extra = f" +{len(features[0].split('|'))} features" if features else ""
    return f"{row['part']} (calib {row.get('calib', 'spec')}): {','.join(keep)}{extra}"


def plot(path: Path = RESULTS, out: Path = PLOT) -> Path:
    """Loss curve and validation fidelity of every row in `path`, as a PNG."""
    doc = json.loads(_need(path).read_text(encoding="utf-8"))  # missing: exit 2 first
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for row in doc["rows"]:
        label = _short_label(row)
        curve = row["loss_curve"]
        left.plot(np.linspace(0, row["epochs"], len(curve)), curve, label=label)
        fid = [row["validation_fidelity_before"], *row["validation_per_epoch"]]
        right.plot(range(len(fid)), fid, marker="o", label=label)
    left.set(xlabel="epoch", ylabel="training loss", yscale="log", title="distill loss")
    right.set(xlabel="epoch", ylabel="top-1 agreement", title="validation fidelity")
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def markdown(doc: Mapping[str, Any]) -> str:
    lines = [
        "| part | calib | distill | eval top-1 before | after | validation before -> best (epoch) "
        "| s/epoch | wall s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["rows"]:
        per_epoch = float(np.median(r["wall_s_per_epoch"])) if r["wall_s_per_epoch"] else 0.0
        kept = " (kept input)" if r["kept_input"] else ""
        lines.append(
            f"| {r['part']} | {r['calib']} | `{r['distill']}` | {r['eval_top1_agreement_before']:.3f} "
            f"| {r['eval_top1_agreement_after']:.3f}{kept} "
            f"| {r['validation_fidelity_before']:.3f} -> {r['validation_fidelity_after']:.3f} "
            f"({r['best_epoch']}) | {per_epoch:.0f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.efficientnet_distill")
    parser.add_argument("command", choices=("prepare", "run"))
    parser.add_argument("--part", choices=("prune", "qat", "plot"), help="what `run` does")
    parser.add_argument(
        "--distill",
        help="the distill pass spec ({val} = the validation file); default per part",
    )
    parser.add_argument(
        "--calib",
        choices=("spec", "train"),
        default="spec",
        help="what calibrates pruning/quantization: the benchmark's calibration feeds (crops "
        "of the evaluation photos) or training crops (disjoint); default spec",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        if args.part or args.distill:
            parser.error("prepare takes no --part or --distill")
        print(prepare())
        return 0
    if args.part is None:
        parser.error("run needs --part prune, qat or plot")
    if args.distill is not None and not args.distill.startswith("distill"):
        parser.error(f"--distill must be a distill pass spec (distill:...), got {args.distill!r}")
    if args.part == "plot" and args.distill:
        parser.error("--part plot takes no --distill")
    try:
        if args.part == "plot":
            print(plot(args.out, args.out.with_suffix(".png")))
            return 0
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        row = run_part(args.part, args.distill, args.out, calib=args.calib)
    except MissingData as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in row.items() if k != "loss_curve"}, indent=1))
    print(markdown(_load(args.out)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
