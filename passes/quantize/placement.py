"""Where Q/DQ go: what can be quantized in a graph, and the placement per target.

`Analysis(graph)` lists the candidate layers (Conv/ConvTranspose/Gemm/MatMul with a
float32 activation input and a float32 constant weight, or two activations) in graph
order and why the other weight ops cannot be quantized. `make_placement(analysis,
included, layout=...)` decides the `Placement` for a set of included layers:

- `tensorrt`: Q/DQ on the activation inputs of the layers; on a residual Add only the
  skip input (the side not coming from a quantized Conv, looked through one
  BatchNormalization); biases and graph outputs stay float.
- `ort` (onnxruntime-cpu): Q/DQ on every float activation input and output of the
  layers (an output taken after a following Relu/Clip, which ONNX Runtime folds into
  the Q), int32 biases, and `ORT_EXTRA_OPS` (Add/Mul/Concat/pooling) wrapped too, the
  float constant of such an Add/Mul stored quantized. In a transformer the
  `float_region` (LayerNorm, Softmax, GELU, the attention mask, residual sums and the
  elementwise ops around them) is not wrapped, and a layer output read only by that
  region stays float (ONNX Runtime then runs the MatMul on int8 inputs with a float
  output; measured more accurate and faster, docs/quantization.md).

Either way tensors joined by a Concat share one scale (`Placement.groups`). Read-only:
nothing here rewrites the graph (see `builder`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.graph import const_value, infer_shapes
from onnxslim_edge.passes.quantize.numerics import weight_axis

__all__ = [
    "FLOAT_OPS",
    "ORT_EXTRA_OPS",
    "WEIGHT_OPS",
    "Analysis",
    "Layer",
    "Placement",
    "float_region",
    "has_layer_norm",
    "is_activation",
    "make_placement",
    "name_nodes",
]

#: Ops whose weights and inputs are quantized.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Activations ONNX Runtime folds into a following QuantizeLinear.
_FOLDED_ACTIVATIONS = ("Relu", "Clip")
#: Extra ops wrapped in Q/DQ for onnxruntime-cpu, so ONNX Runtime runs them on its
#: QLinear kernels instead of converting back to float (measured: docs/quantization.md).
ORT_EXTRA_OPS = ("Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Mul")
_CONV_OPS = ("Conv", "ConvTranspose")
#: Ops a transformer computes in float: normalization, attention probabilities, GELU,
#: masks. They seed the float region (`float_region`).
FLOAT_OPS = ("LayerNormalization", "Softmax", "Erf", "Gelu", "Where")
#: Elementwise ops the float region grows through (a decomposed LayerNorm or GELU, the
#: additive attention mask, residual sums and the bias Adds beside them).
_REGION_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Tanh")
#: Ops that only move or reshape data: the region is looked for through them.
_MOVE_OPS = ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast")


@dataclass
class Layer:
    """A node that can be quantized: its weight slot (None for two activations), the
    weight's output-channel axis and the input slots holding activations."""

    node: str
    op: str
    weight_slot: int | None
    axis: int | None
    act_slots: tuple[int, ...]
    bias_slot: int | None = None


@dataclass
class Placement:
    """Where Q/DQ pairs go: activation tensor -> consumer (node, slot) pairs to rewire
    (None: every consumer but excluded nodes), weights of included layers, int32 biases,
    and groups of tensors that share one scale."""

    acts: dict[str, set[tuple[str, int]] | None] = field(default_factory=dict)
    layers: dict[str, Layer] = field(default_factory=dict)
    int32_bias: bool = False
    groups: list[set[str]] = field(default_factory=list)
    skip_rewire: set[str] = field(default_factory=set)
    constants: list[tuple[str, int]] = field(default_factory=list)  # (node, slot) to Q

    def want(self, tensor: str, consumer: tuple[str, int] | None) -> None:
        if consumer is None:
            self.acts[tensor] = None
            return
        slots = self.acts.setdefault(tensor, set())
        if slots is not None:
            slots.add(consumer)


def name_nodes(graph: gs.Graph) -> None:
    """Give every unnamed node a unique name (Q/DQ placement is keyed by node name)."""
    taken = {n.name for n in graph.nodes if n.name}
    for i, node in enumerate(graph.nodes):
        if not node.name:
            base, k = f"{node.op}_{i}", 0
            name = base
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            node.name = name
            taken.add(name)


def _dtype_of(tensor: Any, dtypes: Mapping[str, Any]) -> np.dtype | None:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values).dtype
    dt = dtypes.get(tensor.name)
    if dt is not None:
        return np.dtype(dt)
    if tensor.dtype is not None:
        try:
            return np.dtype(tensor.dtype)
        except TypeError:
            return None
    return None


#: Ops whose constant operand the onnxruntime-cpu layout quantizes (see make_placement).
_CONST_OPERAND_OPS = ("Add", "Mul")


def _constant_operand(node: gs.Node, dtypes: Mapping[str, Any]) -> int | None:
    """The slot of the float32 constant of a two-input node whose other input is an
    activation, else None."""
    if len(node.inputs) != 2:
        return None
    for slot in (0, 1):
        value = const_value(node.inputs[slot])
        if (
            value is not None
            and value.dtype == np.float32
            and np.all(np.isfinite(value))
            and is_activation(node.inputs[1 - slot], dtypes)
        ):
            return slot
    return None


def is_activation(tensor: Any, dtypes: Mapping[str, Any]) -> bool:
    return (
        isinstance(tensor, gs.Variable)
        and not tensor.is_empty()
        and const_value(tensor) is None
        and _dtype_of(tensor, dtypes) == np.float32
    )


class Analysis:
    """What can be quantized in a graph: candidate layers (in graph order) and why the
    other weight ops cannot be."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        shapes = infer_shapes(graph)
        self.dtypes = {name: dt for name, (_, dt) in shapes.items() if dt is not None}
        self.layers: list[Layer] = []
        self.unsupported: list[tuple[Any, str]] = []
        self.region = float_region(graph)
        for node in graph.nodes:
            if node.op not in WEIGHT_OPS or node.domain not in ("", "ai.onnx", None):
                continue
            layer_or_reason = self._layer(node)
            if isinstance(layer_or_reason, Layer):
                self.layers.append(layer_or_reason)
            else:
                self.unsupported.append((node, layer_or_reason))

    def _layer(self, node: gs.Node) -> Layer | str:
        if len(node.inputs) < 2:
            return "fewer than two inputs"
        x, w = node.inputs[0], node.inputs[1]
        if not is_activation(x, self.dtypes):
            if const_value(x) is not None:
                return "first input is a constant"
            return f"input '{x.name}' is not a float32 tensor"
        bias = (
            2
            if node.op != "MatMul" and len(node.inputs) > 2 and not node.inputs[2].is_empty()
            else None
        )
        wv = const_value(w)
        if wv is None:
            if node.op in ("MatMul", "Gemm") and is_activation(w, self.dtypes):
                return Layer(node.name, node.op, None, None, (0, 1))
            if w.inputs and w.inputs[0].op == "ConstantOfShape":
                return "weight is computed at run time (ConstantOfShape)"
            return "weight is not a constant"
        if wv.dtype != np.float32:
            return f"weight is {wv.dtype}, not float32"
        if node.op in _CONV_OPS and wv.ndim < 3:
            return f"weight has rank {wv.ndim}"
        if node.op == "Gemm" and wv.ndim != 2:
            return f"weight has rank {wv.ndim}"
        axis = weight_axis(node.op, node.attrs, wv.ndim)
        return Layer(node.name, node.op, 1, axis, (0,), bias)


def _through_bn(tensor: Any) -> gs.Node | None:
    """The node producing `tensor`, looking through one BatchNormalization."""
    if not tensor.inputs:
        return None
    node = tensor.inputs[0]
    if node.op == "BatchNormalization" and node.inputs and node.inputs[0].inputs:
        node = node.inputs[0].inputs[0]
    return node


def _folded_output(graph: gs.Graph, tensor: Any) -> Any:
    """`tensor`, or the output of a sole-consumer Relu/Clip chain after it."""
    outputs = {id(t) for t in graph.outputs}
    for _ in range(8):
        if id(tensor) in outputs or len(tensor.outputs) != 1:
            break
        nxt = tensor.outputs[0]
        if nxt.op not in _FOLDED_ACTIVATIONS or nxt.inputs[0] is not tensor:
            break
        if any(const_value(t) is None for t in nxt.inputs[1:] if not t.is_empty()):
            break
        tensor = nxt.outputs[0]
    return tensor


def _decomposed_norm(node: gs.Node) -> bool:
    """A ReduceMean whose output a Sub takes from the ReduceMean's own input (x - mean(x),
    the start of an exported LayerNorm)."""
    if node.op != "ReduceMean" or not node.inputs or not node.outputs:
        return False
    x = node.inputs[0]
    return any(
        c.op == "Sub" and len(c.inputs) == 2 and c.inputs[0] is x and c.inputs[1] is node.outputs[0]
        for c in node.outputs[0].outputs
    )


def has_layer_norm(graph: gs.Graph) -> bool:
    """Whether `graph` has a LayerNormalization or a decomposed LayerNorm (a transformer;
    `smooth="auto"` smooths only such graphs)."""
    return any(n.op == "LayerNormalization" or _decomposed_norm(n) for n in graph.nodes)


def _neighbours(node: gs.Node) -> Iterable[gs.Node]:
    """Producers of `node`'s inputs and consumers of its outputs, looked at through
    data-movement ops (`_MOVE_OPS`)."""
    seen: set[int] = set()
    stack: list[tuple[gs.Node, bool]] = [(node, True)]
    while stack:
        cur, start = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if not start:
            yield cur
            if cur.op not in _MOVE_OPS:
                continue
        for t in cur.inputs:
            stack.extend((p, False) for p in t.inputs)
        for t in cur.outputs:
            stack.extend((c, False) for c in t.outputs)


def float_region(graph: gs.Graph) -> set[str]:
    """Names of the nodes a transformer keeps in float in the onnxruntime-cpu layout:
    `FLOAT_OPS` and decomposed LayerNorms (ReduceMean -> Sub ...), grown through
    neighbouring elementwise ops (`_REGION_OPS`; a decomposed LayerNorm's Pow/Sqrt/Div,
    GELU's Div/Add/Mul, the attention mask's Sub/Mul and its Add before Softmax,
    residual sums and the bias Adds feeding them). Weight layers stop the growth, so
    the Q/DQ of MatMul/Gemm inputs and outputs stay. A CNN without these ops gets an
    empty region (its placement is unchanged)."""
    region = {n.name for n in graph.nodes if n.op in FLOAT_OPS or _decomposed_norm(n)}
    by_name = {n.name: n for n in graph.nodes}
    todo = list(region)
    while todo:
        for nb in _neighbours(by_name[todo.pop()]):
            if nb.op in _REGION_OPS and nb.name not in region:
                region.add(nb.name)
                todo.append(nb.name)
    return region


def make_placement(
    analysis: Analysis,
    included: Iterable[str],
    *,
    layout: Literal["tensorrt", "ort"],
    excluded: Iterable[str] = (),
    extra_ops: tuple[str, ...] = ORT_EXTRA_OPS,
    region: Iterable[str] = (),
) -> Placement:
    """Where Q/DQ go when the layers named `included` are quantized (see the module
    docstring); `excluded` nodes (any op) are never rewired or wrapped, nor (in the
    ort layout) are the extra ops in `region` (`float_region`)."""
    graph = analysis.graph
    dtypes = analysis.dtypes
    by_name = {n.name: n for n in graph.nodes}
    include = set(included)
    exclude = set(excluded)
    float_nodes = exclude | set(region)
    layers = {layer.node: layer for layer in analysis.layers if layer.node in include}
    placement = Placement(layers=layers, int32_bias=layout == "ort")
    if layout == "tensorrt":
        for layer in layers.values():
            node = by_name[layer.node]
            for slot in layer.act_slots:
                placement.want(node.inputs[slot].name, (node.name, slot))
        quantized_convs = {n for n, lay in layers.items() if lay.op in _CONV_OPS}
        for node in graph.nodes:
            if node.op != "Add" or node.name in exclude or len(node.inputs) != 2:
                continue
            if not all(is_activation(t, dtypes) for t in node.inputs):
                continue
            side = [
                (p := _through_bn(t)) is not None and p.name in quantized_convs for t in node.inputs
            ]
            if side[0]:
                placement.want(node.inputs[1].name, (node.name, 1))
            elif side[1]:
                placement.want(node.inputs[0].name, (node.name, 0))
    else:
        wrapped = [by_name[n] for n in layers]
        if extra_ops:
            wrapped += [
                n
                for n in graph.nodes
                if n.op in extra_ops
                and n.name not in float_nodes
                and all(is_activation(t, dtypes) for t in n.inputs if not t.is_empty())
            ]
            # Add/Mul of an activation and a float constant (HardSwish's x + 3): the
            # constant is stored quantized too, so ONNX Runtime fuses a QLinearAdd/Mul
            # instead of a DequantizeLinear -> Add -> QuantizeLinear round trip.
            for n in graph.nodes:
                slot = _constant_operand(n, dtypes) if n.op in _CONST_OPERAND_OPS else None
                if slot is not None and n.op in extra_ops and n.name not in float_nodes:
                    wrapped.append(n)
                    placement.constants.append((n.name, slot))
        outputs = {id(t) for t in graph.outputs}
        constant_slots = set(placement.constants)
        for node in wrapped:
            layer = layers.get(node.name)
            slots = layer.act_slots if layer else range(len(node.inputs))
            for slot in slots:
                if not node.inputs[slot].is_empty() and (node.name, slot) not in constant_slots:
                    placement.want(node.inputs[slot].name, None)
            out = _folded_output(graph, node.outputs[0])
            if (
                is_activation(out, dtypes)
                and id(out) not in outputs
                and out.outputs
                and not all(c.name in float_nodes for c in out.outputs)
            ):
                placement.want(out.name, None)
        placement.skip_rewire = float_nodes  # the float region reads the float tensor
    # Concat: quantized inputs and a quantized output share one scale.
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.get(a, a) != a:
            a = parent[a]
        return a

    for node in graph.nodes:
        if node.op != "Concat" or not node.outputs:
            continue
        members = [t.name for t in (*node.inputs, node.outputs[0]) if t.name in placement.acts]
        for other in members[1:]:
            parent[find(other)] = find(members[0])
    groups: dict[str, set[str]] = {}
    for name in parent:
        groups.setdefault(find(name), set()).add(name)
    for root, members in groups.items():
        members.add(root)
    placement.groups = [g for g in groups.values() if len(g) > 1]
    return placement
