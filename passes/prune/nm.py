"""The `sparsify-nm` pass: N:M semi-structured sparsity (2:4 by default) along the reduction axis.

    W[o, c:c+m, y, x]  =>  the n largest |w| kept, the other m - n zeroed   (Conv, c = Cin)
    B[k:k+m, j]        =>  likewise along K                                 (Gemm, MatMul)

This is the pattern NVIDIA's sparse tensor cores (Ampere and later) run at up to twice
the dense math rate, and TensorRT uses when the engine is built with sparse weights
enabled: for every output channel and every kernel position, each group of 4
consecutive input channels holds at least 2 zeros. The checker, `check_nm`, is not a
pass and lives in `onnxslim_edge.analysis.sparsity_nm`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.analysis.sparsity_nm import NM_OPS, nm_qualifies, validate_pattern
from onnxslim_edge.analysis.weights import LayerWeight, from_reduction_groups, reduction_groups
from onnxslim_edge.passes.prune.magnitude import _check_count, _check_names, collect_layers
from onnxslim_edge.pipeline import Context, Pass, PassReport

__all__ = ["SparsifyNM", "SparsifyNMConfig", "nm_prune"]

log = logging.getLogger(__name__)


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
        validate_pattern(name, self.n, self.m, self.ops)
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
