"""Per-layer sensitivity and the automatic fallback of `quantize` to a fidelity floor."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from fixtures import torch_models

from onnxslim_edge.passes.quantize.qdq import Quantize, QuantizeConfig
from onnxslim_edge.passes.quantize.sensitivity import layer_sensitivity
from onnxslim_edge.pipeline import Context, FidelityError, Pipeline
from onnxslim_edge.verify import Evaluator


@pytest.fixture(scope="module")
def resnet(torch_model):
    model = onnx.load(torch_model("resnet"))
    data = [{"x": torch_models.example_input("resnet", seed=s, batch=None)} for s in range(8)]
    return model, data


def _run(model, data, **options):
    result = Pipeline([Quantize(**options)]).run(model, Context(data=data))
    return result.model, result.report.passes[0]


def test_layer_sensitivity_ranks_every_layer(resnet):
    model, data = resnet
    config = QuantizeConfig(method="minmax")
    ranking = layer_sensitivity(model, data, quantize_config=config, target="tensorrt")
    convs = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert sorted(r.node for r in ranking) == sorted(convs)
    sqnrs = [r.sqnr_db for r in ranking]
    assert sqnrs == sorted(sqnrs)  # most sensitive (lowest SQNR) first
    assert all(math.isfinite(s) and s > 10 for s in sqnrs)
    assert all(0.9 < r.cosine <= 1.0 for r in ranking)
    assert all(r.kl_divergence is not None and r.kl_divergence >= 0 for r in ranking)
    # the single-layer SQNR is what the Evaluator measures on the model built by hand
    worst = ranking[0].node
    others = tuple(n for n in convs if n != worst)
    alone, _ = _run(model, data, method="minmax", exclude_nodes=others)
    fid = Evaluator(model, data).score(alone)
    assert fid.sqnr_db == pytest.approx(ranking[0].sqnr_db, abs=1e-6)


def test_kl_metric_orders_by_divergence(resnet):
    model, data = resnet
    ranking = layer_sensitivity(
        model, data, quantize_config=QuantizeConfig(method="minmax"), metric="kl"
    )
    kls = [r.kl_divergence for r in ranking]
    assert kls == sorted(kls, reverse=True)


def test_unreachable_floor_raises(resnet):
    model, data = resnet
    with pytest.raises(FidelityError, match=r"cannot meet min_sqnr_db=200 with 2 layer\(s\)"):
        _run(model, data, method="minmax", min_sqnr_db=200.0, fallback_max_layers=2)


def test_floor_met_after_fallback_reports_it(resnet):
    model, data = resnet
    evaluator = Evaluator(model, data)
    _, base_report = _run(model, data, method="minmax")
    full = evaluator.score(_run(model, data, method="minmax")[0])
    ranking = layer_sensitivity(model, data, quantize_config=QuantizeConfig(method="minmax"))
    worst = ranking[0].node
    one_off = evaluator.score(_run(model, data, method="minmax", exclude_nodes=(worst,))[0])
    assert one_off.sqnr_db > full.sqnr_db  # keeping the worst layer in float helps
    floor = (full.sqnr_db + one_off.sqnr_db) / 2
    q, report = _run(model, data, method="minmax", min_sqnr_db=floor)
    assert report.counters["fallback_layers"] == 1
    kept = [s for s in report.skips if s.reason.startswith("kept in float by fallback")]
    assert [s.node for s in kept] == [worst]
    assert f"{ranking[0].sqnr_db:.1f} dB" in kept[0].reason
    summary = next(d for d in report.details if "fidelity" in d)
    assert summary["kept_float"] == [worst] and summary["fidelity"]["sqnr_db"] >= floor
    assert evaluator.score(q).sqnr_db == pytest.approx(one_off.sqnr_db, abs=1e-6)
    assert report.counters["layers_quantized"] == base_report.counters["layers_quantized"] - 1


def test_floor_already_met_keeps_everything(resnet):
    model, data = resnet
    _, report = _run(model, data, method="minmax", min_cosine=0.5, min_top1_agreement=0.5)
    assert "fallback_layers" not in report.counters or report.counters["fallback_layers"] == 0
    summary = next(d for d in report.details if "fidelity" in d)
    assert summary["kept_float"] == [] and summary["fidelity"]["cosine"] > 0.99


def test_digits_fallback_on_top1_floor():
    from onnxslim_edge.demo import DIGITS_MODEL, load_digits_test

    images, _ = load_digits_test()
    model = onnx.load(DIGITS_MODEL)
    data = [{"image": images[:32]}, {"image": images[32:64]}]
    q, report = _run(model, data, min_top1_agreement=1.0, min_sqnr_db=25.0)
    summary = next(d for d in report.details if "fidelity" in d)
    assert summary["fidelity"]["top1_agreement"] == 1.0
    assert summary["fidelity"]["sqnr_db"] >= 25.0
    assert np.isfinite(Evaluator(model, data).score(q).sqnr_db)


def _dynamic_conv():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    data = [
        {"x": rng.standard_normal((1, 3, 8, 8 + 4 * (i % 3))).astype(np.float32)} for i in range(7)
    ]
    return model, data


def test_floor_with_batches_of_different_shapes():
    model, data = _dynamic_conv()
    q, report = _run(model, data, method="minmax", min_cosine=0.99)
    summary = next(d for d in report.details if "fidelity" in d)
    # the fidelity is the one over every element of every sample, whatever their shapes
    ref = [make_session_run(model, f) for f in data]
    got = [make_session_run(q, f) for f in data]
    r = np.concatenate([a.ravel() for a in ref]).astype(np.float64)
    c = np.concatenate([a.ravel() for a in got]).astype(np.float64)
    assert summary["fidelity"]["cosine"] == pytest.approx(r @ c / np.sqrt((r @ r) * (c @ c)))
    sqnr = 10 * math.log10((r @ r) / ((r - c) @ (r - c)))
    assert summary["fidelity"]["sqnr_db"] == pytest.approx(sqnr, rel=1e-9)
    ranking = layer_sensitivity(model, data, quantize_config=QuantizeConfig(method="minmax"))
    assert [x.node for x in ranking] == ["conv"] and ranking[0].sqnr_db == pytest.approx(sqnr)


def make_session_run(model, feed):
    from onnxslim_edge.runtime import make_session

    return make_session(model).run(None, feed)[0]


def test_evaluator_top1_over_rows_of_batches_of_different_sizes():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    flip = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])], "g", graph.input, graph.output
    )
    negated = helper.make_model(flip, opset_imports=[helper.make_opsetid("", 13)])
    negated.ir_version = 7
    feeds = [
        {"x": np.array([[0, 1, 2]], np.float32)},
        {"x": np.array([[2, 1, 0], [1, 0, 2], [0, 2, 1]], np.float32)},
    ]
    assert Evaluator(model, feeds).score(model).top1_agreement == 1.0
    fid = Evaluator(model, feeds).score(negated)
    assert fid.top1_agreement == 0.0 and fid.cosine == pytest.approx(-1.0)
