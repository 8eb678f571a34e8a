"""Concrete input shapes for a model with symbolic dims, and where each came from.

`resolve_input_shapes` is the one place that decides the shapes every tool-initiated
run uses (synthetic check data, MAC counts, pruning budgets, calibration): explicit
shapes (`--input-shape`, `Context.input_shapes`) beat the data's shapes, which beat the
model's metadata (Ultralytics `imgsz`/`batch`, and `image_size`/`img_size`/
`input_size`/`input_shape` keys other exporters write), which beat a candidate ladder
validated by running the *original* model once per candidate with ONNX Runtime, in the
sandbox of tool-initiated runs (`onnxslim_edge.sandbox`: a child process with time and
memory budgets; the ladder as a whole gets `DEFAULT_BUDGET_S`): image-like H/W (an NCHW/NHWC input with 1, 3 or 4 channels) 224,
256, 320, 416, 512, 640 rounded up to the stride the graph implies (the product of its
stride > 1 Conv/pool strides, at most 64); sequence axes 16, 128, 512; the batch 1.
What the ladder cannot validate falls back to 1 (`default`). Each input's origin is one
of `static`, `explicit`, `data`, `metadata`, `ladder`, `default`; an assumed shape
(`ladder`, or `default` for more than the batch axis) is reported as a warning.
"""

from __future__ import annotations

import ast
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxslim_edge.errors import first_line

__all__ = ["ORIGINS", "ResolvedShapes", "resolve_input_shapes"]

log = logging.getLogger(__name__)

#: Where a resolved shape came from, strongest first.
ORIGINS = ("static", "explicit", "data", "metadata", "ladder", "default")

_IMAGE_SIZES = (224, 256, 320, 416, 512, 640)
_SEQUENCE_LENGTHS = (16, 128, 512)
_METADATA_SIZE_KEYS = ("imgsz", "image_size", "img_size", "input_size", "input_shape")
_MAX_STRIDE = 64
#: Seconds the ladder may spend running the original model (checked between runs).
DEFAULT_BUDGET_S = 10.0


@dataclass(frozen=True)
class ResolvedShapes:
    """Concrete shapes of every fed input, each input's origin, and the warnings."""

    shapes: Mapping[str, tuple[int, ...]]
    origins: Mapping[str, str]
    warnings: tuple[str, ...] = field(default=())

    @property
    def assumed(self) -> bool:
        """Some shape was guessed (ladder or default), not given or declared."""
        return any(o in ("ladder", "default") for o in self.origins.values())

    @property
    def informative(self) -> bool:
        """Some shape says more than the model's symbolic dims read as 1 (MAC counts
        and shape inference at these shapes differ from the plain ones)."""
        return any(o in ("explicit", "data", "metadata", "ladder") for o in self.origins.values())

    @property
    def symbolic(self) -> bool:
        """Some input has a dim the model does not fix."""
        return any(o != "static" for o in self.origins.values())

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-ready: {input: {"shape": [...], "origin": "..."}}."""
        return {n: {"shape": list(s), "origin": self.origins[n]} for n, s in self.shapes.items()}

    def describe(self) -> str:
        return ", ".join(f"{n} {tuple(s)} ({self.origins[n]})" for n, s in self.shapes.items())


# --------------------------------------------------------------------------- model facts


def _declared_inputs(model: onnx.ModelProto) -> list[tuple[str, Any, tuple | None]]:
    """(name, numpy dtype or None, dims or None for unknown rank) of the inputs fed."""
    from onnxslim_edge.data.specs import _model_inputs

    return [
        (s.name, s.dtype, s.shape)
        for s in _model_inputs(model)
        if not s.optional and s.kind == "tensor_type"
    ]


def _image_axes(dims: tuple) -> tuple[int, int] | None:
    """(H axis, W axis) of a rank-4 image-like input (NCHW or NHWC, 1/3/4 channels)."""
    if len(dims) != 4:
        return None
    if dims[1] in (1, 3, 4) and not (isinstance(dims[3], int) and dims[3] in (1, 3, 4)):
        return 2, 3
    if dims[3] in (1, 3, 4):
        return 1, 2
    if dims[1] in (1, 3, 4):
        return 2, 3
    return None


def _is_float(dtype: Any) -> bool:
    return dtype is not None and (dtype.kind == "f" or dtype.name == "bfloat16")


def _sequence_axes(dims: tuple, dtype: Any) -> list[int]:
    """Symbolic axes after the batch that hold a sequence: every non-batch axis of an
    integer (token/id) input, the middle axis of a float (batch, time, features) input,
    the last axis of a float (batch, channels, time) input whose channels are fixed
    (Conv1d stacks, mel spectrograms), and the last axis of a rank-2 float input
    (batch, samples: audio)."""
    axes = [a for a, d in enumerate(dims) if a > 0 and not isinstance(d, int)]
    if not _is_float(dtype):
        return axes
    if len(dims) == 3:
        if 1 not in axes and isinstance(dims[1], int) and 2 in axes:
            return [2]
        return [a for a in axes if a == 1]
    if len(dims) == 2:
        return [a for a in axes if a == 1]
    return []


def _graph_stride(model: onnx.ModelProto) -> int:
    """Product of the spatial strides > 1 of Conv/pool nodes (at most 64), else 1."""
    stride = 1
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool"):
            continue
        for a in node.attribute:
            if a.name == "strides":
                s = max(a.ints, default=1)
                if s > 1:
                    stride *= int(s)
    return max(1, min(stride, _MAX_STRIDE))


def _parse_size(text: str) -> tuple[int, int] | None:
    """`[320, 320]`, `(320, 320)`, `320`, `320x320` or `1,3,320,320` -> (H, W)."""
    text = text.strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        parts = text.lower().replace("x", ",").split(",")
        try:
            value = [int(p) for p in parts if p.strip()]
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    ints = [int(v) for v in value]
    if len(ints) == 1:
        ints = ints * 2
    h, w = ints[-2], ints[-1]
    if len(ints) == 4 and ints[-1] in (1, 3, 4) and ints[1] not in (1, 3, 4):
        h, w = ints[1], ints[2]  # NHWC
    if h < 1 or w < 1 or h > 1 << 16 or w > 1 << 16:
        return None
    return h, w


def _metadata(model: onnx.ModelProto) -> tuple[tuple[int, int] | None, int | None, str | None]:
    """(image H/W, batch, the key it came from) from the model's metadata_props."""
    props = {p.key.lower(): p.value for p in model.metadata_props}
    size, key = None, None
    for k in _METADATA_SIZE_KEYS:
        if k in props:
            size = _parse_size(props[k])
            if size is not None:
                key = k
                break
    batch = None
    if "batch" in props:
        try:
            batch = int(props["batch"])
        except ValueError:
            batch = None
        if batch is not None and batch < 1:
            batch = None
    return size, batch, key


# --------------------------------------------------------------------------- validation


def _runs(
    model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], time_s: float
) -> str | None:
    """None when ONNX Runtime runs `model` on placeholder inputs of `shapes` within
    `time_s` seconds and the sandbox's memory budget (`onnxslim_edge.sandbox`: a child
    process, optimizations off), else the reason."""
    from onnxslim_edge.sandbox import BudgetExceeded, RunFailed, output_shapes

    types = {name: dtype for name, dtype, _ in _declared_inputs(model)}
    feeds = {}
    for name, shape in shapes.items():
        dtype = types.get(name)
        if dtype is None or dtype.kind not in "biuf":
            return f"input '{name}' has a type placeholder data cannot make"
        fill = 0.5 if dtype.kind == "f" else 0
        feeds[name] = np.full(shape, fill, dtype=dtype)
    try:
        output_shapes(model, [o.name for o in model.graph.output], feeds, time_s=time_s)
    except BudgetExceeded as exc:
        return f"run stopped: {exc}"
    except RunFailed as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- resolution


def _data_shapes(data: Any, names: set[str]) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes (axis 0 is the sample axis) of the data's first batch."""
    if data is None:
        return {}
    try:
        first = next(iter(data))
    except Exception as exc:  # unreadable data is reported by whoever reads it for real
        log.debug("no shapes from the data: %s", first_line(exc))
        return {}
    return {k: tuple(int(d) for d in np.shape(v)) for k, v in first.items() if k in names}


def resolve_input_shapes(
    model: onnx.ModelProto,
    explicit: Mapping[str, Sequence[int]] | None = None,
    data: Any = None,
    *,
    validate: bool = True,
    budget_s: float = DEFAULT_BUDGET_S,
) -> ResolvedShapes:
    """The shapes to run `model` at, by the precedence in the module docstring.

    `explicit`: shapes the caller gave (validated later by whoever uses them). `data`: a
    re-iterable of feed dicts (a `DataSource`), or a callable returning one (called only
    when some input is still open); its first batch's shapes count, batch axis as given. `validate=False` takes the first ladder candidate unrun.
    Inputs of unknown rank are left out unless given. Never changes `model`.
    """
    inputs = _declared_inputs(model)
    names = {n for n, _, _ in inputs}
    explicit = {k: tuple(int(d) for d in v) for k, v in (explicit or {}).items()}
    needs = any(
        n not in explicit and (d is None or not all(isinstance(x, int) for x in d))
        for n, _, d in inputs
    )
    from_data = _data_shapes(data() if callable(data) else data, names) if needs else {}
    size, meta_batch, _ = _metadata(model)
    shapes: dict[str, tuple[int, ...]] = {}
    origins: dict[str, str] = {}
    symbols: dict[str, int] = {}  # dim_param -> value, shared across inputs
    open_inputs: list[tuple[str, Any, tuple]] = []
    for name, elem, dims in inputs:
        if name in explicit:
            shapes[name], origins[name] = explicit[name], "explicit"
        elif name in from_data and (dims is None or len(from_data[name]) == len(dims)):
            shapes[name], origins[name] = from_data[name], "data"
        elif dims is None:
            continue
        elif all(isinstance(d, int) for d in dims):
            shapes[name], origins[name] = tuple(dims), "static"  # type: ignore[arg-type]
        else:
            open_inputs.append((name, elem, dims))
            continue
        for d, g in zip(dims or (), shapes[name]):
            if isinstance(d, str):
                symbols.setdefault(d, g)

    # Per open input: dims filled from shared symbols and metadata; the rest are slots
    # the ladder tries (kind "image", "sequence") or defaults to 1 (batch and other axes).
    slots: list[tuple[str, int, str]] = []  # (input, axis, kind)
    partial: dict[str, list[int | None]] = {}
    meta_used: set[str] = set()
    for name, elem, dims in open_inputs:
        filled: list[int | None] = []
        image = _image_axes(dims)
        sequence = _sequence_axes(dims, elem)
        for axis, d in enumerate(dims):
            if isinstance(d, int):
                filled.append(d)
            elif isinstance(d, str) and d in symbols:
                filled.append(symbols[d])
            elif image is not None and axis in image and size is not None:
                filled.append(size[image.index(axis)])
                meta_used.add(name)
            elif axis == 0 and meta_batch is not None and size is not None and image is not None:
                filled.append(meta_batch)
            else:
                filled.append(None)
                if image is not None and axis in image:
                    slots.append((name, axis, "image"))
                elif axis in sequence:
                    slots.append((name, axis, "sequence"))
        partial[name] = filled

    warnings: list[str] = []
    ladder_ok: bool | None = None
    if open_inputs:
        stride = _graph_stride(model)
        image_sizes = tuple(dict.fromkeys(math.ceil(s / stride) * stride for s in _IMAGE_SIZES))
        kinds = {kind for _, _, kind in slots}
        steps = max(len(image_sizes) if "image" in kinds else 1, 1)
        if "sequence" in kinds:
            steps = max(steps, len(_SEQUENCE_LENGTHS))
        if not slots:
            steps = 1
        deadline = time.monotonic() + budget_s
        reasons: list[str] = []
        chosen: dict[str, tuple[int, ...]] | None = None
        for step in range(steps):
            candidate = _fill(open_inputs, partial, slots, symbols, step, image_sizes)
            trial = {**shapes, **candidate}
            if not slots or not validate:  # nothing to try: batch / other dims take 1
                chosen = candidate
                break
            left = deadline - time.monotonic()
            reason = _runs(model, trial, max(left, 1.0))
            if reason is None:
                chosen, ladder_ok = candidate, True
                break
            reasons.append(f"{_fmt(candidate)}: {reason}")
            if reason.startswith("run stopped") or time.monotonic() > deadline:
                reasons.append(f"time budget of {budget_s:g} s spent")
                break
        if chosen is None:
            ladder_ok = False
            chosen = _fill(open_inputs, partial, [], symbols, 0, image_sizes, default=1)
            warnings.append(
                "no candidate input shape ran the model ("
                + "; ".join(reasons[:3])
                + "); using 1 for its symbolic dims: give --input-shape"
            )
        slot_inputs = {n for n, _, _ in slots}
        for name, _, _ in open_inputs:
            shapes[name] = chosen[name]
            if name in meta_used:
                origins[name] = "metadata"
            elif name in slot_inputs and (ladder_ok or not validate):
                origins[name] = "ladder"
            else:
                origins[name] = "default"
    order = [n for n, _, _ in inputs if n in shapes] + [n for n in shapes if n not in names]
    result = ResolvedShapes(
        {n: shapes[n] for n in order},
        {n: origins.get(n, "explicit") for n in order},
        tuple(warnings),
    )
    # Batch 1 is the convention for per-sample counts: only other guesses are warnings.
    guessed = {
        n: s
        for n, s in result.shapes.items()
        if result.origins[n] == "ladder"
        or (result.origins[n] == "default" and not _only_batch_open(inputs, n))
    }
    if guessed:
        result = ResolvedShapes(
            result.shapes,
            result.origins,
            (
                *result.warnings,
                f"assumed input shape(s) {_fmt(guessed, result.origins)}; "
                "give --input-shape NAME=D0,D1,.. (or Context.input_shapes) to choose",
            ),
        )
    return result


def _only_batch_open(inputs: list[tuple[str, Any, tuple | None]], name: str) -> bool:
    for n, _, dims in inputs:
        if n == name:
            return dims is not None and all(isinstance(d, int) for d in dims[1:])
    return False


def _fill(
    open_inputs: list[tuple[str, Any, tuple]],
    partial: Mapping[str, list[int | None]],
    slots: list[tuple[str, int, str]],
    symbols: Mapping[str, int],
    step: int,
    image_sizes: Sequence[int],
    default: int = 1,
) -> dict[str, tuple[int, ...]]:
    """Shapes of the open inputs at ladder `step`; a symbolic dim name takes one value
    across inputs."""
    kinds = {(n, a): k for n, a, k in slots}
    seen = dict(symbols)
    out = {}
    for name, _, dims in open_inputs:
        shape = []
        for axis, (d, f) in enumerate(zip(dims, partial[name])):
            if f is not None:
                shape.append(f)
                continue
            if isinstance(d, str) and d in seen:
                shape.append(seen[d])
                continue
            kind = kinds.get((name, axis))
            if kind == "image":
                value = image_sizes[min(step, len(image_sizes) - 1)]
            elif kind == "sequence":
                value = _SEQUENCE_LENGTHS[min(step, len(_SEQUENCE_LENGTHS) - 1)]
            else:
                value = default
            if isinstance(d, str):
                seen[d] = value
            shape.append(value)
        out[name] = tuple(shape)
    return out


def _fmt(shapes: Mapping[str, tuple[int, ...]], origins: Mapping[str, str] | None = None) -> str:
    parts = []
    for n, s in shapes.items():
        o = f" ({origins[n]})" if origins else ""
        parts.append(f"{n}={'x'.join(map(str, s))}{o}")
    return ", ".join(parts)
