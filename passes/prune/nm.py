"""N:M semi-structured sparsity (2:4 by default) along the reduction axis, and its checker.

    W[o, c:c+m, y, x]  =>  the n largest |w| kept, the other m - n zeroed   (Conv, c = Cin)
    B[k:k+m, j]        =>  likewise along K                                 (Gemm, MatMul)

This is the pattern NVIDIA's sparse tensor cores (Ampere and later) run at up to twice
the dense math rate, and TensorRT uses when the engine is built with sparse weights
enabled: for every output channel and every kernel position, each group of 4
consecutive input channels holds at least 2 zeros. `check_nm` verifies the pattern on
any model, also one this pass did not make (dequantized int8 weights are read through
their DequantizeLinear).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.passes.prune.magnitude import (
    LayerWeight,
    _check_count,
    _check_names,
    _check_ops,
    collect_layers,
    from_reduction_groups,
    reduction_groups,
    weight_of,
)
from onnxslim_edge.pipeline import Context, Pass, PassReport

__all__ = [
    "NM_OPS",
    "NMResult",
    "SparsifyNM",
    "SparsifyNMConfig",
    "check_nm",
    "format_nm_results",
    "nm_prune",
    "nm_qualifies",
]

log = logging.getLogger(__name__)

#: Layer types TensorRT runs with sparse tensor-core kernels.
NM_OPS = ("Conv", "Gemm", "MatMul")

_AXIS_NAMES = {"Conv": "Cin", "Gemm": "K", "MatMul": "K"}


def nm_qualifies(weight: LayerWeight, m: int) -> str | None:
    """None when the layer can carry an N:M pattern along its reduction axis, else why not."""
    node, shape = weight.node, weight.values.shape
    if node.op not in NM_OPS:
        return f"{node.op} is not a layer with sparse kernels ({', '.join(NM_OPS)})"
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        if group > 1 and shape[1] == 1:
            return f"depthwise convolution (group={group}, 1 input channel per group)"
        if group > 1:
            return f"grouped convolution (group={group}): sparse kernels need group=1"
    dim = shape[weight.axis]
    if dim % m:
        return f"reduction dim {_AXIS_NAMES[node.op]}={dim} is not divisible by {m}"
    return None


def nm_prune(values: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """`values` with the m - n smallest |w| of every m consecutive entries along `axis` zeroed.

    Ties go to the lower index (zeroed first). Zeros already present stay bit-identical,
    so an N:M array is returned unchanged. `values.shape[axis]` must be divisible by m.
    """
    values = np.asarray(values)
    groups = reduction_groups(values, axis, m)
    order = np.argsort(np.abs(groups.astype(np.float64)), axis=-1, kind="stable")
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, order[..., : m - n], True, axis=-1)
    element_mask = from_reduction_groups(mask, values.shape, axis) & (values != 0)
    if not element_mask.any():
        return values
    out = np.array(values, copy=True)
    out[element_mask] = 0
    return out


@dataclass(frozen=True, kw_only=True)
class SparsifyNMConfig:
    """Options of the `sparsify-nm` pass.

    - `n`, `m`: keep at most n nonzeros in every m consecutive weights (2:4 for TensorRT).
    - `ops`: layer types to sparsify (Conv, Gemm, MatMul).
    - `exclude_nodes`: node names left dense.
    - `min_params`: layers with fewer weights are left dense.
    """

    n: int = 2
    m: int = 4
    ops: tuple[str, ...] = NM_OPS
    exclude_nodes: tuple[str, ...] = ()
    min_params: int = 0

    def __post_init__(self) -> None:
        name = "sparsify-nm"
        _check_count(f"{name}.m", self.m, 2)
        _check_count(f"{name}.n", self.n, 1)
        if self.n >= self.m:
            raise ConfigError(f"{name}: n must be smaller than m, got n={self.n}, m={self.m}")
        _check_ops(name, self.ops, NM_OPS)
        _check_names(name, self.exclude_nodes)
        _check_count(f"{name}.min_params", self.min_params, 0)


class SparsifyNM(Pass):
    """W => W with the m - n smallest |w| of every m consecutive weights along the
    reduction axis zeroed (Conv: Cin per output channel and kernel position; Gemm: K,
    axis 1 with transB=1 else 0; MatMul B (..., K, N): K). Lossy: the error measure is
    the zeroed weights' share of each layer's L2 norm (`detail.pruned_norm_ratio`).

    Left alone, with a reason: reduction dims not divisible by m, depthwise and grouped
    convolutions, weights that are not constants or not float, weights also read by
    other nodes, layers in `exclude_nodes` or below `min_params`. A weight shared by
    several layers is sparsified once. Running the pass twice changes nothing.

    Counters: `layers_sparsified`, `params_considered`, `weights_zeroed`.
    """

    name: ClassVar[str] = "sparsify-nm"
    Config: ClassVar[type] = SparsifyNMConfig
    lossless: ClassVar[bool] = False

    def run(self, graph: gs.Graph, ctx: Context) -> PassReport:
        cfg = self.config
        report = self.new_report()
        for key in ("layers_sparsified", "params_considered", "weights_zeroed"):
            report.count(key, 0)
        groups, skips = collect_layers(graph, cfg.ops, cfg.exclude_nodes, min_params=cfg.min_params)
        for node, reason in skips:
            report.skip(node, reason)
        for group in groups:
            w = group.weight
            reason = None
            for reader in group.readers:  # readers agree on the axis, not on `group`
                reason = reason or nm_qualifies(
                    LayerWeight(node=reader, values=w.values, axis=w.axis), cfg.m
                )
            if reason is not None:
                for reader in group.readers:
                    report.skip(reader, reason)
                continue
            old = np.asarray(w.values)
            new = nm_prune(old, w.axis, cfg.n, cfg.m)
            zeroed = int(np.count_nonzero((old != 0) & (new == 0)))
            if zeroed:
                w.constant.values = new
                report.count("layers_sparsified")
            old64 = old.astype(np.float64)
            norm = float(np.linalg.norm(old64.ravel()))
            removed = float(np.linalg.norm((old64 - new).ravel()))
            report.count("params_considered", int(old.size))
            report.count("weights_zeroed", zeroed)
            report.detail(
                node=group.readers[0].name,
                op=group.readers[0].op,
                weight=w.name,
                shared_by=group.node_names,
                params=int(old.size),
                reduction_axis=w.axis,
                groups=int(old.size // cfg.m),
                zeros_before=int(np.count_nonzero(old == 0)),
                zeros_after=int(np.count_nonzero(new == 0)),
                sparsity_after=float(np.count_nonzero(new == 0) / old.size),
                pruned_norm_ratio=removed / norm if norm > 0 else 0.0,
            )
        return report


# --------------------------------------------------------------------------- checker


@dataclass
class NMResult:
    """Whether one layer's weight follows the N:M pattern.

    `fraction_groups_ok` is the share of groups of m along the reduction axis with at
    most n nonzeros (0.0 when the layer cannot be grouped); `reason` says why `ok` is
    False, or names the pattern when it is True.
    """

    node: str
    op: str
    ok: bool
    reason: str
    fraction_groups_ok: float = 0.0
    groups: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_nm(model: Any, n: int = 2, m: int = 4, *, ops: Sequence[str] = NM_OPS) -> list[NMResult]:
    """Check every Conv/Gemm/MatMul of `model` for the N:M pattern along its reduction axis.

    `model`: a path, bytes, `onnx.ModelProto` or `onnx_graphsurgeon.Graph`. One result
    per layer, in graph order, including layers that cannot qualify (not constant,
    not divisible by m, depthwise ...) with the reason. Weights behind a
    DequantizeLinear of constants are checked on their dequantized values.
    """
    SparsifyNMConfig(n=n, m=m, ops=tuple(ops))  # validates n, m and ops
    if isinstance(model, gs.Graph):
        graph = model
    else:
        from onnxslim_edge.model import load_model

        graph = gs.import_onnx(load_model(model))
    results = []
    for node in graph.nodes:
        if node.op not in ops:
            continue
        weight = weight_of(node, graph, dequantize=True)
        if isinstance(weight, str):
            results.append(NMResult(node.name, node.op, False, weight))
            continue
        reason = nm_qualifies(weight, m)
        if reason is not None:
            results.append(NMResult(node.name, node.op, False, reason))
            continue
        groups = reduction_groups(weight.values, weight.axis, m)
        nonzeros = np.count_nonzero(groups, axis=-1)
        total = int(nonzeros.size)
        good = int(np.count_nonzero(nonzeros <= n))
        axis = _AXIS_NAMES[node.op]
        if good == total:
            reason = f"{n}:{m} along {axis} ({total} groups)"
        else:
            reason = (
                f"{total - good} of {total} groups of {m} along {axis} have more than {n} nonzeros"
            )
        results.append(
            NMResult(
                node.name, node.op, good == total, reason, good / total if total else 1.0, total
            )
        )
    log.debug(
        "check_nm: %d of %d layers follow %d:%d", sum(r.ok for r in results), len(results), n, m
    )
    return results


def format_nm_results(results: Sequence[NMResult], n: int = 2, m: int = 4) -> str:
    """A plain-text table of `check_nm` results and a one-line verdict, for a terminal."""
    header = ("node", "op", "ok", "groups ok", "reason")
    rows = [
        (r.node, r.op, "yes" if r.ok else "no", f"{r.fraction_groups_ok:.3f}", r.reason)
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header[:4], widths)) + "  " + header[4]]
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    lines.extend(
        "  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows
    )
    ok = sum(r.ok for r in results)
    lines.append(f"{ok} of {len(results)} layers follow {n}:{m} sparsity")
    return "\n".join(lines)
