"""Reading the constant weight of a Conv/ConvTranspose/Gemm/MatMul, and its reduction axis.

`weight_of(node)` finds the float weight of a layer (an initializer or a `Constant`
node's output, looked through Identity; with `dequantize`, the output of a
DequantizeLinear of constants) or says why there is none; `reduction_axis` names the
axis the layer sums over (Cin for Conv, K for Gemm/MatMul), and `reduction_groups` /
`from_reduction_groups` view a weight as groups of consecutive entries along it, and
`check_weight_ops` validates an `ops` option naming such layers. Used by the sparsity
checker (`analysis.sparsity_nm`) and the pruning passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.errors import ConfigError

__all__ = [
    "WEIGHT_OPS",
    "LayerWeight",
    "check_weight_ops",
    "from_reduction_groups",
    "reduction_axis",
    "reduction_groups",
    "weight_of",
]

#: Layers with a weight input, and the input index that holds the weight.
WEIGHT_OPS: dict[str, int] = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}

_FLOAT_KINDS = "f"


@dataclass
class LayerWeight:
    """The constant weight of one layer.

    `constant` holds the values (an initializer, or the value of a `Constant` node) and
    is None only for a dequantized weight (`weight_of(..., dequantize=True)`), which
    can be read but not rewritten. `axis` is the reduction axis (the one the layer sums
    over: Cin for Conv, K for Gemm/MatMul) as a non-negative index into `values`.
    """

    node: Any
    values: np.ndarray
    axis: int
    constant: Any = None
    root: Any = None  # the graph tensor carrying the constant (for finding its readers)

    @property
    def name(self) -> str:
        return self.root.name if self.root is not None else self.node.inputs[1].name


def reduction_axis(node: Any, shape: Sequence[int]) -> int | str:
    """The axis of the weight `node` reduces over, or the reason there is none."""
    rank = len(shape)
    if node.op == "Conv":
        return 1 if rank >= 3 else f"Conv weight of rank {rank}"
    if node.op == "ConvTranspose":
        return 0 if rank >= 3 else f"ConvTranspose weight of rank {rank}"
    if node.op == "Gemm":
        if rank != 2:
            return f"Gemm weight of rank {rank}"
        return 1 if int(node.attrs.get("transB", 0)) else 0
    if node.op == "MatMul":
        if rank == 0:
            return "MatMul weight is a scalar"
        return 0 if rank == 1 else rank - 2
    return f"{node.op} has no weight input"


def _producer(tensor: Any) -> Any | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def _dequantized(node: Any) -> np.ndarray | None:
    """(x - zero_point) * scale of a DequantizeLinear whose inputs are all constants."""
    values = []
    for tensor in node.inputs:
        if tensor.is_empty():
            values.append(None)
            continue
        holder = _holder(tensor)
        if holder is None:
            return None
        values.append(np.asarray(holder.values))
    if len(values) < 2 or values[0] is None or values[1] is None:
        return None
    x, scale = values[0], values[1].astype(np.float64)
    zero = values[2] if len(values) > 2 and values[2] is not None else np.zeros((), x.dtype)
    if x.dtype.kind not in "iu":
        return None  # float8 and 4-bit types: not read here
    zero = zero.astype(np.float64)
    if scale.ndim == 1 and scale.size > 1 and x.ndim > 0:
        axis = int(node.attrs.get("axis", 1)) % x.ndim
        shape = [1] * x.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape) if zero.ndim else zero
    elif scale.ndim > 1:
        return None  # blocked quantization: not read here
    return (x.astype(np.float64) - zero) * scale


def _holder(tensor: Any) -> Any | None:
    """The gs.Constant holding `tensor`'s value (through Identity and Constant nodes)."""
    found = _holder_and_root(tensor)
    return found[0] if found is not None else None


def _holder_and_root(tensor: Any) -> tuple[Any, Any] | None:
    """(gs.Constant holding the value, the graph tensor carrying it), or None.

    The root is the initializer itself, or the output of the `Constant` node whose
    `value` attribute holds the data: the tensor whose readers see a change.
    """
    for _ in range(64):
        if isinstance(tensor, gs.Constant):
            return tensor, tensor
        node = _producer(tensor)
        if node is None:
            return None
        if node.op == "Identity" and node.inputs:
            tensor = node.inputs[0]
            continue
        if node.op == "Constant":
            value = node.attrs.get("value")
            if len(node.attrs) == 1 and isinstance(value, gs.Constant):
                return value, tensor
        return None
    return None


def weight_of(node: Any, graph: Any = None, *, dequantize: bool = False) -> LayerWeight | str:
    """The constant float weight of a Conv/ConvTranspose/Gemm/MatMul, or why there is none.

    The weight is input B (index 1). It is constant when it is an initializer or a
    `Constant` node's output, looked through Identity nodes; an initializer that is also
    a graph input is not (a caller may override it). With `dequantize`, the output of a
    DequantizeLinear of constants is read too (for checking, not for rewriting).
    """
    if node.op not in WEIGHT_OPS:
        return f"{node.op} has no weight input"
    index = WEIGHT_OPS[node.op]
    if len(node.inputs) <= index or node.inputs[index].is_empty():
        return "no weight input"
    tensor = node.inputs[index]
    found = _holder_and_root(tensor)
    holder, root = found if found is not None else (None, None)
    if holder is not None and graph is not None and any(t is holder for t in graph.inputs):
        return f"weight '{holder.name}' is also a graph input (it can be overridden)"
    constant = holder
    if holder is not None:
        values = np.asarray(holder.values)
    else:
        source = tensor
        while _producer(source) is not None and _producer(source).op == "Identity":
            source = _producer(source).inputs[0]
        producer = _producer(source)
        if producer is not None and producer.op == "DequantizeLinear":
            dq = _dequantized(producer) if dequantize else None
            if dq is None:
                return f"weight '{tensor.name}' is quantized (DequantizeLinear output)"
            values = dq
        elif producer is None:
            return f"weight '{tensor.name}' is not a constant (a graph input)"
        else:
            hint = ""
            if producer.inputs and all(_holder(t) is not None for t in producer.inputs):
                hint = "; run 'cleanup' first to fold it"
            return (
                f"weight '{tensor.name}' is not a constant "
                f"(computed by {producer.op}{f' {producer.name!r}' if producer.name else ''}{hint})"
            )
    if values.dtype.kind not in _FLOAT_KINDS:
        return f"weight '{tensor.name}' has dtype {values.dtype}, not floating point"
    axis = reduction_axis(node, values.shape)
    if isinstance(axis, str):
        return axis
    return LayerWeight(node=node, values=values, axis=axis, constant=constant, root=root)


def reduction_groups(values: np.ndarray, axis: int, size: int) -> np.ndarray:
    """`values` as (rows, groups, size): groups of `size` consecutive entries along `axis`.

    `values.shape[axis]` must be a multiple of `size`; see `from_reduction_groups`.
    """
    moved = np.moveaxis(values, axis, -1)
    assert moved.shape[-1] % size == 0, (moved.shape, size)
    return moved.reshape(-1, moved.shape[-1] // size, size)


def from_reduction_groups(groups: np.ndarray, shape: Sequence[int], axis: int) -> np.ndarray:
    """Inverse of `reduction_groups` for an array of the original `shape`."""
    moved_shape = list(shape)
    moved_shape.append(moved_shape.pop(axis))
    return np.moveaxis(groups.reshape(moved_shape), -1, axis)


def check_weight_ops(name: str, ops: Any, valid: Sequence[str]) -> None:
    """ConfigError unless `ops` (option `name`.ops) is a non-empty tuple of `valid` op types."""
    if not isinstance(ops, tuple) or not ops:
        raise ConfigError(f"{name}.ops: expected a non-empty list of op types, got {ops!r}")
    bad = [op for op in ops if op not in valid]
    if bad:
        raise ConfigError(
            f"{name}.ops: unsupported {', '.join(map(str, bad))}; valid: {', '.join(valid)}"
        )
