"""Pipelines: an ordered list of passes run on a copy of a model; itself a pass.

`Pipeline(passes).run(model, ctx)` (or calling it) hands each pass to the shared
`base.run_pass` — a fresh graph per pass, one measurement, validation, the lossless
comparison — carrying each model state (its fingerprint and cost, computed once) from
one pass to the next, then checks the recipe's fidelity floors on the final model.
A `Pipeline` is a `Pass`, so pipelines nest; `fixed_point=True` repeats a group of
lossless passes until none changes the model (at most `max_iterations` rounds).

This module also re-exports the names that used to live here (config, reports,
context and targets, registry, recipes, the graph import/export), so
`from onnxslim_edge.pipeline import Pass, PassReport, Context, create_pass, ...` works.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx

from onnxslim_edge.base import (
    Checks,
    FidelityError,
    ModelState,
    Pass,
    PassResult,
    measure,
    model_input,
    run_pass,
)
from onnxslim_edge.config import NoConfig, config_dict, make_config
from onnxslim_edge.context import TARGETS, Context, Target, get_target
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.graph import graph_from_model, model_from_graph
from onnxslim_edge.recipe import FLOOR_KEYS, Recipe, load_recipe
from onnxslim_edge.registry import (
    ENTRY_POINT_GROUP,
    available_passes,
    create_pass,
    get_pass,
    parse_pass_spec,
)
from onnxslim_edge.report import PassReport, PipelineReport, Skip
from onnxslim_edge.report import format_rows as _format_rows  # noqa: F401 (cli, demo)
from onnxslim_edge.report import human as _human  # noqa: F401 (cli, demo)

__all__ = [
    "ENTRY_POINT_GROUP",
    "FLOOR_KEYS",
    "TARGETS",
    "Checks",
    "Context",
    "FidelityError",
    "ModelState",
    "NoConfig",
    "Pass",
    "PassReport",
    "PassResult",
    "Pipeline",
    "PipelineReport",
    "PipelineResult",
    "Recipe",
    "Skip",
    "Target",
    "available_passes",
    "config_dict",
    "create_pass",
    "get_pass",
    "get_target",
    "graph_from_model",
    "load_recipe",
    "make_config",
    "model_from_graph",
    "parse_pass_spec",
    "run_pass",
]

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    report: PipelineReport

    @property
    def modified(self) -> bool:
        """Whether any pass changed the model."""
        return any(p.modified for p in self.report.passes)

    def save(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        from onnxslim_edge.model import save_model

        return save_model(self.model, path, **kwargs)


class Pipeline(Pass):
    """An ordered list of passes run on a copy of a model.

    - `validate`: "session" (checker + an ONNX Runtime session, default), "checker", "none".
    - `verify_lossless`: compare each lossless pass's outputs with the previous model's
      (on the Context's data, else synthetic inputs at the resolved input shapes), each
      output within rtol x |old| plus a tolerance from the model's own float noise
      (`Checks.noise_tolerances`; `atol` x max |output| loosens it), and stop with
      FidelityError when they differ.
    - `floors`: fidelity floors for the final model against the input (see FLOOR_KEYS).
    - `fixed_point`: repeat the passes (all lossless) until a round changes nothing, at
      most `max_iterations` rounds; each round's reports are kept.

    A Pipeline is a Pass: put one in another pipeline (its report then lists its passes
    under `passes`) or call it on a model.
    """

    name = "pipeline"

    def __init__(
        self,
        passes: Iterable[Pass | str],
        *,
        validate: Literal["session", "checker", "none"] = "session",
        verify_lossless: bool = True,
        rtol: float = 1e-5,
        atol: float | None = None,
        floors: Mapping[str, float] | None = None,
        target: str = "tensorrt",
        max_samples: int = 4,
        fixed_point: bool = False,
        max_iterations: int = 8,
    ) -> None:
        self.passes = [parse_pass_spec(p) if isinstance(p, str) else p for p in passes]
        self.checks = Checks(
            validate=validate,
            verify_lossless=verify_lossless,
            rtol=rtol,
            atol=atol,
            max_samples=max_samples,
        )
        self.floors = dict(floors or {})
        self.target = get_target(target).name
        self.max_samples = max_samples
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, int):
            raise ConfigError(f"max_iterations must be an integer, not {max_iterations!r}")
        if max_iterations < 1:
            raise ConfigError(f"max_iterations must be >= 1, not {max_iterations}")
        lossy = [p.name for p in self.passes if not p.lossless]
        if fixed_point and lossy:
            raise ConfigError(
                f"fixed_point needs lossless passes; not lossless: {', '.join(lossy)}"
            )
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations if fixed_point else 1
        self.lossless = bool(self.passes) and not lossy  # type: ignore[misc]
        self.config = NoConfig()

    @classmethod
    def from_recipe(cls, source: str | os.PathLike | Mapping[str, Any], **kwargs: Any) -> Pipeline:
        recipe = load_recipe(source)
        kwargs.setdefault("target", recipe.target)
        kwargs.setdefault("floors", recipe.floors)
        return cls(recipe.passes, **kwargs)

    def __repr__(self) -> str:
        return "Pipeline([" + ", ".join(map(repr, self.passes)) + "])"

    def run(  # type: ignore[override]
        self, model: Any, ctx: Context | None = None, *, copy: bool = True
    ) -> PipelineResult:
        """Run every pass on a copy of `model` (a path, ModelProto or gs.Graph), never
        changing it. `copy=False` hands a ModelProto over instead: no copy is made (one
        model's size of memory less) and the caller must not change it during the run."""
        original = model_input(model, copy=copy)
        if ctx is None:
            ctx = Context(target=self.target)
        if ctx.reference is None:
            ctx.reference = original
        self.checks.start(original, ctx)
        start = time.perf_counter()
        state = ModelState(original, ctx.cost_shapes(original))
        report = PipelineReport(
            target=ctx.target.name, cost_before=state.cost, input_shapes=ctx.resolved.to_dict()
        )
        state, report.passes = self._run_passes(state, ctx, progress=ctx.progress)
        report.cost_after = state.cost
        if self.floors:
            report.fidelity = self._check_floors(original, state.model, ctx)
        report.wall_time_s = time.perf_counter() - start
        return PipelineResult(state.model, report)

    __call__ = run  # type: ignore[assignment]

    def apply(
        self, state: ModelState, ctx: Context, checks: Checks
    ) -> tuple[ModelState, PassReport]:
        """As a pass inside another pipeline: run the passes with this pipeline's checks
        (on the outer run's check data) and report them as one pass."""
        t0 = time.perf_counter()
        self.checks.data = checks.data
        after, reports = self._run_passes(state, ctx, progress=False)
        report = self.new_report()
        report.passes = reports
        measure(
            report,
            state,
            after,
            wall_time_s=time.perf_counter() - t0,
            nodes=(state.cost["nodes"], after.cost["nodes"]),
            added_removed=(
                sum(r.nodes_added for r in reports),
                sum(r.nodes_removed for r in reports),
            ),
        )
        if self.floors:
            report.validation = self._check_floors(state.model, after.model, ctx)
        return after, report

    def _run_passes(
        self, state: ModelState, ctx: Context, *, progress: bool
    ) -> tuple[ModelState, list[PassReport]]:
        reports: list[PassReport] = []
        for _ in range(self.max_iterations):
            changed = False
            bar = _progress(self.passes, progress, "passes")
            for p in bar:
                if hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(p.name)
                state, pass_report = p.apply(state, ctx, self.checks)
                reports.append(pass_report)
                changed |= pass_report.modified
            if not changed:
                break
        return state, reports

    def _check_floors(
        self, original: onnx.ModelProto, final: onnx.ModelProto, ctx: Context
    ) -> dict[str, Any]:
        from onnxslim_edge.verify import compare

        assert self.checks.data is not None
        result = compare(
            original,
            final,
            data=self.checks.data.get(),
            input_shapes=ctx.input_shapes,
            seed=ctx.seed,
        )
        summary = result.to_dict()
        missed = result.check_floors(self.floors)
        summary["floors"] = dict(self.floors)
        summary["floors_missed"] = missed
        if missed:
            raise FidelityError("fidelity floor missed: " + "; ".join(missed))
        return summary


def _progress(items: Sequence[Any], enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="pass", leave=False)
