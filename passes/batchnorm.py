"""Fold inference BatchNormalization and per-channel Mul/Add into the preceding layer.

    Conv|ConvTranspose|Gemm(x, W, b) -> BatchNormalization  =>  Conv|ConvTranspose|Gemm(x, W*s, b*s + t)
    MatMul(x, W) -> BatchNormalization  (rank-2 output)     =>  MatMul(x, W*s) -> Add(t)
    Conv|ConvTranspose|Gemm|MatMul -> Mul(c)                =>  the layer with W*c (and b*c)
    Conv|ConvTranspose|Gemm -> Add(c) | Sub(c)              =>  the layer with b+c | b-c
    BatchNormalization -> Mul(c) | Add(c) | Sub(c)          =>  BatchNormalization (gamma*c, beta*c | beta+-c)

where s = gamma / sqrt(var + eps) and t = beta - mean * s per output channel, computed
in float64 and stored in the weight's dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.graph import (
    FLOAT_DTYPES,
    const_value,
    infer_shapes,
    is_graph_output,
    output_ids,
    set_constant_input,
    sole_consumer,
    unique_name,
)
from onnxslim_edge.pipeline import Context, Pass, PassReport

__all__ = ["FoldBatchNorm", "FoldBatchNormConfig"]

log = logging.getLogger(__name__)

#: Layers whose weights can absorb a per-output-channel affine map.
LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True, kw_only=True)
class FoldBatchNormConfig:
    """Options of the `fold-batchnorm` pass.

    - `fold_mul_add`: also fold per-channel Mul/Add/Sub by constants after a layer.
    """

    fold_mul_add: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.fold_mul_add, bool):
            raise ConfigError(
                f"fold-batchnorm.fold_mul_add: expected true/false, got {self.fold_mul_add!r}"
            )


class _Skip(Exception):
    """A candidate that cannot be folded exactly; the message is the reason."""


class FoldBatchNorm(Pass):
    """Conv/ConvTranspose/Gemm/MatMul -> BatchNormalization => the layer with BN folded
    into its weights and bias; likewise a per-channel Mul/Add/Sub by a constant, which
    also folds into a BatchNormalization that cannot itself be folded. Exact
    up to float rounding: the folded parameters are computed in float64 and rounded once
    to the weight's dtype (float16, float32 or float64).

    Folds only when the layer's output feeds nothing else and is not a graph output,
    the weights and BN parameters are constants, BN is in inference mode (one output)
    and the constant's broadcast maps onto the output-channel axis. Everything else is
    left alone and recorded with a reason; weights shared with other nodes are copied.

    Counters: `folded_batchnorm`, `folded_mul`, `folded_add`.
    """

    name: ClassVar[str] = "fold-batchnorm"
    Config: ClassVar[type] = FoldBatchNormConfig
    lossless: ClassVar[bool] = True

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        report = self.new_report()
        for key in ("folded_batchnorm", "folded_mul", "folded_add"):
            report.count(key, 0)
        graph.toposort()
        folder = _Folder(graph)
        for node in list(graph.nodes):
            if node.op == "BatchNormalization":
                kind = "folded_batchnorm"
            elif self.config.fold_mul_add and node.op in ("Mul", "Add", "Sub"):
                kind = "folded_mul" if node.op == "Mul" else "folded_add"
            else:
                continue
            try:
                detail = folder.fold(node)
            except _Skip as skip:
                report.skip(node, str(skip))
                continue
            if detail is None:
                continue
            report.count(kind)
            report.detail(node=node.name, op=node.op, **detail)
        return report


class _Folder:
    """Match, check and rewrite one follower node (BN, Mul, Add, Sub) at a time."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.outputs = output_ids(graph)  # graph and subgraph outputs: names must stay
        self._shapes: dict[str, Any] | None = None

    def fold(self, node: Any) -> dict[str, Any] | None:
        """Fold `node` into its producer; None when it is no candidate (nothing to report)."""
        if node.op == "BatchNormalization":
            x, scale, shift = self._batchnorm(node)
            layer = self._layer_of(x, node, strict=True)
            assert layer is not None
            self._check_channels(layer, scale.size, "BatchNormalization")
            self._apply(layer, node, scale, shift)
            return {"into": layer.name, "layer_op": layer.op, "channels": int(scale.size)}

        # Mul/Add/Sub: one operand produced by a layer, the other a constant.
        match = self._binary(node)
        if match is None:
            return None
        x, const = match
        if node.op != "Mul" and len(x.inputs) == 1 and x.inputs[0].op == "MatMul":
            return None  # MatMul + Add is the bias pattern already: nothing to fold into
        bn = self._batchnorm_of(x, node)
        if bn is not None:
            vec = self._per_channel(bn, const, node)
            self._apply_to_batchnorm(bn, node, vec)
            return {"into": bn.name, "layer_op": bn.op, "channels": int(vec.size)}
        layer = self._layer_of(x, node, strict=False)
        if layer is None:
            return None
        vec = self._per_channel(layer, const, node)
        if node.op == "Mul":
            scale, shift = vec, None
        else:
            scale, shift = None, (-vec if node.op == "Sub" else vec)
        self._apply(layer, node, scale, shift)
        return {"into": layer.name, "layer_op": layer.op, "channels": int(vec.size)}

    # ------------------------------------------------------------------ matching

    def _batchnorm(self, node: Any) -> tuple[Any, np.ndarray, np.ndarray]:
        outputs = [t for t in node.outputs if not t.is_empty()]
        if len(outputs) != 1:
            raise _Skip(f"training-mode BatchNormalization ({len(outputs)} outputs)")
        if node.attrs.get("training_mode", 0):
            raise _Skip("BatchNormalization has training_mode=1")
        if not node.attrs.get("spatial", 1):
            raise _Skip("BatchNormalization has spatial=0 (per-element statistics)")
        if len(node.inputs) != 5:
            raise _Skip(f"BatchNormalization has {len(node.inputs)} inputs, expected 5")
        params = [const_value(t) for t in node.inputs[1:]]
        if any(p is None for p in params):
            raise _Skip("BatchNormalization parameters are not constants")
        gamma, beta, mean, var = (np.asarray(p) for p in params)
        if any(p.dtype not in FLOAT_DTYPES for p in (gamma, beta, mean, var)):
            raise _Skip("BatchNormalization parameters are not float16/32/64")
        if (
            any(p.ndim != 1 for p in (gamma, beta, mean, var))
            or len({p.size for p in (gamma, beta, mean, var)}) != 1
        ):
            raise _Skip("BatchNormalization parameters are not vectors of one length")
        eps = float(node.attrs.get("epsilon", 1e-5))
        g, b, m, v = (p.astype(np.float64) for p in (gamma, beta, mean, var))
        scale = g / np.sqrt(v + eps)
        shift = b - m * scale
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
            raise _Skip("BatchNormalization folds to non-finite values")
        return node.inputs[0], scale, shift

    def _binary(self, node: Any) -> tuple[Any, np.ndarray] | None:
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            return None
        a, b = node.inputs
        ca, cb = const_value(a), const_value(b)
        if cb is not None and ca is None:
            return a, cb
        if ca is not None and cb is None and node.op != "Sub":
            return b, ca
        return None

    def _batchnorm_of(self, x: Any, follower: Any) -> Any | None:
        """The foldable inference BatchNormalization producing `x` for `follower` only."""
        if len(x.inputs) != 1 or x.inputs[0].op != "BatchNormalization":
            return None
        bn = x.inputs[0]
        if sole_consumer(self.graph, x, self.outputs) is not follower:
            return None
        try:
            self._batchnorm(bn)
        except _Skip:
            return None
        return bn

    def _layer_of(self, x: Any, follower: Any, *, strict: bool) -> Any | None:
        """The foldable layer producing `x`; raise _Skip (strict) or return None if none."""
        if len(x.inputs) != 1 or x.inputs[0].op not in LAYERS:
            if strict:
                raise _Skip("input is not produced by Conv/ConvTranspose/Gemm/MatMul")
            return None
        layer = x.inputs[0]
        if sole_consumer(self.graph, x, self.outputs) is not follower:
            if strict:
                raise _Skip(f"{layer.op} output has other consumers or is a graph output")
            return None
        if len([t for t in layer.outputs if not t.is_empty()]) != 1:
            raise _Skip(f"{layer.op} has more than one output")
        weight = const_value(layer.inputs[1]) if len(layer.inputs) > 1 else None
        if weight is None:
            raise _Skip(f"{layer.op} weight is not a constant")
        if weight.dtype not in FLOAT_DTYPES:
            raise _Skip(f"{layer.op} weight dtype {weight.dtype} is not float16/32/64")
        if len(layer.inputs) > 2 and not layer.inputs[2].is_empty():
            bias = const_value(layer.inputs[2])
            if bias is None:
                raise _Skip(f"{layer.op} bias is not a constant")
            if bias.dtype != weight.dtype:
                raise _Skip(f"{layer.op} bias dtype differs from the weight's")
        if layer.op in ("MatMul", "Gemm") and weight.ndim != 2:
            raise _Skip(f"{layer.op} weight is not a 2-D matrix")
        if layer.op in ("Conv", "ConvTranspose") and weight.ndim < 3:
            raise _Skip(f"{layer.op} weight has rank {weight.ndim}")
        if layer.op == "ConvTranspose" and weight.shape[0] % int(layer.attrs.get("group", 1)):
            raise _Skip("ConvTranspose input channels are not divisible by group")
        if layer.op == "Gemm" and len(layer.inputs) > 2 and not layer.inputs[2].is_empty():
            c_shape = const_value(layer.inputs[2]).shape
            if len(c_shape) > 2 or (c_shape and c_shape[-1] not in (1, self._channels(layer))):
                raise _Skip(f"Gemm C of shape {c_shape} does not broadcast per output column")
        return layer

    def _channels(self, layer: Any) -> int:
        """Output channels of the layer (size of the axis the fold scales)."""
        w = const_value(layer.inputs[1])
        if layer.op == "Conv":
            return int(w.shape[0])
        if layer.op == "ConvTranspose":
            return int(w.shape[1]) * int(layer.attrs.get("group", 1))
        if layer.op == "Gemm":
            return int(w.shape[0] if layer.attrs.get("transB", 0) else w.shape[1])
        return int(w.shape[1])  # MatMul

    def _output_rank(self, layer: Any) -> int | None:
        if layer.op in ("Conv", "ConvTranspose"):
            return const_value(layer.inputs[1]).ndim
        if layer.op == "Gemm":
            return 2
        return self._rank(layer.inputs[0])  # MatMul with a 2-D B keeps A's rank

    def _rank(self, tensor: Any) -> int | None:
        if tensor.shape is not None:
            return len(tensor.shape)
        if self._shapes is None:
            self._shapes = infer_shapes(self.graph)
        info = self._shapes.get(tensor.name)
        return None if info is None else len(info.shape)

    def _check_channels(self, layer: Any, count: int, what: str) -> None:
        channels = self._channels(layer)
        if count != channels:
            raise _Skip(f"{what} has {count} channels, {layer.op} produces {channels}")
        if layer.op == "MatMul":
            rank = self._output_rank(layer)
            if rank != 2:
                raise _Skip(
                    "MatMul output rank is "
                    + ("unknown" if rank is None else str(rank))
                    + ": BatchNormalization axis 1 is not its last axis"
                )

    def _per_channel(self, layer: Any, const: np.ndarray, node: Any) -> np.ndarray:
        """The constant of a Mul/Add as one value per output channel, or _Skip."""
        if layer.op == "BatchNormalization":
            rank, axis = self._rank(layer.inputs[0]), 1
            channels = int(const_value(layer.inputs[1]).size)
        else:
            rank = self._output_rank(layer)
            axis = 1 if layer.op in ("Conv", "ConvTranspose") else (rank or 1) - 1
            channels = self._channels(layer)
        if const.dtype not in FLOAT_DTYPES:
            raise _Skip(f"{node.op} constant dtype {const.dtype} is not float16/32/64")
        if rank is None:
            raise _Skip(f"{layer.op} output rank is unknown")
        if const.ndim > rank:
            raise _Skip(f"{node.op} constant of rank {const.ndim} broadcasts the {layer.op} output")
        shape = (1,) * (rank - const.ndim) + tuple(const.shape)
        if any(d != 1 for i, d in enumerate(shape) if i != axis):
            raise _Skip(f"{node.op} constant of shape {tuple(const.shape)} is not per-channel")
        if shape[axis] not in (1, channels):
            raise _Skip(
                f"{node.op} constant has {shape[axis]} channels, {layer.op} produces {channels}"
            )
        vec = np.broadcast_to(const.reshape(-1).astype(np.float64), (channels,))
        if not np.all(np.isfinite(vec)):
            raise _Skip(f"{node.op} constant has non-finite values")
        return vec.copy()

    # ------------------------------------------------------------------ rewriting

    def _apply(
        self, layer: Any, follower: Any, scale: np.ndarray | None, shift: np.ndarray | None
    ) -> None:
        """Rewrite `layer` so that it computes `follower`'s output; remove `follower`.

        y = x * scale + shift per output channel (either may be None: 1 or 0).
        """
        w = const_value(layer.inputs[1])
        dtype = w.dtype
        channels = self._channels(layer)
        ones = np.ones(channels)
        s = ones if scale is None else scale
        t = np.zeros(channels) if shift is None else shift
        base = layer.name or "layer"

        if layer.op == "MatMul":
            if scale is not None:
                set_constant_input(
                    self.graph, layer, 1, (w * s[None, :]).astype(dtype), f"{base}_W"
                )
            if shift is not None:
                self._replace_with_add(layer, follower, t.astype(dtype))
                return
        elif layer.op == "Gemm":
            self._apply_gemm(layer, w, s, t, shift is not None, base)
        else:
            if scale is not None:
                set_constant_input(
                    self.graph, layer, 1, _scale_conv(layer, w, s).astype(dtype), f"{base}_W"
                )
            has_bias = len(layer.inputs) > 2 and not layer.inputs[2].is_empty()
            if has_bias or shift is not None:
                b = (
                    const_value(layer.inputs[2]).astype(np.float64)
                    if has_bias
                    else np.zeros(channels)
                )
                set_constant_input(self.graph, layer, 2, (b * s + t).astype(dtype), f"{base}_B")
        self._bypass(layer, follower)

    def _apply_gemm(
        self, layer: Any, w: np.ndarray, s: np.ndarray, t: np.ndarray, shifted: bool, base: str
    ) -> None:
        dtype = w.dtype
        trans_b = layer.attrs.get("transB", 0)
        new_w = w * (s[:, None] if trans_b else s[None, :])
        set_constant_input(self.graph, layer, 1, new_w.astype(dtype), f"{base}_W")
        has_c = len(layer.inputs) > 2 and not layer.inputs[2].is_empty()
        if not has_c and not shifted:
            return
        beta = float(layer.attrs.get("beta", 1.0))
        if has_c:
            c = const_value(layer.inputs[2])
            if c is None:
                raise AssertionError("checked in _layer_of")
            c = c.astype(np.float64)
            rows = c.shape[0] if c.ndim == 2 else 1
            c = np.broadcast_to(c, (rows, s.size)) * beta
            new_c = c * s + t
            if rows == 1:
                new_c = new_c.reshape(-1)
        else:
            new_c = t
        set_constant_input(self.graph, layer, 2, new_c.astype(dtype), f"{base}_C")
        layer.attrs["beta"] = 1.0

    def _apply_to_batchnorm(self, bn: Any, follower: Any, vec: np.ndarray) -> None:
        """BN then Mul(c) / Add(c) / Sub(c) per channel => one BN with new gamma/beta."""
        gamma, beta = (const_value(t) for t in bn.inputs[1:3])
        g, b = gamma.astype(np.float64), beta.astype(np.float64)
        if follower.op == "Mul":
            set_constant_input(self.graph, bn, 1, (g * vec).astype(gamma.dtype), f"{bn.name}_scale")
            new_b = b * vec
        else:
            new_b = b - vec if follower.op == "Sub" else b + vec
        set_constant_input(self.graph, bn, 2, new_b.astype(beta.dtype), f"{bn.name}_B")
        self._bypass(bn, follower)

    def _replace_with_add(self, layer: Any, follower: Any, shift: np.ndarray) -> None:
        """MatMul has no bias: the follower becomes Add(MatMul output, shift)."""
        x = layer.outputs[0]
        y = follower.outputs[0]
        follower.inputs.clear()
        follower.outputs.clear()
        self.graph.nodes.remove(follower)
        name = unique_name(self.graph, f"{follower.name or 'bn'}_shift")
        const = gs.Constant(name, np.array(shift, order="C"))
        add = gs.Node("Add", name=follower.name or None, inputs=[x, const], outputs=[y])
        self.graph.nodes.append(add)

    def _bypass(self, layer: Any, follower: Any) -> None:
        """The layer writes the follower's output tensor (name kept); the follower goes."""
        y = follower.outputs[0]
        follower.inputs.clear()
        follower.outputs.clear()
        self.graph.nodes.remove(follower)
        layer.outputs[0] = y
        if is_graph_output(self.graph, y):
            log.debug("%s now produces graph output %s", layer.name, y.name)


def _scale_conv(layer: Any, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W scaled along the output-channel axis (Conv: 0; ConvTranspose: 1 within groups)."""
    w = w.astype(np.float64)
    tail = (1,) * (w.ndim - 2)
    if layer.op == "Conv":
        return w * s.reshape((-1, 1, *tail))
    group = int(layer.attrs.get("group", 1))
    cin, cout_g = w.shape[0], w.shape[1]
    grouped = w.reshape((group, cin // group, cout_g, *w.shape[2:]))
    grouped = grouped * s.reshape((group, 1, cout_g, *tail))
    return grouped.reshape(w.shape)
