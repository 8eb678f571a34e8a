"""Int8 post-training quantization by QuantizeLinear/DequantizeLinear insertion.

`Quantize` calibrates activation ranges on the Context's data (one streamed
`Calibrator` pass for every tensor it may quantize), then rewrites the graph:

- weights of Conv/ConvTranspose/Gemm/MatMul: symmetric int8 in [-127, 127], one
  scale per output channel (Conv axis 0, ConvTranspose 1, Gemm 0 with transB=1 else 1,
  MatMul the last axis), stored as int8 initializers read by a DequantizeLinear
  (`W -> DQ(W_int8, scale, 0)`), so weights take a quarter of the bytes;
- activations: one scale per tensor, `x -> DQ(Q(x))`.

Placement depends on the target (`ctx.target`):

- `tensorrt`: int8 with zero point 0 everywhere; Q/DQ on the activation inputs of
  Conv/ConvTranspose/Gemm/MatMul (both inputs of a MatMul/Gemm of two activations);
  on a residual Add only the skip input (the side not coming from a quantized Conv;
  the second input when both do); quantized tensors joined by a Concat share one
  scale (the largest amax of the group); biases and graph outputs stay float. The
  result passes `lint_qdq` without errors.
- `onnxruntime-cpu`: ONNX Runtime's QDQ format, which its graph optimizer fuses into
  QLinearConv/QLinearMatMul/QGemm/QLinearAdd kernels: Q/DQ on every float activation
  input *and* output of the quantized layers (an output is taken after a following
  Relu/Clip, which ONNX Runtime then folds into the Q), biases as int32 with scale
  input_scale * weight_scale, the inputs and outputs of Add/Mul/Concat/pooling wrapped
  too (`ORT_EXTRA_OPS`; the float constant of such an Add/Mul stored quantized), and
  (with `activation_dtype="auto"`) uint8 activations with a zero point covering each
  sign's calibrated range — measured fastest (see docs/quantization.md).

With `consumer_ranges` (default) a tensor whose readers are all flat past some bound
(Relu, Clip, HardSigmoid, HardSwish and its Add/Clip/Mul export, constant Adds before
them) gets its calibrated range narrowed to the part they can tell apart
(`useful_range`).

Lossy: its error measure is the output fidelity against the float model (SQNR,
cosine, top-1 agreement). With a floor set (`min_sqnr_db`, `min_cosine`,
`min_top1_agreement`) the pass measures the fully quantized model on the calibration
data and, when it misses the floor, leaves the most sensitive layers in float (ranked
by `sensitivity.layer_sensitivity`) one by one until the floor is met, or raises
FidelityError after `fallback_max_layers`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_edge.errors import ConfigError, DataError
from onnxslim_edge.graph import const_value, infer_shapes, unique_name
from onnxslim_edge.pipeline import Context, FidelityError, Pass, PassReport

__all__ = [
    "WEIGHT_OPS",
    "Quantize",
    "QuantizeConfig",
    "dequantize",
    "quantize_weight",
    "useful_range",
    "weight_axis",
]

log = logging.getLogger(__name__)

#: Ops whose weights and inputs are quantized.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Activations ONNX Runtime folds into a following QuantizeLinear.
_FOLDED_ACTIVATIONS = ("Relu", "Clip")
#: Extra ops wrapped in Q/DQ for onnxruntime-cpu, so ONNX Runtime runs them on its
#: QLinear kernels instead of converting back to float (measured: docs/quantization.md).
ORT_EXTRA_OPS = ("Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Mul")
_CONV_OPS = ("Conv", "ConvTranspose")
_MIN_SCALE = 1e-12
_INT32_MAX = 2**31 - 1
_QDQ_OPSET = 13  # per-axis DequantizeLinear
_DEFAULT_BATCH = 8


# --------------------------------------------------------------------------- config


def _is_float(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_override(text: str) -> tuple[str, float]:
    """`"tensor=amax"` -> (tensor, amax)."""
    name, sep, value = str(text).rpartition("=")
    if not sep or not name.strip():
        raise ConfigError(f"quantize.overrides: expected 'tensor=amax', got {text!r}")
    try:
        amax = float(value)
    except ValueError:
        raise ConfigError(
            f"quantize.overrides: amax of {name!r} is not a number: {value!r}"
        ) from None
    if not math.isfinite(amax) or amax < 0:
        raise ConfigError(f"quantize.overrides: amax of {name!r} must be finite and >= 0")
    return name.strip(), amax


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """Options of the `quantize` pass (see docs/quantization.md)."""

    method: Literal["minmax", "percentile", "entropy", "mse"] = "percentile"
    percentile: float = 99.99
    per_channel: bool = True
    activation_dtype: Literal["auto", "int8", "uint8"] = "auto"
    exclude_nodes: tuple[str, ...] = ()  # node names or regexes (full match)
    exclude_ops: tuple[str, ...] = ()
    keep_first: bool = False
    keep_last: bool = False
    calibration_cache: str | None = None  # JSON: read when it exists, then (re)written
    overrides: tuple[str, ...] = ()  # "tensor=amax"
    max_calibration_samples: int | None = 512
    min_top1_agreement: float | None = None
    min_sqnr_db: float | None = None
    min_cosine: float | None = None
    fallback_max_layers: int = 8
    consumer_ranges: bool = True  # clamp ranges to what the consumers can tell apart

    def __post_init__(self) -> None:
        from onnxslim_edge.passes.quantize.calibrate import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"quantize.method: {self.method!r} is not one of {METHODS}")
        if not _is_float(self.percentile) or not 0 < self.percentile <= 100:
            raise ConfigError(f"quantize.percentile: expected 0 < p <= 100, got {self.percentile}")
        for key in ("per_channel", "keep_first", "keep_last", "consumer_ranges"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"quantize.{key} must be true or false")
        if self.activation_dtype not in ("auto", "int8", "uint8"):
            raise ConfigError("quantize.activation_dtype must be auto, int8 or uint8")
        for pattern in self.exclude_nodes:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(
                    f"quantize.exclude_nodes: bad regex {pattern!r} ({exc})"
                ) from None
        for text in self.overrides:
            parse_override(text)
        n = self.max_calibration_samples
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"quantize.max_calibration_samples must be >= 1, got {n!r}")
        for key, lo, hi in (
            ("min_top1_agreement", 0.0, 1.0),
            ("min_cosine", -1.0, 1.0),
            ("min_sqnr_db", -math.inf, math.inf),
        ):
            value = getattr(self, key)
            if value is not None and (not _is_float(value) or not lo <= value <= hi):
                raise ConfigError(f"quantize.{key} must be a number in [{lo}, {hi}]")
        m = self.fallback_max_layers
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ConfigError(f"quantize.fallback_max_layers must be >= 0, got {m!r}")

    @property
    def floors(self) -> dict[str, float]:
        """The fidelity floors that are set."""
        keys = ("min_top1_agreement", "min_sqnr_db", "min_cosine")
        return {k: float(getattr(self, k)) for k in keys if getattr(self, k) is not None}


# --------------------------------------------------------------------------- numerics


def weight_axis(op: str, attrs: Mapping[str, Any], rank: int) -> int | None:
    """The output-channel axis of a weight of `op` (None: no per-channel axis)."""
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if int(attrs.get("transB", 0)) else 1
    if op == "MatMul":
        return rank - 1 if rank >= 2 else None
    return None


def quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in [-127, 127]: (q int8, scale float32). `axis` None: one scale;
    else one scale per index of `axis` (shape (w.shape[axis],)). A zero channel gets
    scale 1."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        amax = np.asarray(np.abs(w).max() if w.size else 0.0, dtype=np.float32)
    else:
        others = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=others) if w.size else np.zeros(w.shape[axis], np.float32)
    scale = (amax.astype(np.float64) / 127.0).astype(np.float32)
    scale = np.where(scale > 0, np.maximum(scale, _MIN_SCALE), 1.0).astype(np.float32)
    shaped = (
        scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    )
    q = np.clip(np.rint(w / shaped), -127, 127).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: Any = 0, axis: int | None = None):
    """DequantizeLinear in numpy: (q - zero_point) * scale, per `axis` when given."""
    q = np.asarray(q).astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.asarray(zero_point).astype(np.float32)
    if axis is not None and scale.ndim == 1:
        shape = [-1 if i == axis else 1 for i in range(q.ndim)]
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if zp.ndim == 1 else zp
    return (q - zp) * scale


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one activation tensor."""

    scale: float
    zero_point: int
    dtype: str  # "int8" | "uint8"
    amax: float
    method: str
    min: float | None = None
    max: float | None = None
    sqnr_db: float | None = None  # estimated from the calibration histogram


def _symmetric(amax: float, method: str) -> QParams:
    scale = amax / 127.0 if amax > 0 else 1.0
    return QParams(float(np.float32(max(scale, _MIN_SCALE))), 0, "int8", amax, method)


def _asymmetric(lo: float, hi: float, amax: float, method: str) -> QParams:
    lo, hi = min(max(lo, -amax), 0.0), max(min(hi, amax), 0.0)
    scale = (hi - lo) / 255.0
    if scale <= 0:
        return QParams(1.0, 0, "uint8", amax, method, lo, hi)
    s32 = np.float32(max(scale, _MIN_SCALE))
    zp = int(np.clip(np.rint(-lo / float(s32)), 0, 255))
    # Keep the representable range inside [lo, hi] after rounding the scale to float32,
    # so ONNX Runtime can fold a preceding Relu/Clip(0, 6) into the QuantizeLinear.
    for _ in range(4):
        if s32 * np.float32(255 - zp) <= np.float32(hi) or hi <= 0:
            break
        s32 = np.nextafter(s32, np.float32(0))
    return QParams(float(s32), zp, "uint8", amax, method, lo, hi)


# --------------------------------------------------------------------------- layers


@dataclass
class Layer:
    """A node that can be quantized: its weight slot (None for two activations), the
    weight's output-channel axis and the input slots holding activations."""

    node: str
    op: str
    weight_slot: int | None
    axis: int | None
    act_slots: tuple[int, ...]
    bias_slot: int | None = None


@dataclass
class Placement:
    """Where Q/DQ pairs go: activation tensor -> consumer (node, slot) pairs to rewire
    (None: every consumer but excluded nodes), weights of included layers, int32 biases,
    and groups of tensors that share one scale."""

    acts: dict[str, set[tuple[str, int]] | None] = field(default_factory=dict)
    layers: dict[str, Layer] = field(default_factory=dict)
    int32_bias: bool = False
    groups: list[set[str]] = field(default_factory=list)
    skip_rewire: set[str] = field(default_factory=set)
    constants: list[tuple[str, int]] = field(default_factory=list)  # (node, slot) to Q

    def want(self, tensor: str, consumer: tuple[str, int] | None) -> None:
        if consumer is None:
            self.acts[tensor] = None
            return
        slots = self.acts.setdefault(tensor, set())
        if slots is not None:
            slots.add(consumer)


def _name_nodes(graph: gs.Graph) -> None:
    """Give every unnamed node a unique name (Q/DQ placement is keyed by node name)."""
    taken = {n.name for n in graph.nodes if n.name}
    for i, node in enumerate(graph.nodes):
        if not node.name:
            base, k = f"{node.op}_{i}", 0
            name = base
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            node.name = name
            taken.add(name)


def _dtype_of(tensor: Any, dtypes: Mapping[str, Any]) -> np.dtype | None:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values).dtype
    dt = dtypes.get(tensor.name)
    if dt is not None:
        return np.dtype(dt)
    if tensor.dtype is not None:
        try:
            return np.dtype(tensor.dtype)
        except TypeError:
            return None
    return None


#: Ops whose constant operand the onnxruntime-cpu layout quantizes (see make_placement).
_CONST_OPERAND_OPS = ("Add", "Mul")


def _constant_operand(node: gs.Node, dtypes: Mapping[str, Any]) -> int | None:
    """The slot of the float32 constant of a two-input node whose other input is an
    activation, else None."""
    if len(node.inputs) != 2:
        return None
    for slot in (0, 1):
        value = const_value(node.inputs[slot])
        if (
            value is not None
            and value.dtype == np.float32
            and np.all(np.isfinite(value))
            and _is_activation(node.inputs[1 - slot], dtypes)
        ):
            return slot
    return None


def _is_activation(tensor: Any, dtypes: Mapping[str, Any]) -> bool:
    return (
        isinstance(tensor, gs.Variable)
        and not tensor.is_empty()
        and const_value(tensor) is None
        and _dtype_of(tensor, dtypes) == np.float32
    )


class Analysis:
    """What can be quantized in a graph: candidate layers (in graph order) and why the
    other weight ops cannot be."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        shapes = infer_shapes(graph)
        self.dtypes = {name: dt for name, (_, dt) in shapes.items() if dt is not None}
        self.layers: list[Layer] = []
        self.unsupported: list[tuple[Any, str]] = []
        for node in graph.nodes:
            if node.op not in WEIGHT_OPS or node.domain not in ("", "ai.onnx", None):
                continue
            layer_or_reason = self._layer(node)
            if isinstance(layer_or_reason, Layer):
                self.layers.append(layer_or_reason)
            else:
                self.unsupported.append((node, layer_or_reason))

    def _layer(self, node: gs.Node) -> Layer | str:
        if len(node.inputs) < 2:
            return "fewer than two inputs"
        x, w = node.inputs[0], node.inputs[1]
        if not _is_activation(x, self.dtypes):
            if const_value(x) is not None:
                return "first input is a constant"
            return f"input '{x.name}' is not a float32 tensor"
        bias = (
            2
            if node.op != "MatMul" and len(node.inputs) > 2 and not node.inputs[2].is_empty()
            else None
        )
        wv = const_value(w)
        if wv is None:
            if node.op in ("MatMul", "Gemm") and _is_activation(w, self.dtypes):
                return Layer(node.name, node.op, None, None, (0, 1))
            if w.inputs and w.inputs[0].op == "ConstantOfShape":
                return "weight is computed at run time (ConstantOfShape)"
            return "weight is not a constant"
        if wv.dtype != np.float32:
            return f"weight is {wv.dtype}, not float32"
        if node.op in _CONV_OPS and wv.ndim < 3:
            return f"weight has rank {wv.ndim}"
        if node.op == "Gemm" and wv.ndim != 2:
            return f"weight has rank {wv.ndim}"
        axis = weight_axis(node.op, node.attrs, wv.ndim)
        return Layer(node.name, node.op, 1, axis, (0,), bias)


def _through_bn(tensor: Any) -> gs.Node | None:
    """The node producing `tensor`, looking through one BatchNormalization."""
    if not tensor.inputs:
        return None
    node = tensor.inputs[0]
    if node.op == "BatchNormalization" and node.inputs and node.inputs[0].inputs:
        node = node.inputs[0].inputs[0]
    return node


def _folded_output(graph: gs.Graph, tensor: Any) -> Any:
    """`tensor`, or the output of a sole-consumer Relu/Clip chain after it."""
    outputs = {id(t) for t in graph.outputs}
    for _ in range(8):
        if id(tensor) in outputs or len(tensor.outputs) != 1:
            break
        nxt = tensor.outputs[0]
        if nxt.op not in _FOLDED_ACTIVATIONS or nxt.inputs[0] is not tensor:
            break
        if any(const_value(t) is None for t in nxt.inputs[1:] if not t.is_empty()):
            break
        tensor = nxt.outputs[0]
    return tensor


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


def make_placement(
    analysis: Analysis,
    included: Iterable[str],
    *,
    layout: Literal["tensorrt", "ort"],
    excluded: Iterable[str] = (),
    extra_ops: tuple[str, ...] = ORT_EXTRA_OPS,
) -> Placement:
    """Where Q/DQ go when the layers named `included` are quantized (see the module
    docstring); `excluded` nodes (any op) are never rewired or wrapped."""
    graph = analysis.graph
    dtypes = analysis.dtypes
    by_name = {n.name: n for n in graph.nodes}
    include = set(included)
    exclude = set(excluded)
    layers = {layer.node: layer for layer in analysis.layers if layer.node in include}
    placement = Placement(layers=layers, int32_bias=layout == "ort")
    if layout == "tensorrt":
        for layer in layers.values():
            node = by_name[layer.node]
            for slot in layer.act_slots:
                placement.want(node.inputs[slot].name, (node.name, slot))
        quantized_convs = {n for n, lay in layers.items() if lay.op in _CONV_OPS}
        for node in graph.nodes:
            if node.op != "Add" or node.name in exclude or len(node.inputs) != 2:
                continue
            if not all(_is_activation(t, dtypes) for t in node.inputs):
                continue
            side = [
                (p := _through_bn(t)) is not None and p.name in quantized_convs for t in node.inputs
            ]
            if side[0]:
                placement.want(node.inputs[1].name, (node.name, 1))
            elif side[1]:
                placement.want(node.inputs[0].name, (node.name, 0))
    else:
        wrapped = [by_name[n] for n in layers]
        if extra_ops:
            wrapped += [
                n
                for n in graph.nodes
                if n.op in extra_ops
                and n.name not in exclude
                and all(_is_activation(t, dtypes) for t in n.inputs if not t.is_empty())
            ]
            # Add/Mul of an activation and a float constant (HardSwish's x + 3): the
            # constant is stored quantized too, so ONNX Runtime fuses a QLinearAdd/Mul
            # instead of a DequantizeLinear -> Add -> QuantizeLinear round trip.
            for n in graph.nodes:
                slot = _constant_operand(n, dtypes) if n.op in _CONST_OPERAND_OPS else None
                if slot is not None and n.op in extra_ops and n.name not in exclude:
                    wrapped.append(n)
                    placement.constants.append((n.name, slot))
        outputs = {id(t) for t in graph.outputs}
        constant_slots = set(placement.constants)
        for node in wrapped:
            layer = layers.get(node.name)
            slots = layer.act_slots if layer else range(len(node.inputs))
            for slot in slots:
                if not node.inputs[slot].is_empty() and (node.name, slot) not in constant_slots:
                    placement.want(node.inputs[slot].name, None)
            out = _folded_output(graph, node.outputs[0])
            if _is_activation(out, dtypes) and id(out) not in outputs and out.outputs:
                placement.want(out.name, None)
        placement.skip_rewire = exclude
    # Concat: quantized inputs and a quantized output share one scale.
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.get(a, a) != a:
            a = parent[a]
        return a

    for node in graph.nodes:
        if node.op != "Concat" or not node.outputs:
            continue
        members = [t.name for t in (*node.inputs, node.outputs[0]) if t.name in placement.acts]
        for other in members[1:]:
            parent[find(other)] = find(members[0])
    groups: dict[str, set[str]] = {}
    for name in parent:
        groups.setdefault(find(name), set()).add(name)
    for root, members in groups.items():
        members.add(root)
    placement.groups = [g for g in groups.values() if len(g) > 1]
    return placement


# --------------------------------------------------------------------------- rewrite


class _Builder:
    """Inserts the Q/DQ nodes of a Placement into a graph."""

    def __init__(self, graph: gs.Graph, per_channel: bool) -> None:
        self.graph = graph
        self.opset = int(graph.opset)
        self.per_channel = per_channel and self.opset >= _QDQ_OPSET
        self.taken = set(graph.tensors())
        self.nodes = {n.name: n for n in graph.nodes}

    def _name(self, base: str) -> str:
        return unique_name(self.graph, base, self.taken)

    def _const(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self._name(base), np.array(value, order="C"))  # keeps 0-d

    def _dq(self, base: str, q: Any, scale: gs.Constant, zp: gs.Constant | None, axis: int | None):
        out = gs.Variable(self._name(f"{base}_dq"), dtype=np.float32)
        attrs = {"axis": axis} if axis is not None else {}
        inputs = [q, scale] + ([zp] if zp is not None else [])
        self.graph.nodes.append(
            gs.Node(
                "DequantizeLinear", self._name(f"{base}_DequantizeLinear"), attrs, inputs, [out]
            )
        )
        return out

    def activation(
        self, tensor: Any, qp: QParams, consumers: set[tuple[str, int]] | None, skip: set[str]
    ) -> None:
        if consumers is None:
            targets = [
                (node, i)
                for node in list(tensor.outputs)
                if node.name not in skip
                for i, t in enumerate(node.inputs)
                if t is tensor
            ]
        else:
            targets = [(self.nodes[n], slot) for n, slot in sorted(consumers)]
        name = tensor.name
        dtype = np.int8 if qp.dtype == "int8" else np.uint8
        scale = self._const(f"{name}_scale", np.array(qp.scale, np.float32))
        zp = self._const(f"{name}_zero_point", np.array(qp.zero_point, dtype))
        q = gs.Variable(self._name(f"{name}_q"), dtype=dtype, shape=tensor.shape)
        qnode = gs.Node(
            "QuantizeLinear", self._name(f"{name}_QuantizeLinear"), {}, [tensor, scale, zp], [q]
        )
        dq = self._dq(name, q, scale, zp, None)
        dq.shape = tensor.shape
        for node, slot in targets:
            node.inputs[slot] = dq
        self.graph.nodes.append(qnode)

    def constant(self, node_name: str, slot: int, dtype: str) -> None:
        """Store a constant operand quantized per tensor: uint8 on [min(0, c), max(0, c)]
        (a scalar lands on the grid's end, exact up to float32 rounding), or symmetric
        int8; read by a DQ."""
        node = self.nodes[node_name]
        c = const_value(node.inputs[slot]).astype(np.float64)
        lo, hi = min(float(c.min()), 0.0), max(float(c.max()), 0.0)
        if dtype == "int8":
            scale = max(-lo, hi) / 127.0 or 1.0
            zp, qmin, qmax, np_type = 0, -127, 127, np.int8
        else:
            scale = (hi - lo) / 255.0 or 1.0
            zp, qmin, qmax, np_type = round(-lo / scale), 0, 255, np.uint8
        scale = float(np.float32(scale))
        q = np.clip(np.rint(c / scale) + zp, qmin, qmax).astype(np_type)
        base = f"{node.name}_const{slot}"
        qc = self._const(f"{base}_q", q)
        sc = self._const(f"{base}_scale", np.array(scale, np.float32))
        zc = self._const(f"{base}_zero_point", np.array(zp, np_type))
        node.inputs[slot] = self._dq(base, qc, sc, zc, None)

    def weight(self, layer: Layer) -> dict[str, Any]:
        node = self.nodes[layer.node]
        w = const_value(node.inputs[layer.weight_slot])
        axis = layer.axis if self.per_channel else None
        q, scale = quantize_weight(w, axis)
        base = f"{node.name}_w"
        qc = self._const(f"{base}_int8", q)
        sc = self._const(f"{base}_scale", scale)
        zp = self._const(f"{base}_zero_point", np.zeros(scale.shape, np.int8))
        node.inputs[layer.weight_slot] = self._dq(base, qc, sc, zp, axis)
        return {"weight_axis": axis, "weight_scale": scale}

    def bias(self, layer: Layer, x_scale: float, w_scale: np.ndarray) -> bool:
        node = self.nodes[layer.node]
        b = const_value(node.inputs[layer.bias_slot])
        if b is None or b.dtype != np.float32 or b.ndim != 1:
            return False
        scale = (np.float32(x_scale) * np.broadcast_to(w_scale, b.shape)).astype(np.float32)
        if np.any(scale <= 0):
            return False
        q = np.rint(b.astype(np.float64) / scale)
        if np.any(np.abs(q) > _INT32_MAX):
            return False
        base = f"{node.name}_bias"
        qc = self._const(f"{base}_int32", q.astype(np.int32))
        sc = self._const(f"{base}_scale", scale)
        if self.opset < _QDQ_OPSET:
            return False  # per-axis DequantizeLinear needs opset 13
        node.inputs[layer.bias_slot] = self._dq(base, qc, sc, None, 0)
        return True


def apply_placement(
    graph: gs.Graph,
    placement: Placement,
    qparams: Mapping[str, QParams],
    *,
    per_channel: bool,
    report: PassReport | None = None,
) -> None:
    """Rewrite `graph` in place: Q/DQ on the placed activations, int8 weights."""
    builder = _Builder(graph, per_channel)
    tensors = graph.tensors()
    originals = {
        name: [builder.nodes[name].inputs[slot].name for slot in layer.act_slots]
        for name, layer in placement.layers.items()
    }
    for name, consumers in placement.acts.items():
        builder.activation(tensors[name], qparams[name], consumers, placement.skip_rewire)
    act_dtype = next((qp.dtype for qp in qparams.values()), "uint8")
    for node_name, slot in placement.constants:
        builder.constant(node_name, slot, act_dtype)
    for layer in placement.layers.values():
        detail: dict[str, Any] = {"node": layer.node, "op": layer.op}
        inputs = {}
        for original in originals[layer.node]:
            qp = qparams.get(original)
            if qp is None:  # cannot happen: every layer input is placed
                continue
            inputs[original] = {
                "amax": qp.amax,
                "scale": qp.scale,
                "zero_point": qp.zero_point,
                "dtype": qp.dtype,
                "method": qp.method,
                "sqnr_db": qp.sqnr_db,
            }
        detail["inputs"] = inputs
        if layer.weight_slot is not None:
            info = builder.weight(layer)
            ws = info["weight_scale"]
            detail["weight_axis"] = info["weight_axis"]
            detail["weight_scale_min"] = float(ws.min())
            detail["weight_scale_max"] = float(ws.max())
            if placement.int32_bias and layer.bias_slot is not None and len(inputs) == 1:
                x_scale = next(iter(inputs.values()))["scale"]
                detail["bias"] = "int32" if builder.bias(layer, x_scale, ws) else "float"
        if report is not None:
            report.detail(**detail)
            report.count("layers_quantized")
    if report is not None and placement.acts:
        report.count("activations_quantized", len(placement.acts))


# --------------------------------------------------------------------------- planning


class Quantizer:
    """Calibrated quantization of one float model, buildable for any set of layers.

    Statistics are collected once (`calibrate`) for every tensor any variant may
    quantize; `build(excluded)` then gives the quantized model with those nodes left
    in float, and `apply(graph, excluded)` rewrites a graph in place the same way.
    """

    def __init__(self, model: onnx.ModelProto, config: QuantizeConfig, target: str) -> None:
        self.model = model
        self.config = config
        self.layout: Literal["tensorrt", "ort"] = "tensorrt" if target == "tensorrt" else "ort"
        dtype = config.activation_dtype
        if dtype == "auto":
            dtype = "int8" if self.layout == "tensorrt" else "uint8"
        if self.layout == "tensorrt" and dtype != "int8":
            raise ConfigError("quantize: target tensorrt needs int8 activations (zero point 0)")
        self.act_dtype = dtype
        self.analysis = Analysis(gs.import_onnx(model))
        self.stats: dict[str, Any] = {}
        self.cache: dict[str, dict[str, Any]] = {}
        self.overrides = dict(parse_override(t) for t in config.overrides)
        self._tensors = self.analysis.graph.tensors()
        self._outputs = frozenset(t.name for t in self.analysis.graph.outputs)

    # -- which layers

    def config_exclusions(self) -> dict[str, str]:
        """Node name -> why the config keeps it in float."""
        cfg = self.config
        out: dict[str, str] = {}
        patterns = [(p, re.compile(p)) for p in cfg.exclude_nodes]
        for node in self.analysis.graph.nodes:
            if node.op in cfg.exclude_ops:
                out[node.name] = f"excluded by op type {node.op}"
                continue
            for text, pattern in patterns:
                if node.name == text or pattern.fullmatch(node.name):
                    out[node.name] = f"excluded by name pattern {text!r}"
                    break
        layers = [layer for layer in self.analysis.layers if layer.node not in out]
        if cfg.keep_first and layers:
            out[layers[0].node] = "kept in float: first layer (keep_first)"
        if cfg.keep_last and layers:
            out.setdefault(layers[-1].node, "kept in float: last layer (keep_last)")
        return out

    def placement(self, excluded: Iterable[str], only: Iterable[str] | None = None) -> Placement:
        excluded = set(excluded)
        if only is not None:
            included = set(only)
            extra: tuple[str, ...] = ()
        else:
            included = {lay.node for lay in self.analysis.layers if lay.node not in excluded}
            extra = ORT_EXTRA_OPS
        return make_placement(
            self.analysis, included, layout=self.layout, excluded=excluded, extra_ops=extra
        )

    # -- calibration

    def tensors_to_calibrate(self, excluded: Iterable[str]) -> list[str]:
        p = self.placement(excluded)
        names = set(p.acts)
        if self.layout == "tensorrt":  # both sides of residual Adds (fallback may need either)
            dtypes = self.analysis.dtypes
            for node in self.analysis.graph.nodes:
                if node.op == "Add" and len(node.inputs) == 2:
                    names.update(t.name for t in node.inputs if _is_activation(t, dtypes))
        return sorted(names)

    def calibrate(self, data: Any, tensors: list[str], *, progress: bool = False) -> None:
        from onnxslim_edge.passes.quantize.calibrate import Calibrator, load_cache

        path = self.config.calibration_cache
        if path:
            import os

            if os.path.exists(path):
                self.cache = load_cache(path)
        todo = [t for t in tensors if t not in self.cache and t not in self.overrides]
        if todo:
            self.stats = Calibrator(self.model, todo, progress=progress).collect(data)

    def qparams(self, placement: Placement) -> dict[str, QParams]:
        from onnxslim_edge.passes.quantize.calibrate import cache_entry

        cfg = self.config
        ranges: dict[str, tuple[float, float, float, str]] = {}
        for name in placement.acts:
            lo = hi = None
            if name in self.stats and name not in self.cache:  # thresholds once per tensor
                entry = cache_entry(self.stats[name], cfg.method, percentile=cfg.percentile)
                self.cache[name] = entry
            entry = self.cache.get(name)
            if entry is not None:
                amax, method = float(entry["amax"]), str(entry["method"])
                lo, hi = entry.get("min"), entry.get("max")
                if self.act_dtype != "int8" and None not in (entry.get("lo"), entry.get("hi")):
                    # uint8 with a zero point: each sign's own threshold, not |x|'s
                    lo, hi = entry["lo"], entry["hi"]
                    amax = max(-lo, hi)
            else:
                amax, method = 0.0, "none"
            if name in self.overrides:
                amax, method = self.overrides[name], "override"
            lo = -amax if lo is None else lo
            hi = amax if hi is None else hi
            if cfg.consumer_ranges and name not in self.overrides:
                amax, lo, hi, method = self._clamp(placement, name, amax, lo, hi, method)
            ranges[name] = (amax, lo, hi, method)
        for group in placement.groups:
            amax = max(ranges[n][0] for n in group)
            lo = min(ranges[n][1] for n in group)
            hi = max(ranges[n][2] for n in group)
            for n in group:
                ranges[n] = (amax, lo, hi, ranges[n][3] + "+concat")
        from onnxslim_edge.passes.quantize.calibrate import estimated_sqnr_db

        out = {}
        for name, (amax, lo, hi, method) in ranges.items():
            if self.act_dtype == "int8":
                qp = _symmetric(amax, method)
                qmin, qmax = -128, 127
            else:
                qp = _asymmetric(lo, hi, amax, method)
                qmin, qmax = -qp.zero_point, 255 - qp.zero_point
            stats = self.stats.get(name)
            if stats is not None:
                sqnr = estimated_sqnr_db(stats, qp.scale, qmin, qmax)
                finite = sqnr is not None and math.isfinite(sqnr)
                qp = replace(qp, sqnr_db=round(sqnr, 2) if finite else None)
            out[name] = qp
        return out

    def _clamp(
        self, placement: Placement, name: str, amax: float, lo: float, hi: float, method: str
    ) -> tuple[float, float, float, str]:
        """Narrow a calibrated range to the part the rewired consumers can tell apart."""
        tensor = self._tensors[name]
        wanted = placement.acts.get(name)
        if wanted is None:
            consumers = [n for n in tensor.outputs if n.name not in placement.skip_rewire]
        else:
            consumers = [n for n in tensor.outputs if any(n.name == c for c, _ in wanted)]
        useful = useful_range(tensor, consumers, outputs=self._outputs)
        if useful is None:
            return amax, lo, hi, method
        new_lo, new_hi = max(lo, useful[0]), min(hi, useful[1])
        new_amax = min(amax, max(-new_lo, new_hi, 0.0))
        if (new_lo, new_hi, new_amax) == (lo, hi, amax) or new_lo > new_hi:
            return amax, lo, hi, method
        return new_amax, new_lo, new_hi, f"{method}+consumers[{useful[0]:g},{useful[1]:g}]"

    def save_cache(self) -> None:
        from onnxslim_edge.passes.quantize.calibrate import save_cache

        if self.config.calibration_cache:
            save_cache(self.config.calibration_cache, self.cache)

    # -- building

    def apply(
        self,
        graph: gs.Graph,
        excluded: Iterable[str],
        *,
        only: Iterable[str] | None = None,
        report: PassReport | None = None,
    ) -> Placement:
        placement = self.placement(excluded, only)
        apply_placement(
            graph,
            placement,
            self.qparams(placement),
            per_channel=self.config.per_channel,
            report=report,
        )
        return placement

    def build(
        self, excluded: Iterable[str], *, only: Iterable[str] | None = None
    ) -> onnx.ModelProto:
        graph = gs.import_onnx(self.model)
        self.apply(graph, excluded, only=only)
        model = gs.export_onnx(graph.cleanup().toposort(), do_type_check=False)
        model.ir_version = min(max(self.model.ir_version, 7), 10)
        return model


# --------------------------------------------------------------------------- the pass


def _upgrade_opset(graph: gs.Graph, report: PassReport) -> bool:
    """Convert the graph to opset 13 in place (per-axis DequantizeLinear); False when the
    converter fails (the pass then quantizes weights per tensor, or not at all)."""
    from onnx import version_converter

    try:
        model = gs.export_onnx(graph.copy(), do_type_check=False)
        converted = version_converter.convert_version(model, _QDQ_OPSET)
        new = gs.import_onnx(converted)
    except Exception as exc:  # the converter raises many types
        report.warn(f"cannot convert opset {graph.opset} to {_QDQ_OPSET}: {exc}".splitlines()[0])
        return False
    graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
    graph.opset = new.opset
    graph.import_domains = new.import_domains
    report.count("opset_upgraded")
    return True


class Quantize(Pass):
    """Float Conv/ConvTranspose/Gemm/MatMul -> int8 weights + Q/DQ'd activations.

    Scope: layers whose activation input is float32 and whose weight is a float32
    constant (or, for MatMul/Gemm, a second float32 activation); see the module
    docstring for the placement per target. Lossy: the report gives per-layer scales
    and ranges, what was kept in float and why, and with a floor set the fidelity
    (SQNR, cosine, top-1 agreement against the float model on the calibration data).
    """

    name = "quantize"
    Config = QuantizeConfig

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        from onnxslim_edge.data import open_data

        report = self.new_report()
        cfg: QuantizeConfig = self.config
        if ctx.data is None:
            raise DataError("quantize needs calibration data (--calib)")
        if int(graph.opset) < 10:
            probe = Analysis(graph)
            if not probe.layers:
                for node, reason in probe.unsupported:
                    report.skip(node, reason)
                return report
            if not _upgrade_opset(graph, report):
                for node in graph.nodes:
                    if node.op in WEIGHT_OPS:
                        report.skip(node, f"opset {graph.opset} has no QuantizeLinear (needs 10)")
                return report
        elif int(graph.opset) < _QDQ_OPSET and cfg.per_channel:
            probe = Analysis(graph)
            if probe.layers and not _upgrade_opset(graph, report):
                report.warn(f"opset {graph.opset}: weights quantized per tensor")
        _name_nodes(graph)
        float_model = gs.export_onnx(graph.copy(), do_type_check=False)
        float_model.ir_version = min(max(float_model.ir_version, 7), 10)
        quantizer = Quantizer(float_model, cfg, ctx.target.name)
        for node, reason in quantizer.analysis.unsupported:
            report.skip(node, reason)
        exclusions = quantizer.config_exclusions()
        nodes = {n.name: n for n in quantizer.analysis.graph.nodes}
        layer_names = {lay.node for lay in quantizer.analysis.layers}
        for name, reason in exclusions.items():
            if name in layer_names:
                report.skip(nodes[name], reason)
        if not (layer_names - set(exclusions)):
            report.warn("nothing to quantize")
            return report
        tensors = quantizer.tensors_to_calibrate(exclusions)
        source = open_data(
            ctx.data,
            float_model,
            batch_size=_DEFAULT_BATCH,
            limit=cfg.max_calibration_samples,
            input_shapes=ctx.input_shapes,
            seed=ctx.seed,
        )
        quantizer.calibrate(source, tensors, progress=ctx.progress)
        known = set(tensors)
        for name in quantizer.overrides:
            if name not in known:
                report.warn(f"override for '{name}': not a quantized tensor")
        excluded = set(exclusions)
        if cfg.floors:
            excluded = self._fallback(quantizer, source, excluded, report)
        quantizer.apply(graph, excluded, report=report)
        quantizer.save_cache()
        return report

    def _fallback(
        self, quantizer: Quantizer, source: Any, excluded: set[str], report: PassReport
    ) -> set[str]:
        from onnxslim_edge.passes.quantize.sensitivity import Evaluator, rank_layers

        cfg: QuantizeConfig = self.config
        floors = cfg.floors
        evaluator = Evaluator(quantizer.model, source)
        fid = evaluator.score(quantizer.build(excluded))
        misses = fid.misses(floors)
        kept: list[tuple[str, float]] = []
        if misses:
            ranking = rank_layers(quantizer, evaluator, excluded)
            report.detail(sensitivity=[r._asdict() for r in ranking])
            for item in ranking[: cfg.fallback_max_layers]:
                excluded = excluded | {item.node}
                kept.append((item.node, item.sqnr_db))
                fid = evaluator.score(quantizer.build(excluded))
                misses = fid.misses(floors)
                if not misses:
                    break
        report.detail(fidelity=fid.to_dict(), floors=floors, kept_float=[k for k, _ in kept])
        if misses:
            floor_text = ", ".join(f"{k}={v:g}" for k, v in floors.items())
            raise FidelityError(
                f"quantize: cannot meet {floor_text} with {len(kept)} layer(s) kept in float "
                f"(fallback_max_layers={cfg.fallback_max_layers}): {misses[0]}"
            )
        nodes = {n.name: n for n in quantizer.analysis.graph.nodes}
        for rank, (name, sqnr) in enumerate(kept, start=1):
            report.skip(
                nodes[name],
                f"kept in float by fallback (#{rank} most sensitive: quantized alone the "
                f"output SQNR is {sqnr:.1f} dB)",
            )
        report.count("fallback_layers", len(kept))
        return excluded
