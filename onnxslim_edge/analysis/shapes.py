"""Tensor shapes and dtypes of a model: ONNX shape inference, then ONNX Runtime if needed.

`infer_model_shapes` (behind `onnxslim_edge.graph.infer_shapes`, which caches its
results per model state) runs `onnx.shape_inference` (non-strict, with data propagation; through a
temporary file for models over 2 GB). When the caller gives `input_shapes`, those
shapes replace the graph inputs' symbolic dims first. If some tensor's shape is still
not concrete afterwards and concrete input shapes are known (from `input_shapes`, or
because every graph input is static), one ONNX Runtime session runs on a copy of the
model with every intermediate tensor exposed as an output, fed ones (floats) and zeros
(integers), and its shapes fill what ONNX left open (`TensorInfo.measured`). When ONNX
inference already gives every shape, no session is started: the answer would be the
same, only slower.

Shapes are tuples of dims: `int` for a known size, `str` for a symbolic `dim_param` of
the model, `None` for an unknown size (including the `unk__N` names that ONNX
inference invents). The caller's model is never changed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxslim_edge.errors import DataError, first_line
from onnxslim_edge.graph import expose_outputs, infer_shapes
from onnxslim_edge.model import iter_graphs, skeleton

__all__ = ["Dim", "TensorInfo", "dtype_name", "infer_model_shapes", "infer_shapes", "io_info"]

log = logging.getLogger(__name__)

Dim = int | str | None

#: Tensor element types ONNX Runtime returns as numpy arrays (exposed as extra outputs).
_RUNTIME_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.INT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT64,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.UINT32,
        onnx.TensorProto.UINT64,
        onnx.TensorProto.BOOL,
    }
)

_INVENTED_DIM = re.compile(r"unk__\d+")


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, numpy dtype name ("float32"; "undefined" if unknown) and shape."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    #: The shape was measured in an ONNX Runtime run on placeholder inputs, not inferred
    #: (metadata: not part of equality).
    measured: bool = field(default=False, compare=False)

    @property
    def numpy_dtype(self) -> np.dtype | None:
        """The dtype as numpy's, or None when unknown or not a numpy type (bfloat16 ...)."""
        if self.dtype == "undefined":
            return None
        try:
            return np.dtype(self.dtype)
        except TypeError:
            return None

    def __iter__(self) -> Any:
        """Unpacks as `(shape, numpy dtype or None)`: `shape, dtype = infos[name]`."""
        yield self.shape
        yield self.numpy_dtype

    @property
    def is_static(self) -> bool:
        """True when every dim is a known int."""
        return all(isinstance(d, int) for d in self.shape)

    @property
    def numel(self) -> int | None:
        """Number of elements when the shape is static, else None."""
        if not self.is_static:
            return None
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def dtype_name(elem_type: int) -> str:
    """The numpy dtype name of an ONNX element type ("float32", "bfloat16", ...)."""
    if elem_type == onnx.TensorProto.UNDEFINED:
        return "undefined"
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, ValueError, TypeError):
        try:
            return onnx.TensorProto.DataType.Name(elem_type).lower()
        except ValueError:  # a type this onnx does not know
            return "undefined"


def _dims_of(vi: onnx.ValueInfoProto, known_params: set[str] | None) -> tuple[Dim, ...] | None:
    """The shape of a value info, or None when it has no tensor type or no rank."""
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            invented = known_params is not None and d.dim_param not in known_params
            dims.append(None if invented and _INVENTED_DIM.fullmatch(d.dim_param) else d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _info(vi: onnx.ValueInfoProto, known_params: set[str] | None = None) -> TensorInfo | None:
    shape = _dims_of(vi, known_params)
    if shape is None:
        return None
    return TensorInfo(vi.name, dtype_name(vi.type.tensor_type.elem_type), shape)


def _initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}


def io_info(model: onnx.ModelProto) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The graph's inputs (initializers excluded) and outputs, as declared.

    A tensor declared without a rank reads as shape `()`.
    """
    inits = _initializer_names(model.graph)

    def declared(vi: onnx.ValueInfoProto) -> TensorInfo:
        info = _info(vi)
        if info is None:
            elem = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
            return TensorInfo(vi.name, dtype_name(elem), ())
        return info

    inputs = [declared(vi) for vi in model.graph.input if vi.name not in inits]
    outputs = [declared(vi) for vi in model.graph.output]
    return inputs, outputs


def _dim_params(model: onnx.ModelProto) -> set[str]:
    params: set[str] = set()
    for graph in iter_graphs(model.graph):
        for vi in (*graph.input, *graph.output, *graph.value_info):
            if vi.type.HasField("tensor_type"):
                params.update(d.dim_param for d in vi.type.tensor_type.shape.dim if d.dim_param)
    return params


def _onnx_inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with ONNX-inferred value infos (a new proto; tensors may be left out)."""
    kwargs = {"check_type": False, "strict_mode": False, "data_prop": True}
    try:
        # On a skeleton (large tensors as data-less stand-ins): no copy of the weights.
        return onnx.shape_inference.infer_shapes(skeleton(model), **kwargs)
    except Exception as exc:  # onnx raises bare RuntimeErrors for what it cannot parse
        first = first_line(exc)
        log.warning("ONNX shape inference failed (%s); using declared shapes only", first)
        return model


def _collect(inferred: onnx.ModelProto, known_params: set[str]) -> dict[str, TensorInfo]:
    """Every tensor's info from value infos and initializers, main graph winning."""
    result: dict[str, TensorInfo] = {}
    for graph in reversed(list(iter_graphs(inferred.graph))):
        for vi in (*graph.value_info, *graph.input, *graph.output):
            info = _info(vi, known_params)
            if info is not None:
                result[vi.name] = info
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        t = attr.t
                        shape = tuple(int(d) for d in t.dims)
                        result[node.output[0]] = TensorInfo(
                            node.output[0], dtype_name(t.data_type), shape
                        )
        for t in graph.initializer:
            result[t.name] = TensorInfo(
                t.name, dtype_name(t.data_type), tuple(int(d) for d in t.dims)
            )
        for s in graph.sparse_initializer:
            name = s.values.name
            result[name] = TensorInfo(
                name, dtype_name(s.values.data_type), tuple(int(d) for d in s.dims)
            )
    return result


def _concrete_inputs(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]] | None:
    """Concrete shapes for every graph input, or None when they cannot be derived.

    Raises DataError when `input_shapes` names a tensor that is not an input, gives a
    rank other than the declared one, or contradicts a static dim.
    """
    inputs, _ = io_info(model)
    declared = {i.name: i for i in inputs}
    protos = {v.name: v for v in model.graph.input}
    given: dict[str, tuple[int, ...]] = {}
    for name, shape in (input_shapes or {}).items():
        if name not in declared:
            valid = ", ".join(declared) or "none"
            raise DataError(
                f"input_shapes names '{name}', which is not a model input (inputs: {valid})"
            )
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"input_shapes['{name}'] must be a sequence of ints, not {shape!r}"
            ) from exc
        if any(d < 0 for d in dims):
            raise DataError(f"input_shapes['{name}'] has a negative dim: {dims}")
        decl = _dims_of(protos[name], None)
        if decl is not None:
            if len(decl) != len(dims):
                raise DataError(
                    f"input_shapes['{name}'] has rank {len(dims)}; the model declares "
                    f"rank {len(decl)} {decl}"
                )
            for axis, (d, g) in enumerate(zip(decl, dims)):
                if isinstance(d, int) and d != g:
                    raise DataError(
                        f"input_shapes['{name}'] gives {g} at axis {axis}; the model declares {d}"
                    )
        given[name] = dims

    # Values for symbolic dims, learned from the given shapes.
    symbols: dict[str, int] = {}
    for name, dims in given.items():
        for d, g in zip(declared[name].shape, dims):
            if isinstance(d, str):
                symbols.setdefault(d, g)

    result: dict[str, tuple[int, ...]] = {}
    for info in inputs:
        if info.name in given:
            result[info.name] = given[info.name]
            continue
        if _dims_of(protos[info.name], None) is None:
            return None  # unknown rank: nothing to feed
        if info.is_static:
            result[info.name] = tuple(int(d) for d in info.shape)  # type: ignore[arg-type]
        elif input_shapes is None:
            return None
        else:  # the caller asked for concrete shapes: other dims default to 1
            result[info.name] = tuple(
                d if isinstance(d, int) else symbols.get(d, 1) if isinstance(d, str) else 1
                for d in info.shape
            )
    return result


def _set_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    for vi in model.graph.input:
        if vi.name in shapes and vi.type.HasField("tensor_type"):
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in shapes[vi.name]:
                shape.dim.add().dim_value = int(d)


def _pending(model: onnx.ModelProto, infos: Mapping[str, TensorInfo]) -> list[tuple[str, int]]:
    """Main-graph tensors (name, elem type) of a runtime type whose shape is not concrete."""
    elem_types = _elem_types(model)
    pending = []
    for node in model.graph.node:
        for out in node.output:
            if not out or out not in elem_types or elem_types[out] not in _RUNTIME_TYPES:
                continue
            info = infos.get(out)
            if info is None or not info.is_static:
                pending.append((out, elem_types[out]))
    return pending


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {}
    for vi in (*model.graph.value_info, *model.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _feed(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    inits = _initializer_names(model.graph)
    feeds: dict[str, Any] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        elem = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
        shape = shapes[vi.name]
        if elem == onnx.TensorProto.STRING:
            feeds[vi.name] = np.full(shape, "", dtype=object)
            continue
        if elem not in _RUNTIME_TYPES:
            log.info("input '%s' has type %s; cannot feed it to ONNX Runtime", vi.name, elem)
            return None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        # Ones keep float math finite (log, division); zeros are valid indices for ints.
        fill = 1 if np.issubdtype(dtype, np.floating) else 0
        feeds[vi.name] = np.full(shape, fill, dtype=dtype)
    return feeds


def _runtime_shapes(
    model: onnx.ModelProto,
    exposed: Iterable[tuple[str, int]],
    shapes: Mapping[str, tuple[int, ...]],
    level: int = logging.WARNING,
) -> dict[str, TensorInfo]:
    """Shapes from one ONNX Runtime run of `model` (a private copy, modified here) with
    the `exposed` tensors added as outputs; {} when the runtime cannot run it."""
    feeds = _feed(model, shapes)
    if feeds is None:
        return {}
    graph = model.graph
    for o in graph.output:  # declared output shapes may conflict with the given input shapes
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    del graph.value_info[:]
    inputs = {i.name for i in graph.input} | _initializer_names(graph)
    from onnxslim_edge.sandbox import BudgetExceeded, RunFailed, output_shapes

    # The model runs on this module's initiative: in a child, under a time/memory budget.
    names = [name for name, _ in exposed if name not in inputs]
    exposed_model = expose_outputs(model, names, dict(exposed))
    outputs = [o.name for o in exposed_model.graph.output]
    try:
        found = output_shapes(exposed_model, outputs, feeds)
    except BudgetExceeded as exc:  # the user must know what is missing: always a warning
        log.warning(
            "shapes of %d tensors not computed: running the model %s (their MACs are not counted)",
            len(outputs),
            exc,
        )
        return {}
    except RunFailed as exc:  # an unsupported op, a data-dependent failure ...
        log.log(level, "ONNX Runtime could not compute concrete shapes (%s); keeping ONNX's", exc)
        return {}
    return {
        name: TensorInfo(name, dtype, shape, measured=True)
        for name, (dtype, shape) in found.items()
    }


def infer_model_shapes(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    full: Callable[[], onnx.ModelProto] | None = None,
) -> dict[str, TensorInfo]:
    """The engine behind `onnxslim_edge.graph.infer_shapes` (call that one: it caches).

    Every tensor's dtype and shape: inputs, outputs, initializers and intermediates.

    `input_shapes` gives concrete shapes for graph inputs (e.g. {"x": (4, 3, 224, 224)});
    symbolic dims it does not cover (all, when it is `{}`) take the value another input
    gave the same dim name, else 1. Tensors whose rank stays unknown are left out.
    Raises DataError for `input_shapes` that do not fit the model. Never changes `model`.

    ONNX's inference runs on a `skeleton` (no copy of the weights); only the ONNX Runtime
    run needs them, from `full()` when `model` is a skeleton itself (default: `model`).
    """
    known_params = _dim_params(model)
    concrete = _concrete_inputs(model, input_shapes)  # validates input_shapes first
    work = model
    if input_shapes is not None:
        work = skeleton(model)
        if concrete is not None:
            _set_input_shapes(work, concrete)
        # Stale intermediate shapes (e.g. symbolic dims from an exporter) would merge in.
        for graph in iter_graphs(work.graph):
            del graph.value_info[:]
    inferred = _onnx_inferred(work)
    infos = _collect(inferred, known_params)

    pending = _pending(inferred, infos)
    if not pending:
        return infos
    if concrete is None:
        log.debug("%d tensors have no concrete shape; input shapes are not concrete", len(pending))
        return infos
    work = onnx.ModelProto()  # the one copy with weights, for the run
    work.CopyFrom(model if full is None else full())
    _set_input_shapes(work, concrete)
    if input_shapes is not None:
        for graph in iter_graphs(work.graph):
            del graph.value_info[:]
    # Expose every runtime-typed intermediate: one run answers for all of them.
    elem_types = _elem_types(inferred)
    exposed = [
        (out, elem_types[out])
        for node in work.graph.node
        for out in node.output
        if out and elem_types.get(out) in _RUNTIME_TYPES
    ]
    log.debug("running ONNX Runtime for %d tensors without a concrete shape", len(pending))
    # Warn when the caller asked for concrete shapes; otherwise this is best effort.
    level = logging.WARNING if input_shapes is not None else logging.INFO
    for name, info in _runtime_shapes(work, exposed, concrete, level).items():
        if name not in infos or not infos[name].is_static:  # what ONNX left open
            infos[name] = info
    return infos
