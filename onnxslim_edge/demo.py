"""The demo model shipped in the package, and its accuracy on the shipped test split.

`DIGITS_MODEL` is a small ResNet-style CNN (opset 13, BatchNormalization nodes kept)
trained on scikit-learn's 8x8 digits; `DIGITS_TEST` holds the held-out split as an
`.npz` with arrays `image` (N, 1, 8, 8) float32 and `label` (N,) int64. Both were made
by `python -m benchmarks.digits.train` (see assets/README.md). `digits_accuracy` scores
any model with the same input and output (the original or a compressed one) in ONNX
Runtime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import onnx

from onnxslim_edge.errors import ConfigError, DataError, InvalidModelError, first_line

__all__ = [
    "DEMO_RECIPE",
    "DIGITS_MODEL",
    "DIGITS_TEST",
    "EDGE_RECIPE",
    "DemoResult",
    "digits_accuracy",
    "load_digits_test",
    "run_demo",
]

log = logging.getLogger(__name__)

_ASSETS = files("onnxslim_edge") / "assets"
#: The demo CNN (input `image` (batch, 1, 8, 8) float32, output `logits` (batch, 10)).
DIGITS_MODEL = Path(str(_ASSETS / "digits_cnn.onnx"))
#: The test split: arrays `image` (N, 1, 8, 8) float32 in [0, 1] and `label` (N,) int64.
DIGITS_TEST = Path(str(_ASSETS / "digits_test.npz"))

#: The default edge recipe (clean-up + int8).
EDGE_RECIPE = Path(str(files("onnxslim_edge") / "recipes" / "edge.toml"))
#: The recipe the demo runs: the edge recipe with channel pruning recovered by `distill`.
DEMO_RECIPE = Path(str(files("onnxslim_edge") / "recipes" / "demo.toml"))

_NUM_CLASSES = 10


def load_digits_test(path: str | os.PathLike = DIGITS_TEST) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) from a digits test `.npz`, checked; never unpickles anything."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(
                f"{path}: is a single .npy array; need an .npz with 'image' and 'label'"
            )
        with loaded as data:
            if "image" not in data.files or "label" not in data.files:
                raise DataError(
                    f"{path}: needs arrays 'image' and 'label', has {sorted(data.files)}"
                )
            images, labels = data["image"], data["label"]
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (OSError, ValueError) as exc:  # not a zip/npy, or an object array needing pickle
        raise DataError(f"{path}: not a readable .npz without pickled objects ({exc})") from exc
    if images.dtype != np.float32 or images.ndim != 4 or images.shape[1:] != (1, 8, 8):
        raise DataError(
            f"{path}: 'image' must be float32 (N, 1, 8, 8), got {images.dtype} {images.shape}"
        )
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: 'label' must be integers of shape ({images.shape[0]},), "
            f"got {labels.dtype} {labels.shape}"
        )
    return images, labels.astype(np.int64, copy=False)


def digits_accuracy(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    batch_size: int = 64,
    data: str | os.PathLike = DIGITS_TEST,
) -> float:
    """Top-1 accuracy of `model` on the digits test split, run in ONNX Runtime.

    The model must have one input taking (batch, 1, 8, 8) float32 images; its first
    output must be (batch, 10) class scores. The `label` array is not fed to the model.
    """
    from onnxslim_edge.runtime import make_session

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    images, labels = load_digits_test(data)
    if not isinstance(model, onnx.ModelProto) and not Path(model).is_file():
        raise InvalidModelError(f"{model}: model file not found")
    session = make_session(model)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise DataError(
            f"the digits test feeds one input (image); the model has {len(inputs)}: {names}"
        )
    feed_name = inputs[0].name
    output_name = session.get_outputs()[0].name
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        try:
            scores = session.run([output_name], {feed_name: batch})[0]
        except Exception as exc:  # ORT raises its own types for shape/type mismatches
            first = first_line(exc)
            raise DataError(f"the model cannot run on digits images (N, 1, 8, 8): {first}") from exc
        scores = np.asarray(scores)
        if scores.shape != (len(batch), _NUM_CLASSES):
            raise DataError(
                f"output '{output_name}' must be ({len(batch)}, {_NUM_CLASSES}) class scores, "
                f"got shape {scores.shape}"
            )
        correct += int(
            np.count_nonzero(np.argmax(scores, axis=1) == labels[start : start + batch_size])
        )
    accuracy = correct / len(images)
    log.debug("digits accuracy %.4f (%d/%d)", accuracy, correct, len(images))
    return accuracy


@dataclass
class DemoResult:
    """What `run_demo` measured: one row per metric, before and after."""

    folder: Path
    model_path: Path
    report_path: Path
    rows: list[tuple[str, str, str, str]]


def run_demo(
    out: str | os.PathLike = "onnxslim-edge-demo",
    *,
    runs: int = 30,
    target: str | None = None,
    progress: bool = False,
    echo: bool = True,
) -> DemoResult:
    """Optimize the bundled digits CNN with the edge recipe; print and return before/after.

    Writes `digits_cnn.optimized.onnx` and `report.json` into `out` (created if needed).
    Latency is measured interleaved (original and optimized in the same loop, 2 threads,
    spinning off) at batch 1 and 8; quote the ratio, not the absolute times. The target
    follows the one rule of `optimize`: `target`, else the recipe's (demo.toml:
    `onnxruntime-cpu`, because the demo measures on this CPU), else `tensorrt`; with
    `tensorrt` the Q/DQ layout is TensorRT's, which ONNX Runtime's CPU kernels run slower.
    `echo=False` prints nothing.
    """
    from onnxslim_edge.analysis import model_cost
    from onnxslim_edge.model import Outputs, check_output_path, load_model
    from onnxslim_edge.pipeline import Context, Pipeline, load_recipe
    from onnxslim_edge.timing import measure_latency

    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ConfigError(f"runs must be a positive integer, got {runs!r}")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: the demo's output must be a folder; this is a file")
    model_path = folder / "digits_cnn.optimized.onnx"
    report_path = folder / "report.json"
    if folder.is_dir():
        for path in (model_path, report_path):
            check_output_path(path, "demo output")
    else:  # created at the end, when there is something to put in it
        check_output_path(folder, "demo output folder")
    if target is None:
        target = load_recipe(DEMO_RECIPE).target
    images, _ = load_digits_test()
    original = load_model(DIGITS_MODEL)
    input_name = original.graph.input[0].name
    calibration = [{input_name: images[i : i + 64]} for i in range(0, len(images), 64)]
    ctx = Context(data=calibration, progress=progress, target=target)
    pipeline = Pipeline.from_recipe(DEMO_RECIPE, max_samples=len(images), target=target)
    result = pipeline.run(original, ctx)

    report = result.report.to_dict()
    before, after = model_cost(original), model_cost(result.model)
    acc_before, acc_after = digits_accuracy(original), digits_accuracy(result.model)
    rows = [
        ("size (bytes)", before.size_bytes, after.size_bytes),
        ("params", before.params, after.params),
        ("MACs (batch 1)", before.macs, after.macs),
        ("nodes", before.nodes, after.nodes),
    ]
    table = [(name, str(b), str(a), _ratio(a, b)) for name, b, a in rows]
    latency = {}
    for batch in (1, 8):
        stats = measure_latency(
            {"before": original, "after": result.model},
            {input_name: images[:batch]},
            runs=runs,
        )
        latency[f"batch_{batch}"] = {k: v.to_dict() for k, v in stats.items()}
        b, a = stats["before"].median_ms, stats["after"].median_ms
        table.append(
            (f"latency b{batch} (median ms)", f"{b:.3f}", f"{a:.3f}", f"speed x{b / a:.2f}")
        )
    table.append(
        (
            "top-1 accuracy",
            f"{acc_before:.4f}",
            f"{acc_after:.4f}",
            f"{(acc_after - acc_before) * 100:+.2f} pt",
        )
    )
    report["demo"] = {
        "model": str(DIGITS_MODEL),
        "recipe": str(DEMO_RECIPE),
        "target": target,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "latency": latency,
        "test_samples": len(images),
    }
    created = not folder.exists()
    folder.mkdir(exist_ok=True)
    try:
        with Outputs() as outputs:  # the model and its report together, or neither
            outputs.model(result.model, model_path)
            outputs.text(report_path, json.dumps(report, indent=2))
            outputs.commit()
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if echo:
        from onnxslim_edge.pipeline import _format_rows

        print(
            f"onnxslim-edge demo: {DIGITS_MODEL.name} with the demo recipe ({DEMO_RECIPE.name}), "
            f"target {target}, distilled and calibrated on the test images (unlabeled), "
            "latency on this CPU"
        )
        print(_format_rows([("", "before", "after", "change"), *table]))
        print()
        print(result.report.to_table())
        print(f"\nwrote {model_path} and {report_path}")
    return DemoResult(folder, model_path, report_path, table)


def _ratio(after: float, before: float) -> str:
    return f"{(after - before) / before * 100:+.1f}%" if before else "-"
