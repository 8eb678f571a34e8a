"""Small helpers the built-in passes share for editing onnx-graphsurgeon graphs.

Constant values of tensors (initializers and `Constant` node outputs), consumer checks,
rewiring a tensor's uses, fresh names, and shapes from ONNX shape inference that are
read without writing them into the graph (so a pass that changes nothing exports the
same model).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

__all__ = [
    "FLOAT_DTYPES",
    "const_value",
    "infer_shapes",
    "is_graph_input",
    "is_graph_output",
    "output_ids",
    "replace_uses",
    "set_constant_input",
    "sole_consumer",
    "unique_name",
]

log = logging.getLogger(__name__)

#: Floating-point dtypes whose arithmetic the lossless passes rewrite.
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def const_value(tensor: Any) -> np.ndarray | None:
    """The value of `tensor` when it is a constant (initializer or `Constant` node output).

    Identity nodes are looked through. Returns None for anything computed at run time,
    for graph inputs, and for `Constant` nodes that use a sparse or attribute-reference
    value.
    """
    if tensor is None or tensor.is_empty():
        return None
    for _ in range(64):  # look through Identity chains (torch exports shared BN stats so)
        if (
            len(tensor.inputs) == 1
            and tensor.inputs[0].op == "Identity"
            and tensor.inputs[0].inputs
        ):
            tensor = tensor.inputs[0].inputs[0]
        else:
            break
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        node = tensor.inputs[0]
        if len(node.attrs) != 1:
            return None
        key, value = next(iter(node.attrs.items()))
        if key == "value" and isinstance(value, gs.Constant):
            return np.asarray(value.values)
        if key in ("value_float", "value_int"):
            return np.array(value, dtype=np.float32 if key == "value_float" else np.int64)
        if key in ("value_floats", "value_ints"):
            return np.array(value, dtype=np.float32 if key == "value_floats" else np.int64)
    return None


def output_ids(graph: gs.Graph) -> set[int]:
    """ids of the graph's outputs and of every subgraph's outputs (If/Loop/Scan bodies).

    A subgraph may return a tensor of the enclosing graph; such a tensor must keep its
    producer and name just like a graph output.
    """
    ids = {id(t) for t in graph.outputs}
    for sub in graph.subgraphs(recursive=True):
        ids.update(id(t) for t in sub.outputs)
    return ids


def is_graph_output(graph: gs.Graph, tensor: Any, outputs: set[int] | None = None) -> bool:
    """Whether `tensor` is an output of the graph or, with `outputs`, one of those ids."""
    if outputs is not None:
        return id(tensor) in outputs
    return any(t is tensor for t in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: Any) -> bool:
    return any(t is tensor for t in graph.inputs)


def sole_consumer(graph: gs.Graph, tensor: Any, outputs: set[int] | None = None) -> Any | None:
    """The one node that reads `tensor` (once), or None when it has other uses.

    A graph output (or any id in `outputs`, see `output_ids`), a tensor read by several
    nodes or twice by one node has no sole consumer.
    """
    if is_graph_output(graph, tensor, outputs) or len(tensor.outputs) != 1:
        return None
    node = tensor.outputs[0]
    if sum(1 for t in node.inputs if t is tensor) != 1:
        return None
    return node


def replace_uses(old: Any, new: Any, *, skip: Any = None) -> int:
    """Make every node that reads `old` (subgraph nodes included) read `new` instead.

    `skip` is a node left reading `old`. Graph outputs are not touched. Returns the
    number of inputs rewired.
    """
    count = 0
    for node in list(old.outputs):
        if node is skip:
            continue
        for i, inp in enumerate(node.inputs):
            if inp is old:
                node.inputs[i] = new
                count += 1
    return count


def unique_name(graph: gs.Graph, base: str, taken: set[str] | None = None) -> str:
    """`base`, or `base_1`, `base_2` ... whichever no tensor of the graph uses yet."""
    names = taken if taken is not None else _tensor_names(graph)
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


def _tensor_names(graph: gs.Graph) -> set[str]:
    names = set(graph.tensors())
    for sub in graph.subgraphs(recursive=True):
        names.update(sub.tensors())
    return names


def set_constant_input(
    graph: gs.Graph, node: Any, index: int, values: np.ndarray, base: str
) -> None:
    """Make input `index` of `node` the constant `values`.

    The existing initializer is updated in place when `node` is its only reader;
    otherwise (shared weights, a `Constant` node output, a missing optional input) a new
    initializer named after `base` is created, so no other node sees the change.
    """
    current = node.inputs[index] if index < len(node.inputs) else None
    if (
        isinstance(current, gs.Constant)
        and len(current.outputs) == 1
        and current.outputs[0] is node
        and sum(1 for t in node.inputs if t is current) == 1
        and not is_graph_output(graph, current)
    ):
        current.values = values
        return
    tensor = gs.Constant(unique_name(graph, base), np.array(values, order="C"))
    if current is not None:
        node.inputs[index] = tensor
        return
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable.empty())
    node.inputs.append(tensor)


def infer_shapes(graph: gs.Graph) -> dict[str, tuple[tuple[Any, ...] | None, np.dtype | None]]:
    """Shapes and dtypes of the graph's tensors by ONNX shape inference, by name.

    The graph is not changed. Tensors that inference cannot type are missing; symbolic
    dimensions are strings. Returns what the graph already knows when inference fails.
    """
    known: dict[str, tuple[tuple[Any, ...] | None, np.dtype | None]] = {}
    for name, tensor in graph.tensors().items():
        if tensor.shape is not None or tensor.dtype is not None:
            known[name] = (_shape_tuple(tensor.shape), _np_dtype(tensor.dtype))
    try:
        model = gs.export_onnx(graph.copy(), do_type_check=False)
        if model.ir_version > 10:
            model.ir_version = 10
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # inference raises many types on odd models
        log.debug("shape inference failed: %s", exc)
        return known
    for info in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        if not info.type.HasField("tensor_type"):
            continue
        ttype = info.type.tensor_type
        shape = None
        if ttype.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in ttype.shape.dim
            )
        dtype = None
        if ttype.elem_type:
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
            except (KeyError, TypeError, ValueError):
                dtype = None
        old_shape, old_dtype = known.get(info.name, (None, None))
        known[info.name] = (old_shape if old_shape is not None else shape, old_dtype or dtype)
    return known


def _shape_tuple(shape: Any) -> tuple[Any, ...] | None:
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else (d or "?") for d in shape)


def _np_dtype(dtype: Any) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        except (KeyError, TypeError, ValueError):
            return None
