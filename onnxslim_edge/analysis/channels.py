"""Channel dependency groups of an ONNX graph, for structured channel pruning.

`analyze_channels(graph)` reads an `onnx_graphsurgeon.Graph` (a `ModelProto` is
imported first; the graph analysed is `ChannelAnalysis.graph`) and never changes it.

Model: every layer that creates channels (a *source*: Conv/ConvTranspose with
`group=1`, Gemm, MatMul with a constant 2-D weight) gets one *atom* per output
channel. Walking the nodes in order, each tensor that carries channels gets a *map*:
its channel axis and the atom of every position along it. Pass-through ops copy the
map (activations, BatchNormalization, InstanceNormalization, pooling, Resize, spatial
Pad, Q/DQ, per-channel or scalar constants, depthwise Conv); Concat/Split/Slice on the
channel axis concatenate or cut maps; Flatten/Reshape that merge the channel axis with
the following dims repeat each atom over its block of features; Transpose, Squeeze
and Unsqueeze move the axis. An elementwise op of two channel tensors (a residual Add,
a squeeze-excitation Mul) unites their atoms position by position. Consumers (Conv,
ConvTranspose, Gemm, MatMul reading a channel tensor) slice their weight's input axis.

Atoms united this way form a *class*: the channels that must be removed together.
Classes connected through shared layers form a *group* (a dependency group, as in
DepGraph/Torch-Pruning). Inside a group, classes that appear in exactly the same
tensors form a *block*; pruning keeps a multiple of `round_to` channels per block, so
every tensor's channel count stays a sum of rounded blocks.

Anything not understood is a barrier: the op's channel inputs are frozen, and with
them their whole group (`ChannelGroup.frozen` names the op and why). Barriers:
channel-mixing ops (LRN, LayerNormalization/Softmax/Reduce* over the channel axis,
Gather, DepthToSpace), Reshapes that split or move the channel axis (channel shuffle),
grouped (non-depthwise) convolutions, constant inputs that cannot be sliced, runtime
inputs of the channel size, graph outputs, tensors read inside subgraphs, and unknown
ops. Layers whose weight is not a constant are no sources, and as consumers they freeze
their input. Concat inputs that no source produced (a graph input) get frozen atoms.

The result also lists, as data, what pruning must change (`edits`): constants to slice
along an axis (weights, biases, BN parameters, per-channel constants, PRelu slopes,
Q/DQ scales), and attributes/shape constants to patch (`group` of depthwise convs,
Split sizes, Slice bounds, Reshape targets, Resize sizes). Nodes are referred to by
their index in `graph.nodes`, so the edits apply to `graph.copy()` too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from onnxslim_edge.graph import const_value, infer_shapes

__all__ = [
    "ChannelAnalysis",
    "ChannelGroup",
    "Consumer",
    "Edit",
    "Source",
    "TensorMap",
    "analyze_channels",
]

log = logging.getLogger(__name__)

Role = Literal["out", "bias", "in", "param"]

#: Elementwise ops of one channel tensor (extra inputs must be scalars/constants).
UNARY_OPS = frozenset(
    {
        "Abs", "Cast", "Ceil", "Celu", "Clip", "Dropout", "Elu", "Erf", "Exp", "Floor",
        "Gelu", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log", "Mish", "Neg",
        "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Softplus", "Softsign",
        "Sqrt", "Tanh", "ThresholdedRelu",
    }
)  # fmt: skip

#: Elementwise ops with broadcasting between several inputs.
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum", "Mean"})

POOL_OPS = frozenset(
    {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
)

REDUCE_OPS = frozenset(
    {
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
    }
)  # fmt: skip

#: Ops that read only the shape of a channel tensor (runtime shape arithmetic adapts).
SHAPE_OPS = frozenset({"Shape", "Size"})


@dataclass
class TensorMap:
    """A channel tensor: its channel axis and the atom of every position along it."""

    axis: int
    atoms: np.ndarray


@dataclass(frozen=True)
class Source:
    """A layer creating channels (atoms `start .. start+size-1`), or a frozen pseudo
    source for channels of a Concat input that no layer produced."""

    node: str
    op: str
    start: int
    size: int
    node_index: int | None = None
    weight_index: int | None = None  # input holding the out-channels' filters
    weight_axis: int | None = None  # their axis in that weight

    @property
    def prunable(self) -> bool:
        return self.node_index is not None


@dataclass(frozen=True)
class Edit:
    """A change pruning makes to a node, for the channels of `atoms`.

    kind:
    - "slice": slice constant input `index` along `axis` (position i <-> atoms[i]);
      `role` says whose it is: "out"/"bias" (a source's filters / bias), "in" (a
      consumer's input axis), "param" (a pass-through op's per-channel constant).
    - "group": set the `group` attribute to the kept count (depthwise Conv).
    - "split": `atoms_list` holds each output's map; set the split sizes on `axis`.
    - "slice_bounds": the Slice reads positions [start, end) of `atoms` on the data's
      axis listed at position `index` of its `axes`.
    - "reshape": set dim `axis` of the constant target shape to the kept count.
    - "resize": set entry `axis` of Resize's constant `sizes` to the kept count.
    """

    kind: str
    node_index: int
    atoms: np.ndarray
    index: int = 0
    axis: int = 0
    role: Role = "param"
    start: int = 0
    end: int = 0
    atoms_list: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class Consumer:
    """A layer reading a channel tensor through the input axis of its weight.

    `foldable`: a constant value on a removed input channel can be added to the
    layer's bias exactly (Conv without padding, Gemm, MatMul).
    """

    node_index: int
    kind: str  # Conv, ConvTranspose, Gemm, MatMul
    tensor: str
    tensor_axis: int
    atoms: np.ndarray
    weight_index: int
    weight_axis: int
    foldable: bool


@dataclass
class ChannelGroup:
    """Coupled channels pruned together. `classes` are the pruning units; `blocks`
    partition them into classes that appear in the same tensors."""

    id: int
    sources: list[str]
    classes: np.ndarray
    blocks: list[np.ndarray]
    frozen: str | None = None  # why the group cannot be pruned, naming the op
    frozen_by: str | None = None  # the node (or tensor) that froze it

    @property
    def channels(self) -> int:
        return len(self.classes)


@dataclass
class ChannelAnalysis:
    """The dependency groups of `graph` and the edits pruning them takes."""

    graph: Any
    sources: list[Source]
    atom_class: np.ndarray  # atom -> class
    class_group: np.ndarray  # class -> group
    groups: list[ChannelGroup]
    tensor_maps: dict[str, TensorMap]
    edits: list[Edit]
    consumers: list[Consumer]
    barriers: list[tuple[str, str, str]] = field(default_factory=list)  # node, op, reason

    @property
    def num_classes(self) -> int:
        return len(self.class_group)

    def class_map(self, atoms: np.ndarray) -> np.ndarray:
        """Classes of an atom array (e.g. a tensor map's positions)."""
        return self.atom_class[atoms]

    def group_of(self, node_name: str) -> ChannelGroup | None:
        """The group whose sources include the node `node_name`."""
        for g in self.groups:
            if node_name in g.sources:
                return g
        return None

    def summary(self) -> list[dict[str, Any]]:
        return [
            {
                "group": g.id,
                "sources": list(g.sources),
                "channels": g.channels,
                "blocks": [len(b) for b in g.blocks],
                "frozen": g.frozen,
                "frozen_by": g.frozen_by,
            }
            for g in self.groups
        ]


class _Barrier(Exception):
    """The node is not understood on its channel inputs (message: why)."""


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> None:
        self.parent.extend(range(len(self.parent), len(self.parent) + n))

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _has_subgraph(node: Any) -> bool:
    import onnx_graphsurgeon as gs

    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            return True
        if isinstance(value, (list, tuple)) and any(isinstance(v, gs.Graph) for v in value):
            return True
    return False


def _subgraph_reads(node: Any) -> set[str]:
    """Names of outer tensors read by nodes inside `node`'s subgraphs."""
    import onnx_graphsurgeon as gs

    names: set[str] = set()
    graphs = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            graphs.append(value)
        elif isinstance(value, (list, tuple)):
            graphs.extend(v for v in value if isinstance(v, gs.Graph))
    for g in graphs:
        for inner in g.nodes:
            names.update(t.name for t in inner.inputs if t.name)
            if _has_subgraph(inner):
                names |= _subgraph_reads(inner)
    return names


def _shapes_of(graph: Any, input_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, tuple]:
    try:
        infos = infer_shapes(graph, input_shapes)
    except Exception as exc:  # inference raises many types on odd models
        log.debug("shape inference failed: %s", exc)
        infos = {}
    return {name: tuple(info.shape) for name, info in infos.items()}


class _Analyzer:
    def __init__(self, graph: Any, shapes: Mapping[str, tuple]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.opset = int(graph.opset or 13)
        self.uf = _UnionFind()
        self.sources: list[Source] = []
        self.maps: dict[str, TensorMap] = {}
        self.edits: list[Edit] = []
        self.consumers: list[Consumer] = []
        self.frozen: list[tuple[np.ndarray, str, str]] = []  # atoms, reason, node
        self.barriers: list[tuple[str, str, str]] = []
        self.index = 0
        self.node: Any = None

    # -- helpers

    def shape(self, tensor: Any) -> tuple | None:
        value = const_value(tensor)
        if value is not None:
            return tuple(value.shape)
        shape = self.shapes.get(tensor.name)
        if shape is None and tensor.shape is not None:
            shape = tuple(tensor.shape)
        return shape

    def static_dim(self, tensor: Any, axis: int) -> int | None:
        shape = self.shape(tensor)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        d = shape[axis]
        return d if isinstance(d, int) and d >= 0 else None

    def rank(self, tensor: Any) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def new_atoms(self, n: int, **source: Any) -> np.ndarray:
        start = len(self.uf.parent)
        self.uf.add(n)
        self.sources.append(Source(start=start, size=n, **source))
        return np.arange(start, start + n, dtype=np.int64)

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.uf.union(x, y)

    def edit(self, kind: str, atoms: np.ndarray, **kw: Any) -> None:
        self.edits.append(Edit(kind, self.index, atoms, **kw))

    def tracked(self, tensor: Any) -> TensorMap | None:
        return self.maps.get(tensor.name) if tensor.name else None

    def set_map(self, tensor: Any, m: TensorMap) -> None:
        self.maps[tensor.name] = m

    def freeze(self, atoms: np.ndarray, reason: str, where: str) -> None:
        self.frozen.append((atoms, reason, where))

    def attr(self, name: str, default: Any = None) -> Any:
        return self.node.attrs.get(name, default)

    def only_first_output(self) -> None:
        for out in self.node.outputs[1:]:
            if out.outputs or any(o is out for o in self.graph.outputs):
                raise _Barrier(f"{self.node.op} output '{out.name}' is used")

    # -- driver

    def run(self) -> None:
        outputs = {t.name for t in self.graph.outputs}
        for index, node in enumerate(list(self.graph.nodes)):
            self.index, self.node = index, node
            inputs = [t for t in node.inputs if self.tracked(t) is not None]
            sub_reads = _subgraph_reads(node) if _has_subgraph(node) else set()
            inner = [self.maps[n] for n in sub_reads if n in self.maps]
            try:
                if inner:
                    raise _Barrier(f"{node.op} reads channel tensors inside a subgraph")
                handler = _PRODUCERS.get(node.op)
                if handler is not None:
                    handler(self)
                elif inputs:
                    if node.domain not in (None, "", "ai.onnx"):
                        raise _Barrier(f"op {node.domain}.{node.op} is not understood")
                    self.dispatch(node.op)
            except _Barrier as barrier:
                reason = f"{node.op} '{node.name}': {barrier}"
                self.barriers.append((node.name, node.op, str(barrier)))
                for t in inputs:
                    self.freeze(self.maps[t.name].atoms, reason, node.name)
                for m in inner:
                    self.freeze(m.atoms, reason, node.name)
                for out in node.outputs:
                    self.maps.pop(out.name, None)
        for name in outputs:
            if name in self.maps:
                self.freeze(self.maps[name].atoms, f"graph output '{name}'", name)

    def dispatch(self, op: str) -> None:
        if op in UNARY_OPS:
            self.unary()
        elif op in BINARY_OPS:
            self.binary()
        elif op in POOL_OPS:
            self.pool()
        elif op in REDUCE_OPS:
            self.reduce()
        elif op in SHAPE_OPS:
            return
        else:
            handler = getattr(self, "op_" + op, None)
            if handler is None:
                raise _Barrier(f"op {op} is not understood on the channel axis")
            handler()

    # -- sources and consumers

    def consume(self, kind: str, weight_axis: int, foldable: bool, data: int = 0) -> None:
        x = self.node.inputs[data]
        m = self.tracked(x)
        if m is None:
            return
        self.edit("slice", m.atoms, index=1, axis=weight_axis, role="in")
        self.consumers.append(
            Consumer(self.index, kind, x.name, m.axis, m.atoms, 1, weight_axis, foldable)
        )

    def produce(self, n: int, weight_axis: int, bias: tuple[int, int] | None) -> np.ndarray:
        atoms = self.new_atoms(
            n,
            node=self.node.name,
            op=self.node.op,
            node_index=self.index,
            weight_index=1,
            weight_axis=weight_axis,
        )
        self.edit("slice", atoms, index=1, axis=weight_axis, role="out")
        if bias is not None:
            self.edit("slice", atoms, index=bias[0], axis=bias[1], role="bias")
        return atoms

    def conv_like(self, transpose: bool) -> None:
        node = self.node
        x, inputs = node.inputs[0], node.inputs
        m = self.tracked(x)
        w = const_value(inputs[1]) if len(inputs) > 1 else None
        if w is None or w.ndim < 3:
            if m is not None:
                raise _Barrier("weight is not a constant")
            return
        group = int(self.attr("group", 1))
        has_bias = len(inputs) > 2 and not inputs[2].is_empty()
        bias_ok = not has_bias or const_value(inputs[2]) is not None
        cin = self.static_dim(x, 1)
        cout = w.shape[1] * group if transpose else w.shape[0]
        if group == 1:
            if m is not None:
                if m.axis != 1 or len(m.atoms) != cin:
                    raise _Barrier("channel map does not match the input channels")
                pads = self.attr("pads", [0])
                foldable = (
                    not transpose
                    and all(p == 0 for p in pads)
                    and self.attr("auto_pad", "NOTSET") in ("NOTSET", "VALID", b"NOTSET", b"VALID")
                )
                self.consume(node.op, 0 if transpose else 1, foldable)
            if cout >= 2 and bias_ok:
                bias = (2, 0) if has_bias else None
                atoms = self.produce(cout, 1 if transpose else 0, bias)
                self.set_map(node.outputs[0], TensorMap(1, atoms))
            return
        depthwise = cin == group and cout == group and w.shape[0 if transpose else 1] == 1
        if transpose:
            depthwise = cin == group and w.shape[0] == group and w.shape[1] == 1
        if m is None:
            return  # channels of a grouped layer on an untracked input: left alone
        if not depthwise:
            raise _Barrier(f"grouped convolution (group={group})")
        if m.axis != 1 or len(m.atoms) != group or not bias_ok:
            raise _Barrier("depthwise convolution whose channels cannot be followed")
        self.edit("slice", m.atoms, index=1, axis=0, role="param")
        if has_bias:
            self.edit("slice", m.atoms, index=2, axis=0, role="param")
        self.edit("group", m.atoms)
        self.set_map(node.outputs[0], TensorMap(1, m.atoms))

    def op_Gemm(self) -> None:
        node = self.node
        a, b = node.inputs[0], node.inputs[1]
        w = const_value(b)
        ma, mb = self.tracked(a), self.tracked(b)
        if mb is not None:
            raise _Barrier("the weight input carries channels")
        if w is None or w.ndim != 2:
            if ma is not None:
                raise _Barrier("weight is not a constant")
            return
        trans_b = int(self.attr("transB", 0))
        c = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        cval = const_value(c) if c is not None else None
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        if ma is not None:
            if int(self.attr("transA", 0)) or ma.axis != 1:
                raise _Barrier("the channel axis is not Gemm's reduction axis")
            beta = float(self.attr("beta", 1.0))
            foldable = c is None or (cval is not None and beta != 0.0)
            self.consume("Gemm", k_axis, foldable)
        n = w.shape[n_axis]
        if n < 2 or (c is not None and cval is None):
            return
        bias = None
        if cval is not None and cval.size > 1:
            if cval.ndim == 1 and cval.shape[0] == n:
                bias = (2, 0)
            elif cval.ndim == 2 and cval.shape == (1, n):
                bias = (2, 1)
            else:
                return  # a per-row bias: the output channels are left alone
        atoms = self.produce(n, n_axis, bias)
        self.set_map(node.outputs[0], TensorMap(1, atoms))

    def op_MatMul(self) -> None:
        node = self.node
        a, b = node.inputs
        w = const_value(b)
        ma, mb = self.tracked(a), self.tracked(b)
        if mb is not None or (ma is not None and (w is None or w.ndim != 2)):
            raise _Barrier("MatMul of two activations mixes channels")
        if w is None or w.ndim != 2:
            return
        ra = self.rank(a)
        if ra is None or ra < 2:
            if ma is not None:
                raise _Barrier("input rank unknown")
            return
        if ma is not None:
            if ma.axis != ra - 1:
                raise _Barrier("the channel axis is not MatMul's reduction axis")
            self.consume("MatMul", 0, True)
        if w.shape[1] >= 2:
            atoms = self.produce(w.shape[1], 1, None)
            self.set_map(node.outputs[0], TensorMap(ra - 1, atoms))

    # -- pass-through ops

    def unary(self) -> None:
        node = self.node
        m = self.tracked(node.inputs[0])
        if m is None or any(self.tracked(t) is not None for t in node.inputs[1:]):
            raise _Barrier("a parameter input carries channels")
        if node.op == "Dropout":
            self.only_first_output()
        self.set_map(node.outputs[0], m)

    def binary(self) -> None:
        node = self.node
        out = node.outputs[0]
        out_rank = self.rank(out)
        tracked = [(i, t, self.tracked(t)) for i, t in enumerate(node.inputs)]
        maps = [(i, t, m) for i, t, m in tracked if m is not None]
        ranks = [self.rank(t) for _, t, _ in maps]
        if out_rank is None or any(r is None for r in ranks):
            raise _Barrier("shapes unknown")
        neg = {m.axis - r for (_, _, m), r in zip(maps, ranks)}
        sizes = {len(m.atoms) for _, _, m in maps}
        if len(neg) != 1 or len(sizes) != 1:
            raise _Barrier("inputs carry channels on different axes")
        axis, size = neg.pop(), sizes.pop()
        first = maps[0][2].atoms
        for _, _, m in maps[1:]:
            self.unite(first, m.atoms)
        for i, t, m in tracked:
            if m is not None or t.is_empty():
                continue
            shape = self.shape(t)
            if shape is None:
                raise _Barrier(f"shape of input '{t.name}' unknown")
            aligned = len(shape) + axis
            if aligned < 0 or shape[aligned] == 1:
                continue
            if shape[aligned] != size:
                raise _Barrier(f"input '{t.name}' does not broadcast over the channels")
            if const_value(t) is None:
                raise _Barrier(f"input '{t.name}' carries the channels but no layer produces them")
            self.edit("slice", first, index=i, axis=aligned, role="param")
        if self.static_dim(out, axis) not in (None, size):
            raise _Barrier("output channel size differs")
        self.set_map(out, TensorMap(out_rank + axis, first))

    def channel_params(self, indices: Sequence[int], axis: int = 1) -> TensorMap:
        node = self.node
        m = self.tracked(node.inputs[0])
        if m is None or m.axis != axis:
            raise _Barrier("channels are not on axis 1")
        for i in indices:
            if i >= len(node.inputs) or node.inputs[i].is_empty():
                continue
            value = const_value(node.inputs[i])
            if value is None or self.tracked(node.inputs[i]) is not None:
                raise _Barrier(f"parameter '{node.inputs[i].name}' is not a constant")
            if value.size == 1 and value.ndim <= 1 and len(m.atoms) != 1:
                continue
            if value.ndim != 1 or value.shape[0] != len(m.atoms):
                raise _Barrier(f"parameter '{node.inputs[i].name}' is not per channel")
            self.edit("slice", m.atoms, index=i, axis=0, role="param")
        return m

    def op_BatchNormalization(self) -> None:
        m = self.channel_params((1, 2, 3, 4))
        self.only_first_output()
        self.set_map(self.node.outputs[0], m)

    def op_InstanceNormalization(self) -> None:
        self.set_map(self.node.outputs[0], self.channel_params((1, 2)))

    def pool(self) -> None:
        m = self.tracked(self.node.inputs[0])
        if m is None or m.axis != 1:
            raise _Barrier("channels are not on axis 1")
        self.only_first_output()
        self.set_map(self.node.outputs[0], m)

    def reduce(self) -> None:
        node = self.node
        m = self.tracked(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if m is None or rank is None:
            raise _Barrier("shapes unknown")
        if "axes" in node.attrs:
            axes = node.attrs["axes"]
        elif len(node.inputs) > 1 and not node.inputs[1].is_empty():
            value = const_value(node.inputs[1])
            if value is None:
                raise _Barrier("axes computed at run time")
            axes = value.tolist()
        else:
            axes = None
        if not axes:
            raise _Barrier("reduces over every axis")
        axes = [a % rank for a in np.ravel(axes).tolist()]
        if m.axis in axes:
            raise _Barrier("reduces over the channel axis")
        keep = int(self.attr("keepdims", 1))
        axis = m.axis if keep else m.axis - sum(a < m.axis for a in axes)
        self.set_map(node.outputs[0], TensorMap(axis, m.atoms))

    def softmax_like(self) -> None:
        m = self.tracked(self.node.inputs[0])
        rank = self.rank(self.node.inputs[0])
        if m is None or rank is None:
            raise _Barrier("shapes unknown")
        if self.node.op == "LayerNormalization" or self.opset < 13:
            default = -1 if self.node.op == "LayerNormalization" else 1
            if m.axis >= int(self.attr("axis", default)) % rank:
                raise _Barrier("normalizes over the channel axis")
        elif int(self.attr("axis", -1)) % rank == m.axis:
            raise _Barrier("normalizes over the channel axis")
        self.set_map(self.node.outputs[0], m)

    op_Softmax = op_LogSoftmax = op_LayerNormalization = softmax_like

    def op_Resize(self) -> None:
        node = self.node
        m = self.tracked(node.inputs[0])
        if m is None or any(self.tracked(t) is not None for t in node.inputs[1:]):
            raise _Barrier("a parameter input carries channels")
        if self.static_dim(node.outputs[0], m.axis) != len(m.atoms):
            raise _Barrier("resizes the channel axis")
        if len(node.inputs) > 3 and not node.inputs[3].is_empty():
            sizes = const_value(node.inputs[3])
            if sizes is None:
                raise _Barrier("sizes computed at run time")
            if "axes" in node.attrs:
                raise _Barrier("sizes with axes")
            self.edit("resize", m.atoms, index=3, axis=m.axis)
        self.set_map(node.outputs[0], m)

    op_Upsample = op_Resize

    def op_Pad(self) -> None:
        node = self.node
        m = self.tracked(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if m is None or rank is None or any(self.tracked(t) is not None for t in node.inputs[1:]):
            raise _Barrier("a parameter input carries channels")
        if "pads" in node.attrs:
            pads = list(node.attrs["pads"])
        else:
            value = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if value is None:
                raise _Barrier("pads computed at run time")
            pads = value.tolist()
        axes = list(range(rank))
        if len(node.inputs) > 3 and not node.inputs[3].is_empty():
            value = const_value(node.inputs[3])
            if value is None:
                raise _Barrier("axes computed at run time")
            axes = [a % rank for a in value.tolist()]
        n = len(axes)
        for j, a in enumerate(axes):
            if a == m.axis and (pads[j] != 0 or pads[j + n] != 0):
                raise _Barrier("pads the channel axis")
        self.set_map(node.outputs[0], m)

    def qdq(self) -> None:
        node = self.node
        m = self.tracked(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if m is None or rank is None:
            raise _Barrier("shapes unknown")
        if int(self.attr("block_size", 0)):
            raise _Barrier("blocked quantization")
        for i in (1, 2):
            if i >= len(node.inputs) or node.inputs[i].is_empty():
                continue
            value = const_value(node.inputs[i])
            if value is None:
                raise _Barrier(f"'{node.inputs[i].name}' is not a constant")
            if value.size == 1 and value.ndim <= 1:
                continue
            if value.ndim != 1 or int(self.attr("axis", 1)) % rank != m.axis:
                raise _Barrier("quantized per channel on another axis")
            self.edit("slice", m.atoms, index=i, axis=0, role="param")
        self.set_map(node.outputs[0], m)

    op_QuantizeLinear = op_DequantizeLinear = qdq

    def op_Concat(self) -> None:
        node = self.node
        out = node.outputs[0]
        rank = self.rank(out)
        if rank is None:
            raise _Barrier("shapes unknown")
        axis = int(self.attr("axis")) % rank
        maps = [self.tracked(t) for t in node.inputs]
        channel_axes = {m.axis for m in maps if m is not None}
        if len(channel_axes) != 1:
            raise _Barrier("inputs carry channels on different axes")
        channel_axis = channel_axes.pop()
        if axis != channel_axis:
            if any(m is None for m in maps):
                raise _Barrier("concatenates channel and other tensors")
            for m in maps[1:]:
                if len(m.atoms) != len(maps[0].atoms):
                    raise _Barrier("inputs carry channel maps of different sizes")
                self.unite(maps[0].atoms, m.atoms)
            self.set_map(out, maps[0])
            return
        parts = []
        for t, m in zip(node.inputs, maps):
            if m is not None:
                parts.append(m.atoms)
                continue
            n = self.static_dim(t, axis)
            if n is None:
                raise _Barrier(f"channel count of input '{t.name}' unknown")
            atoms = self.new_atoms(n, node=f"{node.name}:{t.name}", op="Concat input")
            self.freeze(atoms, f"Concat '{node.name}' input '{t.name}' has no source", node.name)
            parts.append(atoms)
        self.set_map(out, TensorMap(axis, np.concatenate(parts)))

    def op_Split(self) -> None:
        node = self.node
        m = self.tracked(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if m is None or rank is None or any(self.tracked(t) is not None for t in node.inputs[1:]):
            raise _Barrier("shapes unknown")
        axis = int(self.attr("axis", 0)) % rank
        if axis != m.axis:
            for out in node.outputs:
                self.set_map(out, m)
            return
        sizes = [self.static_dim(out, axis) for out in node.outputs]
        if any(s is None for s in sizes) or sum(sizes) != len(m.atoms):
            raise _Barrier("split sizes unknown")
        offsets = np.cumsum([0, *sizes])
        parts = tuple(m.atoms[offsets[k] : offsets[k + 1]] for k in range(len(sizes)))
        self.edit("split", m.atoms, axis=axis, atoms_list=parts)
        for out, part in zip(node.outputs, parts):
            self.set_map(out, TensorMap(axis, part))

    def op_Slice(self) -> None:
        node = self.node
        m = self.tracked(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if m is None or rank is None or any(self.tracked(t) is not None for t in node.inputs[1:]):
            raise _Barrier("a parameter input carries channels")
        if self.opset < 10:
            starts = list(self.attr("starts", []))
            ends = list(self.attr("ends", []))
            axes = list(self.attr("axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            values = []
            for i in range(1, 5):
                if i >= len(node.inputs) or node.inputs[i].is_empty():
                    values.append(None)
                    continue
                value = const_value(node.inputs[i])
                if value is None:
                    raise _Barrier("bounds computed at run time")
                values.append(value.tolist())
            starts, ends, axes, steps = values
            axes = list(range(len(starts))) if axes is None else axes
            steps = [1] * len(starts) if steps is None else steps
        axes = [a % rank for a in axes]
        if m.axis not in axes:
            self.set_map(node.outputs[0], m)
            return
        j = axes.index(m.axis)
        if steps[j] != 1:
            raise _Barrier("slices the channel axis with a step")
        n = len(m.atoms)
        start, end = (int(v) for v in (starts[j], ends[j]))
        start = min(max(start + n if start < 0 else start, 0), n)
        end = min(max(end + n if end < 0 else end, 0), n)
        if end <= start:
            raise _Barrier("empty slice of the channel axis")
        self.edit("slice_bounds", m.atoms, index=j, axis=m.axis, start=start, end=end)
        self.set_map(node.outputs[0], TensorMap(m.axis, m.atoms[start:end]))

    def op_Transpose(self) -> None:
        m = self.tracked(self.node.inputs[0])
        rank = self.rank(self.node.inputs[0])
        if m is None or rank is None:
            raise _Barrier("shapes unknown")
        perm = list(self.attr("perm", list(range(rank))[::-1]))
        self.set_map(self.node.outputs[0], TensorMap(perm.index(m.axis), m.atoms))

    def reshape_like(self) -> None:
        node = self.node
        x, out = node.inputs[0], node.outputs[0]
        m = self.tracked(x)
        if m is None or any(self.tracked(t) is not None for t in node.inputs[1:]):
            raise _Barrier("the shape input carries channels")
        s, t = self.shape(x), self.shape(out)
        if s is None or t is None:
            raise _Barrier("shapes unknown")
        found = _follow_axis(tuple(s), tuple(t), m.axis)
        if found is None:
            raise _Barrier(
                f"reshape {list(s)} -> {list(t)} splits or moves the channel axis"
                " (e.g. a channel shuffle)"
            )
        out_axis, block = found
        atoms = np.repeat(m.atoms, block) if block > 1 else m.atoms
        if node.op == "Reshape":
            target = const_value(node.inputs[1])
            if target is None:
                raise _Barrier("target shape computed at run time")
            target = target.astype(np.int64).tolist()
            if out_axis >= len(target):
                raise _Barrier("target shape does not match")
            value = target[out_axis]
            if value == 0 and not (out_axis == m.axis and block == 1):
                raise _Barrier("target copies a dim that changes")
            if value > 0:
                self.edit("reshape", atoms, index=1, axis=out_axis)
        self.set_map(out, TensorMap(out_axis, atoms))

    op_Reshape = op_Squeeze = op_Unsqueeze = reshape_like

    def op_Flatten(self) -> None:
        node = self.node
        x = node.inputs[0]
        m = self.tracked(x)
        shape = self.shape(x)
        if m is None or shape is None:
            raise _Barrier("shapes unknown")
        axis = int(self.attr("axis", 1)) % max(len(shape), 1)
        if axis == 0 or m.axis < axis:
            raise _Barrier("flattens the channel axis into the batch axis")
        dims = shape[axis:]
        if not all(isinstance(d, int) for d in dims):
            raise _Barrier("flattened dims are not static")
        pos = m.axis - axis
        view = [1] * len(dims)
        view[pos] = len(m.atoms)
        atoms = np.broadcast_to(m.atoms.reshape(view), dims).reshape(-1)
        self.set_map(node.outputs[0], TensorMap(1, np.ascontiguousarray(atoms)))


def _producer_conv(a: _Analyzer) -> None:
    a.conv_like(transpose=False)


def _producer_convt(a: _Analyzer) -> None:
    a.conv_like(transpose=True)


_PRODUCERS = {
    "Conv": _producer_conv,
    "ConvTranspose": _producer_convt,
    "Gemm": _Analyzer.op_Gemm,
    "MatMul": _Analyzer.op_MatMul,
}


def _prod(dims: Sequence[Any]) -> int | None:
    total = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        total *= d
    return total


def _follow_axis(s: tuple, t: tuple, axis: int) -> tuple[int, int] | None:
    """Where channel axis `axis` of shape `s` lands after reshaping to `t`.

    Returns (axis in t, block) when the channel axis survives whole, merged with the
    `block` elements of the dims right after it (block 1: just moved); None when it is
    split or merged with a dim before it.
    """
    c = s[axis]
    if not isinstance(c, int):
        return None
    outer = _prod(s[:axis])
    for k in range(len(t)):
        if outer is not None:
            if _prod(t[:k]) != outer:
                continue
        elif tuple(t[:k]) != tuple(s[:axis]):
            continue
        if not isinstance(t[k], int) or t[k] % c:
            continue
        block = t[k] // c
        j, merged = axis + 1, 1
        while merged < block and j < len(s):
            if not isinstance(s[j], int):
                break
            merged *= s[j]
            j += 1
        if merged != block:
            continue
        rest_s, rest_t = _prod(s[j:]), _prod(t[k + 1 :])
        if rest_s is None or rest_t is None:
            if tuple(s[j:]) != tuple(t[k + 1 :]):
                continue
        elif rest_s != rest_t:
            continue
        return k, block
    return None


def analyze_channels(
    graph: Any,
    *,
    shapes: Mapping[str, tuple] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    exclude_nodes: Sequence[str] = (),
) -> ChannelAnalysis:
    """The channel dependency groups of `graph` (a gs.Graph, or a ModelProto imported).

    `shapes` maps tensor names to shapes (default: `analysis.infer_shapes` on the
    graph, with `input_shapes` for symbolic inputs). Groups touching a node named in
    `exclude_nodes` are frozen.
    """
    import onnx_graphsurgeon as gs

    if isinstance(graph, onnx.ModelProto):
        graph = gs.import_onnx(graph)
    if shapes is None:
        shapes = _shapes_of(graph, input_shapes)
    a = _Analyzer(graph, shapes)
    a.run()
    excluded = set(exclude_nodes)
    for _i, node in enumerate(graph.nodes):
        if node.name in excluded:
            for t in (*node.inputs, *node.outputs):
                m = a.tracked(t)
                if m is not None:
                    a.freeze(m.atoms, f"node '{node.name}' is excluded", node.name)
    return _finish(a)


def _finish(a: _Analyzer) -> ChannelAnalysis:
    n_atoms = len(a.uf.parent)
    roots = np.array([a.uf.find(i) for i in range(n_atoms)], dtype=np.int64)
    _, atom_class = np.unique(roots, return_inverse=True)
    atom_class = atom_class.astype(np.int64).reshape(-1)
    n_classes = int(atom_class.max()) + 1 if n_atoms else 0

    # groups: sources connected through shared classes
    src_uf = _UnionFind()
    src_uf.add(len(a.sources))
    class_source = np.full(n_classes, -1, dtype=np.int64)
    for s_idx, src in enumerate(a.sources):
        for cls in np.unique(atom_class[src.start : src.start + src.size]).tolist():
            if class_source[cls] >= 0:
                src_uf.union(int(class_source[cls]), s_idx)
            else:
                class_source[cls] = s_idx
    src_root = [src_uf.find(i) for i in range(len(a.sources))]
    group_ids: dict[int, int] = {}
    for root in src_root:
        group_ids.setdefault(root, len(group_ids))
    class_group = np.array(
        [group_ids[src_root[s]] for s in class_source.tolist()], dtype=np.int64
    ).reshape(-1)

    # blocks: classes that appear in exactly the same tensors (and edits)
    rng = np.random.default_rng(0)
    signature = np.zeros(n_classes, dtype=np.uint64)
    seen: list[np.ndarray] = [m.atoms for m in a.maps.values()]
    seen += [e.atoms for e in a.edits]
    seen += [part for e in a.edits for part in e.atoms_list]
    for atoms in seen:
        classes = np.unique(atom_class[atoms])
        signature[classes] += rng.integers(1, 2**63, dtype=np.uint64)

    groups = []
    for gid in range(len(group_ids)):
        classes = np.flatnonzero(class_group == gid)
        members = [s for s, r in zip(a.sources, src_root) if group_ids[r] == gid]
        sigs = signature[classes]
        blocks = [classes[sigs == v] for v in np.unique(sigs)]
        blocks.sort(key=lambda b: int(b[0]))
        names = [s.node for s in members if s.prunable]
        groups.append(ChannelGroup(gid, names, classes, blocks))
    for atoms, reason, where in a.frozen:
        for gid in np.unique(class_group[atom_class[atoms]]).tolist():
            g = groups[gid]
            if g.frozen is None:
                g.frozen, g.frozen_by = reason, where
    return ChannelAnalysis(
        graph=a.graph,
        sources=a.sources,
        atom_class=atom_class,
        class_group=class_group,
        groups=groups,
        tensor_maps=a.maps,
        edits=a.edits,
        consumers=a.consumers,
        barriers=a.barriers,
    )
