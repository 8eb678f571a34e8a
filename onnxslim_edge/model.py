"""Model I/O: load from path, bytes or ModelProto; save atomically; target IR and opset.

Loading checks what an untrusted file can get wrong: missing or corrupt files, an empty
protobuf, external-data locations that escape the model's folder, a failing ONNX
checker. Saving stages every output of a run (model, external data, report) in temporary files
beside their targets and renames them all at the end (`Outputs`), so outputs appear
whole and together or not at all; `check_paths` refuses a run whose outputs would
overwrite one of its inputs (model, external data, data files) before any work; saving
never overwrites the input unless asked; it lowers
`ir_version` to the lowest the model's opsets and data types need (ONNX Runtime 1.19
and TensorRT 8.x refuse the IR versions that recent `onnx` writes); models over 2 GB
go to external data (`<name>.data` beside the model).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxslim_edge.errors import ConfigError, InvalidModelError, UnsupportedError, first_line

__all__ = [
    "PROTOBUF_LIMIT",
    "ModelSource",
    "Outputs",
    "check_model",
    "check_output_path",
    "check_paths",
    "convert_opset",
    "iter_graphs",
    "iter_tensors",
    "load_model",
    "load_model_and_files",
    "lower_ir_version",
    "min_ir_version",
    "model_bytes",
    "model_on_disk",
    "new_file_mode",
    "save_model",
    "skeleton",
    "stand_ins",
    "tensor_bytes",
    "write_text_atomic",
]

log = logging.getLogger(__name__)

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]  # noqa: UP007 (a runtime alias on 3.10)

#: Protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph.
PROTOBUF_LIMIT = 2**31 - 64 * 2**20

# IR versions that introduced data types: a lowered IR must still admit them.
_DTYPE_MIN_IR = {
    onnx.TensorProto.BFLOAT16: 4,
    onnx.TensorProto.FLOAT8E4M3FN: 9,
    onnx.TensorProto.FLOAT8E4M3FNUZ: 9,
    onnx.TensorProto.FLOAT8E5M2: 9,
    onnx.TensorProto.FLOAT8E5M2FNUZ: 9,
    onnx.TensorProto.UINT4: 10,
    onnx.TensorProto.INT4: 10,
}
for _name, _ir in (("FLOAT4E2M1", 11), ("FLOAT8E8M0", 12), ("UINT2", 12), ("INT2", 12)):
    if hasattr(onnx.TensorProto, _name):
        _DTYPE_MIN_IR[getattr(onnx.TensorProto, _name)] = _ir


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers and Constant/attribute tensors."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes a tensor's data takes, wherever it is stored (raw, typed fields or external)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        if "length" in info:
            return int(info["length"])
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    count = 1
    for d in tensor.dims:
        count *= d
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 1
    return count * itemsize


def model_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data in the model (what its weights take on disk, uncompressed)."""
    return sum(tensor_bytes(t) for t in iter_tensors(model))


def min_ir_version(model: onnx.ModelProto) -> int:
    """The lowest IR version that the model's opset imports and data types need."""
    known = onnx.helper.OP_SET_ID_VERSION_MAP
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and ("ai.onnx", o.version) not in known:
            return max(model.ir_version, 3)  # newer than this onnx knows: keep what it says
    ir = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    for tensor in iter_tensors(model):
        ir = max(ir, _DTYPE_MIN_IR.get(tensor.data_type, 0))
    if model.functions:
        ir = max(ir, 8)
    graph_inputs = {i.name for i in model.graph.input}
    if any(init.name not in graph_inputs for init in model.graph.initializer):
        ir = max(ir, 4)  # before IR 4 every initializer had to be a graph input
    return max(ir, 3)


def _check_external_locations(model: onnx.ModelProto, base_dir: Path, origin: str) -> list[Path]:
    """Check every external-data location; return the (resolved) files they name."""
    base = base_dir.resolve()
    files: dict[Path, None] = {}
    for tensor in iter_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        if not location:
            raise InvalidModelError(
                f"{origin}: tensor '{tensor.name}' has external data without a location"
            )
        if "\x00" in location:
            raise InvalidModelError(
                f"{origin}: external data location {location!r} of tensor '{tensor.name}' "
                "contains a NUL byte"
            )
        if os.path.isabs(location) or Path(location).drive:
            raise InvalidModelError(
                f"{origin}: external data location '{location}' of tensor '{tensor.name}' "
                "is an absolute path; refusing to read outside the model's folder"
            )
        target = (base / location).resolve()
        if target != base and base not in target.parents:
            raise InvalidModelError(
                f"{origin}: external data location '{location}' of tensor '{tensor.name}' "
                "escapes the model's folder; refusing to read it"
            )
        if not target.is_file():
            raise InvalidModelError(
                f"{origin}: external data file '{location}' of tensor '{tensor.name}' is missing"
            )
        files[target] = None
    return list(files)


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_tensors(model))


def load_model(
    source: ModelSource,
    *,
    base_dir: str | os.PathLike | None = None,
    check: bool = True,
) -> onnx.ModelProto:
    """Load a model from a path, serialized bytes or a ModelProto (returned as is).

    External data is loaded from `base_dir` (default: the model file's folder) after
    checking that every location stays inside it. Raises InvalidModelError naming the
    file and the cause for anything malformed.
    """
    return load_model_and_files(source, base_dir=base_dir, check=check)[0]


def load_model_and_files(
    source: ModelSource,
    *,
    base_dir: str | os.PathLike | None = None,
    check: bool = True,
) -> tuple[onnx.ModelProto, list[Path]]:
    """`load_model`, plus the files it read: the model file and its external-data files."""
    files: list[Path] = []
    if isinstance(source, onnx.ModelProto):
        model, origin = source, "<ModelProto>"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        origin = "<bytes>"
        model = _parse(bytes(source), origin)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        origin = str(path)
        if not path.exists():
            raise InvalidModelError(f"{origin}: model file not found")
        if path.is_dir():
            raise InvalidModelError(f"{origin}: is a folder, not an ONNX model file")
        model = _parse_file(path, origin)
        files.append(path)
        if base_dir is None:
            base_dir = path.parent
    else:
        raise TypeError(f"cannot load a model from {type(source).__name__}")

    if _has_external_data(model):
        if base_dir is None:
            raise InvalidModelError(f"{origin}: the model has external data; give base_dir")
        files.extend(_check_external_locations(model, Path(base_dir), origin))
        try:
            external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            # ValidationError: onnx refuses e.g. a data file with several hard links
            raise InvalidModelError(
                f"{origin}: cannot read external data ({first_line(exc)})"
            ) from exc
    if check:
        check_model(model, origin)
    return model, files


def _parse(data: bytes, origin: str) -> onnx.ModelProto:
    if not data:
        raise InvalidModelError(f"{origin}: file is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModelError(
            f"{origin}: not an ONNX model (protobuf decode failed: {exc})"
        ) from exc
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise InvalidModelError(f"{origin}: not an ONNX model (no IR version or graph)")
    return model


#: Files of at least this many bytes are parsed field by field from a memory map
#: (`_parse_stream`), so the file's bytes and the parsed model are never both in memory.
STREAM_PARSE_BYTES = 16 * 2**20
#: `_parse_stream` merges consecutive small fields in runs of up to this many bytes.
_STREAM_CHUNK = 2**20
_MODEL_GRAPH_FIELD = 7  # ModelProto.graph


def _parse_file(path: Path, origin: str) -> onnx.ModelProto:
    """Parse the model file at `path`: small files in one go, large ones streamed."""
    try:
        size = path.stat().st_size
        if size < STREAM_PARSE_BYTES:
            return _parse(path.read_bytes(), origin)
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            model = _parse_stream(mm, origin)
    except OSError as exc:
        raise InvalidModelError(f"{origin}: cannot read the model file ({exc})") from exc
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise InvalidModelError(f"{origin}: not an ONNX model (no IR version or graph)")
    return model


def _read_varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    """Decode the protobuf varint at `buf[pos]`; return (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _wire_fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, field start, payload start, field end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        tag, payload = _read_varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, stop = _read_varint(buf, payload, end)
        elif wire == 1:
            stop = payload + 8
        elif wire == 2:
            length, payload = _read_varint(buf, payload, end)
            stop = payload + length
        elif wire == 5:
            stop = payload + 4
        else:
            raise DecodeError(f"unexpected wire type {wire} for field {number}")
        if number == 0 or stop > end:
            raise DecodeError("truncated message" if stop > end else "field number 0")
        yield number, pos, payload, stop
        pos = stop


def _parse_stream(mm: mmap.mmap, origin: str) -> onnx.ModelProto:
    """Parse a serialized ModelProto from `mm` one field (or run of small fields) at a
    time, the graph's fields (initializers, nodes) each on their own, so at most one
    large tensor's bytes are held besides the model being built; pages already parsed
    are dropped from the mapping as it goes."""
    model = onnx.ModelProto()
    page = mmap.PAGESIZE

    def merge(target: Any, a: int, b: int) -> None:
        if a == b:
            return
        with memoryview(mm)[a:b] as part:
            target.MergeFromString(part)
        if b - a >= _STREAM_CHUNK and hasattr(mm, "madvise"):
            lo = a - a % page
            mm.madvise(mmap.MADV_DONTNEED, lo, b - lo)

    def merge_runs(target: Any, fields: Iterator[tuple[int, int, int, int]]) -> None:
        run_start = run_end = -1
        for _, field_start, _, field_end in fields:
            # a run is contiguous bytes: a skipped field (the graph) ends it
            if run_start >= 0 and (field_start != run_end or field_end - run_start > _STREAM_CHUNK):
                merge(target, run_start, run_end)
                run_start = -1
            if run_start < 0:
                run_start = field_start
            run_end = field_end
        if run_start >= 0:
            merge(target, run_start, run_end)

    def top_level() -> Iterator[tuple[int, int, int, int]]:
        for field in _wire_fields(mm, 0, len(mm)):
            if field[0] == _MODEL_GRAPH_FIELD:
                continue
            yield field

    try:
        merge_runs(model, top_level())
        for number, _, payload, stop in _wire_fields(mm, 0, len(mm)):
            if number == _MODEL_GRAPH_FIELD:
                # a graph given in several pieces merges, as protobuf's own parser does
                model.graph.SetInParent()
                merge_runs(model.graph, _wire_fields(mm, payload, stop))
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModelError(
            f"{origin}: not an ONNX model (protobuf decode failed: {exc})"
        ) from exc
    return model


#: `skeleton` keeps tensors below this many bytes (shape tensors, scalars) with their data.
SKELETON_THRESHOLD = 1024
#: The external-data location a skeleton's stand-ins name (`check_model` makes it a sparse file).
SKELETON_DATA = "skeleton.data"


class _Stubs:
    """Makes data-less external stand-ins for large tensors, at consecutive offsets."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.end = 0  # bytes the stand-ins span in SKELETON_DATA

    def __call__(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        # (by dims: protobuf cannot size a tensor over 2 GB, it serializes to count)
        if not external and _declared_bytes(tensor) < self.threshold:
            return tensor
        stub = self.make(tensor.name, tensor.data_type, tensor.dims, _declared_bytes(tensor))
        stub.doc_string = tensor.doc_string
        return stub

    def make(
        self,
        name: str,
        data_type: int,
        dims: Sequence[int],
        length: int,
        location: str = SKELETON_DATA,
    ) -> onnx.TensorProto:
        """A stand-in for a tensor of `length` bytes, next in `location`."""
        stub = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", self.end), ("length", length)):
            entry = stub.external_data.add()
            entry.key, entry.value = key, str(value)
        self.end += length
        return stub


def stand_ins(threshold: int | None = None) -> _Stubs:
    """A maker of skeleton stand-ins (`skeleton`'s, for other representations:
    `stand_ins().make(name, data_type, dims, nbytes)`)."""
    return _Stubs(SKELETON_THRESHOLD if threshold is None else threshold)


def _declared_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes `tensor` holds by its dims and type, without touching its data (no copy)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return tensor_bytes(tensor)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return tensor.ByteSize()
    count = 1
    for d in tensor.dims:
        count *= max(int(d), 0)
    return count * itemsize


def _copy_fields(src: Any, dst: Any, skip: str) -> None:
    """Copy every set field of message `src` but `skip` into `dst` (presence kept)."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # repeated
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _skeleton_node(node: onnx.NodeProto, stub: _Stubs) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    _copy_fields(node, copy, skip="attribute")
    for attr in node.attribute:
        kind = attr.type
        if kind not in (
            onnx.AttributeProto.TENSOR,
            onnx.AttributeProto.TENSORS,
            onnx.AttributeProto.GRAPH,
            onnx.AttributeProto.GRAPHS,
        ):
            copy.attribute.append(attr)
            continue
        new = copy.attribute.add()
        _copy_fields(
            attr,
            new,
            skip={
                onnx.AttributeProto.TENSOR: "t",
                onnx.AttributeProto.TENSORS: "tensors",
                onnx.AttributeProto.GRAPH: "g",
                onnx.AttributeProto.GRAPHS: "graphs",
            }[kind],
        )
        if kind == onnx.AttributeProto.TENSOR:
            new.t.CopyFrom(stub(attr.t))
        elif kind == onnx.AttributeProto.TENSORS:
            new.tensors.extend(stub(t) for t in attr.tensors)
        elif kind == onnx.AttributeProto.GRAPH:
            new.g.CopyFrom(_skeleton_graph(attr.g, stub))
        else:
            new.graphs.extend(_skeleton_graph(g, stub) for g in attr.graphs)
    return copy


def _skeleton_graph(graph: onnx.GraphProto, stub: _Stubs) -> onnx.GraphProto:
    copy = onnx.GraphProto()
    for field, value in graph.ListFields():
        if field.name == "initializer":
            copy.initializer.extend(stub(t) for t in value)
        elif field.name == "node":
            copy.node.extend(_skeleton_node(n, stub) for n in value)
        elif hasattr(value, "extend"):
            getattr(copy, field.name).extend(value)
        else:
            setattr(copy, field.name, value)
    return copy


def skeleton(model: onnx.ModelProto, threshold: int | None = None) -> onnx.ModelProto:
    """A copy of `model` without the data of tensors over `threshold` bytes
    (default SKELETON_THRESHOLD).

    Each such tensor (initializer or Constant/attribute tensor, subgraphs included)
    becomes an external-data stand-in in `SKELETON_DATA` with its name, type, dims and
    byte length: what the ONNX checker and shape inference read (the small shape tensors
    keep their data). Memory is the graph's structure, not its weights: analyses need
    not serialize the whole model (twice its size) for onnx's C++ code. Never run or
    save a skeleton as a model.
    """
    return _skeleton_with(model, _Stubs(SKELETON_THRESHOLD if threshold is None else threshold))


def _skeleton_with(
    model: onnx.ModelProto, stub: Callable[[onnx.TensorProto], Any]
) -> onnx.ModelProto:
    """A copy of `model` with each tensor (subgraphs included) replaced by `stub(tensor)`."""
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip="graph")
    copy.graph.CopyFrom(_skeleton_graph(model.graph, stub))
    return copy


def _skeleton_span(model: onnx.ModelProto) -> int:
    """Bytes a skeleton's stand-ins span in SKELETON_DATA."""
    end = 0
    for tensor in iter_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        if info.get("location") == SKELETON_DATA:
            end = max(end, int(info.get("offset", 0)) + int(info.get("length", 0)))
    return end


def check_model(model: onnx.ModelProto, origin: str = "<model>") -> None:
    """Run the ONNX checker; raise InvalidModelError with its first line on failure.

    The checker reads a `skeleton` of the model from a temporary folder, its stand-ins'
    data file a sparse file of the right size: no copy of the weights, whatever the size.
    """
    skel = skeleton(model)
    try:
        with tempfile.TemporaryDirectory(prefix="onnxslim-edge-check-") as tmp:
            path = Path(tmp) / "model.onnx"
            with open(Path(tmp) / SKELETON_DATA, "wb") as data:
                data.truncate(_skeleton_span(skel))  # sparse: no disk blocks, no memory
            path.write_bytes(skel.SerializeToString())
            onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = first_line(exc)
        raise InvalidModelError(f"{origin}: fails the ONNX checker: {first}") from exc


def _lowered(model: onnx.ModelProto) -> int:
    return (
        min(model.ir_version, min_ir_version(model)) if model.ir_version else min_ir_version(model)
    )


def lower_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Set `ir_version` in place to the lowest the model needs (never raises it); return it."""
    model.ir_version = _lowered(model)
    return model


def _write(
    model: onnx.ModelProto,
    path: Path,
    *,
    external: bool,
    data_path: Path | None = None,
    location: str | None = None,
) -> None:
    """Serialize `model` to `path`; with `external`, large tensors go to `data_path`
    (default: `path.name + ".data"` beside it), named `location` in the model."""
    ir_before = model.ir_version
    model.ir_version = _lowered(model)
    try:
        if external:
            data_path = data_path or path.with_name(path.name + ".data")
            _write_external(model, path, data_path, location or data_path.name)
        elif model_bytes(model) >= STREAM_THRESHOLD:
            _write_streamed(model, path)
        else:
            path.write_bytes(model.SerializeToString())
    finally:
        model.ir_version = ir_before


#: Models with this many tensor bytes or more are written initializer by initializer.
STREAM_THRESHOLD = 64 * 2**20


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def _write_streamed(model: onnx.ModelProto, path: Path) -> None:
    """`model` as one protobuf file, written without serializing it whole.

    `SerializeToString` needs twice the model in memory (upb serializes, then copies
    into bytes). Protobuf fields may come in any order and repeated ones concatenate, so
    the file is: the model without its graph, then the graph field, made of the graph
    without its initializers followed by each initializer field. Peak: one tensor, twice.
    """
    graph_field = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_field = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    head = onnx.ModelProto()
    _copy_fields(model, head, skip="graph")
    rest = onnx.GraphProto()
    _copy_fields(model.graph, rest, skip="initializer")
    rest_bytes = rest.SerializeToString()
    parts = [_tensor_parts(t) for t in model.graph.initializer]
    sizes = [
        len(header) + (0 if raw is None else len(_field(_RAW_FIELD, raw)) + raw)
        for header, raw in parts
    ]
    graph_len = len(rest_bytes) + sum(len(_field(init_field, n)) + n for n in sizes)
    with open(path, "wb") as out:
        out.write(head.SerializeToString())
        out.write(_field(graph_field, graph_len))
        out.write(rest_bytes)
        for tensor, size, (header, raw) in zip(model.graph.initializer, sizes, parts):
            out.write(_field(init_field, size))
            out.write(header)
            if raw is not None:
                data = tensor.raw_data  # the one copy of this tensor's bytes
                if len(data) != raw:  # dims and bytes disagree: the size written is wrong
                    raise InvalidModelError(
                        f"tensor '{tensor.name}': {len(data)} bytes of data for {raw} by its dims"
                    )
                out.write(_field(_RAW_FIELD, raw))
                out.write(data)
                del data


_RAW_FIELD = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
#: Types whose raw bytes are not dims x numpy itemsize (packed 4-bit, strings).
_UNSPLIT_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("STRING", "INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, name)
)


def _tensor_parts(tensor: onnx.TensorProto) -> tuple[bytes, int | None]:
    """(the tensor serialized without its raw data, that data's length by dims), or the
    whole tensor and None when it has no raw data of a fixed-size type: written apart,
    the bytes are copied once (serializing a tensor holds them twice, sizing it once)."""
    if not tensor.HasField("raw_data") or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return tensor.SerializeToString(), None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return tensor.SerializeToString(), None
    if tensor.data_type in _UNSPLIT_TYPES or itemsize == 0:
        return tensor.SerializeToString(), None
    header = onnx.TensorProto()
    _copy_fields(tensor, header, skip="raw_data")
    return header.SerializeToString(), _declared_bytes(tensor)


#: Tensors at least this large go to the external data file.
_EXTERNAL_THRESHOLD = 1024


def _write_external(model: onnx.ModelProto, path: Path, data_path: Path, location: str) -> None:
    """`path` plus its tensors in `data_path` (named `location` in the model), no copy.

    The model file is a `skeleton` whose stand-ins point into `data_path`, written
    tensor by tensor as the skeleton is made; `model` itself is never changed (moving
    bytes out of a tensor and back would grow its protobuf arena by the model's size
    each time). Peak memory: the model plus one tensor.
    """
    with open(data_path, "wb") as data:
        skel = _skeleton_with(model, _Externalizer(data, location))
    path.write_bytes(skel.SerializeToString())


class _Externalizer(_Stubs):
    """Stand-ins for raw tensors of `_EXTERNAL_THRESHOLD` bytes or more that point at
    their bytes, written to `data` (named `location`) as they are made."""

    def __init__(self, data: Any, location: str) -> None:
        super().__init__(_EXTERNAL_THRESHOLD)
        self.data, self.location = data, location

    def __call__(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
            return tensor  # data elsewhere already, or typed fields (kept in the model)
        if _declared_bytes(tensor) < self.threshold:
            return tensor
        raw = tensor.raw_data  # one tensor's bytes, freed when written
        self.end = self.data.tell()
        self.data.write(raw)
        stub = self.make(tensor.name, tensor.data_type, tensor.dims, len(raw), self.location)
        stub.doc_string = tensor.doc_string
        return stub


def check_output_path(path: str | os.PathLike, what: str = "output", *, probe: bool = True) -> Path:
    """`path` as a Path if a file can be written there; ConfigError naming the cause if not.

    Refuses a folder, a missing folder, an existing non-regular file (a device, a FIFO)
    and, with `probe`, a folder where a temporary file cannot be created (read-only).
    """
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ConfigError(f"{target}: {what} is a folder; give a file name")
    if not folder.is_dir():
        raise ConfigError(f"{target}: {what} folder does not exist")
    if target.exists() and not target.is_file():
        raise ConfigError(f"{target}: {what} exists and is not a regular file")
    if probe:
        try:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise ConfigError(
                f"{target}: cannot write the {what} in {folder} ({exc.strerror or exc})"
            ) from None
        os.close(fd)
        os.unlink(name)
    return target


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    """(resolved path, (device, inode) when the file exists): two names of one file match."""
    resolved = path.resolve()
    try:
        st = os.stat(resolved)
    except (OSError, ValueError):
        return resolved, None
    return resolved, (st.st_dev, st.st_ino)


def check_paths(
    writes: Sequence[tuple[str, str | os.PathLike]],
    reads: Sequence[tuple[str, str | os.PathLike]],
    *,
    allow: Sequence[tuple[str | os.PathLike, str | os.PathLike]] = (),
) -> None:
    """Refuse a run that would write over a file it reads or write one file twice.

    `writes` and `reads` are (what, path) pairs, e.g. ("--report", "r.json") and
    ("the input model", "m.onnx"). Paths match when they resolve to the same path or
    name the same file (hard links: same device and inode). `allow` lists (write, read)
    pairs that may coincide (the input overwritten on purpose). ConfigError, one line.
    """
    allowed = {(_identity(Path(w))[0], _identity(Path(r))[0]) for w, r in allow}
    read_ids = [(what, Path(p), *_identity(Path(p))) for what, p in reads]
    written: list[tuple[str, Path, Path, tuple[int, int] | None]] = []
    for what, p in writes:
        path = Path(p)
        resolved, inode = _identity(path)
        for other, other_path, other_resolved, other_inode in read_ids:
            same = resolved == other_resolved or (inode is not None and inode == other_inode)
            if same and (resolved, other_resolved) not in allowed:
                raise ConfigError(
                    f"{path}: {what} would overwrite {other} ({other_path}); choose another path"
                )
        for other, _, other_resolved, other_inode in written:
            if resolved == other_resolved or (inode is not None and inode == other_inode):
                raise ConfigError(
                    f"{path}: {what} and {other} are the same file; choose another path"
                )
        written.append((what, path, resolved, inode))


def new_file_mode(*, executable: bool = False) -> int:
    """Permissions a new file gets from any tool here: 0o666 (0o777 for a script or a
    folder) less the umask. mkstemp/mkdtemp give 0o600/0o700, so every output staged
    through a temporary file is chmod-ed to this before it is renamed into place."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if executable else 0o666) & ~umask


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while outputs are renamed into place (all or none)."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:
        yield
        return
    old = mask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


class Outputs:
    """The files one run writes, committed together or not at all.

    Each output is written to a temporary file beside its target (`.NAME.XXXX.tmp`, so
    the rename stays on one file system); `commit` renames them all into place with
    SIGINT/SIGTERM held back; leaving the `with` block without a commit, on an error or
    an interrupt, removes every temporary file and leaves no output.

        with Outputs() as out:
            out.model(model, "o.onnx")
            out.text("report.json", text)
            out.commit()
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, target), in commit order

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def _temp(self, target: Path, what: str) -> Path:
        try:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        except OSError as exc:
            raise ConfigError(
                f"{target}: cannot write the {what} in {target.parent} ({exc.strerror or exc})"
            ) from None
        tmp = Path(name)
        self._staged.append((tmp, target))
        os.close(fd)
        os.chmod(tmp, new_file_mode())
        return tmp

    def model(
        self,
        model: onnx.ModelProto,
        path: str | os.PathLike,
        *,
        external_data: bool | None = None,
        opset: int | None = None,
    ) -> Path:
        """Stage `model` for `path` (and `path.name + ".data"` when external); see save_model."""
        target = check_output_path(path, "output", probe=False)
        if opset is not None:
            model = convert_opset(model, opset)
        if external_data is None:
            external_data = model_bytes(model) >= PROTOBUF_LIMIT
        data = None
        if external_data:  # staged first: committed before the model that refers to it
            data_target = check_output_path(
                target.with_name(target.name + ".data"), "external data", probe=False
            )
            data = self._temp(data_target, "external data")
        tmp = self._temp(target, "output")
        _write(model, tmp, external=external_data, data_path=data, location=target.name + ".data")
        return target

    def text(self, path: str | os.PathLike, text: str, what: str = "report") -> Path:
        """Stage a text file (UTF-8) for `path`."""
        target = check_output_path(path, what, probe=False)
        tmp = self._temp(target, what)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        return target

    def binary(self, path: str | os.PathLike, data: bytes, what: str = "file") -> Path:
        """Stage a binary file (an image) for `path`."""
        target = check_output_path(path, what, probe=False)
        self._temp(target, what).write_bytes(data)
        return target

    def commit(self) -> list[Path]:
        """Rename every staged file into place; return the targets."""
        staged, self._staged = self._staged, []
        try:
            with _signals_blocked():
                for tmp, target in staged:
                    os.replace(tmp, target)
        except OSError as exc:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise ConfigError(f"{target}: cannot write ({exc.strerror or exc})") from None
        return [target for _, target in staged]

    def discard(self) -> None:
        """Remove every staged temporary file (nothing was committed)."""
        staged, self._staged = self._staged, []
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    overwrite_input: bool = False,
    external_data: bool | None = None,
    opset: int | None = None,
) -> Path:
    """Save atomically (see `Outputs`); return the path written.

    - `input_path`: the file the model came from; saving over it needs `overwrite_input`.
    - `external_data`: None chooses it when the tensors exceed protobuf's 2 GB limit.
    - `opset`: convert to this default-domain opset first (see `convert_opset`).
    The saved file's `ir_version` is the lowest its opsets and data types need.
    """
    path = Path(path)
    if input_path is not None and not overwrite_input:
        src = Path(input_path)
        if src.exists() and path.exists() and os.path.samefile(src, path):
            raise ConfigError(
                f"{path}: refusing to overwrite the input model; choose another output"
            )
    with Outputs() as outputs:
        outputs.model(model, path, external_data=external_data, opset=opset)
        outputs.commit()
    log.debug("saved %s (external data: %s)", path, external_data)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (reports, caches) whole or not at all: temp file, then rename."""
    with Outputs() as outputs:
        target = outputs.text(path, text, "file")
        outputs.commit()
    return target


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Return a copy converted to `opset` for the default domain (onnx.version_converter)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current == opset:
        return model
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors and more
        first = first_line(exc)
        raise UnsupportedError(
            f"cannot convert the model from opset {current} to {opset}: {first}"
        ) from exc


@contextlib.contextmanager
def model_on_disk(model: onnx.ModelProto, *, external: bool | None = None) -> Iterator[Path]:
    """A temporary file holding `model`, removed after use; its large tensors in an
    external-data file beside it with `external` (default: when over 2 GB)."""
    if external is None:
        external = model_bytes(model) >= PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(prefix="onnxslim-edge-") as tmp:
        path = Path(tmp) / "model.onnx"
        _write(model, path, external=external)
        yield path
