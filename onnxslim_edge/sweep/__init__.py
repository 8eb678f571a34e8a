"""Sweeps: many recipes tried on one model, on Ray; a Pareto front and the best recipe.

    from onnxslim_edge.sweep import load_space, run_sweep

    result = run_sweep("model.onnx", "space.toml", data="calib.npz", eval_data="eval.npz",
                       out="sweep")
    result.best            # the trial written to sweep/best.toml (None if none qualifies)

`load_space` parses a space (onnxslim_edge/sweep/space.py says what one holds);
`run_sweep` runs its trials as Ray tasks (the `sweep` extra), each a recipe saved with
its report and metrics under `out/trials/<id>/`, and writes the results (docs/sweep.md).
Importing this package does not import Ray.
"""

from __future__ import annotations

from onnxslim_edge.sweep.run import MetricsCallback, SweepResult, Trial, run_sweep
from onnxslim_edge.sweep.space import BUILTIN_METRICS, Axis, Space, load_space, trial_id

__all__ = [
    "BUILTIN_METRICS",
    "Axis",
    "MetricsCallback",
    "Space",
    "SweepResult",
    "Trial",
    "load_space",
    "run_sweep",
    "trial_id",
]
