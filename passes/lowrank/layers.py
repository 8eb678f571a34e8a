"""Which layers the `lowrank` pass can split, their geometry, and what each split costs.

A *layer* is a main-graph Gemm, MatMul or Conv (group 1) whose weight is a float
constant, possibly reached through Transpose/Reshape/Identity of a constant:

- Gemm(x, W, C): the weight as K x N is alpha * W (transB: W^T); transA is kept.
- MatMul(x, W) with a 2-D W: x may be batched (..., M, K).
- Conv(x, W, b): W (Cout, Cin, *k); `forms()` says which decompositions fit.

MACs and parameters of every form at every rank follow `analysis.cost`'s formulas
(out_elems * K for Gemm/MatMul, out_elems * Cin * prod(k) for Conv, biases not
counted; symbolic dims count 1), so the estimates equal what `model_cost` measures
after the rewrite.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.graph import FLOAT_DTYPES, const_value

__all__ = ["MARKER", "Layer", "SplitGroup", "find_layers", "layer_name", "split_groups"]

#: Nodes the pass writes are named `<layer>.lowrank<i>`; a second run leaves them alone.
MARKER = re.compile(r"^(?P<base>.+)\.lowrank(?P<index>\d+)$")

_LOOK_THROUGH = ("Transpose", "Reshape", "Identity")


def _int(d: Any) -> int:
    return d if isinstance(d, int) and d >= 0 else 1


def resolve_weight(tensor: Any) -> np.ndarray | None:
    """The value of `tensor` when it is a constant seen through Transpose/Reshape/Identity."""
    value = const_value(tensor)
    if value is not None or tensor is None or len(tensor.inputs) != 1:
        return value
    node = tensor.inputs[0]
    if node.op not in _LOOK_THROUGH or not node.inputs:
        return None
    source = resolve_weight(node.inputs[0])
    if source is None:
        return None
    if node.op == "Identity":
        return source
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return np.transpose(source, None if perm is None else list(perm))
    shape = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None:
        return None
    shape = [int(d) for d in shape.reshape(-1)]
    if not node.attrs.get("allowzero", 0):
        shape = [source.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    try:
        return np.reshape(source, shape)
    except ValueError:
        return None


@dataclass
class Layer:
    """One splittable layer at the shapes the pass counts MACs at."""

    node: gs.Node
    name: str
    op: str  # Gemm, MatMul, Conv
    weight: np.ndarray  # MatMul/Gemm: K x N (alpha and transB applied); Conv: (Cout, Cin, *k)
    rows: int  # Gemm/MatMul: rows M of x (batch dims folded); Conv: the batch
    in_spatial: tuple[int, ...] = ()
    out_spatial: tuple[int, ...] = ()
    spatial_ok: bool = False  # Conv 2-D with explicit pads: spatial SVD possible

    @property
    def input_tensor(self) -> str:
        return self.node.inputs[0].name

    def forms(self) -> list[str]:
        if self.op != "Conv":
            return ["svd"]
        kernel = self.weight.shape[2:]
        if math.prod(kernel) == 1:
            return ["channel"]
        forms = ["channel"]
        if self.spatial_ok and len(kernel) == 2 and min(kernel) > 1:
            forms.append("spatial")
        forms.append("tucker2")
        return forms

    @property
    def shape_text(self) -> str:
        return " x ".join(str(d) for d in self.weight.shape)

    def dense(self) -> tuple[int, int]:
        """(MACs, weight elements) as the layer is."""
        w = self.weight
        if self.op != "Conv":
            k, n = w.shape
            return self.rows * k * n, k * n
        return self.rows * math.prod(self.out_spatial) * w.size, w.size

    def cost(self, form: str, rank: Sequence[int]) -> tuple[int, int]:
        """(MACs, weight elements) of the layer split in `form` at `rank`."""
        w = self.weight
        if form == "svd" and self.op == "Conv":  # data-aware channel SVD, as a matrix
            form = "channel"
        if form == "svd":
            (r,) = rank
            k, n = w.shape
            return self.rows * r * (k + n), r * (k + n)
        cout, cin, *kernel = w.shape
        pk = math.prod(kernel)
        out_px = self.rows * math.prod(self.out_spatial)
        in_px = self.rows * math.prod(self.in_spatial)
        if form == "channel":
            (r,) = rank
            return out_px * r * (cin * pk + cout), r * (cin * pk + cout)
        if form == "spatial":
            (r,) = rank
            kh, kw = kernel
            mid_px = self.rows * self.out_spatial[0] * self.in_spatial[1]
            return (
                mid_px * r * cin * kh + out_px * cout * r * kw,
                r * cin * kh + cout * r * kw,
            )
        if form == "tucker2":
            r_in, r_out = rank
            return (
                in_px * r_in * cin + out_px * (r_out * r_in * pk + cout * r_out),
                r_in * cin + r_out * r_in * pk + cout * r_out,
            )
        raise ValueError(form)


def layer_name(node: gs.Node) -> str:
    """A node's name, or for an unnamed node its first output's (the factors' prefix)."""
    return node.name or node.outputs[0].name


def _skip(skips: list[tuple[gs.Node, str]], node: gs.Node, reason: str) -> None:
    skips.append((node, reason))


def _float(value: np.ndarray) -> bool:
    return value.dtype in FLOAT_DTYPES


def _spatial_ok(node: gs.Node) -> bool:
    auto = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    return auto in ("NOTSET", "VALID")


def find_layers(
    graph: gs.Graph,
    shapes: Mapping[str, Sequence[Any] | None],
    exclude: Sequence[str] = (),
    *,
    resplit: bool = False,
) -> tuple[list[Layer], list[tuple[gs.Node, str]]]:
    """The graph's splittable layers and, for the other Gemm/MatMul/Conv, why not.
    Factor layers of an earlier run are skipped unless `resplit`."""
    layers: list[Layer] = []
    skips: list[tuple[gs.Node, str]] = []
    excluded = set(exclude)
    for node in graph.nodes:
        if node.op not in ("Gemm", "MatMul", "Conv") or node.domain not in (None, "", "ai.onnx"):
            continue
        if not node.outputs:
            continue
        if not resplit and node.name and MARKER.match(node.name):
            _skip(skips, node, "already split by lowrank")
            continue
        if node.name in excluded or (
            not node.name and node.outputs and layer_name(node) in excluded
        ):
            _skip(skips, node, "excluded by exclude_nodes")
            continue
        layer = _match(node, shapes, skips)
        if layer is not None:
            layers.append(layer)
    return layers, skips


def _match(node: gs.Node, shapes: Mapping[str, Sequence[Any] | None], skips: list) -> Layer | None:
    if len(node.inputs) < 2 or not node.outputs:
        _skip(skips, node, "missing inputs")
        return None
    name = layer_name(node)
    out_shape = shapes.get(node.outputs[0].name)
    in_shape = shapes.get(node.inputs[0].name)
    if node.op == "MatMul" and resolve_weight(node.inputs[0]) is not None:
        _skip(skips, node, "the constant is MatMul's first operand")
        return None
    w = resolve_weight(node.inputs[1])
    if w is None:
        _skip(skips, node, "weight is not a constant")
        return None
    if not _float(w):
        _skip(skips, node, f"weight dtype {w.dtype} is not float")
        return None
    if w.size == 0:
        _skip(skips, node, "empty weight")
        return None
    if node.op in ("Gemm", "MatMul"):
        if w.ndim != 2:
            _skip(skips, node, f"weight is {w.ndim}-D, not 2-D")
            return None
        if node.op == "Gemm":
            w = w.T if node.attrs.get("transB", 0) else w
            alpha = float(node.attrs.get("alpha", 1.0))
            if alpha != 1.0:
                w = (w * alpha).astype(w.dtype)
        if out_shape is None or len(out_shape) < 1:
            _skip(skips, node, "output shape unknown")
            return None
        rows = math.prod(_int(d) for d in out_shape[:-1])
        return Layer(node, name, node.op, np.asarray(w), rows)
    # Conv
    if int(node.attrs.get("group", 1)) != 1:
        _skip(skips, node, f"grouped convolution (group {node.attrs.get('group')})")
        return None
    if w.ndim < 3:
        _skip(skips, node, "convolution weight has no spatial dims")
        return None
    if out_shape is None or in_shape is None or len(out_shape) != w.ndim:
        _skip(skips, node, "input/output shapes unknown")
        return None
    if len(in_shape) != w.ndim:
        _skip(skips, node, "input shape unknown")
        return None
    return Layer(
        node,
        name,
        "Conv",
        np.asarray(w),
        _int(out_shape[0]),
        tuple(_int(d) for d in in_shape[2:]),
        tuple(_int(d) for d in out_shape[2:]),
        spatial_ok=_spatial_ok(node),
    )


@dataclass
class SplitGroup:
    """The nodes an earlier run wrote for one layer, and what the dense layer cost."""

    base: str
    nodes: list[gs.Node]
    dense_macs: int
    dense_params: int
    macs: int
    params: int


def split_groups(graph: gs.Graph, shapes: Mapping[str, Sequence[Any] | None]) -> list[SplitGroup]:
    """Layers split by an earlier run (nodes named `<base>.lowrank<i>`), with the MACs and
    weight elements the unsplit layer had: the first factor's input size times the last
    factor's outputs (K x N for matrices, Cin * prod(kernel) per output for convs)."""
    by_base: dict[str, list[tuple[int, gs.Node]]] = {}
    for node in graph.nodes:
        m = MARKER.match(node.name or "")
        if m and node.op in ("Gemm", "MatMul", "Conv"):
            by_base.setdefault(m["base"], []).append((int(m["index"]), node))
    groups = []
    for base, items in sorted(by_base.items()):
        nodes = [n for _, n in sorted(items, key=lambda t: t[0])]
        weights = [resolve_weight(n.inputs[1]) for n in nodes]
        out = shapes.get(nodes[-1].outputs[0].name)
        if any(w is None for w in weights) or out is None:
            continue
        macs = params = 0
        for n, w in zip(nodes, weights):
            o = shapes.get(n.outputs[0].name)
            if o is None:
                break
            if n.op == "Conv":
                macs += math.prod(_int(d) for d in o) * math.prod(w.shape[1:])
            else:
                k = w.shape[1] if n.op == "Gemm" and n.attrs.get("transB", 0) else w.shape[0]
                macs += math.prod(_int(d) for d in o) * k
            params += w.size
        else:
            first, last = weights[0], weights[-1]
            if nodes[0].op == "Conv":
                kernel = [max(w.shape[2 + i] for w in weights) for i in range(first.ndim - 2)]
                per_out = first.shape[1] * math.prod(kernel)
                dense_params = last.shape[0] * per_out
            else:
                t0 = nodes[0].op == "Gemm" and nodes[0].attrs.get("transB", 0)
                t1 = nodes[-1].op == "Gemm" and nodes[-1].attrs.get("transB", 0)
                per_out = first.shape[1] if t0 else first.shape[0]
                dense_params = per_out * (last.shape[0] if t1 else last.shape[1])
            dense_macs = math.prod(_int(d) for d in out) * per_out
            groups.append(SplitGroup(base, nodes, dense_macs, dense_params, macs, params))
    return groups
