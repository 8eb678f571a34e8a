"""Channel importance for structured pruning: one score per channel class.

Criteria (the contributions of every coupled layer are aggregated per class with
`sum`, `mean` or `max`):

- `l1` / `l2`: the L1 / L2 norm of each source layer's filter (the weight slice of
  one output channel), as in Li et al., "Pruning Filters for Efficient ConvNets".
- `bn_gamma`: |gamma| of the BatchNormalization nodes on the channel (network
  slimming). Classes without a BatchNormalization fall back to `l1`.
- `activation`: mean |x| of each channel at the inputs of its consumer layers, over
  calibration data. One ONNX Runtime session exposes those tensors; batches are
  streamed and only per-channel sums are kept.

Scores are comparable inside a group only; the schedule normalizes them per group.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.analysis.channels import ChannelAnalysis
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.graph import const_value, export_graph, exposing_session

__all__ = ["AGGREGATES", "CRITERIA", "activation_scores", "class_importance", "filter_norms"]

log = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn_gamma", "activation")
AGGREGATES = ("sum", "mean", "max")

Contribution = tuple[np.ndarray, np.ndarray]  # (class per position, score per position)


def filter_norms(graph: gs.Graph, analysis: ChannelAnalysis, p: int = 1) -> list[Contribution]:
    """L1 (p=1) or L2 (p=2) norm of every source filter, by class."""
    out = []
    for src in analysis.sources:
        if not src.prunable:
            continue
        w = const_value(graph.nodes[src.node_index].inputs[src.weight_index])
        if w is None:
            continue
        flat = np.moveaxis(np.asarray(w, np.float64), src.weight_axis, 0).reshape(src.size, -1)
        norms = np.abs(flat).sum(1) if p == 1 else np.sqrt((flat * flat).sum(1))
        atoms = np.arange(src.start, src.start + src.size)
        out.append((analysis.atom_class[atoms], norms))
    return out


def bn_gammas(graph: gs.Graph, analysis: ChannelAnalysis) -> list[Contribution]:
    """|gamma| of each BatchNormalization on channel tensors, by class."""
    out = []
    for edit in analysis.edits:
        node = graph.nodes[edit.node_index]
        if edit.kind == "slice" and node.op == "BatchNormalization" and edit.index == 1:
            gamma = const_value(node.inputs[1])
            if gamma is not None:
                out.append((analysis.atom_class[edit.atoms], np.abs(gamma.astype(np.float64))))
    return out


def activation_scores(
    graph: gs.Graph, analysis: ChannelAnalysis, batches: Iterable[dict[str, Any]]
) -> list[Contribution]:
    """Mean |x| per channel at every consumer input, streamed over `batches`."""
    maps = {c.tensor: analysis.tensor_maps[c.tensor] for c in analysis.consumers}
    if not maps:
        return []
    names = sorted(maps)
    session = exposing_session(export_graph(graph), names)
    inputs = {i.name for i in session.get_inputs()}
    sums = {n: np.zeros(len(maps[n].atoms)) for n in names}
    counts = dict.fromkeys(names, 0)
    for feed in batches:
        values = session.run(names, {k: v for k, v in feed.items() if k in inputs})
        for name, x in zip(names, values):
            x = np.moveaxis(np.abs(np.asarray(x, np.float64)), maps[name].axis, 0)
            sums[name] += x.reshape(x.shape[0], -1).sum(1)
            counts[name] += x[0].size
    if not any(counts.values()):
        raise ConfigError("prune-channels: importance='activation' got no calibration batches")
    return [(analysis.atom_class[maps[n].atoms], sums[n] / max(counts[n], 1)) for n in names]


def _aggregate(contribs: list[Contribution], n: int, how: str) -> np.ndarray:
    scores = np.full(n, np.nan)
    if not contribs:
        return scores
    classes = np.concatenate([c for c, _ in contribs])
    values = np.concatenate([v for _, v in contribs])
    count = np.bincount(classes, minlength=n)
    have = count > 0
    if how == "max":
        top = np.full(n, -np.inf)
        np.maximum.at(top, classes, values)
        scores[have] = top[have]
    else:
        total = np.bincount(classes, weights=values, minlength=n)
        scores[have] = total[have] / (count[have] if how == "mean" else 1)
    return scores


def class_importance(
    graph: gs.Graph,
    analysis: ChannelAnalysis,
    criterion: str = "l1",
    aggregate: str = "mean",
    batches: Iterable[dict[str, Any]] | None = None,
) -> np.ndarray:
    """One importance score per channel class (higher: more important)."""
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown importance {criterion!r}; valid: {', '.join(CRITERIA)}")
    if aggregate not in AGGREGATES:
        raise ConfigError(f"unknown aggregate {aggregate!r}; valid: {', '.join(AGGREGATES)}")
    n = analysis.num_classes
    if criterion in ("l1", "l2"):
        return _fill(
            _aggregate(filter_norms(graph, analysis, 1 if criterion == "l1" else 2), n, aggregate)
        )
    if criterion == "bn_gamma":
        contribs = bn_gammas(graph, analysis)
    else:
        if batches is None:
            raise ConfigError(
                "prune-channels: importance='activation' needs calibration data (Context.data)"
            )
        contribs = activation_scores(graph, analysis, batches)
    scores = _aggregate(contribs, n, aggregate)
    missing = np.isnan(scores)
    if missing.any():
        fallback = _aggregate(filter_norms(graph, analysis, 1), n, aggregate)
        scores[missing] = fallback[missing]
    return _fill(scores)


def _fill(scores: np.ndarray) -> np.ndarray:
    """Classes without any score (frozen pseudo channels) rank as most important."""
    return np.where(np.isnan(scores), np.inf, scores)
