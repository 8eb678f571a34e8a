"""Lossless clean-up: drop Identity/Dropout, dead nodes, fold constants, merge duplicates.

    Identity(x) -> y                      =>  x (consumers of y read x)
    Dropout(x) -> y   (inference, no mask) =>  x
    f(constants...) -> t, t <= budget      =>  initializer t (ONNX Runtime evaluates f)
    initializers with equal dtype, shape and bytes  =>  one initializer

Folding respects a size budget per folded tensor, so ConstantOfShape/Tile/Expand
chains that would bloat the model stay computed at run time.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.passes._graph import (
    const_value,
    infer_shapes,
    is_graph_input,
    is_graph_output,
    output_ids,
    replace_uses,
)
from onnxslim_edge.pipeline import Context, Pass, PassReport

__all__ = ["Cleanup", "CleanupConfig"]

log = logging.getLogger(__name__)

#: Ops whose outputs differ between runs: never folded into constants.
NONDETERMINISTIC_OPS = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)


@dataclass(frozen=True, kw_only=True)
class CleanupConfig:
    """Options of the `cleanup` pass.

    - `fold_constants`: evaluate subgraphs that depend only on constants.
    - `fold_size_limit`: the largest tensor, in bytes, that folding may create.
    - `remove_identity`: bypass Identity nodes and inference-mode Dropout nodes.
    - `merge_constants`: make constants with the same dtype, shape and bytes one.
    """

    fold_constants: bool = True
    fold_size_limit: int = 16 * 2**20
    remove_identity: bool = True
    merge_constants: bool = True

    def __post_init__(self) -> None:
        for key in ("fold_constants", "remove_identity", "merge_constants"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"cleanup.{key}: expected true/false, got {getattr(self, key)!r}")
        limit = self.fold_size_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"cleanup.fold_size_limit: expected a byte count >= 0, got {limit!r}")


class Cleanup(Pass):
    """Identity/Dropout removal, dead-node removal, budgeted constant folding and
    duplicate-constant merging. Exact: removed nodes are copies, merged constants are
    bytewise equal, and folded values are what ONNX Runtime computes for those nodes.

    Graph input and output names never change: an Identity that copies a graph input
    or output to a graph output is kept. Dropout is removed only when it cannot be in
    training mode and its mask output is unused. Nodes producing graph outputs, random
    ops and tensors over `fold_size_limit` bytes are not folded.

    Counters: `identities_removed`, `dropouts_removed`, `dead_nodes_removed`, `folded`
    (nodes replaced by constants), `constants_merged`.
    """

    name: ClassVar[str] = "cleanup"
    Config: ClassVar[type] = CleanupConfig
    lossless: ClassVar[bool] = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        report = self.new_report()
        cfg: CleanupConfig = self.config
        if cfg.remove_identity:
            _remove_copies(graph, report)
        report.count("dead_nodes_removed", _cleanup(graph))
        if cfg.fold_constants:
            _fold(graph, cfg.fold_size_limit, report)
        if cfg.merge_constants:
            _merge_constants(graph, report)
            graph.cleanup()
        for key in ("identities_removed", "dropouts_removed", "folded", "constants_merged"):
            report.count(key, 0)
        return report


# --------------------------------------------------------------------------- copies


def _remove_copies(graph: gs.Graph, report: PassReport) -> None:
    outputs = output_ids(graph)
    for node in list(graph.nodes):
        if node.op == "Identity":
            reason = _bypass(graph, node, outputs)
            if reason:
                report.skip(node, reason)
            else:
                report.count("identities_removed")
        elif node.op == "Dropout":
            reason = _dropout_blocker(graph, node) or _bypass(graph, node, outputs)
            if reason:
                report.skip(node, reason)
            else:
                report.count("dropouts_removed")


def _dropout_blocker(graph: gs.Graph, node: Any) -> str | None:
    """Why this Dropout is not the identity at inference, or None."""
    if graph.opset < 7 and not node.attrs.get("is_test", 0):
        return "Dropout has is_test=0 (training mode before opset 7)"
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        mode = const_value(node.inputs[2])
        if mode is None:
            return "Dropout training_mode is not a constant"
        if mode.size != 1 or bool(mode.reshape(-1)[0]):
            return "Dropout training_mode is true"
    for mask in node.outputs[1:]:
        if not mask.is_empty() and (mask.outputs or is_graph_output(graph, mask)):
            return "Dropout mask output is used"
    return None


def _bypass(graph: gs.Graph, node: Any, outputs: set[int]) -> str | None:
    """Remove a node whose first output equals its first input; return why not, or None.

    `outputs`: ids of graph and subgraph outputs (see `output_ids`).
    """
    if not node.inputs or node.inputs[0].is_empty() or not node.outputs:
        return "node has no input or output"
    src, dst = node.inputs[0], node.outputs[0]
    if id(dst) not in outputs:
        replace_uses(dst, src)
        _detach(graph, node)
        return None
    if not is_graph_output(graph, dst):
        return "its output is returned by a subgraph"
    # dst names a graph output: keep its name by making src's producer write it.
    if is_graph_input(graph, src) or id(src) in outputs:
        return "copies a graph input/output to a graph output (keeps the interface names)"
    if len(src.inputs) != 1:
        return "copies a constant to a graph output"
    producer = src.inputs[0]
    replace_uses(src, dst, skip=node)
    _detach(graph, node)
    index = next(i for i, t in enumerate(producer.outputs) if t is src)
    producer.outputs[index] = dst
    return None


def _detach(graph: gs.Graph, node: Any) -> None:
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)


def _cleanup(graph: gs.Graph) -> int:
    """gs cleanup (graph inputs kept); the number of nodes it removed, subgraphs excluded."""
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False)
    return before - len(graph.nodes)


# --------------------------------------------------------------------------- folding


def _fold(graph: gs.Graph, limit: int, report: PassReport) -> None:
    """Fold the graph, then each subgraph (If/Loop/Scan bodies), within the budget."""
    graph.toposort()
    shapes = infer_shapes(graph)
    candidates = [n for n in graph.nodes if n.op != "Constant"]
    _fold_one(graph, limit, shapes, report, graph.ir_version)
    for sub in list(graph.subgraphs(recursive=True)):
        _fold_one(sub, limit, shapes, report, graph.ir_version)
    graph.cleanup(remove_unused_graph_inputs=False)
    alive = {id(n) for n in graph.nodes}
    folded = [n for n in candidates if id(n) not in alive]
    report.count("folded", len(folded))
    for node in folded:
        report.detail(folded=node.name or node.op, op=node.op)


def _fold_one(
    graph: gs.Graph, limit: int, shapes: dict[str, Any], report: PassReport, ir: int | None
) -> None:
    outputs = {t.name for t in graph.outputs}

    def exclude(node: Any) -> bool:
        if node.op in NONDETERMINISTIC_OPS:
            return True
        for out in node.outputs:
            if out.name in outputs:
                return True  # a graph output stays computed: runtimes expect a producer
            shape, dtype = shapes.get(out.name, (None, None))
            static = shape is not None and all(isinstance(d, int) for d in shape)
            if static and dtype is not None and _volume(shape) * dtype.itemsize > limit:
                return True
        return False

    ir_version = graph.ir_version
    # gs exports the folding graph with this IR version: ONNX Runtime 1.19 refuses IR > 10,
    # and below IR 4 every initializer would have to be a graph input.
    graph.ir_version = min(max(ir or 10, 4), 10)
    options = {
        "size_threshold": limit,
        "should_exclude_node": exclude,
        "recurse_subgraphs": False,
        "recurse_functions": False,
    }
    import onnxruntime as ort
    from onnx_graphsurgeon.logger import G_LOGGER

    # gs folds through ONNX Runtime sessions of its own; their optimizer warnings are noise
    ort.set_default_logger_severity(3)
    try:
        with G_LOGGER.suppress(G_LOGGER.CRITICAL):
            try:
                graph.fold_constants(error_ok=False, **options)
            except Exception as exc:
                report.warn(
                    f"constant folding of '{graph.name}' failed as a whole ({_first_line(exc)}); "
                    "folding part by part"
                )
                try:  # gs 0.6 "basic" partitioning recurses forever on a failing part
                    graph.fold_constants(error_ok=True, partitioning="recursive", **options)
                except Exception as exc2:
                    report.warn(f"constant folding of '{graph.name}' skipped: {_first_line(exc2)}")
    finally:
        graph.ir_version = ir_version
        ort.set_default_logger_severity(2)  # ONNX Runtime's default: warnings


def _volume(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- merging


def _merge_constants(graph: gs.Graph, report: PassReport) -> None:
    """Make every reader of a duplicate constant read the first equal one."""
    groups: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    seen = output_ids(graph)  # outputs keep their names: never merged away
    for node in graph.nodes:
        for tensor in node.inputs:
            if id(tensor) in seen or tensor.is_empty():
                continue
            seen.add(id(tensor))
            key = _cheap_key(tensor)
            if key is not None:
                groups[key].append(tensor)
    for members in groups.values():
        if len(members) < 2:
            continue
        keepers: dict[bytes, list[tuple[Any, bytes]]] = defaultdict(list)
        for tensor in members:
            data = np.ascontiguousarray(_constant_of(tensor).values).tobytes()
            digest = hashlib.blake2b(data, digest_size=16).digest()
            match = next((k for k, kdata in keepers[digest] if kdata == data), None)
            if match is None:
                keepers[digest].append((tensor, data))
                continue
            replace_uses(tensor, match)
            report.count("constants_merged")
            report.detail(merged=tensor.name, into=match.name)


def _cheap_key(tensor: Any) -> tuple[str, tuple[int, ...], str] | None:
    """dtype, shape and stored dtype of a constant without loading its bytes."""
    const = _constant_of(tensor)
    if const is None:
        return None
    export = const.export_dtype
    try:
        stored = str(np.dtype(export))
    except TypeError:
        stored = str(export)
    return (str(np.dtype(const.dtype)), tuple(const.shape), stored)


def _constant_of(tensor: Any) -> gs.Constant | None:
    """The gs.Constant holding `tensor`'s value: itself, or its Constant node's `value`."""
    if isinstance(tensor, gs.Constant):
        return tensor
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        value = attrs.get("value")
        if len(attrs) == 1 and isinstance(value, gs.Constant):
            return value
    return None
