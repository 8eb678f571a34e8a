"""Pass framework: config validation, registry, recipes, reports, pipeline contract."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge import pipeline as pl
from onnxslim_edge import registry
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.pipeline import (
    Context,
    FidelityError,
    Pass,
    Pipeline,
    create_pass,
    get_pass,
    load_recipe,
    parse_pass_spec,
)


def _model() -> onnx.ModelProto:
    """x -> Identity -> Relu -> Gemm(w) -> y."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "w")
    nodes = [
        helper.make_node("Identity", ["x"], ["a"], name="id"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@dataclass(frozen=True, kw_only=True)
class ScaleConfig:
    factor: float = 1.0
    mode: Literal["weights", "none"] = "weights"
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ConfigError(f"scale.factor must be > 0, got {self.factor}")


class ScaleWeights(Pass):
    """Multiply Gemm weights by `factor`. Lossless only when factor == 1 (a test fixture)."""

    name = "scale-weights"
    Config = ScaleConfig
    lossless = True

    def run(self, graph: gs.Graph, ctx: Context) -> pl.PassReport:
        report = self.new_report()
        for node in graph.nodes:
            if node.op == "Gemm" and self.config.mode == "weights" and self.config.factor != 1.0:
                w = node.inputs[1]
                node.inputs[1] = gs.Constant(
                    w.name + "_scaled", np.asarray(w.values * self.config.factor)
                )
                report.count("scaled")
            elif node.op != "Gemm":
                report.skip(node, "not a Gemm")
        return report


class DropIdentity(Pass):
    """Identity -> removed. Exact."""

    name = "drop-identity"
    lossless = True

    def run(self, graph: gs.Graph, ctx: Context) -> pl.PassReport:
        report = self.new_report()
        for node in [n for n in graph.nodes if n.op == "Identity"]:
            src = node.inputs[0]
            for consumer in list(node.outputs[0].outputs):
                consumer.inputs[consumer.inputs.index(node.outputs[0])] = src
            node.outputs.clear()
        return report


def test_config_coercion_from_strings() -> None:
    p = ScaleWeights(factor="2.5", mode="none", names="a|b")
    assert p.config == ScaleConfig(factor=2.5, mode="none", names=("a", "b"))


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"fator": 2}, "unknown option(s) fator; valid: factor, mode, names"),
        ({"factor": "abc"}, "expected a number"),
        ({"factor": -1}, "must be > 0"),
        ({"mode": "all"}, "is not one of 'weights', 'none'"),
    ],
)
def test_config_errors_name_the_problem(options: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        ScaleWeights(**options)
    assert fragment in str(info.value)


def test_registry_and_specs() -> None:
    assert {"cleanup", "fold-batchnorm"} <= set(pl.available_passes())
    assert get_pass("cleanup").name == "cleanup"
    with pytest.raises(ConfigError, match=r"unknown pass 'nope'; available: .*cleanup"):
        create_pass("nope")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_pass_spec("cleanup:fold_constants")
    p = parse_pass_spec("cleanup:fold_constants=false")
    assert p.config.fold_constants is False


def test_entry_point_passes_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    class EP:
        name = "scale-weights"

        def load(self):
            return ScaleWeights

    monkeypatch.setattr(registry, "_entry_points", lambda: {"scale-weights": EP()})
    assert "scale-weights" in pl.available_passes()
    assert isinstance(create_pass("scale-weights", factor=3), ScaleWeights)


def test_recipe_parsing(tmp_path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(
        'target = "onnxruntime-cpu"\n[[pass]]\nname = "cleanup"\nmerge_constants = false\n'
        '[[pass]]\nname = "fold-batchnorm"\n[verify]\nmin_cosine = 0.99\n'
    )
    recipe = load_recipe(path)
    assert [p.name for p in recipe.passes] == ["cleanup", "fold-batchnorm"]
    assert recipe.passes[0].config.merge_constants is False
    assert recipe.target == "onnxruntime-cpu"
    assert recipe.floors == {"min_cosine": 0.99}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[[pass]]\nname = "cleanup"\nbogus = 1\n', "unknown option(s) bogus; valid:"),
        ("[[pass]]\nfold_constants = true\n", "has no name"),
        ("passes = []\n", "unknown key(s) passes; valid: pass, target, verify"),
        ('target = "gpu"\n', "unknown target 'gpu'"),
        ("[verify]\nmin_top5 = 0.9\n", "unknown [verify] key(s) min_top5"),
        ("[[pass]\n", "not valid TOML"),
    ],
)
def test_recipe_errors(tmp_path, text: str, fragment: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert fragment in str(info.value)


def test_pipeline_never_changes_the_callers_model() -> None:
    model = _model()
    before = model.SerializeToString()
    result = Pipeline([DropIdentity()]).run(model)
    assert model.SerializeToString() == before
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Gemm"]


def test_model_input_copies_only_what_the_caller_still_owns(tmp_path, monkeypatch) -> None:
    from onnxslim_edge import base

    model = _model()
    assert base.model_input(model, copy=False) is model  # handed over
    private = base.model_input(model)
    assert private is not model and private.SerializeToString() == model.SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    loaded = []
    real = base.load_model
    monkeypatch.setattr(base, "load_model", lambda src: loaded.append(real(src)) or loaded[-1])
    assert base.model_input(str(path)) is loaded[-1]  # read from a file: private already
    assert base.model_input(path.read_bytes()) is loaded[-1]


def test_pipeline_without_a_copy_gives_the_same_result_and_leaves_the_model() -> None:
    model = _model()
    before = model.SerializeToString()
    handed = Pipeline([DropIdentity()]).run(model, copy=False)
    copied = Pipeline([DropIdentity()]).run(_model())
    assert model.SerializeToString() == before  # the passes still never write to it
    assert handed.model.SerializeToString() == copied.model.SerializeToString()


def test_report_counts_come_from_real_changes() -> None:
    result = Pipeline([DropIdentity(), DropIdentity()]).run(_model())
    first, second = result.report.passes
    assert (first.modified, first.nodes_removed, first.nodes_added) == (True, 1, 0)
    assert (first.nodes_before, first.nodes_after) == (3, 2)
    assert first.validation is not None and first.validation["passed"]
    assert (second.modified, second.nodes_removed) == (False, 0)
    assert second.validation is None
    assert result.report.cost_before["nodes"] == 3 and result.report.cost_after["nodes"] == 2


def test_lossless_pass_that_changes_outputs_is_caught() -> None:
    with pytest.raises(FidelityError, match="lossless pass 'scale-weights' changed the outputs"):
        Pipeline([ScaleWeights(factor=1.001)]).run(_model())
    # the same change passes when checking is off, and the report records it
    result = Pipeline([ScaleWeights(factor=1.001)], verify_lossless=False).run(_model())
    rep = result.report.passes[0]
    assert rep.modified and rep.counters == {"scaled": 1}
    assert {(s.node, s.reason) for s in rep.skips} == {("id", "not a Gemm"), ("relu", "not a Gemm")}


def test_noop_config_reports_unmodified() -> None:
    result = Pipeline([ScaleWeights(factor=1.0)]).run(_model())
    assert result.report.passes[0].modified is False


def test_report_renders_as_json_and_table() -> None:
    result = Pipeline([DropIdentity()]).run(_model())
    data = json.loads(result.report.to_json())
    assert data["passes"][0]["name"] == "drop-identity"
    assert data["passes"][0]["nodes_removed"] == 1
    assert {"nodes", "params", "size_bytes", "macs"} <= set(data["cost_before"])
    table = result.report.to_table()
    assert "drop-identity" in table and "before" in table and "equal" in table


def test_floors_are_enforced() -> None:
    ok = Pipeline([DropIdentity()], floors={"min_cosine": 0.999}).run(_model())
    assert ok.report.fidelity is not None and ok.report.fidelity["floors_missed"] == []
    with pytest.raises(FidelityError, match="fidelity floor missed"):
        Pipeline(
            [ScaleWeights(factor=-0.5 + 1.0)], verify_lossless=False, floors={"max_abs_error": 1e-6}
        ).run(_model())


def test_unknown_target() -> None:
    with pytest.raises(ConfigError, match="unknown target"):
        Context(target="jetson")


def test_skips_of_unnamed_nodes_name_what_they_compute() -> None:
    """An unnamed node's skip reads `Pad -> p`, not the node's multi-line repr."""
    from onnxslim_edge.report import PassReport

    report = PassReport(name="t")
    report.skip(gs.Node(op="Pad", inputs=[], outputs=[gs.Variable("p")]), "not constant")
    report.skip(helper.make_node("Relu", ["a"], ["b"]), "proto")
    report.skip(gs.Node(op="Relu", name="r1"), "named")
    report.skip("by name", "text")
    assert [(s.node, s.op) for s in report.skips] == [
        ("Pad -> p", "Pad"),
        ("Relu -> b", "Relu"),
        ("r1", "Relu"),
        ("by name", ""),
    ]
