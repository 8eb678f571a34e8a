"""A gradient engine on plain ONNX Runtime: gradient graphs of standard ONNX ops (`onnx-ad`).

`onnx_ad.reverse` turns the loss model into one that also returns the loss's gradient
with respect to the trainable weights (moved to graph inputs), built from ordinary ONNX
operations, so any `onnxruntime` runs it: distillation in the `cpu` flavor, on Python
versions without an ORT-training wheel, and on aarch64. Its reverse rules need static
shapes (a Conv's transposed convolution must know its input size), so one gradient model
is built per set of input shapes met (the last, smaller batch gets its own), every
input dimension fixed to the batch's. The optimizer (AdamW with bias correction and decoupled weight
decay, or SGD) runs in numpy; its state saves to one `.npz`.

Activation Quantize->Dequantize pairs: `onnx-ad` gives QuantizeLinear its true zero
derivative, which would stop every gradient at the first Q/DQ. For a straight-through
estimator each pair `DQ(Q(x))` becomes `x + offset` in the gradient model, the offset
`DQ(Q(x)) - x` being measured per step by the loss model itself (one extra forward
pass): the forward values are exactly the quantized ones, the gradient passes unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxslim_edge.errors import UnsupportedError, first_line
from onnxslim_edge.passes.distill.engine import GradientEngine, OptimizerSpec, TrainingProgram

__all__ = ["OnnxAdEngine", "OnnxAdProgram"]

log = logging.getLogger(__name__)

_SEED_PREFIX = "adj_"


class OnnxAdEngine(GradientEngine):
    """Gradients by `onnx_ad.reverse`, run in an ONNX Runtime inference session."""

    name = "onnx-ad"
    no_gradient = frozenset({"Loop", "Scan"})

    def untrainable(self, node: onnx.NodeProto, position: int) -> str | None:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type in ("Conv", "ConvTranspose") and position == 1 and group > 1:
            return "onnx-ad 0.3.0 has no gradient for the weights of grouped convolutions"
        return None

    def compile(
        self,
        model: onnx.ModelProto,
        *,
        trainable: Sequence[str],
        optimizer: OptimizerSpec,
        workdir: Path,
        threads: int | None = None,
    ) -> OnnxAdProgram:
        return OnnxAdProgram(model, tuple(trainable), optimizer, threads=threads)


def _params_as_inputs(
    model: onnx.ModelProto, names: Sequence[str]
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(names)
    values = {
        t.name: numpy_helper.to_array(t).copy() for t in out.graph.initializer if t.name in wanted
    }
    missing = wanted - set(values)
    if missing:
        raise UnsupportedError(
            f"onnx-ad engine: trainable '{sorted(missing)[0]}' is not an initializer"
        )
    keep = [t for t in out.graph.initializer if t.name not in wanted]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    for name in names:
        v = values[name]
        out.graph.input.append(
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)
            )
        )
    return out, values


class OnnxAdProgram(TrainingProgram):
    def __init__(
        self,
        model: onnx.ModelProto,
        trainable: tuple[str, ...],
        optimizer: OptimizerSpec,
        *,
        threads: int | None,
    ) -> None:
        from onnxslim_edge.runtime import make_session

        self.trainable = trainable
        self.optimizer = optimizer
        self._threads = threads
        self._model, self.params = _params_as_inputs(model, trainable)
        self._loss_name = model.graph.output[0].name
        params = set(trainable)
        self.input_names = tuple(i.name for i in self._model.graph.input if i.name not in params)
        self._loss_session = make_session(self._model, threads=threads)
        self._pairs = _activation_qdq_pairs(self._model)
        self._offset_session = None
        if self._pairs:
            from onnxslim_edge.graph import exposing_session

            exposed = [n for pair in self._pairs for n in pair]
            self._offset_session = exposing_session(self._model, exposed, threads=threads)
        self._grad_sessions: dict[tuple[int, ...], tuple[Any, str]] = {}
        self.m = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.t = 0
        self._gradient_session(None)  # fail at compile time, not at the first step

    def _gradient_session(self, feeds: Mapping[str, np.ndarray] | None) -> tuple[Any, str]:
        """The gradient model for the input shapes of `feeds` (None: a probe, batch 2)."""
        from onnx_ad import UnsupportedOperator, reverse

        from onnxslim_edge.runtime import make_session

        params = set(self.trainable)
        inputs = [vi for vi in self._model.graph.input if vi.name not in params]
        if feeds is None:  # probe: symbolic dims 2, the rest as declared
            shapes = {
                vi.name: [
                    d.dim_value if d.HasField("dim_value") else 2
                    for d in vi.type.tensor_type.shape.dim
                ]
                for vi in inputs
            }
        else:
            shapes = {vi.name: list(np.shape(feeds[vi.name])) for vi in inputs if vi.name in feeds}
        key = tuple(tuple(shapes.get(vi.name, ())) for vi in inputs)
        if key in self._grad_sessions:
            return self._grad_sessions[key]
        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        for vi in model.graph.input:
            if vi.name in shapes:
                dims = vi.type.tensor_type.shape.dim
                for d, size in zip(dims, shapes[vi.name]):
                    d.Clear()
                    d.dim_value = int(size)
                if any(d.dim_value <= 0 for d in dims):
                    raise UnsupportedError(
                        f"onnx-ad engine: input '{vi.name}' has a symbolic dimension after the "
                        "batch axis; its gradient rules need static shapes"
                    )
        del model.graph.value_info[:]
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
            model = _straight_through(model, self._pairs)
            grad = reverse(
                model, inputs=list(self.trainable), outputs=[self._loss_name], layout="onnx"
            )
        except UnsupportedOperator as exc:
            raise UnsupportedError(
                f"onnx-ad cannot differentiate the graph: {first_line(exc)}"
            ) from exc
        except Exception as exc:  # shape inference or a rule failing on this graph
            raise UnsupportedError(
                f"onnx-ad cannot build the gradient graph: {first_line(exc)}"
            ) from exc
        seed = next(i.name for i in grad.graph.input if i.name == _SEED_PREFIX + self._loss_name)
        session = make_session(grad, threads=self._threads)
        self._grad_sessions[key] = (session, seed)
        return session, seed

    def _feeds(self, feeds: Mapping[str, np.ndarray], wanted: set[str]) -> dict[str, np.ndarray]:
        out = {k: np.ascontiguousarray(v) for k, v in feeds.items() if k in wanted}
        out.update({k: v for k, v in self.params.items() if k in wanted})
        return out

    def _offsets(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._offset_session is None:
            return {}
        session = self._offset_session
        wanted = {i.name for i in session.get_inputs()}
        names = [n for pair in self._pairs for n in pair]
        values = session.run(names, self._feeds(feeds, wanted))
        return {
            _offset_name(x): values[2 * i + 1] - values[2 * i]
            for i, (x, _) in enumerate(self._pairs)
        }

    def step(self, feeds: Mapping[str, np.ndarray], lr: float) -> float:
        session, seed = self._gradient_session(feeds)
        wanted = {i.name for i in session.get_inputs()}
        run_feeds = self._feeds(feeds, wanted)
        run_feeds.update(self._offsets(feeds))
        run_feeds[seed] = np.ones([1], np.float32)
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(None, run_feeds)))
        loss = float(np.asarray(values[self._loss_name]))
        self.t += 1
        b1, b2 = self.optimizer.betas
        for name in self.trainable:
            p = self.params[name]
            g = values[_SEED_PREFIX + name].reshape(p.shape).astype(p.dtype)
            if self.optimizer.kind == "sgd":
                p -= lr * g
                continue
            self.m[name] = b1 * self.m[name] + (1 - b1) * g
            self.v[name] = b2 * self.v[name] + (1 - b2) * g * g
            m_hat = self.m[name] / (1 - b1**self.t)
            v_hat = self.v[name] / (1 - b2**self.t)
            p -= lr * (
                m_hat / (np.sqrt(v_hat) + self.optimizer.eps) + self.optimizer.weight_decay * p
            )
        return loss

    def loss(self, feeds: Mapping[str, np.ndarray]) -> float:
        wanted = {i.name for i in self._loss_session.get_inputs()}
        return float(
            np.asarray(self._loss_session.run([self._loss_name], self._feeds(feeds, wanted))[0])
        )

    def get_parameters(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return {n: self.params[n].copy() for n in (names or self.trainable)}

    def set_parameters(self, values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            self.params[name] = np.array(value, dtype=self.params[name].dtype).reshape(
                self.params[name].shape
            )

    def save_state(self, path: Path) -> None:
        arrays = {"t": np.array(self.t)}
        for i, name in enumerate(self.trainable):
            arrays[f"p{i}"], arrays[f"m{i}"], arrays[f"v{i}"] = (
                self.params[name],
                self.m[name],
                self.v[name],
            )
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)

    def load_state(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as saved:
            self.t = int(saved["t"])
            for i, name in enumerate(self.trainable):
                self.params[name] = saved[f"p{i}"].copy()
                self.m[name], self.v[name] = saved[f"m{i}"].copy(), saved[f"v{i}"].copy()


def _offset_name(tensor: str) -> str:
    return f"distill.ste_offset.{tensor}"


def _activation_qdq_pairs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(Q input, DQ output) of every QuantizeLinear -> DequantizeLinear on an activation."""
    inits = {t.name for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        for dq in readers.get(node.output[0], []):
            if dq.op_type == "DequantizeLinear":
                pairs.append((node.input[0], dq.output[0]))
    return pairs


def _straight_through(model: onnx.ModelProto, pairs: Sequence[tuple[str, str]]) -> onnx.ModelProto:
    """Each pair's DequantizeLinear replaced by `x + offset` (offset a new input)."""
    if not pairs:
        return model
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]
    }
    by_output = dict((y, x) for x, y in pairs)
    nodes = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in by_output:
            x = by_output[node.output[0]]
            nodes.append(
                helper.make_node(
                    "Add", [x, _offset_name(x)], [node.output[0]], name=f"{node.name}/ste"
                )
            )
            if x not in shapes or any(d <= 0 for d in shapes[x]):
                raise UnsupportedError(
                    f"onnx-ad engine: the shape of '{x}' (before a Q/DQ) is unknown"
                )
            model.graph.input.append(
                helper.make_tensor_value_info(_offset_name(x), onnx.TensorProto.FLOAT, shapes[x])
            )
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model
