"""The N:M sparsity checker: does every Conv/Gemm/MatMul weight hold at most n nonzeros
in each group of m consecutive entries along its reduction axis?

This is the pattern NVIDIA's sparse tensor cores (Ampere and later) run at up to twice
the dense math rate (2:4, along Cin for Conv and K for Gemm/MatMul). `check_nm` verifies
it on any model, also one no pass of ours made (dequantized int8 weights are read
through their DequantizeLinear); `format_nm_results` renders the verdict for a terminal;
`nm_qualifies` and `validate_pattern` are shared with the `sparsify-nm` pass, which
makes the pattern.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_edge.analysis.weights import (
    LayerWeight,
    check_weight_ops,
    reduction_groups,
    weight_of,
)
from onnxslim_edge.errors import ConfigError

__all__ = [
    "NM_OPS",
    "NMResult",
    "check_nm",
    "format_nm_results",
    "nm_qualifies",
    "validate_pattern",
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


def validate_pattern(name: str, n: Any, m: Any, ops: Any) -> None:
    """ConfigError unless 1 <= n < m are integers and `ops` a non-empty tuple of NM_OPS."""
    for key, value, minimum in (("m", m, 2), ("n", n, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name}.{key}: expected an integer >= {minimum}, got {value!r}")
    if n >= m:
        raise ConfigError(f"{name}: n must be smaller than m, got n={n}, m={m}")
    check_weight_ops(name, ops, NM_OPS)


@dataclass
class NMResult:
    """Whether one layer's weight follows the N:M pattern.

    `fraction_groups_ok` is the share of groups of m along the reduction axis with at
    most n nonzeros (0.0 when the layer cannot be grouped); `reason` says why `ok` is
    False, or names the pattern when it is True. `applicable` is False for a layer whose
    shape can never hold the pattern (a reduction dim not divisible by m, such as a
    first Conv's Cin of 1 or 3; depthwise or grouped convolutions): it runs dense by
    design, which is not a violation.
    """

    node: str
    op: str
    ok: bool
    reason: str
    fraction_groups_ok: float = 0.0
    groups: int = 0
    applicable: bool = True

    @property
    def violation(self) -> bool:
        """The layer could follow the pattern and does not (what `lint --nm` fails on)."""
        return self.applicable and not self.ok

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_nm(model: Any, n: int = 2, m: int = 4, *, ops: Sequence[str] = NM_OPS) -> list[NMResult]:
    """Check every Conv/Gemm/MatMul of `model` for the N:M pattern along its reduction axis.

    `model`: a path, bytes, `onnx.ModelProto` or `onnx_graphsurgeon.Graph`. One result
    per layer, in graph order, including layers that cannot qualify with the reason:
    not applicable (`applicable=False`) when their shape never can (not divisible by m,
    depthwise, grouped), a violation when they could (e.g. a weight not yet folded to a
    constant). Weights behind a
    DequantizeLinear of constants are checked on their dequantized values.
    """
    validate_pattern("check_nm", n, m, tuple(ops))
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
            results.append(NMResult(node.name, node.op, False, reason, applicable=False))
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
        (
            r.node,
            r.op,
            "yes" if r.ok else ("no" if r.applicable else "n/a"),
            f"{r.fraction_groups_ok:.3f}" if r.applicable else "-",
            r.reason if r.applicable else f"not applicable: {r.reason}",
        )
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header[:4], widths)) + "  " + header[4]]
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    lines.extend(
        "  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows
    )
    ok = sum(r.ok for r in results)
    applicable = sum(r.applicable for r in results)
    lines.append(
        f"{ok} of {applicable} layers follow {n}:{m} sparsity"
        + (
            f"; {len(results) - applicable} not applicable (run dense)"
            if applicable < len(results)
            else ""
        )
    )
    return "\n".join(lines)
