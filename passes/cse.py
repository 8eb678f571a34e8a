"""Common-subexpression elimination for the `cleanup` pass: equal nodes computed once.

    f(a, b; attrs) -> y1,  f(a, b; attrs) -> y2   =>  f(a, b; attrs) -> y1 (readers of y2 read y1). Exact.

Two nodes are equal when they have the same op, domain, attributes (tensor attributes
compared by dtype, shape and bytes) and read the very same input tensors in the same
order, with the same outputs present. Nodes are visited in topological order, so once a
pair is merged the nodes reading their outputs become equal too and merge in the same
sweep: a Shape -> Gather -> Unsqueeze chain repeated for every attention layer becomes
one. Not merged: random ops (each call draws anew), nodes outside the default ONNX
domain (a custom op may have side effects), nodes with subgraph attributes (If/Loop/
Scan), and a node whose output is a graph or subgraph output (the interface keeps its
names and producers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.graph import output_ids, replace_uses

__all__ = ["NONDETERMINISTIC_OPS", "eliminate_common_subexpressions"]

#: Ops whose outputs differ between runs: never merged (nor folded by `cleanup`).
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


class _Unhashable(Exception):
    """An attribute value without a stable key (a subgraph, an attribute reference)."""


def eliminate_common_subexpressions(graph: gs.Graph) -> int:
    """Merge equal nodes in the graph and in each subgraph; the number of nodes removed."""
    outputs = output_ids(graph)
    removed = 0
    for scope in (graph, *graph.subgraphs(recursive=True)):
        scope.toposort(recurse_subgraphs=False)
        removed += _eliminate_scope(scope, outputs)
    return removed


def _eliminate_scope(scope: gs.Graph, outputs: set[int]) -> int:
    seen: dict[tuple[Any, ...], Any] = {}
    duplicates = []
    for node in scope.nodes:
        key = _node_key(node)
        if key is None:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        if any(id(t) in outputs for t in node.outputs):
            continue  # an interface tensor keeps its producer
        for mine, theirs in zip(node.outputs, first.outputs):
            replace_uses(mine, theirs)
        duplicates.append(node)
    for node in duplicates:
        node.inputs.clear()
        node.outputs.clear()
    if duplicates:
        gone = {id(n) for n in duplicates}
        scope.nodes = [n for n in scope.nodes if id(n) not in gone]
    return len(duplicates)


def _node_key(node: Any) -> tuple[Any, ...] | None:
    """What makes two nodes compute the same values, or None when `node` is never merged."""
    if node.op in NONDETERMINISTIC_OPS or node.domain not in ("", "ai.onnx", None):
        return None
    if not node.outputs:
        return None
    try:
        attrs = tuple(sorted((k, _value_key(v)) for k, v in node.attrs.items()))
    except _Unhashable:
        return None
    inputs = tuple(None if t.is_empty() else id(t) for t in node.inputs)
    present = tuple(not t.is_empty() for t in node.outputs)
    return (node.op, inputs, attrs, present)


def _value_key(value: Any) -> Any:
    if isinstance(value, gs.Graph) or (
        isinstance(value, (list, tuple)) and any(isinstance(v, gs.Graph) for v in value)
    ):
        raise _Unhashable
    if isinstance(value, gs.Constant):
        value = np.asarray(value.values)
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, np.ascontiguousarray(value).tobytes())
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(_value_key(v) for v in value))
    if isinstance(value, float):
        return ("float", repr(value))  # nan equals nan here: the same attribute
    if isinstance(value, (bool, int, str, bytes)) or value is None:
        return (type(value).__name__, value)
    if isinstance(value, type):  # a dtype attribute (Cast's `to` imported by gs)
        return ("type", value.__module__, value.__qualname__)
    if isinstance(value, np.dtype):
        return ("dtype", value.str)
    if isinstance(value, np.generic):
        return ("scalar", value.dtype.str, value.item())
    raise _Unhashable
