"""PP-OCRv4 models (PaddlePaddle-exported ONNX) and the scores used to judge compressed copies.

The `rapidocr-onnxruntime` wheel on PyPI ships three ONNX files exported from
PaddlePaddle with paddle2onnx: PP-OCRv4 text detection (DBNet, "det"), PP-OCRv4 text
recognition (SVTR-LCNet with a CTC head, "rec") and the PP-OCR mobile v2.0 text-direction
classifier ("cls", 0 or 180 degrees). The wheel is downloaded and unpacked, never
installed: installing it would pull in a second `onnxruntime`. The recognition
dictionary is the rec model's `character` metadata entry.

Scores, all computed with ONNX Runtime through `onnxslim_edge.runtime.make_session`:

- rec: text lines rendered with Pillow from a fixed list of strings; exact-match rate of
  the CTC greedy decoding (`rec_exact_match`).
- det: bundled photos (scikit-image, scikit-learn) and rendered documents; fidelity of a
  candidate's probability maps against a reference (`det_map_fidelity`) and a count of
  text regions as a sanity check (`det_boxes`).
- cls: rendered lines, every other one turned 180 degrees; accuracy (`cls_accuracy`).

Preprocessing follows PaddleOCR's inference defaults (images in BGR order as OpenCV
reads them): rec and cls scale to height 48 keeping the aspect ratio and normalize with
`(x / 255 - 0.5) / 0.5`, padding on the right with zeros; det scales (up or down) so the
longer side is `limit_side` (640 by default), rounds both sides to multiples of 32 and
normalizes with the ImageNet mean and standard deviation.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxslim_edge.errors import DataError, InvalidModelError

__all__ = [
    "CLS_SHAPE",
    "REC_HEIGHT",
    "REC_TEXTS",
    "WHEEL",
    "WHEEL_VERSION",
    "charset",
    "cls_accuracy",
    "cls_inputs",
    "det_boxes",
    "det_inputs",
    "det_map_fidelity",
    "det_maps",
    "det_named_inputs",
    "ocr_models",
    "rec_decode",
    "rec_exact_match",
    "rec_preprocess",
    "rec_samples",
    "rec_scores",
    "rec_texts",
    "render_line",
]

log = logging.getLogger(__name__)

WHEEL = "rapidocr-onnxruntime"
#: Pinned so that the scores stay comparable from run to run.
WHEEL_VERSION = "1.4.4"
_MODEL_FILES = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}

REC_HEIGHT = 48
#: (channels, height, width) of the direction classifier's input.
CLS_SHAPE = (3, 48, 192)
_REC_WIDTH_STEP = 32  # rec inputs are padded to a multiple of this to batch equal widths
_DET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_DET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

#: Text lines for the recognition and classification scores. Every character is in the
#: PP-OCRv4 dictionary (a test checks it).
REC_TEXTS: tuple[str, ...] = (
    "Invoice",
    "Total",
    "Subtotal: 1,284.50",
    "Page 12 of 40",
    "ONNX Runtime",
    "TensorRT 8.6",
    "Jetson Orin Nano",
    "Hello World",
    "The quick brown fox",
    "jumps over the lazy dog",
    "2025-01-17",
    "08:45 AM",
    "3.14159",
    "+49 30 1234567",
    "(555) 010-2024",
    "ID: A7X-93K2",
    "Order #48213",
    "50% OFF",
    "USD 19.99",
    "Qty 3 x 4.25",
    "support@example.com",
    "www.example.org",
    "Warning!",
    "Do not enter",
    "EXIT",
    "Main Street 221B",
    "Berlin",
    "Tokyo 2020",
    "New York, NY 10001",
    "Monday",
    "September",
    "Temperature",
    "Batch 0042",
    "Lot B-17/C",
    "Serial No. 55871",
    "Version 1.4.4",
    "Python 3.12",
    "CPU 2.4 GHz",
    "RAM 16 GB",
    "Width 1920",
    "Height 1080",
    "Speed Limit 60",
    "Parking",
    "Open 24 Hours",
    "Pharmacy",
    "Coffee & Tea",
    "Fresh Bread",
    "Best before 12/2026",
    "Net weight 500g",
    "Keep refrigerated",
    "Made in Germany",
    "Station",
    "Platform 9",
    "Gate B12",
    "Flight LH 2456",
    "Seat 14C",
    "Room 305",
    "Floor 3",
    "Thank you!",
    "Receipt",
    "Cash",
    "Change 0.75",
)

# Font files cycled through the lines; looked up in matplotlib's wheel and in
# Debian's fonts-dejavu, else Pillow's built-in scalable font is used.
_FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansMono.ttf",
)
_SYSTEM_FONT_DIRS = (
    Path("/usr/share/fonts/truetype/dejavu"),
    Path("/usr/share/fonts/TTF"),
)


# --------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=1)
def ocr_models() -> dict[str, Path]:
    """Paths of the "det", "rec" and "cls" ONNX files unpacked from the wheel.

    Downloads the wheel on first use (into the benchmark cache, see
    `benchmarks.models.fetch`); raises `FetchError` (a DataError) when it is neither
    cached nor downloadable.
    """
    from benchmarks.models.fetch import find_in_wheel

    return {
        key: find_in_wheel(WHEEL, f"**/{name}", WHEEL_VERSION) for key, name in _MODEL_FILES.items()
    }


@functools.lru_cache(maxsize=1)
def charset() -> list[str]:
    """The recognition dictionary: 6,623 characters, in class order from class 1 on.

    The rec model's classes are: 0 = CTC blank, 1..len(charset) = the dictionary,
    last = space (PaddleOCR's `use_space_char`).
    """
    model = onnx.load(str(ocr_models()["rec"]), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == "character":
            return prop.value.split("\n")
    raise InvalidModelError(f"{ocr_models()['rec']}: no 'character' metadata entry")


@functools.lru_cache(maxsize=1)
def _class_table() -> tuple[str, ...]:
    return ("", *charset(), " ")


def _session(model: onnx.ModelProto | str | Path, threads: int | None) -> Any:
    from onnxslim_edge.runtime import make_session

    if isinstance(model, Path):
        model = str(model)
    return make_session(model, threads=threads)


def _run(session: Any, batch: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return session.run(None, {name: batch})[0]


# ------------------------------------------------------------------------ rendering


@functools.cache
def _font_path(file_name: str) -> Path | None:
    spec = importlib.util.find_spec("matplotlib")
    dirs: list[Path] = []
    if spec is not None and spec.origin is not None:
        dirs.append(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf")
    dirs.extend(_SYSTEM_FONT_DIRS)
    for folder in dirs:
        if (folder / file_name).is_file():
            return folder / file_name
    return None


def _font(index: int, size: int) -> Any:
    from PIL import ImageFont

    path = _font_path(_FONT_FILES[index % len(_FONT_FILES)])
    if path is None:
        log.warning("DejaVu fonts not found; rendering with Pillow's default font")
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size=size)


def render_line(
    text: str,
    *,
    font_index: int = 0,
    size: int = 28,
    margin: tuple[int, int] = (6, 4),
    ink: int = 20,
    paper: int = 235,
    blur: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """One text line as an RGB uint8 array (H, W, 3), cropped like a detector's box.

    `margin` is (horizontal, vertical) padding in pixels around the ink; `blur` is a
    Gaussian radius and `noise` the standard deviation of added pixel noise.
    """
    from PIL import Image, ImageDraw, ImageFilter

    font = _font(font_index, size)
    left, top, right, bottom = font.getbbox(text)
    mx, my = margin
    width, height = right - left + 2 * mx, bottom - top + 2 * my
    image = Image.new("L", (width, height), color=paper)
    ImageDraw.Draw(image).text((mx - left, my - top), text, font=font, fill=ink)
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    array = np.asarray(image, dtype=np.float32)
    if noise > 0:
        array = array + np.random.default_rng(seed).normal(0.0, noise, array.shape)
    array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return np.repeat(array[:, :, None], 3, axis=2)


def _rendered_lines(seed: int) -> list[np.ndarray]:
    """Every REC_TEXTS line with varied font, size, margins, contrast, blur and noise."""
    rng = np.random.default_rng(seed)
    lines = []
    for i, text in enumerate(REC_TEXTS):
        lines.append(
            render_line(
                text,
                font_index=i,
                size=int(rng.integers(14, 34)),
                margin=(int(rng.integers(2, 12)), int(rng.integers(2, 9))),
                ink=int(rng.integers(0, 100)),
                paper=int(rng.integers(150, 256)),
                blur=float(rng.uniform(0.0, 1.2)),
                noise=float(rng.uniform(0.0, 12.0)),
                seed=seed * 1000 + i,
            )
        )
    return lines


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


# ----------------------------------------------------------------------- recognition


def rec_preprocess(image: np.ndarray, *, width_step: int = _REC_WIDTH_STEP) -> np.ndarray:
    """An RGB uint8 line image as the rec model's input: float32 (1, 3, 48, W).

    Scales to height 48 keeping the aspect ratio, normalizes to [-1, 1] in BGR order and
    pads on the right with zeros to a multiple of `width_step`.
    """
    h, w = image.shape[:2]
    resized_w = max(1, math.ceil(REC_HEIGHT * w / h))
    resized = _resize(image, resized_w, REC_HEIGHT)[:, :, ::-1].astype(np.float32)
    width = math.ceil(resized_w / width_step) * width_step
    out = np.zeros((1, 3, REC_HEIGHT, width), dtype=np.float32)
    out[0, :, :, :resized_w] = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def rec_samples(n: int | None = None, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """(input (1, 3, 48, W) float32, expected text) for the first `n` of REC_TEXTS."""
    lines = _rendered_lines(seed)
    pairs = [(rec_preprocess(img), text) for img, text in zip(lines, REC_TEXTS)]
    return pairs if n is None else pairs[:n]


def rec_decode(logits: np.ndarray) -> str:
    """CTC greedy decoding of one line's class scores, shape (T, C) or (1, T, C)."""
    scores = np.asarray(logits)
    if scores.ndim == 3:
        if scores.shape[0] != 1:
            raise DataError(f"rec_decode takes one line, got a batch of {scores.shape[0]}")
        scores = scores[0]
    table = _class_table()
    if scores.ndim != 2 or scores.shape[1] != len(table):
        raise DataError(f"rec logits of shape {scores.shape}: expected (T, {len(table)})")
    best = scores.argmax(axis=1)
    keep = np.ones(best.shape, dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    keep &= best != 0
    return "".join(table[i] for i in best[keep])


def _batches_by_width(arrays: Sequence[np.ndarray], batch: int) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, array in enumerate(arrays):
        groups.setdefault(array.shape[1:], []).append(i)
    out = []
    for indices in groups.values():
        out.extend(indices[k : k + batch] for k in range(0, len(indices), batch))
    return out


def rec_texts(
    model: onnx.ModelProto | str | Path,
    samples: Sequence[tuple[np.ndarray, str]],
    *,
    batch: int = 8,
    threads: int | None = None,
) -> list[str]:
    """The decoded text of every sample (inputs of equal width run as one batch)."""
    session = _session(model, threads)
    arrays = [x for x, _ in samples]
    texts = [""] * len(arrays)
    for indices in _batches_by_width(arrays, batch):
        logits = _run(session, np.concatenate([arrays[i] for i in indices]))
        for row, i in enumerate(indices):
            texts[i] = rec_decode(logits[row])
    return texts


def rec_exact_match(
    model: onnx.ModelProto | str | Path,
    samples: Sequence[tuple[np.ndarray, str]],
    *,
    ignore_space: bool = True,
    batch: int = 8,
    threads: int | None = None,
) -> float:
    """Fraction of samples whose decoded text equals the expected text exactly.

    With `ignore_space` (the default, as PaddleOCR's own recognition metric) spaces are
    removed from both texts before comparing: the Chinese PP-OCRv4 model often drops
    the space between Latin words.
    """
    return rec_scores(model, samples, batch=batch, threads=threads)[
        "exact_match" if ignore_space else "exact_match_spaces"
    ]


def rec_scores(
    model: onnx.ModelProto | str | Path,
    samples: Sequence[tuple[np.ndarray, str]],
    *,
    batch: int = 8,
    threads: int | None = None,
) -> dict[str, float]:
    """Recognition scores over `samples`.

    `exact_match`: fraction equal once spaces are removed; `exact_match_spaces`: fraction
    equal as decoded; `norm_edit_similarity`: mean of 1 - Levenshtein distance / longer
    length (spaces removed), which moves smoothly where exact match jumps.
    """
    if not samples:
        raise DataError("rec_scores: no samples")
    decoded = rec_texts(model, samples, batch=batch, threads=threads)
    exact = exact_spaces = similarity = 0.0
    for got, (_, want) in zip(decoded, samples):
        got_ns, want_ns = got.replace(" ", ""), want.replace(" ", "")
        exact_spaces += got == want
        exact += got_ns == want_ns
        longer = max(len(got_ns), len(want_ns))
        similarity += 1.0 - _edit_distance(got_ns, want_ns) / longer if longer else 1.0
        if got_ns != want_ns:
            log.debug("rec mismatch: expected %r, decoded %r", want, got)
    n = len(samples)
    return {
        "exact_match": exact / n,
        "exact_match_spaces": exact_spaces / n,
        "norm_edit_similarity": similarity / n,
    }


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# ------------------------------------------------------------------------- detection


def _det_preprocess(image: np.ndarray, limit_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = limit_side / max(h, w)
    new_h = max(32, round(h * scale / 32) * 32)
    new_w = max(32, round(w * scale / 32) * 32)
    resized = _resize(image, new_w, new_h)[:, :, ::-1].astype(np.float32)
    normed = (resized / 255.0 - _DET_MEAN) / _DET_STD
    return np.ascontiguousarray(normed.transpose(2, 0, 1)[None], dtype=np.float32)


def _document(seed: int, width: int, lines: int) -> np.ndarray:
    """A page with several text lines at varied sizes and positions (RGB uint8)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    page = Image.new("RGB", (width, int(width * 1.3)), color=(246, 244, 238))
    draw = ImageDraw.Draw(page)
    y = 20
    for k in range(lines):
        text = REC_TEXTS[int(rng.integers(len(REC_TEXTS)))]
        size = int(rng.integers(16, 36))
        font = _font(k, size)
        x = int(rng.integers(10, width // 4))
        draw.text((x, y), text, font=font, fill=(20, 20, 30))
        y += int(size * rng.uniform(1.5, 2.5))
        if y > page.height - 40:
            break
    return np.asarray(page)


def _det_images() -> dict[str, np.ndarray]:
    images: dict[str, np.ndarray] = {}
    if importlib.util.find_spec("skimage") is not None:
        import skimage.data

        for name in ("page", "text", "coffee", "astronaut"):
            image = getattr(skimage.data, name)()
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], 3, axis=2)
            images[f"skimage-{name}"] = np.ascontiguousarray(image[:, :, :3])
    else:
        log.warning("scikit-image is not installed: det inputs without its photos")
    if importlib.util.find_spec("sklearn") is not None:
        from sklearn.datasets import load_sample_image

        images["sklearn-china"] = load_sample_image("china.jpg")
    else:
        log.warning("scikit-learn is not installed: det inputs without its photo")
    images["document-1"] = _document(1, 480, 10)
    images["document-2"] = _document(2, 640, 14)
    return images


def det_named_inputs(*, limit_side: int = 640) -> dict[str, np.ndarray]:
    """Detector inputs by image name: float32 (1, 3, H, W), H and W multiples of 32.

    Each image is scaled so that its longer side is `limit_side` (small images are
    enlarged: the handwriting in "skimage-text" is only found from about 800 on).

    Text images: "skimage-page" (a scanned page), "skimage-text" (painted text),
    "document-1"/"document-2" (rendered); photos without much text: "skimage-coffee",
    "skimage-astronaut", "sklearn-china". Images from a missing package are left out.
    """
    return {name: _det_preprocess(img, limit_side) for name, img in _det_images().items()}


def det_inputs(*, limit_side: int = 640) -> list[np.ndarray]:
    """The values of `det_named_inputs`, in the same order."""
    return list(det_named_inputs(limit_side=limit_side).values())


def det_maps(
    model: onnx.ModelProto | str | Path,
    inputs: Sequence[np.ndarray],
    *,
    threads: int | None = None,
) -> list[np.ndarray]:
    """The probability map (1, 1, H, W) of each input."""
    session = _session(model, threads)
    return [_run(session, x) for x in inputs]


def det_map_fidelity(
    reference_model: onnx.ModelProto | str | Path,
    candidate_model: onnx.ModelProto | str | Path,
    inputs: Sequence[np.ndarray],
    *,
    threads: int | None = None,
) -> dict[str, float]:
    """How closely the candidate's probability maps follow the reference's.

    Over all pixels of all inputs together: `cosine` similarity, `sqnr_db`
    (10 log10 of reference energy over error energy; inf when equal) and `max_abs`
    difference; `min_cosine` is the worst single image.
    """
    if not inputs:
        raise DataError("det_map_fidelity: no inputs")
    refs = det_maps(reference_model, inputs, threads=threads)
    cands = det_maps(candidate_model, inputs, threads=threads)
    dot = ref_sq = cand_sq = err_sq = 0.0
    max_abs = 0.0
    min_cosine = 1.0
    for ref, cand in zip(refs, cands):
        r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
        if r.shape != c.shape:
            raise DataError(f"det maps differ in shape: {ref.shape} vs {cand.shape}")
        d, rr, cc = float(r @ c), float(r @ r), float(c @ c)
        dot, ref_sq, cand_sq = dot + d, ref_sq + rr, cand_sq + cc
        err_sq += float(((r - c) ** 2).sum())
        max_abs = max(max_abs, float(np.abs(r - c).max()))
        if max(float(np.abs(r).max()), float(np.abs(c).max())) >= _EMPTY_MAP:
            min_cosine = min(min_cosine, _cosine(d, rr, cc))
        # else: both maps see no text at all; their cosine is noise, not disagreement
    sqnr = math.inf if err_sq == 0 else 10.0 * math.log10(ref_sq / err_sq)
    return {
        "cosine": _cosine(dot, ref_sq, cand_sq),
        "sqnr_db": sqnr,
        "max_abs": max_abs,
        "min_cosine": min_cosine,
    }


#: A probability map whose every pixel is below this holds no text region.
_EMPTY_MAP = 0.01


def _cosine(dot: float, aa: float, bb: float) -> float:
    if aa == 0.0 or bb == 0.0:
        return 1.0 if aa == bb else 0.0
    return min(1.0, dot / math.sqrt(aa * bb))


def det_boxes(
    prob_map: np.ndarray, thresh: float = 0.3, *, box_thresh: float = 0.5, min_size: int = 3
) -> int:
    """Number of text regions: 8-connected pixels above `thresh` whose mean probability
    is at least `box_thresh` and whose bounding box is at least `min_size` on each side
    (DBNet's post-processing without the polygon expansion)."""
    prob = np.asarray(prob_map, dtype=np.float32).squeeze()
    if prob.ndim != 2:
        raise DataError(f"det_boxes: expected one (H, W) map, got shape {prob_map.shape}")
    labels, count = _label(prob > thresh)
    if count == 0:
        return 0
    flat = labels.ravel()
    sums = np.bincount(flat, weights=prob.ravel(), minlength=count + 1)[1:]
    sizes = np.bincount(flat, minlength=count + 1)[1:]
    rows, cols = np.indices(labels.shape)
    big = np.iinfo(np.int64).max
    extent = []
    for coord in (rows.ravel(), cols.ravel()):
        lo = np.full(count + 1, big, dtype=np.int64)
        hi = np.full(count + 1, -1, dtype=np.int64)
        np.minimum.at(lo, flat, coord)
        np.maximum.at(hi, flat, coord)
        extent.append(hi[1:] - lo[1:] + 1)
    keep = (sums / sizes >= box_thresh) & (extent[0] >= min_size) & (extent[1] >= min_size)
    return int(keep.sum())


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels, count), 0 = background."""
    if importlib.util.find_spec("scipy") is not None:
        from scipy import ndimage

        labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        return labels.astype(np.int64), int(count)
    labels = np.zeros(mask.shape, dtype=np.int64)
    count = 0
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        stack = [start]
        while stack:
            y, x = stack.pop()
            for ny in range(max(0, y - 1), min(h, y + 2)):
                for nx in range(max(0, x - 1), min(w, x + 2)):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        stack.append((ny, nx))
    return labels, count


# ---------------------------------------------------------------------- classifier


def _cls_preprocess(image: np.ndarray) -> np.ndarray:
    _, height, width = CLS_SHAPE
    h, w = image.shape[:2]
    resized_w = min(width, max(1, math.ceil(height * w / h)))
    resized = _resize(image, resized_w, height)[:, :, ::-1].astype(np.float32)
    out = np.zeros((1, *CLS_SHAPE), dtype=np.float32)
    out[0, :, :, :resized_w] = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def cls_inputs(seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """(input (1, 3, 48, 192) float32, label) with label 0 = upright, 1 = turned 180 degrees.

    The lines of REC_TEXTS, every other one rotated; long lines are squeezed to 192
    pixels as PaddleOCR does.
    """
    samples = []
    for i, image in enumerate(_rendered_lines(seed + 1)):
        label = i % 2
        if label:
            image = np.ascontiguousarray(image[::-1, ::-1])
        samples.append((_cls_preprocess(image), label))
    return samples


def cls_accuracy(
    model: onnx.ModelProto | str | Path,
    samples: Sequence[tuple[np.ndarray, int]],
    *,
    threads: int | None = None,
) -> float:
    """Fraction of samples whose predicted direction (argmax) equals the label."""
    if not samples:
        raise DataError("cls_accuracy: no samples")
    session = _session(model, threads)
    scores = _run(session, np.concatenate([x for x, _ in samples]))
    labels = np.array([y for _, y in samples])
    return float((scores.argmax(axis=1) == labels).mean())
