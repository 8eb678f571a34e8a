"""model_cost / weight_sparsity: hand-counted MACs and params, corpus, torch export."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim_edge.analysis.cost as cost_mod
import onnxslim_edge.sandbox
from onnxslim_edge.analysis import model_cost, weight_sparsity
from onnxslim_edge.errors import DataError

OPSET = 17
F = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, shape, fill=1.0):
    return numpy_helper.from_array(np.full(shape, fill, np.float32), name)


def single(node, in_shapes, inits=(), out="y"):
    """A one-node model; graph inputs are the node inputs without an initializer."""
    names = {t.name for t in inits}
    inputs = [vi(n, s) for n, s in in_shapes.items() if n not in names]
    return make_model([node], inputs, [vi(out, None)], inits)


def test_grouped_conv():
    # Cin 8, group 2, Cout 16, 3x3, pad 1: out 1x16x16x16, each output 4*9 MACs.
    w, b = init("w", (16, 4, 3, 3)), init("b", (16,))
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, pads=[1, 1, 1, 1])
    c = model_cost(single(node, {"x": (1, 8, 16, 16)}, [w, b]))
    assert c.macs == 16 * 16 * 16 * 4 * 9
    assert c.params == 16 * 4 * 9 + 16
    assert c.per_node[0].params == c.params
    assert c.per_node[0].output_shapes == [(1, 16, 16, 16)]


def test_depthwise_conv_strided():
    w = init("w", (8, 1, 3, 3))
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=8, strides=[2, 2])
    c = model_cost(single(node, {"x": (2, 8, 11, 11)}, [w]))
    assert c.per_node[0].output_shapes == [(2, 8, 5, 5)]
    assert c.macs == 2 * 8 * 5 * 5 * 9


def test_conv_transpose_plain_and_grouped():
    w = init("w", (4, 6, 3, 3))
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])
    c = model_cost(single(node, {"x": (1, 4, 5, 5)}, [w]))
    assert c.per_node[0].output_shapes == [(1, 6, 11, 11)]
    assert c.macs == 4 * 5 * 5 * 6 * 9  # every input element is scattered to Cout*k*k outputs

    w = init("w", (4, 3, 2, 2))
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], group=2, strides=[2, 2])
    c = model_cost(single(node, {"x": (1, 4, 5, 5)}, [w]))
    assert c.per_node[0].output_shapes == [(1, 6, 10, 10)]
    assert c.macs == 4 * 5 * 5 * 3 * 4


def test_gemm_trans_b_and_trans_a():
    w, b = init("w", (32, 64)), init("b", (32,))
    node = helper.make_node("Gemm", ["a", "w", "b"], ["y"], transB=1)
    c = model_cost(single(node, {"a": (2, 64)}, [w, b]))
    assert c.macs == 2 * 32 * 64
    assert c.params == 32 * 64 + 32

    node = helper.make_node("Gemm", ["a", "w"], ["y"], transA=1)
    c = model_cost(single(node, {"a": (5, 3)}, [init("w", (5, 7))]))
    assert c.macs == 3 * 7 * 5


def test_matmul_batched_broadcast_and_vector():
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    c = model_cost(
        make_model([node], [vi("a", (2, 3, 4, 5)), vi("b", (2, 3, 5, 6))], [vi("y", None)])
    )
    assert c.macs == 2 * 3 * 4 * 6 * 5
    assert c.params == 0  # activations are not weights

    c = model_cost(single(node, {"a": (2, 1, 4, 5)}, [init("b", (3, 5, 6))]))
    assert c.per_node[0].output_shapes == [(2, 3, 4, 6)]
    assert c.macs == 2 * 3 * 4 * 6 * 5

    c = model_cost(single(node, {"a": (5,)}, [init("b", (5, 6))]))
    assert c.macs == 6 * 5


def test_pooling():
    maxpool = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2])
    assert model_cost(single(maxpool, {"x": (1, 4, 9, 9)})).macs == 4 * 4 * 4 * 9
    avg = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    assert model_cost(single(avg, {"x": (1, 4, 8, 8)})).macs == 4 * 4 * 4 * 4
    gap = helper.make_node("GlobalAveragePool", ["x"], ["y"])
    assert model_cost(single(gap, {"x": (1, 4, 8, 8)})).macs == 4 * 8 * 8


@pytest.mark.parametrize(
    ("op", "per_element", "attrs"),
    [
        ("Relu", 1, {}),
        ("Sigmoid", 1, {}),
        ("Softmax", 3, {"axis": -1}),
        ("InstanceNormalization", 4, {}),
    ],
)
def test_unary_per_element(op, per_element, attrs):
    inputs = ["x"]
    inits = []
    if op == "InstanceNormalization":
        inits = [init("s", (3,)), init("b", (3,), 0.0)]
        inputs += ["s", "b"]
    node = helper.make_node(op, inputs, ["y"], **attrs)
    assert model_cost(single(node, {"x": (2, 3, 4, 5)}, inits)).macs == per_element * 120


def test_binary_and_normalization_ops():
    nodes = [
        helper.make_node("Add", ["x", "bias"], ["a"]),  # broadcast: output-sized
        helper.make_node("Clip", ["a"], ["c"], name="clip"),
        helper.make_node("Sum", ["a", "c", "x"], ["s"]),  # 3 inputs: 2 adds per element
        helper.make_node("BatchNormalization", ["s", "g", "b", "m", "v"], ["bn"]),
        helper.make_node("LayerNormalization", ["bn", "ln_s"], ["y"], axis=-1),
    ]
    inits = [
        init("bias", (4, 1, 1)),
        *(init(n, (4,)) for n in ("g", "b", "m", "v")),
        init("ln_s", (5,)),
    ]
    model = make_model(nodes, [vi("x", (2, 4, 3, 5))], [vi("y", None)], inits)
    c = model_cost(model)
    n = 2 * 4 * 3 * 5
    assert [p.macs for p in c.per_node] == [n, n, 2 * n, 2 * n, 4 * n]
    assert c.macs == 10 * n
    assert c.per_node[1].name == "clip" and c.per_node[0].name == "Add_0"
    assert c.params == 4 + 4 * 4 + 5


def test_unknown_shapes_cost_zero_without_error():
    # The weight is a graph input of unknown rank: the Conv's MACs cannot be known.
    node = helper.make_node("Conv", ["x", "w"], ["c"])
    relu = helper.make_node("Relu", ["c"], ["y"])
    model = make_model(
        [node, relu],
        [vi("x", (1, 3, 8, 8)), helper.make_tensor_value_info("w", F, None)],
        [vi("y", None)],
    )
    c = model_cost(model)
    assert [p.macs for p in c.per_node] == [0, 0]
    custom = helper.make_node("Frobnicate", ["x"], ["y"], domain="my.domain")
    model = make_model([custom], [vi("x", (1, 3))], [vi("y", None)])
    model.opset_import.append(helper.make_opsetid("my.domain", 1))
    c = model_cost(model)
    assert (c.macs, c.nodes, c.ops, c.per_node[0].output_shapes) == (
        0,
        1,
        {"Frobnicate": 1},
        [None],
    )


def test_op_histogram_sorted_by_count():
    nodes = [
        helper.make_node("Relu", ["x"], ["r1"]),
        helper.make_node("Sigmoid", ["r1"], ["s1"]),
        helper.make_node("Relu", ["s1"], ["r2"]),
        helper.make_node("Add", ["r2", "x"], ["a"]),
        helper.make_node("Relu", ["a"], ["r3"]),
        helper.make_node("Sigmoid", ["r3"], ["y"]),
    ]
    c = model_cost(make_model(nodes, [vi("x", (2, 3))], [vi("y", None)]))
    assert list(c.ops.items()) == [("Relu", 3), ("Sigmoid", 2), ("Add", 1)]
    assert c.nodes == 6
    assert c.macs == 6 * 6


def test_params_shared_weight_counted_once_constant_nodes_included():
    w = init("w", (5, 5))
    const = helper.make_tensor("cv", F, [5], np.arange(5, dtype=np.float32))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("MatMul", ["a", "w"], ["b"]),
        helper.make_node("Constant", [], ["c"], value=const),
        helper.make_node("Add", ["b", "c"], ["d"]),
        helper.make_node("Constant", [], ["scalar"], value_float=2.0),  # rank 0: not a weight
        helper.make_node("Mul", ["d", "scalar"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", (3, 5))], [vi("y", None)], [w, init("unused_int", (7,))])
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.ones(7, np.int64), "ints"))
    c = model_cost(model)
    assert c.params == 25 + 5
    assert [p.params for p in c.per_node] == [25, 25, 0, 5, 0, 0]  # weights read


def test_sparsity():
    w = np.ones((4, 3, 3, 3), np.float32)
    w[0] = 0.0  # 27 of 108 zeros
    w[1, 0, 0, 0] = -0.0  # negative zero is exactly zero too
    b = np.zeros(4, np.float32)  # rank 1: not part of the sparsity
    g = np.ones((6, 4), np.float16)
    g[:, :2] = 0  # half zeros, stored as float16
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Cast", ["f"], ["fh"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["g", "fh"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(g, "g"),
    ]
    model = make_model(nodes, [vi("x", (1, 3, 3, 3))], [vi("y", None)], inits)
    assert weight_sparsity(model) == {"w": 28 / 108, "g": 0.5}
    assert model_cost(model).sparsity == pytest.approx((28 + 12) / (108 + 24), abs=1e-12)

    dense = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", (2,))], [vi("y", None)])
    assert weight_sparsity(dense) == {}
    assert model_cost(dense).sparsity == 0.0


def conv_reshape_matmul_model() -> onnx.ModelProto:
    """x[N,3,8,8] -Conv(4x3x3x3, pad 1)-> c -Reshape([N, 256], computed through float
    arithmetic ONNX cannot follow)-> r -Relu-> rr -MatMul(256x10)-> y[N, 10]."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
        helper.make_node("Cast", ["n"], ["nf"], to=F),
        helper.make_node("Concat", ["nf", "features"], ["shf"], axis=0),
        helper.make_node("Cast", ["shf"], ["shi"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["c", "shi"], ["r"]),
        helper.make_node("Relu", ["r"], ["rr"]),
        helper.make_node("MatMul", ["rr", "w2"], ["y"]),
    ]
    inits = [
        init("w", (4, 3, 3, 3)),
        init("w2", (256, 10)),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([256.0], np.float32), "features"),
    ]
    return make_model(nodes, [vi("x", ("N", 3, 8, 8))], [vi("y", ("N", 10))], inits)


CONV_MACS = 4 * 8 * 8 * 27
RELU_MACS = 256
MATMUL_MACS = 10 * 256


def test_symbolic_batch_with_input_shapes_uses_runtime(monkeypatch):
    sessions = []
    real = onnxslim_edge.sandbox.output_shapes  # each run happens in a budgeted child
    monkeypatch.setattr(
        onnxslim_edge.sandbox, "output_shapes", lambda *a, **k: sessions.append(1) or real(*a, **k)
    )
    model = conv_reshape_matmul_model()
    before = model.SerializeToString()

    # Batch N counts as 1. The Reshape's output is unknown, so the Relu costs 0; the
    # MatMul's output is declared [N, 10] and its K comes from the weight.
    plain = model_cost(model)
    assert sessions == []
    assert plain.per_node[6].output_shapes == [(None, None)]
    assert [n.macs for n in plain.per_node[6:]] == [0, 0, MATMUL_MACS]
    assert plain.macs == CONV_MACS + MATMUL_MACS

    one = model_cost(model, {"x": (1, 3, 8, 8)})
    four = model_cost(model, {"x": (4, 3, 8, 8)})
    assert len(sessions) == 2
    assert one.macs == CONV_MACS + RELU_MACS + MATMUL_MACS
    assert four.macs == 4 * one.macs
    assert four.per_node[6].output_shapes == [(4, 256)]
    assert four.per_node[8].output_shapes == [(4, 10)]
    assert model.SerializeToString() == before


def test_bad_input_shapes_are_data_errors():
    with pytest.raises(DataError, match="not a model input"):
        model_cost(conv_reshape_matmul_model(), {"image": (1, 3, 8, 8)})


def test_caller_model_unchanged_and_pure():
    model = conv_reshape_matmul_model()
    before = model.SerializeToString()
    first = model_cost(model, {"x": (2, 3, 8, 8)})
    assert model.SerializeToString() == before
    assert model_cost(model, {"x": (2, 3, 8, 8)}) == first


def test_size_bytes_and_to_dict(monkeypatch):
    model = conv_reshape_matmul_model()
    c = model_cost(model)
    assert c.size_bytes == model.ByteSize() == len(model.SerializeToString())
    data = json.loads(json.dumps(c.to_dict()))
    assert data["macs"] == c.macs and data["ops"] == c.ops
    assert data["per_node"][0] == {
        "name": "Conv_0",
        "op": "Conv",
        "params": 108,
        "macs": CONV_MACS,
        "output_shapes": [["N", 4, 8, 8]],
    }
    # Over protobuf's 2 GB limit the size is estimated from tensor and graph bytes.
    monkeypatch.setattr(cost_mod, "PROTOBUF_LIMIT", 0)
    estimate = model_cost(model).size_bytes
    assert abs(estimate - model.ByteSize()) <= 0.05 * model.ByteSize()


def test_thousand_nodes_under_a_second():
    nodes, inits = [], []
    prev = "x"
    for i in range(500):
        inits.append(init(f"w{i}", (8, 8, 3, 3), 0.01))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
    model = make_model(nodes, [vi("x", ("N", 8, 16, 16))], [vi(prev, None)], inits)
    start = time.perf_counter()
    c = model_cost(model)
    elapsed = time.perf_counter() - start
    assert c.nodes == 1000
    assert c.macs == 500 * (8 * 16 * 16 * 8 * 9 + 8 * 16 * 16)
    assert c.params == 500 * 8 * 8 * 9
    assert elapsed < 1.0, f"model_cost took {elapsed:.2f} s on 1000 nodes"


# --------------------------------------------------------------------------- corpus

LIGHT = sorted((Path(onnx.__file__).parent / "backend" / "test" / "data" / "light").glob("*.onnx"))


def test_corpus_found():
    assert len(LIGHT) >= 9


@pytest.mark.parametrize("path", LIGHT, ids=[p.stem for p in LIGHT])
def test_light_corpus(path):
    model = onnx.load(str(path))
    before = model.SerializeToString()
    c = model_cost(model)
    assert c.nodes == len(model.graph.node) == len(c.per_node)
    assert sum(c.ops.values()) == c.nodes
    assert c.macs > 0
    assert c.size_bytes == len(before)
    assert model.SerializeToString() == before
    if path.stem == "light_resnet50":
        assert abs(c.macs - 4.1e9) <= 0.1 * 4.1e9
        convs = sum(n.macs for n in c.per_node if n.op in ("Conv", "Gemm"))
        assert abs(convs - 4.09e9) <= 0.02 * 4.09e9  # the commonly quoted 4.09 GMACs


# --------------------------------------------------------------------------- torch


@pytest.mark.needs_torch
def test_torch_exported_conv_net():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1, groups=2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    ).eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, 16, 16),),
        buffer,
        dynamo=False,
        opset_version=OPSET,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    model = onnx.load_from_string(buffer.getvalue())
    expected = {
        "Conv": 8 * 16 * 16 * 3 * 9 + 16 * 8 * 8 * 4 * 9,
        "Relu": 8 * 16 * 16,
        "MaxPool": 8 * 8 * 8 * 4,
        "GlobalAveragePool": 16 * 8 * 8,
        "Gemm": 10 * 16,
    }
    c = model_cost(model)
    by_op: dict[str, int] = {}
    for node in c.per_node:
        by_op[node.op] = by_op.get(node.op, 0) + node.macs
    assert {op: m for op, m in by_op.items() if m} == expected
    assert c.macs == sum(expected.values())
    assert c.params == sum(p.numel() for p in net.parameters())
    assert model_cost(model, {"x": (4, 3, 16, 16)}).macs == 4 * c.macs


def test_sparse_initializer_and_bfloat16_weights():
    values = numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32), "s")
    indices = numpy_helper.from_array(np.array([0, 7, 19], np.int64), "s_idx")
    sparse = helper.make_sparse_tensor(values, indices, [4, 5])
    bits = np.array([0x3F80, 0x0000, 0x8000, 0x4000], np.uint16)  # 1.0, +0, -0, 2.0
    bf16 = helper.make_tensor("h", TensorProto.BFLOAT16, [2, 2], bits.tobytes(), raw=True)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "s"], ["y"])],
        "g",
        [vi("x", (2, 4))],
        [vi("y", None)],
        [bf16],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    assert weight_sparsity(model) == {"s": 17 / 20, "h": 0.5}
    c = model_cost(model)
    assert c.params == 20 + 4
    assert c.sparsity == pytest.approx((17 + 2) / 24, abs=1e-12)
    assert c.per_node[0].params == 20
    assert c.macs == 2 * 5 * 4


def test_quantized_weights_keep_params():
    """int8 weights read by a DequantizeLinear count as params; scales/zero points do not."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8, 3, 3)).astype(np.float32)
    float_model = single(
        helper.make_node("Conv", ["x", "w"], ["y"]),
        {"x": (1, 8, 8, 8)},
        [numpy_helper.from_array(w, "w")],
    )
    scale = (np.abs(w).reshape(16, -1).max(axis=1) / 127).astype(np.float32)
    q = np.clip(np.rint(w / scale.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    dq = helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0)
    conv = helper.make_node("Conv", ["x", "wd"], ["y"])
    inits = [
        numpy_helper.from_array(q, "wq"),
        numpy_helper.from_array(scale, "ws"),
        numpy_helper.from_array(np.zeros(16, np.int8), "wz"),
    ]
    quantized = make_model([dq, conv], [vi("x", (1, 8, 8, 8))], [vi("y", None)], inits)
    before, after = model_cost(float_model), model_cost(quantized)
    assert before.params == after.params == w.size
    assert after.size_bytes < 0.3 * before.size_bytes
    assert after.macs == before.macs  # Q/DQ count no MACs: runtimes fuse them
    # an integer tensor that no DequantizeLinear reads (e.g. a shape) is not a weight
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    reshape = helper.make_node("Reshape", ["y", "shape"], ["z"])
    with_shape = make_model(
        [dq, conv, reshape], [vi("x", (1, 8, 8, 8))], [vi("z", None)], [*inits, shape]
    )
    assert model_cost(with_shape).params == w.size
