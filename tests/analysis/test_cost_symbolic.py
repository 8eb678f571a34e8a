"""MACs through symbolic shapes and subgraphs: a BERT-style encoder layer with dynamic
batch/sequence against a hand count, Loop bodies times their trip count, If branches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.analysis import model_cost
from onnxslim_edge.cli import main

F, I64 = TensorProto.FLOAT, TensorProto.INT64
D, HEADS, DH, FF = 32, 4, 8, 128


def _f(name, shape, rng):
    return numpy_helper.from_array(rng.normal(0, 0.1, shape).astype(np.float32), name)


def _i(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def encoder_layer() -> onnx.ModelProto:
    """x [batch, seq, 32] -> post-LN encoder layer (4 heads of 8, FFN 128), the head
    split built from Shape/Gather/Unsqueeze/Concat as exporters write it."""
    rng = np.random.default_rng(0)
    inits = [_f(n, (D, D), rng) for n in ("wq", "wk", "wv", "wo")]
    inits += [_f(n, (D,), rng) for n in ("bq", "bk", "bv", "bo", "b2", "g1", "be1", "g2", "be2")]
    inits += [_f("w1", (D, FF), rng), _f("b1", (FF,), rng), _f("w2", (FF, D), rng)]
    inits += [_i("i0", 0), _i("i1", 1), _i("ax0", [0]), _i("heads", [HEADS, DH]), _i("d", [D])]
    inits.append(numpy_helper.from_array(np.array(np.sqrt(DH), np.float32), "scale"))
    n = helper.make_node
    nodes = [
        n("Shape", ["x"], ["shp"]),
        n("Gather", ["shp", "i0"], ["b"], axis=0),
        n("Gather", ["shp", "i1"], ["s"], axis=0),
        n("Unsqueeze", ["b", "ax0"], ["b1d"]),
        n("Unsqueeze", ["s", "ax0"], ["s1d"]),
        n("Concat", ["b1d", "s1d", "heads"], ["split"], axis=0),
        n("Concat", ["b1d", "s1d", "d"], ["merge"], axis=0),
    ]
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [
            n("MatMul", ["x", f"w{p}"], [f"{p}0"]),
            n("Add", [f"{p}0", f"b{p}"], [f"{p}1"]),
            n("Reshape", [f"{p}1", "split"], [f"{p}2"]),
            n("Transpose", [f"{p}2"], [f"{p}h"], perm=perm),
        ]
    nodes += [
        n("MatMul", ["qh", "kh"], ["scores"]),  # QK^T: (B, H, S, S)
        n("Div", ["scores", "scale"], ["scaled"]),
        n("Softmax", ["scaled"], ["probs"], axis=-1),
        n("MatMul", ["probs", "vh"], ["ctx"]),  # AV: (B, H, S, Dh)
        n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx_t", "merge"], ["ctx_m"]),
        n("MatMul", ["ctx_m", "wo"], ["o0"]),
        n("Add", ["o0", "bo"], ["o1"]),
        n("Add", ["o1", "x"], ["r1"]),
        n("LayerNormalization", ["r1", "g1", "be1"], ["ln1"], axis=-1),
        n("MatMul", ["ln1", "w1"], ["f0"]),
        n("Add", ["f0", "b1"], ["f1"]),
        n("Relu", ["f1"], ["f2"]),
        n("MatMul", ["f2", "w2"], ["f3"]),
        n("Add", ["f3", "b2"], ["f4"]),
        n("Add", ["f4", "ln1"], ["r2"]),
        n("LayerNormalization", ["r2", "g2", "be2"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [helper.make_tensor_value_info("x", F, ["batch", "sequence", D])],
        [helper.make_tensor_value_info("y", F, ["batch", "sequence", D])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def hand_count(batch: int, seq: int) -> tuple[int, int]:
    """(MatMul MACs, all MACs) of `encoder_layer` at (batch, seq), by hand."""
    tokens = batch * seq
    attn = batch * HEADS * seq * seq
    matmul = (
        4 * tokens * D * D  # Q, K, V and output projections
        + attn * DH  # QK^T: each score is a Dh-long dot product
        + attn * DH  # AV: each (S, Dh) output element sums S products
        + 2 * tokens * D * FF  # FFN up and down
    )
    elementwise = (
        5 * tokens * D  # bias adds of Q, K, V, O and FFN-down
        + tokens * FF  # FFN-up bias
        + tokens * FF  # Relu
        + 2 * tokens * D  # residual adds
        + attn  # Div by sqrt(Dh)
        + 3 * attn  # Softmax
        + 2 * 4 * tokens * D  # two LayerNorms
    )
    return matmul, matmul + elementwise


@pytest.mark.parametrize("batch, seq", [(2, 16), (1, 128)])
def test_encoder_layer_hand_count(batch: int, seq: int) -> None:
    cost = model_cost(encoder_layer(), {"x": (batch, seq, D)})
    matmul, total = hand_count(batch, seq)
    assert cost.macs_by_op["MatMul"] == matmul
    assert cost.macs == total
    assert cost.macs_by_op["Softmax"] == 3 * batch * HEADS * seq * seq


def test_inspect_encoder_without_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "enc.onnx"
    onnx.save(encoder_layer(), src)
    assert main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # The sequence ladder's first length that runs: 16; batch 1.
    assert info["input_shapes"] == {"x": {"shape": [1, 16, D], "origin": "ladder"}}
    matmul, total = hand_count(1, 16)
    assert info["macs"] == total
    assert info["macs_by_op"]["MatMul"] == matmul
    assert sum(info["macs_by_op"].values()) == info["macs"]


def _loop_model(trip_from_input: bool) -> onnx.ModelProto:
    """y = x @ W applied `trip` times in a Loop (x [1, 8], W [8, 8])."""
    rng = np.random.default_rng(0)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "w"], ["h_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", I64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", F, [1, 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", F, [1, 8]),
        ],
    )
    inits = [_f("w", (8, 8), rng), numpy_helper.from_array(np.array(True), "cond")]
    inputs = [helper.make_tensor_value_info("x", F, [1, 8])]
    if trip_from_input:
        inputs.append(helper.make_tensor_value_info("trip", I64, []))
    else:
        inits.append(_i("trip", 3))
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body)],
        "loop",
        inputs,
        [helper.make_tensor_value_info("y", F, [1, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_loop_body_times_constant_trip_count() -> None:
    cost = model_cost(_loop_model(False))
    assert cost.macs == 3 * 8 * 8
    assert cost.macs_by_op == {"MatMul": 3 * 8 * 8}
    assert cost.per_node[0].macs == 3 * 8 * 8 and cost.notes == []


def test_loop_with_unknown_trip_count_counted_once_with_a_note() -> None:
    cost = model_cost(_loop_model(True))
    assert cost.macs == 8 * 8
    assert cost.notes == ["Loop 'Loop': trip count not constant; its body counted once"]


def test_if_costs_its_costlier_branch() -> None:
    rng = np.random.default_rng(0)

    def branch(name, nodes):
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info("o", F, [1, 8])])

    then = branch("then", [helper.make_node("MatMul", ["x", "w"], ["o"])])
    other = branch("else", [helper.make_node("Relu", ["x"], ["o"])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "if",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", F, [1, 8]),
        ],
        [helper.make_tensor_value_info("y", F, [1, 8])],
        [_f("w", (8, 8), rng)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    cost = model_cost(model)
    assert cost.macs == 64 and cost.macs_by_op == {"MatMul": 64}
