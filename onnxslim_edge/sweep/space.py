"""Search spaces: a recipe whose pass options may be lists, choices or ranges.

A space is a TOML file laid out like a recipe (`target`, `[[pass]]` tables), where an
option's value may name several values to try, plus what to optimize and what a result
must meet:

    target = "onnxruntime-cpu"

    [[pass]]
    name = "prune-channels"
    enabled = [false, true]                     # with and without this pass
    macs_reduction = [0.2, 0.4]                 # a list: one trial per value (grid)

    [[pass]]
    name = "quantize"
    method = { choices = ["minmax", "percentile"] }
    min_top1_agreement = { low = 0.9, high = 0.99, step = 0.03 }   # a range

    [objectives]
    cost = ["size", "latency"]       # minimized; the first decides best.toml and the plot
    fidelity = "top1_agreement"      # maximized, measured against the input model
    latency_runs = 30

    [constraints]
    min_top1_agreement = 0.95        # min_<metric> / max_<metric>

A value is fixed unless it is a list, `{choices = [...]}` or a range `{low, high}`
with `step` (grid), `num` (grid, `log = true` spaces them geometrically) or neither
(Optuna only: a continuous range). A list that is itself an option's value
(`exclude_nodes = ["a"]`) is written `{choices = [["a"]]}`. `enabled` (on any pass)
takes or drops the pass; trials a dropped pass makes identical are run once.

Metrics (names for `cost`, `fidelity` and constraints): `size` (bytes of the saved
model), `params`, `macs`, `nodes`, their `*_ratio` to the input model's, `latency_ms`
and `latency_ratio` (batch 1, timed side by side with the input model on this machine;
`latency` is short for `latency_ms`), and the fidelity metrics `top1_agreement`,
`cosine`, `sqnr_db` (higher is better), `kl_divergence`, `max_abs_error` (lower is
better). Metrics from a `metrics_callback` are declared in `[metrics] custom = [...]`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxslim_edge.errors import ConfigError

__all__ = [
    "BUILTIN_METRICS",
    "Axis",
    "Space",
    "dump_toml",
    "load_space",
    "trial_id",
]

#: Metrics every trial measures, and whether a higher value is better.
BUILTIN_METRICS: Mapping[str, bool] = {
    "size": False,
    "size_ratio": False,
    "params": False,
    "params_ratio": False,
    "macs": False,
    "macs_ratio": False,
    "nodes": False,
    "latency_ms": False,
    "latency_ratio": False,
    "top1_agreement": True,
    "cosine": True,
    "sqnr_db": True,
    "kl_divergence": False,
    "max_abs_error": False,
}
_ALIASES = {"latency": "latency_ms"}
_LATENCY = ("latency_ms", "latency_ratio")
_TOP_KEYS = ("target", "pass", "objectives", "constraints", "metrics")
_OBJECTIVE_KEYS = ("cost", "fidelity", "latency_runs")
_RANGE_KEYS = {"low", "high", "step", "num", "log"}


@dataclass(frozen=True)
class Axis:
    """One searched option: `pass_index`'s `option` over `choices` or a range."""

    key: str
    pass_index: int
    option: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    num: int | None = None
    log: bool = False
    integer: bool = False

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def grid_values(self) -> tuple[Any, ...]:
        """The values a grid tries; ConfigError for a range with neither step nor num."""
        if not self.is_range:
            return self.choices
        assert self.low is not None and self.high is not None
        if self.step is not None:
            count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
            values = [self.low + i * self.step for i in range(count)]
        elif self.num is not None:
            if self.num == 1:
                values = [self.low]
            elif self.log:
                ratio = (self.high / self.low) ** (1 / (self.num - 1))
                values = [self.low * ratio**i for i in range(self.num)]
            else:
                width = (self.high - self.low) / (self.num - 1)
                values = [self.low + i * width for i in range(self.num)]
        else:
            raise ConfigError(
                f"{self.key}: a range needs 'step' or 'num' for a grid search "
                "(or use --search optuna for a continuous range)"
            )
        if self.integer:
            return tuple(dict.fromkeys(round(v) for v in values))
        return tuple(dict.fromkeys(round(v, 10) for v in values))

    def tune_domain(self) -> Any:
        """The Ray Tune domain of this axis (for OptunaSearch)."""
        from ray import tune

        if not self.is_range:
            return tune.choice(list(range(len(self.choices))))  # indices: any value type
        if self.step is not None or self.num is not None:
            return tune.choice(list(range(len(self.grid_values()))))
        assert self.low is not None and self.high is not None
        if self.integer:
            return (tune.lograndint if self.log else tune.randint)(
                int(self.low), int(self.high) + 1
            )
        return (tune.loguniform if self.log else tune.uniform)(self.low, self.high)

    def value_of(self, sampled: Any) -> Any:
        """The option value a Tune sample stands for (indices for choices and grids)."""
        if not self.is_range:
            return self.choices[int(sampled)]
        if self.step is not None or self.num is not None:
            return self.grid_values()[int(sampled)]
        return int(sampled) if self.integer else float(sampled)


@dataclass(frozen=True)
class Space:
    """A parsed space: fixed pass tables, the searched axes, objectives, constraints."""

    passes: tuple[Mapping[str, Any], ...]
    axes: tuple[Axis, ...]
    target: str = "tensorrt"
    cost: tuple[str, ...] = ("size",)
    fidelity: str = "top1_agreement"
    constraints: Mapping[str, float] = field(default_factory=dict)
    latency_runs: int = 30
    custom_metrics: tuple[str, ...] = ()
    origin: str = "<space>"
    text: str = ""

    @property
    def needs_latency(self) -> bool:
        """Whether an objective or a constraint is a latency (then trials are timed)."""
        named = set(self.cost) | {_constraint_metric(k)[0] for k in self.constraints}
        return bool(named & set(_LATENCY))

    def higher_is_better(self, metric: str) -> bool:
        return BUILTIN_METRICS.get(metric, True)

    def floors(self) -> dict[str, float]:
        """The constraints a recipe's `[verify]` table can carry (recipe.FLOOR_KEYS)."""
        from onnxslim_edge.recipe import FLOOR_KEYS

        return {k: v for k, v in self.constraints.items() if k in FLOOR_KEYS}

    def recipe(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """The recipe (a TOML-ready mapping) of one point: axis key -> value."""
        tables = [dict(p) for p in self.passes]
        enabled = [True] * len(tables)
        for axis in self.axes:
            value = point[axis.key]
            if axis.option == "enabled":
                enabled[axis.pass_index] = bool(value)
            else:
                tables[axis.pass_index][axis.option] = value
        doc: dict[str, Any] = {
            "target": self.target,
            "pass": [t for t, on in zip(tables, enabled) if on],
        }
        floors = self.floors()
        if floors:
            doc["verify"] = floors
        return doc

    def grid(self) -> list[dict[str, Any]]:
        """Every point of the grid, in order; points giving the same recipe appear once."""
        keys = [a.key for a in self.axes]
        seen: set[str] = set()
        points = []
        for values in itertools.product(*(a.grid_values() for a in self.axes)):
            point = dict(zip(keys, values))
            digest = _digest(self.recipe(point))
            if digest not in seen:
                seen.add(digest)
                points.append(point)
        return points

    def check_recipe(self, point: Mapping[str, Any]) -> None:
        """ConfigError (naming the space and the point) if a point's recipe is invalid."""
        from onnxslim_edge.recipe import load_recipe

        try:
            load_recipe(self.recipe(point))
        except ConfigError as exc:
            where = ", ".join(f"{k} = {v!r}" for k, v in point.items())
            raise ConfigError(f"{self.origin}: at {where or 'the fixed recipe'}: {exc}") from None

    def misses(self, metrics: Mapping[str, Any]) -> list[str]:
        """The constraints `metrics` misses (a metric it lacks misses its constraint)."""
        out = []
        for key, bound in self.constraints.items():
            metric, lower = _constraint_metric(key)
            value = metrics.get(metric)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                if metric == "sqnr_db" and value is None and metrics.get("status") == "ok":
                    continue  # identical outputs: SQNR is +inf, written as null
                out.append(f"{metric} not measured")
            elif lower and value < bound:
                out.append(f"{metric} {value:.6g} < {bound:g}")
            elif not lower and value > bound:
                out.append(f"{metric} {value:.6g} > {bound:g}")
        return out


def _constraint_metric(key: str) -> tuple[str, bool]:
    """`min_top1_agreement` -> ("top1_agreement", True); `max_abs_error` is an upper bound
    on max_abs_error (the recipe floor's name)."""
    if key == "max_abs_error":
        return "max_abs_error", False
    prefix, _, metric = key.partition("_")
    return _ALIASES.get(metric, metric), prefix == "min"


def _digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def trial_id(recipe: Mapping[str, Any], inputs: Mapping[str, Any] | None = None) -> str:
    """A trial's id: 12 hex digits of the hash of its recipe and what it runs on."""
    return _digest({"recipe": recipe, "inputs": dict(inputs or {})})[:12]


# --------------------------------------------------------------------------- parsing


def _space_file(source: str | os.PathLike) -> Path:
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: space file not found")
    return path


def load_space(source: str | os.PathLike | Mapping[str, Any]) -> Space:
    """A Space from a TOML file, TOML text or a mapping; ConfigError (one line) for
    anything it cannot use, before any trial runs."""
    from onnxslim_edge.recipe import read_toml

    doc, origin, text = read_toml(source, "<space>", _space_file)
    space = _parse(doc, origin, text)
    # Every value of every axis is checked by the pass's own config, one axis at a
    # time (the others at their first value); a grid checks every combination later.
    first = {a.key: _first_value(a) for a in space.axes}
    space.check_recipe(first)
    for axis in space.axes:
        values = axis.choices if not axis.is_range else (axis.low, axis.high)
        for value in values:
            space.check_recipe({**first, axis.key: value})
    return space


def _first_value(axis: Axis) -> Any:
    return axis.low if axis.is_range else axis.choices[0]


def _parse(doc: Mapping[str, Any], origin: str, text: str) -> Space:
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(
            f"{origin}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(_TOP_KEYS)}"
        )
    target = doc.get("target", "tensorrt")
    if not isinstance(target, str):
        raise ConfigError(f'{origin}: target must be a string, e.g. target = "tensorrt"')
    from onnxslim_edge.context import get_target

    try:
        get_target(target)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    entries = doc.get("pass", [])
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ConfigError(f"{origin}: 'pass' must be an array of tables ([[pass]])")
    if not entries:
        raise ConfigError(f"{origin}: no [[pass]] tables; a space searches the options of passes")
    passes, axes = [], []
    names = [e.get("name") for e in entries]
    for i, entry in enumerate(entries):
        name = entry.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"{origin}: [[pass]] number {i + 1} has no name")
        label = name if names.count(name) == 1 else f"{name}[{i + 1}]"
        fixed: dict[str, Any] = {"name": name}
        for option, value in entry.items():
            if option == "name":
                continue
            key = f"{label}.{option}"
            axis = _axis(value, key, i, option, origin)
            if axis is None:
                if option == "enabled":
                    if not isinstance(value, bool):
                        raise ConfigError(f"{origin}: {key} must be true, false or [false, true]")
                    if not value:
                        axes.append(Axis(key, i, option, choices=(False,)))
                    continue
                fixed[option] = value
            else:
                if option == "enabled" and not all(isinstance(v, bool) for v in axis.choices):
                    raise ConfigError(f"{origin}: {key} must be true, false or [false, true]")
                axes.append(axis)
        passes.append(fixed)
    custom = _custom_metrics(doc.get("metrics", {}), origin)
    known = set(BUILTIN_METRICS) | set(custom) | set(_ALIASES)
    cost, fidelity, latency_runs = _objectives(doc.get("objectives", {}), origin, known)
    constraints = _constraints(doc.get("constraints", {}), origin, known)
    return Space(
        passes=tuple(passes),
        axes=tuple(axes),
        target=target,
        cost=cost,
        fidelity=fidelity,
        constraints=constraints,
        latency_runs=latency_runs,
        custom_metrics=custom,
        origin=origin,
        text=text,
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _axis(value: Any, key: str, index: int, option: str, origin: str) -> Axis | None:
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{origin}: {key} is an empty list; give at least one value")
        return Axis(key, index, option, choices=tuple(value))
    if not isinstance(value, Mapping):
        return None
    if "choices" in value:
        extra = sorted(set(value) - {"choices"})
        choices = value["choices"]
        if extra or not isinstance(choices, list) or not choices:
            raise ConfigError(
                f"{origin}: {key}: write choices as {{choices = [v1, v2, ...]}} (non-empty)"
                + (f"; unknown key(s) {', '.join(extra)}" if extra else "")
            )
        return Axis(key, index, option, choices=tuple(choices))
    if "low" in value or "high" in value:
        extra = sorted(set(value) - _RANGE_KEYS)
        if extra:
            raise ConfigError(
                f"{origin}: {key}: unknown range key(s) {', '.join(extra)}; "
                f"valid: {', '.join(sorted(_RANGE_KEYS))}"
            )
        low, high = value.get("low"), value.get("high")
        step, num, log = value.get("step"), value.get("num"), value.get("log", False)
        if not (_number(low) and _number(high)) or not math.isfinite(low) or low > high:
            raise ConfigError(f"{origin}: {key}: a range needs numbers low <= high")
        if not isinstance(log, bool):
            raise ConfigError(f"{origin}: {key}: log must be true or false")
        if step is not None and (not _number(step) or not step > 0 or not math.isfinite(step)):
            raise ConfigError(f"{origin}: {key}: step must be a number > 0")
        if num is not None and (not isinstance(num, int) or isinstance(num, bool) or num < 1):
            raise ConfigError(f"{origin}: {key}: num must be an integer >= 1")
        if step is not None and (num is not None or log):
            raise ConfigError(f"{origin}: {key}: give step, or num (with log), not both")
        if log and low <= 0:
            raise ConfigError(f"{origin}: {key}: a log range needs low > 0")
        integer = all(isinstance(v, int) for v in (low, high, step or 1))
        return Axis(
            key,
            index,
            option,
            low=low,
            high=high,
            step=step,
            num=num,
            log=log,
            integer=integer,
        )
    return None  # a table that is itself the option's value


def _custom_metrics(table: Any, origin: str) -> tuple[str, ...]:
    if not isinstance(table, Mapping) or set(table) - {"custom"}:
        raise ConfigError(f"{origin}: [metrics] takes one key, custom = [names of metrics]")
    custom = table.get("custom", [])
    if not isinstance(custom, list) or not all(isinstance(c, str) and c for c in custom):
        raise ConfigError(f"{origin}: metrics.custom must be a list of names")
    clash = sorted(set(custom) & set(BUILTIN_METRICS))
    if clash:
        raise ConfigError(f"{origin}: metrics.custom names built-in metric(s) {', '.join(clash)}")
    return tuple(custom)


def _metric(name: Any, where: str, known: set[str]) -> str:
    if not isinstance(name, str) or name not in known:
        valid = ", ".join(sorted(known))
        raise ConfigError(
            f"{where}: unknown metric {name!r}; valid: {valid} "
            "(a metrics_callback's metrics are declared in [metrics] custom = [...])"
        )
    return _ALIASES.get(name, name)


def _objectives(table: Any, origin: str, known: set[str]) -> tuple[tuple[str, ...], str, int]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{origin}: 'objectives' must be a table ([objectives])")
    unknown = sorted(set(table) - set(_OBJECTIVE_KEYS))
    if unknown:
        raise ConfigError(
            f"{origin}: unknown [objectives] key(s) {', '.join(unknown)}; "
            f"valid: {', '.join(_OBJECTIVE_KEYS)}"
        )
    cost = table.get("cost", ["size"])
    if isinstance(cost, str):
        cost = [cost]
    if not isinstance(cost, list) or not cost:
        raise ConfigError(f"{origin}: objectives.cost must be a metric or a non-empty list")
    cost_t = tuple(_metric(c, f"{origin}: objectives.cost", known) for c in cost)
    fidelity = _metric(
        table.get("fidelity", "top1_agreement"), f"{origin}: objectives.fidelity", known
    )
    if not BUILTIN_METRICS.get(fidelity, True):
        raise ConfigError(
            f"{origin}: objectives.fidelity must be a metric where higher is better "
            f"(top1_agreement, cosine, sqnr_db or a custom one), not {fidelity}"
        )
    runs = table.get("latency_runs", 30)
    if not isinstance(runs, int) or isinstance(runs, bool) or runs < 1:
        raise ConfigError(f"{origin}: objectives.latency_runs must be an integer >= 1")
    return cost_t, fidelity, runs


def _constraints(table: Any, origin: str, known: set[str]) -> dict[str, float]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{origin}: 'constraints' must be a table ([constraints])")
    out = {}
    for key, value in table.items():
        if not key.startswith(("min_", "max_")):
            raise ConfigError(
                f"{origin}: constraints.{key}: write min_<metric> or max_<metric>, "
                "e.g. min_top1_agreement = 0.95"
            )
        metric, _ = _constraint_metric(key)
        _metric(metric, f"{origin}: constraints.{key}", known)
        if not _number(value) or not math.isfinite(value):
            raise ConfigError(f"{origin}: constraints.{key} must be a finite number")
        out[key] = float(value)
    return out


# --------------------------------------------------------------------------- TOML out


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {value} cannot be written to TOML")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_key(k)} = {_toml_value(v, where)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise ConfigError(f"{where}: a {type(value).__name__} cannot be written to TOML")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def dump_toml(doc: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    """A recipe mapping (`target`, `pass` tables, `verify`) as TOML text."""
    lines = [f"# {h}" for h in header]
    tables = {k: v for k, v in doc.items() if isinstance(v, Mapping)}
    arrays = {k: v for k, v in doc.items() if k == "pass"}
    for key, value in doc.items():
        if key not in tables and key not in arrays:
            lines.append(f"{_key(key)} = {_toml_value(value, key)}")
    for key, entries in arrays.items():
        for entry in entries:
            lines += ["", f"[[{key}]]"]
            lines += [f"{_key(k)} = {_toml_value(v, key)}" for k, v in entry.items()]
    for key, table in tables.items():
        lines += ["", f"[{key}]"]
        lines += [f"{_key(k)} = {_toml_value(v, key)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
