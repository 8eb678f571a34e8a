"""Running a sweep: every trial a recipe, run as a Ray task, saved in its own folder.

    run_sweep(model, space, data=calib, eval_data=eval, out="sweep")

- Trials are the points of the space's grid (`search="grid"`) or `trials` points
  suggested by Ray Tune's `OptunaSearch` (`search="optuna"`, TPE seeded by `seed`;
  suggestions are asked for in rounds of `workers` and answered in order, so a seed
  gives the same trials however the tasks interleave).
- A trial runs the recipe as `optimize --recipe` would (the same passes, target and
  calibration data, without the recipe's `[verify]` floors: the sweep measures its
  constraints on the evaluation data instead), saves `model.onnx`, `recipe.toml` and
  `report.json` into `out/trials/<id>/`, and measures size, params, MACs and fidelity
  against the input model on `eval_data` (`verify.compare`), plus a `metrics_callback`'s
  metrics. `metrics.json` is written last; a folder that has it is finished and a later
  call skips it (resume). A trial that fails writes `status = "failed"` and the reason,
  and the sweep goes on; one whose Ray worker died (a crash, Ray's out-of-memory killer,
  which watches the whole machine's memory) is marked `retry` and runs again next call.
- Latency (when an objective or a constraint names it) is timed in a second task, side
  by side with the input model (`timing.measure_latency`, batch 1, one thread). Those
  tasks need the custom Ray resource `latency_slot`, of which the local cluster has one,
  so timings never overlap each other.
- Ray: `ray.init(address="local")` with `workers` CPUs (default: this machine's cores)
  unless `address` names a running cluster (then every node must see the model, data
  and output paths, and have a `latency_slot` resource if latency is measured).
  `ray.shutdown()` always runs at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from onnxslim_edge.errors import ConfigError, DataError, OnnxSlimEdgeError, first_line
from onnxslim_edge.sweep.space import Space, dump_toml, load_space, trial_id

__all__ = ["MetricsCallback", "SweepResult", "Trial", "run_sweep"]

log = logging.getLogger(__name__)

#: `metrics_callback(candidate, original) -> {name: value}`: extra metrics of a trial's
#: model (ModelProtos), merged into its metrics.json. Runs inside the Ray task, so it
#: must be picklable by cloudpickle (a module-level function or a plain closure).
MetricsCallback = Callable[[Any, Any], Mapping[str, float]]

TRIALS_DIR = "trials"


@dataclass
class Trial:
    """One recipe of the sweep: its folder, the point it came from and what it measured."""

    id: str
    point: dict[str, Any]
    recipe: dict[str, Any]
    folder: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False

    @property
    def ok(self) -> bool:
        return self.metrics.get("status") == "ok"


@dataclass
class SweepResult:
    out: Path
    space: Space
    trials: list[Trial]
    ran: int
    resumed: int
    wall_time_s: float
    front: list[Trial] = field(default_factory=list)
    best: Trial | None = None
    files: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------- the tasks


def _batch_size(model: Any) -> int:
    """32 where every input's first dim is symbolic (a batch axis), else 1."""
    initializers = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return 1
    return 32


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def run_trial(
    model_path: str,
    recipe: Mapping[str, Any],
    folder: str,
    calib: Any,
    eval_data: Any,
    seed: int = 0,
    metrics_callback: MetricsCallback | None = None,
) -> dict[str, Any]:
    """Run one recipe on the model and measure it; never raises for a failing trial.

    Writes `recipe.toml`, then `model.onnx` and `report.json` into `folder`; returns
    the metrics (status "ok", or "failed" with `reason`). The Ray task calls this.
    """
    from onnxslim_edge.analysis import model_cost
    from onnxslim_edge.data import open_data
    from onnxslim_edge.model import Outputs, load_model, write_text_atomic
    from onnxslim_edge.pipeline import Context, Pipeline
    from onnxslim_edge.recipe import load_recipe
    from onnxslim_edge.verify import compare

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_text_atomic(out / "recipe.toml", dump_toml(recipe, header=_recipe_header(out.name)))
    metrics: dict[str, Any] = {"status": "ok"}
    try:
        loaded = load_recipe(recipe)
        original = load_model(model_path)
        pipeline = Pipeline(loaded.passes, target=loaded.target)  # floors: the sweep's own
        data = None if calib is None else open_data(calib, original, seed=seed)
        ctx = Context(data=data, target=pipeline.target, seed=seed)
        result = pipeline.run(original, ctx)
        model_file = out / "model.onnx"
        with Outputs() as outputs:
            outputs.model(result.model, model_file)
            outputs.text(out / "report.json", result.report.to_json())
            outputs.commit()
        before, after = result.report.cost_before, result.report.cost_after
        if not after:
            after = model_cost(result.model).__dict__
        metrics["size"] = _file_bytes(model_file)
        metrics["size_ratio"] = metrics["size"] / _file_bytes(Path(model_path))
        for key in ("params", "macs", "nodes"):
            if key in after:
                metrics[key] = int(after[key])
                if before.get(key):
                    metrics[f"{key}_ratio"] = after[key] / before[key]
        fidelity = compare(
            original, result.model, eval_data, batch_size=_batch_size(original), seed=seed
        )
        if fidelity.messages:
            raise DataError("; ".join(fidelity.messages))
        metrics.update(fidelity.worst_metrics())
        if metrics_callback is not None:
            extra = metrics_callback(result.model, original)
            metrics.update({str(k): _json_number(v) for k, v in dict(extra).items()})
    except Exception as exc:  # a failing trial is recorded, the sweep goes on
        metrics = {"status": "failed", "reason": first_line(exc), "error": type(exc).__name__}
        if not isinstance(exc, OnnxSlimEdgeError):
            log.debug("trial %s failed", out.name, exc_info=True)
    metrics["wall_time_s"] = round(time.perf_counter() - start, 3)
    return metrics


def _json_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return float(value) if math.isfinite(value) else None


def _recipe_header(tid: str) -> list[str]:
    return [
        f"Sweep trial {tid}: run it with `onnxslim-edge optimize MODEL --recipe recipe.toml",
        "--calib CALIB -o OUT.onnx`. [verify] holds the sweep's fidelity constraints.",
    ]


def time_trial(model_path: str, candidate_path: str, eval_data: Any, runs: int) -> dict[str, Any]:
    """Batch-1 latency of the candidate and the input model, timed side by side."""
    from onnxslim_edge.data import open_data
    from onnxslim_edge.model import load_model
    from onnxslim_edge.timing import measure_latency

    started = time.time()
    original = load_model(model_path)
    source = open_data(eval_data, original, batch_size=1, limit=1)
    feed = next(iter(source))
    stats = measure_latency(
        {"original": model_path, "candidate": candidate_path}, feed, runs=runs, threads=1
    )
    cand, orig = stats["candidate"], stats["original"]
    return {
        "latency_ms": cand.median_ms,
        "latency_p10_ms": cand.p10_ms,
        "latency_p90_ms": cand.p90_ms,
        "original_latency_ms": orig.median_ms,
        "latency_ratio": cand.median_ms / orig.median_ms,
        "latency_window": [started, time.time()],  # when it ran (seconds since the epoch)
    }


# --------------------------------------------------------------------------- Ray


@contextlib.contextmanager
def _ray_session(workers: int | None, address: str | None, folder: Path) -> Iterator[Any]:
    """ray.init for the sweep, ray.shutdown after, whatever happens.

    Local Ray is started from inside `folder`: its workers put the driver's working
    folder on `sys.path`, and from a source checkout's root the folder `onnxslim_edge/`
    there would shadow the installed package (which has `passes` mapped into it).
    """
    try:
        import ray
    except ModuleNotFoundError:
        raise ConfigError(
            "sweeps need Ray: pip install 'onnxslim-edge[sweep]' (ray[tune], optuna)"
        ) from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": False,
        "ignore_reinit_error": False,
    }
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(
            address="local",
            num_cpus=workers or os.cpu_count() or 1,
            resources={"latency_slot": 1},
            object_store_memory=128 * 1024 * 1024,
        )
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        try:
            ray.init(**kwargs)
        finally:
            os.chdir(cwd)
    except ConnectionError as exc:
        ray.shutdown()
        raise ConfigError(
            f"--address {address}: cannot connect to Ray ({first_line(exc)})"
        ) from exc
    try:
        yield ray
    finally:
        ray.shutdown()


class _Executor:
    """Runs trials as Ray tasks, at most `limit` at once, latency after each."""

    def __init__(self, ray: Any, settings: dict[str, Any], limit: int, on_done: Any) -> None:
        self.ray = ray
        self.settings = settings
        self.limit = limit
        self.on_done = on_done
        space = settings["space"]
        self.latency_runs = space.latency_runs if space.needs_latency else 0
        self.trial_task = ray.remote(num_cpus=1, max_retries=0)(run_trial)
        self.time_task = ray.remote(num_cpus=1, max_retries=0, resources={"latency_slot": 1})(
            time_trial
        )

    def run(self, trials: Sequence[Trial]) -> None:
        queue = list(trials)
        running: dict[Any, tuple[Trial, str]] = {}
        s = self.settings
        while queue or running:
            while queue and sum(k == "trial" for _, k in running.values()) < self.limit:
                trial = queue.pop(0)
                ref = self.trial_task.remote(
                    s["model_path"],
                    trial.recipe,
                    str(trial.folder),
                    s["calib"],
                    s["eval_data"],
                    s["seed"],
                    s["metrics_callback"],
                )
                running[ref] = (trial, "trial")
            done, _ = self.ray.wait(list(running), num_returns=1)
            trial, kind = running.pop(done[0])
            try:
                result = self.ray.get(done[0])
            except Exception as exc:  # the worker died (a crash, Ray's out-of-memory killer)
                result = {
                    "status": "failed",
                    "reason": first_line(exc),
                    "error": type(exc).__name__,
                    "retry": True,  # not the recipe's fault: the next call runs it again
                }
            if kind == "trial":
                trial.metrics = result
                if trial.ok and self.latency_runs:
                    ref = self.time_task.remote(
                        s["model_path"],
                        str(trial.folder / "model.onnx"),
                        s["eval_data"],
                        self.latency_runs,
                    )
                    running[ref] = (trial, "latency")
                    continue
            elif result.get("status") == "failed":
                trial.metrics = {
                    **{k: v for k, v in result.items() if k != "reason"},
                    "reason": f"latency: {result['reason']}",
                }
            else:
                trial.metrics.update(result)
            self.on_done(trial)


# --------------------------------------------------------------------------- the sweep


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _data_key(spec: Any) -> Any:
    """What identifies a data spec in trial ids: a file's hash, else its description."""
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_file():
        return _sha256(Path(spec))
    return str(spec) if isinstance(spec, (str, os.PathLike)) else repr(type(spec))


def _for_workers(spec: Any) -> Any:
    """A data spec as Ray's workers (in another folder) must get it: paths made absolute."""
    if isinstance(spec, (str, os.PathLike)) and Path(spec).exists():
        return str(Path(spec).resolve())
    return spec


def _check_data(spec: Any, model: Any, flag: str) -> None:
    from onnxslim_edge.data import open_data

    try:
        source = open_data(spec, model, limit=1)
        next(iter(source))
    except StopIteration:
        raise DataError(f"{flag} {spec}: no samples") from None


def _load_finished(trial: Trial) -> bool:
    path = trial.folder / "metrics.json"
    if not path.is_file():
        return False
    try:
        trial.metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # a damaged file: run the trial again
    if not isinstance(trial.metrics, dict) or trial.metrics.get("retry"):
        trial.metrics = {}
        return False  # its worker died: run it again
    trial.resumed = True
    return True


def _write_metrics(trial: Trial) -> None:
    from onnxslim_edge.model import write_text_atomic

    record = {**trial.metrics, "trial": trial.id, "point": trial.point}
    trial.metrics = record
    write_text_atomic(trial.folder / "metrics.json", json.dumps(record, indent=2) + "\n")


def run_sweep(
    model: str | os.PathLike,
    space: Space | str | os.PathLike | Mapping[str, Any],
    *,
    data: Any = None,
    eval_data: Any,
    out: str | os.PathLike = "sweep",
    workers: int | None = None,
    address: str | None = None,
    search: Literal["grid", "optuna"] = "grid",
    trials: int | None = None,
    seed: int = 0,
    metrics_callback: MetricsCallback | None = None,
    on_trial: Callable[[Trial, int, int], None] | None = None,
) -> SweepResult:
    """Run the space's trials on Ray and write the results into `out` (see the module
    docstring); returns every trial, the Pareto front and the best one.

    `data`: calibration data (a path or spec both the driver and Ray's workers can read;
    None where no pass needs data), `eval_data`: the data fidelity is measured on.
    `on_trial(trial, done, total)` is called in this process as each trial finishes.
    Bad input (space, model, data, options) raises a one-line error before `out` exists.
    """
    from onnxslim_edge.model import load_model

    t0 = time.perf_counter()
    if not isinstance(space, Space):
        space = load_space(space)
    if search not in ("grid", "optuna"):
        raise ConfigError(f"search must be grid or optuna, not {search!r}")
    if workers is not None and (
        isinstance(workers, bool) or int(workers) != workers or workers < 1
    ):
        raise ConfigError(f"workers must be a positive integer, not {workers!r}")
    if trials is not None and (isinstance(trials, bool) or int(trials) != trials or trials < 1):
        raise ConfigError(f"trials must be a positive integer, not {trials!r}")
    if search == "grid" and trials is not None:
        raise ConfigError("trials: a grid runs every point; --trials is for --search optuna")
    if eval_data is None:
        raise ConfigError("a sweep needs evaluation data (eval_data / --eval)")
    model_path = Path(model)
    if not model_path.is_file():
        from onnxslim_edge.errors import InvalidModelError

        raise InvalidModelError(f"{model_path}: model file not found")
    original = load_model(model_path)
    if data is not None:
        _check_data(data, original, "--data")
    _check_data(eval_data, original, "--eval")
    points: list[dict[str, Any]] = []
    if search == "grid":
        points = space.grid()
        for point in points:
            space.check_recipe(point)
    elif not space.axes:
        raise ConfigError(f"{space.origin}: nothing to search (no option has several values)")
    folder = Path(out).absolute()  # Ray workers run in another folder
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: the sweep's output must be a folder; this is a file")
    inputs = {
        "model": _sha256(model_path),
        "calib": _data_key(data),
        "eval": _data_key(eval_data),
        "latency_runs": space.latency_runs if space.needs_latency else 0,
        "seed": seed,
    }
    created = not folder.exists()
    (folder / TRIALS_DIR).mkdir(parents=True, exist_ok=True)
    try:
        return _sweep(
            space,
            folder,
            inputs,
            points,
            original_path=model_path,
            data=data,
            eval_data=eval_data,
            workers=workers,
            address=address,
            search=search,
            trials=trials,
            seed=seed,
            metrics_callback=metrics_callback,
            on_trial=on_trial,
            t0=t0,
        )
    except BaseException:
        # Nothing finished (Ray refused to start, the cluster lacks a resource, Ctrl-C
        # at once): a folder this call created goes again, as if it never ran.
        if created and not any((folder / TRIALS_DIR).glob("*/metrics.json")):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _sweep(
    space: Space,
    folder: Path,
    inputs: dict[str, Any],
    points: list[dict[str, Any]],
    *,
    original_path: Path,
    data: Any,
    eval_data: Any,
    workers: int | None,
    address: str | None,
    search: str,
    trials: int | None,
    seed: int,
    metrics_callback: MetricsCallback | None,
    on_trial: Callable[[Trial, int, int], None] | None,
    t0: float,
) -> SweepResult:
    from onnxslim_edge.sweep.results import write_results

    model_path = original_path
    settings = {
        "space": space,
        "model_path": str(model_path.resolve()),
        "calib": _for_workers(data),
        "eval_data": _for_workers(eval_data),
        "seed": seed,
        "metrics_callback": metrics_callback,
    }

    def make_trial(point: Mapping[str, Any]) -> Trial:
        recipe = space.recipe(point)
        tid = trial_id(recipe, inputs)
        return Trial(tid, dict(point), recipe, folder / TRIALS_DIR / tid)

    done: list[Trial] = []
    total = len(points) if search == "grid" else int(trials or 16)

    def finished(trial: Trial) -> None:
        if not trial.resumed:
            _write_metrics(trial)
        done.append(trial)
        if on_trial is not None:
            on_trial(trial, len(done), total)

    ran = 0
    if search == "grid":
        all_trials = [make_trial(p) for p in points]
        pending = []
        for trial in all_trials:
            if _load_finished(trial):
                finished(trial)
            else:
                pending.append(trial)
        if pending:
            limit = workers or os.cpu_count() or 1
            with _ray_session(workers, address, folder) as ray:
                _check_cluster(ray, space, address)
                _Executor(ray, settings, limit, finished).run(pending)
            ran = len(pending)
        order = {t.id: i for i, t in enumerate(all_trials)}
        done.sort(key=lambda t: order[t.id])
    else:
        ran, order = _run_optuna(
            space, settings, make_trial, finished, total, workers, address, folder
        )
        done.sort(key=lambda t: order.index(t.id))  # in the order Optuna suggested them
    result = SweepResult(
        out=folder,
        space=space,
        trials=done,
        ran=ran,
        resumed=sum(t.resumed for t in done),
        wall_time_s=time.perf_counter() - t0,
    )
    write_results(result)
    return result


def _check_cluster(ray: Any, space: Space, address: str | None) -> None:
    if space.needs_latency and not ray.cluster_resources().get("latency_slot"):
        raise ConfigError(
            f"--address {address}: the cluster has no 'latency_slot' resource, which latency "
            "trials need (start one node with --resources '{\"latency_slot\": 1}')"
        )


def _run_optuna(
    space: Space,
    settings: dict[str, Any],
    make_trial: Callable[[Mapping[str, Any]], Trial],
    finished: Callable[[Trial], None],
    total: int,
    workers: int | None,
    address: str | None,
    folder: Path,
) -> tuple[int, list[str]]:
    """`total` trials suggested by Ray Tune's OptunaSearch in rounds of `workers`."""
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ModuleNotFoundError:
        raise ConfigError(
            "--search optuna needs ray[tune] and optuna: pip install 'onnxslim-edge[sweep]'"
        ) from None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cost, fidelity = space.cost[0], space.fidelity
    searcher = OptunaSearch(
        space=OptunaSearch.convert_search_space({a.key: a.tune_domain() for a in space.axes}),
        metric=[cost, fidelity],
        mode=["min", "max"],
        seed=settings["seed"],
    )
    axes = {a.key: a for a in space.axes}
    round_size = workers or os.cpu_count() or 1
    ran = 0
    seen: dict[str, Trial] = {}
    order: list[str] = []
    with contextlib.ExitStack() as stack:
        executor = None
        issued = 0
        while issued < total:
            batch = []
            for _ in range(min(round_size, total - issued)):
                tune_id = f"t{issued}"
                config = searcher.suggest(tune_id)
                point = {k: axes[k].value_of(v) for k, v in config.items()}
                batch.append((tune_id, make_trial(point)))
                issued += 1
            pending = []
            for _, trial in batch:
                if trial.id in seen:
                    continue
                seen[trial.id] = trial
                order.append(trial.id)
                try:
                    space.check_recipe(trial.point)
                except ConfigError as exc:
                    trial.metrics = {"status": "failed", "reason": str(exc), "error": "ConfigError"}
                    finished(trial)
                    continue
                if _load_finished(trial):
                    finished(trial)
                else:
                    pending.append(trial)
            if pending:
                if executor is None:
                    ray = stack.enter_context(_ray_session(workers, address, folder))
                    _check_cluster(ray, space, address)
                    executor = _Executor(ray, settings, round_size, finished)
                executor.run(pending)
                ran += len(pending)
            for tune_id, trial in batch:
                record = seen[trial.id].metrics
                values = {cost: record.get(cost), fidelity: record.get(fidelity)}
                usable = seen[trial.id].ok and all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in values.values()
                )
                searcher.on_trial_complete(
                    tune_id, result=values if usable else None, error=not usable
                )
    return ran, order
