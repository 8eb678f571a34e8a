"""Transpose, Reshape, Cast and MatMul + Add merging for the `cleanup` pass.

    Transpose(x, perm) with perm = 0..n-1               =>  x. Exact.
    Transpose(Transpose(x, p), q)                        =>  Transpose(x, [p[i] for i in q]),
                                                             x if that is the identity. Exact.
    Reshape(Reshape(x, s), t), t a constant without 0   =>  Reshape(x, t). Exact.
    Reshape(x, s) where x already has that static shape  =>  x. Exact.
    Cast(x, to=dtype of x)                               =>  x. Exact.
    Add(MatMul(x, W), b), x 2-D, W and b constants       =>  Gemm(x, W, b). Exact in real
      arithmetic (the same products and sums; the bias may be added in another order).
    LSTM/GRU/RNN(..., initial_h = zeros, initial_c = zeros)  =>  the input omitted. Exact:
      omitted initial states are zero (ONNX spec); exports build them with ConstantOfShape.

Reshape keeps the elements in order, so a Reshape of a Reshape is one Reshape to the
last shape, unless that shape copies a dim (0, allowzero=0) of the intermediate tensor.
Sizes and dtypes come from `onnxslim_edge.graph.infer_shapes`; measured sizes are not
used. The inner Transpose/Reshape stays when something else reads it. A node whose
output is a graph output keeps it (see `cleanup._bypass`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_edge.graph import const_value, output_ids

__all__ = ["merge_layout_ops"]


def merge_layout_ops(graph: gs.Graph, shapes: dict[str, Any], bypass: Any) -> dict[str, int]:
    """Apply the rewrites above in the main graph (not in subgraphs: sizes are looked up
    by name, and sibling If branches may reuse a name); counts by rewrite.
    `shapes`: `infer_shapes(graph)`; `bypass(scope, node, outputs)` removes a node whose
    output equals its input, returning why not (None when done)."""
    outputs = output_ids(graph)
    counts = {
        "transposes_merged": 0,
        "reshapes_merged": 0,
        "noop_nodes_removed": 0,
        "gemms_fused": 0,
        "zero_states_dropped": 0,
    }
    for scope in (graph,):  # sizes are by name: sibling branches may reuse names
        scope.toposort(recurse_subgraphs=False)
        for node in list(scope.nodes):
            if not node.inputs or not node.outputs or node.inputs[0].is_empty():
                continue
            if node.domain not in ("", "ai.onnx", None):
                continue
            if node.op == "Transpose":
                rewrite = _transpose(node, shapes)
            elif node.op == "Reshape":
                rewrite = _reshape(node, shapes)
            elif node.op == "Cast":
                rewrite = _cast(node, shapes)
            elif node.op == "Add" and (graph.opset or 0) >= 7:  # Gemm broadcasts C since 7
                rewrite = _gemm(scope, node, shapes, outputs)
            elif node.op in _RECURRENT_STATES:
                rewrite = _zero_states(node)
            else:
                continue
            if rewrite == "noop":
                if bypass(scope, node, outputs) is None:
                    counts["noop_nodes_removed"] += 1
            elif rewrite:
                counts[rewrite] += 1
    return counts


def _static(tensor: Any, shapes: dict[str, Any]) -> tuple[int, ...] | None:
    info = shapes.get(tensor.name)
    if info is None or info.measured or info.shape is None:
        return None
    return info.shape if all(isinstance(d, int) for d in info.shape) else None


def _perm(node: Any, shapes: dict[str, Any]) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    info = shapes.get(node.inputs[0].name)
    if info is None or info.shape is None:
        return None
    return list(range(len(info.shape)))[::-1]  # the default reverses the axes


def _transpose(node: Any, shapes: dict[str, Any]) -> str | None:
    perm = _perm(node, shapes)
    if perm is None:
        return None
    src = node.inputs[0]
    inner = src.inputs[0] if len(src.inputs) == 1 else None
    if inner is not None and inner.op == "Transpose" and inner.domain in ("", "ai.onnx", None):
        first = _perm(inner, shapes)
        if first is not None and len(first) == len(perm):
            perm = [first[i] for i in perm]
            node.inputs[0] = inner.inputs[0]
            node.attrs["perm"] = perm
            if perm == list(range(len(perm))):
                return "noop"
            return "transposes_merged"
    return "noop" if perm == list(range(len(perm))) else None


def _reshape(node: Any, shapes: dict[str, Any]) -> str | None:
    if len(node.inputs) != 2:
        return None
    src = node.inputs[0]
    target = const_value(node.inputs[1])
    if target is None:
        return None
    allowzero = node.attrs.get("allowzero", 0)
    inner = src.inputs[0] if len(src.inputs) == 1 else None
    if (
        inner is not None
        and inner.op == "Reshape"
        and inner.domain in ("", "ai.onnx", None)
        and (allowzero or not np.any(target == 0))
    ):
        node.inputs[0] = inner.inputs[0]
        return "reshapes_merged"
    before, after = _static(src, shapes), _static(node.outputs[0], shapes)
    if before is not None and before == after:
        return "noop"
    return None


def _cast(node: Any, shapes: dict[str, Any]) -> str | None:
    info = shapes.get(node.inputs[0].name)
    to = node.attrs.get("to")
    if info is None or info.numpy_dtype is None or not isinstance(to, int):
        return None
    try:
        target = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))
    except (KeyError, TypeError, ValueError):
        return None
    return "noop" if target == info.numpy_dtype and info.dtype == target.name else None


def _gemm(scope: gs.Graph, add: Any, shapes: dict[str, Any], outputs: set[int]) -> str | None:
    """Fuse `Add(MatMul(x, W), b)` into a Gemm when x is 2-D and W, b constants."""
    if len(add.inputs) != 2 or len(add.outputs) != 1:
        return None
    for mm_out, bias in (add.inputs, add.inputs[::-1]):
        matmul = mm_out.inputs[0] if len(mm_out.inputs) == 1 else None
        if matmul is None or matmul.op != "MatMul" or matmul.domain not in ("", "ai.onnx", None):
            continue
        if id(mm_out) in outputs or len(mm_out.outputs) != 1:
            continue
        x, weight = matmul.inputs
        w, b = const_value(weight), const_value(bias)
        info = shapes.get(x.name)
        if w is None or b is None or info is None or info.measured or info.shape is None:
            continue
        if len(info.shape) != 2 or w.ndim != 2 or w.dtype not in _GEMM_DTYPES:
            continue
        if b.dtype != w.dtype or b.ndim > 2 or (b.ndim and b.shape[-1] not in (1, w.shape[1])):
            continue
        if b.ndim == 2 and b.shape[0] != 1:
            continue  # (M, N) biases need M known; not worth it
        out = add.outputs[0]
        for node in (add, matmul):
            node.inputs.clear()
            node.outputs.clear()
        gemm = gs.Node("Gemm", name=f"{matmul.name}_gemm", inputs=[x, weight, bias], outputs=[out])
        scope.nodes.append(gemm)
        return "gemms_fused"
    return None


_GEMM_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


#: Recurrent ops and the input indices of their initial states.
_RECURRENT_STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}


def _zero_states(node: Any) -> str | None:
    """Omit initial-state inputs that are all zeros (ConstantOfShape(0) or a constant)."""
    dropped = False
    for index in _RECURRENT_STATES[node.op]:
        if index >= len(node.inputs) or node.inputs[index].is_empty():
            continue
        if _is_zeros(node.inputs[index]):
            node.inputs[index] = gs.Variable.empty()
            dropped = True
    while node.inputs and node.inputs[-1].is_empty():
        node.inputs.pop()
    return "zero_states_dropped" if dropped else None


def _is_zeros(tensor: Any) -> bool:
    value = const_value(tensor)
    if value is not None:
        return value.size > 0 and not np.any(value)
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is None or producer.op != "ConstantOfShape":
        return False
    fill = producer.attrs.get("value")
    if fill is None:
        return True  # the default fill is a float32 zero
    fill = np.asarray(fill.values if isinstance(fill, gs.Constant) else fill)
    return not np.any(fill)
