"""prune-magnitude: exact sparsity per layer and globally, ties, group L2, shared and
non-constant weights, fidelity on the torch ResNet, compressed size, idempotence.

Zero counts are exact (`np.count_nonzero(w == 0)`); weights left unpruned must be
bit-identical to the original's. Fidelity is measured with `onnxslim_edge.verify.compare`
on ONNX Runtime.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.passes.prune.magnitude import (
    PruneMagnitude,
    reduction_groups,
    target_units,
)
from onnxslim_edge.pipeline import Context, Pipeline, get_pass, parse_pass_spec
from onnxslim_edge.runtime import make_session

# --------------------------------------------------------------------------- helpers


def _model(nodes: list, inits: dict[str, np.ndarray], inputs: list, outputs: list) -> Any:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _vi(name: str, shape: list) -> Any:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _distinct(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """Random float32 weights with pairwise distinct, nonzero magnitudes."""
    n = int(np.prod(shape))
    mags = (rng.permutation(n) + 1).astype(np.float64) / n * scale
    signs = rng.choice([-1.0, 1.0], n)
    return (mags * signs).reshape(shape).astype(np.float32)


def _three_layers(seed: int = 0, scales: tuple[float, float, float] = (1, 1, 1)) -> Any:
    """x(1,8,6,6) -> Conv(W 8x8x3x3) -> GAP -> Flatten -> Gemm(transB=1, 16x8) -> MatMul(16x12)."""
    rng = np.random.default_rng(seed)
    inits = {
        "W": _distinct(rng, (8, 8, 3, 3), scales[0]),
        "G": _distinct(rng, (16, 8), scales[1]),
        "M": _distinct(rng, (16, 12), scales[2]),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "G"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "M"], ["y"], name="matmul"),
    ]
    return _model(nodes, inits, [_vi("x", [1, 8, 6, 6])], [_vi("y", [1, 12])])


def _inits(model: Any) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _run(model: Any, **options: Any) -> tuple[Any, Any]:
    result = Pipeline([PruneMagnitude(**options)]).run(model)
    return result.model, result.report.passes[0]


def _feed(model: Any, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        feed[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


# --------------------------------------------------------------------------- per layer


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.9])
def test_layer_scope_zeroes_exactly_the_smallest(sparsity: float) -> None:
    model = _three_layers()
    before = _inits(model)
    pruned, report = _run(model, sparsity=sparsity)
    after = _inits(pruned)
    assert report.modified and report.skips == []
    assert report.counters["layers_pruned"] == 3
    details = {d["weight"]: d for d in report.details}
    for name, old in before.items():
        new = after[name]
        k = int(np.floor(sparsity * old.size + 0.5))
        assert np.count_nonzero(new == 0) == k
        zeroed = new == 0
        # the zeroed weights are the k smallest by |w|, the rest bit-identical
        assert np.abs(old[zeroed]).max() < np.abs(old[~zeroed]).min()
        np.testing.assert_array_equal(new[~zeroed], old[~zeroed])
        assert details[name]["zeros_after"] == k
        assert details[name]["sparsity_after"] == pytest.approx(k / old.size)
        assert details[name]["sparsity_before"] == 0.0
    assert report.counters["weights_zeroed"] == sum(
        int(np.floor(sparsity * v.size + 0.5)) for v in before.values()
    )
    onnx.checker.check_model(pruned, full_check=True)


def test_target_units_rounds_to_nearest() -> None:
    assert target_units(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996
    assert target_units(0.5, 5) == 3
    assert target_units(0.1, 4) == 0
    assert target_units(0.0, 10) == 0
    assert target_units(0.999, 10) == 10


def test_existing_zeros_count_towards_the_target() -> None:
    model = _three_layers()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w.ravel()[:300] = 0  # 300 of 576 already zero: more than the 30% target
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    pruned, report = _run(model, sparsity=0.3)
    np.testing.assert_array_equal(_inits(pruned)["W"], w)
    detail = next(d for d in report.details if d["weight"] == "W")
    assert detail["zeros_before"] == detail["zeros_after"] == 300


# --------------------------------------------------------------------------- global


def test_global_scope_uses_one_threshold() -> None:
    # the Gemm's weights are 10x smaller: a global threshold prunes it far more
    model = _three_layers(scales=(1.0, 0.1, 1.0))
    before = _inits(model)
    pruned, report = _run(model, sparsity=0.4, scope="global")
    after = _inits(pruned)
    total = sum(v.size for v in before.values())
    zeros = sum(int(np.count_nonzero(after[k] == 0)) for k in before)
    assert zeros == int(np.floor(0.4 * total + 0.5))
    old = np.concatenate([np.abs(before[k]).ravel() for k in before])
    zeroed = np.concatenate([(after[k] == 0).ravel() for k in before])
    assert old[zeroed].max() < old[~zeroed].min()
    sparsity = {d["weight"]: d["sparsity_after"] for d in report.details}
    assert sparsity["G"] == 1.0 and sparsity["W"] < 0.4 and sparsity["M"] < 0.4


# --------------------------------------------------------------------------- ties


def test_ties_are_broken_by_position() -> None:
    w = np.ones((4, 6), np.float32)
    w[1::2] *= -1  # equal magnitudes, mixed signs
    model = _model(
        [helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")],
        {"B": w},
        [_vi("x", [2, 4])],
        [_vi("y", [2, 6])],
    )
    first, _ = _run(model, sparsity=0.5)
    second, _ = _run(model, sparsity=0.5)
    b1, b2 = _inits(first)["B"], _inits(second)["B"]
    np.testing.assert_array_equal(b1.ravel()[:12], 0)  # the first 12 by flat index
    np.testing.assert_array_equal(b1.ravel()[12:], w.ravel()[12:])
    assert b1.tobytes() == b2.tobytes()


# --------------------------------------------------------------------------- group L2


@pytest.mark.parametrize(("op", "axis"), [("Conv", 1), ("GemmT", 1), ("Gemm", 0)])
def test_group_l2_zeroes_whole_groups_along_the_reduction_axis(op: str, axis: int) -> None:
    rng = np.random.default_rng(3)
    if op == "Conv":
        w = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "W"], ["y"], name="n", pads=[1, 1, 1, 1])
        io = ([_vi("x", [1, 16, 5, 5])], [_vi("y", [1, 8, 5, 5])])
    elif op == "GemmT":
        w = rng.standard_normal((6, 16)).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "W"], ["y"], name="n", transB=1)
        io = ([_vi("x", [2, 16])], [_vi("y", [2, 6])])
    else:
        w = rng.standard_normal((16, 6)).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "W"], ["y"], name="n")
        io = ([_vi("x", [2, 16])], [_vi("y", [2, 6])])
    model = _model([node], {"W": w}, *io)
    pruned, report = _run(model, sparsity=0.5, criterion="group_l2", group_size=4)
    new = _inits(pruned)["W"]
    g_old = reduction_groups(w, axis, 4).reshape(-1, 4)
    g_new = reduction_groups(new, axis, 4).reshape(-1, 4)
    all_zero = (g_new == 0).all(axis=1)
    untouched = (g_new == g_old).all(axis=1)
    assert (all_zero | untouched).all()  # every group is zeroed whole or left alone
    assert all_zero.sum() == len(g_old) // 2
    norms = np.linalg.norm(g_old.astype(np.float64), axis=1)
    assert norms[all_zero].max() < norms[~all_zero].min()
    assert report.details[0]["zeros_after"] == w.size // 2


def test_group_l2_skips_a_reduction_dim_not_divisible() -> None:
    model = _three_layers()  # Conv Cin 8, Gemm K 8, MatMul K 16: all divisible by 4 ...
    _pruned, report = _run(model, sparsity=0.5, criterion="group_l2", group_size=3)
    skipped = {s.node: s.reason for s in report.skips}
    assert skipped == {
        "conv": "reduction dim 8 (axis 1) is not a multiple of group_size 3",
        "gemm": "reduction dim 8 (axis 1) is not a multiple of group_size 3",
        "matmul": "reduction dim 16 (axis 0) is not a multiple of group_size 3",
    }
    assert report.modified is False


# --------------------------------------------------------------------------- skips


def test_shared_weight_is_pruned_once() -> None:
    w = _distinct(np.random.default_rng(0), (8, 8))
    model = _model(
        [
            helper.make_node("MatMul", ["x", "B"], ["h"], name="mm1"),
            helper.make_node("MatMul", ["h", "B"], ["y"], name="mm2"),
        ],
        {"B": w},
        [_vi("x", [2, 8])],
        [_vi("y", [2, 8])],
    )
    pruned, report = _run(model, sparsity=0.5)
    inits = _inits(pruned)
    assert list(inits) == ["B"]  # still one shared initializer
    assert np.count_nonzero(inits["B"] == 0) == 32  # 50%, not 75%
    assert report.counters["layers_pruned"] == 1
    assert report.details[0]["shared_by"] == ["mm1", "mm2"]


def test_non_constant_weight_is_skipped_with_reason() -> None:
    model = _model(
        [
            helper.make_node("Relu", ["w_in"], ["w"], name="relu"),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
            helper.make_node("MatMul", ["x", "w_in"], ["z"], name="mm_input"),
        ],
        {},
        [_vi("x", [2, 4]), _vi("w_in", [4, 3])],
        [_vi("y", [2, 3]), _vi("z", [2, 3])],
    )
    _pruned, report = _run(model, sparsity=0.5)
    assert report.modified is False
    assert {(s.node, s.reason) for s in report.skips} == {
        ("mm", "weight 'w' is not a constant (computed by Relu 'relu')"),
        ("mm_input", "weight 'w_in' is not a constant (a graph input)"),
    }


def test_weight_read_by_another_op_and_exclusions_are_skipped() -> None:
    rng = np.random.default_rng(0)
    model = _model(
        [
            helper.make_node("MatMul", ["x", "B"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "B"], ["y"], name="add"),
            helper.make_node("MatMul", ["x", "C"], ["z"], name="keep_me"),
            helper.make_node("MatMul", ["x", "D"], ["t"], name="tiny"),
        ],
        {
            "B": _distinct(rng, (4, 4)),
            "C": _distinct(rng, (4, 4)),
            "D": _distinct(rng, (4, 2)),
        },
        [_vi("x", [4, 4])],
        [_vi("y", [4, 4]), _vi("z", [4, 4]), _vi("t", [4, 2])],
    )
    _pruned, report = _run(model, sparsity=0.5, exclude_nodes=("keep_me",), min_params=10)
    assert report.modified is False
    assert {(s.node, s.reason) for s in report.skips} == {
        ("mm", "weight 'B' is also read by Add 'add' (input 1)"),
        ("keep_me", "excluded by exclude_nodes"),
        ("tiny", "too small (8 weights < min_params 10)"),
    }


# --------------------------------------------------------------------------- end to end


def test_pruned_model_runs_and_running_again_changes_nothing() -> None:
    model = _three_layers()
    pruned, _ = _run(model, sparsity=0.5)
    feed = _feed(model)
    y0 = make_session(model).run(None, feed)[0]
    y1 = make_session(pruned).run(None, feed)[0]
    assert not np.allclose(y0, y1, rtol=1e-3, atol=1e-3)
    again, report = _run(pruned, sparsity=0.5)
    assert report.modified is False and report.counters["weights_zeroed"] == 0
    assert again.SerializeToString() == pruned.SerializeToString()


def test_resnet_fidelity_and_compressed_size(torch_model: Any) -> None:
    from onnxslim_edge.verify import compare

    path = torch_model("resnet")
    original = onnx.load(str(path))
    fidelity = {}
    for sparsity in (0.1, 0.5):
        pruned, report = _run(original, sparsity=sparsity)
        result = compare(original, pruned, max_samples=4)
        metrics = next(iter(result.outputs.values()))
        assert metrics.max_abs_error > 0  # it did change the outputs
        fidelity[sparsity] = metrics.cosine
        c = report.counters
        assert c["model_zip_bytes_after"] < c["model_zip_bytes_before"]
        assert c["zip_bytes_after"] < c["zip_bytes_before"]
        raw_before = len(zlib.compress(original.SerializeToString()))
        raw_after = len(zlib.compress(pruned.SerializeToString()))
        assert raw_after < raw_before
    assert fidelity[0.1] > 0.99
    assert fidelity[0.5] < fidelity[0.1]


def test_registry_spec_and_config_errors() -> None:
    assert get_pass("prune-magnitude") is PruneMagnitude
    p = parse_pass_spec("prune-magnitude:sparsity=0.3,scope=global,ops=Conv|Gemm")
    assert (p.config.sparsity, p.config.scope, p.config.ops) == (0.3, "global", ("Conv", "Gemm"))
    with pytest.raises(ConfigError, match=r"sparsity: must be in \[0, 1\), got 1.5"):
        PruneMagnitude(sparsity=1.5)
    with pytest.raises(ConfigError, match="criterion"):
        PruneMagnitude(criterion="l3")
    with pytest.raises(ConfigError, match="unsupported Relu; valid: Conv"):
        PruneMagnitude(ops=("Relu",))
    with pytest.raises(ConfigError, match="group_size: expected an integer >= 1"):
        PruneMagnitude(group_size=0)


# --------------------------------------------------------------------------- property


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(4, 8), (16, 3), (8, 4, 3, 3), (6, 12, 1, 1), (2, 5, 7)]),
    sparsity=st.floats(0.0, 0.95),
    criterion=st.sampled_from(["l1", "group_l2"]),
    seed=st.integers(0, 1000),
)
def test_property_exact_zero_count(
    shape: tuple[int, ...], sparsity: float, criterion: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    op = "Conv" if len(shape) == 4 else "MatMul"
    axis = 1 if op == "Conv" else len(shape) - 2
    weight = gs.Constant("W", w.copy())
    x, y = gs.Variable("x", np.float32), gs.Variable("y", np.float32)
    graph = gs.Graph(
        nodes=[gs.Node(op, "n", inputs=[x, weight], outputs=[y])], inputs=[x], outputs=[y]
    )
    report = PruneMagnitude(sparsity=sparsity, criterion=criterion, group_size=2).run(
        graph, Context()
    )
    new = np.asarray(weight.values)
    if criterion == "group_l2" and shape[axis] % 2:
        assert report.skips and np.array_equal(new, w)
        return
    unit = 1 if criterion == "l1" else 2
    k = target_units(sparsity, w.size // unit)
    assert np.count_nonzero(new == 0) == k * unit
    kept = new != 0
    np.testing.assert_array_equal(new[kept], w[kept])
    if criterion == "group_l2":
        groups = reduction_groups(new, axis, 2).reshape(-1, 2)
        assert ((groups == 0).all(axis=1) | (groups != 0).all(axis=1)).all()


def test_docs_sparsity_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = Path(__file__).resolve().parents[3] / "docs" / "sparsity.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {"__name__": "sparsity_doc"})


def test_constant_node_weights_are_pruned_unless_read_elsewhere() -> None:
    rng = np.random.default_rng(5)
    a, b = _distinct(rng, (4, 4)), _distinct(rng, (4, 4))
    model = _model(
        [
            helper.make_node("Constant", [], ["A"], name="ca", value=numpy_helper.from_array(a)),
            helper.make_node("Constant", [], ["B"], name="cb", value=numpy_helper.from_array(b)),
            helper.make_node("Identity", ["B"], ["B2"], name="id"),
            helper.make_node("MatMul", ["x", "A"], ["y"], name="mm_a"),
            helper.make_node("MatMul", ["x", "B2"], ["z"], name="mm_b"),
        ],
        {},
        [_vi("x", [4, 4])],
        [_vi("y", [4, 4]), _vi("z", [4, 4]), _vi("B", [4, 4])],
    )
    pruned, report = _run(model, sparsity=0.25)
    assert [(s.node, s.reason) for s in report.skips] == [("mm_b", "weight 'B' is a graph output")]
    values = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in pruned.graph.node
        if n.op_type == "Constant"
    }
    np.testing.assert_array_equal(values["B"], b)
    assert np.count_nonzero(values["A"] == 0) == 4
    np.testing.assert_array_equal(values["A"][values["A"] != 0], a[values["A"] != 0])
