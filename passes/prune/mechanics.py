"""Channel pruning mechanics: apply a keep/remove decision to a graph.

Given the dependency analysis (`onnxslim_edge.analysis.channels`) and a boolean `keep`
per channel class, `remove_channels` physically slices every constant the analysis
listed (weights on their output and input axes, biases, BatchNormalization and
InstanceNormalization parameters, per-channel Add/Mul/... constants, PRelu slopes,
Q/DQ scales and zero points) and patches attributes and shape constants (`group` of
depthwise convs, Split sizes, Slice bounds on the channel axis, Reshape targets,
Resize sizes). `zero_channels` keeps every shape and only masks: the removed
channels' filters in their source layers are set to zero.

Exactness. A source whose filters are zero still outputs a constant per channel (its
bias, shifted by BatchNormalization, through the activation: relu(b)). Where that
constant reaches a consumer as one value per input channel that the consumer can
absorb exactly (`Consumer.foldable`: Conv without padding, Gemm, MatMul), removing
the channel adds `constant x weights` to the consumer's bias (`fold_deltas`,
measured with ONNX Runtime by `removed_constants`). Where it cannot (padding sees the
constant only inside the borders; a value that varies over positions or inputs), the
zero mode also zeroes the consumer's input weights of that channel, so the channel
contributes nothing there, as in the removed model. Hence the removed model equals
the zero-mode model (up to float summation order) on every graph the analysis accepts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.analysis.channels import ChannelAnalysis, Consumer, Edit
from onnxslim_edge.graph import (
    const_value,
    export_graph,
    exposing_session,
    set_constant_input,
    unique_name,
)

__all__ = [
    "fold_deltas",
    "kept_positions",
    "remove_channels",
    "removed_constants",
    "zero_channels",
]

log = logging.getLogger(__name__)


def kept_positions(analysis: ChannelAnalysis, atoms: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Boolean mask over the positions of a map: does each position's class stay?"""
    return keep[analysis.atom_class[atoms]]


def _node(graph: gs.Graph, index: int) -> Any:
    return graph.nodes[index]


def _slice(graph: gs.Graph, node: Any, edit: Edit, mask: np.ndarray) -> None:
    value = const_value(node.inputs[edit.index])
    if value is None:  # the analysis checked it; a graph edited since is a bug
        raise RuntimeError(f"input {edit.index} of node '{node.name}' is no longer constant")
    if value.shape[edit.axis] != mask.size:
        raise RuntimeError(
            f"node '{node.name}' input {edit.index}: axis {edit.axis} has "
            f"{value.shape[edit.axis]} entries, the channel map {mask.size}"
        )
    new = np.take(value, np.flatnonzero(mask), axis=edit.axis)
    set_constant_input(graph, node, edit.index, np.ascontiguousarray(new), f"{node.name}_pruned")


def _zero(graph: gs.Graph, node: Any, index: int, axis: int, mask: np.ndarray) -> None:
    value = const_value(node.inputs[index])
    if value is None:
        raise RuntimeError(f"input {index} of node '{node.name}' is no longer constant")
    new = np.array(value, copy=True)
    where = [slice(None)] * new.ndim
    where[axis] = np.flatnonzero(~mask)
    new[tuple(where)] = 0
    set_constant_input(graph, node, index, new, f"{node.name}_masked")


def _set_ints(graph: gs.Graph, node: Any, index: int, position: int, value: int) -> None:
    current = const_value(node.inputs[index])
    if current is None:
        raise RuntimeError(f"input {index} of node '{node.name}' is no longer constant")
    new = np.array(current, dtype=current.dtype, copy=True).reshape(-1)
    new[position] = value
    set_constant_input(graph, node, index, new.reshape(current.shape), f"{node.name}_patched")


def _patch(graph: gs.Graph, edit: Edit, keep: np.ndarray, analysis: ChannelAnalysis) -> None:
    node = _node(graph, edit.node_index)
    mask = kept_positions(analysis, edit.atoms, keep)
    if edit.kind == "slice":
        _slice(graph, node, edit, mask)
    elif edit.kind == "group":
        node.attrs["group"] = int(mask.sum())
    elif edit.kind == "split":
        sizes = [int(kept_positions(analysis, part, keep).sum()) for part in edit.atoms_list]
        node.attrs.pop("num_outputs", None)
        if int(graph.opset or 13) < 13:
            node.attrs["split"] = sizes
        else:
            tensor = gs.Constant(
                unique_name(graph, f"{node.name}_split"), np.array(sizes, dtype=np.int64)
            )
            if len(node.inputs) > 1:
                node.inputs[1] = tensor
            else:
                node.inputs.append(tensor)
    elif edit.kind == "slice_bounds":
        start = int(mask[: edit.start].sum())
        end = start + int(mask[edit.start : edit.end].sum())
        if int(graph.opset or 13) < 10:
            starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
            starts[edit.index], ends[edit.index] = start, end
            node.attrs["starts"], node.attrs["ends"] = starts, ends
        else:
            _set_ints(graph, node, 1, edit.index, start)
            _set_ints(graph, node, 2, edit.index, end)
    elif edit.kind in ("reshape", "resize"):
        _set_ints(graph, node, edit.index, edit.axis, int(mask.sum()))
    else:  # pragma: no cover - the analysis emits only the kinds above
        raise RuntimeError(f"unknown edit kind {edit.kind!r}")


def _out_mask(analysis: ChannelAnalysis, node_index: int, keep: np.ndarray) -> np.ndarray | None:
    for src in analysis.sources:
        if src.node_index == node_index:
            atoms = np.arange(src.start, src.start + src.size)
            return kept_positions(analysis, atoms, keep)
    return None


def fold_deltas(
    graph: gs.Graph,
    analysis: ChannelAnalysis,
    keep: np.ndarray,
    constants: Mapping[int, np.ndarray],
) -> dict[int, np.ndarray]:
    """Per consumer (index into `analysis.consumers`): what its removed input channels,
    each carrying the constant `constants[i][position]` (NaN: not constant), add to
    its output channels (full length, before any slicing). Consumers with nothing to
    fold are left out."""
    deltas: dict[int, np.ndarray] = {}
    for i, cons in enumerate(analysis.consumers):
        values = constants.get(i)
        if values is None or not cons.foldable:
            continue
        removed = ~kept_positions(analysis, cons.atoms, keep)
        use = removed & np.isfinite(values)
        if not use.any():
            continue
        node = _node(graph, cons.node_index)
        w = const_value(node.inputs[cons.weight_index]).astype(np.float64)
        c = np.where(use, values, 0.0)
        if cons.kind == "Conv":  # W [O, I, k...]
            delta = w.reshape(w.shape[0], w.shape[1], -1).sum(2) @ c
        elif cons.kind == "Gemm":
            wk = w if cons.weight_axis == 0 else w.T  # [K, N]
            alpha = float(node.attrs.get("alpha", 1.0))
            delta = alpha * (c @ wk)
        else:  # MatMul: W [K, N]
            delta = c @ w
        deltas[i] = delta
    return deltas


def _add_bias(graph: gs.Graph, cons: Consumer, delta: np.ndarray) -> None:
    node = _node(graph, cons.node_index)
    if cons.kind == "Conv":
        w = const_value(node.inputs[1])
        dtype = w.dtype
        current = const_value(node.inputs[2]) if len(node.inputs) > 2 else None
        base = np.zeros(delta.shape, dtype) if current is None else current
        set_constant_input(graph, node, 2, (base + delta).astype(dtype), f"{node.name}_bias")
    elif cons.kind == "Gemm":
        w = const_value(node.inputs[1])
        beta = float(node.attrs.get("beta", 1.0))
        has_c = len(node.inputs) > 2 and not node.inputs[2].is_empty()
        current = const_value(node.inputs[2]) if has_c else None
        if current is None:
            node.attrs["beta"] = 1.0
            beta, current = 1.0, np.zeros((), w.dtype)
        new = (current + delta / beta).astype(w.dtype)
        set_constant_input(graph, node, 2, new, f"{node.name}_bias")
    else:  # MatMul: into the bias Add after it, else a new Add
        w = const_value(node.inputs[1])
        out = node.outputs[0]
        bias_add = _bias_add(graph, out, delta.size)
        if bias_add is not None:
            add, index = bias_add
            current = const_value(add.inputs[index])
            set_constant_input(
                graph, add, index, (current + delta).astype(current.dtype), f"{add.name}_bias"
            )
            return
        inner = gs.Variable(unique_name(graph, f"{out.name}_nobias"), dtype=out.dtype)
        bias = gs.Constant(unique_name(graph, f"{node.name}_bias"), delta.astype(w.dtype))
        node.outputs[0] = inner
        add = gs.Node("Add", name=unique_name(graph, f"{node.name}_bias_add"))
        add.inputs = [inner, bias]
        add.outputs = [out]
        graph.nodes.append(add)


def _bias_add(graph: gs.Graph, out: Any, n: int) -> tuple[Any, int] | None:
    """The Add that alone reads `out` and adds a constant over its last axis (size n)."""
    if len(out.outputs) != 1 or any(t is out for t in graph.outputs):
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    index = 1 if add.inputs[0] is out else 0
    value = const_value(add.inputs[index])
    if value is None or value.ndim < 1 or value.shape[-1] not in (1, n):
        return None
    if value.ndim > len(out.shape or ()) and out.shape is not None:
        return None
    return add, index


def remove_channels(
    graph: gs.Graph,
    analysis: ChannelAnalysis,
    keep: np.ndarray,
    constants: Mapping[int, np.ndarray] | None = None,
) -> dict[str, int]:
    """Remove every channel class with `keep[c] == False` from `graph` (the analysed
    graph or a `copy()` of it), folding `constants` (see `removed_constants`) into the
    consumers' biases. Returns counts: channels removed per source, folds made."""
    deltas = fold_deltas(graph, analysis, keep, constants or {})
    out_masks = {i: _out_mask(analysis, analysis.consumers[i].node_index, keep) for i in deltas}
    for edit in analysis.edits:
        _patch(graph, edit, keep, analysis)
    for i, delta in deltas.items():
        mask = out_masks[i]
        _add_bias(graph, analysis.consumers[i], delta if mask is None else delta[mask])
    outputs = {id(t) for t in (*graph.inputs, *graph.outputs)}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in outputs:
            tensor.shape = None  # stale: shape inference recomputes them
    removed = 0
    for src in analysis.sources:
        if src.prunable:
            atoms = np.arange(src.start, src.start + src.size)
            removed += int((~kept_positions(analysis, atoms, keep)).sum())
    return {"channels_removed": removed, "biases_folded": len(deltas)}


def zero_channels(
    graph: gs.Graph,
    analysis: ChannelAnalysis,
    keep: np.ndarray,
    constants: Mapping[int, np.ndarray] | None = None,
    *,
    sources_only: bool = False,
) -> dict[str, int]:
    """Mask the removed channels instead of removing them: zero their filters in the
    source layers (biases stay); then, unless `sources_only`, zero the consumers' input
    weights of every removed channel that `constants` does not mark as foldable, so the
    result equals `remove_channels` with the same arguments. Shapes do not change."""
    zeroed = 0
    for edit in analysis.edits:
        if edit.kind == "slice" and edit.role == "out":
            mask = kept_positions(analysis, edit.atoms, keep)
            if not mask.all():
                _zero(graph, _node(graph, edit.node_index), edit.index, edit.axis, mask)
                zeroed += int((~mask).sum())
    masked = 0
    if not sources_only:
        constants = constants or {}
        for i, cons in enumerate(analysis.consumers):
            mask = kept_positions(analysis, cons.atoms, keep)
            values = constants.get(i)
            if cons.foldable and values is not None:
                mask = mask | np.isfinite(values)
            if not mask.all():
                node = _node(graph, cons.node_index)
                _zero(graph, node, cons.weight_index, cons.weight_axis, mask)
                masked += 1
    return {"channels_zeroed": zeroed, "consumers_masked": masked}


def removed_constants(
    graph: gs.Graph,
    analysis: ChannelAnalysis,
    keep: np.ndarray,
    feeds: list[dict[str, np.ndarray]],
) -> dict[int, np.ndarray]:
    """The value each removed channel carries into each consumer once its source
    filters are zero: per consumer index, one value per position of its input map
    (NaN where the channel stays, or where the value is not one constant over every
    other axis and every feed). Measured with ONNX Runtime on a masked copy."""
    wanted = {
        i: cons
        for i, cons in enumerate(analysis.consumers)
        if cons.foldable and not kept_positions(analysis, cons.atoms, keep).all()
    }
    if not wanted:
        return {}
    masked = graph.copy()
    zero_channels(masked, analysis, keep, sources_only=True)
    names = sorted({c.tensor for c in wanted.values()})
    session = exposing_session(export_graph(masked), names, threads=1, optimization="disable")
    runs = [dict(zip(names, session.run(names, feed))) for feed in feeds]
    result: dict[int, np.ndarray] = {}
    for i, cons in wanted.items():
        removed = ~kept_positions(analysis, cons.atoms, keep)
        values = np.full(removed.size, np.nan)
        stacked = [
            np.moveaxis(np.asarray(r[cons.tensor], np.float64), cons.tensor_axis, 0) for r in runs
        ]
        for p in np.flatnonzero(removed):
            samples = np.concatenate([s[p].reshape(-1) for s in stacked])
            if samples.size == 0 or not np.all(np.isfinite(samples)):
                continue
            c = float(samples[0])
            if np.max(np.abs(samples - c)) <= 1e-6 * (1.0 + abs(c)):
                values[p] = float(np.mean(samples))
        result[i] = values
    return result
