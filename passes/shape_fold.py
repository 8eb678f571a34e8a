"""Shape-chain folding for the `cleanup` pass: shape arithmetic whose result is known.

Exports compute shapes at run time: `Shape -> Gather -> Unsqueeze -> Concat -> Reshape`
per attention layer, `Shape -> Slice` for a flatten. Each int tensor of rank <= 1 built
from Shape, Gather, Slice, Unsqueeze, Squeeze, Concat, Cast and Identity is evaluated
element by element: an element is a known int, or dim `i` of a tensor `t` (with the
symbol shape inference gives it, if any). Sizes come from `onnxslim_edge.graph.infer_shapes`;
sizes it only measured on placeholder inputs are never used (they depend on those inputs).

    chain whose elements are all known ints        =>  an int64 constant. Exact.
    Reshape(x, chain), elements known except dims   =>  Reshape(x, constant) with
      dim p of x at position p -> 0, one other dim -> -1.  Exact.

Reshape's 0 copies the input dim at the same position (allowzero=0): used for an
element that is dim p of x itself, or of a tensor whose dim has the same declared
symbol as x's dim p (shape inference gives equal symbols only to equal sizes, given the
model's declared input names). One remaining unknown element becomes -1, which Reshape
infers from the element count: the same value, since the original shape had to match
that count too. Exact except for zero-sized tensors, where -1 cannot be inferred (none
of the exports this targets have them). Reshapes with allowzero=1, and chains that
produce graph outputs, are left alone; the constants the chains become are then folded
further (Expand, ConstantOfShape ...) by the clean-up's constant folding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.graph import const_value, output_ids, replace_uses, unique_name

__all__ = ["fold_shape_chains"]

_INT_DTYPES = (np.int64, np.int32)
_MAX_ELEMENTS = 64  # a shape has few elements: larger int tensors are data


@dataclass(frozen=True)
class _Dim:
    """Dim `index` of tensor `source` (its symbol, or None), not known as an int."""

    source: int  # id of the tensor
    index: int
    symbol: str | None


#: A shape-like value: (is a scalar, elements).
_Value = tuple[bool, tuple["int | _Dim", ...]]


def fold_shape_chains(graph: gs.Graph, shapes: dict[str, Any]) -> tuple[int, int]:
    """Fold known shape chains and rewrite Reshape shapes (see module doc) in the main
    graph (subgraphs are left alone: sizes are looked up by name, and sibling If branches
    may reuse a name). `shapes`: `infer_shapes(graph)`. Returns (tensors made constant,
    Reshape shapes rewritten)."""
    outputs = output_ids(graph)
    evaluator = _Evaluator(shapes)
    names: set[str] = set()
    for scope in (graph, *graph.subgraphs(recursive=True)):
        names.update(scope.tensors())

    def constant(base: str, array: np.ndarray) -> gs.Constant:
        return gs.Constant(unique_name(graph, f"{base}_folded", names), array)

    folded = reshaped = 0
    for scope in (graph,):  # sizes are by name: sibling branches may reuse names
        for node in list(scope.nodes):
            if node.op == "Reshape" and _rewrite_reshape(node, evaluator, shapes, constant):
                reshaped += 1
                continue
            for out in node.outputs:
                if id(out) in outputs or out.is_empty() or not out.outputs:
                    continue
                value = evaluator.value(out)
                if value is None or not all(isinstance(e, int) for e in value[1]):
                    continue
                if node.op == "Constant" or const_value(out) is not None:
                    continue
                dtype = _dtype_of(out, shapes)
                array = np.array(value[1], dtype=dtype)
                const = constant(out.name, array.reshape(()) if value[0] else array)
                replace_uses(out, const)
                folded += 1
    return folded, reshaped


def _dtype_of(tensor: Any, shapes: dict[str, Any]) -> type:
    info = shapes.get(tensor.name)
    dtype = info.numpy_dtype if info is not None else None
    return np.int32 if dtype == np.dtype(np.int32) else np.int64


def _rewrite_reshape(
    node: Any, evaluator: _Evaluator, shapes: dict[str, Any], constant: Any
) -> bool:
    if len(node.inputs) != 2 or node.attrs.get("allowzero", 0):
        return False
    data, target = node.inputs
    if const_value(target) is not None:
        return False
    value = evaluator.value(target)
    if value is None or value[0]:
        return False
    info = shapes.get(data.name)
    dshape = None if info is None or info.measured else info.shape
    new, free = [], 0
    for pos, e in enumerate(value[1]):
        if isinstance(e, int):
            free += e == -1
            new.append(e)
            continue
        same = (
            dshape is not None
            and pos < len(dshape)
            and (
                (e.source == id(data) and e.index == pos)
                or (e.symbol is not None and dshape[pos] == e.symbol)
            )
        )
        if same:
            new.append(0)
        else:
            free += 1
            new.append(-1)
    if free > 1:
        return False
    node.inputs[1] = constant(target.name, np.array(new, dtype=np.int64))
    return True


class _Evaluator:
    """Element-wise values of shape-like int tensors (see module doc), memoized."""

    def __init__(self, shapes: dict[str, Any]) -> None:
        self.shapes = shapes
        self.memo: dict[int, _Value | None] = {}

    def value(self, tensor: Any) -> _Value | None:
        key = id(tensor)
        if key not in self.memo:
            self.memo[key] = None  # cycles cannot occur, but be safe
            self.memo[key] = self._compute(tensor)
        return self.memo[key]

    def _compute(self, tensor: Any) -> _Value | None:
        if isinstance(tensor, gs.Constant):  # by its shape first: never load a weight here
            shape = tuple(tensor.shape or ())
            if len(shape) > 1 or math.prod(int(d) for d in shape) > _MAX_ELEMENTS:
                return None
        const = const_value(tensor)
        if const is not None:
            if const.dtype not in _INT_DTYPES or const.ndim > 1 or const.size > _MAX_ELEMENTS:
                return None
            return (const.ndim == 0, tuple(int(v) for v in const.reshape(-1)))
        if len(tensor.inputs) != 1:
            return None
        node = tensor.inputs[0]
        handler = getattr(self, f"_op_{node.op}", None)
        if handler is None or node.domain not in ("", "ai.onnx", None):
            return None
        if len(node.outputs) != 1:
            return None
        try:
            return handler(node)
        except (TypeError, ValueError, IndexError):  # attribute refs, odd values
            return None

    def _ints(self, tensor: Any) -> list[int] | None:
        value = self.value(tensor) if tensor is not None and not tensor.is_empty() else None
        if value is None or not all(isinstance(e, int) for e in value[1]):
            return None
        return list(value[1])

    def _op_Shape(self, node: Any) -> _Value | None:
        src = node.inputs[0]
        info = self.shapes.get(src.name)
        if info is None or info.measured or info.shape is None:
            return None
        dims = tuple(
            d if isinstance(d, int) else _Dim(id(src), i, d if isinstance(d, str) else None)
            for i, d in enumerate(info.shape)
        )
        start, end = node.attrs.get("start", 0), node.attrs.get("end")
        if not isinstance(start, int) or not isinstance(end, (int, type(None))):
            return None
        return (False, dims[start:end])

    def _op_Identity(self, node: Any) -> _Value | None:
        return self.value(node.inputs[0])

    def _op_Cast(self, node: Any) -> _Value | None:
        to = node.attrs.get("to")  # TensorProto.INT32 or INT64 only
        if isinstance(to, bool) or to not in (6, 7):
            return None
        value = self.value(node.inputs[0])
        if (
            value is not None
            and to == 6
            and any(isinstance(e, int) and not -(2**31) <= e < 2**31 for e in value[1])
        ):
            return None
        return value

    def _op_Gather(self, node: Any) -> _Value | None:
        if node.attrs.get("axis", 0) != 0:
            return None
        data = self.value(node.inputs[0])
        indices = const_value(node.inputs[1])
        if data is None or data[0] or indices is None or indices.ndim > 1:
            return None
        n = len(data[1])
        picked = []
        for i in indices.reshape(-1).tolist():
            if not -n <= i < n:
                return None
            picked.append(data[1][i])
        return (indices.ndim == 0, tuple(picked))

    def _op_Slice(self, node: Any) -> _Value | None:
        data = self.value(node.inputs[0])
        if data is None or data[0]:
            return None
        if "starts" in node.attrs:  # opset < 10
            starts, ends = node.attrs["starts"], node.attrs["ends"]
            axes, steps = node.attrs.get("axes", [0]), [1]
        else:
            starts, ends = self._ints(node.inputs[1]), self._ints(node.inputs[2])
            axes = self._ints(node.inputs[3]) if len(node.inputs) > 3 else [0]
            steps = self._ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
        if starts is None or ends is None or axes is None or steps is None:
            return None
        if len(starts) != 1 or len(ends) != 1 or list(axes) not in ([0], [-1]) or steps != [1]:
            return None
        return (False, data[1][slice(*_clamp(starts[0], ends[0], len(data[1])))])

    def _op_Unsqueeze(self, node: Any) -> _Value | None:
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            axes = self._ints(node.inputs[1])
        value = self.value(node.inputs[0])
        if value is None or not value[0] or axes is None or list(axes) not in ([0], [-1]):
            return None
        return (False, value[1])

    def _op_Squeeze(self, node: Any) -> _Value | None:
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            axes = self._ints(node.inputs[1])
        value = self.value(node.inputs[0])
        if value is None or value[0] or len(value[1]) != 1:
            return None
        if axes is not None and list(axes) not in ([0], [-1]):
            return None
        return (True, value[1])

    def _op_Concat(self, node: Any) -> _Value | None:
        if node.attrs.get("axis") not in (0, -1):
            return None
        parts: list[int | _Dim] = []
        for tensor in node.inputs:
            value = self.value(tensor)
            if value is None or value[0]:
                return None
            parts.extend(value[1])
        return (False, tuple(parts))


def _clamp(start: int, end: int, n: int) -> tuple[int, int]:
    """ONNX Slice bounds for step 1: negative counted from the end, clamped to [0, n]."""
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    return min(max(start, 0), n), min(max(end, 0), n)
