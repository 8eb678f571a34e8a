"""Calibration and evaluation data, streamed batch by batch.

`open_data(spec, model)` turns what a user has into a re-iterable `DataSource` of feed
dicts `{input_name: array}` holding `batch_size` samples each:

- an `.npz` whose arrays are named after the model's inputs, samples on axis 0;
- a folder of `.npz`/`.npy` files (an `.npy` file is a batch of samples of the only
  input of a single-input model);
- a folder of images with an `ImagePreprocess` (size, resize, mean/std, layout);
- any iterable of feed dicts, or a callable returning one (arrays hold one or several
  samples on axis 0);
- `"random"`: synthetic data for smoke tests (logged as such; see `random_feeds`).

Memory does not grow with the number of samples: `.npy` data is read from the file (or
from the possibly compressed zip member of an `.npz`) a batch of rows at a time, after
parsing numpy's `.npy` header; nothing is ever unpickled. Data is checked against the
model (missing or extra inputs, ranks, fixed dims, dtypes) and cast to the dtype each
input wants; a lossy cast (float to int) is refused. Problems raise `DataError` with one
line naming the file and the cause.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from onnxslim_edge.errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataSource",
    "ImagePreprocess",
    "open_data",
    "parse_preprocess",
    "random_feeds",
]

log = logging.getLogger(__name__)

#: File extensions read as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_ARRAY_EXTENSIONS = (".npz", ".npy")

#: Synthetic integer inputs are drawn uniformly from [0, _RANDOM_INT_HIGH).
_RANDOM_INT_HIGH = 4
_RANDOM_DEFAULT_COUNT = 8

Feed = dict[str, np.ndarray]
InputShapes = Mapping[str, Sequence[int]]


# --------------------------------------------------------------------------- model inputs


@dataclass(frozen=True)
class _InputSpec:
    """One graph input: numpy dtype (None: unknown), shape (None: unknown rank)."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None
    optional: bool = False  # an initializer backs it (old IR): may be fed, need not be
    kind: str = "tensor_type"

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


def _model_inputs(model: onnx.ModelProto) -> list[_InputSpec]:
    """The model's graph inputs. The one place that reads them (swap for analysis.shapes)."""
    initialized = {t.name for t in model.graph.initializer}
    initialized |= {t.values.name for t in model.graph.sparse_initializer}
    specs = []
    for vi in model.graph.input:
        kind = vi.type.WhichOneof("value") or "unknown"
        if kind != "tensor_type":
            specs.append(_InputSpec(vi.name, None, None, vi.name in initialized, kind))
            continue
        tensor = vi.type.tensor_type
        dtype: np.dtype | None = None
        if tensor.elem_type:
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
            except (KeyError, ValueError, TypeError):
                dtype = None
        shape: tuple[int | str | None, ...] | None = None
        if tensor.HasField("shape"):
            dims: list[int | str | None] = []
            for d in tensor.shape.dim:
                if d.HasField("dim_value") and d.dim_value > 0:
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param") and d.dim_param:
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
            shape = tuple(dims)
        specs.append(_InputSpec(vi.name, dtype, shape, vi.name in initialized))
    return specs


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    parts = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _resolve_shape(
    spec: _InputSpec, input_shapes: InputShapes | None
) -> tuple[int | str | None, ...] | None:
    """The spec's shape with symbolic dims after axis 0 filled from `input_shapes`."""
    given = None if input_shapes is None else input_shapes.get(spec.name)
    if given is None:
        return spec.shape
    given = tuple(int(d) for d in given)
    if spec.shape is None:
        return given
    if len(given) != len(spec.shape):
        raise DataError(
            f"input_shapes: '{spec.name}' given as {_fmt_shape(given)} but the model's input "
            f"has rank {len(spec.shape)} {_fmt_shape(spec.shape)}"
        )
    out: list[int | str | None] = []
    for axis, (d, g) in enumerate(zip(spec.shape, given)):
        if isinstance(d, int):
            if d != g:
                raise DataError(
                    f"input_shapes: '{spec.name}' given as {_fmt_shape(given)} but the model "
                    f"fixes it to {_fmt_shape(spec.shape)}"
                )
            out.append(d)
        else:
            out.append(d if axis == 0 else g)
    return tuple(out)


# --------------------------------------------------------------------------- dtypes


def _is_float(dt: np.dtype) -> bool:
    return dt.kind == "f" or dt.name == "bfloat16" or dt.name.startswith("float8")


def _check_numeric(origin: str, name: str, dt: np.dtype) -> None:
    if dt.hasobject:
        raise DataError(
            f"{origin}: array '{name}' holds Python objects; loading it would need pickle, "
            "which is refused"
        )
    if dt.fields is not None or dt.kind not in "biufc":
        raise DataError(f"{origin}: array '{name}' has non-numeric dtype {dt}")


def _cast(origin: str, name: str, arr: np.ndarray, want: np.dtype | None) -> np.ndarray:
    """`arr` as `want` (native byte order); refuse casts that lose more than float precision."""
    have = arr.dtype
    if want is None:
        return arr if have.isnative else arr.astype(have.newbyteorder("="))
    if have == want:
        return arr
    if want.kind in "iub":
        if _is_float(have) or have.kind == "c":
            raise DataError(
                f"{origin}: array '{name}' is {have} but input '{name}' takes {want}; "
                "refusing a lossy cast to integers"
            )
        if have.kind in "iu" and arr.size and not np.can_cast(have, want):
            lo, hi = (0, 1) if want.kind == "b" else (np.iinfo(want).min, np.iinfo(want).max)
            if int(arr.min()) < lo or int(arr.max()) > hi:
                raise DataError(
                    f"{origin}: array '{name}' has values outside the range of {want}, "
                    f"the dtype of input '{name}'"
                )
    elif _is_float(want):
        if have.kind == "c":
            raise DataError(f"{origin}: array '{name}' is complex but input '{name}' takes {want}")
    elif want.kind != "c":
        raise DataError(f"{origin}: input '{name}' takes {want}, which data readers do not support")
    return arr.astype(want)


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


# --------------------------------------------------------------------------- images


@dataclass(frozen=True, kw_only=True)
class ImagePreprocess:
    """How an image file becomes one input sample.

    - `size`: (H, W) of the result.
    - `resize`: "stretch" resizes to (H, W) ignoring the aspect ratio;
      "shorter-center-crop" scales the shorter side to `resize_shorter` (default: the
      smallest scale that covers (H, W)) and crops the centre (offsets rounded down).
      Resampling is bilinear; an image already at the target size is not resampled.
    - pixels become `(pixel * scale - mean) / std` per channel (float dtypes); an
      integer `dtype` keeps the raw pixels and needs scale 1, mean 0, std 1.
    - `layout`: "NCHW" gives samples (C, H, W), "NHWC" gives (H, W, C).
    - `channels`: "RGB", "BGR" or "L" (grey, one channel).
    """

    size: tuple[int, int]
    resize: Literal["stretch", "shorter-center-crop"] = "shorter-center-crop"
    resize_shorter: int | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1 / 255
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal["RGB", "BGR", "L"] = "RGB"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(int(s) <= 0 for s in self.size):
            raise ConfigError(f"preprocess: size must be two positive ints (H, W), not {self.size}")
        if self.resize not in ("stretch", "shorter-center-crop"):
            raise ConfigError(
                f"preprocess: resize must be stretch or shorter-center-crop, not {self.resize!r}"
            )
        if self.resize_shorter is not None:
            if self.resize != "shorter-center-crop":
                raise ConfigError("preprocess: resize_shorter needs resize=shorter-center-crop")
            if self.resize_shorter < max(self.size):
                raise ConfigError(
                    f"preprocess: resize_shorter {self.resize_shorter} is smaller than the crop "
                    f"{self.size[0]}x{self.size[1]}"
                )
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"preprocess: layout must be NCHW or NHWC, not {self.layout!r}")
        if self.channels not in ("RGB", "BGR", "L"):
            raise ConfigError(f"preprocess: channels must be RGB, BGR or L, not {self.channels!r}")
        n = self.num_channels
        for key in ("mean", "std"):
            value = getattr(self, key)
            if len(value) == 1 and n > 1:
                object.__setattr__(self, key, tuple(value) * n)
            elif len(value) == 3 and n == 1 and len(set(value)) == 1:
                object.__setattr__(self, key, (value[0],))
            elif len(value) != n:
                raise ConfigError(
                    f"preprocess: {key} has {len(value)} values for {n} channel(s) ({self.channels})"
                )
        if any(s == 0 for s in self.std):
            raise ConfigError("preprocess: std must not be 0")
        try:
            dt = np.dtype(self.dtype)
        except TypeError as exc:
            raise ConfigError(f"preprocess: unknown dtype {self.dtype!r}") from exc
        if dt.kind in "iub" and (
            self.scale != 1 or any(self.mean) or any(s != 1 for s in self.std)
        ):
            raise ConfigError(
                f"preprocess: integer dtype {dt} keeps raw pixels; it needs scale=1, mean=0, std=1"
            )
        if dt.kind not in "iubf":
            raise ConfigError(f"preprocess: dtype must be numeric, not {dt}")

    @property
    def num_channels(self) -> int:
        return 1 if self.channels == "L" else 3

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        h, w = self.size
        c = self.num_channels
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)

    @classmethod
    def from_string(cls, text: str) -> ImagePreprocess:
        return parse_preprocess(text)

    def describe(self) -> str:
        h, w = self.size
        return f"{h}x{w} {self.resize}, {self.channels} {self.layout} {self.dtype}"

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        """One preprocessed sample (no batch axis) from an image file."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.load()
                img = img.convert("L" if self.channels == "L" else "RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
            raise DataError(f"{path}: cannot read the image ({exc})") from exc
        except Image.DecompressionBombError as exc:
            raise DataError(f"{path}: image too large ({exc})") from exc
        h, w = self.size
        if self.resize == "stretch":
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
        else:
            iw, ih = img.size
            if self.resize_shorter is not None:
                factor = self.resize_shorter / min(iw, ih)
            else:
                factor = max(w / iw, h / ih)
            nw, nh = max(w, round(iw * factor)), max(h, round(ih * factor))
            if (nw, nh) != (iw, ih):
                img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - w) // 2, (nh - h) // 2
            if (nw, nh) != (w, h):
                img = img.crop((left, top, left + w, top + h))
        pixels = np.asarray(img)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.channels == "BGR":
            pixels = pixels[:, :, ::-1]
        dt = np.dtype(self.dtype)
        if dt.kind in "iub":
            out = pixels.astype(dt)
        else:
            mean = np.asarray(self.mean, dtype=np.float64)
            std = np.asarray(self.std, dtype=np.float64)
            out = ((pixels.astype(np.float64) * self.scale - mean) / std).astype(dt)
        if self.layout == "NCHW":
            out = out.transpose(2, 0, 1)
        return np.ascontiguousarray(out)


_PREPROCESS_KEYS = (
    "size",
    "resize",
    "resize_shorter",
    "mean",
    "std",
    "scale",
    "layout",
    "channels",
    "dtype",
)


def _parse_number(text: str, key: str) -> float:
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise ConfigError(f"preprocess: {key}={text!r} is not a number") from exc


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("*", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError as exc:
        raise ConfigError(f"preprocess: size {text!r} is not HxW (e.g. 224x224)") from exc
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2:
        raise ConfigError(f"preprocess: size {text!r} is not HxW (e.g. 224x224)")
    return dims[0], dims[1]


def parse_preprocess(text: str) -> ImagePreprocess:
    """An `ImagePreprocess` from CLI text, comma-separated, the size first or as `size=`.

        "224x224,resize_shorter=256,mean=0.485|0.456|0.406,std=0.229|0.224|0.225,layout=NCHW"

    Lists use `|`; numbers may be fractions (`scale=1/255`). Unknown keys: ConfigError.
    """
    options: dict[str, Any] = {}
    for i, item in enumerate(p.strip() for p in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            if i == 0:
                options["size"] = _parse_size(item)
                continue
            raise ConfigError(f"preprocess: {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        key = key.replace("-", "_")
        if key not in _PREPROCESS_KEYS:
            raise ConfigError(
                f"preprocess: unknown key {key!r}; valid: {', '.join(_PREPROCESS_KEYS)}"
            )
        if key == "size":
            options[key] = _parse_size(value)
        elif key in ("mean", "std"):
            options[key] = tuple(_parse_number(v, key) for v in value.split("|"))
        elif key == "scale":
            options[key] = _parse_number(value, key)
        elif key == "resize_shorter":
            try:
                options[key] = int(value)
            except ValueError as exc:
                raise ConfigError(f"preprocess: resize_shorter={value!r} is not an int") from exc
        elif key in ("layout", "channels"):
            options[key] = value.upper()
        else:
            options[key] = value
    if "size" not in options:
        raise ConfigError(f"preprocess: {text!r} gives no size (e.g. 224x224)")
    return ImagePreprocess(**options)


# --------------------------------------------------------------------------- random data


def _random_shape(
    spec: _InputSpec, batch: int, input_shapes: InputShapes | None
) -> tuple[int, ...]:
    shape = _resolve_shape(spec, input_shapes)
    if shape is None:
        raise DataError(f"input '{spec.name}' has an unknown rank; give its shape in input_shapes")
    return tuple(
        d if isinstance(d, int) else (batch if axis == 0 else 1) for axis, d in enumerate(shape)
    )


def _random_array(spec: _InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dt = spec.dtype if spec.dtype is not None else np.dtype(np.float32)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dt.kind in "iu":
        return rng.integers(0, _RANDOM_INT_HIGH, size=shape).astype(dt)
    if _is_float(dt):
        return rng.standard_normal(size=shape, dtype=np.float32).astype(dt)
    raise DataError(f"input '{spec.name}' takes {dt}; random data cannot make it")


def _feedable(model: onnx.ModelProto) -> list[_InputSpec]:
    specs = [s for s in _model_inputs(model) if not s.optional]
    for s in specs:
        if s.kind != "tensor_type":
            raise DataError(
                f"input '{s.name}' is a {s.kind.replace('_type', '')}, which data readers "
                "do not support"
            )
    return specs


def random_feeds(
    model: onnx.ModelProto,
    *,
    batch_size: int = 1,
    seed: int = 0,
    input_shapes: InputShapes | None = None,
) -> dict[str, np.ndarray]:
    """One synthetic feed dict for smoke tests.

    Float inputs are standard normal N(0, 1); integer inputs are uniform in
    [0, 4); bool inputs are uniform. A symbolic or unknown axis 0 takes
    `batch_size`; other symbolic dims take `input_shapes[name]` where given, else 1.
    Fixed dims are kept. Initializer-backed inputs are not fed.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for spec in _feedable(model):
        out[spec.name] = _random_array(spec, _random_shape(spec, batch_size, input_shapes), rng)
    return out


# --------------------------------------------------------------------------- sources

# A chunk factory yields (origin, feed) with every array holding samples on axis 0.
_Chunks = Callable[[], Iterator[tuple[str, Feed]]]
# A batch factory makes final batches itself: (batch_size, limit) -> (count, feed).
_Batches = Callable[[int, int | None], Iterator[tuple[int, Feed]]]


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


def _fixed_batch(specs: Sequence[_InputSpec] | None) -> int | None:
    """k when every batched input fixes axis 0 to the same k, else None."""
    if specs is None:
        return None
    firsts = {s.shape[0] for s in specs if not s.optional and s.shape}
    if len(firsts) == 1:
        (first,) = firsts
        return first if isinstance(first, int) else None
    return None


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
        for origin, chunk in self._chunks():
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
                parts.append({k: v[start : start + take] for k, v in chunk.items()})
                pending += take
                start += take
                if pending == batch:
                    yield pending, self._join(parts)
                    emitted += pending
                    parts, pending = [], 0
            if limit is not None and emitted + pending >= limit:
                break
        if pending:
            if self._fixed:
                log.warning(
                    "dropping the last %d sample(s): the model fixes the batch to %d",
                    pending,
                    self._fixed,
                )
            else:
                yield pending, self._join(parts)

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
            _check_names(origin, chunk.keys(), specs.values())
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


def _shapes(feed: Feed) -> dict[str, tuple[int, ...]]:
    """Each array's shape after the sample axis: what must agree within a batch."""
    return {k: tuple(v.shape[1:]) for k, v in feed.items()}


def _feedable_or_optional(model: onnx.ModelProto) -> list[_InputSpec]:
    specs = _model_inputs(model)
    for s in specs:
        if s.kind != "tensor_type" and not s.optional:
            raise DataError(
                f"input '{s.name}' is a {s.kind.replace('_type', '')}, which data readers "
                "do not support"
            )
    return specs


def _check_names(origin: str, names: Iterable[str], specs: Iterable[_InputSpec]) -> None:
    names = list(names)
    specs = list(specs)
    known = {s.name for s in specs}
    extra = [n for n in names if n not in known]
    if extra:
        listed = ", ".join(s.name for s in specs if not s.optional)
        raise DataError(
            f"{origin}: array '{extra[0]}' is not an input of the model (inputs: {listed})"
        )
    missing = [s.name for s in specs if not s.optional and s.name not in names]
    if missing:
        have = ", ".join(names) or "none"
        raise DataError(f"{origin}: no array for input '{missing[0]}' (arrays: {have})")


def _check_shape(
    origin: str,
    name: str,
    shape: tuple[int, ...],
    spec: _InputSpec,
    input_shapes: InputShapes | None,
) -> None:
    """`shape` holds samples on axis 0; compare the rest with the input's fixed dims."""
    want = _resolve_shape(spec, input_shapes)
    if want is None:
        return
    if len(want) == 0:
        ok = len(shape) == 1
        shown: tuple[int | str | None, ...] = ("N",)
    else:
        ok = len(shape) == len(want) and all(
            not isinstance(w, int) or w == d for w, d in zip(want[1:], shape[1:])
        )
        shown = want
    if not ok:
        what = "a batch of scalars (N,)" if len(want) == 0 else _fmt_shape(shown)
        raise DataError(
            f"{origin}: array '{name}' has shape {_fmt_shape(shape)} but input '{name}' "
            f"expects {what}"
        )


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
    _check_names(origin, streams.keys(), specs)
    for name, stream in streams.items():
        spec = by_name[name]
        _check_shape(origin, name, stream.shape, spec, input_shapes)
        if spec.dtype is not None and (
            spec.dtype.kind in "iub" and (_is_float(stream.dtype) or stream.dtype.kind == "c")
        ):
            raise DataError(
                f"{origin}: array '{name}' is {stream.dtype} but input '{name}' takes "
                f"{spec.dtype}; refusing a lossy cast to integers"
            )


def _image_source(
    files: list[Path], folder: Path, preprocess: ImagePreprocess, specs: list[_InputSpec] | None
) -> tuple[_Chunks, str]:
    name = "input"
    if specs is not None:
        required = [s for s in specs if not s.optional]
        if len(required) != 1:
            listed = ", ".join(s.name for s in required)
            raise DataError(
                f"{folder}: image folders feed single-input models; the model has inputs {listed}"
            )
        spec = required[0]
        name = spec.name
        sample = preprocess.sample_shape
        want = spec.shape
        if want is not None and (
            len(want) != 4 or any(isinstance(w, int) and w != d for w, d in zip(want[1:], sample))
        ):
            raise DataError(
                f"{folder}: preprocessing gives images of shape {_fmt_shape(sample)} but input "
                f"'{name}' expects {_fmt_shape(want)}"
            )

    def chunks() -> Iterator[tuple[str, Feed]]:
        for f in files:
            yield str(f), {name: preprocess(f)[None]}

    return chunks, name


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
        return _random_source(model, batch_size, limit, input_shapes, seed)
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


def _random_source(
    model: onnx.ModelProto | None,
    batch_size: int,
    limit: int | None,
    input_shapes: InputShapes | None,
    seed: int,
) -> DataSource:
    if model is None:
        raise DataError("random data needs the model, to know its inputs")
    specs = _feedable(model)
    count = limit if limit is not None else _RANDOM_DEFAULT_COUNT
    for s in specs:
        _random_shape(s, 1, input_shapes)  # fail early on unknown ranks / bad input_shapes

    def batches(batch_size: int, limit: int | None) -> Iterator[tuple[int, Feed]]:
        rng = np.random.default_rng(seed)
        total = count if limit is None else min(count, limit)
        done = 0
        fixed = _fixed_batch(specs)
        if fixed:  # a model with a fixed batch of k needs at least one whole batch
            total = max(total, fixed)
        while done < total:
            n = min(batch_size, total - done)
            if fixed and n < fixed:
                break  # like real data: an incomplete batch of a fixed-batch model is dropped
            feed = {s.name: _random_array(s, _random_shape(s, n, input_shapes), rng) for s in specs}
            yield n, feed
            done += n

    log.warning(
        "using random (synthetic) data: %d sample(s), seed %d; it checks that the model runs, "
        "not its accuracy",
        count,
        seed,
    )
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
