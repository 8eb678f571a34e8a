"""Model I/O: loading from every source, refusing bad files, atomic saves, IR lowering."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.errors import ConfigError, InvalidModelError
from onnxslim_edge.model import (
    convert_opset,
    load_model,
    min_ir_version,
    model_bytes,
    save_model,
)
from onnxslim_edge.runtime import make_session


def _gemm_model(n_in: int = 4, n_out: int = 3, opset: int = 13) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((n_out, n_in)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), "b")
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model_or_path, x):
    return make_session(model_or_path).run(None, {"x": x})[0]


def test_load_from_path_bytes_and_proto_agree(tmp_path: Path) -> None:
    model = _gemm_model()
    path = save_model(model, tmp_path / "m.onnx")
    from_path = load_model(path)
    from_bytes = load_model(path.read_bytes())
    assert from_path.SerializeToString() == from_bytes.SerializeToString()
    assert load_model(model) is model


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"", "file is empty"), (b"\x00\xffgarbage\x12\x99" * 10, "not an ONNX model")],
)
def test_corrupt_files_are_refused(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InvalidModelError, match=fragment) as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(InvalidModelError, match="folder"):
        load_model(tmp_path)


def test_checker_failure_is_one_line(tmp_path: Path) -> None:
    model = _gemm_model()
    model.graph.node[0].input[1] = "does_not_exist"
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InvalidModelError, match="fails the ONNX checker") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_save_lowers_ir_version_for_old_runtimes(tmp_path: Path) -> None:
    model = _gemm_model(opset=13)
    model.ir_version = onnx.IR_VERSION  # what recent onnx writes (> 10)
    assert min_ir_version(model) == 7
    path = save_model(model, tmp_path / "m.onnx")
    assert onnx.load(str(path)).ir_version == 7
    assert model.ir_version == onnx.IR_VERSION, "the caller's model must not change"


def test_ir_not_lowered_below_what_dtypes_need() -> None:
    model = _gemm_model(opset=13)
    model.graph.initializer.append(helper.make_tensor("f8", TensorProto.FLOAT8E4M3FN, [1], [1.0]))
    assert min_ir_version(model) >= 9


def test_save_refuses_to_overwrite_input(tmp_path: Path) -> None:
    path = save_model(_gemm_model(), tmp_path / "m.onnx")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite the input"):
        save_model(_gemm_model(5, 2), path, input_path=path)
    assert path.read_bytes() == before
    save_model(_gemm_model(5, 2), path, input_path=path, overwrite_input=True)
    assert path.read_bytes() != before


def test_save_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.onnx"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(_gemm_model(), target)
    assert sorted(os.listdir(tmp_path)) == [], "no partial or temporary file may remain"


def test_external_data_round_trip(tmp_path: Path) -> None:
    model = _gemm_model(64, 32)
    path = save_model(model, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    assert path.stat().st_size < model_bytes(model)
    loaded = load_model(path)
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(_run(loaded, x), _run(model, x))


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../escape.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path: Path, location: str) -> None:
    model = _gemm_model(64, 32)
    path = save_model(model, tmp_path / "ext.onnx", external_data=True)
    raw = onnx.load(str(path), load_external_data=False)
    for tensor in raw.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(raw.SerializeToString())
    with pytest.raises(InvalidModelError, match="refusing to read"):
        load_model(path)


def test_missing_external_data_file(tmp_path: Path) -> None:
    path = save_model(_gemm_model(64, 32), tmp_path / "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(InvalidModelError, match="missing"):
        load_model(path)


def test_convert_opset_keeps_outputs() -> None:
    model = _gemm_model(opset=13)
    converted = convert_opset(model, 17)
    assert next(o.version for o in converted.opset_import if o.domain == "") == 17
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(converted, x), _run(model, x), rtol=1e-6)


def test_save_with_opset(tmp_path: Path) -> None:
    path = save_model(_gemm_model(opset=13), tmp_path / "m.onnx", opset=18)
    assert next(o.version for o in onnx.load(str(path)).opset_import if o.domain == "") == 18


def test_output_folder_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="folder does not exist"):
        save_model(_gemm_model(), tmp_path / "nope" / "m.onnx")


def test_external_save_leaves_the_callers_model_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _gemm_model(64, 32)
    before = model.SerializeToString()
    save_model(model, tmp_path / "a.onnx", external_data=True)
    assert model.SerializeToString() == before

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "b.onnx", external_data=True)
    assert model.SerializeToString() == before, "tensors are restored after a failed save"
    assert not (tmp_path / "b.onnx").exists() and not (tmp_path / "b.onnx.data").exists()


def test_skeleton_keeps_structure_not_data() -> None:
    from onnxslim_edge.model import skeleton

    model = _gemm_model(64, 32)  # an 8 KB weight, a 128 B bias
    skel = skeleton(model)
    w, b = skel.graph.initializer
    assert (w.name, list(w.dims), w.data_type) == ("w", [32, 64], TensorProto.FLOAT)
    assert w.data_location == TensorProto.EXTERNAL and not w.HasField("raw_data")
    assert {e.key: e.value for e in w.external_data}["length"] == str(32 * 64 * 4)
    assert b == model.graph.initializer[1], "small tensors keep their data"
    assert skel.ByteSize() < 1024 < model.ByteSize()
    assert [n.SerializeToString() for n in skel.graph.node] == [
        n.SerializeToString() for n in model.graph.node
    ]


def test_checker_on_a_skeleton_still_refuses_bad_models(tmp_path: Path) -> None:
    model = _gemm_model(64, 32)
    model.graph.initializer[0].data_type = TensorProto.UNDEFINED  # the large (stubbed) one
    with pytest.raises(InvalidModelError, match="fails the ONNX checker"):
        load_model(model)
    model = _gemm_model(64, 32)
    model.graph.node[0].input[1] = "nowhere"
    with pytest.raises(InvalidModelError, match="nowhere"):
        load_model(model)


def test_large_models_are_written_tensor_by_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streamed writer (no whole-model SerializeToString) writes the same model."""
    import onnxslim_edge.model as model_mod

    model = _gemm_model(64, 32)
    model.graph.doc_string = "doc"
    model.metadata_props.add(key="k", value="v")
    monkeypatch.setattr(model_mod, "STREAM_THRESHOLD", 0)
    path = save_model(model, tmp_path / "m.onnx")
    loaded = onnx.load(str(path))
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    expected.ir_version = loaded.ir_version  # lowered on save
    assert loaded.SerializeToString() == expected.SerializeToString()
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(_run(path, x), _run(model, x))


def test_streamed_writer_keeps_every_kind_of_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raw bytes written apart from their tensor's header, typed fields, strings and
    empty tensors: the file parses to the same model."""
    import onnxslim_edge.model as model_mod

    model = _gemm_model(64, 32)
    extra = [
        helper.make_tensor("typed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),  # float_data
        helper.make_tensor("words", TensorProto.STRING, [2], [b"a", b"bc"]),
        numpy_helper.from_array(np.zeros((0, 4), np.float32), "empty"),
        numpy_helper.from_array(np.arange(5, dtype=np.int64), "ints"),
        numpy_helper.from_array(np.array([True, False]), "flags"),
        helper.make_tensor("nibbles", TensorProto.INT4, [3], [1, -2, 3]),
        helper.make_tensor("packed", TensorProto.INT4, [3], b"\xe1\x03", raw=True),  # 2 bytes
    ]
    extra[3].doc_string = "kept"
    model.graph.initializer.extend(extra)
    monkeypatch.setattr(model_mod, "STREAM_THRESHOLD", 0)
    path = save_model(model, tmp_path / "m.onnx")
    loaded = onnx.load(str(path))
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    expected.ir_version = loaded.ir_version
    assert loaded.SerializeToString() == expected.SerializeToString()


def test_streamed_writer_refuses_data_that_disagrees_with_the_dims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxslim_edge.model as model_mod

    model = _gemm_model(64, 32)
    model.graph.initializer[0].raw_data = b"\0" * 12  # dims say 32 x 64 floats
    monkeypatch.setattr(model_mod, "STREAM_THRESHOLD", 0)
    with pytest.raises(InvalidModelError, match="12 bytes of data"):
        model_mod._write_streamed(model, tmp_path / "m.onnx")


def _big_model(n: int = 6, size: int = 64) -> onnx.ModelProto:
    """A chain of MatMuls with weights big enough to be streamed field by field."""
    rng = np.random.default_rng(1)
    nodes, inits = [], []
    for i in range(n):
        w = rng.standard_normal((size, size)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        src = "x" if i == 0 else f"h{i - 1}"
        nodes.append(helper.make_node("MatMul", [src, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])],
        [helper.make_tensor_value_info(f"h{n - 1}", TensorProto.FLOAT, ["N", size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.producer_name = "test"
    helper.set_model_props(model, {"imgsz": "[320, 320]"})
    return model


@pytest.mark.parametrize("chunk", [1, 4096, 2**20])
def test_streamed_parse_equals_protobufs_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    import onnxslim_edge.model as model_mod

    model = _big_model()
    path = save_model(model, tmp_path / "m.onnx")
    whole = onnx.load(str(path))
    monkeypatch.setattr(model_mod, "STREAM_PARSE_BYTES", 0)  # stream even this small file
    monkeypatch.setattr(model_mod, "_STREAM_CHUNK", chunk)
    streamed = load_model(path)
    assert streamed.SerializeToString() == whole.SerializeToString()
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(_run(streamed, x), _run(whole, x))


def test_streamed_parse_merges_a_graph_given_in_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxslim_edge.model as model_mod

    model = _big_model(n=2)
    # protobuf merges a repeated message field: serialize the graph as two pieces
    first, second = onnx.GraphProto(), onnx.GraphProto()
    first.CopyFrom(model.graph)
    del first.initializer[1:]
    second.initializer.extend(model.graph.initializer[1:])
    head = onnx.ModelProto()
    head.CopyFrom(model)
    head.ClearField("graph")
    tag = bytes([(7 << 3) | 2])
    pieces = b"".join(
        tag + model_mod._varint(len(p)) + p
        for p in (first.SerializeToString(), second.SerializeToString())
    )
    path = tmp_path / "pieces.onnx"
    path.write_bytes(head.SerializeToString() + pieces)
    monkeypatch.setattr(model_mod, "STREAM_PARSE_BYTES", 0)
    streamed = load_model(path, check=False)
    expected = onnx.ModelProto()
    expected.ParseFromString(path.read_bytes())
    assert streamed.SerializeToString() == expected.SerializeToString()
    assert [t.name for t in streamed.graph.initializer] == ["w0", "w1"]


@pytest.mark.parametrize("cut", [0.3, 0.999])
def test_streamed_parse_refuses_a_truncated_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: float
) -> None:
    import onnxslim_edge.model as model_mod

    data = _big_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * cut)])
    monkeypatch.setattr(model_mod, "STREAM_PARSE_BYTES", 0)
    with pytest.raises(InvalidModelError, match=r"cut\.onnx") as info:
        load_model(path)
    assert "\n" not in str(info.value)
