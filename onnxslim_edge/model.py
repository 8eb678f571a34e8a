"""Model I/O: load from path, bytes or ModelProto; save atomically; target IR and opset.

Loading checks what an untrusted file can get wrong: missing or corrupt files, an empty
protobuf, external-data locations that escape the model's folder, a failing ONNX
checker. Saving writes a temporary file beside the target and renames it, so an output
file appears whole or not at all; it never overwrites the input unless asked; it lowers
`ir_version` to the lowest the model's opsets and data types need (ONNX Runtime 1.19
and TensorRT 8.x refuse the IR versions that recent `onnx` writes); models over 2 GB
go to external data (`<name>.data` beside the model).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxslim_edge.errors import ConfigError, InvalidModelError, UnsupportedError, first_line

__all__ = [
    "PROTOBUF_LIMIT",
    "ModelSource",
    "check_model",
    "convert_opset",
    "iter_graphs",
    "iter_tensors",
    "load_model",
    "lower_ir_version",
    "min_ir_version",
    "model_bytes",
    "model_on_disk",
    "save_model",
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


def _check_external_locations(model: onnx.ModelProto, base_dir: Path, origin: str) -> None:
    base = base_dir.resolve()
    for tensor in iter_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        if not location:
            raise InvalidModelError(
                f"{origin}: tensor '{tensor.name}' has external data without a location"
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
        model = _parse(path.read_bytes(), origin)
        if base_dir is None:
            base_dir = path.parent
    else:
        raise TypeError(f"cannot load a model from {type(source).__name__}")

    if _has_external_data(model):
        if base_dir is None:
            raise InvalidModelError(f"{origin}: the model has external data; give base_dir")
        _check_external_locations(model, Path(base_dir), origin)
        try:
            external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (OSError, ValueError) as exc:
            raise InvalidModelError(f"{origin}: cannot read external data ({exc})") from exc
    if check:
        check_model(model, origin)
    return model


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


def check_model(model: onnx.ModelProto, origin: str = "<model>") -> None:
    """Run the ONNX checker; raise InvalidModelError with its first line on failure."""
    try:
        if model_bytes(model) < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                _write(model, path, external=True)
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


def _write(model: onnx.ModelProto, path: Path, *, external: bool) -> None:
    ir_before = model.ir_version
    model.ir_version = _lowered(model)
    try:
        if external:
            _write_external(model, path)
        else:
            path.write_bytes(model.SerializeToString())
    finally:
        model.ir_version = ir_before


#: Tensors at least this large go to the external data file.
_EXTERNAL_THRESHOLD = 1024


def _write_external(model: onnx.ModelProto, path: Path) -> None:
    """`path` plus `path.name + ".data"`, without copying the model.

    Each large tensor's bytes are moved to the data file and the tensor points there
    while the (now small) model is serialized; then every tensor is restored, also on
    error. Peak memory stays at the model plus one tensor, where a copy would double it.
    """
    location = path.name + ".data"
    moved: list[tuple[onnx.TensorProto, bytes, bool]] = []
    try:
        with open(path.parent / location, "wb") as data:
            for tensor in iter_tensors(model):
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    continue
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < _EXTERNAL_THRESHOLD:
                    continue
                raw = tensor.raw_data
                offset = data.tell()
                data.write(raw)
                moved.append((tensor, raw, tensor.HasField("data_location")))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (
                    ("location", location),
                    ("offset", offset),
                    ("length", len(raw)),
                ):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(value)
        path.write_bytes(model.SerializeToString())
    finally:
        for tensor, raw, had_location in moved:
            del tensor.external_data[:]
            if had_location:
                tensor.data_location = onnx.TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")
            tensor.raw_data = raw


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    overwrite_input: bool = False,
    external_data: bool | None = None,
    opset: int | None = None,
) -> Path:
    """Save atomically; return the path written.

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
    if path.is_dir():
        raise ConfigError(f"{path}: output is a folder; give a file name")
    if not path.parent.exists():
        raise ConfigError(f"{path}: output folder does not exist")
    if opset is not None:
        model = convert_opset(model, opset)
    if external_data is None:
        external_data = model_bytes(model) >= PROTOBUF_LIMIT

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        _write(model, tmp, external=external_data)
        data = tmp_dir / (path.name + ".data")
        if data.exists():
            os.replace(data, path.parent / data.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.debug("saved %s (external data: %s)", path, external_data)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (reports, caches) whole or not at all: temp file, then rename."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"{target}: folder does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
def model_on_disk(model: onnx.ModelProto) -> Iterator[Path]:
    """A temporary file holding `model` (external data when over 2 GB), removed after use."""
    with tempfile.TemporaryDirectory(prefix="onnxslim-edge-") as tmp:
        path = Path(tmp) / "model.onnx"
        _write(model, path, external=model_bytes(model) >= PROTOBUF_LIMIT)
        yield path
