"""Empirical bias correction of a Q/DQ-quantized model from calibration data.

    b_c  +=  E[y_float_c - y_quant_c]        for each output channel c of each layer

for every Conv, Gemm and MatMul whose weight comes from a DequantizeLinear. y_float is
the layer's output tensor in the float reference model (`ctx.reference`; in a Pipeline
its input model), y_quant the same tensor in the quantized model, both over the
calibration data (`ctx.data`). Only per-channel sums are kept (float64), never the
activations, so memory does not grow with the data. Quantization error with a
non-zero mean (biased rounding, clipped outliers, asymmetric activations after ReLU)
shifts every later layer; removing the mean lowers the output MSE by its squared bias.

Layers are matched by node name (the quantize pass keeps them), checked for the same
op type, and compared on the tensor of the same name: layers whose output tensor the
reference lacks, or whose output is so far from the reference's (SQNR below
`min_sqnr_db`) that the two cannot be the same tensor (e.g. an `equalize` run after the
reference rescaled its channels), are skipped with the reason. A reference that
computes different values under the same names (an inexact pass between the reference
and quantization) cannot be detected in general: run bias-correct against the model
that was quantized.

`sequential=True` (default) corrects layers one at a time in topological order,
re-measuring each layer after the corrections before it: one pass over the data per
layer. `sequential=False` measures every layer in one pass over the data and corrects
all at once: L times faster, but a layer's measured error then includes the mean error
its inputs inherit from earlier layers, which those layers' own corrections also
remove, so deep chains are over-corrected.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_edge.errors import ConfigError, DataError
from onnxslim_edge.graph import (
    FLOAT_DTYPES,
    const_value,
    export_graph,
    exposing_session,
    set_constant_input,
    sole_consumer,
    unique_name,
)
from onnxslim_edge.pipeline import Context, Pass, PassReport

__all__ = ["BiasCorrect", "BiasCorrectConfig"]

log = logging.getLogger(__name__)

LAYERS = frozenset({"Conv", "Gemm", "MatMul"})
QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass(frozen=True, kw_only=True)
class BiasCorrectConfig:
    """Options of the `bias-correct` pass.

    - `sequential`: correct layer by layer, re-measuring after each (exact for chains;
      one pass over the data per layer) instead of all at once (one pass in total).
    - `max_samples`: use at most this many calibration samples (None: all).
    - `min_sqnr_db`: skip a layer whose quantized output is further than this from the
      reference's (the tensors then do not correspond).
    """

    sequential: bool = True
    max_samples: int | None = 256
    min_sqnr_db: float = 6.0

    def __post_init__(self) -> None:
        if not isinstance(self.sequential, bool):
            raise ConfigError(
                f"bias-correct.sequential: expected true/false, got {self.sequential!r}"
            )
        if self.max_samples is not None and (
            isinstance(self.max_samples, bool)
            or not isinstance(self.max_samples, int)
            or self.max_samples < 1
        ):
            raise ConfigError(
                f"bias-correct.max_samples: expected a positive integer, got {self.max_samples!r}"
            )
        if (
            isinstance(self.min_sqnr_db, bool)
            or not isinstance(self.min_sqnr_db, (int, float))
            or not math.isfinite(self.min_sqnr_db)
        ):
            raise ConfigError(
                f"bias-correct.min_sqnr_db: expected a number, got {self.min_sqnr_db!r}"
            )


class _Stats:
    """Per-channel sums of the float and quantized outputs of one layer."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.f = np.zeros(channels)
        self.q = np.zeros(channels)
        self.err2 = 0.0
        self.sig2 = 0.0

    def add_float(self, y: np.ndarray, axis: int) -> np.ndarray:
        flat = _channels_first(y, axis)
        self.f += flat.sum(axis=1)
        self.sig2 += float(np.square(flat).sum())
        self.n += flat.shape[1]
        return flat

    def add_quant(self, y: np.ndarray, axis: int, flat_float: np.ndarray) -> None:
        flat = _channels_first(y, axis)
        self.q += flat.sum(axis=1)
        self.err2 += float(np.square(flat - flat_float).sum())

    def correction(self) -> np.ndarray:
        return (self.f - self.q) / max(self.n, 1)

    def sqnr_db(self) -> float:
        if self.err2 == 0:
            return math.inf
        return 10 * math.log10(self.sig2 / self.err2) if self.sig2 > 0 else -math.inf


def _channels_first(y: np.ndarray, axis: int) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    return np.moveaxis(y, axis, 0).reshape(y.shape[axis], -1)


@dataclass
class _Layer:
    node: Any
    output: str
    axis: int  # channel axis of the output (negative for MatMul/Gemm: -1)
    channels: int


class BiasCorrect(Pass):
    """Quantized Conv/Gemm/MatMul (weight from DequantizeLinear) with bias b =>
    the same layer with b + E[y_float - y_quant] per output channel (a zero bias, or an
    Add after a MatMul, is created when missing). Lossy by nature: it changes outputs
    to remove the mean quantization error measured on `ctx.data` against
    `ctx.reference`; the error measure reported per layer is that mean (before) and
    the layer's output SQNR.

    A model without QuantizeLinear/DequantizeLinear is left unchanged (skip). Needs
    calibration data (DataError without) and the float reference (the Pipeline's input).
    Idempotent in expectation: a second run measures a mean error near zero and adds
    only sampling noise.

    Counters: `layers_corrected`. Details per layer: op, channels, mean |error| before,
    largest correction, SQNR (dB).
    """

    name: ClassVar[str] = "bias-correct"
    Config: ClassVar[type] = BiasCorrectConfig
    lossless: ClassVar[bool] = False

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        report = self.new_report()
        report.count("layers_corrected", 0)
        if not any(n.op in QDQ for n in graph.nodes):
            report.skip("model", "no QuantizeLinear/DequantizeLinear: not a quantized model")
            return report
        if ctx.data is None:
            raise DataError("bias-correct needs calibration data (Context.data / --data)")
        if ctx.reference is None:
            raise ConfigError("bias-correct needs the float reference model (Context.reference)")
        graph.toposort()
        layers = self._match(graph, ctx.reference, report)
        if not layers:
            return report
        from onnxslim_edge.data import open_data

        data = open_data(
            ctx.data,
            ctx.reference,
            limit=self.config.max_samples,
            input_shapes=ctx.data_shapes(ctx.reference),
            seed=ctx.seed,
        )
        ref_session = exposing_session(ctx.reference, [layer.output for layer in layers])
        if self.config.sequential:
            for layer in layers:
                stats = self._measure(graph, ref_session, [layer], data)
                self._apply(graph, layer, stats[0], report)
        else:
            stats = self._measure(graph, ref_session, layers, data)
            for layer, s in zip(layers, stats):
                self._apply(graph, layer, s, report)
        return report

    # ------------------------------------------------------------------ matching

    def _match(self, graph: gs.Graph, reference: onnx.ModelProto, report: PassReport) -> list:
        ref_nodes = {n.name: n for n in reference.graph.node if n.name}
        ref_tensors = {o for n in reference.graph.node for o in n.output}
        layers = []
        for node in graph.nodes:
            if node.op not in LAYERS or len(node.inputs) < 2:
                continue
            w = node.inputs[1]
            if not (len(w.inputs) == 1 and w.inputs[0].op == "DequantizeLinear"):
                continue  # not a quantized layer
            ref = ref_nodes.get(node.name)
            if ref is None:
                report.skip(node, "no node of this name in the reference model")
                continue
            if ref.op_type != node.op:
                report.skip(node, f"the reference's node of this name is a {ref.op_type}")
                continue
            out = node.outputs[0].name
            if out not in ref_tensors:
                report.skip(node, f"output tensor {out!r} is not in the reference model")
                continue
            reason = self._bias_problem(graph, node)
            if reason:
                report.skip(node, reason)
                continue
            wq = const_value(w.inputs[0].inputs[0])
            if wq is None:
                report.skip(node, "quantized weight is not a constant")
                continue
            if node.op == "Conv":
                axis, channels = 1, int(wq.shape[0])
            elif node.op == "Gemm":
                axis = 1
                channels = int(wq.shape[0] if node.attrs.get("transB", 0) else wq.shape[1])
            else:
                if wq.ndim != 2:
                    report.skip(node, f"MatMul weight has rank {wq.ndim}, expected 2")
                    continue
                axis, channels = -1, int(wq.shape[1])
            layers.append(_Layer(node, out, axis, channels))
        return layers

    def _bias_problem(self, graph: gs.Graph, node: Any) -> str | None:
        if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and not node.inputs[2].is_empty():
            b = node.inputs[2]
            if len(b.inputs) == 1 and b.inputs[0].op == "DequantizeLinear":
                return "bias is quantized (DequantizeLinear): not corrected"
            value = const_value(b)
            if value is None or value.dtype not in FLOAT_DTYPES:
                return "bias is not a float constant"
            if node.op == "Gemm" and value.ndim == 2 and value.shape[0] != 1:
                return "Gemm C is a full matrix, not a bias row"
        return None

    # ------------------------------------------------------------------ measuring

    def _measure(self, graph: gs.Graph, ref_session: Any, layers: list, data: Any) -> list:
        session = exposing_session(export_graph(graph), [layer.output for layer in layers])
        stats = [_Stats(layer.channels) for layer in layers]
        names = [layer.output for layer in layers]
        batches = 0
        for feed in data:
            batches += 1
            ref_out = ref_session.run(names, dict(feed))
            q_out = session.run(names, dict(feed))
            for layer, s, yf, yq in zip(layers, stats, ref_out, q_out):
                axis = layer.axis % yf.ndim
                flat = s.add_float(yf, axis)
                s.add_quant(yq, axis, flat)
            del ref_out, q_out
        if batches == 0:
            raise DataError("bias-correct: the calibration data is empty")
        return stats

    # ------------------------------------------------------------------ rewriting

    def _apply(self, graph: gs.Graph, layer: _Layer, stats: _Stats, report: PassReport) -> None:
        node = layer.node
        sqnr = stats.sqnr_db()
        if sqnr < self.config.min_sqnr_db:
            report.skip(
                node,
                f"output SQNR {sqnr:.1f} dB vs the reference is below {self.config.min_sqnr_db} "
                "dB: the tensors do not correspond",
            )
            return
        delta = stats.correction()
        if not np.all(np.isfinite(delta)):
            report.skip(node, "non-finite mean error")
            return
        dtype = np.float32
        base = node.name or node.op
        if node.op == "Conv":
            has = len(node.inputs) > 2 and not node.inputs[2].is_empty()
            b = const_value(node.inputs[2]) if has else np.zeros(layer.channels, np.float32)
            dtype = b.dtype
            set_constant_input(graph, node, 2, (b + delta).astype(dtype), f"{base}_bias")
        elif node.op == "Gemm":
            has = len(node.inputs) > 2 and not node.inputs[2].is_empty()
            beta = float(node.attrs.get("beta", 1.0)) if has else 1.0
            c = const_value(node.inputs[2]).astype(np.float64) if has else np.zeros(1)
            if beta == 0:
                c, beta = np.zeros(1), 1.0
            new = np.broadcast_to(c.reshape(-1) if c.ndim == 2 else c, (layer.channels,)) * beta
            new = new + delta
            if has:
                dtype = const_value(node.inputs[2]).dtype
            node.attrs["beta"] = 1.0
            set_constant_input(graph, node, 2, new.astype(dtype), f"{base}_C")
        else:
            self._matmul_bias(graph, node, delta, base)
        report.count("layers_corrected")
        report.detail(
            layer=node.name,
            op=node.op,
            channels=layer.channels,
            mean_abs_error_before=float(np.mean(np.abs(delta))),
            max_correction=float(np.max(np.abs(delta))),
            sqnr_db=sqnr,
        )

    def _matmul_bias(self, graph: gs.Graph, node: Any, delta: np.ndarray, base: str) -> None:
        y = node.outputs[0]
        add = sole_consumer(graph, y)
        if add is not None and add.op == "Add" and len(add.inputs) == 2:
            other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
            value = const_value(other)
            if (
                value is not None
                and value.dtype in FLOAT_DTYPES
                and value.ndim == 1
                and value.size in (1, delta.size)
            ):
                idx = list(add.inputs).index(other)
                new = (np.broadcast_to(value, delta.shape) + delta).astype(value.dtype)
                set_constant_input(graph, add, idx, new, f"{base}_bias")
                return
        # No bias Add to fold into: MatMul -> new tensor -> Add(delta) -> the old tensor.
        inner = gs.Variable(unique_name(graph, f"{y.name}_nobias"), y.dtype, y.shape)
        node.outputs[0] = inner
        const = gs.Constant(unique_name(graph, f"{base}_bias"), delta.astype(np.float32))
        graph.nodes.append(
            gs.Node(
                "Add",
                name=unique_name(graph, f"{base}_bias_add"),
                inputs=[inner, const],
                outputs=[y],
            )
        )
