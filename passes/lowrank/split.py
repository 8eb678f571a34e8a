"""The `lowrank` pass: split Gemm/MatMul/Conv weights into low-rank factor layers.

    Gemm/MatMul(x, W[K, N])   => (x A[K, r]) B[r, N]              truncated SVD
    Conv(x, W[Cout, Cin, k])  => channel SVD, spatial SVD or Tucker-2 (see `rewrite`)

Three parts, kept apart: the math (`factors`: decompositions, errors, the split of the
singular values), the selection (`select`: which form and rank, by energy, per-layer
ratio or a global MAC/parameter budget) and the graph rewrite (`rewrite`); `layers`
finds what can be split and what each split costs. This module holds the options and
the pass that ties them together.

Lossy. Error measure: the relative Frobenius error of each weight (or, with
`data_aware`, of each layer's outputs on the calibration data), reported per layer;
before returning, the pass compares the split model's outputs with its input's (on
`Context.data`, else synthetic inputs) and reports the metrics. A split model that
ONNX Runtime cannot run is an error, never a result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.errors import ConfigError, OnnxSlimEdgeError, first_line
from onnxslim_edge.graph import export_graph
from onnxslim_edge.passes.lowrank import factors as F
from onnxslim_edge.passes.lowrank.layers import MARKER, Layer, find_layers, layer_name, split_groups
from onnxslim_edge.passes.lowrank.rewrite import apply_split, layout_for
from onnxslim_edge.passes.lowrank.select import (
    Candidate,
    by_budget,
    by_energy,
    by_ratio,
    candidates,
    form_ranks,
    max_saving,
)
from onnxslim_edge.pipeline import Context, Pass, PassReport

__all__ = ["LowRank", "LowRankConfig"]

log = logging.getLogger(__name__)

_FORMS = ("auto", "channel", "spatial", "tucker2")
#: im2col rows taken from one calibration batch at most, and in all per layer (times the
#: patch length): the Gram matrix costs rows x (Cin k k)^2
_MAX_PATCHES = 2048
_PATCHES_PER_DIM = 16
#: longest patch (Cin * prod(k)) the data-aware variant takes; longer ones keep the weight error
_MAX_PATCH_DIM = 1152
_SELECTORS = ("energy", "ratio", "macs_reduction", "params_reduction", "ranks")


@dataclass(frozen=True, kw_only=True)
class LowRankConfig:
    """Options of the `lowrank` pass (give exactly one of the five selectors).

    - `energy`: per layer, the smallest rank keeping this fraction of sum s^2.
    - `ratio`: every layer loses at least this fraction of its MACs (lowest error).
    - `macs_reduction` / `params_reduction`: the model loses this fraction of its MACs /
      parameters, taken from the layers with the least error added per unit saved.
    - `ranks`: explicit `node=rank` entries (`a=16|b=8` on the command line); only
      those layers are split, at exactly those ranks (Tucker-2: r_in = r_out = rank).
    - `form`: the Conv decomposition, `auto` (per layer the lowest error for its MACs;
      with `ranks`: channel), `channel`, `spatial` or `tucker2`. Gemm/MatMul: SVD.
    - `round_to`: ranks are multiples of this (None: the target's, 8 for tensorrt, 16
      for onnxruntime-cpu), or the layer's full rank.
    - `min_saving`: a layer is split only when that saves at least this fraction of
      its MACs (negative values allow splits that cost MACs, e.g. to check full rank).
    - `exclude_nodes`: node names left alone.
    - `data_aware`: minimise ||W X - A B X|| on `Context.data` (up to `max_samples`
      samples) instead of ||W - A B||: Gemm/MatMul, and Conv in the channel form (X:
      im2col patches of at most 1152 = Cin * prod(k) values; not with auto_pad SAME),
      so those convs get the channel form; other convs, and with `form` spatial/tucker2
      all convs, keep the weight error.
    - `max_samples`: the samples of `Context.data` that `data_aware` reads.
    - `resplit`: also split factor layers an earlier run wrote (`<name>.lowrank<i>`);
      by default they are left alone and budgets count what they already saved.
    - `verify_samples`: samples of the fidelity check before returning.
    """

    energy: float | None = None
    ratio: float | None = None
    macs_reduction: float | None = None
    params_reduction: float | None = None
    ranks: tuple[str, ...] = ()
    form: Literal["auto", "channel", "spatial", "tucker2"] = "auto"
    round_to: int | None = None
    min_saving: float = 0.1
    exclude_nodes: tuple[str, ...] = ()
    data_aware: bool = False
    max_samples: int = 32
    resplit: bool = False
    verify_samples: int = 4

    def __post_init__(self) -> None:
        given = [
            k
            for k in _SELECTORS
            if (
                getattr(self, k) not in (None, ()) if k == "ranks" else getattr(self, k) is not None
            )
        ]
        if len(given) != 1:
            raise ConfigError(f"lowrank: give exactly one of {', '.join(_SELECTORS)}")
        for key in ("energy", "ratio", "macs_reduction", "params_reduction", "min_saving"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ConfigError(f"lowrank.{key}: expected a number, got {value!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"lowrank.energy: must be in (0, 1], got {self.energy}")
        for key in ("ratio", "macs_reduction", "params_reduction"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value < 1.0:
                raise ConfigError(f"lowrank.{key}: must be in (0, 1), got {value}")
        if not math.isfinite(self.min_saving) or self.min_saving >= 1.0:
            raise ConfigError(f"lowrank.min_saving: must be < 1, got {self.min_saving}")
        for key, low in (("max_samples", 1), ("verify_samples", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"lowrank.{key}: expected an integer >= {low}, got {value!r}")
        if self.round_to is not None and (
            isinstance(self.round_to, bool)
            or not isinstance(self.round_to, int)
            or self.round_to < 1
        ):
            raise ConfigError(f"lowrank.round_to: expected an integer >= 1, got {self.round_to!r}")
        if self.form not in _FORMS:
            raise ConfigError(
                f"lowrank.form: expected one of {', '.join(_FORMS)}, got {self.form!r}"
            )
        for key in ("exclude_nodes", "ranks"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(n, str) for n in value):
                raise ConfigError(f"lowrank.{key}: expected a list of strings")
            object.__setattr__(self, key, tuple(value))
        self.rank_map()  # validates the entries

    def rank_map(self) -> dict[str, tuple[int, ...]]:
        """`ranks` as {node: (rank,)} or, for `R_IN:R_OUT` (Tucker-2), {node: (r_in, r_out)}."""
        out: dict[str, tuple[int, ...]] = {}
        for entry in self.ranks:
            name, sep, value = entry.rpartition("=")
            try:
                rank = tuple(int(v) for v in value.split(":"))
            except ValueError:
                rank = (0,)
            if not sep or not name or len(rank) > 2 or min(rank) < 1:
                raise ConfigError(
                    f"lowrank.ranks: expected node=rank with a rank >= 1, got {entry!r}"
                )
            out[name] = rank
        return out


class LowRank(Pass):
    """Low-rank splitting of Gemm/MatMul/Conv(group 1) layers with constant weights.

    Lossy; its error measure is each weight's relative Frobenius error (Eckart-Young:
    no split of the same rank does better), or the layer outputs' on calibration data
    with `data_aware`. The layer's output tensor, its readers and the model interface
    are unchanged; a layer whose split saves less than `min_saving` of its MACs is
    left alone and reported with `report.skip`.
    """

    name = "lowrank"
    Config = LowRankConfig
    lossless = False

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        cfg: LowRankConfig = self.config
        report = self.new_report()
        round_to = cfg.round_to or ctx.target.round_to
        from onnxslim_edge.analysis.cost import model_cost
        from onnxslim_edge.graph import infer_shapes

        before = export_graph(graph)
        input_shapes = ctx.shapes_for(before)
        shapes = {k: v.shape for k, v in infer_shapes(before, input_shapes).items()}
        self._check_names(graph, cfg)
        exclude = set(cfg.exclude_nodes)
        layers, skips = find_layers(graph, shapes, tuple(exclude), resplit=cfg.resplit)
        for node, reason in skips:
            report.skip(node, reason)
        report.count("layers_found", len(layers))
        groups = [] if cfg.resplit else split_groups(graph, shapes)
        done = {g.base for g in groups}
        if cfg.ranks:
            wanted = cfg.rank_map()
            for name in sorted(set(wanted) & done):
                report.skip(name, "already split by lowrank")
            known = {layer.name for layer in layers} | done | {layer_name(n) for n, _ in skips}
            other = sorted(set(wanted) - known)
            if other:
                raise ConfigError(
                    f"lowrank.ranks: {other[0]!r} is not a Gemm, MatMul or Conv layer"
                )
            layers = [layer for layer in layers if layer.name in wanted]

        grams = self._grams(before, layers, ctx) if cfg.data_aware else {}
        fitting: list[Layer] = []
        decs: list[dict[str, F.Decomposition]] = []
        for layer in layers:
            d = _decompositions(layer, cfg.form, grams.get(layer.name))
            if d:
                fitting.append(layer)
                decs.append(d)
            else:
                report.skip(
                    layer.node, f"form {cfg.form} does not fit ({_why_not(layer, cfg.form)})"
                )
        layers = fitting

        cost = model_cost(before, input_shapes)
        choice = self._select(layers, decs, round_to, cost, groups, report)
        for i, c in sorted(choice.items()):
            _split(graph, layers[i], decs[i], c, layers[i].name in grams, report)
        if not choice:
            return report
        graph.cleanup().toposort()
        self._measure(before, cost, graph, ctx, report, input_shapes)
        return report

    # ------------------------------------------------------------------ selection

    def _select(
        self,
        layers: Sequence[Layer],
        decs: Sequence[dict[str, F.Decomposition]],
        round_to: int,
        cost: Any,
        groups: Sequence[Any],
        report: PassReport,
    ) -> dict[int, Candidate]:
        cfg: LowRankConfig = self.config
        if cfg.ranks:
            return self._explicit(layers, decs, report)
        options = [candidates(layer, d, round_to, cfg.min_saving) for layer, d in zip(layers, decs)]
        choice: dict[int, Candidate] = {}
        if cfg.energy is not None or cfg.ratio is not None:
            for i, (layer, opts) in enumerate(zip(layers, options)):
                if cfg.energy is not None:
                    c = by_energy(opts, cfg.energy)
                    why = f"no rank keeping energy {cfg.energy:g} saves min_saving {cfg.min_saving:.0%}"
                else:
                    c = by_ratio(opts, layer.dense()[0], cfg.ratio)
                    why = f"no rank removes {cfg.ratio:.0%} of its MACs"
                if c is None:
                    report.skip(
                        layer.node, _no_saving(layer, decs[i], round_to, cfg.min_saving, why)
                    )
                else:
                    choice[i] = c
            return choice
        what = "macs" if cfg.macs_reduction is not None else "params"
        target = float(cfg.macs_reduction if what == "macs" else cfg.params_reduction)
        total = cost.macs if what == "macs" else cost.params
        credit = sum(
            (g.dense_macs - g.macs) if what == "macs" else (g.dense_params - g.params)
            for g in groups
        )
        unsplit = total + credit
        needed = target * unsplit - credit
        dense = [layer.dense()[0 if what == "macs" else 1] for layer in layers]
        table = [(i, dense[i], opts) for i, opts in enumerate(options)]
        possible = max_saving(table, what)
        if needed > possible + 1e-9:
            raise ConfigError(
                f"lowrank.{what}_reduction {target:g} is not reachable: at most "
                f"{(credit + possible) / max(unsplit, 1):.3f} with round_to {round_to} and "
                f"min_saving {cfg.min_saving:g} ({sum(1 for o in options if o)} of "
                f"{len(layers)} layers can be split)"
            )
        for i, opts in enumerate(options):
            if not opts:
                report.skip(
                    layers[i].node, _no_saving(layers[i], decs[i], round_to, cfg.min_saving, "")
                )
        if needed <= 0:
            report.detail(
                target=what,
                requested=target,
                achieved=credit / max(unsplit, 1),
                note=f"met by {len(groups)} layer(s) split earlier",
            )
            return {}
        choice, saved = by_budget(table, what, needed)
        report.detail(
            target=what,
            requested=target,
            achieved=(credit + saved) / max(unsplit, 1),
            layers_chosen=len(choice),
            split_earlier=len(groups),
        )
        return choice

    def _explicit(
        self,
        layers: Sequence[Layer],
        decs: Sequence[dict[str, F.Decomposition]],
        report: PassReport,
    ) -> dict[int, Candidate]:
        cfg: LowRankConfig = self.config
        wanted = cfg.rank_map()
        choice: dict[int, Candidate] = {}
        for i, layer in enumerate(layers):
            r = wanted[layer.name]
            form, dec = next(iter(decs[i].items()))
            text = ":".join(map(str, r))
            if form == "tucker2":
                r = r * 2 if len(r) == 1 else r
                limit: tuple[int, ...] = (dec.u_in.shape[1], dec.full_rank)  # type: ignore[attr-defined]
            elif len(r) == 1:
                limit = (dec.full_rank,)
            else:
                raise ConfigError(
                    f"lowrank.ranks: {layer.name}: R_IN:R_OUT is for form tucker2, not "
                    f"{_form_name(layer, form)}"
                )
            if any(a > b for a, b in zip(r, limit)):
                raise ConfigError(
                    f"lowrank.ranks: {layer.name}: rank {text} > {':'.join(map(str, limit))}, "
                    f"the most a {layer.shape_text} {layer.op} weight allows in form "
                    f"{_form_name(layer, form)}"
                )
            macs, params = layer.cost(form, r)
            dense = layer.dense()[0]
            if macs > (1.0 - cfg.min_saving) * dense:
                saving = 1.0 - macs / max(dense, 1)
                report.skip(
                    layer.node,
                    f"rank {text} saves {saving:.0%} of its MACs, less than min_saving "
                    f"{cfg.min_saving:.0%}",
                )
                continue
            choice[i] = Candidate(form, r, macs, params, dec.error(r), dec.energy(r))
        return choice

    @staticmethod
    def _check_names(graph: gs.Graph, cfg: LowRankConfig) -> None:
        names = {layer_name(n) for n in graph.nodes if n.name or n.outputs}
        names |= {m["base"] for n in names if (m := MARKER.match(n))}
        for key, wanted in (("exclude_nodes", cfg.exclude_nodes), ("ranks", tuple(cfg.rank_map()))):
            missing = [n for n in wanted if n not in names]
            if missing:
                raise ConfigError(
                    f"lowrank.{key}: no node named {', '.join(repr(n) for n in missing)}"
                )

    # ------------------------------------------------------------------ data

    def _grams(
        self, model: Any, layers: Sequence[Layer], ctx: Context
    ) -> dict[str, tuple[np.ndarray, int]]:
        """Gram matrices X^T X (and row counts) of the inputs of the layers that have a
        matrix form (Gemm, MatMul; Conv as im2col patches) over the calibration data."""
        cfg: LowRankConfig = self.config
        if ctx.data is None:
            raise ConfigError("lowrank.data_aware: needs calibration data (Context.data / --calib)")
        channel = cfg.form in ("auto", "channel")
        wanted = [
            layer
            for layer in layers
            if (layer.op != "Conv" or channel) and _matrix_input(layer) is not None
        ]
        if not wanted:
            return {}
        from onnxslim_edge.data import open_data
        from onnxslim_edge.graph import exposing_session

        names = sorted({layer.input_tensor for layer in wanted})
        session = exposing_session(model, names, threads=1)
        inputs = {i.name for i in session.get_inputs()}
        grams: dict[str, tuple[np.ndarray, int]] = {}
        for feed in open_data(
            ctx.data, model, limit=cfg.max_samples, input_shapes=ctx.input_shapes
        ):
            values = dict(
                zip(names, session.run(names, {k: v for k, v in feed.items() if k in inputs}))
            )
            for layer in wanted:
                g, n = grams.get(layer.name, (0.0, 0))
                if layer.op == "Conv" and n >= _PATCHES_PER_DIM * layer.weight[0].size:
                    continue  # enough patches for this layer's Gram matrix
                rows = _matrix_input(layer)(np.asarray(values[layer.input_tensor], np.float64))
                grams[layer.name] = (g + rows.T @ rows, n + rows.shape[0])
        return grams

    # ------------------------------------------------------------------ fidelity

    def _measure(
        self, before: Any, c0: Any, graph: gs.Graph, ctx: Context, report: PassReport, shapes: Any
    ) -> None:
        """MACs and outputs of the split model against the input model's (cost `c0`);
        raises when the split model does not run."""
        from onnxslim_edge.analysis.cost import model_cost
        from onnxslim_edge.verify import compare

        after = export_graph(graph)
        c1 = model_cost(after, shapes)
        summary: dict[str, Any] = dict(
            model=True,
            macs_before=c0.macs,
            macs_after=c1.macs,
            macs_reduction=round(1.0 - c1.macs / max(c0.macs, 1), 6),
            params_before=c0.params,
            params_after=c1.params,
        )
        if self.config.verify_samples:
            try:
                result = compare(
                    before,
                    after,
                    data=ctx.data,
                    max_samples=self.config.verify_samples,
                    input_shapes=ctx.data_shapes(before),
                    seed=ctx.seed,
                )
            except OnnxSlimEdgeError as exc:  # the input model itself cannot run on it
                report.warn(f"fidelity not measured: {first_line(exc)}")
                result = None
            if result is not None:
                if result.messages:
                    raise RuntimeError(
                        f"lowrank: the split model does not run: {result.messages[0]}"
                    )
                summary["fidelity"] = {
                    "samples": result.samples,
                    "synthetic": result.synthetic,
                    "outputs": {
                        n: {
                            "cosine": m.cosine,
                            "sqnr_db": m.sqnr_db,
                            "max_abs_error": m.max_abs_error,
                            "top1_agreement": m.top1_agreement,
                        }
                        for n, m in result.outputs.items()
                    },
                }
                bad = [n for n, m in result.outputs.items() if m.nonfinite_mismatches]
                if bad:
                    raise RuntimeError(f"lowrank: the split model gives NaN/inf in {bad[0]}")
        report.detail(**summary)


def _split(
    graph: gs.Graph,
    layer: Layer,
    decs: Mapping[str, F.Decomposition],
    c: Candidate,
    data_aware: bool,
    report: PassReport,
) -> None:
    """Write `layer` split as candidate `c` into the graph and report it."""
    factors = layout_for(layer, decs[c.form].factors(c.rank))
    apply_split(graph, layer, factors, set(graph.tensors()))
    graph.nodes.remove(layer.node)
    macs, params = layer.dense()
    entry: dict[str, Any] = dict(
        layer=layer.name,
        op=layer.op,
        weight=list(layer.weight.shape),
        form=factors.form,
        rank=list(c.rank) if len(c.rank) > 1 else c.rank[0],
        energy=round(c.energy, 6),
        weight_error=round(factors.weight_error, 6),
        macs_before=macs,
        macs_after=c.macs,
        params_before=params,
        params_after=c.params,
    )
    if data_aware:
        entry["output_error"] = round(c.error, 6)
    report.detail(**entry)
    report.count("layers_split")


def _form_name(layer: Layer, form: str) -> str:
    return "svd" if layer.op != "Conv" else form


def _decompositions(
    layer: Layer, form: str, gram: tuple[np.ndarray, int] | None
) -> dict[str, F.Decomposition]:
    """The layer's decompositions in the forms `form` allows (auto: all that fit)."""
    if layer.op != "Conv":
        w = layer.weight
        return {"svd": F.DataAwareSVD(w, *gram) if gram is not None else F.MatrixSVD(w)}
    fits = layer.forms()
    forms = fits if form == "auto" else [f for f in fits if f == form]
    if gram is not None and "channel" in forms:
        # data-aware: the channel form only, so every layer's error is an output error
        cout = layer.weight.shape[0]  # the conv as the matrix (Cin * prod(k), Cout)
        return {"svd": F.DataAwareSVD(layer.weight.reshape(cout, -1).T, *gram)}
    out: dict[str, F.Decomposition] = {}
    for f in forms:
        if f == "channel":
            out[f] = F.ChannelSVD(layer.weight)
        elif f == "spatial":
            out[f] = F.SpatialSVD(layer.weight)
        else:
            out[f] = F.Tucker2(layer.weight)
    return out


def _why_not(layer: Layer, form: str) -> str:
    kernel = "x".join(map(str, layer.weight.shape[2:]))
    if math.prod(layer.weight.shape[2:]) == 1:
        return f"a {kernel} kernel has only the channel form"
    if form == "spatial" and len(layer.weight.shape) != 4:
        return "spatial SVD needs a 2-D kernel"
    if form == "spatial" and not layer.spatial_ok:
        return "auto_pad SAME cannot be split by axis"
    return f"kernel {kernel}"


def _matrix_input(layer: Layer) -> Any:
    """How to turn the layer's input into rows of X (X W is the layer), or None."""
    node = layer.node
    if layer.op == "Gemm":
        k = layer.weight.shape[0]
        return (
            (lambda x: x.T.reshape(-1, k))
            if node.attrs.get("transA", 0)
            else (lambda x: x.reshape(-1, k))
        )
    if layer.op == "MatMul":
        k = layer.weight.shape[0]
        return lambda x: x.reshape(-1, k)
    cin, *kernel = layer.weight.shape[1:]
    if not layer.spatial_ok or cin * math.prod(kernel) > _MAX_PATCH_DIM:
        return None  # auto_pad SAME (padding depends on shapes), or too long a patch
    nd = len(kernel)
    strides = list(node.attrs.get("strides", [1] * nd))
    dilations = list(node.attrs.get("dilations", [1] * nd))
    pads = list(node.attrs.get("pads", [0] * (2 * nd)))

    def rows(x: np.ndarray) -> np.ndarray:
        """im2col: one row (Cin * prod(k), channel-major like W's reshape) per output."""
        x = np.pad(x, [(0, 0), (0, 0), *zip(pads[:nd], pads[nd:])])
        span = [d * (k - 1) + 1 for d, k in zip(dilations, kernel)]
        win = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))
        win = win[(Ellipsis, *(slice(None, None, d) for d in dilations))]
        win = win[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
        # (N, Cin, *out, *k) -> (N, *out, Cin, *k), still a view of x
        win = np.moveaxis(win, 1, 1 + nd)
        positions = math.prod(win.shape[: 1 + nd])
        if positions > _MAX_PATCHES:  # large maps: a fixed random sample of the patches
            flat = np.sort(np.random.default_rng(0).choice(positions, _MAX_PATCHES, False))
            win = win[np.unravel_index(flat, win.shape[: 1 + nd])]
        return win.reshape(-1, cin * math.prod(kernel))

    return rows


def _no_saving(
    layer: Layer, decs: Mapping[str, F.Decomposition], round_to: int, min_saving: float, why: str
) -> str:
    """Why no candidate of `layer` qualifies."""
    dense = layer.dense()[0]
    best = -math.inf
    for form, dec in decs.items():
        for rank in form_ranks(layer, form, dec, round_to):
            best = max(best, 1.0 - layer.cost(form, rank)[0] / max(dense, 1))
            break  # the smallest rank saves the most
    if best < min_saving:
        return (
            f"no split saves min_saving {min_saving:.0%} of its MACs at round_to {round_to} "
            f"(best {best:.0%})"
        )
    return why or "no candidate"
