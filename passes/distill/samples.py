"""Training samples, the teacher's values for them, and image augmentation.

`load_samples` reads every training sample into memory (`{input: (N, ...)}`, from the
pass's `data` or the Context's data; with `labels`, an `.npz` holding the inputs and an
integer label array). `Teacher` runs the teacher model in an ONNX Runtime session and
caches its outputs (and any feature tensors) for all samples when they fit.
`augment_images` is the random resized crop + horizontal flip for NCHW images. (The
held-out score is `verify.Evaluator`'s, in distill.py.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxslim_edge.errors import ConfigError, DataError, UnsupportedError, first_line

__all__ = ["Teacher", "augment_images", "fixed_batch", "load_samples", "run_batched"]


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size `model` fixes on axis 0 of its inputs, or None when it is symbolic."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if (
            vi.name not in inits
            and dims
            and dims[0].HasField("dim_value")
            and dims[0].dim_value > 0
        ):
            return int(dims[0].dim_value)
    return None


def run_batched(
    session: Any,
    names: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    batch: int,
    fixed: int | None,
) -> list[np.ndarray]:
    """`session.run(names, feeds)` in chunks along axis 0 (of `fixed` when the model fixes
    its batch: a short last chunk is padded by repeating samples, its extra outputs cut)."""
    n = next(iter(feeds.values())).shape[0]
    step = fixed or batch
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, n, step):
        chunk = {k: v[start : start + step] for k, v in feeds.items()}
        count = next(iter(chunk.values())).shape[0]
        if fixed and count < fixed:
            chunk = {k: np.resize(v, (fixed, *v.shape[1:])) for k, v in chunk.items()}
        for part, value in zip(parts, session.run(list(names), chunk)):
            part.append(np.asarray(value)[:count])
    return [np.concatenate(p) for p in parts]


def load_samples(
    cfg: Any, ctx: Any, student: onnx.ModelProto
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Every training sample in memory: {input: (N, ...)}, and labels (N,) if asked."""
    spec = cfg.data if cfg.data is not None else ctx.data
    if spec is None:
        raise DataError(
            "distill needs training data: give --calib DATA (or distill:data=PATH); "
            "unlabeled samples are enough"
        )
    names = [
        i.name
        for i in student.graph.input
        if i.name not in {t.name for t in student.graph.initializer}
    ]
    if cfg.labels is not None:
        return _load_labeled(spec, names, cfg)
    from onnxslim_edge.data import open_data

    source = open_data(
        spec, student, batch_size=256, limit=cfg.max_samples, input_shapes=ctx.input_shapes
    )
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    shapes: dict[str, tuple[int, ...]] = {}
    for feed in source:
        for k in names:
            if k not in feed:
                raise DataError(f"distill: the data gives no input '{k}'")
            arr = np.asarray(feed[k])
            if shapes.setdefault(k, arr.shape[1:]) != arr.shape[1:]:
                raise DataError(
                    f"distill: input '{k}' has samples of shapes {shapes[k]} and "
                    f"{arr.shape[1:]}; distill needs one shape per input"
                )
            parts[k].append(arr)
    if not parts[names[0]]:
        raise DataError("distill: the training data is empty")
    return {k: np.concatenate(v) for k, v in parts.items()}, None


def _load_labeled(
    spec: Any, names: Sequence[str], cfg: Any
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    if not isinstance(spec, (str, Path)) or not str(spec).endswith(".npz"):
        raise ConfigError("distill.labels needs the data as an .npz holding the labels array")
    try:
        with np.load(spec, allow_pickle=False) as data:
            missing = [k for k in (*names, cfg.labels) if k not in data.files]
            if missing:
                raise DataError(f"{spec}: has no array {missing[0]!r} (has {sorted(data.files)})")
            inputs = {k: data[k][: cfg.max_samples] for k in names}
            labels = data[cfg.labels][: cfg.max_samples]
    except (OSError, ValueError) as exc:
        raise DataError(f"{spec}: not a readable .npz ({first_line(exc)})") from exc
    n = len(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{spec}: labels {cfg.labels!r} must be integers of shape (N,)")
    if any(len(v) != n for v in inputs.values()):
        raise DataError(f"{spec}: labels and inputs hold different sample counts")
    return inputs, labels.astype(np.int64)


# --------------------------------------------------------------------------- the problem


class Teacher:
    """The teacher's values (outputs and feature tensors) for samples, cached if they fit."""

    def __init__(
        self,
        model: onnx.ModelProto,
        names: Sequence[str],
        inputs: Mapping[str, np.ndarray],
        cache_mb: int,
        threads: int | None,
    ) -> None:
        from onnxslim_edge.graph import exposing_session

        outputs = {o.name for o in model.graph.output}
        produced = {o for n in model.graph.node for o in n.output} | outputs
        unknown = [n for n in names if n not in produced]
        if unknown:
            raise ConfigError(f"distill.features: '{unknown[0]}' is no tensor of the teacher")
        self.session = exposing_session(model, names, threads=threads)
        self.fixed = fixed_batch(model)
        self.names = list(names)
        feedable = {i.name for i in self.session.get_inputs()}
        missing = [k for k in feedable if k not in inputs]
        if missing:
            raise UnsupportedError(
                f"teacher/student input mismatch: the teacher needs input '{missing[0]}', "
                "which the student does not take"
            )
        self.feed_names = sorted(feedable)
        self.cache: dict[str, np.ndarray] | None = None
        first = self.run({k: v[:1] for k, v in inputs.items()})
        n = next(iter(inputs.values())).shape[0]
        size = sum(v.nbytes for v in first.values()) * n
        if size <= cache_mb * 2**20:
            self.cache = self.run(inputs)

    def run(self, inputs: Mapping[str, np.ndarray], batch: int = 64) -> dict[str, np.ndarray]:
        feeds = {k: inputs[k] for k in self.feed_names}
        try:
            values = run_batched(self.session, self.names, feeds, batch, self.fixed)
        except Exception as exc:  # ORT raises its own types on bad feeds
            raise DataError(f"the teacher cannot run on the data: {first_line(exc)}") from exc
        return {k: np.asarray(v, dtype=np.float32) for k, v in zip(self.names, values)}

    def at(self, idx: np.ndarray, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The teacher's values for samples `idx` of `inputs` (cached, else computed)."""
        if self.cache is not None:
            return {k: v[idx] for k, v in self.cache.items()}
        return self.run({k: v[idx] for k, v in inputs.items()})


def augment_images(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random resized crop (scale 0.5-1, aspect 3/4-4/3, bilinear) and horizontal flip."""
    n, _, h, w = batch.shape
    out = np.empty_like(batch)
    for i in range(n):
        area = rng.uniform(0.5, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, max(1, round(np.sqrt(area / aspect)))))
        cw = int(min(w, max(1, round(np.sqrt(area * aspect)))))
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        ys = y0 + (np.arange(h) + 0.5) * ch / h - 0.5
        xs = x0 + (np.arange(w) + 0.5) * cw / w - 0.5
        ys = np.clip(ys, y0, y0 + ch - 1)
        xs = np.clip(xs, x0, x0 + cw - 1)
        yi, xi = np.floor(ys).astype(int), np.floor(xs).astype(int)
        yj, xj = np.minimum(yi + 1, h - 1), np.minimum(xi + 1, w - 1)
        fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]
        img = batch[i]
        top = img[:, yi][:, :, xi] * (1 - fx) + img[:, yi][:, :, xj] * fx
        bottom = img[:, yj][:, :, xi] * (1 - fx) + img[:, yj][:, :, xj] * fx
        crop = top * (1 - fy) + bottom * fy
        out[i] = crop[:, :, ::-1] if rng.random() < 0.5 else crop
    return out
