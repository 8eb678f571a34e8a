"""Quantization-aware training graphs: float weights trained through fixed Q/DQ grids.

A quantized student stores each weight as an integer initializer read by a
DequantizeLinear (per channel or per tensor). `prepare_qat` gives the training graph a
float parameter `W` (the dequantized weight) in its place and computes

    DequantizeLinear(W_int, s, z)  ->  W + offset,   offset = fq(W) - W fed every step

where `fq(W) = (clip(round(W / s) + z) - z) * s` on the node's own grid: the forward pass
sees exactly the int8 weight, and the gradient reaches `W` unchanged (a straight-through
estimator; ONNX Runtime training's FakeQuant is per tensor only, so per-channel weights
cannot go through it). Activation Quantize->Dequantize pairs stay; ORT training turns
each into FakeQuant (straight-through inside the range), and each gets its own copy of
its scale and zero point (a shared initializer makes ORT 1.19.2's fusion fail). Scales
never train. `FakeQuantWeight.quantize` turns a trained `W` back into the integer
initializer (symmetric int8 weights clipped to [-127, 127], as TensorRT requires), so
the exported model keeps every Q/DQ node as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["FakeQuantWeight", "offset_input", "prepare_qat"]

_INT_RANGES = {
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int16): (-32768, 32767),
    np.dtype(np.uint16): (0, 65535),
}


def offset_input(param: str) -> str:
    return f"distill.qat_offset.{param}"


@dataclass
class FakeQuantWeight:
    """One integer weight trained as the float parameter `param`."""

    param: str
    initializer: str  # the integer initializer in the student
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    dtype: np.dtype

    def _shaped(self, values: np.ndarray, rank: int) -> np.ndarray:
        if values.ndim == 0 or values.size == 1:
            return values.reshape(())
        shape = [1] * rank
        shape[self.axis % rank] = values.size
        return values.reshape(shape)

    def quantize(self, weight: np.ndarray) -> np.ndarray:
        lo, hi = _INT_RANGES[self.dtype]
        if self.dtype == np.int8 and not np.any(self.zero_point):
            lo = -127  # symmetric int8 weights stay in [-127, 127] (TensorRT's rule)
        s = self._shaped(self.scale.astype(np.float32), weight.ndim)
        z = self._shaped(self.zero_point.astype(np.int64), weight.ndim)
        q = np.clip(np.round(weight / s) + z, lo, hi)
        return q.astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        s = self._shaped(self.scale.astype(np.float32), q.ndim)
        z = self._shaped(self.zero_point.astype(np.int64), q.ndim)
        return ((q.astype(np.int64) - z) * s).astype(np.float32)

    def offset(self, weight: np.ndarray) -> np.ndarray:
        return self.dequantize(self.quantize(weight)) - weight


def prepare_qat(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[FakeQuantWeight]]:
    """A copy of `model` with integer weights as float parameters (see the module doc)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    weights: list[FakeQuantWeight] = []
    nodes: list[onnx.NodeProto] = []
    copies = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
            src = inits.get(node.input[0])
            values = numpy_helper.to_array(src) if src is not None else None
            if values is not None and values.dtype in _INT_RANGES:
                scale = numpy_helper.to_array(inits[node.input[1]])
                zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
                zp = (
                    numpy_helper.to_array(inits[zp_name])
                    if zp_name
                    else np.zeros(scale.shape, values.dtype)
                )
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                fq = FakeQuantWeight(
                    param=f"{src.name}.distill_float",
                    initializer=src.name,
                    scale=scale,
                    zero_point=zp,
                    axis=axis,
                    dtype=values.dtype,
                )
                graph.initializer.append(numpy_helper.from_array(fq.dequantize(values), fq.param))
                graph.input.append(
                    helper.make_tensor_value_info(
                        offset_input(fq.param), onnx.TensorProto.FLOAT, list(values.shape)
                    )
                )
                nodes.append(
                    helper.make_node(
                        "Add",
                        [fq.param, offset_input(fq.param)],
                        [node.output[0]],
                        name=f"{node.name or node.output[0]}/fake_quant",
                    )
                )
                weights.append(fq)
                continue
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node = _own_qparams(node, inits, graph, copies)
            copies += 1
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return out, weights


def _own_qparams(
    node: onnx.NodeProto, inits: dict, graph: onnx.GraphProto, k: int
) -> onnx.NodeProto:
    """`node` reading private copies of its scale and zero point initializers."""
    new = onnx.NodeProto()
    new.CopyFrom(node)
    for pos in (1, 2):
        if pos < len(new.input) and new.input[pos] in inits:
            values = numpy_helper.to_array(inits[new.input[pos]])
            name = f"{new.input[pos]}.distill_q{k}"
            dtype = helper.np_dtype_to_tensor_dtype(values.dtype)
            graph.initializer.append(
                helper.make_tensor(name, dtype, list(values.shape), values.ravel().tolist())
            )
            new.input[pos] = name
    return new
