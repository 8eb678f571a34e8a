"""Rewrite ops that have no gradient into exact equivalents that have one, before training.

ONNX Runtime training 1.19.2 registers no gradient for HardSwish, HardSigmoid, PRelu,
Softplus, Mish, Elu, Selu, Softsign and InstanceNormalization, and its LayerNormalization
gradient needs the optional outputs (measured here). Each is rewritten into ops that
have one, with the same output name, so nothing else changes:

    HardSigmoid(x; a, b)        -> Clip(x * a + b, 0, 1)
    HardSwish(x)                -> x * Clip(x * 1/6 + 1/2, 0, 1)
    PRelu(x, slope)             -> Relu(x) - slope * Relu(-x)
    Softplus(x)                 -> Relu(x) + Log(1 + Exp(-|x|))
    Mish(x)                     -> x * Tanh(Softplus(x))        (Softplus as above)
    Elu(x; a)                   -> Relu(x) + a * (Exp(Min(x, 0)) - 1)
    Selu(x; a, g)               -> g * Elu(x; a)
    Softsign(x)                 -> x / (1 + |x|)
    InstanceNormalization(x, s, b; eps)
        -> (x - m) / Sqrt(v + eps) * s + b, m and v the mean and variance over axes 2..
    LayerNormalization(x, s, b) -> the same node with its Mean and InvStdDev outputs
                                   (ORT's gradient reads them)
    Dropout(x, ...)             -> Identity(x) (inference: Dropout is the identity; a
                                   mask output, when read, stays a Dropout)

Exact up to float rounding (the tests compare each rewrite with the original op in ONNX
Runtime). Ops that still have no gradient are named by `blocked`: the trainer freezes
the weights upstream of them or stops with one error line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["NO_GRADIENT", "REWRITES", "Legalized", "blocked", "legalize"]

#: Ops without a gradient in ONNX Runtime training 1.19.2 and no rewrite here.
#: (If makes ORT abort outright; the engine's child process turns that into an error.)
NO_GRADIENT = frozenset(
    {
        "Einsum",
        "DepthToSpace",
        "SpaceToDepth",
        "Loop",
        "If",
        "Scan",
        "Celu",
        "LpNormalization",
        "GridSample",
        "RoiAlign",
    }
)


@dataclass
class Legalized:
    model: onnx.ModelProto
    rewrites: dict[str, int] = field(default_factory=dict)


class _Emitter:
    def __init__(self, graph: onnx.GraphProto, opset: int, base: str, read: set[str]) -> None:
        self.graph, self.opset, self.base, self.read = graph, opset, base, read
        self.nodes: list[onnx.NodeProto] = []
        self.k = 0

    def const(self, value: float | np.ndarray, dtype: type = np.float32) -> str:
        self.k += 1
        name = f"{self.base}/legal_c{self.k}"
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: object) -> str:
        self.k += 1
        name = out or f"{self.base}/legal_{op_type.lower()}{self.k}"
        node_name = f"{self.base}/legal_{op_type.lower()}{self.k}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=node_name, **attrs))
        return name

    def clip01(self, x: str, out: str | None = None) -> str:
        if self.opset >= 11:
            return self.op("Clip", x, self.const(0.0), self.const(1.0), out=out)
        return self.op("Clip", x, out=out, min=0.0, max=1.0)

    def softplus(self, x: str, out: str | None = None) -> str:
        relu = self.op("Relu", x)
        tail = self.op(
            "Log",
            self.op("Add", self.const(1.0), self.op("Exp", self.op("Neg", self.op("Abs", x)))),
        )
        return self.op("Add", relu, tail, out=out)

    def elu(self, x: str, alpha: float, out: str | None = None) -> str:
        neg = self.op("Min", x, self.const(0.0))
        tail = self.op(
            "Mul", self.const(alpha), self.op("Sub", self.op("Exp", neg), self.const(1.0))
        )
        return self.op("Add", self.op("Relu", x), tail, out=out)

    def reduce_mean(self, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.const(np.array(axes), np.int64), keepdims=1)
        return self.op("ReduceMean", x, axes=axes, keepdims=1)


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _hardsigmoid(e: _Emitter, n: onnx.NodeProto, ranks: Mapping[str, int]) -> bool:
    x = n.input[0]
    lin = e.op(
        "Add", e.op("Mul", x, e.const(_attr(n, "alpha", 0.2))), e.const(_attr(n, "beta", 0.5))
    )
    e.clip01(lin, out=n.output[0])
    return True


def _hardswish(e: _Emitter, n: onnx.NodeProto, ranks: Mapping[str, int]) -> bool:
    x = n.input[0]
    gate = e.clip01(e.op("Add", e.op("Mul", x, e.const(1.0 / 6.0)), e.const(0.5)))
    e.op("Mul", x, gate, out=n.output[0])
    return True


def _prelu(e: _Emitter, n: onnx.NodeProto, ranks: Mapping[str, int]) -> bool:
    x, slope = n.input[0], n.input[1]
    negative = e.op("Mul", slope, e.op("Relu", e.op("Neg", x)))
    e.op("Sub", e.op("Relu", x), negative, out=n.output[0])
    return True


def _softplus(e: _Emitter, n: onnx.NodeProto, ranks: Mapping[str, int]) -> bool:
    e.softplus(n.input[0], out=n.output[0])
    return True


def _mish(e: _Emitter, n: onnx.NodeProto, ranks: Mapping[str, int]) -> bool:
    x = n.input[0]
    e.op("Mul", x, e.op("Tanh", e.softplus(x)), out=n.output[0])
    return True


def _elu(e: _Emitter, n: onnx.NodeProto, ranks: Mapping[str, int]) -> bool:
    e.elu(n.input[0], _attr(n, "alpha", 1.0), out=n.output[0])
    return True


def _selu(e: _Emitter, n: onnx.NodeProto, ranks: Mapping[str, int]) -> bool:
    alpha = _attr(n, "alpha", 1.67326319217681884765625)
    gamma = _attr(n, "gamma", 1.05070102214813232421875)
    e.op("Mul", e.const(gamma), e.elu(n.input[0], alpha), out=n.output[0])
    return True


def _softsign(e: _Emitter, n: onnx.NodeProto, ranks: Mapping[str, int]) -> bool:
    x = n.input[0]
    e.op("Div", x, e.op("Add", e.const(1.0), e.op("Abs", x)), out=n.output[0])
    return True


def _instance_norm(e: _Emitter, n: onnx.NodeProto, ranks: Mapping[str, int]) -> bool:
    x, scale, bias = n.input[0], n.input[1], n.input[2]
    rank = ranks.get(x)
    if rank is None or rank < 3:
        return False
    axes = list(range(2, rank))
    mean = e.reduce_mean(x, axes)
    centered = e.op("Sub", x, mean)
    var = e.reduce_mean(e.op("Mul", centered, centered), axes)
    normed = e.op(
        "Div", centered, e.op("Sqrt", e.op("Add", var, e.const(_attr(n, "epsilon", 1e-5))))
    )
    shape = e.const(np.array([-1] + [1] * (rank - 2)), np.int64)
    scaled = e.op("Mul", normed, e.op("Reshape", scale, shape))
    e.op("Add", scaled, e.op("Reshape", bias, shape), out=n.output[0])
    return True


def _layer_norm(e: _Emitter, n: onnx.NodeProto, ranks: Mapping[str, int]) -> bool:
    if len(n.output) >= 3 and all(n.output):
        return False
    node = onnx.NodeProto()
    node.CopyFrom(n)
    outputs = list(node.output) + [""] * (3 - len(node.output))
    base = n.name or n.output[0]
    outputs[1] = outputs[1] or f"{base}/legal_mean"
    outputs[2] = outputs[2] or f"{base}/legal_inv_std"
    del node.output[:]
    node.output.extend(outputs)
    e.nodes.append(node)
    return True


def _dropout(e: _Emitter, n: onnx.NodeProto, ranks: Mapping[str, int]) -> bool:
    if len(n.output) > 1 and n.output[1] and n.output[1] in e.read:
        return False
    e.op("Identity", n.input[0], out=n.output[0])
    return True


Rewrite = Callable[[_Emitter, onnx.NodeProto, Mapping[str, int]], bool]

#: op type -> rewrite into ops with gradients (same output name).
REWRITES: Mapping[str, Rewrite] = {
    "HardSigmoid": _hardsigmoid,
    "HardSwish": _hardswish,
    "PRelu": _prelu,
    "Softplus": _softplus,
    "Mish": _mish,
    "Elu": _elu,
    "Selu": _selu,
    "Softsign": _softsign,
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
    "Dropout": _dropout,
}


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    out: dict[str, int] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = len(t.shape.dim)
    for init in g.initializer:
        out[init.name] = len(init.dims)
    return out


def legalize(model: onnx.ModelProto) -> Legalized:
    """A copy of `model` with every op in `REWRITES` replaced (main graph only)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 13)
    ranks = _ranks(out) if any(n.op_type == "InstanceNormalization" for n in graph.node) else {}
    counts: dict[str, int] = {}
    nodes: list[onnx.NodeProto] = []
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for i, node in enumerate(graph.node):
        rewrite = REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rewrite is not None:
            emitter = _Emitter(graph, opset, node.name or f"{node.op_type}_{i}", read)
            if rewrite(emitter, node, ranks):
                nodes.extend(emitter.nodes)
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
                continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return Legalized(out, counts)


def blocked(
    model: onnx.ModelProto, trainable: Iterable[str], ops: Iterable[str] = NO_GRADIENT
) -> dict[str, set[str]]:
    """`"op 'node'"` -> trainable initializers whose gradient would cross that node.

    A node blocks a parameter when the node has no gradient (`ops`: the engine's list,
    by default ONNX Runtime training's; or an op of another domain) and the parameter feeds it, directly or through other nodes. Nodes
    are visited in graph order, which ONNX requires to be topological.
    """
    wanted, ops = set(trainable), frozenset(ops)
    reach: dict[str, frozenset[str]] = {}  # tensor -> trainable params it depends on
    empty: frozenset[str] = frozenset()

    def upstream(tensor: str) -> frozenset[str]:
        return reach.get(tensor, frozenset({tensor}) if tensor in wanted else empty)

    out: dict[str, set[str]] = {}
    for node in model.graph.node:
        foreign = node.domain not in ("", "ai.onnx")
        inputs = [i for i in (*node.input, *_outer_names(node)) if i]
        if node.op_type in ops or foreign:
            params = set().union(*(upstream(i) for i in inputs))
            if params:
                out[f"{node.op_type} '{node.name}'"] = params
        deps = frozenset().union(*(upstream(i) for i in inputs))
        for o in node.output:
            reach[o] = deps
    return out


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            local |= {o for n in g.node for o in n.output}
            for n in g.node:
                names |= {i for i in n.input if i and i not in local}
                names |= _outer_names(n) - local
    return names
