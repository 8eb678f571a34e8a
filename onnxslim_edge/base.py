"""The `Pass` contract and the one function that runs a pass honestly (`run_pass`).

A pass author subclasses `Pass` (`name`, a frozen `Config`, `lossless`, and
`run(graph, ctx) -> PassReport` built from `self.new_report()`). Callers call a pass:
`create_pass("cleanup")(model)` returns a `PassResult` (`model`, `modified`, `report`).
Alone or inside a `Pipeline`, a pass goes through `run_pass`: a fresh
onnx-graphsurgeon graph imported from the current `ModelState`, the pass, the export,
and one measurement (`modified` from `graph.fingerprint`, nodes added/removed by object
identity, cost before/after from `analysis.model_cost`, wall time), then the `Checks`
(ONNX checker and an ONNX Runtime session; for lossless passes an output comparison
with the previous model). A `ModelState` computes its fingerprint and cost once, so the
cost after one pass is the cost before the next.
"""

from __future__ import annotations

import abc
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import onnx

from onnxslim_edge.config import NoConfig, config_dict, make_config
from onnxslim_edge.context import Context
from onnxslim_edge.errors import ConfigError, OnnxSlimEdgeError, first_line
from onnxslim_edge.graph import fingerprint, graph_from_model, model_from_graph
from onnxslim_edge.model import check_model, load_model
from onnxslim_edge.report import PassReport

__all__ = [
    "FLOOR_ULPS",
    "NOISE_MULTIPLE",
    "Checks",
    "FidelityError",
    "ModelState",
    "Pass",
    "PassResult",
    "model_input",
    "run_pass",
]

log = logging.getLogger(__name__)

#: A lossless rewrite may move an output this many times the float noise measured on
#: the model it rewrites (ONNX Runtime optimizations off vs on).
NOISE_MULTIPLE = 8.0
#: ... and at least this many eps of the output's dtype times its largest magnitude
#: (float64 outputs use float32's eps: exporters compute in float32 and cast).
FLOOR_ULPS = {"float32": 64.0, "float64": 64.0, "float16": 4.0, "bfloat16": 4.0}


class FidelityError(OnnxSlimEdgeError):
    """A result misses a fidelity floor, or a lossless pass changed the outputs."""


class ModelState:
    """One model between passes, with its fingerprint and cost computed once, on demand."""

    def __init__(
        self, model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
    ) -> None:
        self.model = model
        #: Shapes MACs are counted at (the run's resolved shapes; inputs the model lacks
        #: are dropped).
        self.input_shapes = input_shapes
        self._fingerprint: str | None = None
        self._cost: dict[str, int] | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    @property
    def cost(self) -> dict[str, int]:
        if self._cost is None:
            from onnxslim_edge.analysis.cost import model_cost

            names = {vi.name for vi in self.model.graph.input}
            shapes = {k: v for k, v in (self.input_shapes or {}).items() if k in names}
            c = model_cost(self.model, shapes or None, fingerprint=self.fingerprint)
            self._cost = {
                "nodes": c.nodes,
                "params": c.params,
                "size_bytes": c.size_bytes,
                "macs": c.macs,
            }
        return dict(self._cost)


@dataclass
class PassResult:
    """What calling a pass returns: the new model (the input itself when unchanged) and
    the measured report."""

    model: onnx.ModelProto
    report: PassReport

    @property
    def modified(self) -> bool:
        return self.report.modified


def model_input(source: Any, *, copy: bool = True) -> onnx.ModelProto:
    """A private copy of what a caller hands a pass or pipeline: a path, a ModelProto or
    an onnx-graphsurgeon Graph (exported as it is). The caller's object is never changed.
    A model read here from a path or bytes is private already and not copied; nor is a
    ModelProto with `copy=False` (the caller hands it over: one model's size less)."""
    if not isinstance(source, (onnx.ModelProto, str)) and hasattr(source, "nodes"):
        from onnxslim_edge.graph import export_graph

        original = export_graph(source)  # may share tensor protos with the graph
    else:
        original = load_model(source)
        if original is not source or not copy:
            return original
    model = onnx.ModelProto()
    model.CopyFrom(original)
    return model


class Pass(abc.ABC):
    """A graph rewrite: `run(graph, ctx)` mutates `graph` and returns a PassReport.

    Subclasses set `name`, `Config` (a frozen, keyword-only dataclass) and `lossless`
    (then its outputs are compared with the previous model's after it runs). Construct
    with a config object or keyword options: `FoldBatchNorm()`,
    `Cleanup(fold_size_limit=1 << 20)`. Call the instance on a model to run it alone:
    `Cleanup()(model)` -> `PassResult`.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    lossless: ClassVar[bool] = False

    def __init__(self, config: Any = None, /, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("give a config object or keyword options, not both")
        if config is None:
            config = make_config(self.Config, options, where=self.name)
        elif not isinstance(config, self.Config):
            raise ConfigError(f"{self.name}: config must be {self.Config.__name__}")
        self.config = config

    @abc.abstractmethod
    def run(self, graph: Any, ctx: Context) -> Any:
        """Rewrite `graph` (an onnx_graphsurgeon.Graph) in place; return the report."""

    def new_report(self) -> PassReport:
        return PassReport(self.name, config=config_dict(self.config))

    def apply(
        self, state: ModelState, ctx: Context, checks: Checks
    ) -> tuple[ModelState, PassReport]:
        """Run on `state` and return the next state with the measured report (the
        pipeline's step; `Pipeline` overrides it to run its own passes)."""
        return run_pass(self, state, ctx, checks)

    def __call__(self, model: Any, ctx: Context | None = None) -> PassResult:
        """Run this pass alone on a path, ModelProto or gs.Graph (never changed), with the
        same measurement and checks as in a default `Pipeline`."""
        current = model_input(model)
        if ctx is None:
            ctx = Context()
        if ctx.reference is None:
            ctx.reference = current
        checks = Checks()
        checks.start(current, ctx)
        state, report = self.apply(ModelState(current, ctx.cost_shapes(current)), ctx, checks)
        return PassResult(state.model, report)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in config_dict(self.config).items())
        return f"{type(self).__name__}({options})"


def run_pass(
    p: Pass, state: ModelState, ctx: Context, checks: Checks
) -> tuple[ModelState, PassReport]:
    """Run `p` on a fresh graph of `state`, measure what changed, check the result.

    Returns the new state (`state` itself when nothing changed) and the report. Errors
    other than user errors are raised as RuntimeError naming the pass.
    """
    graph = graph_from_model(state.model)
    before_nodes = list(graph.nodes)  # keep them alive: identity marks removed nodes
    t0 = time.perf_counter()
    try:
        report = p.run(graph, ctx)
        new_model = model_from_graph(graph, state.model)
    except OnnxSlimEdgeError:
        raise
    except Exception as exc:
        raise RuntimeError(f"pass '{p.name}' failed: {exc}") from exc
    wall = time.perf_counter() - t0
    new_state = ModelState(new_model, state.input_shapes)
    before_ids = {id(n) for n in before_nodes}
    after_ids = {id(n) for n in graph.nodes}
    measure(
        report,
        state,
        new_state,
        wall_time_s=wall,
        nodes=(len(before_ids), len(after_ids)),
        added_removed=(len(after_ids - before_ids), len(before_ids - after_ids)),
    )
    if report.modified:
        checks.validate(new_model, p.name)
        if p.lossless and checks.verify_lossless:
            report.validation = checks.compare_lossless(state.model, new_model, ctx, p.name)
    log.info(
        "%s: modified=%s, -%d/+%d nodes",
        p.name,
        report.modified,
        report.nodes_removed,
        report.nodes_added,
    )
    return (new_state if report.modified else state), report


def measure(
    report: PassReport,
    before: ModelState,
    after: ModelState,
    *,
    wall_time_s: float,
    nodes: tuple[int, int],
    added_removed: tuple[int, int],
) -> None:
    """Fill the measured fields of `report`: the one place they are computed."""
    report.modified = after.fingerprint != before.fingerprint
    report.wall_time_s = wall_time_s
    report.nodes_before, report.nodes_after = nodes
    report.nodes_added, report.nodes_removed = added_removed
    report.cost_before = before.cost
    report.cost_after = after.cost if report.modified else before.cost


class Checks:
    """What is checked after a pass that changed the model.

    - `validate`: "session" (checker + an ONNX Runtime session, default), "checker", "none".
    - `verify_lossless`: compare each lossless pass's outputs with the previous model's
      (on the Context's data, else synthetic inputs at the resolved shapes) and raise
      FidelityError when they differ: each output within `rtol` x |old| plus its own
      tolerance from the previous model's float noise (`noise_tolerances`); `atol`, when
      set, loosens that to at least `atol` x max |output|.
    """

    def __init__(
        self,
        *,
        validate: Literal["session", "checker", "none"] = "session",
        verify_lossless: bool = True,
        rtol: float = 1e-5,
        atol: float | None = None,
        max_samples: int = 4,
    ) -> None:
        if validate not in ("session", "checker", "none"):
            raise ConfigError(f"validate must be session, checker or none, not {validate!r}")
        self.validate_mode = validate
        self.verify_lossless = verify_lossless
        self.rtol, self.atol = rtol, atol
        self.max_samples = max_samples
        self.data: _CheckData | None = None
        self._noise: dict[str, tuple[dict[str, float], dict[str, float | None]]] = {}
        self._outputs: dict[str, list[dict[str, Any]]] = {}  # the latest model's, by fingerprint

    def start(self, original: onnx.ModelProto, ctx: Context) -> None:
        """Compare on inputs for `original` (read on first use) from now on, and resolve
        the run's input shapes (`ctx.resolved`; see `analysis.resolve`): explicit > the
        data's > metadata > a ladder validated on `original`. An assumed shape is a
        warning."""
        from onnxslim_edge.analysis.resolve import resolve_input_shapes

        self.data = _CheckData(original, ctx, self.max_samples)
        data = self.data
        ctx.resolved = resolve_input_shapes(
            original,
            ctx.input_shapes,
            None
            if ctx.data is None or (isinstance(ctx.data, str) and ctx.data == "random")
            else (lambda: data.get()),
        )
        for warning in ctx.resolved.warnings:
            log.warning("%s", warning)

    def validate(self, model: onnx.ModelProto, name: str) -> None:
        if self.validate_mode == "none":
            return
        try:
            check_model(model, f"after pass '{name}'")
            if self.validate_mode == "session":
                from onnxslim_edge.runtime import make_session

                make_session(model)
        except OnnxSlimEdgeError as exc:
            raise RuntimeError(f"pass '{name}' produced an invalid model: {exc}") from exc

    def compare_lossless(
        self, before: onnx.ModelProto, after: onnx.ModelProto, ctx: Context, name: str
    ) -> dict[str, Any]:
        """Compare `after` with `before` output by output, each held to its own
        tolerance from `before`'s float noise (see `noise_tolerances`); raise
        FidelityError naming the outputs that differ by more."""
        from onnxslim_edge.verify import compare

        assert self.data is not None, "Checks.start() comes first"
        tolerances, noise = self.noise_tolerances(before)
        reference = self._outputs.get(fingerprint(before))
        if reference is not None:  # `before` ran on the check data already: only `after` runs
            result = self._compare_with(reference, after, tolerances)
        else:
            result = compare(
                before,
                after,
                data=self.data.get(),
                rtol=self.rtol,
                atol=tolerances,
                atol_mode="absolute",
                max_samples=self.max_samples,
                input_shapes=ctx.input_shapes,
                seed=ctx.seed,
            )
        summary = result.to_dict()
        summary["float_noise"] = noise
        if not result.passed:
            raise FidelityError(f"lossless pass '{name}' changed the outputs: {result.summary()}")
        return summary

    def _compare_with(
        self, reference: list[dict[str, Any]], after: onnx.ModelProto, atol: dict[str, float]
    ) -> Any:
        """`after` on the check data against `reference` (outputs per feed)."""
        from onnxslim_edge.runtime import make_session
        from onnxslim_edge.verify import compare_outputs

        assert self.data is not None
        source = self.data.get()
        outputs: list[dict[str, Any]] = []
        messages: list[str] = []
        try:
            session = make_session(after)
            wanted = {i.name for i in session.get_inputs()}
            names = [o.name for o in session.get_outputs()]
            for feed in itertools.islice(source, len(reference)):
                missing = sorted(wanted - set(feed))
                if missing:
                    messages.append(
                        "candidate: needs input(s) the reference does not take: "
                        + ", ".join(missing)
                    )
                    break
                values = session.run(None, {k: v for k, v in feed.items() if k in wanted})
                outputs.append(dict(zip(names, values)))
        except OnnxSlimEdgeError as exc:
            messages.append(str(exc))
        except Exception as exc:
            messages.append(f"candidate: ONNX Runtime failed: {first_line(exc)}")
        finally:
            session = None
        return compare_outputs(
            reference[: len(outputs)] if outputs else reference,
            outputs,
            samples=len(outputs),
            rtol=self.rtol,
            atol=atol,
            atol_mode="absolute",
            synthetic=bool(getattr(source, "is_synthetic", False)),
            data=source.describe() if hasattr(source, "describe") else "",
            messages=messages if outputs or messages else ["no samples were compared"],
        )

    def noise_tolerances(
        self, model: onnx.ModelProto
    ) -> tuple[dict[str, float], dict[str, float | None]]:
        """Per float output of `model`: the absolute tolerance a lossless rewrite is held
        to, and the measured noise. Noise is the largest change of the output between
        running `model` with ONNX Runtime's graph optimizations disabled and enabled (they
        fold and fuse the way our passes do) on the check data; the tolerance is
        `NOISE_MULTIPLE` x that noise, at least `FLOOR_ULPS[dtype]` x the dtype's eps x
        max |output| (float rounding at the output's magnitude), and at least `atol` x
        max |output| when an `atol` is set. Integer and bool outputs must be equal.
        Measured once per model state."""
        import numpy as np

        from onnxslim_edge.runtime import make_session

        assert self.data is not None
        key = fingerprint(model)
        if key in self._noise:
            return self._noise[key]
        noise: dict[str, float | None] = {}
        scale: dict[str, float] = {}
        dtypes: dict[str, np.dtype] = {}
        names = [o.name for o in model.graph.output]
        # One session at a time (each holds the weights): all plain runs, then all fused.
        runs: list[list[list[Any]]] = []
        for level in ("disable", "all"):
            try:
                session = make_session(model, optimization=level)
                wanted = {i.name for i in session.get_inputs()}
                feeds = itertools.islice(self.data.get(), self.max_samples)
                runs.append(
                    [session.run(None, {k: v for k, v in f.items() if k in wanted}) for f in feeds]
                )
            except Exception as exc:  # the comparison itself reports a failing model
                log.info("no noise measurement (%s): dtype floors only", first_line(exc))
                runs = []
                break
            finally:
                session = None
        if runs:  # the optimized run's outputs: the reference `compare_lossless` uses
            self._outputs = {key: [dict(zip(names, out)) for out in runs[1]]}
        for plain_outputs, fused_outputs in zip(*runs) if runs else ():
            for n, a, b in zip(names, plain_outputs, fused_outputs):
                a, b = np.asarray(a), np.asarray(b)
                if a.dtype.kind != "f" or a.size == 0 or a.shape != b.shape:
                    continue
                dtypes[n] = a.dtype
                a64, b64 = a.astype(np.float64), b.astype(np.float64)
                finite = np.isfinite(a64) & np.isfinite(b64)
                diff = float(np.abs(a64 - b64)[finite].max(initial=0.0))
                noise[n] = max(noise.get(n) or 0.0, diff)
                scale[n] = max(scale.get(n, 0.0), float(np.abs(a64[finite]).max(initial=0.0)))
        tolerances: dict[str, float] = {}
        for n in names:
            if n not in dtypes:
                tolerances[n] = self._fallback_floor  # integer outputs: exact in effect
                continue
            ulps = FLOOR_ULPS.get(dtypes[n].name, FLOOR_ULPS["float32"])
            eps = float(np.finfo(np.float32 if dtypes[n] == np.float64 else dtypes[n]).eps)
            floor = ulps * eps * scale[n]
            if self.atol is not None:
                floor = max(floor, self.atol * scale[n])
            tolerances[n] = max(NOISE_MULTIPLE * (noise[n] or 0.0), floor)
        self._noise[key] = (tolerances, noise)
        return tolerances, noise

    @property
    def _fallback_floor(self) -> float:
        """An output that could not be measured (no float sample): float32 rounding of
        values of magnitude 1."""
        return FLOOR_ULPS["float32"] * 1.1920929e-07


class _CheckData:
    """The inputs output checks run on: the Context's data, else one synthetic source.

    Built on first use, so a run without lossless passes or floors reads nothing, and
    the warning that the data is synthetic is given once per run, not per pass.
    """

    def __init__(self, model: onnx.ModelProto, ctx: Context, max_samples: int) -> None:
        self._model, self._ctx, self._max = model, ctx, max_samples
        self._source: Any = None

    def get(self) -> Any:
        if self._source is None:
            from onnxslim_edge.data import open_data

            spec = "random" if self._ctx.data is None else self._ctx.data
            self._source = open_data(
                spec,
                self._model,
                limit=self._max if spec == "random" else None,
                input_shapes=self._ctx.data_shapes(self._model),
                seed=self._ctx.seed,
            )
        return self._source
