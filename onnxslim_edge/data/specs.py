"""What a model asks of its data, and the checks every reader applies against it.

Owns the one place that reads a model's graph inputs (`_InputSpec`, `_model_inputs`),
symbolic dims resolved from `input_shapes`, the dtype rules (numeric only, never
pickled objects; casts to the input's dtype, refusing lossy float-to-int casts), the
name and shape checks of arrays against the inputs, the fixed batch a model may impose,
and the type aliases the readers share (`Feed`, chunk and batch factories). It knows
nothing about files: `npz`, `images` and `synthetic` build on it, `source` batches.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxslim_edge.errors import DataError

__all__: list[str] = []  # package-internal; the public API is onnxslim_edge.data

log = logging.getLogger("onnxslim_edge.data")

Feed = dict[str, np.ndarray]
InputShapes = Mapping[str, Sequence[int]]

# A chunk factory yields (origin, feed) with every array holding samples on axis 0.
_Chunks = Callable[[], Iterator[tuple[str, Feed]]]
# A batch factory makes final batches itself: (batch_size, limit) -> (count, feed).
_Batches = Callable[[int, int | None], Iterator[tuple[int, Feed]]]


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
    with np.errstate(over="ignore"):  # values beyond `want`'s range become inf: refused later
        return arr.astype(want)


def _feedable(model: onnx.ModelProto) -> list[_InputSpec]:
    specs = [s for s in _model_inputs(model) if not s.optional]
    for s in specs:
        if s.kind != "tensor_type":
            raise DataError(
                f"input '{s.name}' is a {s.kind.replace('_type', '')}, which data readers "
                "do not support"
            )
    return specs


def _feedable_or_optional(model: onnx.ModelProto) -> list[_InputSpec]:
    specs = _model_inputs(model)
    for s in specs:
        if s.kind != "tensor_type" and not s.optional:
            raise DataError(
                f"input '{s.name}' is a {s.kind.replace('_type', '')}, which data readers "
                "do not support"
            )
    return specs


def _check_names(origin: str, names: Iterable[str], specs: Iterable[_InputSpec]) -> list[str]:
    """The arrays of `names` that are not inputs of the model (to be left out of feeds,
    with a one-time note: a labelled test set such as the demo's `image` + `label` then
    serves as calibration data). DataError when an input has no array: an extra array
    is then named first, as it is likely the misnamed one."""
    names = list(names)
    specs = list(specs)
    known = {s.name for s in specs}
    extra = [n for n in names if n not in known]
    listed = ", ".join(s.name for s in specs if not s.optional)
    missing = [s.name for s in specs if not s.optional and s.name not in names]
    if missing and extra:
        raise DataError(
            f"{origin}: array '{extra[0]}' is not an input of the model (inputs: {listed})"
        )
    if missing:
        have = ", ".join(names) or "none"
        raise DataError(f"{origin}: no array for input '{missing[0]}' (arrays: {have})")
    if extra:
        _note_ignored(origin, tuple(extra), listed)
    return extra


@functools.cache
def _note_ignored(origin: str, extra: tuple[str, ...], inputs: str) -> None:
    """Say once per file (or feed origin) which arrays are left out."""
    arrays = ", ".join(f"'{n}'" for n in extra)
    log.warning(
        "%s: ignoring array(s) %s: not inputs of the model (inputs: %s)", origin, arrays, inputs
    )


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


def _fixed_batch(specs: Sequence[_InputSpec] | None) -> int | None:
    """k when every batched input fixes axis 0 to the same k, else None."""
    if specs is None:
        return None
    firsts = {s.shape[0] for s in specs if not s.optional and s.shape}
    if len(firsts) == 1:
        (first,) = firsts
        return first if isinstance(first, int) else None
    return None
