"""The graph toolkit passes are written with: import/export, constants, names, shapes, sessions.

Public for third-party passes as for the built-in ones (docs/writing-a-pass.md):
`graph_from_model` / `model_from_graph` (the onnx-graphsurgeon round trip the pipeline
does around every pass), `export_graph` (a plain export for analysis), `const_value`
(the value of an initializer or `Constant` output, through Identity chains),
`unique_name`, `replace_uses`, `sole_consumer`, `set_constant_input`, `infer_shapes`
(the one shape-inference entry point: every tensor's `TensorInfo`, cached per model
state), `expose_outputs` / `exposing_session` (an ONNX Runtime session that also
returns chosen intermediate tensors), `clamp_ir` (the IR version ONNX Runtime and the
checker accept, from `model.lower_ir_version`) and `fingerprint` (a digest of what a
model computes, which decides a pass's `modified`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxslim_edge.errors import UnsupportedError, first_line
from onnxslim_edge.model import lower_ir_version, min_ir_version

if TYPE_CHECKING:
    from onnxslim_edge.analysis.shapes import TensorInfo

__all__ = [
    "FLOAT_DTYPES",
    "clamp_ir",
    "clear_shapes_cache",
    "const_value",
    "export_graph",
    "expose_outputs",
    "exposing_session",
    "fingerprint",
    "graph_from_model",
    "infer_shapes",
    "is_graph_input",
    "is_graph_output",
    "model_from_graph",
    "np_dtype",
    "output_ids",
    "replace_uses",
    "set_constant_input",
    "sole_consumer",
    "unique_name",
]

log = logging.getLogger(__name__)

#: Floating-point dtypes whose arithmetic the lossless passes rewrite.
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------- import / export


def graph_from_model(model: onnx.ModelProto) -> Any:
    """Import a model into an onnx_graphsurgeon Graph (UnsupportedError if gs cannot)."""
    import onnx_graphsurgeon as gs

    try:
        return gs.import_onnx(model)
    except Exception as exc:  # gs raises bare errors on types it cannot represent
        raise UnsupportedError(
            f"onnx-graphsurgeon cannot import the model: {first_line(exc)}"
        ) from exc


def model_from_graph(graph: Any, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export a gs.Graph after `cleanup().toposort()`, keeping `like`'s model-level
    metadata, with the lowest IR version it needs (never above `like`'s unless needed)."""
    try:
        model = _export(graph.cleanup().toposort())
    except Exception as exc:  # e.g. optional/sequence types: UnboundLocalError inside gs
        raise UnsupportedError(
            f"onnx-graphsurgeon cannot export the graph: {first_line(exc)}"
        ) from exc
    for key in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, key, getattr(like, key))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    # gs writes the newest IR and drops initializers from IR-3 graph inputs: keep the
    # input's IR unless the exported graph needs a higher one.
    model.ir_version = max(like.ir_version or 3, min_ir_version(model))
    return clamp_ir(model) if model.ir_version > 10 else model


def export_graph(graph: Any) -> onnx.ModelProto:
    """The graph as a ModelProto for analysis or a session: no clean-up, IR clamped
    (`clamp_ir`). The graph is not changed (onnx-graphsurgeon's export only reads it);
    initializers loaded lazily may share their TensorProto with the imported model, so
    do not edit the result's initializers in place."""
    return clamp_ir(_export(graph))


def _export(graph: Any) -> onnx.ModelProto:
    """`gs.export_onnx`, also for constants over protobuf's 2 GB message limit: onnx's
    `make_graph` copies each initializer into the graph by serializing it, which fails
    for those. They are exported as data-less stand-ins, then given their bytes in
    place in the exported model (protobuf holds a field over 2 GB in memory; it only
    cannot serialize it)."""
    import onnx_graphsurgeon as gs

    from onnxslim_edge.model import PROTOBUF_LIMIT

    with _stood_in(graph, PROTOBUF_LIMIT, digest=False) as swapped:
        model = gs.export_onnx(graph, do_type_check=False)
    for init in model.graph.initializer if swapped else ():
        if init.name not in swapped:
            continue
        values = swapped[init.name]
        del init.external_data[:]
        init.ClearField("data_location")
        if isinstance(values, gs.ir.tensor.LazyValues):
            source = values.tensor
            if source.HasField("raw_data"):
                init.raw_data = source.raw_data  # one copy of the bytes, as for any export
            else:  # typed fields (float_data, ...): as raw bytes
                init.raw_data = np.ascontiguousarray(values.load()).tobytes()
        else:
            init.raw_data = np.ascontiguousarray(values).tobytes()
    return model


def export_skeleton(graph: Any) -> onnx.ModelProto:
    """`export_graph` with every constant of `SKELETON_THRESHOLD` bytes or more of the
    main graph as a data-less stand-in (see `onnxslim_edge.model.skeleton`): for shape
    inference and the checker, in the memory of the graph's structure, not of its
    weights. The graph is not changed. Never run or save the result."""
    from onnxslim_edge.model import SKELETON_THRESHOLD

    with _stood_in(graph, SKELETON_THRESHOLD, digest=True):
        return export_graph(graph)


@contextlib.contextmanager
def _stood_in(graph: Any, min_bytes: int, *, digest: bool) -> Iterator[dict[str, Any]]:
    """While inside, each constant of the main graph of `min_bytes` or more holds a
    data-less stand-in (`model.stand_ins`; with `digest`, one that records a digest of
    its values for `fingerprint`); yields {name: the values it held}, put back after.
    Constants stored as another ONNX type (bfloat16, float8 through `export_dtype`) and
    stand-ins already in place are left as they are."""
    import onnx_graphsurgeon as gs
    from onnx import numpy_helper

    from onnxslim_edge.model import stand_ins

    stub = stand_ins()
    swapped: dict[str, tuple[Any, Any]] = {}
    try:
        for tensor in graph.tensors().values():
            if not isinstance(tensor, gs.Constant):
                continue
            values = tensor._values
            lazy = isinstance(values, gs.ir.tensor.LazyValues)
            if lazy and values.tensor.data_location == onnx.TensorProto.EXTERNAL:
                continue  # a stand-in already (or data not loaded): nothing to hold
            nbytes = values.nbytes if lazy else getattr(values, "nbytes", 0)
            dtype = getattr(values, "dtype", None)
            if nbytes < min_bytes or dtype is None:
                continue
            if lazy:
                data_type = values.tensor.data_type
            else:
                export = getattr(tensor, "export_dtype", None)
                try:
                    data_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
                    if export is not None and np.dtype(export) != np.dtype(dtype):
                        continue
                except (KeyError, TypeError, ValueError):
                    continue
            proto = stub.make(tensor.name, data_type, list(values.shape), int(nbytes))
            if digest:
                array = numpy_helper.to_array(values.tensor) if lazy else values  # one copy
                entry = proto.external_data.add()
                entry.key, entry.value = _DIGEST_KEY, _values_digest(array).hex()
                del array
            swapped[tensor.name] = (tensor, values)
            tensor._values = gs.ir.tensor.LazyValues(proto)
        yield {name: values for name, (_, values) in swapped.items()}
    finally:
        for tensor, values in swapped.values():
            tensor._values = values


#: The external-data entry in which `export_skeleton` records a stand-in's value digest.
_DIGEST_KEY = "onnxslim_edge_digest"


def _values_digest(values: np.ndarray) -> bytes:
    """The digest `fingerprint` hashes for a tensor's values (C order, its dtype)."""
    array = np.ascontiguousarray(values)
    if array.dtype.kind == "O":  # strings: their text, not the object pointers
        data: Any = repr(array.tolist()).encode()
    else:
        data = array.reshape(-1).view(np.uint8)
    return hashlib.blake2b(data, digest_size=16).digest()


def clamp_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower `model.ir_version` in place to the lowest its opsets and types need (ONNX
    Runtime 1.19 refuses IR > 10, which onnx-graphsurgeon writes); return the model."""
    return lower_ir_version(model)


# --------------------------------------------------------------------------- constants, uses


def const_value(tensor: Any) -> np.ndarray | None:
    """The value of `tensor` when it is a constant (initializer or `Constant` node output).

    Identity nodes are looked through. `Constant` nodes holding `value`, `value_float(s)`
    or `value_int(s)` are read; None for anything computed at run time, for graph
    inputs, and for `Constant` nodes with a sparse, string or attribute-reference value.
    """
    import onnx_graphsurgeon as gs

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
        attrs = tensor.inputs[0].attrs
        value = attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        for key, dtype in (
            ("value_float", np.float32),
            ("value_floats", np.float32),
            ("value_int", np.int64),
            ("value_ints", np.int64),
        ):
            if key in attrs and isinstance(attrs[key], (int, float, list, tuple)):
                return np.array(attrs[key], dtype=dtype)
    return None


def output_ids(graph: Any) -> set[int]:
    """ids of the graph's outputs and of every subgraph's outputs (If/Loop/Scan bodies).

    A subgraph may return a tensor of the enclosing graph; such a tensor must keep its
    producer and name just like a graph output.
    """
    ids = {id(t) for t in graph.outputs}
    for sub in graph.subgraphs(recursive=True):
        ids.update(id(t) for t in sub.outputs)
    return ids


def is_graph_output(graph: Any, tensor: Any, outputs: set[int] | None = None) -> bool:
    """Whether `tensor` is an output of the graph or, with `outputs`, one of those ids."""
    if outputs is not None:
        return id(tensor) in outputs
    return any(t is tensor for t in graph.outputs)


def is_graph_input(graph: Any, tensor: Any) -> bool:
    return any(t is tensor for t in graph.inputs)


def sole_consumer(graph: Any, tensor: Any, outputs: set[int] | None = None) -> Any | None:
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


def unique_name(graph: Any, base: str, taken: set[str] | None = None) -> str:
    """`base`, or `base_1`, `base_2` ... whichever no tensor of the graph (or `taken`,
    which is updated) uses yet."""
    names = taken if taken is not None else _tensor_names(graph)
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


def _tensor_names(graph: Any) -> set[str]:
    names = set(graph.tensors())
    for sub in graph.subgraphs(recursive=True):
        names.update(sub.tensors())
    return names


def set_constant_input(graph: Any, node: Any, index: int, values: np.ndarray, base: str) -> None:
    """Make input `index` of `node` the constant `values`.

    The existing initializer is updated in place when `node` is its only reader;
    otherwise (shared weights, a `Constant` node output, a missing optional input) a new
    initializer named after `base` is created, so no other node sees the change.
    """
    import onnx_graphsurgeon as gs

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


def np_dtype(dtype: Any) -> np.dtype | None:
    """A numpy dtype from a numpy dtype, its name or an ONNX element type; None if unknown."""
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        except (KeyError, TypeError, ValueError):
            return None


# --------------------------------------------------------------------------- fingerprint


def fingerprint(model: onnx.ModelProto) -> str:
    """A digest of what the model computes: nodes, interface and every tensor's values.

    Insensitive to what a graphsurgeon round trip changes without changing the model:
    node order, attribute order, value_info, how tensor data is stored, initializers
    listed as graph inputs (IR < 4), and the empty name gs writes into a `Constant`
    node's tensor. So `modified` means a pass really rewrote something.
    """
    from onnx import numpy_helper

    h = hashlib.blake2b(digest_size=16)
    init_names = {t.name for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        canon = onnx.NodeProto()
        canon.CopyFrom(node)
        _canonical(canon)
        nodes.append(canon.SerializeToString(deterministic=True))
    for blob in sorted(nodes):
        h.update(blob)
    for value in model.graph.input:
        if value.name not in init_names:
            h.update(b"in:" + value.name.encode())
    for value in model.graph.output:
        h.update(b"out:" + value.name.encode())
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        h.update(b"init:" + t.name.encode() + str((t.data_type, list(t.dims))).encode())
        info = {e.key: e.value for e in t.external_data}
        if t.data_location == onnx.TensorProto.EXTERNAL and _DIGEST_KEY in info:
            h.update(bytes.fromhex(info[_DIGEST_KEY]))  # an `export_skeleton` stand-in
        elif t.data_location == onnx.TensorProto.EXTERNAL:
            h.update(str(sorted(info.items())).encode())
        else:
            h.update(_values_digest(numpy_helper.to_array(t)))
    return h.hexdigest()


def _canonical(node: onnx.NodeProto) -> None:
    """Sort `node`'s attributes, drop its doc string and empty attribute-tensor names,
    in place, subgraph nodes included."""
    attrs = sorted(node.attribute, key=lambda a: a.name)
    del node.attribute[:]
    node.attribute.extend(attrs)
    node.ClearField("doc_string")
    for attr in node.attribute:
        for tensor in (attr.t, *attr.tensors) if attr.HasField("t") or attr.tensors else ():
            if not tensor.name:
                tensor.ClearField("name")
        for graph in (attr.g, *attr.graphs) if attr.HasField("g") or attr.graphs else ():
            for inner in graph.node:
                _canonical(inner)


def _shape_key(model: onnx.ModelProto, digest: str, input_shapes: Any) -> tuple[Any, ...]:
    """What shape inference depends on beyond `fingerprint`: declared interface types,
    opsets, functions, and the requested input shapes."""
    h = hashlib.blake2b(digest_size=16)
    for value in (*model.graph.input, *model.graph.output):
        h.update(value.SerializeToString(deterministic=True))
    for op in model.opset_import:
        h.update(f"{op.domain}:{op.version};".encode())
    for fn in model.functions:
        h.update(fn.SerializeToString(deterministic=True))
    shapes = None
    if input_shapes is not None:
        shapes = tuple(sorted((str(k), repr(v)) for k, v in input_shapes.items()))
    return (digest, h.hexdigest(), shapes)


# --------------------------------------------------------------------------- shapes

_fingerprint = fingerprint  # `infer_shapes` has a parameter of that name

#: Shape-inference results by model state (see `infer_shapes`), most recent last.
_SHAPES: OrderedDict[tuple[Any, ...], dict[str, TensorInfo]] = OrderedDict()
_SHAPES_KEPT = 8


def infer_shapes(
    source: Any,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    fingerprint: str | None = None,
) -> dict[str, TensorInfo]:
    """Every tensor's `TensorInfo` (name, dtype name, shape) of a ModelProto or gs.Graph.

    ONNX shape inference (with data propagation) first; when every input shape is
    concrete, tensors it leaves without a concrete shape are measured in one ONNX Runtime
    run on placeholder inputs (`TensorInfo.measured` is then True: a shape that depends
    on data, e.g. NonZero's, is only what those inputs gave). `input_shapes` fixes
    symbolic input dims (symbols it does not cover take another input's value, else 1);
    DataError when they do not fit. Tensors of unknown rank are left out. Never changes
    `source`.

    Results are cached by model state (`fingerprint` plus the declared interface and
    opsets): asking again for an unchanged model, or for a graph imported from it, does
    not infer again. `fingerprint`: the ModelProto's `fingerprint()`, when the caller has
    it (saves hashing the model again). A `TensorInfo` also unpacks as
    `(shape, numpy dtype or None)`. A graph onnx-graphsurgeon cannot export answers
    with the shapes it records itself.
    """
    from onnxslim_edge.analysis import shapes as _shapes

    full = None
    if isinstance(source, onnx.ModelProto):
        model = source
    else:
        try:  # structure and small tensors only: no copy of the weights
            model, fingerprint = export_skeleton(source), None
        except Exception as exc:  # gs cannot export e.g. optional/sequence types
            log.debug("graph export for shape inference failed: %s", first_line(exc))
            return _declared(source)
        full = lambda: export_graph(source)  # noqa: E731 (for a run, when one is needed)
    digest = fingerprint if fingerprint is not None else _fingerprint(model)
    key = _shape_key(model, digest, input_shapes)
    hit = _SHAPES.get(key)
    if hit is not None:
        _SHAPES.move_to_end(key)
        return dict(hit)
    infos = _shapes.infer_model_shapes(model, input_shapes, full=full)
    _SHAPES[key] = dict(infos)
    while len(_SHAPES) > _SHAPES_KEPT:
        _SHAPES.popitem(last=False)
    return infos


def _declared(graph: Any) -> dict[str, TensorInfo]:
    """What the graph itself records about its tensors (shape and dtype), by name."""
    from onnxslim_edge.analysis.shapes import TensorInfo

    infos = {}
    for name, tensor in graph.tensors().items():
        if tensor.shape is None:
            continue
        dtype = np_dtype(tensor.dtype)
        shape = tuple(d if isinstance(d, int) else (d or None) for d in tensor.shape)
        infos[name] = TensorInfo(name, dtype.name if dtype is not None else "undefined", shape)
    return infos


def clear_shapes_cache() -> None:
    """Forget every cached `infer_shapes` result (tests counting inference use it)."""
    _SHAPES.clear()


# --------------------------------------------------------------------------- sessions


def expose_outputs(
    model: onnx.ModelProto, names: Iterable[str], types: Mapping[str, int] | None = None
) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names`, typed from `types` (ONNX
    element types by name) where given, else left to ONNX Runtime; the caller's model is
    not changed."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name in present:
            continue
        if types and name in types:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
        else:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
        present.add(name)
    return copy


def exposing_session(
    model: onnx.ModelProto,
    names: Iterable[str],
    *,
    types: Mapping[str, int] | None = None,
    **session_options: Any,
) -> Any:
    """An ONNX Runtime session of `model` whose outputs also include the tensors `names`
    (see `expose_outputs`); `session_options` go to `runtime.make_session` (threads,
    optimization ...).

    The default optimization is "extended" for a model with QuantizeLinear or
    DequantizeLinear nodes and "all" otherwise. ONNX Runtime's level-"all" rewrites of
    Q/DQ graphs lose exposed tensors: 1.32 refuses the session ("Failed to find node
    output ... producing output"), 1.19.2 returns None for the tensor (both seen on the
    digits CNN's residual Conv after fold-batchnorm and quantize, which bias-correct
    exposes). Float graphs keep "all" (it runs wide exposures, as in calibration, up to
    1.6x faster) and are retried at "extended" if ONNX Runtime refuses them that way.
    """
    from onnxslim_edge.runtime import make_session

    exposed = expose_outputs(model, names, types)
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    optimization = session_options.pop("optimization", "extended" if qdq else "all")
    try:
        return make_session(exposed, optimization=optimization, **session_options)
    except UnsupportedError as exc:
        if optimization != "all" or _FUSED_AWAY not in str(exc):
            raise
        log.debug("exposing_session: %s; retrying at optimization 'extended'", exc)
        return make_session(exposed, optimization="extended", **session_options)


#: ONNX Runtime's refusal when its optimizer removed a tensor that is a graph output.
_FUSED_AWAY = "Failed to find node output or a constant initializer producing output"
