"""The Q/DQ builder: rewrites a graph in place to carry a `Placement`.

`apply_placement(graph, placement, qparams, per_channel=...)` inserts
QuantizeLinear -> DequantizeLinear on each placed activation (rewiring the chosen
consumers), stores the weights of the placed layers as int8 initializers behind a
per-channel DequantizeLinear (`W -> DQ(W_int8, scale, 0)`), biases as int32 where the
placement asks for them (scale input_scale * weight_scale), and constant operands of
Add/Mul quantized; and records per-layer details in the report. Scales and zero points
are kept 0-d (a 1-element array stops ONNX Runtime's QDQ fusions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.graph import const_value, unique_name
from onnxslim_edge.passes.quantize.numerics import QParams, quantize_weight
from onnxslim_edge.passes.quantize.placement import Layer, Placement
from onnxslim_edge.pipeline import PassReport

__all__ = ["QDQ_OPSET", "apply_placement"]

#: The opset of per-axis DequantizeLinear (per-channel weights, int32 biases).
QDQ_OPSET = 13
_INT32_MAX = 2**31 - 1


class _Builder:
    """Inserts the Q/DQ nodes of a Placement into a graph."""

    def __init__(self, graph: gs.Graph, per_channel: bool) -> None:
        self.graph = graph
        self.opset = int(graph.opset)
        self.per_channel = per_channel and self.opset >= QDQ_OPSET
        self.taken = set(graph.tensors())
        self.nodes = {n.name: n for n in graph.nodes}

    def _name(self, base: str) -> str:
        return unique_name(self.graph, base, self.taken)

    def _const(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self._name(base), np.array(value, order="C"))  # keeps 0-d

    def _dq(self, base: str, q: Any, scale: gs.Constant, zp: gs.Constant | None, axis: int | None):
        out = gs.Variable(self._name(f"{base}_dq"), dtype=np.float32)
        attrs = {"axis": axis} if axis is not None else {}
        inputs = [q, scale] + ([zp] if zp is not None else [])
        self.graph.nodes.append(
            gs.Node(
                "DequantizeLinear", self._name(f"{base}_DequantizeLinear"), attrs, inputs, [out]
            )
        )
        return out

    def activation(
        self, tensor: Any, qp: QParams, consumers: set[tuple[str, int]] | None, skip: set[str]
    ) -> None:
        if consumers is None:
            targets = [
                (node, i)
                for node in list(tensor.outputs)
                if node.name not in skip
                for i, t in enumerate(node.inputs)
                if t is tensor
            ]
        else:
            targets = [(self.nodes[n], slot) for n, slot in sorted(consumers)]
        name = tensor.name
        dtype = np.int8 if qp.dtype == "int8" else np.uint8
        scale = self._const(f"{name}_scale", np.array(qp.scale, np.float32))
        zp = self._const(f"{name}_zero_point", np.array(qp.zero_point, dtype))
        q = gs.Variable(self._name(f"{name}_q"), dtype=dtype, shape=tensor.shape)
        qnode = gs.Node(
            "QuantizeLinear", self._name(f"{name}_QuantizeLinear"), {}, [tensor, scale, zp], [q]
        )
        dq = self._dq(name, q, scale, zp, None)
        dq.shape = tensor.shape
        for node, slot in targets:
            node.inputs[slot] = dq
        self.graph.nodes.append(qnode)

    def constant(self, node_name: str, slot: int, dtype: str) -> None:
        """Store a constant operand quantized per tensor: uint8 on [min(0, c), max(0, c)]
        (a scalar lands on the grid's end, exact up to float32 rounding), or symmetric
        int8; read by a DQ."""
        node = self.nodes[node_name]
        c = const_value(node.inputs[slot]).astype(np.float64)
        lo, hi = min(float(c.min()), 0.0), max(float(c.max()), 0.0)
        if dtype == "int8":
            scale = max(-lo, hi) / 127.0 or 1.0
            zp, qmin, qmax, np_type = 0, -127, 127, np.int8
        else:
            scale = (hi - lo) / 255.0 or 1.0
            zp, qmin, qmax, np_type = round(-lo / scale), 0, 255, np.uint8
        scale = float(np.float32(scale))
        q = np.clip(np.rint(c / scale) + zp, qmin, qmax).astype(np_type)
        base = f"{node.name}_const{slot}"
        qc = self._const(f"{base}_q", q)
        sc = self._const(f"{base}_scale", np.array(scale, np.float32))
        zc = self._const(f"{base}_zero_point", np.array(zp, np_type))
        node.inputs[slot] = self._dq(base, qc, sc, zc, None)

    def weight(self, layer: Layer) -> dict[str, Any]:
        node = self.nodes[layer.node]
        w = const_value(node.inputs[layer.weight_slot])
        axis = layer.axis if self.per_channel else None
        q, scale = quantize_weight(w, axis)
        base = f"{node.name}_w"
        qc = self._const(f"{base}_int8", q)
        sc = self._const(f"{base}_scale", scale)
        zp = self._const(f"{base}_zero_point", np.zeros(scale.shape, np.int8))
        node.inputs[layer.weight_slot] = self._dq(base, qc, sc, zp, axis)
        return {"weight_axis": axis, "weight_scale": scale}

    def bias(self, layer: Layer, x_scale: float, w_scale: np.ndarray) -> bool:
        node = self.nodes[layer.node]
        b = const_value(node.inputs[layer.bias_slot])
        if b is None or b.dtype != np.float32 or b.ndim != 1:
            return False
        scale = (np.float32(x_scale) * np.broadcast_to(w_scale, b.shape)).astype(np.float32)
        if np.any(scale <= 0):
            return False
        q = np.rint(b.astype(np.float64) / scale)
        if np.any(np.abs(q) > _INT32_MAX):
            return False
        base = f"{node.name}_bias"
        qc = self._const(f"{base}_int32", q.astype(np.int32))
        sc = self._const(f"{base}_scale", scale)
        if self.opset < QDQ_OPSET:
            return False  # per-axis DequantizeLinear needs opset 13
        node.inputs[layer.bias_slot] = self._dq(base, qc, sc, None, 0)
        return True


def apply_placement(
    graph: gs.Graph,
    placement: Placement,
    qparams: Mapping[str, QParams],
    *,
    per_channel: bool,
    report: PassReport | None = None,
) -> None:
    """Rewrite `graph` in place: Q/DQ on the placed activations, int8 weights."""
    builder = _Builder(graph, per_channel)
    tensors = graph.tensors()
    originals = {
        name: [builder.nodes[name].inputs[slot].name for slot in layer.act_slots]
        for name, layer in placement.layers.items()
    }
    for name, consumers in placement.acts.items():
        builder.activation(tensors[name], qparams[name], consumers, placement.skip_rewire)
    act_dtype = next((qp.dtype for qp in qparams.values()), "uint8")
    for node_name, slot in placement.constants:
        builder.constant(node_name, slot, act_dtype)
    for layer in placement.layers.values():
        detail: dict[str, Any] = {"node": layer.node, "op": layer.op}
        inputs = {}
        for original in originals[layer.node]:
            qp = qparams.get(original)
            if qp is None:  # cannot happen: every layer input is placed
                continue
            inputs[original] = {
                "amax": qp.amax,
                "scale": qp.scale,
                "zero_point": qp.zero_point,
                "dtype": qp.dtype,
                "method": qp.method,
                "sqnr_db": qp.sqnr_db,
            }
        detail["inputs"] = inputs
        if layer.weight_slot is not None:
            info = builder.weight(layer)
            ws = info["weight_scale"]
            detail["weight_axis"] = info["weight_axis"]
            detail["weight_scale_min"] = float(ws.min())
            detail["weight_scale_max"] = float(ws.max())
            if placement.int32_bias and layer.bias_slot is not None and len(inputs) == 1:
                x_scale = next(iter(inputs.values()))["scale"]
                detail["bias"] = "int32" if builder.bias(layer, x_scale, ws) else "float"
        if report is not None:
            report.detail(**detail)
            report.count("layers_quantized")
    if report is not None and placement.acts:
        report.count("activations_quantized", len(placement.acts))
