"""Model cost: node count, parameters, serialized bytes, multiply-accumulates, sparsity.

`model_cost` is a pure function of the model (and the optional `input_shapes`, which
`analysis.resolve` chooses for callers): it reads shapes from
`onnxslim_edge.graph.infer_shapes` (concrete input shapes let ONNX Runtime measure what
ONNX inference leaves symbolic, e.g. MatMuls after a Reshape built from Shape ops) and
counts, per node, including the nodes of If/Loop/Scan bodies:

| op | MACs |
| --- | --- |
| Conv, ConvInteger, QLinearConv | out_elems * (Cin / group) * prod(kernel) |
| ConvTranspose | in_elems * (Cout / group) * prod(kernel) |
| Gemm, MatMul, MatMulInteger, QLinearMatMul | prod(output) * K (batched, broadcast) |
| MaxPool, AveragePool, LpPool | out_elems * prod(kernel_shape) |
| GlobalAveragePool, GlobalMaxPool, GlobalLpPool | in_elems |
| elementwise (Add, Mul, Relu, Sigmoid, Clip, ...) | out_elems * (inputs - 1 for Sum/Max/Min/Mean) |
| BatchNormalization | 2 * out_elems (subtract the mean, multiply-add the scale and bias) |
| LayerNormalization, InstanceNormalization, GroupNormalization | 4 * out_elems |
| Softmax, LogSoftmax | 3 * out_elems (exp, sum, divide) |
| LRN | out_elems * size |
| ReduceSum, ReduceMean, ... | in_elems |

Attention is MatMuls: QK^T is out (B, H, S, S) x K = head dim, AV out (B, H, S, Dh) x
K = S. An If costs its costlier branch; a Loop its body times the trip count when that
is a constant (else once, with a note); a Scan its body times the scanned axis length
when known (else once, with a note). Body costs go to the If/Loop/Scan node's
`NodeCost` and, per op type, to `macs_by_op`. Bias additions of Conv/Gemm are not
counted. A symbolic dim (a `dim_param`, e.g. the batch) counts as 1; a node whose
shapes are unknown costs 0. Other ops (data movement: Reshape, Transpose, Concat,
Gather, ...) cost 0.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxslim_edge.analysis.shapes import Dim, TensorInfo
from onnxslim_edge.graph import infer_shapes
from onnxslim_edge.model import PROTOBUF_LIMIT, iter_graphs, model_bytes, tensor_bytes

__all__ = ["ModelCost", "NodeCost", "count_macs", "model_cost", "weight_sparsity"]

log = logging.getLogger(__name__)

_FLOAT_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT",
        "DOUBLE",
        "FLOAT16",
        "BFLOAT16",
        "FLOAT8E4M3FN",
        "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
        "FLOAT4E2M1",
        "FLOAT8E8M0",
    )
    if hasattr(onnx.TensorProto, name)
)

_INT_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("INT8", "UINT8", "INT16", "UINT16", "INT32", "INT4", "UINT4")
    if hasattr(onnx.TensorProto, name)
)

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

#: Per-element MACs of normalization-like ops (see the module docstring).
_PER_ELEMENT = {
    "BatchNormalization": 2,
    "LayerNormalization": 4,
    "InstanceNormalization": 4,
    "GroupNormalization": 4,
    "Softmax": 3,
    "LogSoftmax": 3,
}

# Q/DQ nodes count no MACs: runtimes fuse them into the int8 kernels they surround, and
# counting them would make a quantized model look more expensive than its float source.
_ELEMENTWISE = frozenset(
    {
        "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "BitShift",
        "Ceil", "Celu", "Clip", "Cos", "Cosh", "Div", "Elu", "Equal",
        "Erf", "Exp", "FastGelu", "Floor", "Gelu", "Greater", "GreaterOrEqual", "HardSigmoid",
        "HardSwish", "IsInf", "IsNaN", "LeakyRelu", "Less", "LessOrEqual", "Log", "Max",
        "Mean", "Min", "Mish", "Mod", "Mul", "Neg", "Not", "Or", "PRelu", "Pow",
        "QuickGelu", "Reciprocal", "Relu", "Round", "Selu", "Shrink",
        "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Sub", "Sum",
        "Tan", "Tanh", "ThresholdedRelu", "Where", "Xor",
    }
)  # fmt: skip

#: Little-endian numpy views of raw float data (bfloat16 read as its bits).
_RAW_DTYPES = {
    onnx.TensorProto.FLOAT: "<f4",
    onnx.TensorProto.DOUBLE: "<f8",
    onnx.TensorProto.FLOAT16: "<f2",
    onnx.TensorProto.BFLOAT16: "<u2",
}

_VARIADIC = frozenset({"Sum", "Max", "Min", "Mean"})

_REDUCE = frozenset(
    {
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
    }
)  # fmt: skip


@dataclass
class NodeCost:
    """One node's cost: weights it reads (`params`), MACs, and its output shapes."""

    name: str
    op: str
    params: int
    macs: int
    output_shapes: list = field(default_factory=list)


@dataclass
class ModelCost:
    """A model's cost. `ops` is the op-type histogram, most frequent first."""

    nodes: int
    params: int
    size_bytes: int
    macs: int
    ops: dict[str, int]
    per_node: list[NodeCost]
    sparsity: float
    #: MACs per op type (subgraph nodes under their own op), largest first.
    macs_by_op: dict[str, int] = field(default_factory=dict)
    #: What the count could not know (a Loop's trip count ...).
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready: shapes become lists."""
        data = asdict(self)
        for node in data["per_node"]:
            node["output_shapes"] = [None if s is None else list(s) for s in node["output_shapes"]]
        return data


# --------------------------------------------------------------------------- weights


def _constant_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto, tuple]]:
    """(name, data tensor, dense dims) of every constant tensor: initializers, sparse
    initializers (their values tensor) and Constant nodes' `value`/`sparse_value`."""
    for graph in iter_graphs(model.graph):
        for t in graph.initializer:
            yield t.name, t, tuple(t.dims)
        for s in graph.sparse_initializer:
            yield s.values.name, s.values, tuple(s.dims)
        for node in graph.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    yield node.output[0], attr.t, tuple(attr.t.dims)
                elif attr.name == "sparse_value" and attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield node.output[0], attr.sparse_tensor.values, tuple(attr.sparse_tensor.dims)
                elif attr.name == "value_floats":
                    floats = list(attr.floats)
                    t = onnx.helper.make_tensor(
                        node.output[0], onnx.TensorProto.FLOAT, [len(floats)], floats
                    )
                    yield node.output[0], t, (len(floats),)


def _qdq_roles(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(tensors a DequantizeLinear dequantizes, tensors used only as Q/DQ scales or zero
    points) in every graph of the model."""
    data: set[str] = set()
    params: set[str] = set()
    other: set[str] = set()
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            qdq = node.op_type in _QDQ_OPS
            for slot, name in enumerate(node.input):
                if qdq and slot > 0:
                    params.add(name)
                else:
                    other.add(name)
                    if node.op_type == "DequantizeLinear" and slot == 0:
                        data.add(name)
    return data, params - other


def _weights(model: onnx.ModelProto) -> dict[str, tuple[onnx.TensorProto, int, int]]:
    """name -> (data tensor, dense element count, rank) of the weights: float constants
    of rank >= 1, and integer constants of rank >= 1 that a DequantizeLinear reads
    (quantized weights). Scales and zero points of Q/DQ nodes are not weights."""
    dequantized, qdq_params = _qdq_roles(model)
    weights = {}
    for name, tensor, dims in _constant_tensors(model):
        if len(dims) < 1 or name in qdq_params:
            continue
        if tensor.data_type in _FLOAT_TYPES or (
            name in dequantized and tensor.data_type in _INT_TYPES
        ):
            weights.setdefault(name, (tensor, math.prod(dims), len(dims)))
    return weights


def _zero_count(tensor: onnx.TensorProto, count: int) -> int | None:
    """Exactly-zero elements of a float tensor (dense count `count`), None if unreadable."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    implicit = count - math.prod(tensor.dims)  # a sparse tensor's unstored elements are zeros
    T = onnx.TensorProto
    try:
        if tensor.HasField("raw_data") and tensor.data_type in _RAW_DTYPES:
            values = np.frombuffer(tensor.raw_data, dtype=_RAW_DTYPES[tensor.data_type])
            if tensor.data_type == T.BFLOAT16:  # +0 and -0: every bit but the sign is 0
                return implicit + int(np.count_nonzero((values & 0x7FFF) == 0))
            return implicit + int(values.size - np.count_nonzero(values))
        values = onnx.numpy_helper.to_array(tensor)
        return implicit + int(values.size - np.count_nonzero(values.astype(np.float32)))
    except Exception:  # truncated data, exotic encodings: leave the tensor out
        return None


def weight_sparsity(model: onnx.ModelProto) -> dict[str, float]:
    """Fraction of exactly-zero elements per float weight of rank >= 2 (initializers and
    Constant nodes; tensors stored as external data that is not loaded are left out)."""
    result = {}
    for name, (tensor, count, rank) in _weights(model).items():
        if rank < 2 or count == 0:
            continue
        zeros = _zero_count(tensor, count)
        if zeros is not None:
            result[name] = zeros / count
    return result


def _model_sparsity(weights: Mapping[str, tuple[Any, int, int]]) -> float:
    zeros = total = 0
    for tensor, count, rank in weights.values():
        if rank < 2 or count == 0:
            continue
        z = _zero_count(tensor, count)
        if z is not None:
            zeros += z
            total += count
    return zeros / total if total else 0.0


# --------------------------------------------------------------------------- size


#: Below this many tensor bytes `size_bytes` is exact (ByteSize); above, tensor bytes plus
#: the other messages' sizes (within bytes of it), without serializing the weights.
_EXACT_SIZE_LIMIT = 16 * 2**20


def _size_bytes(model: onnx.ModelProto) -> int:
    """Serialized size; for large models (or with external data) tensor bytes plus the
    graph's other messages."""
    external = any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for g in iter_graphs(model.graph)
        for t in g.initializer
    )
    if not external and model_bytes(model) < _EXACT_SIZE_LIMIT:
        return model.ByteSize()  # exact, but upb serializes to count: twice the model
    graph = model.graph
    size = sum(n.ByteSize() for n in graph.node)
    size += sum(v.ByteSize() for v in (*graph.input, *graph.output, *graph.value_info))
    for t in graph.initializer:  # tensor data plus name, dims and type
        size += tensor_bytes(t) + len(t.name.encode()) + 2 * len(t.dims) + 16
    for s in graph.sparse_initializer:
        size += s.ByteSize() if tensor_bytes(s.values) < PROTOBUF_LIMIT else tensor_bytes(s.values)
    return size + sum(f.ByteSize() for f in model.functions) + 64


# --------------------------------------------------------------------------- MACs


def _numel(shape: Sequence[Dim] | None) -> int | None:
    """Elements of a shape, symbolic dims counting 1; None when a dim or the rank is unknown."""
    if shape is None or any(d is None for d in shape):
        return None
    return math.prod(d if isinstance(d, int) else 1 for d in shape)


def _dim(d: Dim) -> int | None:
    if d is None:
        return None
    return d if isinstance(d, int) else 1


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def count_macs(node: onnx.NodeProto, shapes: Mapping[str, Sequence[Dim] | None]) -> int:
    """MACs of one node given tensor shapes (name -> shape; missing = unknown); 0 if unknown."""
    op = node.op_type

    def shape(i: int, outputs: bool = False) -> Sequence[Dim] | None:
        names = node.output if outputs else node.input
        return shapes.get(names[i]) if i < len(names) and names[i] else None

    out = shape(0, outputs=True)
    out_elems = _numel(out)

    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shape(3 if op == "QLinearConv" else 1)
        if w is None or len(w) < 2 or out_elems is None or _numel(w[1:]) is None:
            return 0
        return out_elems * _numel(w[1:])  # (Cin / group) * prod(kernel)
    if op == "ConvTranspose":
        x, w = shape(0), shape(1)
        in_elems = _numel(x)
        if w is None or len(w) < 2 or in_elems is None or _numel(w[1:]) is None:
            return 0
        return in_elems * _numel(w[1:])  # (Cout / group) * prod(kernel)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"):
        a = shape(0)
        b = shape(3 if op == "QLinearMatMul" else 1)
        k: int | None = None
        if op == "Gemm":
            if b is not None and len(b) == 2:
                k = _dim(b[1] if _attr(node, "transB", 0) else b[0])
            if k is None and a is not None and len(a) == 2:
                k = _dim(a[0] if _attr(node, "transA", 0) else a[1])
        else:
            if a is not None and len(a) >= 1:
                k = _dim(a[-1])
            if k is None and b is not None and len(b) >= 1:
                k = _dim(b[0] if len(b) == 1 else b[-2])
        if k is None or out_elems is None:
            return 0
        return out_elems * k
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = _attr(node, "kernel_shape")
        if out_elems is None or not kernel:
            return 0
        return out_elems * math.prod(kernel)
    if op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool") or op in _REDUCE:
        return _numel(shape(0)) or 0
    if op in _ELEMENTWISE:
        if out_elems is None:
            return 0
        n_inputs = sum(1 for name in node.input if name)
        return out_elems * (max(1, n_inputs - 1) if op in _VARIADIC else 1)
    if op in _PER_ELEMENT:
        return 0 if out_elems is None else out_elems * _PER_ELEMENT[op]
    if op == "LRN":
        return 0 if out_elems is None else out_elems * int(_attr(node, "size", 1))
    return 0


# --------------------------------------------------------------------------- model


def model_cost(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    fingerprint: str | None = None,
) -> ModelCost:
    """Cost of `model`'s main graph; see the module docstring for what is counted.

    `params` counts the elements of float constant tensors of rank >= 1 (initializers,
    sparse initializers at their dense size, Constant nodes), each tensor once, and of
    integer constants a DequantizeLinear reads (quantized weights: a quantized model
    keeps its parameter count while `size_bytes` shrinks); Q/DQ scales and zero points
    are not counted.
    `sparsity` is the fraction of exactly-zero elements over float weights of rank >= 2.
    `input_shapes` fixes symbolic input dims (ONNX Runtime may run once, see
    `infer_shapes`); raises DataError when they do not fit the model. `fingerprint`
    (`graph.fingerprint(model)`, when the caller has it) saves computing it again.
    """
    infos: dict[str, TensorInfo] = infer_shapes(model, input_shapes, fingerprint=fingerprint)
    shapes = {name: info.shape for name, info in infos.items()}
    weights = _weights(model)

    counter = _MacCounter(shapes, _int_constants(model))
    per_node = []
    total_macs = 0
    for i, node in enumerate(model.graph.node):
        macs = counter.node(node, 1)
        params = sum(weights[n][1] for n in set(node.input) if n in weights)
        per_node.append(
            NodeCost(
                name=node.name or f"{node.op_type}_{i}",
                op=node.op_type,
                params=params,
                macs=macs,
                output_shapes=[shapes.get(o) if o else None for o in node.output],
            )
        )
        total_macs += macs

    histogram = Counter(node.op_type for node in model.graph.node)
    ops = dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0])))
    return ModelCost(
        nodes=len(model.graph.node),
        params=sum(count for _, count, _ in weights.values()),
        size_bytes=_size_bytes(model),
        macs=total_macs,
        ops=ops,
        per_node=per_node,
        sparsity=_model_sparsity(weights),
        macs_by_op=dict(
            sorted(((k, v) for k, v in counter.by_op.items() if v), key=lambda kv: -kv[1])
        ),
        notes=counter.notes,
    )


def _int_constants(model: onnx.ModelProto) -> dict[str, int]:
    """Scalar integer constants (initializers and Constant nodes) of every graph, by name:
    what a Loop's trip count may be."""
    out = {}
    for graph in iter_graphs(model.graph):
        tensors = [(t.name, t) for t in graph.initializer]
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                tensors.append((node.output[0], node.attribute[0].t))
        for name, t in tensors:
            if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and (
                math.prod(t.dims) == 1
            ):
                try:
                    out[name] = int(onnx.numpy_helper.to_array(t).reshape(-1)[0])
                except Exception:  # unreadable data: no trip count
                    continue
    return out


class _MacCounter:
    """MACs of nodes and subgraph bodies at `shapes`, per op type into `by_op`."""

    def __init__(
        self, shapes: Mapping[str, Sequence[Dim] | None], consts: Mapping[str, int]
    ) -> None:
        self.shapes, self.consts = shapes, consts
        self.by_op: Counter[str] = Counter()
        self.notes: list[str] = []

    def body(self, graph: onnx.GraphProto, times: int) -> int:
        return sum(self.node(n, times) for n in graph.node)

    def node(self, node: onnx.NodeProto, times: int) -> int:
        """MACs of `node` run `times` times, bodies included; adds them to `by_op`."""
        bodies = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        label = node.name or node.op_type
        if node.op_type == "If" and bodies:
            outer, branches = self.by_op, []
            for key in ("then_branch", "else_branch"):
                if key in bodies:
                    self.by_op = Counter()
                    branches.append((self.body(bodies[key], times), self.by_op))
            self.by_op = outer
            macs, local = max(branches, key=lambda b: b[0])
            self.by_op.update(local)
            return macs
        if node.op_type == "Loop" and "body" in bodies:
            trip = self.consts.get(node.input[0]) if node.input and node.input[0] else None
            if trip is None or trip < 0:
                self.notes.append(f"Loop '{label}': trip count not constant; its body counted once")
                trip = 1
            return self.body(bodies["body"], times * trip)
        if node.op_type == "Scan" and "body" in bodies:
            length = None
            n_scan = int(_attr(node, "num_scan_inputs", 0))
            if n_scan:
                first = node.input[len(node.input) - n_scan]
                axis = (_attr(node, "scan_input_axes") or [0])[0]
                shape = self.shapes.get(first)
                if shape is not None and len(shape) > axis and isinstance(shape[axis], int):
                    length = shape[axis]
            if length is None:
                self.notes.append(f"Scan '{label}': scan length unknown; its body counted once")
                length = 1
            return self.body(bodies["body"], times * length)
        if bodies:  # other ops with subgraphs: their bodies once per run
            return sum(self.body(g, times) for g in bodies.values())
        try:
            macs = count_macs(node, self.shapes) * times
        except Exception as exc:  # a malformed attribute must not stop the report
            log.debug("no MACs for node %s (%s): %s", node.name, node.op_type, exc)
            macs = 0
        self.by_op[node.op_type] += macs
        return macs
