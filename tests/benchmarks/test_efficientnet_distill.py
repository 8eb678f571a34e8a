"""benchmarks.efficientnet_distill: data disjointness and argument errors (no training).

The disjointness test on the real pictures needs scikit-image, scikit-learn, matplotlib
(the bench extra) and the cached `imgaug` / `ultralytics` wheels; it skips otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import efficientnet_distill as ed
from benchmarks.models import fetch


def _picture(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    """A smooth random colour picture (low-frequency blobs), H x W x 3 uint8."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(6, 8, 3))
    from PIL import Image

    img = Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img)


def test_near_duplicates_finds_resized_and_mirrored_copies_only() -> None:
    a, b = _picture(0), _picture(1)
    from PIL import Image

    resized = np.asarray(Image.fromarray(a).resize((320, 240)))
    mirrored = np.ascontiguousarray(a[:, ::-1])
    grey = np.asarray(Image.fromarray(a).convert("L"))
    found = ed.near_duplicates({"resized": resized, "mirrored": mirrored, "grey": grey}, {"a": a})
    assert sorted(n for n, ref, _ in found) == ["grey", "mirrored", "resized"]
    assert all(ref == "a" and c > 0.95 for _, ref, c in found)
    assert ed.near_duplicates({"b": b}, {"a": a}) == []


def test_source_lists_are_disjoint_from_each_other_and_the_evaluation_photos() -> None:
    from benchmarks.models.photos import PHOTO_NAMES

    train, val = set(ed.TRAIN_SOURCES), set(ed.VAL_SOURCES)
    assert not train & val
    assert not (train | val) & set(PHOTO_NAMES)
    assert "cat" not in train | val  # skimage.data.cat is the evaluation photo chelsea


def test_crops_are_preprocessed_images_from_the_given_sources() -> None:
    pictures = {"a": _picture(0), "b": _picture(1, 300, 200)}
    x, sources = ed.make_crops(pictures, 6, seed=0)
    assert x.shape == (6, 3, 224, 224) and x.dtype == np.float32
    assert set(sources) <= {"a", "b"} and len(sources) == 6
    assert x.min() >= -1.0 and x.max() <= 1.0  # (v - 127) / 128 of uint8 values
    again, _ = ed.make_crops(pictures, 6, seed=0)
    np.testing.assert_array_equal(x, again)


def _bench_data_available() -> bool:
    try:
        import matplotlib  # noqa: F401
        import skimage  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        return False
    wheels = fetch.cache_root() / "wheels"
    return all(
        wheels.is_dir() and any(p.name.startswith(w) for p in wheels.iterdir())
        for w in ("imgaug-", "ultralytics-")
    )


@pytest.mark.skipif(not _bench_data_available(), reason="needs the bench extra and wheels")
def test_training_and_validation_pictures_are_no_copies_of_evaluation_photos() -> None:
    import skimage.data

    from benchmarks.models.photos import photos

    evaluation = photos()
    train = ed.source_images(list(ed.TRAIN_SOURCES))
    val = ed.source_images(list(ed.VAL_SOURCES))
    assert ed.near_duplicates(train, evaluation) == []
    assert ed.near_duplicates(val, evaluation) == []
    assert ed.near_duplicates(val, train) == []
    # the check does catch the bundled near-copies of evaluation photos
    copies = {"cat": skimage.data.cat(), "moto_right": skimage.data.stereo_motorcycle()[1]}
    found = {(n, ref) for n, ref, _ in ed.near_duplicates(copies, evaluation)}
    assert found == {("cat", "chelsea"), ("moto_right", "motorcycle")}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run"], "run needs --part prune, qat or plot"),
        (["prepare", "--part", "prune"], "prepare takes no --part or --distill"),
        (["run", "--part", "prune", "--distill", "quantize"], "must be a distill pass spec"),
        (["run", "--part", "plot", "--distill", "distill:lr=1"], "--part plot takes no"),
        (["run", "--part", "nope"], "invalid choice: 'nope'"),
        (["run", "--part", "prune", "--calib", "eval"], "invalid choice: 'eval'"),
    ],
)
def test_bad_arguments_exit_2_with_one_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as info:
        ed.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_prepared_data_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path))
    out = tmp_path / "r.json"
    assert ed.main(["run", "--part", "prune", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "missing: run `python -m benchmarks.efficientnet_distill prepare`" in err[0]
    )
    assert not out.exists()
    assert ed.main(["run", "--part", "plot", "--out", str(out)]) == 2
    assert not out.with_suffix(".png").exists()


def test_plot_draws_every_row(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    row = {
        "part": "prune",
        "distill": "distill:epochs=2",
        "loss_curve": [1.0, 0.5, 0.4],
        "epochs": 2,
        "validation_fidelity_before": 0.1,
        "validation_per_epoch": [0.3, 0.4],
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"rows": [row, {**row, "part": "qat"}]}), encoding="utf-8")
    assert ed.main(["run", "--part", "plot", "--out", str(path)]) == 0
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forkserver_children_of_a_run_from_the_root_import_the_installed_package() -> None:
    """`python -m benchmarks...` from the root: onnxslim_edge.sandbox's forkserver children
    must import the installed package (where `passes` is `onnxslim_edge.passes`), not the
    source folder in the current directory (CPython 3.11's forkserver ignores sys.path)."""
    import importlib.machinery
    import subprocess
    import sys

    root = Path(ed.__file__).resolve().parents[1]
    others = [p for p in sys.path if p and Path(p).resolve() != root]
    if importlib.machinery.PathFinder.find_spec("onnxslim_edge", others) is None:
        pytest.skip("no installed onnxslim_edge besides the source folder")
    code = (
        "import importlib, multiprocessing as mp, sys\n"
        "from benchmarks.harness import prefer_installed_package\n"
        "prefer_installed_package()\n"
        "ctx = mp.get_context('forkserver')\n"
        "ctx.set_forkserver_preload(['onnxslim_edge'])\n"
        "p = ctx.Process(target=importlib.import_module, args=('onnxslim_edge.passes',))\n"
        "p.start(); p.join(120)\n"
        "sys.exit(p.exitcode)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
