"""A sweep's results: the Pareto front, the table, the plot and best.toml.

- The front is taken over the first cost objective (minimized) and the fidelity metric
  (maximized) among the trials that ran and meet every constraint: a trial is on it
  when no other is at least as good in both and better in one. The table lists the
  front first (by cost), then the other feasible trials by their front layer (the
  front of what is left, and so on), then trials missing a constraint, then failures
  with their reason: `results.md` and `results.json`.
- `front.png` (matplotlib, Agg): one point per trial that ran, infeasible ones hollow,
  the front drawn as a step line. Skipped with a warning without matplotlib.
- `best.toml`: the feasible trial with the lowest first cost (ties: the higher
  fidelity, then the next costs; so it is on the front), the trial's recipe as it ran, which `optimize --recipe`
  runs as is. None qualifies: no best.toml, and results say so.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxslim_edge.sweep.space import Space, dump_toml

__all__ = ["front_layers", "pick_best", "write_results"]

log = logging.getLogger(__name__)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fidelity(trial: Any, space: Space) -> float | None:
    value = _num(trial.metrics.get(space.fidelity))
    if value is None and space.fidelity == "sqnr_db" and trial.ok:
        return math.inf  # identical outputs (SQNR written as null)
    return value


def _point(trial: Any, space: Space) -> tuple[float, float] | None:
    cost, fid = _num(trial.metrics.get(space.cost[0])), _fidelity(trial, space)
    return None if cost is None or fid is None else (cost, fid)


def front_layers(trials: Sequence[Any], space: Space) -> list[list[Any]]:
    """Non-dominated layers of (first cost, fidelity); the first is the Pareto front.
    Trials without both values are left out."""
    pts = {id(t): p for t in trials if (p := _point(t, space)) is not None}
    left = [t for t in trials if id(t) in pts]
    layers = []
    while left:
        layer = sorted((t for t in left if not _dominated(t, left, pts)), key=lambda t: pts[id(t)])
        layers.append(layer)
        chosen = {id(t) for t in layer}
        left = [t for t in left if id(t) not in chosen]
    return layers


def _dominated(t: Any, others: Sequence[Any], pts: dict[int, tuple[float, float]]) -> bool:
    """Some other trial costs no more and is no less faithful, and is better in one."""
    c, f = pts[id(t)]
    for o in others:
        if o is t:
            continue
        oc, of = pts[id(o)]
        if oc <= c and of >= f and (oc < c or of > f):
            return True
    return False


def _feasible(trials: Sequence[Any], space: Space) -> list[Any]:
    return [t for t in trials if t.ok and not space.misses(t.metrics)]


def pick_best(trials: Sequence[Any], space: Space) -> Any | None:
    """The feasible trial with the lowest first cost, then the highest fidelity, then
    the lowest other costs in order: always a trial on the front."""

    def key(t: Any) -> tuple[float, ...]:
        first, *rest = (_num(t.metrics.get(c)) for c in space.cost)
        fid = _fidelity(t, space)
        return (
            math.inf if first is None else first,
            -fid if fid is not None else math.inf,
            *(math.inf if c is None else c for c in rest),
        )

    candidates = [t for t in _feasible(trials, space) if _point(t, space) is not None]
    return min(candidates, key=key) if candidates else None


def _columns(space: Space) -> list[str]:
    cols = list(dict.fromkeys([*space.cost, space.fidelity]))
    for extra in ("size_ratio", "macs_ratio", "latency_ratio"):
        if extra not in cols and (extra != "latency_ratio" or space.needs_latency):
            cols.append(extra)
    return cols


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(result: Any) -> None:
    """results.json, results.md, front.png and best.toml into `result.out` (each
    written whole); sets `result.front`, `result.best` and `result.files`."""
    from onnxslim_edge.model import write_text_atomic

    space: Space = result.space
    out = Path(result.out)
    feasible = _feasible(result.trials, space)
    layers = front_layers(feasible, space)
    result.front = layers[0] if layers else []
    result.best = pick_best(result.trials, space)
    rank = {t.id: i for i, layer in enumerate(layers) for t in layer}
    ordered = [t for layer in layers for t in layer]
    ordered += [t for t in feasible if t.id not in rank]
    infeasible = [t for t in result.trials if t.ok and t not in feasible]
    infeasible.sort(key=lambda t: _point(t, space) or (math.inf, 0.0))
    failed = [t for t in result.trials if not t.ok]
    rows = []
    for t in [*ordered, *infeasible, *failed]:
        rows.append(
            {
                "trial": t.id,
                "status": t.metrics.get("status"),
                "front": t.id in rank and rank[t.id] == 0,
                "layer": rank.get(t.id),
                "meets_constraints": t in feasible,
                "misses": space.misses(t.metrics) if t.ok else [],
                "best": result.best is not None and t.id == result.best.id,
                "point": t.point,
                "metrics": t.metrics,
                "recipe": str(t.folder / "recipe.toml"),
                "resumed": t.resumed,
            }
        )
    summary = {
        "space": space.origin,
        "objectives": {"cost": list(space.cost), "fidelity": space.fidelity},
        "constraints": dict(space.constraints),
        "trials": len(result.trials),
        "ran": result.ran,
        "resumed": result.resumed,
        "failed": len(failed),
        "wall_time_s": round(result.wall_time_s, 3),
        "best": result.best.id if result.best is not None else None,
        "front": [t.id for t in result.front],
        "rows": rows,
    }
    files = {"results.json": out / "results.json", "results.md": out / "results.md"}
    write_text_atomic(files["results.json"], json.dumps(summary, indent=2) + "\n")
    write_text_atomic(files["results.md"], _markdown(summary, space, rows))
    best_path = out / "best.toml"
    if result.best is not None:
        header = [
            f"The best recipe of the sweep in {out} (trial {result.best.id}): the lowest "
            f"{space.cost[0]}, then the highest {space.fidelity}"
            + "".join(f", then the lowest {c}" for c in space.cost[1:]),
            f"among the trials meeting {_constraints_text(space)}.",
            "Run it with `onnxslim-edge optimize MODEL --recipe best.toml --calib CALIB -o OUT`.",
        ]
        write_text_atomic(best_path, dump_toml(result.best.recipe, header=header))
        files["best.toml"] = best_path
    elif best_path.exists():
        best_path.unlink()  # an earlier run's best no longer stands
    png = out / "front.png"
    if _plot(result.trials, result.front, feasible, space, png, result.best):
        files["front.png"] = png
    result.files = files


def _constraints_text(space: Space) -> str:
    if not space.constraints:
        return "no constraints"
    return ", ".join(f"{k} = {v:g}" for k, v in space.constraints.items())


def _markdown(summary: dict[str, Any], space: Space, rows: list[dict[str, Any]]) -> str:
    cols = _columns(space)
    keys = list(dict.fromkeys(k for r in rows for k in r["point"]))
    lines = [
        f"# Sweep results ({summary['trials']} trials: {summary['ran']} run now, "
        f"{summary['resumed']} resumed, {summary['failed']} failed)",
        "",
        f"Front: {space.cost[0]} (lower is better) vs {space.fidelity} (higher is better); "
        f"constraints: {_constraints_text(space)}.",
        f"Best: {summary['best'] or 'none meets the constraints'}.",
        "",
        "| trial | front | " + " | ".join(keys + cols) + " | status |",
        "|" + " --- |" * (len(keys) + len(cols) + 3),
    ]
    for r in rows:
        m = r["metrics"]
        if r["status"] != "ok":
            status = f"failed: {m.get('reason', '')}".replace("|", "/")
        elif r["misses"]:
            status = "misses " + "; ".join(r["misses"])
        else:
            status = "best" if r["best"] else "ok"
        mark = "*" if r["front"] else ("" if r["layer"] is None else str(r["layer"] + 1))
        values = [_fmt(r["point"].get(k)) for k in keys] + [_fmt(m.get(c)) for c in cols]
        lines.append(f"| {r['trial']} | {mark} | " + " | ".join(values) + f" | {status} |")
    lines.append("")
    lines.append("front: * on the Pareto front, N its layer (the front of the rest, ...).")
    return "\n".join(lines) + "\n"


def _plot(
    trials: Sequence[Any],
    front: Sequence[Any],
    feasible: Sequence[Any],
    space: Space,
    path: Path,
    best: Any | None,
) -> bool:
    try:
        import matplotlib
    except ModuleNotFoundError:
        log.warning("matplotlib is not installed: no front.png")
        return False
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from onnxslim_edge.model import Outputs

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    try:
        ok = [(t, _point(t, space)) for t in trials if _point(t, space) is not None]
        good = [p for t, p in ok if t in feasible]
        bad = [p for t, p in ok if t not in feasible]
        if good:
            ax.scatter(*zip(*good), color="tab:blue", label="meets the constraints", zorder=3)
        if bad:
            ax.scatter(
                *zip(*bad), facecolors="none", edgecolors="tab:red", label="misses a constraint"
            )
        if front:
            pts = [_point(t, space) for t in front]
            ax.step(*zip(*pts), where="post", color="tab:blue", alpha=0.6, label="Pareto front")
        if best is not None:
            ax.scatter(
                *_point(best, space),
                marker="*",
                s=200,
                color="gold",
                edgecolors="k",
                zorder=4,
                label=f"best ({best.id})",
            )
        for key, bound in space.constraints.items():
            if key.endswith(space.fidelity) and key.startswith("min_"):
                ax.axhline(bound, color="grey", linestyle=":", label=f"{key} = {bound:g}")
        ax.set_xlabel(space.cost[0])
        ax.set_ylabel(space.fidelity)
        ax.set_title(f"{len(ok)} trials")
        ax.grid(alpha=0.3)
        if ok:
            ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        with Outputs() as outputs:
            outputs.binary(path, buf.getvalue(), "plot")
            outputs.commit()
    finally:
        plt.close(fig)
    return True
