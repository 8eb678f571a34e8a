"""ONNX Runtime sessions: IR lowering on a copy-free basis, session options, typed errors."""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge import runtime
from onnxslim_edge.errors import ConfigError, InvalidModelError, UnsupportedError
from onnxslim_edge.runtime import make_session, serialized

W = np.arange(6, dtype=np.float32).reshape(3, 2) / 4


def _model(ir_version: int = 12) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(W, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = ir_version
    return model


def test_serialized_lowers_the_ir_without_changing_the_model():
    model = _model(ir_version=12)  # ONNX Runtime 1.19 refuses IR > 10
    data = serialized(model)
    back = onnx.load_from_string(data)
    assert back.ir_version == helper.find_min_ir_version_for(list(model.opset_import)) <= 10
    assert model.ir_version == 12
    back.ir_version = 12
    assert back == model  # nothing else differs


def test_session_runs_a_high_ir_model_and_computes_it():
    x = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], np.float32)
    (y,) = make_session(_model(ir_version=12), threads=1).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ W, rtol=1e-6)


def test_session_options_are_set_as_asked():
    sess = make_session(_model(), threads=3, optimization="basic")
    opts = sess.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (3, 1)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    import onnxruntime as ort

    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    spin = make_session(_model(), spinning=True, optimization="disable").get_session_options()
    assert spin.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert spin.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert sess.get_providers() == ["CPUExecutionProvider"]


def test_a_large_model_goes_through_a_temporary_file_that_is_removed(
    tmp_path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(runtime, "STREAM_THRESHOLD", 1)  # every model counts as large
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    x = np.ones((1, 3), np.float32)
    (y,) = make_session(_model()).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ W, rtol=1e-6)
    assert list(tmp_path.iterdir()) == []


def test_session_from_a_path(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(serialized(_model()))
    assert [o.name for o in make_session(path).get_outputs()] == ["y"]


def test_errors_are_typed_and_name_the_cause(tmp_path):
    with pytest.raises(InvalidModelError, match=r"m\.onnx: model file not found$"):
        make_session(tmp_path / "m.onnx")
    with pytest.raises(ConfigError) as info:
        make_session(_model(), optimization="max")
    assert str(info.value) == (
        "optimization must be one of disable, basic, extended, all, not 'max'"
    )
    broken = _model()
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(UnsupportedError, match=r"^ONNX Runtime cannot load the model: "):
        make_session(broken)


_FREED_PROBE = """
import sys
from pathlib import Path
import numpy as np
def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
if sys.argv[1] == "on":
    from onnxslim_edge.runtime import return_freed_memory
    assert return_freed_memory() is True
# Default glibc raises its mmap threshold to 16 MiB after this free, then serves the
# 8 MiB blocks below from its heap, where the small blocks between them pin them.
big = np.ones(16 * 2**20, np.uint8)
del big
before = rss_mb()
blocks, pins = [], []
for _ in range(16):  # 128 MiB
    blocks.append(np.ones(8 * 2**20, np.uint8))
    pins.append(np.ones(4096, np.uint8))
del blocks
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_goes_back_to_the_system() -> None:
    """In a fresh interpreter each (the test process's own heap history would decide):
    without `return_freed_memory` the freed 128 MiB stay resident, with it they go."""
    import subprocess

    def retained(mode: str) -> float:
        proc = subprocess.run(
            [sys.executable, "-c", _FREED_PROBE, mode], capture_output=True, text=True, check=True
        )
        return float(proc.stdout.strip())

    if retained("off") < 100:
        pytest.skip("this C library returns the freed blocks anyway")
    assert retained("on") < 20
