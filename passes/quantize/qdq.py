"""The `quantize` pass: int8 post-training quantization by QuantizeLinear/DequantizeLinear.

`Quantize` calibrates activation ranges on the Context's data (one streamed
`Calibrator` pass for every tensor it may quantize), then rewrites the graph:

- weights of Conv/ConvTranspose/Gemm/MatMul: symmetric int8 in [-127, 127], one
  scale per output channel (Conv axis 0, ConvTranspose 1, Gemm 0 with transB=1 else 1,
  MatMul the last axis), stored as int8 initializers read by a DequantizeLinear
  (`W -> DQ(W_int8, scale, 0)`), so weights take a quarter of the bytes;
- activations: one scale per tensor, `x -> DQ(Q(x))`.

Placement depends on the target (`ctx.target`):

- `tensorrt`: int8 with zero point 0 everywhere; Q/DQ on the activation inputs of
  Conv/ConvTranspose/Gemm/MatMul (both inputs of a MatMul/Gemm of two activations);
  on a residual Add only the skip input (the side not coming from a quantized Conv;
  the second input when both do); quantized tensors joined by a Concat share one
  scale (the largest amax of the group); biases and graph outputs stay float. The
  result passes `lint_qdq` without errors.
- `onnxruntime-cpu`: ONNX Runtime's QDQ format, which its graph optimizer fuses into
  QLinearConv/QLinearMatMul/QGemm/QLinearAdd kernels: Q/DQ on every float activation
  input *and* output of the quantized layers (an output is taken after a following
  Relu/Clip, which ONNX Runtime then folds into the Q), biases as int32 with scale
  input_scale * weight_scale, the inputs and outputs of Add/Mul/Concat/pooling wrapped
  too (`ORT_EXTRA_OPS`; the float constant of such an Add/Mul stored quantized), and
  (with `activation_dtype="auto"`) uint8 activations with a zero point covering each
  sign's calibrated range — measured fastest (see docs/quantization.md).

Before calibrating, on the tensorrt target in a graph with a LayerNorm (a transformer;
`smooth="auto"`; `smooth="on"` for onnxruntime-cpu too), each MatMul/Gemm activation is smoothed into the layer's weight, SmoothQuant-style
(`smooth`): its per-channel spread (a LayerNorm output's outlier channels) moves into
the per-channel weight scales; exact on the float model.

With `consumer_ranges` (default) a tensor whose readers are all flat past some bound
(Relu, Clip, HardSigmoid, HardSwish and its Add/Clip/Mul export, constant Adds before
them) gets its calibrated range narrowed to the part they can tell apart
(`ranges.useful_range`).

In a transformer, the onnxruntime-cpu layout leaves `placement.float_region` in float
(LayerNorm, Softmax, GELU, the attention mask, residual sums: an asymmetric uint8 grid
over a -10000 mask destroyed the attention scores); a tensor that took inf/NaN in
calibration is never quantized.

Lossy: its error measure is the output fidelity against the float model (SQNR,
cosine, top-1 agreement, measured by `onnxslim_edge.verify.Evaluator`). The pass
always measures the fully quantized model (the fidelity guard, `fidelity_guard`):
against the floors set (`min_sqnr_db`, `min_cosine`, `min_top1_agreement`), else the
default floors `config.DEFAULT_FLOORS` (cosine 0.95, SQNR 10 dB), on `guard_samples`
samples held back after the calibration samples when the data has them, else on
calibration samples. When it misses a floor it leaves the most sensitive layers in
float (ranked by `sensitivity.rank_layers`) one by one until the floor is met, or
raises FidelityError after `fallback_max_layers`: never a model below the floors
without a word.

This module holds only the pass; the parts live beside it: `config` (options),
`numerics` (int8 arithmetic), `placement` (what goes where), `ranges` (range
narrowing), `builder` (the graph rewrite), `quantizer` (calibrated builds),
`sensitivity` (layer ranking), `calibrate` (statistics and thresholds).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import onnx_graphsurgeon as gs

from onnxslim_edge.errors import DataError
from onnxslim_edge.passes.quantize.builder import QDQ_OPSET
from onnxslim_edge.passes.quantize.config import QuantizeConfig, parse_override
from onnxslim_edge.passes.quantize.placement import (
    WEIGHT_OPS,
    Analysis,
    has_layer_norm,
    name_nodes,
)
from onnxslim_edge.passes.quantize.quantizer import Quantizer, prepare_float_model
from onnxslim_edge.passes.quantize.sensitivity import EVAL_SAMPLES, rank_layers
from onnxslim_edge.passes.quantize.smooth import channel_amax, smooth_graph, smooth_targets
from onnxslim_edge.pipeline import Context, FidelityError, Pass, PassReport
from onnxslim_edge.verify import Evaluator, Fidelity

__all__ = ["Quantize", "QuantizeConfig"]

log = logging.getLogger(__name__)

_DEFAULT_BATCH = 8


def _upgrade_opset(graph: gs.Graph, report: PassReport) -> bool:
    """Convert the graph to opset 13 in place (per-axis DequantizeLinear); False when the
    converter fails (the pass then quantizes weights per tensor, or not at all)."""
    from onnx import version_converter

    try:
        model = gs.export_onnx(graph.copy(), do_type_check=False)
        converted = version_converter.convert_version(model, QDQ_OPSET)
        new = gs.import_onnx(converted)
    except Exception as exc:  # the converter raises many types
        report.warn(f"cannot convert opset {graph.opset} to {QDQ_OPSET}: {exc}".splitlines()[0])
        return False
    graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
    graph.opset = new.opset
    graph.import_domains = new.import_domains
    report.count("opset_upgraded")
    return True


class Quantize(Pass):
    """Float Conv/ConvTranspose/Gemm/MatMul -> int8 weights + Q/DQ'd activations.

    Scope: layers whose activation input is float32 and whose weight is a float32
    constant (or, for MatMul/Gemm, a second float32 activation); see the module
    docstring for the placement per target. Lossy: the report gives per-layer scales
    and ranges, what was kept in float and why, and the fidelity the guard measured
    (SQNR, cosine, top-1 agreement against the float model, and on which samples).
    """

    name = "quantize"
    Config = QuantizeConfig

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:

        report = self.new_report()
        cfg: QuantizeConfig = self.config
        if ctx.data is None:
            raise DataError("quantize needs calibration data (--calib)")
        if int(graph.opset) < 10:
            probe = Analysis(graph)
            if not probe.layers:
                for node, reason in probe.unsupported:
                    report.skip(node, reason)
                return report
            if not _upgrade_opset(graph, report):
                for node in graph.nodes:
                    if node.op in WEIGHT_OPS:
                        report.skip(node, f"opset {graph.opset} has no QuantizeLinear (needs 10)")
                return report
        elif int(graph.opset) < QDQ_OPSET and cfg.per_channel:
            probe = Analysis(graph)
            if probe.layers and not _upgrade_opset(graph, report):
                report.warn(f"opset {graph.opset}: weights quantized per tensor")
        if cfg.smooth == "on" or (
            cfg.smooth == "auto" and ctx.target.name == "tensorrt" and has_layer_norm(graph)
        ):
            self._smooth(graph, ctx, report)
        float_model = prepare_float_model(graph)
        quantizer = Quantizer(float_model, cfg, ctx.target.name)
        for node, reason in quantizer.analysis.unsupported:
            report.skip(node, reason)
        exclusions = quantizer.config_exclusions()
        nodes = {n.name: n for n in quantizer.analysis.graph.nodes}
        layer_names = {lay.node for lay in quantizer.analysis.layers}
        for name, reason in exclusions.items():
            if name in layer_names:
                report.skip(nodes[name], reason)
        if not (layer_names - set(exclusions)):
            report.warn("nothing to quantize")
            return report
        tensors = quantizer.tensors_to_calibrate(exclusions)
        source = _calibration_data(ctx, float_model, cfg)
        quantizer.calibrate(source, tensors, progress=ctx.progress)
        for note in quantizer.cache_notes:
            report.warn(note)
        known = set(tensors)
        for name in quantizer.overrides:
            if name not in known:
                report.warn(f"override for '{name}': not a quantized tensor")
        excluded = set(exclusions)
        guard: dict[str, Any] = {}
        if cfg.floors:
            evaluator, where = self._evaluator(quantizer, source, ctx)
            excluded = self._fallback(quantizer, evaluator, where, excluded, report, guard)
        quantizer.apply(graph, excluded, report=report)
        if guard:  # after the per-layer details
            report.detail(**guard)
        quantizer.save_cache()
        return report

    def _smooth(self, graph: gs.Graph, ctx: Context, report: PassReport) -> None:
        """SmoothQuant-style smoothing of the layers' activations (`smooth`), measured
        on the calibration samples; exact on the float model. Layers excluded by name
        or op type, and tensors with an `overrides` range, are left alone."""

        cfg: QuantizeConfig = self.config
        try:
            one_shot = iter(ctx.data) is ctx.data
        except TypeError:
            one_shot = False
        if one_shot:
            report.warn("smoothing skipped: the data is a one-shot iterator (it is read twice)")
            return
        name_nodes(graph)
        patterns = [re.compile(p) for p in cfg.exclude_nodes]
        excluded = {
            n.name
            for n in graph.nodes
            if n.op in cfg.exclude_ops
            or any(n.name == p.pattern or p.fullmatch(n.name) for p in patterns)
        }
        # a tensor whose range the user fixed keeps its values (and its name)
        fixed = {parse_override(t)[0] for t in cfg.overrides}
        targets = [t for t in smooth_targets(graph, excluded) if t not in fixed]
        if not targets:
            return
        model = prepare_float_model(graph)
        amax = channel_amax(model, targets, _calibration_data(ctx, model, cfg))
        details = smooth_graph(graph, amax, alpha=cfg.smooth_alpha, excluded=excluded)
        if details:
            report.count("smoothed_activations", len(details))
            report.detail(smoothing=details, smooth_alpha=cfg.smooth_alpha)

    def _evaluator(self, quantizer: Quantizer, source: Any, ctx: Context) -> tuple[Evaluator, str]:
        """The evaluator the floors are checked with, and which samples it holds: the
        `guard_samples` samples after the calibration samples when the data has them
        ("held-back"), else the first calibration samples (`EVAL_SAMPLES` with a floor
        set in the options, `guard_samples` for the default guard alone)."""
        cfg: QuantizeConfig = self.config
        held = _held_back(ctx, quantizer.model, cfg.max_calibration_samples, cfg.guard_samples)
        if held:
            return Evaluator(quantizer.model, held, batch_size=source.batch_size), "held-back"
        n = EVAL_SAMPLES if cfg.user_floors else cfg.guard_samples
        evaluator = Evaluator(quantizer.model, source, max_samples=n, batch_size=source.batch_size)
        return evaluator, "calibration"

    def _fallback(
        self,
        quantizer: Quantizer,
        evaluator: Evaluator,
        where: str,
        excluded: set[str],
        report: PassReport,
        guard: dict[str, Any],
    ) -> set[str]:
        """Measure the quantized model; below a floor, keep the most sensitive layers in
        float one by one until it holds, or raise FidelityError. The measurement goes
        into `guard` (the report's `fidelity` detail)."""
        cfg: QuantizeConfig = self.config
        floors = cfg.floors
        if not evaluator.samples:
            report.warn(
                "fidelity guard: no samples to measure (the data cannot be read twice); "
                "the quantized model is unchecked"
            )
            return excluded
        fid = evaluator.score(quantizer.build(excluded))
        misses = fid.misses(floors)
        kept: list[tuple[str, float | None]] = []
        if misses:
            first_miss = misses[0]
            ranking = rank_layers(
                quantizer.layers(excluded),
                lambda node: quantizer.build(excluded, only=[node]),
                evaluator,
            )
            report.detail(sensitivity=[r._asdict() for r in ranking])
            for item in ranking[: cfg.fallback_max_layers]:
                excluded = excluded | {item.node}
                kept.append((item.node, item.sqnr_db))
                fid = evaluator.score(quantizer.build(excluded))
                misses = fid.misses(floors)
                if not misses:
                    break
            if not misses:
                report.warn(
                    f"fidelity floor missed with every layer quantized ({first_miss}); "
                    f"met with {len(kept)} layer(s) kept in float"
                )
        guard.update(
            fidelity=_fidelity_detail(fid),
            floors=floors,
            kept_float=[k for k, _ in kept],
            fidelity_samples=evaluator.samples,
            fidelity_data=where,
        )
        if misses:
            report.detail(**guard)
            floor_text = ", ".join(f"{k}={v:g}" for k, v in floors.items())
            if not cfg.user_floors:
                floor_text += (
                    " (the fidelity guard's default floors: set min_cosine/min_sqnr_db to "
                    "change them, fidelity_guard=false to skip the check)"
                )
            raise FidelityError(
                f"quantize: cannot meet {floor_text} with {len(kept)} layer(s) kept in float "
                f"(fallback_max_layers={cfg.fallback_max_layers}): {misses[0]}"
            )
        nodes = {n.name: n for n in quantizer.analysis.graph.nodes}
        for rank, (name, sqnr) in enumerate(kept, start=1):
            alone = f"{sqnr:.1f} dB" if sqnr is not None else "undefined"
            report.skip(
                nodes[name],
                f"kept in float by fallback (#{rank} most sensitive: quantized alone the "
                f"output SQNR is {alone})",
            )
        report.count("fallback_layers", len(kept))
        return excluded


def _calibration_data(ctx: Context, model: Any, cfg: QuantizeConfig) -> Any:
    """The calibration samples for `model`: the Context's data at the run's shapes, in
    batches, at most `max_calibration_samples` (calibration and smoothing read these)."""
    from onnxslim_edge.data import open_data

    return open_data(
        ctx.data,
        model,
        batch_size=_DEFAULT_BATCH,
        limit=cfg.max_calibration_samples,
        input_shapes=ctx.data_shapes(model),
        seed=ctx.seed,
    )


def _held_back(ctx: Context, model: Any, skip: int | None, count: int) -> list[dict[str, Any]]:
    """Feeds of the `count` samples after the first `skip` (the calibration samples),
    or [] when the data has no more (or `skip` is None: every sample calibrates)."""
    from onnxslim_edge.data import open_data

    if skip is None:
        return []
    source = open_data(
        ctx.data,
        model,
        batch_size=_DEFAULT_BATCH,
        limit=skip + count,
        input_shapes=ctx.input_shapes,
        seed=ctx.seed,
    )
    if source.num_samples is not None and source.num_samples <= skip:
        return []  # known without reading it again
    feeds, seen = [], 0
    for n, feed in source.counted():
        start = max(0, skip - seen)
        seen += n
        if start < n:
            feeds.append({k: v[start:] for k, v in feed.items()})
    return feeds


_PER_OUTPUT = ("sqnr_db", "cosine", "top1_agreement", "kl_divergence", "nonfinite_mismatches")


def _fidelity_detail(fid: Fidelity) -> dict[str, Any]:
    """The report's `fidelity` detail: the worst output's metrics, and each output's."""
    per_output = {}
    for name, m in fid.outputs.items():
        values = m.to_dict()
        per_output[name] = {k: values[k] for k in _PER_OUTPUT}
    return {**fid.worst_metrics(), "per_output": per_output}
