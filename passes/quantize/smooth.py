"""SmoothQuant-style activation smoothing before int8 (Xiao et al. 2023, "SmoothQuant").

    X -> MatMul(., W)  =>  X -> Mul(., 1/s) -> MatMul(., diag(s) W)

per input channel j of the activation X (its last axis), with
s_j = max|X_j|^alpha / max_n |W[j, n]|^(1 - alpha) (max|X_j| calibrated, the weight
maximum taken over every MatMul/Gemm that reads X). A transformer's LayerNorm output
has a few channels many times larger than the rest (all-MiniLM-L6-v2: the largest
channel maximum is 3-20x the median channel's); one symmetric int8 scale per tensor
(what TensorRT needs) then spends its grid on them. Dividing the channels by s moves
that spread into the weights, which are quantized per output channel and absorb it.
This is the rewrite NVIDIA ModelOpt applies for TensorRT int8 on transformers;
`quantize` uses alpha 0.75 by default (`smooth_alpha`).

Where the division goes:

- X = Mul(Y, c) -> [Add(., b)] with constant per-channel vectors c (and b) of the
  channel count (not scalars: GELU's 0.5 stays, so fusions matching it still do),
  read only by the smoothed layers (a decomposed LayerNorm's gamma/beta, a previous
  smoothing's Mul): c and b are divided by s, no node is added;
- X = LayerNormalization(Y, gamma, beta), read only by the smoothed layers: gamma and
  beta are divided by s;
- otherwise (a post-norm block's LayerNorm output also feeds the residual Add, a GELU
  output): a Mul by the constant 1/s is inserted in front of the smoothed layers only.

Either way the layers then read a tensor with a new name (`<name>_smoothed`), so a
calibration cache entry or range override of the unsmoothed tensor does not apply to
it (`quantize` leaves tensors with an override unsmoothed).

Exact up to float rounding: the float model's outputs do not change (tested). A
channel whose activation or weight maximum is 0 keeps s = 1; s is clipped to
[1e-4, 1e4]. Layers handled: MatMul with a 2-D constant weight as second input, Gemm
with transA = 0 and a constant B (also a Transpose of a constant, which the rewrite
folds); their first input float and not a constant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.graph import const_value, unique_name
from onnxslim_edge.passes.quantize.calibrate import free_batch

__all__ = ["channel_amax", "smooth_graph", "smooth_targets"]

log = logging.getLogger(__name__)

_MIN_SCALE, _MAX_SCALE = 1e-4, 1e4


def _constant(tensor: Any) -> np.ndarray | None:
    """`const_value(tensor)`, also through a Transpose of a constant (torch exports
    Linear weights so when constant folding is off)."""
    value = const_value(tensor)
    if value is not None or len(tensor.inputs) != 1 or tensor.inputs[0].op != "Transpose":
        return value
    inner = const_value(tensor.inputs[0].inputs[0])
    if inner is None:
        return None
    return np.transpose(inner, tensor.inputs[0].attrs.get("perm"))


def _weight(node: gs.Node) -> tuple[np.ndarray, int] | None:
    """(weight, input-channel axis) of a smoothable MatMul/Gemm, else None."""
    if len(node.inputs) < 2 or isinstance(node.inputs[0], gs.Constant):
        return None
    if const_value(node.inputs[0]) is not None:
        return None
    w = _constant(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype != np.float32:
        return None
    if node.op == "MatMul":
        return w, 0
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        return w, 1 if node.attrs.get("transB", 0) else 0
    return None


def smooth_targets(graph: gs.Graph, excluded: Iterable[str] = ()) -> dict[str, list[gs.Node]]:
    """Activation tensor name -> the smoothable MatMul/Gemm nodes reading it (first
    input), leaving out `excluded` node names."""
    skip = set(excluded)
    out: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        if node.op in ("MatMul", "Gemm") and node.name not in skip and _weight(node) is not None:
            out.setdefault(node.inputs[0].name, []).append(node)
    return out


def channel_amax(
    model: Any, tensors: Iterable[str], data: Iterable[Mapping[str, Any]]
) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor in `tensors` over the batches of
    `data` (ONNX Runtime, tensors exposed as outputs of a copy of `model`; run one
    sample at a time unless the model fixes its batch dimension)."""
    from onnxslim_edge.graph import exposing_session

    names = list(dict.fromkeys(tensors))
    session = exposing_session(model, names)
    split = free_batch(model)
    amax: dict[str, np.ndarray] = {}
    for feed in data:
        for part in _samples(feed, split):
            _update(amax, names, session.run(names, part))
    return amax


def _samples(feed: Mapping[str, Any], split: bool) -> Iterable[dict[str, Any]]:
    """`feed` one sample at a time (exposing every MatMul input of a batch at once can
    take gigabytes), or whole when the model fixes its batch or the arrays disagree."""
    arrays = {k: np.asarray(v) for k, v in feed.items()}
    sizes = {a.shape[0] if a.ndim else None for a in arrays.values()}
    if not split or len(sizes) != 1 or None in sizes:
        yield arrays
        return
    (n,) = sizes
    for i in range(n):
        yield {k: a[i : i + 1] for k, a in arrays.items()}


def _update(amax: dict[str, np.ndarray], names: list[str], values: list[Any]) -> None:
    """Fold one run's tensors into the per-channel maxima (non-finite values as 0)."""
    for name, value in zip(names, values):
        v = np.abs(np.asarray(value, dtype=np.float32))
        if not v.ndim:
            continue
        v = v.reshape(-1, v.shape[-1]).max(axis=0)
        v = np.where(np.isfinite(v), v, 0.0)
        amax[name] = v if name not in amax else np.maximum(amax[name], v)


def _scales(a: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(a, alpha) / np.power(w, 1.0 - alpha)
    s = np.where((a > 0) & (w > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, _MIN_SCALE, _MAX_SCALE).astype(np.float32)


def _per_channel(value: np.ndarray | None, k: int) -> bool:
    # (k,) only: a scalar (GELU's 0.5) stays as it is, so fusions matching it still do
    return value is not None and value.dtype == np.float32 and value.shape == (k,)


def _fold_target(graph: gs.Graph, tensor: gs.Variable, k: int) -> list[tuple[gs.Node, int]] | None:
    """The constant (node, slot) inputs that scale `tensor` per channel when dividing
    them by s divides `tensor` by s, or None."""
    if len(tensor.inputs) != 1 or tensor in graph.outputs:
        return None
    node = tensor.inputs[0]
    if node.op == "LayerNormalization":
        axis = node.attrs.get("axis", -1)
        slots = [i for i in (1, 2) if len(node.inputs) > i and node.inputs[i].name]
        if axis not in (-1, len(tensor.shape or [0]) - 1):
            return None
        if all(_per_channel(const_value(node.inputs[i]), k) for i in slots):
            return [(node, i) for i in slots]
        return None
    found: list[tuple[gs.Node, int]] = []
    if node.op == "Add":  # the beta of Mul(gamma) -> Add(beta)
        slot = next((i for i in (0, 1) if const_value(node.inputs[i]) is not None), None)
        if slot is None or not _per_channel(const_value(node.inputs[slot]), k):
            return None
        inner = node.inputs[1 - slot]
        if len(inner.inputs) != 1 or len(inner.outputs) != 1 or inner in graph.outputs:
            return None
        found.append((node, slot))
        node = inner.inputs[0]
    if node.op != "Mul":
        return None
    slot = next((i for i in (0, 1) if const_value(node.inputs[i]) is not None), None)
    if slot is None or not _per_channel(const_value(node.inputs[slot]), k):
        return None
    if const_value(node.inputs[1 - slot]) is not None:
        return None
    return [*found, (node, slot)]


def smooth_graph(
    graph: gs.Graph,
    amax: Mapping[str, np.ndarray],
    *,
    alpha: float = 0.75,
    excluded: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Smooth every activation in `smooth_targets(graph, excluded)` that `amax` has
    (in place). Returns one detail per smoothed tensor: its layers, how the division
    was placed ("folded" into constants or a "mul" node) and the activation's
    max/median channel amax before and after."""
    tensors = graph.tensors()
    details = []
    for name, layers in smooth_targets(graph, excluded).items():
        a = amax.get(name)
        tensor = tensors[name]
        weights = [_weight(n) for n in layers]
        if a is None or any(w is None for w in weights):
            continue
        k = a.shape[0]
        if any(w.shape[axis] != k for w, axis in weights):  # type: ignore[union-attr]
            continue
        wmax = np.max(
            [np.abs(w).max(axis=1 - axis) for w, axis in weights],  # type: ignore[misc]
            axis=0,
        )
        s = _scales(a.astype(np.float64), wmax.astype(np.float64), alpha)
        if np.allclose(s, 1.0, rtol=0, atol=1e-3):
            continue
        readers = {id(n) for n in layers}
        fold = None
        if all(id(n) in readers for n in tensor.outputs):
            fold = _fold_target(graph, tensor, k)
        if fold is not None:
            for node, slot in fold:
                c = const_value(node.inputs[slot]).astype(np.float32)
                node.inputs[slot] = gs.Constant(
                    unique_name(graph, f"{node.name}_smooth_c{slot}"),
                    (c / s).astype(np.float32),
                )
            # a new name: a calibration cache or override of the old values must not apply
            tensor.name = unique_name(graph, f"{name}_smoothed")
            how = "folded"
        else:
            inv = gs.Constant(
                unique_name(graph, f"{name}_smooth_inv"), (1.0 / s).astype(np.float32)
            )
            out = gs.Variable(unique_name(graph, f"{name}_smoothed"), dtype=tensor.dtype)
            out.shape = tensor.shape
            graph.nodes.append(
                gs.Node(
                    "Mul", unique_name(graph, f"{name}_smooth"), inputs=[tensor, inv], outputs=[out]
                )
            )
            for node in layers:
                node.inputs[0] = out
            how = "mul"
        for node, (w, axis) in zip(layers, weights):  # type: ignore[misc]
            shape = (k, 1) if axis == 0 else (1, k)
            node.inputs[1] = gs.Constant(
                unique_name(graph, f"{node.name}_smooth_w"),
                (w * s.reshape(shape)).astype(np.float32),
            )
        after = a / s
        details.append(
            {
                "tensor": name,
                "layers": [n.name for n in layers],
                "placed": how,
                "channels": int(k),
                "amax_max_over_median": [
                    round(float(a.max() / max(np.median(a), 1e-12)), 2),
                    round(float(after.max() / max(np.median(after), 1e-12)), 2),
                ],
            }
        )
    if details:
        graph.cleanup().toposort()
    log.info("smoothed %d activations (alpha %g)", len(details), alpha)
    return details
