"""Reports as data: what one pass changed (`PassReport`) and what a pipeline did.

`PassReport` is filled by the pass (skips, warnings, counters, per-layer details) and by
the one measurement in `onnxslim_edge.base.run_pass` (modified, nodes added/removed,
cost and wall time); a nested pipeline's report lists its passes in `passes`.
`PipelineReport` renders as JSON (`to_dict`, `to_json`) and as a before/after table
(`to_table`, with `human` numbers and `format_rows` columns).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PassReport", "PipelineReport", "Skip", "format_rows", "human", "jsonable"]

log = logging.getLogger(__name__)


@dataclass
class Skip:
    """A part of the graph a pass left alone, and why."""

    node: str
    op: str
    reason: str


@dataclass
class PassReport:
    """What one pass changed, as data.

    The pass adds skips, warnings, counters and details; `modified`, the node counts,
    costs and wall time are measured by `onnxslim_edge.base.run_pass` (the same whether
    the pass runs alone or in a pipeline); `validation` is the lossless comparison, when
    one ran; `passes` holds the reports of a nested pipeline's passes.
    """

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    modified: bool = False
    nodes_before: int = 0
    nodes_after: int = 0
    nodes_added: int = 0
    nodes_removed: int = 0
    cost_before: dict[str, int] = field(default_factory=dict)
    cost_after: dict[str, int] = field(default_factory=dict)
    wall_time_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    passes: list[PassReport] = field(default_factory=list)

    def skip(self, node: Any, reason: str) -> None:
        """Record that `node` (a gs.Node, NodeProto or name) was left alone, and why."""
        op = getattr(node, "op", None) or getattr(node, "op_type", "") or ""
        name = getattr(node, "name", None)
        if not name and not isinstance(node, str):  # an unnamed node: by what it computes
            outputs = list(getattr(node, "outputs", None) or getattr(node, "output", None) or [])
            first = getattr(outputs[0], "name", outputs[0]) if outputs else ""
            name = f"{op} -> {first}" if first else op or "?"
        name = name or str(node)
        self.skips.append(Skip(name, op, reason))

    def warn(self, message: str) -> None:
        log.warning("%s: %s", self.name, message)
        self.warnings.append(message)

    def detail(self, **values: Any) -> None:
        """Per-layer details (chosen ranks, scales, pruned channels ...)."""
        self.details.append(values)

    def count(self, key: str, n: int = 1) -> None:
        """Count a kind of rewrite (e.g. `folded_batchnorm`)."""
        self.counters[key] = self.counters.get(key, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


@dataclass
class PipelineReport:
    passes: list[PassReport] = field(default_factory=list)
    cost_before: dict[str, int] = field(default_factory=dict)
    cost_after: dict[str, int] = field(default_factory=dict)
    wall_time_s: float = 0.0
    target: str = "tensorrt"
    fidelity: dict[str, Any] | None = None
    #: {input: {"shape": [...], "origin": "explicit|data|metadata|ladder|default|static"}}
    input_shapes: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "target": self.target,
                "input_shapes": self.input_shapes,
                "wall_time_s": self.wall_time_s,
                "cost_before": self.cost_before,
                "cost_after": self.cost_after,
                "fidelity": self.fidelity,
                "passes": [p.to_dict() for p in self.passes],
            }
        )

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> str:
        """A before/after table of the whole pipeline and one row per pass."""
        keys = ("nodes", "params", "size_bytes", "macs")
        rows = [("", "before", "after", "change")]
        for key in keys:
            b, a = self.cost_before.get(key, 0), self.cost_after.get(key, 0)
            change = f"{(a - b) / b * 100:+.1f}%" if b else "-"
            rows.append((key, human(b, key), human(a, key), change))
        out = format_rows(rows)
        prow = [("pass", "modified", "+nodes", "-nodes", "skips", "time", "check")]
        for p in self.passes:
            check = "-"
            if p.validation is not None:
                check = "equal" if p.validation.get("passed") else "DIFFERS"
            prow.append(
                (
                    p.name,
                    "yes" if p.modified else "no",
                    str(p.nodes_added),
                    str(p.nodes_removed),
                    str(len(p.skips)),
                    f"{p.wall_time_s:.2f}s",
                    check,
                )
            )
        table = out + "\n\n" + format_rows(prow)
        shown = {n: v for n, v in (self.input_shapes or {}).items() if v["origin"] != "static"}
        if shown:
            table += "\n\ninput shapes: " + ", ".join(
                f"{n} {'x'.join(map(str, v['shape']))} ({v['origin']})" for n, v in shown.items()
            )
        return table


def human(value: int, key: str) -> str:
    if key == "size_bytes":
        for unit in ("B", "KB", "MB", "GB"):
            if abs(value) < 1024 or unit == "GB":
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
    if key in ("params", "macs") and value >= 10_000:
        for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if value >= div:
                return f"{value / div:.2f}{unit}"
    return str(value)


def format_rows(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
