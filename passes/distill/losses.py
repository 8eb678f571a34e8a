"""Distillation losses, built as ONNX nodes on top of the student graph.

`build_loss_model(student, spec)` returns a copy of the student whose only output is the
scalar `LOSS_OUTPUT`; the teacher's values enter as extra float inputs named
`teacher_input(name)` (and one-hot labels as `LABELS_INPUT`). Being plain ONNX, the same
loss runs in any ONNX Runtime (the tests check it against numpy) and any gradient engine
can differentiate it. Terms, each times its weight:

- `kd` (logits, softmax over the last axis): Hinton's
  `alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(labels, softmax(s))`;
  without labels the term is `T^2 * KL` (alpha does not apply). KL is summed over classes
  and averaged over every other position.
- `mse`: `mean((s - t)^2) / mean(t^2)` over the teacher's data — relative, so outputs
  of any scale weigh alike and 0 means equal.
- `cosine`: `1 - mean_n cos(s_n, t_n)`, each sample flattened.
- feature pairs: `mse` between a student tensor and a teacher tensor of the same shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.errors import ConfigError

__all__ = [
    "LABELS_INPUT",
    "LOSS_KINDS",
    "LOSS_OUTPUT",
    "FeaturePair",
    "LossSpec",
    "OutputLoss",
    "build_loss_model",
    "teacher_input",
]

LOSS_OUTPUT = "distill.loss"
LABELS_INPUT = "distill.labels"
LOSS_KINDS = ("kd", "mse", "cosine")


def teacher_input(name: str) -> str:
    """The loss model's input carrying the teacher's value of tensor `name`."""
    return f"distill.teacher.{name}"


@dataclass(frozen=True)
class OutputLoss:
    output: str
    kind: Literal["kd", "mse", "cosine"]
    weight: float = 1.0


@dataclass(frozen=True)
class FeaturePair:
    student: str
    teacher: str
    weight: float = 1.0


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """Which terms make the loss. `norms[name]` is mean(t^2) of teacher tensor `name`."""

    outputs: tuple[OutputLoss, ...]
    features: tuple[FeaturePair, ...] = ()
    temperature: float = 4.0
    alpha: float = 0.9
    labels: bool = False  # one-hot labels fed as LABELS_INPUT (for the first kd output)
    norms: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if not self.outputs and not self.features:
            raise ConfigError("distill: the loss has no terms")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha}")


class _Builder:
    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.graph, self.opset = graph, opset
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"distill.{base}.{self.n}"

    def const(self, value: np.ndarray | float, dtype: type = np.float32) -> str:
        name = self.name("c")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs: object) -> str:
        out = self.name(op_type.lower())
        self.graph.node.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def sum_last(self, x: str) -> str:
        """ReduceSum over the last axis, dropping it (axes became an input in opset 13)."""
        if self.opset >= 13:
            return self.op("ReduceSum", x, self.const(np.array([-1]), np.int64), keepdims=0)
        return self.op("ReduceSum", x, axes=[-1], keepdims=0)

    def mean_all(self, x: str) -> str:
        return self.op("ReduceMean", x, keepdims=0)

    def scaled(self, x: str, factor: float) -> str:
        return x if factor == 1.0 else self.op("Mul", x, self.const(factor))


def build_loss_model(
    student: onnx.ModelProto, spec: LossSpec, teacher_shapes: Mapping[str, Sequence[int | str]]
) -> onnx.ModelProto:
    """A copy of `student` computing `spec`'s loss as its only output.

    `teacher_shapes[name]` is the shape (batch axis included, symbolic allowed) of the
    teacher value each term reads; the loss model takes it as input `teacher_input(name)`.
    """
    model = onnx.ModelProto()
    model.CopyFrom(student)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    b = _Builder(graph, opset)
    outputs = {o.name for o in graph.output}
    norms = spec.norms or {}
    terms: list[str] = []

    def teacher(name: str) -> str:
        tname = teacher_input(name)
        if tname not in {i.name for i in graph.input}:
            graph.input.append(
                helper.make_tensor_value_info(tname, TensorProto.FLOAT, list(teacher_shapes[name]))
            )
        return tname

    labels_used = False
    for term in spec.outputs:
        if term.output not in outputs:
            raise ConfigError(f"distill: '{term.output}' is not an output of the student")
        s, t = term.output, teacher(term.output)
        if term.kind == "kd":
            with_labels = spec.labels and not labels_used
            value = _kd(b, s, t, spec.temperature, spec.alpha if with_labels else 1.0)
            if with_labels:
                labels_used = True
                graph.input.append(
                    helper.make_tensor_value_info(
                        LABELS_INPUT, TensorProto.FLOAT, list(teacher_shapes[term.output])
                    )
                )
                ce = _cross_entropy(b, s, LABELS_INPUT)
                value = b.op("Add", value, b.scaled(ce, 1.0 - spec.alpha))
        elif term.kind == "mse":
            value = _relative_mse(b, s, t, norms.get(term.output, 1.0))
        elif term.kind == "cosine":
            value = _cosine(b, s, t)
        else:  # pragma: no cover - LossSpec users validate kinds
            raise ConfigError(f"distill: unknown loss kind {term.kind!r}")
        terms.append(b.scaled(value, term.weight))
    for pair in spec.features:
        t = teacher(pair.teacher)
        value = _relative_mse(b, pair.student, t, norms.get(pair.teacher, 1.0))
        terms.append(b.scaled(value, pair.weight))
    total = terms[0]
    for term_value in terms[1:]:  # chained Add: ORT training has no gradient for Sum
        total = b.op("Add", total, term_value)
    graph.node.append(helper.make_node("Identity", [total], [LOSS_OUTPUT], name=LOSS_OUTPUT))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOSS_OUTPUT, TensorProto.FLOAT, []))
    return model


def _kd(b: _Builder, s: str, t: str, temperature: float, alpha: float) -> str:
    """alpha * T^2 * mean over positions of KL(softmax(t/T) || softmax(s/T))."""
    inv_t = b.const(1.0 / temperature)
    log_q = b.op("LogSoftmax", b.op("Mul", s, inv_t), axis=-1)
    log_p = b.op("LogSoftmax", b.op("Mul", t, inv_t), axis=-1)
    kl = b.sum_last(b.op("Mul", b.op("Exp", log_p), b.op("Sub", log_p, log_q)))
    return b.scaled(b.mean_all(kl), alpha * temperature**2)


def _cross_entropy(b: _Builder, s: str, onehot: str) -> str:
    log_q = b.op("LogSoftmax", s, axis=-1)
    return b.op("Neg", b.mean_all(b.sum_last(b.op("Mul", onehot, log_q))))


def _relative_mse(b: _Builder, s: str, t: str, norm: float) -> str:
    diff = b.op("Sub", s, t)
    return b.scaled(b.mean_all(b.op("Mul", diff, diff)), 1.0 / max(float(norm), 1e-12))


def _cosine(b: _Builder, s: str, t: str) -> str:
    sf, tf = b.op("Flatten", s, axis=1), b.op("Flatten", t, axis=1)
    dot = b.sum_last(b.op("Mul", sf, tf))
    ss = b.sum_last(b.op("Mul", sf, sf))
    tt = b.sum_last(b.op("Mul", tf, tf))
    denom = b.op("Add", b.op("Sqrt", b.op("Mul", ss, tt)), b.const(1e-12))
    return b.op("Sub", b.const(1.0), b.mean_all(b.op("Div", dot, denom)))
