"""Synthetic (random) inputs for smoke tests, always labelled as such.

Owns `random_feeds` (one feed dict) and the batch factory behind `open_data("random")`:
float inputs standard normal, integer inputs uniform in [0, 4), bools uniform, shapes
from the model with symbolic dims filled from `input_shapes`, reproducible from a seed.
Random data checks that a model runs, never its accuracy; opening it logs a warning
naming the sample count and the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import onnx

from onnxslim_edge.data.specs import (
    Feed,
    InputShapes,
    _Batches,
    _feedable,
    _fixed_batch,
    _InputSpec,
    _is_float,
    _resolve_shape,
)
from onnxslim_edge.errors import DataError

__all__ = ["random_feeds"]

log = logging.getLogger(__name__)

#: Synthetic integer inputs are drawn uniformly from [0, _RANDOM_INT_HIGH).
_RANDOM_INT_HIGH = 4
_RANDOM_DEFAULT_COUNT = 8


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


def _random_batches(
    model: onnx.ModelProto | None,
    limit: int | None,
    input_shapes: InputShapes | None,
    seed: int,
) -> tuple[list[_InputSpec], int, _Batches]:
    """The inputs fed, the sample count (`limit`, default 8) and the batch factory."""
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
    return specs, count, batches
