"""A linter for Q/DQ models: TensorRT's explicit-quantization rules, or ONNX Runtime CPU's.

`lint_qdq(model)` checks the main graph of a model, whoever quantized it, against the
placement and types TensorRT fuses into int8 kernels, and names every violation:

- `non-int8`: a QuantizeLinear/DequantizeLinear works on another type than int8
  (uint8, fp8, int4 ...). A QuantizeLinear without a zero point and without
  `output_dtype` produces uint8 by the ONNX definition.
- `zero-point-nonzero`: a zero point that is not all 0 (TensorRT is symmetric only).
- `weight-axis`: a per-channel weight DequantizeLinear on another axis than the output
  channels: Conv 0, ConvTranspose 1, Gemm 0 with transB=1 else 1, MatMul the last.
- `per-tensor-weight` (warning): one scale for a whole weight tensor.
- `weight-range`: int8 weight values of -128 (TensorRT's weights use [-127, 127]).
- `quantized-bias`: a DequantizeLinear feeds the bias of a Conv/ConvTranspose/Gemm.
- `quantized-output`: a graph output comes from a QuantizeLinear or is int8/uint8.
- `unquantized-input`: in a model with any Q/DQ, an input of a
  Conv/ConvTranspose/Gemm/MatMul does not come from a DequantizeLinear. An error when
  the other input does (a half-quantized layer TensorRT cannot run in int8), a warning
  when neither does (a layer kept in float).
- `residual-skip-unquantized`: an Add of two computed tensors where one side is
  quantized (comes from a DequantizeLinear, or is the output of a Conv whose input is
  quantized) and the skip side is not Q/DQ'd. Add(Conv output, DQ(skip)) is the
  pattern TensorRT fuses and passes, as does Add(DQ, DQ).
- `concat-scale-mismatch`: DequantizeLinear inputs of one Concat with different scales.

Those are TensorRT's rules, and a model quantized for ONNX Runtime's CPU kernels fails
them by design (uint8 activations with zero points, int32 biases behind
DequantizeLinear, Q/DQ around Add/Mul/pooling). `lint_qdq(model, target="onnxruntime-cpu")`
checks what those kernels need instead (`ORT_CPU_RULES`):

- `weight-axis` and `per-tensor-weight` (warning) as above: ONNX Runtime fuses
  per-channel weights on the output-channel axis;
- `unfused-type` (warning): a Q/DQ type other than int8/uint8 (an int32 bias excepted):
  no integer kernel takes it, so the layer runs as float between Q/DQ;
- `uint8-weights` (warning): uint8 weights (U8U8) run slower than int8 weights (U8S8)
  on x86;
- `quantized-output` (warning here): an integer graph output.

Only the main graph is checked (not If/Loop bodies); checks that need a constant
(scales, zero points, weights) skip tensors computed at run time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxslim_edge.errors import ConfigError

__all__ = ["ORT_CPU_RULES", "RULES", "TARGETS", "Violation", "format_violations", "lint_qdq"]

#: Every rule the linter checks, with a one-line description.
RULES = {
    "non-int8": "Q/DQ must use int8 (not uint8 or other types)",
    "zero-point-nonzero": "Q/DQ zero points must be 0",
    "weight-axis": "per-channel weight scales must be on the output-channel axis",
    "per-tensor-weight": "weights should have one scale per output channel",
    "weight-range": "int8 weights must lie in [-127, 127]",
    "quantized-bias": "biases must stay float",
    "quantized-output": "graph outputs must be float and not come from QuantizeLinear",
    "unquantized-input": "Conv/ConvTranspose/Gemm/MatMul inputs should come from DequantizeLinear",
    "residual-skip-unquantized": "the skip input of a residual Add should be Q/DQ'd",
    "concat-scale-mismatch": "Q/DQ inputs of a Concat should share one scale",
}

#: The rules of the `onnxruntime-cpu` target (`RULES` are TensorRT's).
ORT_CPU_RULES = {
    "weight-axis": RULES["weight-axis"],
    "per-tensor-weight": RULES["per-tensor-weight"],
    "unfused-type": "Q/DQ types other than int8/uint8 run as float ops, not integer kernels",
    "uint8-weights": "int8 weights (U8S8) run faster than uint8 weights (U8U8) on x86",
    "quantized-output": "graph outputs should be float",
}

#: The targets `lint_qdq` checks for, and their rules.
TARGETS = {"tensorrt": RULES, "onnxruntime-cpu": ORT_CPU_RULES}

_Q = "QuantizeLinear"
_DQ = "DequantizeLinear"
_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_BIAS_OPS = ("Conv", "ConvTranspose", "Gemm")
_CONV_OPS = ("Conv", "ConvTranspose")
_CACHE_LIMIT = 4096  # elements: constants up to this size are converted once and kept


@dataclass(frozen=True)
class Violation:
    """One broken rule: the node (its name, or `OpType#index` when unnamed), the rule
    name (a key of `RULES`), a one-line message and a severity ("error"/"warning")."""

    node: str
    rule: str
    message: str
    severity: str = "error"


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _constant_of(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.array(onnx.helper.get_attribute_value(a))
        if a.name in ("value_floats", "value_ints"):
            return np.array(list(onnx.helper.get_attribute_value(a)))
    return None


class _Graph:
    """Producers, constants and element types of a model's main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.graph = graph
        self.names: dict[int, str] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consts: dict[str, np.ndarray] = {}
        self.const_types: dict[str, int] = {}
        for init in graph.initializer:
            self.const_types[init.name] = init.data_type
        self._inits = {init.name: init for init in graph.initializer}
        fed = {i.name for i in graph.input}
        for init_name in list(self._inits):
            if init_name in fed:  # an initializer a feed may override is not a constant
                del self._inits[init_name]
                del self.const_types[init_name]
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for index, node in enumerate(graph.node):
            self.names[id(node)] = node.name or f"{node.op_type}#{index}"
            for slot, tensor in enumerate(node.input):
                if tensor:
                    self.consumers.setdefault(tensor, []).append((node, slot))
            for out in node.output:
                if out:
                    self.producer[out] = node
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                attr = next((a for a in node.attribute if a.name == "value"), None)
                if attr is not None:
                    self.const_types[node.output[0]] = attr.t.data_type
        self.types: dict[str, int] = {}
        for vi in (*graph.input, *graph.value_info, *graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self.types[vi.name] = vi.type.tensor_type.elem_type

    def name(self, node: onnx.NodeProto) -> str:
        return self.names[id(node)]

    def const(self, tensor: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant output), else None."""
        if not tensor:
            return None
        if tensor not in self.consts:
            if tensor in self._inits:
                value = numpy_helper.to_array(self._inits[tensor])
                if value.size > _CACHE_LIMIT:  # weights are read once: keep memory flat
                    return value
                self.consts[tensor] = value
            else:
                node = self.producer.get(tensor)
                if node is None or node.op_type != "Constant":
                    return None
                value = _constant_of(node)
                if value is None:
                    return None
                self.consts[tensor] = value
        return self.consts[tensor]

    def is_const(self, tensor: str) -> bool:
        if tensor in self._inits:
            return True
        node = self.producer.get(tensor)
        return node is not None and node.op_type == "Constant"

    def op(self, tensor: str) -> str | None:
        node = self.producer.get(tensor)
        return node.op_type if node is not None else None

    def from_dq(self, tensor: str) -> bool:
        node = self.producer.get(tensor)
        return node is not None and node.op_type == _DQ and node.domain in _QDQ_DOMAINS

    def rank(self, tensor: str) -> int | None:
        value = self.const(tensor)
        if value is not None:
            return value.ndim
        for vi in (*self.graph.value_info, *self.graph.input):
            if vi.name == tensor and vi.type.tensor_type.HasField("shape"):
                return len(vi.type.tensor_type.shape.dim)
        return None

    def quant_type(self, node: onnx.NodeProto) -> int | None:
        """The quantized element type a Q produces or a DQ consumes (None: unknown)."""
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        if zp and zp in self.const_types:
            return self.const_types[zp]
        if zp and zp in self.types:
            return self.types[zp]
        if node.op_type == _Q:
            out_dtype = _attr(node, "output_dtype", 0)
            return int(out_dtype) if out_dtype else TensorProto.UINT8  # type: ignore[call-overload]
        x = node.input[0]
        if x in self.const_types:
            return self.const_types[x]
        src = self.producer.get(x)
        if src is not None and src.op_type == _Q:
            return self.quant_type(src)
        return self.types.get(x)


def _qdq_nodes(g: _Graph) -> list[onnx.NodeProto]:
    return [n for n in g.graph.node if n.op_type in (_Q, _DQ) and n.domain in _QDQ_DOMAINS]


def _expected_weight_axis(node: onnx.NodeProto, rank: int | None) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "MatMul" and rank is not None:
        return rank - 1
    return None


def _quantized_weight(g: _Graph, dq: onnx.NodeProto) -> tuple[np.ndarray | None, int | None]:
    """The int8 values a weight DQ dequantizes (computed when they come from a Q of a
    float constant), and the weight's rank."""
    x = dq.input[0]
    value = g.const(x)
    if value is not None:
        return value, value.ndim
    src = g.producer.get(x)
    if src is None or src.op_type != _Q:
        return None, g.rank(x)
    w, scale = g.const(src.input[0]), g.const(src.input[1])
    if w is None or scale is None:
        return None, g.rank(src.input[0])
    zp_name = src.input[2] if len(src.input) > 2 else ""
    zp = g.const(zp_name) if zp_name else np.zeros((), np.int8)
    if zp is None:
        return None, w.ndim
    scale = scale.astype(np.float64)
    zp = zp.astype(np.float64)
    if scale.size > 1 and w.ndim:
        axis = int(_attr(src, "axis", 1)) % w.ndim  # type: ignore[call-overload]
        shape = [1] * w.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape) if zp.size > 1 else zp
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(w.astype(np.float64) / scale) + zp
    return np.clip(q, -128, 127), w.ndim


def _only_bias(g: _Graph, node: onnx.NodeProto) -> bool:
    """True for a DequantizeLinear whose output is only used as a bias (int32 by design;
    reported once, as `quantized-bias`)."""
    uses = g.consumers.get(node.output[0], [])
    return (
        node.op_type == _DQ
        and bool(uses)
        and all(user.op_type in _BIAS_OPS and index == 2 for user, index in uses)
    )


def _check_qdq_types(g: _Graph, out: list[Violation]) -> None:
    for node in _qdq_nodes(g):
        name = g.name(node)
        qtype = g.quant_type(node)
        if qtype is not None and qtype != TensorProto.INT8 and not _only_bias(g, node):
            type_name = TensorProto.DataType.Name(qtype)
            why = (
                " (no zero point: the ONNX default output type)"
                if node.op_type == _Q and (len(node.input) < 3 or not node.input[2])
                else ""
            )
            out.append(
                Violation(
                    name,
                    "non-int8",
                    f"{node.op_type} '{name}' uses {type_name}{why}; TensorRT needs int8",
                )
            )
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = g.const(zp_name) if zp_name else None
        if zp is not None and np.any(zp.astype(np.float64) != 0):
            shown = zp.reshape(-1)[np.flatnonzero(zp.reshape(-1) != 0)[0]]
            out.append(
                Violation(
                    name,
                    "zero-point-nonzero",
                    f"{node.op_type} '{name}' has zero point {shown} (not 0); TensorRT is "
                    "symmetric only",
                )
            )


def _check_layers(g: _Graph, has_qdq: bool, out: list[Violation]) -> None:
    for node in g.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        name = g.name(node)
        if node.op_type in _BIAS_OPS and len(node.input) > 2 and g.from_dq(node.input[2]):
            dq = g.producer[node.input[2]]
            out.append(
                Violation(
                    name,
                    "quantized-bias",
                    f"{node.op_type} '{name}': bias '{node.input[2]}' comes from "
                    f"DequantizeLinear '{g.name(dq)}'; biases must stay float",
                )
            )
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2:
            continue
        if node.input[1] and g.from_dq(node.input[1]):
            _check_weight(g, node, g.producer[node.input[1]], out)
        if has_qdq:
            _check_inputs(g, node, out)


def _check_weight(
    g: _Graph, node: onnx.NodeProto, dq: onnx.NodeProto, out: list[Violation]
) -> None:
    x = dq.input[0]
    src = g.producer.get(x)
    if not (g.is_const(x) or (src is not None and src.op_type == _Q and g.is_const(src.input[0]))):
        return  # a tensor computed at run time (e.g. attention's MatMul), not a weight
    values, rank = _quantized_weight(g, dq)
    name, dq_name = g.name(node), g.name(dq)
    scale = g.const(dq.input[1])
    if scale is not None and scale.size == 1:
        out.append(
            Violation(
                dq_name,
                "per-tensor-weight",
                f"DequantizeLinear '{dq_name}': weight of {node.op_type} '{name}' has one scale "
                "for the whole tensor; per output channel is more accurate",
                "warning",
            )
        )
    elif scale is not None and rank:
        axis = int(_attr(dq, "axis", 1))  # type: ignore[call-overload]
        axis = axis + rank if axis < 0 else axis
        expected = _expected_weight_axis(node, rank)
        if expected is not None and axis != expected:
            detail = f" (transB={_attr(node, 'transB', 0)})" if node.op_type == "Gemm" else ""
            out.append(
                Violation(
                    dq_name,
                    "weight-axis",
                    f"DequantizeLinear '{dq_name}': weight of {node.op_type} '{name}'{detail} is "
                    f"quantized per channel on axis {axis}; the output channels are axis "
                    f"{expected}",
                )
            )
    if values is not None and values.size and np.any(values == -128):
        n = int(np.count_nonzero(values == -128))
        out.append(
            Violation(
                dq_name,
                "weight-range",
                f"DequantizeLinear '{dq_name}': weight of {node.op_type} '{name}' has {n} "
                "value(s) of -128; TensorRT's int8 weights use [-127, 127]",
            )
        )


def _check_inputs(g: _Graph, node: onnx.NodeProto, out: list[Violation]) -> None:
    name = g.name(node)
    act, other = node.input[0], node.input[1]
    quantized = [g.from_dq(act), g.from_dq(other)]
    if all(quantized):
        return
    if not any(quantized):
        out.append(
            Violation(
                name,
                "unquantized-input",
                f"{node.op_type} '{name}': no input comes from a DequantizeLinear; "
                "the layer runs in float",
                "warning",
            )
        )
        return
    missing = act if not quantized[0] else other
    role = "activation" if not quantized[0] else "second input"
    out.append(
        Violation(
            name,
            "unquantized-input",
            f"{node.op_type} '{name}': {role} '{missing}' does not come from a "
            "DequantizeLinear while the other input does; TensorRT cannot run it in int8",
        )
    )


def _conv_output(g: _Graph, tensor: str) -> onnx.NodeProto | None:
    """The Conv/ConvTranspose producing `tensor` (directly, or through a BatchNormalization)."""
    node = g.producer.get(tensor)
    if node is not None and node.op_type == "BatchNormalization":
        node = g.producer.get(node.input[0])
    return node if node is not None and node.op_type in _CONV_OPS else None


def _check_residuals(g: _Graph, out: list[Violation]) -> None:
    for node in g.graph.node:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        a, b = node.input
        if g.is_const(a) or g.is_const(b):
            continue
        name = g.name(node)
        dq = [g.from_dq(a), g.from_dq(b)]
        if all(dq):
            continue
        if any(dq):
            skip = b if dq[0] else a
            if _conv_output(g, skip) is not None:
                continue  # Add(Conv, DQ(skip)): the fused pattern
            out.append(
                Violation(
                    name,
                    "residual-skip-unquantized",
                    f"Add '{name}': input '{skip}' is not Q/DQ'd while '{a if dq[0] else b}' "
                    "is; quantize the skip input so TensorRT can fuse the Add",
                )
            )
            continue
        convs = [_conv_output(g, t) for t in (a, b)]
        quantized = [c is not None and g.from_dq(c.input[0]) for c in convs]
        if any(quantized):
            skip = b if quantized[0] else a
            out.append(
                Violation(
                    name,
                    "residual-skip-unquantized",
                    f"Add '{name}': skip input '{skip}' of a quantized Conv branch is not "
                    "Q/DQ'd; TensorRT fuses Conv+Add only with a quantized skip input",
                )
            )


def _check_concats(g: _Graph, out: list[Violation]) -> None:
    for node in g.graph.node:
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            continue
        scales: list[tuple[str, np.ndarray]] = []
        for tensor in node.input:
            if tensor and g.from_dq(tensor):
                scale = g.const(g.producer[tensor].input[1])
                if scale is not None:
                    scales.append((tensor, scale))
        if len(scales) < 2:
            continue
        first_tensor, first = scales[0]
        for tensor, scale in scales[1:]:
            if scale.shape != first.shape or not np.array_equal(scale, first):
                name = g.name(node)
                out.append(
                    Violation(
                        name,
                        "concat-scale-mismatch",
                        f"Concat '{name}': input '{tensor}' has scale {_show(scale)}, input "
                        f"'{first_tensor}' {_show(first)}; Concat inputs should share one scale",
                    )
                )
                break


def _show(scale: np.ndarray) -> str:
    flat = scale.reshape(-1)
    return f"{float(flat[0]):.6g}" if flat.size == 1 else f"[{flat.size} values]"


def _check_outputs(g: _Graph, out: list[Violation]) -> None:
    for output in g.graph.output:
        node = g.producer.get(output.name)
        elem = g.types.get(output.name)
        from_q = node is not None and node.op_type == _Q
        if from_q or elem in (TensorProto.INT8, TensorProto.UINT8):
            where = g.name(node) if node is not None else output.name
            cause = (
                f"comes from QuantizeLinear '{where}'"
                if from_q
                else f"is {TensorProto.DataType.Name(elem)}"  # type: ignore[arg-type]
            )
            out.append(
                Violation(
                    where,
                    "quantized-output",
                    f"graph output '{output.name}' {cause}; graph outputs must stay float",
                )
            )


def lint_qdq(model: onnx.ModelProto, target: str = "tensorrt") -> list[Violation]:
    """Every violation of `target`'s Q/DQ rules in `model`'s main graph (see the module
    docstring), grouped by check and in graph order within a check. For TensorRT the
    placement checks (`unquantized-input`, residuals, Concat) run only when the model
    has any Q/DQ, so a float model gets no violations. Raises ConfigError for an
    unknown target."""
    if target not in TARGETS:
        raise ConfigError(f"unknown lint target {target!r}; valid: {', '.join(TARGETS)}")
    g = _Graph(model)
    if target == "onnxruntime-cpu":
        return _lint_ort_cpu(g)
    has_qdq = bool(_qdq_nodes(g))
    out: list[Violation] = []
    _check_qdq_types(g, out)
    _check_layers(g, has_qdq, out)
    if has_qdq:
        _check_residuals(g, out)
        _check_concats(g, out)
    _check_outputs(g, out)
    return out


_ORT_FUSED_TYPES = (TensorProto.INT8, TensorProto.UINT8)


def _lint_ort_cpu(g: _Graph) -> list[Violation]:
    out: list[Violation] = []
    for node in _qdq_nodes(g):
        qtype = g.quant_type(node)
        if qtype is None or qtype in _ORT_FUSED_TYPES:
            continue
        if qtype == TensorProto.INT32 and _only_bias(g, node):
            continue  # an int32 bias: what QLinearConv takes
        name = g.name(node)
        out.append(
            Violation(
                name,
                "unfused-type",
                f"{node.op_type} '{name}' uses {TensorProto.DataType.Name(qtype)}; ONNX "
                "Runtime's CPU integer kernels take int8/uint8, so this runs as float",
                "warning",
            )
        )
    layers: list[Violation] = []
    _check_layers(g, False, layers)  # weights only: axis, per-tensor, -128, bias
    out += [v for v in layers if v.rule in ("weight-axis", "per-tensor-weight")]
    for node in g.graph.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2 or not g.from_dq(node.input[1]):
            continue
        dq = g.producer[node.input[1]]
        if g.is_const(dq.input[0]) and g.quant_type(dq) == TensorProto.UINT8:
            name = g.name(dq)
            out.append(
                Violation(
                    name,
                    "uint8-weights",
                    f"DequantizeLinear '{name}': weight of {node.op_type} '{g.name(node)}' is "
                    "uint8; int8 weights (U8S8) run faster on x86",
                    "warning",
                )
            )
    outputs: list[Violation] = []
    _check_outputs(g, outputs)
    out += [Violation(v.node, v.rule, v.message, "warning") for v in outputs]
    return out


def format_violations(violations: Sequence[Violation] | Iterable[Violation]) -> str:
    """One line per violation: `severity  rule  node: message`, then a count."""
    items = list(violations)
    if not items:
        return "no violations"
    rule_w = max(len(v.rule) for v in items)
    lines = [f"{v.severity:<7}  {v.rule:<{rule_w}}  {v.node}: {v.message}" for v in items]
    errors = sum(v.severity == "error" for v in items)
    lines.append(f"{errors} error(s), {len(items) - errors} warning(s)")
    return "\n".join(lines)
