"""`.npz` and `.npy` data read a batch of rows at a time, and folders of them.

Owns numpy's file format as the readers see it: `_NpyStream` parses an `.npy` header
(never unpickling: object arrays are refused) and reads rows from a file or from the
possibly compressed zip member of an `.npz` (`_NpzFile`), so memory does not grow with
the number of samples; truncated or inconsistent files raise `DataError`. It also checks
every header of a file list against the model before any sample is read
(`_source_for_files`) and gives the chunk factory `DataSource` batches.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxslim_edge.data.specs import (
    Feed,
    InputShapes,
    _check_names,
    _check_numeric,
    _check_shape,
    _Chunks,
    _fmt_shape,
    _InputSpec,
    _is_float,
)
from onnxslim_edge.errors import DataError

__all__: list[str] = []  # package-internal; the public API is onnxslim_edge.data

log = logging.getLogger(__name__)

_ARRAY_EXTENSIONS = (".npz", ".npy")


# --------------------------------------------------------------------------- .npy streams


class _NpyStream:
    """Rows of one `.npy` array read from a binary file object, `n` rows at a time."""

    def __init__(self, fp: Any, origin: str, name: str, size: int | None) -> None:
        self.fp, self.origin, self.name = fp, origin, name
        try:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version in ((2, 0), (3, 0)):  # 3.0 differs only in the header's encoding
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"{origin}: array '{name}' is not a valid .npy array ({exc})") from exc
        dtype = np.dtype(dtype)
        _check_numeric(origin, name, dtype)
        if not shape:
            raise DataError(f"{origin}: array '{name}' is a scalar; samples go on axis 0")
        if fortran and len(shape) > 1:
            raise DataError(
                f"{origin}: array '{name}' is stored in Fortran order, which cannot be read row "
                "by row; save it with np.ascontiguousarray"
            )
        self.shape: tuple[int, ...] = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.row_bytes = dtype.itemsize * math.prod(self.shape[1:])
        if size is not None:
            header = fp.tell()
            expected = header + self.shape[0] * self.row_bytes
            if size != expected:
                raise DataError(
                    f"{origin}: array '{name}' is truncated or inconsistent (header says "
                    f"{_fmt_shape(self.shape)} {dtype}: {expected} bytes, file holds {size})"
                )
        self.remaining = self.shape[0]

    def read(self, rows: int) -> np.ndarray:
        rows = min(rows, self.remaining)
        buf = bytearray(rows * self.row_bytes)
        view = memoryview(buf)
        got = 0
        try:
            while got < len(buf):
                n = self.fp.readinto(view[got:])
                if not n:
                    raise DataError(f"{self.origin}: array '{self.name}' is truncated")
                got += n
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise DataError(f"{self.origin}: cannot read array '{self.name}' ({exc})") from exc
        self.remaining -= rows
        return np.frombuffer(buf, dtype=self.dtype).reshape((rows, *self.shape[1:]))


class _NpzFile:
    """An open `.npz`: one `_NpyStream` per member, all with the same sample count."""

    def __init__(self, path: Path) -> None:
        self.path, origin = path, str(path)
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise DataError(f"{origin}: not a valid .npz file ({exc})") from exc
        self.streams: dict[str, _NpyStream] = {}
        try:
            for info in self.zip.infolist():
                if info.is_dir() or not info.filename.endswith(".npy"):
                    log.debug("%s: ignoring member %s", origin, info.filename)
                    continue
                name = info.filename[: -len(".npy")]
                try:
                    fp = self.zip.open(info)
                except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as exc:
                    raise DataError(f"{origin}: cannot open array '{name}' ({exc})") from exc
                self.streams[name] = _NpyStream(fp, origin, name, info.file_size)
            if not self.streams:
                raise DataError(f"{origin}: the .npz holds no arrays")
            counts = {n: s.shape[0] for n, s in self.streams.items()}
            if len(set(counts.values())) > 1:
                listed = ", ".join(f"{n}: {c}" for n, c in counts.items())
                raise DataError(f"{origin}: arrays have different sample counts ({listed})")
        except BaseException:
            self.close()
            raise
        self.samples = next(iter(counts.values()))

    def close(self) -> None:
        for s in getattr(self, "streams", {}).values():
            s.fp.close()
        self.zip.close()


def _npz_chunks(path: Path, rows: int) -> Iterator[tuple[str, Feed]]:
    npz = _NpzFile(path)
    try:
        while npz.samples and next(iter(npz.streams.values())).remaining:
            yield str(path), {name: s.read(rows) for name, s in npz.streams.items()}
    finally:
        npz.close()


def _npy_chunks(path: Path, name: str, rows: int) -> Iterator[tuple[str, Feed]]:
    with open(path, "rb") as fp:
        stream = _NpyStream(fp, str(path), name, os.path.getsize(path))
        while stream.remaining:
            yield str(path), {name: stream.read(rows)}


def _npy_header(path: Path, name: str) -> _NpyStream:
    with open(path, "rb") as fp:
        return _NpyStream(fp, str(path), name, os.path.getsize(path))


def _source_for_files(
    files: list[Path],
    specs: list[_InputSpec] | None,
    origin: str,
    rows: int,
    input_shapes: InputShapes | None,
) -> tuple[_Chunks, int]:
    """Chunk factory over .npz/.npy files, after checking every header; total samples."""
    total = 0
    single = None
    if any(f.suffix.lower() == ".npy" for f in files):
        required = [s for s in specs or () if not s.optional]
        if specs is None:
            raise DataError(f"{origin}: .npy files need the model to know which input they feed")
        if len(required) != 1:
            listed = ", ".join(s.name for s in required)
            raise DataError(
                f"{origin}: .npy files feed single-input models only; the model has inputs {listed}"
            )
        single = required[0].name
    for f in files:
        if f.suffix.lower() == ".npz":
            npz = _NpzFile(f)
            try:
                _check_headers(str(f), npz.streams, specs, input_shapes)
                total += npz.samples
            finally:
                npz.close()
        else:
            assert single is not None
            stream = _npy_header(f, single)
            _check_headers(str(f), {single: stream}, specs, input_shapes)
            total += stream.shape[0]

    def chunks() -> Iterator[tuple[str, Feed]]:
        for f in files:
            if f.suffix.lower() == ".npz":
                yield from _npz_chunks(f, rows)
            else:
                assert single is not None
                yield from _npy_chunks(f, single, rows)

    return chunks, total


def _check_headers(
    origin: str,
    streams: Mapping[str, _NpyStream],
    specs: list[_InputSpec] | None,
    input_shapes: InputShapes | None,
) -> None:
    if specs is None:
        return
    by_name = {s.name: s for s in specs}
    ignored = _check_names(origin, streams.keys(), specs)
    for name, stream in streams.items():
        if name in ignored:
            continue
        spec = by_name[name]
        _check_shape(origin, name, stream.shape, spec, input_shapes)
        if spec.dtype is not None and (
            spec.dtype.kind in "iub" and (_is_float(stream.dtype) or stream.dtype.kind == "c")
        ):
            raise DataError(
                f"{origin}: array '{name}' is {stream.dtype} but input '{name}' takes "
                f"{spec.dtype}; refusing a lossy cast to integers"
            )
