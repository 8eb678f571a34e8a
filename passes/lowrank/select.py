"""Rank selection of the `lowrank` pass: which form and rank each layer gets.

Every layer offers *candidates*: a form and a rank with its MACs, weight elements and
error (the relative error its decomposition minimises: of the weight, or of the
layer's outputs on calibration data). Ranks are multiples of `round_to` (plus the
full rank); a candidate must save at least `min_saving` of the layer's MACs. Then:

- `energy`: per layer and form, the smallest rank keeping that fraction of the energy;
  of the forms, the one with the fewest MACs.
- `ratio`: per layer, the candidates that remove at least that fraction of its MACs;
  of those, the one with the lowest error (for a form, its largest such rank).
- a budget (`macs` or `params` to remove from the model): each layer's candidates
  form a lower convex hull of (saved, error^2) starting at the unsplit layer; all hull
  steps of all layers are taken in order of error added per MAC (or parameter) saved,
  least first, until the budget is met (so the budget is met within one step).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from onnxslim_edge.passes.lowrank.factors import Decomposition
from onnxslim_edge.passes.lowrank.layers import Layer

__all__ = [
    "Candidate",
    "by_budget",
    "by_energy",
    "by_ratio",
    "candidates",
    "form_ranks",
    "max_saving",
    "rank_grid",
]


@dataclass(frozen=True)
class Candidate:
    """One way to split one layer."""

    form: str
    rank: tuple[int, ...]
    macs: int
    params: int
    error: float
    energy: float

    def saved(self, dense: int, what: str) -> int:
        return dense - (self.macs if what == "macs" else self.params)


def rank_grid(full: int, round_to: int) -> list[int]:
    """Multiples of `round_to` below `full`, and `full` itself."""
    grid = list(range(round_to, full, round_to))
    return [*grid, full]


def _round_up(value: float, step: int, cap: int) -> int:
    return min(cap, max(step, math.ceil(value / step) * step))


def candidates(
    layer: Layer,
    decompositions: dict[str, Decomposition],
    round_to: int,
    min_saving: float,
) -> list[Candidate]:
    """The layer's candidates in every form of `decompositions` that save `min_saving`."""
    dense_macs, _ = layer.dense()
    out: list[Candidate] = []
    for form, dec in decompositions.items():
        for rank in form_ranks(layer, form, dec, round_to):
            macs, params = layer.cost(form, rank)
            if macs > (1.0 - min_saving) * dense_macs:
                continue
            out.append(Candidate(form, rank, macs, params, dec.error(rank), dec.energy(rank)))
    return out


def form_ranks(
    layer: Layer, form: str, dec: Decomposition, round_to: int
) -> Iterable[tuple[int, ...]]:
    """Rank tuples of `form` on the grid; Tucker-2's input rank follows Cin / Cout."""
    if form != "tucker2":
        return [(r,) for r in rank_grid(dec.full_rank, round_to)]
    cout, cin = layer.weight.shape[:2]
    max_in = dec.u_in.shape[1]  # type: ignore[attr-defined]
    ranks = []
    for r_out in rank_grid(dec.full_rank, round_to):
        r_in = max_in if r_out == dec.full_rank else _round_up(r_out * cin / cout, round_to, max_in)
        ranks.append((r_in, r_out))
    return ranks


def by_energy(options: Sequence[Candidate], energy: float) -> Candidate | None:
    """Per form the smallest rank keeping `energy`; of those the fewest MACs."""
    best: dict[str, Candidate] = {}
    for c in options:
        if c.energy + 1e-12 >= energy:
            b = best.get(c.form)
            if b is None or c.macs < b.macs:
                best[c.form] = c
    return min(best.values(), key=lambda c: (c.macs, c.error), default=None)


def by_ratio(options: Sequence[Candidate], dense_macs: int, ratio: float) -> Candidate | None:
    """The lowest-error candidate removing at least `ratio` of the layer's MACs."""
    fit = [c for c in options if c.macs <= (1.0 - ratio) * dense_macs]
    return min(fit, key=lambda c: (c.error, c.macs), default=None)


@dataclass(frozen=True)
class _Step:
    layer: int
    candidate: Candidate
    gain: int  # saved units of this step
    slope: float  # error^2 added per unit saved


def _hull(options: Sequence[Candidate], dense: int, what: str) -> list[Candidate]:
    """The lower convex hull of (saved, error^2) from the unsplit layer (0, 0)."""
    points = sorted(
        {(c.saved(dense, what), c.error**2, i) for i, c in enumerate(options)},
        key=lambda p: (p[0], p[1]),
    )
    hull: list[tuple[float, float, int]] = [(0, 0.0, -1)]
    for p in points:
        if p[0] <= hull[-1][0]:
            continue  # saves no more than a point already on the hull
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            # drop the last point if it lies on or above the segment hull[-2] -> p
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return [options[i] for _, _, i in hull[1:]]


def by_budget(
    layers: Sequence[tuple[int, int, Sequence[Candidate]]],
    what: str,
    needed: float,
) -> tuple[dict[int, Candidate], float]:
    """The choice per layer meeting `needed` saved units (MACs or params) at the least
    error added per unit. `layers`: (index, dense units, candidates). Returns (choice by
    index, units saved); stops as soon as the need is met."""
    plans: list[list[_Step]] = []
    for index, dense, options in layers:
        steps, prev_saved, prev_err = [], 0, 0.0
        for c in _hull(options, dense, what):
            gain = c.saved(dense, what) - prev_saved
            slope = (c.error**2 - prev_err) / gain
            steps.append(_Step(index, c, gain, slope))
            prev_saved, prev_err = c.saved(dense, what), c.error**2
        if steps:
            plans.append(steps)
    heap = [(steps[0].slope, k, 0) for k, steps in enumerate(plans)]
    heapq.heapify(heap)
    choice: dict[int, Candidate] = {}
    saved = 0.0
    while heap and saved < needed:
        _, k, j = heapq.heappop(heap)
        step = plans[k][j]
        choice[step.layer] = step.candidate
        saved += step.gain
        if j + 1 < len(plans[k]):
            heapq.heappush(heap, (plans[k][j + 1].slope, k, j + 1))
    return choice, saved


def max_saving(layers: Sequence[tuple[int, int, Sequence[Candidate]]], what: str) -> float:
    """Units saved with every layer at its cheapest candidate."""
    return float(
        sum(max((c.saved(dense, what) for c in opts), default=0) for _, dense, opts in layers)
    )
