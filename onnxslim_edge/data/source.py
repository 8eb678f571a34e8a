"""`DataSource` (re-iterable, re-batched feeds) and `open_data`, which picks the reader.

Owns batching: chunks from any reader are checked and cast against the model, cut and
joined into batches of `batch_size` (or the batch the model fixes), bounded by `limit`,
with a new batch started where sample shapes change; every sample used is checked to be
finite, and a source without samples is refused. `open_data` dispatches on what
the user gives (a DataSource, a path to an `.npz`/`.npy`, a folder of them or of
images, Python feed dicts or a callable returning them, or "random") to `npz`,
`images` or `synthetic`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxslim_edge.data.images import IMAGE_EXTENSIONS, ImagePreprocess, _image_source
from onnxslim_edge.data.npz import _ARRAY_EXTENSIONS, _source_for_files
from onnxslim_edge.data.specs import (
    Feed,
    InputShapes,
    _Batches,
    _cast,
    _check_names,
    _check_numeric,
    _check_shape,
    _Chunks,
    _feedable_or_optional,
    _fixed_batch,
    _InputSpec,
)
from onnxslim_edge.data.synthetic import _random_batches
from onnxslim_edge.errors import ConfigError, DataError

__all__ = ["DataSource", "open_data"]

log = logging.getLogger(__name__)


class DataSource:
    """Re-iterable batches of feed dicts `{input_name: array}` (see `open_data`).

    Iterating yields batches of `batch_size` samples (the last may be smaller; for a
    model whose inputs fix axis 0 to k, batches are k samples and an incomplete last
    batch is dropped). Samples of another shape (text lines of other widths) start a new
    batch, so a batch may also end early there. Iterating twice yields the same samples, except for a one-shot
    iterator given as the spec, which refuses a second pass.
    """

    def __init__(
        self,
        chunks: _Chunks | None = None,
        *,
        batches: _Batches | None = None,
        description: str,
        batch_size: int = 1,
        limit: int | None = None,
        specs: Sequence[_InputSpec] | None = None,
        input_shapes: InputShapes | None = None,
        synthetic: bool = False,
        num_samples: int | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, not {batch_size!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"limit must be a positive int or None, not {limit!r}")
        if (chunks is None) == (batches is None):
            raise TypeError("give exactly one of chunks and batches")
        self._chunks = chunks
        self._batches = batches
        self._description = description
        self._specs = list(specs) if specs is not None else None
        self._input_shapes = input_shapes
        self.is_synthetic = synthetic
        self.limit = limit
        self._total = num_samples
        self._fixed = _fixed_batch(self._specs)
        self.batch_size = self._fixed or batch_size
        if self._fixed and self._fixed != batch_size:
            log.info(
                "inputs fix the batch dimension to %d; batching by %d", self._fixed, self._fixed
            )
        if self._total is not None and not synthetic:
            if self._total == 0:
                raise DataError(f"{description}: holds no samples")
            if self._fixed and self.num_samples == 0:
                raise DataError(
                    f"{description}: {min(self._total, limit or self._total)} sample(s), fewer "
                    f"than the batch of {self._fixed} the model fixes; nothing to feed"
                )

    # -- public

    @property
    def num_samples(self) -> int | None:
        """How many samples an iteration yields, where known before iterating."""
        if self._total is None:
            return self.limit
        n = self._total if self.limit is None else min(self._total, self.limit)
        return n - n % self._fixed if self._fixed else n

    def describe(self) -> str:
        n = self.num_samples
        count = f": {n} samples" if n is not None else ""
        kind = " (synthetic)" if self.is_synthetic else ""
        return f"{self._description}{count}{kind}, batch {self.batch_size}"

    def __repr__(self) -> str:
        return f"DataSource({self.describe()})"

    def __iter__(self) -> Iterator[Feed]:
        for _, feed in self.counted():
            yield feed

    def counted(self) -> Iterator[tuple[int, Feed]]:
        """Like iterating, but each batch comes with its sample count."""
        batch, limit = self.batch_size, self.limit
        if self._batches is not None:
            yield from self._batches(batch, limit)
            return
        assert self._chunks is not None
        parts: list[Feed] = []
        pending = emitted = 0
        last_origin, offset = None, 0  # samples of `origin` before this chunk
        for origin, chunk in self._chunks():
            if origin != last_origin:
                last_origin, offset = origin, 0
            n = self._prepare(origin, chunk)
            if parts and chunk.keys() != parts[0].keys():
                raise DataError(
                    f"{origin}: gives arrays {', '.join(chunk)} but earlier samples gave "
                    f"{', '.join(parts[0])}"
                )
            if parts and _shapes(chunk) != _shapes(parts[0]):
                # samples of another shape (lines of other widths) start a new batch
                if self._fixed:
                    raise DataError(
                        f"{origin}: its samples differ in shape from earlier ones, so they "
                        f"cannot share a batch of {self._fixed}, which the model fixes"
                    )
                yield pending, self._join(parts)
                emitted += pending
                parts, pending = [], 0
            start = 0
            while start < n:
                room = batch - pending
                if limit is not None:
                    room = min(room, limit - emitted - pending)
                if room <= 0:
                    break
                take = min(room, n - start)
                part = {k: v[start : start + take] for k, v in chunk.items()}
                for name, arr in part.items():
                    _check_finite(origin, name, arr, offset + start)
                parts.append(part)
                pending += take
                start += take
                if pending == batch:
                    yield pending, self._join(parts)
                    emitted += pending
                    parts, pending = [], 0
            offset += n
            if limit is not None and emitted + pending >= limit:
                break
        if pending:
            if not self._fixed:
                yield pending, self._join(parts)
                return
            if not emitted:
                raise DataError(
                    f"{self._description}: {pending} sample(s), fewer than the batch of "
                    f"{self._fixed} the model fixes; nothing to feed"
                )
            log.warning(
                "dropping the last %d sample(s): the model fixes the batch to %d",
                pending,
                self._fixed,
            )
        elif not emitted:
            raise DataError(f"{self._description}: holds no samples")

    def with_options(
        self,
        *,
        batch_size: int | None = None,
        limit: int | None = None,
        model: onnx.ModelProto | None = None,
        input_shapes: InputShapes | None = None,
    ) -> DataSource:
        """A copy with another batch size, a tighter limit or a model to check against."""
        new_limit = (
            self.limit
            if limit is None
            else (limit if self.limit is None else min(limit, self.limit))
        )
        specs = self._specs
        if model is not None and not self.is_synthetic:
            specs = _feedable_or_optional(model)
        return DataSource(
            self._chunks,
            batches=self._batches,
            description=self._description,
            batch_size=batch_size if batch_size is not None else self.batch_size,
            limit=new_limit,
            specs=specs,
            input_shapes=input_shapes if input_shapes is not None else self._input_shapes,
            synthetic=self.is_synthetic,
            num_samples=self._total,
        )

    # -- internals

    def _prepare(self, origin: str, chunk: Feed) -> int:
        """Check and cast `chunk` in place against the model; return its sample count."""
        specs = {s.name: s for s in self._specs} if self._specs is not None else None
        if specs is not None:
            for name in _check_names(origin, chunk.keys(), specs.values()):
                del chunk[name]  # not an input (e.g. a label): never fed to a model
        count: dict[str, int] = {}
        for name, arr in chunk.items():
            spec = specs.get(name) if specs is not None else None
            if spec is not None and spec.rank == 0 and arr.ndim == 0:
                arr = arr.reshape(1)
            _check_numeric(origin, name, arr.dtype)
            if spec is not None:
                _check_shape(origin, name, arr.shape, spec, self._input_shapes)
            chunk[name] = _cast(origin, name, arr, spec.dtype if spec is not None else None)
            if chunk[name].ndim == 0:
                raise DataError(f"{origin}: array '{name}' is a scalar; samples go on axis 0")
            count[name] = chunk[name].shape[0]
        if len(set(count.values())) > 1:
            listed = ", ".join(f"{n}: {c}" for n, c in count.items())
            raise DataError(f"{origin}: arrays have different sample counts ({listed})")
        return next(iter(count.values()), 0)

    def _join(self, parts: list[Feed]) -> Feed:
        out = {}
        for name in parts[0]:
            arrays = [p[name] for p in parts]
            arr = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            arr = np.ascontiguousarray(arr)
            spec = next((s for s in self._specs or () if s.name == name), None)
            if spec is not None and spec.rank == 0:
                arr = arr.reshape(())
            out[name] = arr
        return out


def _check_finite(origin: str, name: str, arr: np.ndarray, first: int) -> None:
    """Refuse NaN and infinity: they would poison every statistic computed from the data.

    `arr` holds samples `first, first + 1, ...` of `origin`; the error names the first
    sample that is not finite.
    """
    if arr.dtype.kind not in "fc" or not arr.size:
        return
    finite = np.isfinite(arr)
    if finite.all():
        return
    bad = ~finite.reshape(finite.shape[0], -1).all(axis=1)
    i = int(np.argmax(bad))
    what = "NaN" if np.isnan(arr[i]).any() else "infinity"
    raise DataError(
        f"{origin}: array '{name}' holds {what} at sample {first + i} (counting from 0); "
        "calibration and evaluation data must be finite"
    )


def _shapes(feed: Feed) -> dict[str, tuple[int, ...]]:
    """Each array's shape after the sample axis: what must agree within a batch."""
    return {k: tuple(v.shape[1:]) for k, v in feed.items()}


def _list_files(folder: Path) -> list[Path]:
    return sorted(
        (
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        ),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def _iterable_chunks(spec: Any) -> _Chunks:
    one_shot = False
    if isinstance(spec, Mapping):
        items: Any = [spec]
    elif callable(spec):
        items = spec
    else:
        items = spec
        try:
            one_shot = iter(spec) is spec
        except TypeError as exc:
            raise DataError(f"cannot read data from a {type(spec).__name__}") from exc
    consumed = [False]

    def chunks() -> Iterator[tuple[str, Feed]]:
        if one_shot:
            if consumed[0]:
                raise DataError(
                    "the data is a one-shot iterator and was already consumed; pass a list or "
                    "a callable that returns a fresh iterator"
                )
            consumed[0] = True
        source = items() if callable(items) and not isinstance(items, Iterable) else items
        try:
            iterator = iter(source)
        except TypeError as exc:
            raise DataError(
                f"the data callable returned a {type(source).__name__}, not an iterable of feed dicts"
            ) from exc
        for i, item in enumerate(iterator, 1):
            origin = f"feed #{i}"
            if not isinstance(item, Mapping):
                raise DataError(
                    f"{origin}: is a {type(item).__name__}, not a feed dict {{input_name: array}}"
                )
            feed = {}
            for name, value in item.items():
                arr = (
                    value if isinstance(value, np.ndarray) else _as_array(origin, str(name), value)
                )
                feed[str(name)] = arr
            yield origin, feed

    return chunks


def _as_array(origin: str, name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{origin}: array '{name}' is not numeric ({exc})") from exc
    return arr


def open_data(
    spec: Any,
    model: onnx.ModelProto | None = None,
    *,
    batch_size: int = 1,
    limit: int | None = None,
    preprocess: ImagePreprocess | None = None,
    input_shapes: InputShapes | None = None,
    seed: int = 0,
) -> DataSource:
    """A `DataSource` over `spec`, checked against `model` when given.

    `spec`: a DataSource (re-batched to `batch_size`, limit tightened), a path to an
    `.npz` or `.npy`, a folder of `.npz`/`.npy` files or of images (needs
    `preprocess`), an iterable of feed dicts or a callable returning one, or "random"
    (synthetic, `limit` or 8 samples; logged as a warning). `input_shapes` fills
    symbolic dims after axis 0 (for checks and for random data). Raises DataError.
    """
    specs = _feedable_or_optional(model) if model is not None else None
    if isinstance(spec, DataSource):
        return spec.with_options(
            batch_size=batch_size, limit=limit, model=model, input_shapes=input_shapes
        )
    if isinstance(spec, str) and spec == "random":
        specs, count, batches = _random_batches(model, limit, input_shapes, seed)
        return DataSource(
            batches=batches,
            description=f"random data (seed {seed})",
            batch_size=batch_size,
            limit=count,
            specs=specs,
            input_shapes=input_shapes,
            synthetic=True,
            num_samples=count,
        )
    if isinstance(spec, (str, os.PathLike)):
        return _path_source(Path(spec), specs, batch_size, limit, preprocess, input_shapes)
    if isinstance(spec, (bytes, bytearray)):
        raise DataError("data given as bytes; give a path, a folder or feed dicts")
    chunks = _iterable_chunks(spec)
    return DataSource(
        chunks,
        description=f"Python {type(spec).__name__}",
        batch_size=batch_size,
        limit=limit,
        specs=specs,
        input_shapes=input_shapes,
    )


def _path_source(
    path: Path,
    specs: list[_InputSpec] | None,
    batch_size: int,
    limit: int | None,
    preprocess: ImagePreprocess | None,
    input_shapes: InputShapes | None,
) -> DataSource:
    if not path.exists():
        raise DataError(f"{path}: data file or folder not found")
    rows = max(batch_size, 1)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _ARRAY_EXTENSIONS:
            raise DataError(
                f"{path}: unsupported data file; give an .npz, an .npy, a folder of them or of "
                "images, or 'random'"
            )
        chunks, total = _source_for_files([path], specs, str(path), rows, input_shapes)
        description = str(path)
    else:
        files = _list_files(path)
        arrays = [f for f in files if f.suffix.lower() in _ARRAY_EXTENSIONS]
        images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        if arrays and images:
            raise DataError(f"{path}: the folder mixes .npz/.npy files and images; keep one kind")
        if arrays:
            chunks, total = _source_for_files(arrays, specs, str(path), rows, input_shapes)
            description = f"{path} ({len(arrays)} array file(s))"
        elif images:
            if preprocess is None:
                raise DataError(
                    f"{path}: a folder of images needs a preprocessing (size, mean/std, layout), "
                    "e.g. --preprocess 224x224,mean=0.485|0.456|0.406,std=0.229|0.224|0.225"
                )
            chunks, _ = _image_source(images, path, preprocess, specs)
            total = len(images)
            description = f"{path} ({len(images)} images, {preprocess.describe()})"
        else:
            raise DataError(f"{path}: the folder holds no .npz, .npy or image files")
    return DataSource(
        chunks,
        description=description,
        batch_size=batch_size,
        limit=limit,
        specs=specs,
        input_shapes=input_shapes,
        num_samples=total,
    )
