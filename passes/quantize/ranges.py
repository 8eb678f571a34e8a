"""Range narrowing: the part of a tensor's range its consumers can tell apart.

`useful_range(tensor, consumers)` is the interval [lo, hi] outside which every consumer
is flat (Relu/Clip bounds, HardSigmoid's 0 and 1, HardSwish and its decomposition
x * Clip(x + k, 0, hi) [/ c], an Add of a constant followed by such a consumer), so a
calibrated range can be clamped to it without changing anything downstream (exact).
Read-only graph inspection.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.graph import const_value

__all__ = ["useful_range"]


#: Deepest chain of `Add(x, constant)` nodes looked through by `useful_range`.
_RANGE_DEPTH = 4


def _scalar(tensor: Any) -> float | None:
    value = const_value(tensor) if tensor is not None and not tensor.is_empty() else None
    if value is None or np.size(value) != 1 or value.dtype.kind != "f":
        return None
    out = float(np.asarray(value).reshape(-1)[0])
    return out if math.isfinite(out) else None


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """[lo, hi] of a Relu/Clip with constant bounds (None: not one)."""
    if node.op == "Relu":
        return 0.0, math.inf
    if node.op != "Clip":
        return None
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return float(node.attrs.get("min", -math.inf)), float(node.attrs.get("max", math.inf))
    bounds = []
    for slot, default in ((1, -math.inf), (2, math.inf)):
        if len(node.inputs) <= slot or node.inputs[slot].is_empty():
            bounds.append(default)
            continue
        value = _scalar(node.inputs[slot])
        if value is None:
            return None
        bounds.append(value)
    return bounds[0], bounds[1]


def _hardswish_gate(mul: gs.Node, x: Any) -> float | None:
    """k when `mul` is x * g with g = Clip(x + k, 0, hi) (optionally scaled by a constant
    Mul/Div): the decomposed HardSwish, exactly 0 wherever x <= -k."""
    others = [t for t in mul.inputs if t is not x]
    if len(others) != 1 or len(mul.inputs) != 2 or not others[0].inputs:
        return None
    gate = others[0].inputs[0]
    if gate.op in ("Mul", "Div") and len(gate.inputs) == 2 and _scalar(gate.inputs[1]):
        if not gate.inputs[0].inputs:
            return None
        gate = gate.inputs[0].inputs[0]
    bounds = _clip_bounds(gate)
    if bounds is None or bounds[0] != 0.0 or not gate.inputs[0].inputs:
        return None
    add = gate.inputs[0].inputs[0]
    if add.op != "Add" or len(add.inputs) != 2 or x not in add.inputs:
        return None
    return _scalar(next(t for t in add.inputs if t is not x))


def _consumer_range(
    node: gs.Node, x: Any, depth: int, outputs: frozenset[str]
) -> tuple[float, float] | None:
    """The interval of `x` outside which `node`'s output no longer changes with it."""
    bounds = _clip_bounds(node)
    if bounds is not None:
        return bounds if node.inputs[0] is x else None
    if node.op == "HardSigmoid":
        alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
        if alpha <= 0:
            return None
        return -beta / alpha, (1.0 - beta) / alpha
    if node.op == "HardSwish":
        return -3.0, math.inf
    if node.op == "Mul":
        k = _hardswish_gate(node, x)
        return None if k is None else (-k, math.inf)
    if node.op == "Add" and len(node.inputs) == 2 and depth < _RANGE_DEPTH:
        k = _scalar(next((t for t in node.inputs if t is not x), None))
        if k is None or sum(t is x for t in node.inputs) != 1:
            return None
        out = node.outputs[0]
        if out.name in outputs:
            return None
        inner = useful_range(out, outputs=outputs, depth=depth + 1)
        return None if inner is None else (inner[0] - k, inner[1] - k)
    return None


def useful_range(
    tensor: Any,
    consumers: Iterable[gs.Node] | None = None,
    *,
    outputs: frozenset[str] = frozenset(),
    depth: int = 0,
) -> tuple[float, float] | None:
    """The interval [lo, hi] of `tensor` that its `consumers` (default: all of them) can
    tell apart: below lo and above hi each consumer's output is constant, so clamping
    what the consumers read to [lo, hi] changes nothing downstream. None when some
    consumer is not flat anywhere (or is not understood). `outputs`: names of the graph
    outputs (a constant-Add chain is not followed into one).

    Understood consumers: Relu and Clip (their bounds), HardSigmoid (where it reaches 0
    and 1), HardSwish and its decomposition x * Clip(x + k, 0, hi) [/ c] (0 below -k),
    and Add of a constant whose output has a useful range itself (shifted back)."""
    nodes = list(tensor.outputs) if consumers is None else list(consumers)
    if not nodes:
        return None
    lo, hi = math.inf, -math.inf
    for node in nodes:
        found = _consumer_range(node, tensor, depth, outputs)
        if found is None:
            return None
        lo, hi = min(lo, found[0]), max(hi, found[1])
    return (lo, hi) if lo < hi else None
