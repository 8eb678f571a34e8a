"""Graph edits of the `lowrank` pass: one layer node becomes two or three.

    Gemm(x, W, C)   => Gemm(x, A) -> Gemm(h, B, C)          (transA/transB layouts kept)
    MatMul(x, W)    => MatMul(x, A) -> MatMul(h, B)
    Conv(x, W, b)   => channel: Conv_k(x, V) -> Conv_1x1(h, US, b)
                       spatial: Conv_kh x 1(x, V1) -> Conv_1 x kw(h, V2, b)
                       tucker2: Conv_1x1(x, U_in^T) -> Conv_k(h1, G) -> Conv_1x1(h2, U_out, b)

The last node writes the layer's output tensor, so every reader and the graph
interface stay the same; the bias rides on the last product. New nodes are named
`<layer>.lowrank<i>`, their weights `<layer>.lowrank<i>.weight`, the intermediate
tensors `<layer>.lowrank<i>.out`. Spatial SVD splits strides, pads and dilations by
axis: (sh, 1) / (pt, 0, pb, 0) / (dh, 1) on the kh x 1 conv, (1, sw) / (0, pl, 0, pr) /
(1, dw) on the 1 x kw conv; it is exact because the conv has no bias before the last
factor and zero padding commutes with the first factor's linear map.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.graph import unique_name
from onnxslim_edge.passes.lowrank.factors import Factors
from onnxslim_edge.passes.lowrank.layers import Layer

__all__ = ["apply_split"]


def _names(graph: gs.Graph, taken: set[str], base: str) -> tuple[str, str]:
    return unique_name(graph, f"{base}.weight", taken), unique_name(graph, f"{base}.out", taken)


def apply_split(graph: gs.Graph, layer: Layer, factors: Factors, taken: set[str]) -> list[gs.Node]:
    """Replace `layer.node` by the factor nodes; returns them in order."""
    node = layer.node
    x, y = node.inputs[0], node.outputs[0]
    extra = list(node.inputs[2:3])  # bias / C
    attrs_list = _attrs(graph, layer, factors)
    nodes: list[gs.Node] = []
    current = x
    count = len(factors.weights)
    for i, (w, attrs) in enumerate(zip(factors.weights, attrs_list)):
        base = f"{layer.name}.lowrank{i}"
        w_name, out_name = _names(graph, taken, base)
        inputs = [current, gs.Constant(w_name, np.ascontiguousarray(w))]
        last = i == count - 1
        if last:
            inputs += extra
        elif layer.op == "Gemm" and _gemm_needs_c(graph):
            inputs.append(gs.Constant(unique_name(graph, f"{base}.c", taken), np.zeros(1, w.dtype)))
        out = y if last else gs.Variable(out_name, dtype=y.dtype)
        nodes.append(gs.Node(node.op, name=base, attrs=attrs, inputs=inputs, outputs=[out]))
        current = out
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend(nodes)
    return nodes


def _gemm_needs_c(graph: gs.Graph) -> bool:
    """Before opset 11 Gemm's C is required: the first factor gets a zero C."""
    return _opset(graph) < 11


def _opset(graph: gs.Graph) -> int:
    return int(graph.opset or 13)


def _attrs(graph: gs.Graph, layer: Layer, factors: Factors) -> list[dict[str, Any]]:
    node = layer.node
    attrs = dict(node.attrs)
    n = len(factors.weights)
    if layer.op == "MatMul":
        return [{} for _ in range(n)]
    if layer.op == "Gemm":
        trans_b = int(attrs.get("transB", 0))
        first = {"transA": int(attrs.get("transA", 0)), "transB": trans_b}
        second = {"transB": trans_b, "beta": float(attrs.get("beta", 1.0))}
        if _opset(graph) < 7:
            first["broadcast"] = second["broadcast"] = 1
        return [first, second]
    # Conv
    ndim = layer.weight.ndim - 2
    ones = [1] * ndim
    zeros = [0] * (2 * ndim)
    conv = {k: v for k, v in attrs.items() if k not in ("kernel_shape", "group")}
    kernel = list(layer.weight.shape[2:])
    pointwise = {"kernel_shape": ones}
    full = {**conv, "kernel_shape": kernel}
    if factors.form == "channel":
        return [full, pointwise]
    if factors.form == "tucker2":
        return [pointwise, full, pointwise]
    # spatial: split strides, pads, dilations by axis
    sh, sw = list(attrs.get("strides", ones))
    dh, dw = list(attrs.get("dilations", ones))
    pads = list(attrs.get("pads", zeros))
    pt, pl, pb, pr = pads
    kh, kw = kernel
    vertical = {"kernel_shape": [kh, 1], "strides": [sh, 1], "dilations": [dh, 1]}
    vertical["pads"] = [pt, 0, pb, 0]
    horizontal = {"kernel_shape": [1, kw], "strides": [1, sw], "dilations": [1, dw]}
    horizontal["pads"] = [0, pl, 0, pr]
    return [vertical, horizontal]


def layout_for(layer: Layer, factors: Factors) -> Factors:
    """Factors of a K x N matrix written in the layer's weight layout (Gemm transB: B^T)."""
    if layer.op == "Gemm" and layer.node.attrs.get("transB", 0):
        weights = tuple(np.ascontiguousarray(w.T) for w in factors.weights)
        return Factors(factors.form, factors.rank, weights, factors.energy, factors.weight_error)
    if layer.op == "Conv" and factors.form == "svd":  # conv as a matrix (Cin * prod(k), Cout)
        cout, cin, *k = layer.weight.shape
        a, b = factors.weights
        r = a.shape[1]
        ones = [1] * len(k)
        first = np.ascontiguousarray(a.T).reshape(r, cin, *k)
        weights = (first, np.ascontiguousarray(b.T).reshape(cout, r, *ones))
        return Factors("channel", factors.rank, weights, factors.energy, factors.weight_error)
    return factors
