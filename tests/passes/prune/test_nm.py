"""sparsify-nm and check_nm: the 2:4 pattern along the reduction axis of Conv (Cin),
Gemm (K; transB 0 and 1) and MatMul (K), skips with reasons (Cin % 4, depthwise,
grouped), the checker on dense and on quantized models, CLI and Pipeline end to end.

Patterns are checked independently of the code under test: the weight is regrouped
with numpy along the axis the op reduces over, and every group of 4 must hold >= 2
zeros, keep its 2 largest |w| bit-identical and zero the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge import cli
from onnxslim_edge.analysis.sparsity_nm import NMResult, check_nm, format_nm_results
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.passes.prune.nm import SparsifyNM, nm_prune
from onnxslim_edge.pipeline import Context, Pipeline, get_pass
from onnxslim_edge.runtime import make_session

# --------------------------------------------------------------------------- helpers


def _vi(name: str, shape: list) -> Any:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(nodes: list, inits: dict[str, np.ndarray], inputs: list, outputs: list) -> Any:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _layer(kind: str, seed: int = 0, cin: int = 8) -> tuple[Any, int]:
    """A one-layer model of `kind` and the axis of its weight "W" that the layer reduces over."""
    rng = np.random.default_rng(seed)
    if kind == "conv":
        w = rng.standard_normal((8, cin, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "W"], ["y"], name="layer", pads=[1, 1, 1, 1])
        return _model([node], {"W": w}, [_vi("x", [1, cin, 5, 5])], [_vi("y", [1, 8, 5, 5])]), 1
    if kind in ("gemm", "gemm_t"):
        trans = kind == "gemm_t"
        w = rng.standard_normal((8, cin) if trans else (cin, 8)).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "W"], ["y"], name="layer", transB=int(trans))
        return _model([node], {"W": w}, [_vi("x", [2, cin])], [_vi("y", [2, 8])]), int(trans)
    if kind == "matmul":
        w = rng.standard_normal((cin, 8)).astype(np.float32)
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="layer")
        return _model([node], {"W": w}, [_vi("x", [2, 3, cin])], [_vi("y", [2, 3, 8])]), 0
    if kind == "matmul_batched":
        w = rng.standard_normal((2, cin, 8)).astype(np.float32)
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="layer")
        return _model([node], {"W": w}, [_vi("x", [2, 3, cin])], [_vi("y", [2, 3, 8])]), 1
    raise AssertionError(kind)


def _groups(w: np.ndarray, axis: int, m: int = 4) -> np.ndarray:
    """Groups of m consecutive weights along `axis`, regrouped independently of the pass."""
    moved = np.moveaxis(w, axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m).reshape(-1, m)


def _assert_nm(old: np.ndarray, new: np.ndarray, axis: int, n: int = 2, m: int = 4) -> None:
    g_old, g_new = _groups(old, axis, m), _groups(new, axis, m)
    assert (np.count_nonzero(g_new == 0, axis=1) >= m - n).all()
    # the n largest |w| of each group are kept bit-identical, the rest are zero
    keep = np.argsort(-np.abs(g_old), axis=1, kind="stable")[:, :n]
    expected = np.zeros_like(g_old)
    np.put_along_axis(expected, keep, np.take_along_axis(g_old, keep, axis=1), axis=1)
    np.testing.assert_array_equal(g_new, expected)


def _weight(model: Any, name: str = "W") -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


# --------------------------------------------------------------------------- the pass


@pytest.mark.parametrize("kind", ["conv", "gemm", "gemm_t", "matmul", "matmul_batched"])
def test_pattern_along_the_reduction_axis(kind: str) -> None:
    model, axis = _layer(kind)
    result = Pipeline([SparsifyNM()]).run(model)
    report = result.report.passes[0]
    old, new = _weight(model), _weight(result.model)
    _assert_nm(old, new, axis)
    assert report.counters["layers_sparsified"] == 1
    assert report.counters["weights_zeroed"] == old.size // 2
    assert report.details[0]["reduction_axis"] == axis
    assert [r.ok for r in check_nm(result.model)] == [True]
    assert [r.ok for r in check_nm(model)] == [False]
    # the pattern is along the reduction axis, not any other: regrouping along another
    # axis of the same weight does not give 2 zeros in every group
    other = next(a for a in range(new.ndim) if a != axis and new.shape[a] % 4 == 0)
    assert not (np.count_nonzero(_groups(new, other) == 0, axis=1) >= 2).all()
    # the model still runs and computes with the sparse weights: compare with ORT on
    # the original model given the sparse weight
    feed = {"x": np.random.default_rng(1).standard_normal(_shape(model, "x")).astype(np.float32)}
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    swapped.graph.initializer[0].CopyFrom(numpy_helper.from_array(new, "W"))
    got = make_session(result.model).run(None, feed)[0]
    want = make_session(swapped).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    onnx.checker.check_model(result.model, full_check=True)


def _shape(model: Any, name: str) -> list[int]:
    vi = next(v for v in model.graph.input if v.name == name)
    return [d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_ties_and_idempotence() -> None:
    w = np.array([[1, -1, 1, -1], [3, 0, 2, 2], [5, 4, 4, 5]], np.float32).T  # K=4 on axis 0
    assert np.array_equal(
        nm_prune(w, 0, 2, 4).T,
        np.array([[0, 0, 1, -1], [3, 0, 0, 2], [5, 0, 0, 5]], np.float32),
    )  # equal |w|: the lower index is zeroed first; an existing zero counts
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        {"W": w},
        [_vi("x", [2, 4])],
        [_vi("y", [2, 3])],
    )
    once = Pipeline([SparsifyNM()]).run(model)
    twice = Pipeline([SparsifyNM()]).run(once.model)
    assert twice.report.passes[0].modified is False
    assert twice.report.passes[0].counters["weights_zeroed"] == 0


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 8)])
def test_other_ratios(n: int, m: int) -> None:
    model, axis = _layer("conv", cin=16)
    result = Pipeline([SparsifyNM(n=n, m=m)]).run(model)
    _assert_nm(_weight(model), _weight(result.model), axis, n, m)
    assert all(r.ok for r in check_nm(result.model, n, m))
    assert not all(r.ok for r in check_nm(result.model, 1, m)) or n == 1


def test_layers_that_cannot_qualify_are_skipped_with_reason() -> None:
    rng = np.random.default_rng(0)
    inits = {
        "W6": rng.standard_normal((8, 6, 3, 3)).astype(np.float32),  # Cin 6
        "Wdw": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),  # depthwise
        "Wg": rng.standard_normal((8, 4, 1, 1)).astype(np.float32),  # 2 groups of 4
        "G": rng.standard_normal((8, 10)).astype(np.float32),  # K 10 (transB=1)
    }
    nodes = [
        helper.make_node("Conv", ["x", "W6"], ["a"], name="cin6", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "Wdw"], ["b"], name="dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Conv", ["b", "Wg"], ["c"], name="grouped", group=2),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "f_w"], ["h"], name="dynamic"),
    ]
    nodes.append(helper.make_node("Gemm", ["h", "G"], ["y"], name="k10", transB=1))
    model = _model(
        [helper.make_node("Transpose", ["fw_in"], ["f_w"], name="tr", perm=[1, 0]), *nodes],
        inits,
        [_vi("x", [1, 6, 5, 5]), _vi("fw_in", [10, 8])],
        [_vi("y", [1, 8])],
    )
    result = Pipeline([SparsifyNM()]).run(model)
    report = result.report.passes[0]
    reasons = {
        "cin6": "reduction dim Cin=6 is not divisible by 4",
        "dw": "depthwise convolution (group=8, 1 input channel per group)",
        "grouped": "grouped convolution (group=2): sparse kernels need group=1",
        "dynamic": "weight 'f_w' is not a constant (computed by Transpose 'tr')",
        "k10": "reduction dim K=10 is not divisible by 4",
    }
    assert {s.node: s.reason for s in report.skips} == reasons
    assert report.modified is False
    checked = check_nm(model)
    assert [(r.node, r.ok, r.reason) for r in checked] == [
        (name, False, reason) for name, reason in reasons.items()
    ]
    # shapes that can never hold 2:4 are not applicable; a weight not folded yet could
    assert [r.node for r in checked if r.violation] == ["dynamic"]
    assert [r.node for r in checked if not r.applicable] == ["cin6", "dw", "grouped", "k10"]
    assert format_nm_results(checked).endswith(
        "0 of 1 layers follow 2:4 sparsity; 4 not applicable (run dense)"
    )


def test_shared_weight_sparsified_once_and_other_readers_block_it() -> None:
    w = np.random.default_rng(2).standard_normal((8, 8)).astype(np.float32)
    shared = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
            helper.make_node("MatMul", ["h", "W"], ["y"], name="mm2"),
        ],
        {"W": w},
        [_vi("x", [2, 8])],
        [_vi("y", [2, 8])],
    )
    result = Pipeline([SparsifyNM()]).run(shared)
    report = result.report.passes[0]
    assert report.counters == {
        "layers_sparsified": 1,
        "params_considered": 64,
        "weights_zeroed": 32,
    }
    _assert_nm(w, _weight(result.model), 0)
    # the same weight also read by a Gemm with transB=1 would need another axis
    mixed = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Gemm", ["h", "W"], ["y"], name="gemm", transB=1),
        ],
        {"W": w},
        [_vi("x", [2, 8])],
        [_vi("y", [2, 8])],
    )
    report = Pipeline([SparsifyNM()]).run(mixed).report.passes[0]
    assert report.modified is False
    assert {s.reason for s in report.skips} == {"shared weight 'W' is reduced along different axes"}


# --------------------------------------------------------------------------- checker


def test_checker_on_a_dense_model_names_the_node_and_counts_groups() -> None:
    model, _ = _layer("gemm_t", cin=8)  # W (8, 8): 16 groups along K
    w = _weight(model).copy()
    w[:3, 0:2] = 0  # rows 0..2: first group of K is 2:4; 3 of 12 groups OK
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    [result] = check_nm(model)
    assert result == NMResult(
        "layer", "Gemm", False, "13 of 16 groups of 4 along K have more than 2 nonzeros", 0.1875, 16
    )
    table = format_nm_results([result])
    assert "layer" in table and table.endswith("0 of 1 layers follow 2:4 sparsity")


def test_checker_reads_dequantized_int8_weights(tmp_path: Path) -> None:
    q = np.random.default_rng(0).integers(-127, 128, (8, 8, 1, 1)).astype(np.int8)
    q[q == 0] = 1
    q_sparse = nm_prune(q.astype(np.float32), 1, 2, 4).astype(np.int8)
    for weights, ok in ((q, False), (q_sparse, True)):
        model = _model(
            [
                helper.make_node("DequantizeLinear", ["q", "s", "z"], ["W"], name="dq", axis=0),
                helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
            ],
            {"q": weights, "s": np.full(8, 0.02, np.float32), "z": np.zeros(8, np.int8)},
            [_vi("x", [1, 8, 3, 3])],
            [_vi("y", [1, 8, 3, 3])],
        )
        path = tmp_path / "q.onnx"
        onnx.save(model, str(path))
        [result] = check_nm(path)  # from a path, as the CLI would
        assert (result.node, result.ok) == ("conv", ok)
        # the pass itself leaves quantized weights alone
        report = Pipeline([SparsifyNM()]).run(model).report.passes[0]
        assert report.skips[0].reason == "weight 'W' is quantized (DequantizeLinear output)"


def test_config_errors() -> None:
    assert get_pass("sparsify-nm") is SparsifyNM
    with pytest.raises(ConfigError, match="n must be smaller than m, got n=4, m=4"):
        SparsifyNM(n=4, m=4)
    with pytest.raises(ConfigError, match="unsupported ConvTranspose; valid: Conv, Gemm, MatMul"):
        SparsifyNM(ops=("ConvTranspose",))
    with pytest.raises(ConfigError, match="n must be smaller than m"):
        check_nm(onnx.ModelProto(), n=3, m=2)


# --------------------------------------------------------------------------- end to end


def test_cli_end_to_end_on_resnet(torch_model: Any, tmp_path: Path, capsys: Any) -> None:
    src = torch_model("resnet")
    out = tmp_path / "resnet_24.onnx"
    rc = cli.main(["optimize", str(src), "-o", str(out), "--pass", "sparsify-nm", "--quiet"])
    assert rc == 0 and out.is_file()
    results = {r.node: r for r in check_nm(out)}
    assert results.pop("/stem/stem.0/Conv").reason == "reduction dim Cin=3 is not divisible by 4"
    assert len(results) == 6 and all(r.ok for r in results.values())
    assert not any(r.ok for r in check_nm(src))


@pytest.mark.parametrize("arch", ["mobilenetv2", "transformer", "mlp"])
def test_pipeline_on_torch_models(torch_model: Any, arch: str) -> None:
    from onnxslim_edge.verify import compare

    original = onnx.load(str(torch_model(arch)))
    if arch == "transformer":  # exported unfolded: MatMul(x, Transpose(W))
        report = Pipeline([SparsifyNM()]).run(original).report.passes[0]
        assert report.skips[0].reason == (
            "weight '/q/Transpose_output_0' is not a constant (computed by Transpose "
            "'/q/Transpose'; run 'cleanup' first to fold it)"
        )
    result = Pipeline(["cleanup", SparsifyNM()]).run(original)
    report = result.report.passes[-1]
    checked = check_nm(result.model)
    skipped = {s.node: s.reason for s in report.skips}
    for r in checked:
        assert r.ok == (r.node not in skipped), (r, skipped.get(r.node))
    ops = {r.op for r in checked if r.ok}
    assert (
        ops == {"mobilenetv2": {"Conv", "Gemm"}, "transformer": {"MatMul"}, "mlp": {"Gemm"}}[arch]
    )
    if arch == "mobilenetv2":
        depthwise = [s for s in report.skips if s.reason.startswith("depthwise convolution")]
        assert len(depthwise) == 3
    metrics = next(iter(compare(original, result.model, max_samples=2).outputs.values()))
    assert metrics.max_abs_error > 0 and metrics.cosine > 0.5  # lossy, but not garbage


# --------------------------------------------------------------------------- property


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["Conv", "Gemm0", "Gemm1", "MatMul"]),
    groups=st.integers(1, 4),
    other=st.integers(1, 5),
    nm=st.sampled_from([(2, 4), (1, 4), (4, 8)]),
    seed=st.integers(0, 1000),
)
def test_property_pattern_and_zero_count(
    kind: str, groups: int, other: int, nm: tuple[int, int], seed: int
) -> None:
    n, m = nm
    k = groups * m
    shape, axis, attrs = {
        "Conv": ((other, k, 2, 1), 1, {}),
        "Gemm0": ((k, other), 0, {"transB": 0}),
        "Gemm1": ((other, k), 1, {"transB": 1}),
        "MatMul": ((other, k, 3), 1, {}),
    }[kind]
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    weight = gs.Constant("W", w.copy())
    x, y = gs.Variable("x", np.float32), gs.Variable("y", np.float32)
    op = kind.rstrip("01")
    node = gs.Node(op, "n", attrs=attrs, inputs=[x, weight], outputs=[y])
    graph = gs.Graph(nodes=[node], inputs=[x], outputs=[y])
    report = SparsifyNM(n=n, m=m).run(graph, Context())
    new = np.asarray(weight.values)
    assert np.count_nonzero(new == 0) == w.size // m * (m - n)
    assert report.counters["weights_zeroed"] == w.size // m * (m - n)
    _assert_nm(w, new, axis, n, m)
    [result] = check_nm(graph, n, m)
    assert result.ok and result.fraction_groups_ok == 1.0
