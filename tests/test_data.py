"""Tests for onnxslim_edge.data: streamed readers, checks against the model, images, random."""

from __future__ import annotations

import gc
import logging
import tracemalloc
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxslim_edge.data import (
    DataSource,
    ImagePreprocess,
    open_data,
    parse_preprocess,
    random_feeds,
)
from onnxslim_edge.errors import ConfigError, DataError


def _model(inputs: dict[str, tuple[int, tuple]]) -> onnx.ModelProto:
    """A model whose graph inputs are `inputs` ({name: (elem_type, shape)}), outputs Identity."""
    vis, nodes, outs = [], [], []
    for name, (elem, shape) in inputs.items():
        vis.append(helper.make_tensor_value_info(name, elem, list(shape)))
        nodes.append(helper.make_node("Identity", [name], [name + "_out"]))
        outs.append(helper.make_tensor_value_info(name + "_out", elem, list(shape)))
    graph = helper.make_graph(nodes, "g", vis, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


IMG = _model({"x": (TensorProto.FLOAT, ("N", 3, 32, 32))})
TWO = _model({"x": (TensorProto.FLOAT, ("N", 3, 4)), "ids": (TensorProto.INT64, ("N", 5))})


def _concat(batches, name):
    return np.concatenate([b[name] for b in batches])


# --------------------------------------------------------------------------- npz streaming


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streamed_in_batches_equals_np_load(tmp_path, compressed):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, 3, 4))  # float64 on disk, float32 in the model
    ids = rng.integers(0, 100, size=(1000, 5)).astype(np.int32)  # widened to int64
    path = tmp_path / "calib.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=x, ids=ids)

    ds = open_data(path, TWO, batch_size=7)
    batches = list(ds)
    assert [len(b["x"]) for b in batches] == [7] * 142 + [6]
    assert all(b["x"].dtype == np.float32 and b["ids"].dtype == np.int64 for b in batches)
    with np.load(path) as ref:
        np.testing.assert_array_equal(_concat(batches, "x"), ref["x"].astype(np.float32))
        np.testing.assert_array_equal(_concat(batches, "ids"), ref["ids"].astype(np.int64))
    assert ds.num_samples == 1000
    assert "1000 samples" in ds.describe() and not ds.is_synthetic


def test_reiterable_and_limit(tmp_path):
    x = np.arange(20 * 3 * 4, dtype=np.float32).reshape(20, 3, 4)
    ids = np.arange(20 * 5, dtype=np.int64).reshape(20, 5)
    np.savez(tmp_path / "d.npz", x=x, ids=ids)
    ds = open_data(tmp_path / "d.npz", TWO, batch_size=4, limit=10)
    first, second = list(ds), list(ds)
    assert [len(b["x"]) for b in first] == [4, 4, 2]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(_concat(first, "x"), x[:10])
    assert ds.num_samples == 10
    for batch_size in (1, 3, 20, 25):
        for limit in (None, 1, 19):
            got = list(open_data(tmp_path / "d.npz", TWO, batch_size=batch_size, limit=limit))
            np.testing.assert_array_equal(_concat(got, "ids"), ids[:limit])
            assert max(len(b["x"]) for b in got) == min(batch_size, limit or 20)
    # re-batching an existing source keeps the data, tightens the limit
    again = open_data(ds, TWO, batch_size=3, limit=5)
    assert isinstance(again, DataSource)
    assert [len(b["x"]) for b in again] == [3, 2]
    np.testing.assert_array_equal(_concat(list(again), "ids"), ids[:5])


def test_folder_of_npz_batches_across_files(tmp_path):
    x = np.random.default_rng(2).standard_normal((8, 3, 4)).astype(np.float32)
    ids = np.arange(40, dtype=np.int64).reshape(8, 5)
    np.savez(tmp_path / "a.npz", x=x[:3], ids=ids[:3])
    np.savez_compressed(tmp_path / "b.npz", x=x[3:], ids=ids[3:])
    (tmp_path / "notes.txt").write_text("ignored")
    ds = open_data(tmp_path, TWO, batch_size=4)
    batches = list(ds)
    assert [len(b["x"]) for b in batches] == [4, 4]
    np.testing.assert_array_equal(_concat(batches, "x"), x)
    np.testing.assert_array_equal(_concat(batches, "ids"), ids)
    assert ds.num_samples == 8


def test_folder_of_npy_for_single_input_model(tmp_path):
    x = np.random.default_rng(3).standard_normal((5, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "0.npy", x[:2])
    np.save(tmp_path / "1.npy", x[2:])
    batches = list(open_data(tmp_path, IMG, batch_size=2))
    assert [len(b["x"]) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(_concat(batches, "x"), x)
    with pytest.raises(
        DataError, match=r"\.npy files feed single-input models only; the model has inputs x, ids"
    ):
        open_data(tmp_path, TWO)


def test_iterables_and_callables(tmp_path):
    x = np.random.default_rng(4).standard_normal((6, 3, 32, 32)).astype(np.float32)
    feeds = [{"x": x[:1]}, {"x": x[1:4]}, {"x": x[4:]}]
    batches = list(open_data(feeds, IMG, batch_size=4))
    assert [len(b["x"]) for b in batches] == [4, 2]
    np.testing.assert_array_equal(_concat(batches, "x"), x)

    ds = open_data(lambda: iter(feeds), IMG, batch_size=6)
    assert len(list(ds)) == 1 and len(list(ds)) == 1  # a callable is re-iterable

    one_shot = open_data(iter(feeds), IMG, batch_size=6)
    assert len(list(one_shot)) == 1
    with pytest.raises(DataError, match="one-shot iterator and was already consumed"):
        list(one_shot)

    single = list(open_data({"x": x}, IMG, batch_size=5))  # one feed dict of several samples
    assert [len(b["x"]) for b in single] == [5, 1]


def test_samples_of_another_shape_start_a_new_batch():
    lines = _model({"x": (TensorProto.FLOAT, ("N", 3, 48, "W"))})
    widths = [96, 96, 320, 320, 320, 96]
    feeds = [{"x": np.full((1, 3, 48, w), i, np.float32)} for i, w in enumerate(widths)]
    batches = list(open_data(feeds, lines, batch_size=2))
    assert [b["x"].shape[::3] for b in batches] == [(2, 96), (2, 320), (1, 320), (1, 96)]
    order = [float(v) for b in batches for v in b["x"][:, 0, 0, 0]]
    assert order == [0, 1, 2, 3, 4, 5]

    fixed = _model({"x": (TensorProto.FLOAT, (2, 3, 48, "W"))})
    with pytest.raises(DataError, match=r"differ in shape .* batch of 2, which the model fixes"):
        list(open_data(feeds[1:], fixed))


def test_fixed_batch_dimension_sets_batches_and_drops_incomplete(tmp_path, caplog):
    model = _model({"x": (TensorProto.FLOAT, (2, 3))})
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    np.savez(tmp_path / "d.npz", x=x)
    ds = open_data(tmp_path / "d.npz", model, batch_size=1)
    with caplog.at_level(logging.WARNING, logger="onnxslim_edge.data"):
        batches = list(ds)
    assert [b["x"].shape for b in batches] == [(2, 3), (2, 3)]
    assert ds.num_samples == 4
    assert "dropping the last 1 sample" in caplog.text


def test_scalar_input_batches_of_one():
    model = _model({"s": (TensorProto.FLOAT, ())})
    batches = list(open_data([{"s": np.float32(2.5)}, {"s": np.array([1.0, 3.0])}], model))
    assert [b["s"].shape for b in batches] == [(), (), ()]
    assert [float(b["s"]) for b in batches] == [2.5, 1.0, 3.0]


# --------------------------------------------------------------------------- malformed data


def test_shape_mismatch_message(tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.zeros((10, 3, 32), np.float32))
    with pytest.raises(DataError) as err:
        open_data(tmp_path / "calib.npz", IMG)
    assert str(err.value) == (
        f"{tmp_path / 'calib.npz'}: array 'x' has shape (10, 3, 32) but input 'x' expects "
        "(N, 3, 32, 32)"
    )
    assert "\n" not in str(err.value)
    np.savez(tmp_path / "calib.npz", x=np.zeros((10, 3, 32, 31), np.float32))
    with pytest.raises(DataError, match=r"has shape \(10, 3, 32, 31\) but input 'x' expects"):
        open_data(tmp_path / "calib.npz", IMG)


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"x": np.zeros((2, 3, 4), np.float32)}, r"d\.npz: no array for input 'ids' \(arrays: x\)"),
        (
            {"x": np.zeros((2, 3, 4)), "extra": np.zeros(2)},
            r"d\.npz: array 'extra' is not an input of the model \(inputs: x, ids\)",
        ),
        (
            {"x": np.zeros((2, 3, 4)), "ids": np.zeros((3, 5), np.int64)},
            r"arrays have different sample counts \(x: 2, ids: 3\)",
        ),
        (
            {"x": np.zeros((2, 3, 4)), "ids": np.zeros((2, 5), np.float32)},
            r"array 'ids' is float32 but input 'ids' takes int64; refusing a lossy cast",
        ),
        (
            {"x": np.array(["a", "b"]), "ids": np.zeros((2, 5), np.int64)},
            r"array 'x' has non-numeric dtype <U1",
        ),
        (
            {"x": np.asfortranarray(np.zeros((2, 3, 4))), "ids": np.zeros((2, 5), np.int64)},
            r"array 'x' is stored in Fortran order",
        ),
        ({"x": np.float32(1.0), "ids": np.zeros((2, 5), np.int64)}, r"array 'x' is a scalar"),
    ],
)
def test_malformed_npz(tmp_path, arrays, fragment):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=fragment):
        open_data(tmp_path / "d.npz", TWO)


def test_pickled_object_array_is_refused_without_unpickling(tmp_path, monkeypatch):
    import pickle

    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}, None], dtype=object))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(DataError, match=r"evil\.npz: array 'x' holds Python objects; .*pickle"):
        open_data(tmp_path / "evil.npz", IMG)
    with pytest.raises(DataError, match="holds Python objects"):
        open_data(tmp_path / "evil.npz")  # without a model too
    with pytest.raises(DataError, match="feed #1: array 'x' holds Python objects"):
        list(open_data([{"x": np.array([object()])}]))


def test_corrupt_and_truncated_npz(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(DataError, match=r"junk\.npz: not a valid \.npz file"):
        open_data(tmp_path / "junk.npz", IMG)

    # a member whose .npy header promises more rows than the member holds
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((4, 3, 32, 32), np.float32))
    raw = good.read_bytes()
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf:
        zf.writestr("x.npy", raw[: len(raw) - 100])
    with pytest.raises(DataError, match=r"short\.npz: array 'x' is truncated or inconsistent"):
        open_data(tmp_path / "short.npz", IMG)

    # a member that is not a .npy at all
    with zipfile.ZipFile(tmp_path / "text.npz", "w") as zf:
        zf.writestr("x.npy", b"hello, not numpy")
    with pytest.raises(DataError, match=r"text\.npz: array 'x' is not a valid \.npy array"):
        open_data(tmp_path / "text.npz", IMG)

    # a cut-off .npy file in a folder
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "0.npy").write_bytes(raw[:-1])
    with pytest.raises(DataError, match=r"0\.npy: array 'x' is truncated or inconsistent"):
        open_data(tmp_path / "cut", IMG)


def test_paths_that_are_not_data(tmp_path):
    with pytest.raises(DataError, match=r"missing\.npz: data file or folder not found"):
        open_data(tmp_path / "missing.npz", IMG)
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"d\.csv: unsupported data file"):
        open_data(tmp_path / "d.csv", IMG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \.npz, \.npy or image files"):
        open_data(tmp_path / "empty", IMG)
    with pytest.raises(DataError, match=r"feed #2: is a int, not a feed dict"):
        list(open_data([{"x": np.zeros((1, 3, 32, 32))}, 5], IMG))
    with pytest.raises(DataError, match=r"feed #1: array 'x' has shape \(1, 32, 32\)"):
        list(open_data([{"x": np.zeros((1, 32, 32))}], IMG))


# --------------------------------------------------------------------------- images


def _png(path, pixels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(pixels).save(path)


PIXELS = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3  # H=4, W=6, RGB


def test_image_folder_normalized_values_exact(tmp_path):
    _png(tmp_path / "a.png", PIXELS)
    _png(tmp_path / "b.png", 255 - PIXELS)
    model = _model({"x": (TensorProto.FLOAT, ("N", 3, 4, 6))})
    pre = ImagePreprocess(
        size=(4, 6), resize="stretch", mean=(0.5, 0.25, 0.125), std=(0.5, 0.25, 2.0)
    )
    batches = list(open_data(tmp_path, model, batch_size=2, preprocess=pre))
    assert len(batches) == 1 and batches[0]["x"].shape == (2, 3, 4, 6)
    expected = (PIXELS.astype(np.float64) / 255 - [0.5, 0.25, 0.125]) / [0.5, 0.25, 2.0]
    np.testing.assert_array_equal(
        batches[0]["x"][0], expected.transpose(2, 0, 1).astype(np.float32)
    )
    expected_b = ((255 - PIXELS).astype(np.float64) / 255 - [0.5, 0.25, 0.125]) / [0.5, 0.25, 2.0]
    np.testing.assert_array_equal(
        batches[0]["x"][1], expected_b.transpose(2, 0, 1).astype(np.float32)
    )


def test_image_center_crop_layouts_and_channels(tmp_path):
    _png(tmp_path / "a.png", PIXELS)
    # shorter side 4 already equals the crop: no resampling, the middle 4 columns are kept
    pre = ImagePreprocess(size=(4, 4), layout="NHWC", channels="BGR", scale=1.0)
    out = pre(tmp_path / "a.png")
    np.testing.assert_array_equal(out, PIXELS[:, 1:5, ::-1].astype(np.float32))
    grey = ImagePreprocess(size=(4, 6), resize="stretch", channels="L", dtype="uint8", scale=1)
    from PIL import Image

    want = np.asarray(Image.fromarray(PIXELS).convert("L"))
    np.testing.assert_array_equal(grey(tmp_path / "a.png"), want[None])
    big = ImagePreprocess(size=(2, 2), resize_shorter=3)
    assert big(tmp_path / "a.png").shape == (3, 2, 2)  # 4x6 -> 3x5 (bilinear) -> crop 2x2


def test_image_errors(tmp_path):
    _png(tmp_path / "a.png", PIXELS)
    model = _model({"x": (TensorProto.FLOAT, ("N", 3, 4, 6))})
    with pytest.raises(DataError, match="a folder of images needs a preprocessing"):
        open_data(tmp_path, model)
    wrong = ImagePreprocess(size=(5, 6), resize="stretch")
    with pytest.raises(
        DataError,
        match=r"preprocessing gives images of shape \(3, 5, 6\) but input 'x' expects \(N, 3, 4, 6\)",
    ):
        open_data(tmp_path, model, preprocess=wrong)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = open_data(tmp_path, model, preprocess=ImagePreprocess(size=(4, 6), resize="stretch"))
    with pytest.raises(DataError, match=r"broken\.jpg: cannot read the image"):
        list(ds)
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 3, 4, 6)))
    with pytest.raises(DataError, match=r"mixes \.npz/\.npy files and images"):
        open_data(tmp_path, model)


def test_parse_preprocess():
    pre = parse_preprocess(
        "224x224,resize_shorter=256,mean=0.485|0.456|0.406,std=0.229|0.224|0.225,layout=nhwc,scale=1/255"
    )
    assert pre == ImagePreprocess(
        size=(224, 224),
        resize_shorter=256,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        layout="NHWC",
    )
    assert ImagePreprocess.from_string("size=32x48,channels=L,mean=0.5,resize=stretch").mean == (
        0.5,
    )
    assert parse_preprocess("64").size == (64, 64)
    assert parse_preprocess("8x8,mean=0.5").mean == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="unknown key 'meen'; valid: size, resize"):
        parse_preprocess("224x224,meen=1")
    with pytest.raises(ConfigError, match="std has 2 values for 3 channel"):
        parse_preprocess("224x224,std=1|2")
    with pytest.raises(ConfigError, match="resize_shorter 200 is smaller than the crop 224x224"):
        parse_preprocess("224x224,resize_shorter=200")
    with pytest.raises(ConfigError, match="gives no size"):
        parse_preprocess("mean=0")


# --------------------------------------------------------------------------- random


def test_random_source_is_synthetic_deterministic_and_says_so(caplog):
    model = _model(
        {
            "x": (TensorProto.FLOAT16, ("batch", 3, "h")),
            "ids": (TensorProto.INT64, ("batch", 7)),
            "mask": (TensorProto.BOOL, (2,)),
        }
    )
    with caplog.at_level(logging.WARNING, logger="onnxslim_edge.data"):
        ds = open_data("random", model, batch_size=3, input_shapes={"x": (1, 3, 5)})
    assert "random (synthetic) data: 8 sample(s)" in caplog.text
    assert ds.is_synthetic and "synthetic" in ds.describe()
    a, b = list(ds), list(ds)
    assert [x["x"].shape for x in a] == [(3, 3, 5), (3, 3, 5), (2, 3, 5)]
    assert a[0]["x"].dtype == np.float16 and a[0]["ids"].dtype == np.int64
    assert a[0]["mask"].shape == (2,) and a[0]["mask"].dtype == bool
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["x"], y["x"])
    ids = _concat(a, "ids")
    assert ids.min() >= 0 and ids.max() < 4
    assert len(list(open_data("random", model, limit=3))) == 3

    feeds = random_feeds(model, batch_size=2, seed=5)
    assert feeds["x"].shape == (2, 3, 1)  # unnamed symbolic dims default to 1
    np.testing.assert_array_equal(feeds["x"], random_feeds(model, batch_size=2, seed=5)["x"])
    assert not np.array_equal(feeds["x"], random_feeds(model, batch_size=2, seed=6)["x"])
    with pytest.raises(DataError, match="random data needs the model"):
        open_data("random")
    with pytest.raises(DataError, match="'x' given as \\(1, 3\\) but the model's input has rank 3"):
        random_feeds(model, input_shapes={"x": (1, 3)})


# --------------------------------------------------------------------------- memory


def _peak_while_iterating(path, batch_size) -> int:
    ds = open_data(path, IMG, batch_size=batch_size)
    gc.collect()
    tracemalloc.start()
    try:
        n = sum(len(b["x"]) for b in ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return n, peak


def test_memory_stays_flat_with_more_samples(tmp_path):
    sample = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)  # 12 KiB
    small, large = tmp_path / "small.npz", tmp_path / "large.npz"
    np.savez(small, x=np.repeat(sample, 128, axis=0))  # 1.5 MiB
    np.savez_compressed(large, x=np.repeat(sample, 1024, axis=0))  # 12 MiB uncompressed
    n_small, peak_small = _peak_while_iterating(small, 1)
    n_large, peak_large = _peak_while_iterating(large, 1)
    assert (n_small, n_large) == (128, 1024)
    data_bytes = 1024 * sample.nbytes
    assert peak_large < data_bytes / 20, (peak_small, peak_large)
    assert peak_large < 2 * peak_small + 256 * 1024, (peak_small, peak_large)


def test_negative_dim_value_is_dynamic() -> None:
    """Some exporters (Paddle) write a dynamic batch as dim_value -1: it is not a fixed batch."""
    from onnx import TensorProto, helper

    from onnxslim_edge.data import open_data

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    batches = list(open_data("random", model, batch_size=2, limit=5))
    assert [b["x"].shape for b in batches] == [(2, 3), (2, 3), (1, 3)]


# --------------------------------------------------------------------------- bad numbers


def test_nan_in_npz_is_refused_naming_the_array_and_sample(tmp_path):
    x = np.zeros((9, 3, 4), np.float32)
    x[5, 1, 2] = np.nan
    path = tmp_path / "calib.npz"
    np.savez(path, x=x, ids=np.zeros((9, 5), np.int64))
    ds = open_data(path, TWO, batch_size=2)  # headers are fine: the check is on the values
    with pytest.raises(DataError) as info:
        list(ds)
    assert str(info.value) == (
        f"{path}: array 'x' holds NaN at sample 5 (counting from 0); calibration and "
        "evaluation data must be finite"
    )
    # a limit that stops before the bad sample reads only good samples
    assert sum(len(b["x"]) for b in open_data(path, TWO, batch_size=2, limit=5)) == 5


def test_inf_in_feed_dicts_and_overflowing_casts_are_refused():
    good = {"x": np.zeros((2, 3, 4), np.float32), "ids": np.zeros((2, 5), np.int64)}
    bad = {"x": np.zeros((2, 3, 4), np.float32), "ids": np.zeros((2, 5), np.int64)}
    bad["x"][1, 0, 0] = -np.inf
    with pytest.raises(DataError, match=r"^feed #2: array 'x' holds infinity at sample 1 "):
        list(open_data([good, bad], TWO, batch_size=4))
    # float64 values beyond float32's range become inf in the model's dtype: refused too
    huge = {"x": np.full((1, 3, 4), 1e300), "ids": np.zeros((1, 5), np.int64)}
    with pytest.raises(DataError, match=r"^feed #1: array 'x' holds infinity at sample 0 "):
        list(open_data([huge], TWO))


def test_nan_in_npy_folder_names_the_file(tmp_path):
    model = _model({"x": (TensorProto.FLOAT, ("N", 2))})
    np.save(tmp_path / "a.npy", np.ones((3, 2), np.float32))
    b = np.ones((4, 2), np.float32)
    b[2, 1] = np.nan
    np.save(tmp_path / "b.npy", b)
    with pytest.raises(DataError) as info:
        list(open_data(tmp_path, model, batch_size=3))
    # sample numbers count within each file
    assert str(info.value).startswith(f"{tmp_path / 'b.npy'}: array 'x' holds NaN at sample 2 ")


def test_data_with_no_samples_is_refused(tmp_path):
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 3, 4), np.float32), ids=np.zeros((0, 5), np.int64))
    with pytest.raises(DataError, match=r"empty\.npz: holds no samples$"):
        open_data(empty, TWO)
    ds = open_data([], TWO)  # an iterable's length is known only once iterated
    with pytest.raises(DataError, match=r"^Python list: holds no samples$"):
        list(ds)
    fixed = _model({"x": (TensorProto.FLOAT, (4, 2))})
    short = tmp_path / "short.npz"
    np.savez(short, x=np.ones((3, 2), np.float32))
    with pytest.raises(
        DataError, match=r"short\.npz: 3 sample\(s\), fewer than the batch of 4 the model fixes"
    ):
        open_data(short, fixed)
    with pytest.raises(DataError, match=r"^Python list: 3 sample\(s\), fewer than the batch of 4"):
        list(open_data([{"x": np.ones((3, 2), np.float32)}], fixed))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8x8,mean=nan", "preprocess: mean=nan|nan|nan is not finite"),
        ("8x8,mean=0.5|inf|0.5", "preprocess: mean=0.5|inf|0.5 is not finite"),
        ("8x8,std=inf", "preprocess: std=inf|inf|inf is not finite"),
        ("8x8,std=0", "preprocess: std must not be 0"),
        ("8x8,scale=nan", "preprocess: scale=nan is not finite"),
    ],
)
def test_preprocess_refuses_bad_numbers(text, message):
    with pytest.raises(ConfigError) as info:
        parse_preprocess(text)
    assert str(info.value) == message


def test_random_data_honours_the_seed(caplog):
    model = _model({"x": (TensorProto.FLOAT, ("N", 3))})
    with caplog.at_level(logging.WARNING, logger="onnxslim_edge.data"):
        seven = list(open_data("random", model, seed=7, limit=4))
    assert "seed 7" in caplog.text and "seed 0" not in caplog.text
    zero = list(open_data("random", model, seed=0, limit=4))
    again = list(open_data("random", model, seed=7, limit=4))
    assert not np.array_equal(_concat(seven, "x"), _concat(zero, "x"))
    np.testing.assert_array_equal(_concat(seven, "x"), _concat(again, "x"))
    assert "random data (seed 7)" in open_data("random", model, seed=7).describe()


def test_arrays_that_are_not_inputs_are_left_out_with_one_note(tmp_path, caplog):
    """A labelled test set (`image` + `label`, like the demo's) serves as calibration
    data: `label` is never fed, and said once per file, however often it is read."""
    path = tmp_path / "labelled.npz"
    x = np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)
    ids = np.arange(25, dtype=np.int64).reshape(5, 5)
    np.savez(path, x=x, ids=ids, label=np.arange(5), weight=np.ones(5))
    with caplog.at_level(logging.WARNING, logger="onnxslim_edge.data"):
        for _ in range(2):
            feeds = list(open_data(path, TWO, batch_size=2))
    assert [sorted(f) for f in feeds] == [["ids", "x"]] * 3
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)
    notes = [r.getMessage() for r in caplog.records]
    assert notes == [
        f"{path}: ignoring array(s) 'label', 'weight': not inputs of the model (inputs: x, ids)"
    ]
    # feed dicts from a Python iterable: the same rule
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnxslim_edge.data"):
        feeds = list(open_data([{"x": x[:2], "ids": ids[:2], "label": np.arange(2)}], TWO))
    assert sorted(feeds[0]) == ["ids", "x"] and "ignoring array(s) 'label'" in caplog.text
