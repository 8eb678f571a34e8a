"""The `prune-channels` pass: dependency-aware structured channel pruning.

    Conv(W[C_out, ...]) -> ... -> Conv(W'[..., C_out, ...])
        =>  Conv(W[kept, ...]) -> ... -> Conv(W'[..., kept, ...])

Four parts, kept apart: the analysis (`onnxslim_edge.analysis.channels`: which
channels are coupled), the importance (`importance.py`: which matter least), the
schedule (here: how many to remove where) and the mechanics (`mechanics.py`: slicing
and masking). The schedule either removes `ratio` of every block's channels, or
removes the least important channels of all groups first (scores normalized per
group), in steps of `round_to` channels per block, until the model's MACs
(`macs_reduction`) or parameters (`params_reduction`) shrank by the target.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.analysis.channels import ChannelAnalysis, analyze_channels
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.graph import const_value, export_graph
from onnxslim_edge.passes.prune.importance import class_importance
from onnxslim_edge.passes.prune.mechanics import (
    kept_positions,
    remove_channels,
    removed_constants,
    zero_channels,
)
from onnxslim_edge.pipeline import Context, Pass, PassReport

__all__ = ["PruneChannels", "PruneChannelsConfig", "Step", "plan_steps"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PruneChannelsConfig:
    """Options of the `prune-channels` pass (give exactly one of the three targets).

    - `ratio`: remove this fraction of the channels of every prunable block.
    - `macs_reduction` / `params_reduction`: remove channels, least important first
      across all groups, until MACs / parameters shrank by this fraction.
    - `importance`: "l1" / "l2" (filter norm), "bn_gamma", "activation" (needs
      Context.data).
    - `aggregate`: how the scores of coupled layers combine into a channel's score.
    - `round_to`: channel counts stay multiples of this (None: the target's
      `Target.round_to`, 8 for tensorrt, 16 for onnxruntime-cpu).
    - `min_channels`: never fewer channels per block.
    - `mode`: "remove" slices the channels out; "zero" only masks them (same shapes).
    - `exclude_nodes`: node names whose groups stay untouched.
    - `max_samples`: calibration samples for importance="activation".
    """

    ratio: float | None = None
    macs_reduction: float | None = None
    params_reduction: float | None = None
    importance: Literal["l1", "l2", "bn_gamma", "activation"] = "l1"
    aggregate: Literal["sum", "mean", "max"] = "mean"
    round_to: int | None = None
    mode: Literal["remove", "zero"] = "remove"
    min_channels: int = 1
    exclude_nodes: tuple[str, ...] = ()
    max_samples: int = 32

    def __post_init__(self) -> None:
        targets = {
            k: getattr(self, k)
            for k in ("ratio", "macs_reduction", "params_reduction")
            if getattr(self, k) is not None
        }
        if len(targets) != 1:
            raise ConfigError(
                "prune-channels: give exactly one of ratio, macs_reduction, params_reduction"
            )
        for key, value in targets.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"prune-channels.{key}: expected a number, got {value!r}")
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"prune-channels.{key}: must be in [0, 1), got {value}")
        for key, low in (("min_channels", 1), ("max_samples", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"prune-channels.{key}: expected an integer >= {low}")
        if self.round_to is not None and (
            isinstance(self.round_to, bool)
            or not isinstance(self.round_to, int)
            or self.round_to < 1
        ):
            raise ConfigError(
                f"prune-channels.round_to: expected an integer >= 1, got {self.round_to!r}"
            )
        if self.importance not in ("l1", "l2", "bn_gamma", "activation"):
            raise ConfigError(f"prune-channels.importance: unknown {self.importance!r}")
        if self.aggregate not in ("sum", "mean", "max"):
            raise ConfigError(f"prune-channels.aggregate: unknown {self.aggregate!r}")
        if self.mode not in ("remove", "zero"):
            raise ConfigError(f"prune-channels.mode: expected remove or zero, got {self.mode!r}")
        if isinstance(self.exclude_nodes, str) or not all(
            isinstance(n, str) for n in self.exclude_nodes
        ):
            raise ConfigError("prune-channels.exclude_nodes: expected a list of node names")
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))


@dataclass(frozen=True)
class Step:
    """Removing `classes` (the next least important of one block) costs `score`."""

    group: int
    block: int
    classes: np.ndarray
    score: float


def _keep_counts(size: int, round_to: int, min_channels: int) -> list[int]:
    """Allowed kept counts of a block of `size` classes, largest first."""
    low = max(min_channels, 1)
    low = math.ceil(low / round_to) * round_to
    counts = [size]
    k = (size - 1) // round_to * round_to
    while k >= low and k > 0:
        counts.append(k)
        k -= round_to
    return counts


def plan_steps(
    analysis: ChannelAnalysis, scores: np.ndarray, round_to: int, min_channels: int
) -> list[list[Step]]:
    """Per prunable block, its removal steps in order (least important channels first).

    Scores are normalized by the mean score of their group, so groups compare."""
    plans = []
    for g in analysis.groups:
        if g.frozen is not None:
            continue
        group_scores = scores[g.classes]
        finite = group_scores[np.isfinite(group_scores)]
        scale = float(np.mean(finite)) if finite.size else 1.0
        scale = scale if scale > 0 else 1.0
        for b, block in enumerate(g.blocks):
            counts = _keep_counts(len(block), round_to, min_channels)
            if len(counts) < 2:
                continue
            order = block[np.lexsort((block, scores[block]))]
            steps = []
            for k_from, k_to in itertools.pairwise(counts):
                chunk = order[len(block) - k_from : len(block) - k_to]
                steps.append(Step(g.id, b, chunk, float(np.mean(scores[chunk])) / scale))
            plans.append(steps)
    return plans


def _merge(plans: list[list[Step]]) -> list[Step]:
    """All steps in one order: least important first, each block's steps in order."""
    heap = [(steps[0].score, i, 0) for i, steps in enumerate(plans) if steps]
    heapq.heapify(heap)
    order = []
    while heap:
        _, i, j = heapq.heappop(heap)
        order.append(plans[i][j])
        if j + 1 < len(plans[i]):
            heapq.heappush(heap, (plans[i][j + 1].score, i, j + 1))
    return order


class _CostModel:
    """MACs and params of the pruned graph, from the original's per-node costs.

    A node's MACs scale with the kept fraction of its output channels and, for
    consumers, of its input channels (the formulas of `analysis.cost`); a sliced
    constant's size with the kept fraction along each sliced axis."""

    def __init__(
        self, graph: gs.Graph, analysis: ChannelAnalysis, model: Any, input_shapes: Any = None
    ) -> None:
        from onnxslim_edge.analysis.cost import model_cost

        cost = model_cost(model, input_shapes=input_shapes)
        self.base_macs, self.base_params = cost.macs, cost.params
        self.analysis = analysis
        self.terms: list[tuple[float, list[np.ndarray]]] = []
        consumers = {c.node_index: c for c in analysis.consumers}
        for i, (node, nc) in enumerate(zip(graph.nodes, cost.per_node)):
            if not nc.macs:
                continue
            maps = []
            out = analysis.tensor_maps.get(node.outputs[0].name) if node.outputs else None
            if out is not None:
                maps.append(out.atoms)
            if i in consumers:
                maps.append(consumers[i].atoms)
            if maps:
                self.terms.append((float(nc.macs), maps))
        self.param_terms: list[tuple[float, list[np.ndarray]]] = []
        sliced: dict[tuple[int, int], list[np.ndarray]] = {}
        for e in analysis.edits:
            if e.kind == "slice":
                sliced.setdefault((e.node_index, e.index), []).append(e.atoms)
        for (ni, idx), maps in sliced.items():
            value = const_value(graph.nodes[ni].inputs[idx])
            if value is not None and value.ndim >= 1:
                self.param_terms.append((float(value.size), maps))

    def _removed(self, terms: list[tuple[float, list[np.ndarray]]], keep: np.ndarray) -> float:
        total = 0.0
        for base, maps in terms:
            f = 1.0
            for atoms in maps:
                f *= float(kept_positions(self.analysis, atoms, keep).mean())
            total += base * (1.0 - f)
        return total

    def reduction(self, keep: np.ndarray, what: str) -> float:
        if what == "macs":
            return self._removed(self.terms, keep) / max(self.base_macs, 1)
        return self._removed(self.param_terms, keep) / max(self.base_params, 1)


class PruneChannels(Pass):
    """Structured channel pruning of Conv/ConvTranspose/Gemm/MatMul layers, coupled
    channels together (residual Adds, Concat/Split/Slice, depthwise convs, Flatten).

    Lossy: removes filters. Its error measure is the pipeline's comparison with the
    reference model. Exactness it does guarantee: the removed model ("remove") equals
    the masked model ("zero") within float rounding, because constant outputs of
    masked channels are folded into the next layer's bias where that is exact and
    masked at the next layer's input where it is not (see `mechanics`). Never changes
    a graph input or output shape; groups it cannot follow are frozen and reported
    with `report.skip` naming the op.
    """

    name = "prune-channels"
    Config = PruneChannelsConfig
    lossless = False

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        cfg: PruneChannelsConfig = self.config
        report = self.new_report()
        round_to = cfg.round_to or ctx.target.round_to
        shapes = ctx.shapes_for(export_graph(graph))
        analysis = analyze_channels(graph, input_shapes=shapes, exclude_nodes=cfg.exclude_nodes)
        for node, op, reason in analysis.barriers:
            report.skip(SimpleNamespace(name=node, op=op), reason)
        frozen = [g for g in analysis.groups if g.frozen is not None]
        report.count("groups", len(analysis.groups))
        report.count("groups_frozen", len(frozen))
        if not analysis.groups or len(frozen) == len(analysis.groups):
            report.warn("every channel group is frozen: nothing to prune")
            self._details(report, analysis, np.ones(analysis.num_classes, bool))
            return report

        batches = None
        if cfg.importance == "activation" and ctx.data is not None:
            batches = self._batches(graph, ctx, cfg.max_samples)
        scores = class_importance(graph, analysis, cfg.importance, cfg.aggregate, batches)
        plans = plan_steps(analysis, scores, round_to, cfg.min_channels)
        keep = np.ones(analysis.num_classes, dtype=bool)
        if cfg.ratio is not None:
            for steps in plans:
                size = len(analysis.groups[steps[0].group].blocks[steps[0].block])
                target_keep = size - math.floor(cfg.ratio * size)
                for step in steps:
                    if size - len(step.classes) < target_keep:
                        break
                    keep[step.classes] = False
                    size -= len(step.classes)
        else:
            what = "macs" if cfg.macs_reduction is not None else "params"
            target = cfg.macs_reduction if what == "macs" else cfg.params_reduction
            keep = self._global(graph, analysis, _merge(plans), what, float(target), report, shapes)

        if keep.all():
            report.warn("no channel removed: blocks too small for round_to/min_channels")
            self._details(report, analysis, keep)
            return report
        from onnxslim_edge.data import random_feeds

        model = export_graph(graph)
        feeds = [random_feeds(model, seed=ctx.seed + k, input_shapes=shapes) for k in (0, 1)]
        constants = removed_constants(graph, analysis, keep, feeds)
        if cfg.mode == "remove":
            counts = remove_channels(graph, analysis, keep, constants)
        else:
            counts = zero_channels(graph, analysis, keep, constants)
        for key, value in counts.items():
            report.count(key, value)
        self._details(report, analysis, keep)
        return report

    def _global(
        self,
        graph: gs.Graph,
        analysis: ChannelAnalysis,
        order: Sequence[Step],
        what: str,
        target: float,
        report: PassReport,
        shapes: Any = None,
    ) -> np.ndarray:
        """The keep mask of the shortest prefix of `order` that reaches `target`.

        MACs are counted at `shapes` (the Context's input shapes, else the calibration
        data's): with symbolic height and width every spatial size would count as 1."""
        from onnxslim_edge.analysis.cost import model_cost

        model = export_graph(graph)
        cost = _CostModel(graph, analysis, model, shapes)

        def keep_for(n: int) -> np.ndarray:
            keep = np.ones(analysis.num_classes, dtype=bool)
            for step in order[:n]:
                keep[step.classes] = False
            return keep

        lo, hi = 0, len(order)
        if cost.reduction(keep_for(hi), what) < target:
            lo = hi
        while lo < hi:
            mid = (lo + hi) // 2
            if cost.reduction(keep_for(mid), what) >= target:
                hi = mid
            else:
                lo = mid + 1
        n = lo

        base = cost.base_macs if what == "macs" else cost.base_params

        def measured(n: int) -> float:
            trial = graph.copy()
            remove_channels(trial, analysis, keep_for(n))
            c = model_cost(export_graph(trial.cleanup()), input_shapes=shapes)
            return 1.0 - (c.macs if what == "macs" else c.params) / max(base, 1)

        achieved = measured(n) if n else 0.0
        for _ in range(16):  # the estimate is exact for known shapes; this is the safety net
            if achieved >= target or n >= len(order):
                break
            n += 1
            achieved = measured(n)
        # the share of the last step, by the cost model (exact where shapes are known)
        last = cost.reduction(keep_for(n), what) - (
            cost.reduction(keep_for(n - 1), what) if n else 0
        )
        report.detail(
            target=what,
            requested=target,
            achieved=achieved,
            estimated=cost.reduction(keep_for(n), what),
            last_step=last,
            steps=n,
            steps_available=len(order),
        )
        if achieved < target:
            report.warn(
                f"{what}_reduction {target:.3f} not reachable: {achieved:.3f} at most "
                f"({sum(g.frozen is not None for g in analysis.groups)} of "
                f"{len(analysis.groups)} groups frozen)"
            )
        return keep_for(n)

    def _batches(self, graph: gs.Graph, ctx: Context, limit: int) -> Any:
        from onnxslim_edge.data import open_data

        return open_data(ctx.data, export_graph(graph), limit=limit, input_shapes=ctx.input_shapes)

    @staticmethod
    def _details(report: PassReport, analysis: ChannelAnalysis, keep: np.ndarray) -> None:
        pruned = 0
        for g in analysis.groups:
            kept = int(keep[g.classes].sum())
            pruned += kept < g.channels
            report.detail(
                group=g.id,
                sources=list(g.sources),
                channels=g.channels,
                kept=kept,
                blocks=[len(b) for b in g.blocks],
                frozen=g.frozen,
            )
        report.count("groups_pruned", pruned)
