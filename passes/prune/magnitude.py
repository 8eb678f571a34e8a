"""Unstructured magnitude pruning: zero the smallest weights of Conv/ConvTranspose/Gemm/MatMul.

    W  =>  W * mask,   mask zeroes the round(sparsity * units) units with the smallest score

A *unit* is one weight (`criterion = "l1"`, score |w|) or a group of `group_size`
consecutive weights along the layer's reduction axis (`criterion = "group_l2"`, score
the group's L2 norm). `scope = "layer"` reaches the target in every layer; `"global"`
ranks the units of all layers together by their plain score (no per-layer
normalization), so layers with small weights lose more. Ties are broken by position:
the earlier unit (graph order, then flat index) is zeroed first.

Also holds `collect_layers` (which layers read each constant weight), shared by the
sparsity passes; the weight lookup itself (`weight_of`, `reduction_axis`) lives in
`onnxslim_edge.analysis.weights` and is re-exported here.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.analysis.weights import (
    WEIGHT_OPS,
    LayerWeight,
    check_weight_ops,
    from_reduction_groups,
    reduction_axis,
    reduction_groups,
    weight_of,
)
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.pipeline import Context, Pass, PassReport

__all__ = [
    "WEIGHT_OPS",
    "LayerWeight",
    "PruneMagnitude",
    "PruneMagnitudeConfig",
    "WeightGroup",
    "collect_layers",
    "from_reduction_groups",
    "magnitude_zero_mask",
    "reduction_axis",
    "reduction_groups",
    "target_units",
    "weight_of",
    "zip_size",
]

log = logging.getLogger(__name__)


@dataclass
class WeightGroup:
    """One constant weight and every layer that reads it (shared weights are pruned once)."""

    weight: LayerWeight
    readers: list[Any] = field(default_factory=list)

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.readers]


def _readers(tensor: Any, outputs: set[int]) -> tuple[list[tuple[Any, int]], bool]:
    """(node, input index) of every node that reads `tensor`, looking through Identity,
    and whether `tensor` or one of those Identity outputs is a graph output (id in
    `outputs`)."""
    out: list[tuple[Any, int]] = []
    stack = [tensor]
    seen: set[int] = set()
    is_output = False
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        is_output = is_output or id(t) in outputs
        for node in t.outputs:
            if node.op == "Identity":
                stack.extend(node.outputs)
                continue
            out.extend((node, i) for i, inp in enumerate(node.inputs) if inp is t)
    return out, is_output


def collect_layers(
    graph: gs.Graph,
    ops: Iterable[str],
    exclude_nodes: Iterable[str] = (),
    *,
    min_params: int = 0,
) -> tuple[list[WeightGroup], list[tuple[Any, str]]]:
    """The prunable weights of `graph`'s layers of type `ops`, and the layers left alone.

    Returns (groups, skips): one WeightGroup per constant weight, in graph order, and
    (node, reason) for each layer of type `ops` that cannot be pruned. A weight read by
    anything but a layer of type `ops` at its weight input (another op, an excluded
    node, a graph output) is left alone, since pruning it would change the other use.
    Readers of a shared weight must agree on its reduction axis.
    """
    ops = set(ops)
    excluded = set(exclude_nodes)
    outputs = {id(t) for t in graph.outputs}
    skips: list[tuple[Any, str]] = []
    groups: dict[int, WeightGroup] = {}
    order: list[int] = []
    for node in graph.nodes:
        if node.op not in ops:
            continue
        if node.name in excluded:
            skips.append((node, "excluded by exclude_nodes"))
            continue
        weight = weight_of(node, graph)
        if isinstance(weight, str):
            skips.append((node, weight))
            continue
        key = id(weight.constant)
        if key not in groups:
            groups[key] = WeightGroup(weight)
            order.append(key)
        groups[key].readers.append(node)

    result: list[WeightGroup] = []
    for key in order:
        group = groups[key]
        name = group.weight.name
        reason = None
        readers, is_output = _readers(group.weight.root, outputs)
        if is_output:
            reason = f"weight '{name}' is a graph output"
        for reader, index in readers:
            ok = (
                reader.op in ops
                and reader.name not in excluded
                and index == WEIGHT_OPS.get(reader.op, -1)
                and any(reader is r for r in group.readers)
            )
            if not ok and reason is None:
                what = "an excluded node" if reader.name in excluded else reader.op
                reason = f"weight '{name}' is also read by {what} '{reader.name}' (input {index})"
        if reason is None and len(group.readers) > 1:
            shape = group.weight.values.shape
            axes = {reduction_axis(r, shape) for r in group.readers}
            if len(axes) > 1:
                reason = f"shared weight '{name}' is reduced along different axes"
        size = group.weight.values.size
        if reason is None and size < min_params:
            reason = f"too small ({size} weights < min_params {min_params})"
        if reason is not None:
            skips.extend((r, reason) for r in group.readers)
            continue
        result.append(group)
    return result, skips


# --------------------------------------------------------------------------- numerics


def target_units(sparsity: float, units: int) -> int:
    """How many of `units` to zero for `sparsity`: the nearest integer (halves round up)."""
    return min(units, int(np.floor(sparsity * units + 0.5)))


def magnitude_zero_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """A boolean mask (shape of `scores`) of the `k` smallest scores; ties: lower index first."""
    flat = np.asarray(scores).ravel()
    mask = np.zeros(flat.shape, dtype=bool)
    if k > 0:
        order = np.argsort(flat, kind="stable")
        mask[order[:k]] = True
    return mask.reshape(np.shape(scores))


def _unit_scores(w: LayerWeight, criterion: str, group_size: int) -> np.ndarray:
    if criterion == "l1":
        return np.abs(np.asarray(w.values)).ravel()  # exact in the weight's own dtype
    values = np.asarray(w.values, dtype=np.float64)
    groups = reduction_groups(values, w.axis, group_size)
    return np.sqrt(np.sum(groups * groups, axis=-1)).ravel()


def _apply_unit_mask(w: LayerWeight, mask: np.ndarray, criterion: str, group_size: int) -> int:
    """Zero the masked units in place of the weight's constant; returns weights newly zeroed."""
    values = np.asarray(w.values)
    if criterion == "l1":
        element_mask = mask.reshape(values.shape)
    else:
        shape = reduction_groups(values, w.axis, group_size).shape
        expanded = np.broadcast_to(mask.reshape((*shape[:2], 1)), shape)
        element_mask = from_reduction_groups(expanded, values.shape, w.axis)
    change = element_mask & (values != 0)  # leave zeros (and -0.0) bit-identical
    count = int(np.count_nonzero(change))
    if count:
        new = np.array(values, copy=True)
        new[change] = 0
        w.constant.values = new
        w.values = new
    return count


def zip_size(values: np.ndarray) -> int:
    """Bytes of `values` after deflate (zlib level 6): what a zip of the weights would take."""
    return len(zlib.compress(np.ascontiguousarray(values).tobytes(), 6))


# --------------------------------------------------------------------------- the pass

_VALID_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _check_names(name: str, names: Any) -> None:
    if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{name}.exclude_nodes: expected a list of node names, got {names!r}")


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class PruneMagnitudeConfig:
    """Options of the `prune-magnitude` pass.

    - `sparsity`: the fraction of weights to zero, in [0, 1).
    - `criterion`: "l1" (single weights by |w|) or "group_l2" (groups of `group_size`
      consecutive weights along the reduction axis, by L2 norm).
    - `group_size`: weights per group for "group_l2".
    - `scope`: "layer" (every layer reaches `sparsity`) or "global" (one threshold).
    - `ops`: layer types whose weight input is pruned.
    - `exclude_nodes`: node names left dense.
    - `min_params`: layers with fewer weights are left dense.
    - `measure_zip`: report deflate-compressed sizes (costs one zlib pass over the weights).
    """

    sparsity: float = 0.5
    criterion: Literal["l1", "group_l2"] = "l1"
    group_size: int = 4
    scope: Literal["layer", "global"] = "layer"
    ops: tuple[str, ...] = _VALID_OPS
    exclude_nodes: tuple[str, ...] = ()
    min_params: int = 0
    measure_zip: bool = True

    def __post_init__(self) -> None:
        name = "prune-magnitude"
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ConfigError(f"{name}.sparsity: expected a number, got {self.sparsity!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"{name}.sparsity: must be in [0, 1), got {self.sparsity!r}")
        if self.criterion not in ("l1", "group_l2"):
            raise ConfigError(
                f"{name}.criterion: {self.criterion!r} is not one of 'l1', 'group_l2'"
            )
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"{name}.scope: {self.scope!r} is not one of 'layer', 'global'")
        _check_count(f"{name}.group_size", self.group_size, 1)
        _check_count(f"{name}.min_params", self.min_params, 0)
        check_weight_ops(name, self.ops, _VALID_OPS)
        _check_names(name, self.exclude_nodes)
        if not isinstance(self.measure_zip, bool):
            raise ConfigError(f"{name}.measure_zip: expected true/false, got {self.measure_zip!r}")


class PruneMagnitude(Pass):
    """Zero the smallest constant weights of Conv/ConvTranspose/Gemm/MatMul. Lossy.

    W => W with round(sparsity x units) units zeroed, a unit being one weight ("l1",
    by |w|) or `group_size` consecutive weights along the reduction axis ("group_l2",
    by L2 norm), per layer or with one global threshold. Ties go to the earlier unit.
    Zeros already present count towards the target; nothing else changes (shapes,
    nodes and dtypes stay), so the gain is in compressed size and in sparse kernels.
    The error measure is the pruned weights' share of each layer's L2 norm
    (`detail.pruned_norm_ratio`); compare outputs with `onnxslim_edge.verify.compare`.

    Left alone, with a reason: weights that are not constants (graph inputs, computed,
    quantized), non-float weights, weights also read by other nodes, layers in
    `exclude_nodes` or below `min_params`, and for "group_l2" layers whose reduction
    dimension is not a multiple of `group_size`. A weight shared by several layers is
    pruned once.

    Counters: `layers_pruned`, `params_considered`, `weights_zeroed`, and with
    `measure_zip` the deflate sizes `zip_bytes_before`/`zip_bytes_after` of the pruned
    weights and `model_zip_bytes_before`/`model_zip_bytes_after` of all constants.
    """

    name: ClassVar[str] = "prune-magnitude"
    Config: ClassVar[type] = PruneMagnitudeConfig
    lossless: ClassVar[bool] = False

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        cfg = self.config
        report = self.new_report()
        groups, skips = collect_layers(graph, cfg.ops, cfg.exclude_nodes, min_params=cfg.min_params)
        for node, reason in skips:
            report.skip(node, reason)
        unit = 1
        if cfg.criterion == "group_l2":
            unit = cfg.group_size
            kept = []
            for group in groups:
                dim = group.weight.values.shape[group.weight.axis]
                if dim % unit:
                    reason = (
                        f"reduction dim {dim} (axis {group.weight.axis}) is not a multiple "
                        f"of group_size {unit}"
                    )
                    for node in group.readers:
                        report.skip(node, reason)
                else:
                    kept.append(group)
            groups = kept

        before = [np.array(g.weight.values, copy=True) for g in groups]
        scores = [_unit_scores(g.weight, cfg.criterion, unit) for g in groups]
        if cfg.scope == "layer":
            masks = [magnitude_zero_mask(s, target_units(cfg.sparsity, s.size)) for s in scores]
        else:
            joined = np.concatenate(scores) if scores else np.zeros(0)
            mask = magnitude_zero_mask(joined, target_units(cfg.sparsity, joined.size))
            masks = np.split(mask, np.cumsum([s.size for s in scores])[:-1]) if scores else []

        for key in ("layers_pruned", "params_considered", "weights_zeroed"):
            report.count(key, 0)
        zip_before = zip_after = 0
        for group, old, mask in zip(groups, before, masks):
            w = group.weight
            zeroed = _apply_unit_mask(w, mask, cfg.criterion, unit)
            new = np.asarray(w.values)
            size = int(new.size)
            zeros_before = int(np.count_nonzero(old == 0))
            zeros_after = int(np.count_nonzero(new == 0))
            norm = float(np.linalg.norm(old.astype(np.float64).ravel()))
            removed = float(np.linalg.norm((old.astype(np.float64) - new).ravel()))
            detail: dict[str, Any] = {
                "node": group.readers[0].name,
                "op": group.readers[0].op,
                "weight": w.name,
                "shared_by": group.node_names,
                "params": size,
                "zeros_before": zeros_before,
                "zeros_after": zeros_after,
                "sparsity_before": zeros_before / size if size else 0.0,
                "sparsity_after": zeros_after / size if size else 0.0,
                "pruned_norm_ratio": removed / norm if norm > 0 else 0.0,
            }
            if cfg.measure_zip:
                detail["zip_bytes_before"] = zip_size(old)
                detail["zip_bytes_after"] = zip_size(new) if zeroed else detail["zip_bytes_before"]
                zip_before += detail["zip_bytes_before"]
                zip_after += detail["zip_bytes_after"]
            report.detail(**detail)
            report.count("params_considered", size)
            report.count("weights_zeroed", zeroed)
            if zeroed:
                report.count("layers_pruned")
        if cfg.measure_zip:
            pruned = {id(g.weight.constant) for g in groups}
            rest = sum(
                zip_size(np.asarray(t.values)) for t in _constants(graph) if id(t) not in pruned
            )
            report.count("zip_bytes_before", zip_before)
            report.count("zip_bytes_after", zip_after)
            report.count("model_zip_bytes_before", zip_before + rest)
            report.count("model_zip_bytes_after", zip_after + rest)
        total = report.counters["params_considered"]
        if total:
            zeros = sum(d["zeros_after"] for d in report.details)
            log.info("prune-magnitude: %d/%d weights zero (%.3f)", zeros, total, zeros / total)
        return report


def _constants(graph: gs.Graph) -> list[Any]:
    """Every gs.Constant of the graph (initializers and Constant-node values), once."""
    found: dict[int, Any] = {}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            found[id(tensor)] = tensor
    for node in graph.nodes:
        if node.op == "Constant":
            value = node.attrs.get("value")
            if isinstance(value, gs.Constant):
                found[id(value)] = value
    return [t for t in found.values() if np.asarray(t.values).dtype != object]
