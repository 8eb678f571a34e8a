"""The shipped demo model and test split: loadable, well-formed, runnable, accurate."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxslim_edge.demo import DIGITS_MODEL, DIGITS_TEST, digits_accuracy, load_digits_test
from onnxslim_edge.errors import ConfigError, DataError, InvalidModelError
from onnxslim_edge.model import load_model, min_ir_version
from onnxslim_edge.runtime import make_session

N_TEST = 450  # 25% of scikit-learn's 1,797 digits, stratified


@pytest.fixture(scope="module")
def digits_model() -> onnx.ModelProto:
    return load_model(DIGITS_MODEL)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_param if d.HasField("dim_param") else d.dim_value
        for d in value_info.type.tensor_type.shape.dim
    ]


def test_assets_are_package_files_under_1mb() -> None:
    assert DIGITS_MODEL.parent == DIGITS_TEST.parent and DIGITS_MODEL.parent.name == "assets"
    assert DIGITS_MODEL.is_file() and DIGITS_TEST.is_file()
    assert DIGITS_MODEL.stat().st_size < 1_000_000


def test_model_graph(digits_model: onnx.ModelProto) -> None:
    ops = Counter(n.op_type for n in digits_model.graph.node)
    assert ops["BatchNormalization"] == 6
    assert ops["Conv"] == 6
    assert [(o.domain, o.version) for o in digits_model.opset_import] == [("", 13)]
    # ONNX Runtime 1.19 refuses IR > 10: the file carries the lowest IR its opset needs.
    assert digits_model.ir_version == min_ir_version(digits_model) == 7
    (inp,) = digits_model.graph.input
    (out,) = digits_model.graph.output
    assert inp.name == "image" and inp.type.tensor_type.elem_type == TensorProto.FLOAT
    assert out.name == "logits" and out.type.tensor_type.elem_type == TensorProto.FLOAT
    batch = _dims(inp)[0]
    assert isinstance(batch, str) and batch
    assert _dims(inp) == [batch, 1, 8, 8]
    assert _dims(out) == [batch, 10]


def test_model_runs_in_ort_batch_independent() -> None:
    images, _ = load_digits_test()
    session = make_session(DIGITS_MODEL, threads=1)
    batched = session.run(["logits"], {"image": images[:5]})[0]
    assert batched.shape == (5, 10) and batched.dtype == np.float32
    singles = np.concatenate(
        [session.run(["logits"], {"image": images[i : i + 1]})[0] for i in range(5)]
    )
    # BatchNormalization runs in inference mode: a sample's logits do not depend on its batch.
    np.testing.assert_allclose(singles, batched, rtol=1e-5, atol=1e-5)


def test_accuracy_above_97_percent_and_as_documented(digits_model: onnx.ModelProto) -> None:
    accuracy = digits_accuracy(DIGITS_MODEL)
    assert accuracy > 0.97
    assert accuracy * N_TEST == pytest.approx(round(accuracy * N_TEST))  # a count of hits
    # Same result whatever the batching, from a path or a ModelProto.
    assert digits_accuracy(digits_model, batch_size=7) == accuracy
    assert digits_accuracy(DIGITS_MODEL, batch_size=N_TEST + 1) == accuracy
    readme = (DIGITS_MODEL.parent / "README.md").read_text(encoding="utf-8")
    documented = re.search(r"\*\*(0\.\d{4})\*\* in ONNX Runtime", readme)
    assert documented is not None
    assert accuracy == pytest.approx(float(documented.group(1)), abs=5e-5)


def test_accuracy_matches_a_manual_count() -> None:
    images, labels = load_digits_test()
    logits = make_session(DIGITS_MODEL).run(["logits"], {"image": images})[0]
    hits = int(np.count_nonzero(logits.argmax(axis=1) == labels))
    assert digits_accuracy(DIGITS_MODEL) == hits / N_TEST


def test_test_split_arrays() -> None:
    with zipfile.ZipFile(DIGITS_TEST) as zf:
        assert sorted(zf.namelist()) == ["image.npy", "label.npy"]
    # allow_pickle=False raises on any object array, so reading every array proves none.
    with np.load(DIGITS_TEST, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    image, label = arrays["image"], arrays["label"]
    assert image.dtype == np.float32 and image.shape == (N_TEST, 1, 8, 8)
    assert label.dtype == np.int64 and label.shape == (N_TEST,)
    assert image.min() == 0.0 and image.max() == 1.0
    # pixels were 0..16 integers scaled by 1/16
    np.testing.assert_array_equal(image * 16, np.round(image * 16))
    # stratified: a quarter of each class of load_digits (178, 182, 177, 183, 181, 182, 181,
    # 179, 174, 180 images), rounded
    counts = np.bincount(label, minlength=10)
    assert counts.tolist() == [45, 46, 44, 46, 45, 46, 45, 45, 43, 45]


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_digits_accuracy_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        digits_accuracy(DIGITS_MODEL, batch_size=0)
    with pytest.raises(InvalidModelError, match=r"missing\.onnx: model file not found"):
        digits_accuracy(tmp_path / "missing.onnx")

    wrong_names = _write_npz(tmp_path / "names.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(
        DataError, match=r"names\.npz: needs arrays 'image' and 'label', has \['x'\]"
    ):
        digits_accuracy(DIGITS_MODEL, data=wrong_names)

    pickled = _write_npz(
        tmp_path / "pickled.npz",
        image=np.zeros((2, 1, 8, 8), np.float32),
        label=np.array([{"a": 1}, None], dtype=object),
    )
    with pytest.raises(
        DataError, match=r"pickled\.npz: not a readable \.npz without pickled objects"
    ):
        digits_accuracy(DIGITS_MODEL, data=pickled)

    wrong_shape = _write_npz(
        tmp_path / "shape.npz", image=np.zeros((2, 8, 8), np.float32), label=np.zeros(2, np.int64)
    )
    with pytest.raises(DataError, match=r"shape\.npz: 'image' must be float32 \(N, 1, 8, 8\)"):
        digits_accuracy(DIGITS_MODEL, data=wrong_shape)

    wrong_labels = _write_npz(
        tmp_path / "labels.npz",
        image=np.zeros((2, 1, 8, 8), np.float32),
        label=np.zeros(3, np.int64),
    )
    with pytest.raises(DataError, match=r"labels\.npz: 'label' must be integers of shape \(2,\)"):
        digits_accuracy(DIGITS_MODEL, data=wrong_labels)


def test_digits_accuracy_rejects_models_that_do_not_fit() -> None:
    def model(out_dims: list[int | str], nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    flat = model(["N", 64], [helper.make_node("Flatten", ["image"], ["y"])])
    with pytest.raises(
        DataError, match=r"output 'y' must be \(64, 10\) class scores, got shape \(64, 64\)"
    ):
        digits_accuracy(flat)

    two_inputs = model(["N", 1, 8, 8], [helper.make_node("Add", ["image", "bias"], ["y"])])
    two_inputs.graph.input.append(
        helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 1, 8, 8])
    )
    with pytest.raises(DataError, match="the model has 2: image, bias"):
        digits_accuracy(two_inputs)


def test_demo_import_is_light() -> None:
    code = (
        "import sys, onnxslim_edge.demo as d; "
        "print(d.DIGITS_MODEL.name, sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["digits_cnn.onnx", "[]"]


@pytest.mark.slow
@pytest.mark.needs_torch
def test_train_script_smoke(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("torch")
    # A subprocess: training sets torch's global thread count and determinism flags.
    cmd = [sys.executable, "-m", "benchmarks.digits.train", "--out", str(tmp_path), "--epochs", "1"]
    subprocess.run(cmd, cwd=Path(__file__).parents[1], capture_output=True, check=True, timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "digits_cnn.onnx",
        "digits_test.npz",
    ]
    # The test split is the shipped one, byte for byte (fixed split, fixed zip timestamps).
    assert (tmp_path / "digits_test.npz").read_bytes() == DIGITS_TEST.read_bytes()
    model = load_model(tmp_path / "digits_cnn.onnx")
    assert Counter(n.op_type for n in model.graph.node)["BatchNormalization"] == 6
    assert model.ir_version == 7
