"""A pass on its own: callable, measured like in a pipeline, never changing its input;
pipelines nest and iterate to a fixed point; shape inference runs once per model state."""

from __future__ import annotations

import ast
import itertools
from importlib.resources import files
from pathlib import Path

import numpy as np
import onnx
import onnx.shape_inference
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim_edge
from onnxslim_edge import ConfigError, Context, Pass, PassReport, PassResult, Pipeline, create_pass
from onnxslim_edge.graph import clear_shapes_cache

MEASURED = (
    "modified",
    "nodes_before",
    "nodes_after",
    "nodes_added",
    "nodes_removed",
    "cost_before",
    "cost_after",
    "counters",
)


def _identity_chain(n: int = 3) -> onnx.ModelProto:
    """x -> Identity x n -> Relu -> Gemm(w) -> y."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "w")
    names = ["x", *(f"i{k}" for k in range(n))]
    nodes = [
        helper.make_node("Identity", [a], [b], name=f"id{k}")
        for k, (a, b) in enumerate(itertools.pairwise(names))
    ]
    nodes += [
        helper.make_node("Relu", [names[-1]], ["r"], name="relu"),
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


class DropOneIdentity(Pass):
    """Bypasses the first Identity node only (a fixture needing several rounds). Exact."""

    name = "drop-one-identity"
    lossless = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        report = self.new_report()
        for node in graph.nodes:
            if node.op == "Identity":
                src, dst = node.inputs[0], node.outputs[0]
                for consumer in list(dst.outputs):
                    consumer.inputs[consumer.inputs.index(dst)] = src
                node.outputs.clear()
                report.count("dropped")
                break
        return report


class Lossy(Pass):
    name = "lossy"

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        return self.new_report()


def test_a_pass_alone_reports_what_it_changed_and_leaves_its_input_alone() -> None:
    model = _identity_chain()
    before = model.SerializeToString()
    result = create_pass("cleanup")(model)
    assert isinstance(result, PassResult)
    assert model.SerializeToString() == before
    assert result.modified is True and result.report.modified is True
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Gemm"]
    rep = result.report
    assert (rep.nodes_before, rep.nodes_after, rep.nodes_removed, rep.nodes_added) == (5, 2, 3, 0)
    assert rep.cost_before["nodes"] == 5 and rep.cost_after["nodes"] == 2
    assert rep.validation is not None and rep.validation["passed"]  # lossless: compared
    assert rep.wall_time_s > 0


def test_the_same_numbers_alone_and_in_a_pipeline() -> None:
    alone = create_pass("cleanup")(_identity_chain()).report
    piped = Pipeline(["cleanup"]).run(_identity_chain()).report.passes[0]
    assert {k: getattr(alone, k) for k in MEASURED} == {k: getattr(piped, k) for k in MEASURED}


def test_a_pass_takes_a_path_or_a_graph(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_identity_chain(), str(path))
    assert create_pass("cleanup")(path).report.nodes_removed == 3
    graph = gs.import_onnx(_identity_chain())
    ops = [n.op for n in graph.nodes]
    result = create_pass("cleanup")(graph)
    assert result.report.nodes_removed == 3
    assert [n.op for n in graph.nodes] == ops  # the caller's graph is not changed


def test_a_pass_that_changes_nothing_returns_unmodified() -> None:
    once = create_pass("cleanup")(_identity_chain()).model
    again = create_pass("cleanup")(once)
    assert again.modified is False and again.report.validation is None
    assert again.report.cost_after == again.report.cost_before
    assert again.model.SerializeToString() == once.SerializeToString()


def test_pipelines_nest() -> None:
    inner = Pipeline([DropOneIdentity(), DropOneIdentity()])
    result = Pipeline([inner, "cleanup"]).run(_identity_chain())
    outer_first, outer_second = result.report.passes
    assert outer_first.name == "pipeline" and outer_first.modified
    assert [p.name for p in outer_first.passes] == ["drop-one-identity"] * 2
    assert outer_first.nodes_removed == 2 and outer_first.nodes_after == 3
    assert outer_second.name == "cleanup" and outer_second.nodes_removed == 1
    assert result.modified and [n.op_type for n in result.model.graph.node] == ["Relu", "Gemm"]
    assert inner.lossless is True


def test_a_pipeline_is_callable_like_a_pass() -> None:
    model = _identity_chain()
    before = model.SerializeToString()
    result = Pipeline([DropOneIdentity()])(model)
    assert result.modified and result.report.passes[0].nodes_removed == 1
    assert model.SerializeToString() == before


def test_fixed_point_repeats_until_nothing_changes() -> None:
    result = Pipeline([DropOneIdentity()], fixed_point=True, max_iterations=8).run(
        _identity_chain(3)
    )
    assert [p.modified for p in result.report.passes] == [True, True, True, False]
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Gemm"]
    capped = Pipeline([DropOneIdentity()], fixed_point=True, max_iterations=2).run(
        _identity_chain(3)
    )
    assert [p.modified for p in capped.report.passes] == [True, True]
    once = Pipeline([DropOneIdentity()]).run(_identity_chain(3))
    assert len(once.report.passes) == 1


def test_fixed_point_needs_lossless_passes() -> None:
    with pytest.raises(
        ConfigError, match=r"^fixed_point needs lossless passes; not lossless: lossy$"
    ):
        Pipeline([DropOneIdentity(), Lossy()], fixed_point=True)
    with pytest.raises(ConfigError, match=r"^max_iterations must be >= 1, not 0$"):
        Pipeline([DropOneIdentity()], fixed_point=True, max_iterations=0)


def test_shape_inference_runs_once_per_model_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """cleanup -> fold-batchnorm -> cleanup on the digits CNN: three model states (the
    input, after cleanup, after fold-batchnorm; the last cleanup changes nothing), so
    three inferences, though every pass and every cost asks for shapes."""
    calls = []
    real = onnx.shape_inference.infer_shapes

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", counting)
    clear_shapes_cache()
    model = onnx.load(str(files("onnxslim_edge") / "assets" / "digits_cnn.onnx"))
    result = Pipeline(["cleanup", "fold-batchnorm", "cleanup"]).run(model)
    assert [p.modified for p in result.report.passes] == [True, True, False]
    assert len(calls) == 3


def test_context_has_no_half_used_cache_or_rng() -> None:
    ctx = Context()
    for name in ("cached", "invalidate", "rng"):
        assert not hasattr(ctx, name), name
    assert not hasattr(Pass, "preserves")


def test_cleanup_restores_the_onnx_runtime_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    from onnxslim_edge import runtime

    levels = []
    real = ort.set_default_logger_severity
    monkeypatch.setattr(ort, "set_default_logger_severity", lambda v: levels.append(v) or real(v))
    runtime.set_ort_log_severity(4)
    try:
        # a constant subgraph to fold: Add(c, c) -> Relu
        c = numpy_helper.from_array(np.ones((2, 2), np.float32), "c")
        graph = helper.make_graph(
            [
                helper.make_node("Add", ["c", "c"], ["s"]),
                helper.make_node("Add", ["x", "s"], ["y"]),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
            [c],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        assert create_pass("cleanup")(model).report.counters["folded"] == 1
        assert 3 in levels  # quiet while gs folds
        assert levels[-1] == 4  # the level before, not ONNX Runtime's default
    finally:
        runtime.set_ort_log_severity(2)


def test_prune_channels_documents_the_targets_round_to() -> None:
    from onnxslim_edge.context import TARGETS
    from onnxslim_edge.passes.prune.channels import PruneChannelsConfig

    doc = " ".join((PruneChannelsConfig.__doc__ or "").split())
    for target in TARGETS.values():
        assert f"{target.round_to} for {target.name}" in doc, target


# --------------------------------------------------------------------------- layering

#: Modules of the core that may load passes: the registry's discovery.
DISCOVERY = {"onnxslim_edge/registry.py"}


def _imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):  # every level: function-local imports included
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(str(node.args[0].value))
    return found


def test_the_core_never_imports_the_passes() -> None:
    package = Path(onnxslim_edge.__file__).resolve().parent
    root = package.parent
    violations = set()
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("onnxslim_edge/passes/") or rel in DISCOVERY:
            continue
        for name in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if name == "onnxslim_edge.passes" or name.startswith("onnxslim_edge.passes."):
                violations.add((rel, name))
    assert violations == set()
    assert len(list(package.rglob("*.py"))) > 10  # the scan saw the package
