"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1).

    Conv1(x, W1, b1) -> act -> Conv2(., W2)  =>  Conv1(x, W1/s, b1/s) -> act' -> Conv2(., W2*s)

per channel i of the tensor between the layers (output channel i of Conv1, input
channel i of Conv2), with s_i = sqrt(r1_i / r2_i), r1_i = max|W1[i]| and r2_i the
largest |w| of W2 that reads channel i (grouped and depthwise Conv2 included). Then
both layers' channel ranges become sqrt(r1_i * r2_i), so per-tensor int8 quantization
of either weight wastes less of its range on a few large channels. Chains of pairs
that share a layer (Conv -> depthwise Conv -> Conv) are equalized together by
iterating over the pairs until the scales stop changing.

The rewrite is exact because every activation allowed between the layers commutes
with a positive per-channel scale: f(z / s) = f(z) / s for Relu, LeakyRelu, PRelu and
identity. Clip(lo, hi) (ReLU6 is Clip(0, 6)) needs its bounds scaled per channel too,
which Clip's scalar bounds cannot express; `clip` chooses what happens:

- "exact" (default): Clip(lo, hi) becomes Max(x, lo/s) -> Min(., hi/s) with per-channel
  bound vectors (Relu instead of Max when lo is 0). Exact; adds one node per Clip.
  Min/Max nodes with constant per-channel bounds (this pass's own output) are scaled
  the same way, so running the pass again keeps working.
- "relu": Clip(0, hi) becomes Relu, as in Nagel et al.'s MobileNetV2 experiments. This
  changes the float model wherever activations exceed hi, so the pass is then not
  lossless (the Pipeline does not check its outputs); other Clips are handled exactly.
- "skip": chains with a Clip are left alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.graph import FLOAT_DTYPES, const_value, sole_consumer, unique_name
from onnxslim_edge.pipeline import Context, Pass, PassReport

__all__ = ["Equalize", "EqualizeConfig", "channel_ranges"]

log = logging.getLogger(__name__)

#: Activations f with f(z / s) == f(z) / s for s > 0 (no parameters to rescale).
HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu"})

#: Elementwise bounds whose constant operand is rescaled with the channel.
BOUNDS = frozenset({"Clip", "Min", "Max"})

#: At most this many activation nodes between the two layers.
MAX_CHAIN = 4


@dataclass(frozen=True, kw_only=True)
class EqualizeConfig:
    """Options of the `equalize` pass.

    - `iterations`: sweeps over all pairs at most (stops earlier when every step scale
      is within 1e-6 of 1).
    - `min_scale`, `max_scale`: clamps on each channel's total scale s.
    - `tolerance`: a pair is rewritten only if some channel's scale differs from 1 by
      more than this (so a second run on an equalized model changes nothing).
    - `include_depthwise`: also equalize pairs where a layer is a depthwise Conv.
    - `clip`: a Clip (ReLU6) between the layers: "exact" scales its bounds per channel
      (exact), "relu" replaces Clip(0, hi) by Relu (lossy), "skip" leaves the chain alone.
    """

    iterations: int = 50
    min_scale: float = 1e-3
    max_scale: float = 1e3
    tolerance: float = 1e-2
    include_depthwise: bool = True
    clip: Literal["exact", "relu", "skip"] = "exact"

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int):
            raise ConfigError(f"equalize.iterations: expected an integer, got {self.iterations!r}")
        if self.iterations < 1:
            raise ConfigError(f"equalize.iterations: must be >= 1, got {self.iterations}")
        for key in ("min_scale", "max_scale", "tolerance"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"equalize.{key}: expected a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"equalize.{key}: must be a positive number, got {value!r}")
        if not self.min_scale <= 1.0 <= self.max_scale:
            raise ConfigError(
                f"equalize: need min_scale <= 1 <= max_scale, got {self.min_scale}, "
                f"{self.max_scale}"
            )
        if not isinstance(self.include_depthwise, bool):
            raise ConfigError(
                f"equalize.include_depthwise: expected true/false, got {self.include_depthwise!r}"
            )
        if self.clip not in ("exact", "relu", "skip"):
            raise ConfigError(f"equalize.clip: expected exact, relu or skip, got {self.clip!r}")


class _Skip(Exception):
    """A layer that starts no equalizable pair; the message is the reason."""


@dataclass
class _Bound:
    """A Clip/Min/Max between the layers: per-channel lower and upper bounds (or None)."""

    node: Any
    lo: np.ndarray | None
    hi: np.ndarray | None


@dataclass
class _Pair:
    first: Any  # Conv producing the channels
    second: Any  # Conv reading them
    acts: list[Any]
    bounds: list[_Bound]
    scale: np.ndarray = field(default_factory=lambda: np.ones(0))


def channel_ranges(weight: np.ndarray, group: int = 1, *, axis: str = "out") -> np.ndarray:
    """max |w| per output channel (`axis="out"`) or per input channel (`"in"`) of a Conv
    weight (out, in / group, *kernel)."""
    w = np.abs(np.asarray(weight, dtype=np.float64))
    if axis == "out":
        return w.reshape(w.shape[0], -1).max(axis=1)
    cout, cin_g = w.shape[0], w.shape[1]
    grouped = w.reshape(group, cout // group, cin_g, -1)
    return grouped.max(axis=(1, 3)).reshape(-1)


def _ratio(r: np.ndarray) -> float:
    lo = float(r.min()) if r.size else 0.0
    return float(r.max()) / lo if lo > 0 else math.inf


class Equalize(Pass):
    """Conv -> [Relu | LeakyRelu | PRelu | Clip | Min/Max by constants | nothing] -> Conv
    => the same chain with W1, b1 divided and W2 multiplied by per-channel scales that
    equalize the two layers' channel ranges. Exact for Relu/LeakyRelu/PRelu/identity and,
    with `clip="exact"` (default), for Clip (ReLU6) too by per-channel Min/Max bounds;
    `clip="relu"` replaces Clip(0, hi) by Relu and is lossy.

    Scope: both layers Conv with constant float weights read by no other node, a
    constant (or no) bias on the first; the tensors between have one consumer each and
    are no graph outputs; channel counts match. A BatchNormalization between the layers
    is not folded here (run `fold-batchnorm` first). Everything else is skipped with a
    reason. Idempotent up to `tolerance`: a second run finds scales within it of 1 and
    changes nothing.

    Counters: `pairs_equalized`, `clips_rewritten` (to Min/Max), `clips_to_relu`.
    Details per pair: the layers, channels, activations, max/min channel-range ratios of
    W1 (out channels) and W2 (in channels) before and after, the scales' extremes.
    """

    name: ClassVar[str] = "equalize"
    Config: ClassVar[type] = EqualizeConfig
    lossless: ClassVar[bool] = True

    def __init__(self, config: Any = None, /, **options: Any) -> None:
        super().__init__(config, **options)
        # Replacing ReLU6 by Relu changes the float model: the Pipeline must not check it.
        self.lossless = self.config.clip != "relu"  # type: ignore[misc]

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        report = self.new_report()
        for key in ("pairs_equalized", "clips_rewritten", "clips_to_relu"):
            report.count(key, 0)
        graph.toposort()
        pairs: list[_Pair] = []
        for node in graph.nodes:
            if node.op != "Conv":
                continue
            try:
                pairs.append(self._match(graph, node))
            except _Skip as skip:
                report.skip(node, str(skip))
        if not pairs:
            return report
        weights: dict[int, np.ndarray] = {}
        for p in pairs:
            for layer in (p.first, p.second):
                weights.setdefault(id(layer), const_value(layer.inputs[1]).astype(np.float64))
        before = {k: v.copy() for k, v in weights.items()}
        self._solve(pairs, weights)
        changed = [p for p in pairs if np.max(np.abs(p.scale - 1.0)) > self.config.tolerance]
        for p in pairs:
            if p not in changed:
                report.skip(
                    p.first,
                    f"already equalized with {p.second.name} (scales within "
                    f"{self.config.tolerance} of 1)",
                )
        if not changed:
            return report
        # Apply each changed pair's total scale once to the original weights.
        new = {k: v.copy() for k, v in before.items()}
        for p in changed:
            s = p.scale
            g2 = int(p.second.attrs.get("group", 1))
            w1 = new[id(p.first)]
            new[id(p.first)] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
            new[id(p.second)] = _scale_in(new[id(p.second)], s, g2)
        for p in changed:
            self._rewrite(graph, p, new, report)
            g2 = int(p.second.attrs.get("group", 1))
            r1b = channel_ranges(before[id(p.first)])
            r2b = channel_ranges(before[id(p.second)], g2, axis="in")
            r1a = channel_ranges(new[id(p.first)])
            r2a = channel_ranges(new[id(p.second)], g2, axis="in")
            report.count("pairs_equalized")
            report.detail(
                first=p.first.name,
                second=p.second.name,
                channels=int(p.scale.size),
                activations=[a.op for a in p.acts],
                depthwise=_is_depthwise(p.first) or _is_depthwise(p.second),
                range_ratio_w1_before=_ratio(r1b),
                range_ratio_w1_after=_ratio(r1a),
                range_ratio_w2_before=_ratio(r2b),
                range_ratio_w2_after=_ratio(r2a),
                scale_min=float(p.scale.min()),
                scale_max=float(p.scale.max()),
            )
        layers = {id(n): n for p in changed for n in (p.first, p.second)}
        for layer_id, layer in layers.items():
            dtype = const_value(layer.inputs[1]).dtype
            layer.inputs[1].values = np.ascontiguousarray(new[layer_id].astype(dtype))
        return report

    # ------------------------------------------------------------------ matching

    def _match(self, graph: gs.Graph, conv: Any) -> _Pair:
        self._check_layer(conv, first=True)
        t = conv.outputs[0]
        acts: list[Any] = []
        bounds: list[_Bound] = []
        channels = int(const_value(conv.inputs[1]).shape[0])
        rank = const_value(conv.inputs[1]).ndim
        while True:
            consumer = sole_consumer(graph, t)
            if consumer is None:
                raise _Skip(
                    "output is a graph output or has several consumers"
                    if not acts
                    else f"output of {acts[-1].op} is a graph output or has several consumers"
                )
            if consumer.op == "Conv":
                if consumer.inputs[0] is not t:
                    raise _Skip(f"output feeds {consumer.name} as a weight, not as data")
                break
            if consumer.op == "BatchNormalization":
                raise _Skip("a BatchNormalization follows: run fold-batchnorm first")
            if len(acts) >= MAX_CHAIN:
                raise _Skip(f"more than {MAX_CHAIN} activations before the next layer")
            if len([o for o in consumer.outputs if not o.is_empty()]) != 1:
                raise _Skip(f"{consumer.op} has several outputs")
            if consumer.op in HOMOGENEOUS:
                if consumer.op == "PRelu" and consumer.inputs[0] is not t:
                    raise _Skip("PRelu reads the layer's output as its slope")
            elif consumer.op in BOUNDS:
                bounds.append(self._bound(consumer, t, channels, rank))
            else:
                raise _Skip(f"followed by {consumer.op}, not a positively homogeneous activation")
            acts.append(consumer)
            t = consumer.outputs[0]
        second = consumer
        self._check_layer(second, first=False)
        w2 = const_value(second.inputs[1])
        group = int(second.attrs.get("group", 1))
        cin = int(w2.shape[1]) * group
        if cin != channels:
            raise _Skip(f"{conv.name} makes {channels} channels, {second.name} reads {cin}")
        if w2.dtype != const_value(conv.inputs[1]).dtype:
            raise _Skip(f"weights of {conv.name} and {second.name} differ in dtype")
        if not self.config.include_depthwise and (_is_depthwise(conv) or _is_depthwise(second)):
            raise _Skip("depthwise pair and include_depthwise is false")
        if bounds and self.config.clip == "skip":
            raise _Skip("a Clip/Min/Max sits between the layers and clip is 'skip'")
        return _Pair(conv, second, acts, bounds, np.ones(channels))

    def _check_layer(self, conv: Any, *, first: bool) -> None:
        where = "" if first else f"next layer {conv.name}: "
        if len(conv.inputs) < 2 or not isinstance(conv.inputs[1], gs.Constant):
            raise _Skip(where + "weight is not an initializer")
        w = const_value(conv.inputs[1])
        if w.dtype not in FLOAT_DTYPES or w.ndim < 3:
            raise _Skip(where + f"weight is not a float tensor of rank >= 3 ({w.dtype})")
        if len(conv.inputs[1].outputs) != 1 or sum(t is conv.inputs[1] for t in conv.inputs) != 1:
            raise _Skip(where + "weight is shared with another node")
        if len(conv.inputs) > 2 and not conv.inputs[2].is_empty():
            b = conv.inputs[2]
            if first and not isinstance(b, gs.Constant):
                raise _Skip("bias is not an initializer")
            if first and len(b.outputs) != 1:
                raise _Skip("bias is shared with another node")
        group = int(conv.attrs.get("group", 1))
        if w.shape[0] % group:
            raise _Skip(where + "output channels are not divisible by group")

    def _bound(self, node: Any, t: Any, channels: int, rank: int) -> _Bound:
        """Lower/upper bounds of a Clip/Min/Max as per-channel vectors, or _Skip."""
        if node.op == "Clip":
            if node.inputs[0] is not t:
                raise _Skip("Clip reads the layer's output as a bound")
            if "min" in node.attrs or "max" in node.attrs:  # opset < 11
                lo = node.attrs.get("min")
                hi = node.attrs.get("max")
                vals = [None if v is None else np.array(v, np.float64) for v in (lo, hi)]
            else:
                vals = []
                for i in (1, 2):
                    if len(node.inputs) <= i or node.inputs[i].is_empty():
                        vals.append(None)
                        continue
                    v = _const_through_cast(node.inputs[i])
                    if v is None:
                        raise _Skip("Clip bounds are not constants")
                    vals.append(np.asarray(v, np.float64))
            lo, hi = (None if v is None else np.full(channels, float(v)) for v in vals)
            return _Bound(node, lo, hi)
        if len(node.inputs) != 2:
            raise _Skip(f"{node.op} has {len(node.inputs)} inputs")
        other = node.inputs[1] if node.inputs[0] is t else node.inputs[0]
        value = _const_through_cast(other)
        if value is None:
            raise _Skip(f"{node.op} operand is not a constant")
        if value.ndim > rank:
            raise _Skip(f"{node.op} constant broadcasts the layer's output")
        shape = (1,) * (rank - value.ndim) + tuple(value.shape)
        if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
            raise _Skip(f"{node.op} constant of shape {tuple(value.shape)} is not per-channel")
        vec = np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,)).copy()
        return _Bound(node, vec if node.op == "Max" else None, vec if node.op == "Min" else None)

    # ------------------------------------------------------------------ solving

    def _solve(self, pairs: list[_Pair], weights: dict[int, np.ndarray]) -> None:
        """Iterate the pairwise scales; each pair's `scale` becomes its total scale."""
        lo, hi = self.config.min_scale, self.config.max_scale
        for it in range(self.config.iterations):
            largest = 0.0
            for p in pairs:
                g2 = int(p.second.attrs.get("group", 1))
                w1, w2 = weights[id(p.first)], weights[id(p.second)]
                r1 = channel_ranges(w1)
                r2 = channel_ranges(w2, g2, axis="in")
                with np.errstate(divide="ignore", invalid="ignore"):
                    step = np.sqrt(r1 / r2)
                step[~np.isfinite(step) | (r1 <= 0) | (r2 <= 0)] = 1.0
                total = np.clip(p.scale * step, lo, hi)
                step = total / p.scale
                p.scale = total
                weights[id(p.first)] = w1 / step.reshape((-1,) + (1,) * (w1.ndim - 1))
                weights[id(p.second)] = _scale_in(w2, step, g2)
                largest = max(largest, float(np.max(np.abs(step - 1.0))))
            if largest < 1e-6:
                log.debug("equalization converged after %d sweeps", it + 1)
                break

    # ------------------------------------------------------------------ rewriting

    def _rewrite(
        self, graph: gs.Graph, p: _Pair, new: dict[int, np.ndarray], report: PassReport
    ) -> None:
        s = p.scale
        w1 = const_value(p.first.inputs[1])
        dtype = w1.dtype
        if len(p.first.inputs) > 2 and not p.first.inputs[2].is_empty():
            b = const_value(p.first.inputs[2]).astype(np.float64)
            p.first.inputs[2].values = (b / s).astype(dtype)
        shape = (-1,) + (1,) * (w1.ndim - 2)
        for bound in p.bounds:
            node = bound.node
            if node.op == "Clip":
                lo_zero = bound.lo is not None and np.all(bound.lo == 0)
                if self.config.clip == "relu" and lo_zero:
                    node.op = "Relu"
                    node.attrs.clear()
                    while len(node.inputs) > 1:
                        node.inputs.pop()
                    report.count("clips_to_relu")
                    continue
                self._clip_to_min_max(graph, bound, s, shape, dtype)
                report.count("clips_rewritten")
            else:
                vec = bound.lo if node.op == "Max" else bound.hi
                x = node.inputs[0] if const_value(node.inputs[0]) is None else node.inputs[1]
                const = gs.Constant(
                    unique_name(graph, f"{node.name or node.op}_bound"),
                    np.ascontiguousarray((vec / s).reshape(shape).astype(dtype)),
                )
                node.inputs.clear()
                node.inputs.extend([x, const])

    def _clip_to_min_max(
        self, graph: gs.Graph, bound: _Bound, s: np.ndarray, shape: tuple, dtype: Any
    ) -> None:
        """Clip(x, lo, hi) => Relu|Max(x, lo/s) -> Min(., hi/s); the last node keeps the output."""
        node = bound.node
        x, y = node.inputs[0], node.outputs[0]
        base = node.name or "clip"
        steps: list[tuple[str, np.ndarray | None]] = []
        if bound.lo is not None:
            steps.append(("Relu", None) if np.all(bound.lo == 0) else ("Max", bound.lo / s))
        if bound.hi is not None:
            steps.append(("Min", bound.hi / s))
        if not steps:
            steps.append(("Identity", None))
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.remove(node)
        current = x
        for i, (op, vec) in enumerate(steps):
            last = i == len(steps) - 1
            out = y if last else gs.Variable(unique_name(graph, f"{base}_{op.lower()}"), x.dtype)
            inputs = [current]
            if vec is not None:
                inputs.append(
                    gs.Constant(
                        unique_name(graph, f"{base}_{'hi' if op == 'Min' else 'lo'}"),
                        np.ascontiguousarray(vec.reshape(shape).astype(dtype)),
                    )
                )
            name = base if last else unique_name(graph, f"{base}_{op.lower()}")
            graph.nodes.append(gs.Node(op, name=name, inputs=inputs, outputs=[out]))
            current = out


def _scale_in(w: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """Conv weight (out, in / group, *k) with input channel i multiplied by s[i]."""
    cout, cin_g = w.shape[0], w.shape[1]
    grouped = w.reshape(group, cout // group, cin_g, -1) * s.reshape(group, 1, cin_g, 1)
    return grouped.reshape(w.shape)


def _is_depthwise(conv: Any) -> bool:
    group = int(conv.attrs.get("group", 1))
    w = const_value(conv.inputs[1])
    return group > 1 and w is not None and w.shape[1] == 1


def _const_through_cast(tensor: Any) -> np.ndarray | None:
    """`const_value`, also through a Cast of a constant (torch exports Clip bounds so)."""
    value = const_value(tensor)
    if value is not None or len(tensor.inputs) != 1 or tensor.inputs[0].op != "Cast":
        return value
    inner = const_value(tensor.inputs[0].inputs[0])
    if inner is None:
        return None
    return inner.astype(onnx.helper.tensor_dtype_to_np_dtype(tensor.inputs[0].attrs["to"]))
