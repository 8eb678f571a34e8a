"""Passes, their reports, the context they share, pipelines, the registry and recipes.

A *pass* rewrites an `onnx_graphsurgeon.Graph` in place and returns a `PassReport`.
The `Pipeline` hands each pass a fresh graph imported from the current model (so a
caller's model is never changed), exports the result, measures what changed (nodes
added/removed, params, bytes, MACs, wall time), validates it (ONNX checker, an ONNX
Runtime session) and, for passes declared lossless, compares its outputs with the
previous model's through Polygraphy. Passes are found by name in a registry of
built-ins plus the `onnxslim_edge.passes` entry-point group, and configured from
Python, from `NAME:key=value` strings or from a TOML recipe.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import logging
import os
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import onnx

from onnxslim_edge.errors import ConfigError, OnnxSlimEdgeError, UnsupportedError, first_line
from onnxslim_edge.model import (
    ModelSource,
    check_model,
    load_model,
    lower_ir_version,
    min_ir_version,
)

__all__ = [
    "BUILTIN_PASSES",
    "ENTRY_POINT_GROUP",
    "TARGETS",
    "Context",
    "FidelityError",
    "NoConfig",
    "Pass",
    "PassReport",
    "Pipeline",
    "PipelineReport",
    "PipelineResult",
    "Recipe",
    "Skip",
    "Target",
    "available_passes",
    "create_pass",
    "get_pass",
    "load_recipe",
    "make_config",
    "parse_pass_spec",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnxslim_edge.passes"

#: Built-in passes by name, imported only when used.
BUILTIN_PASSES: Mapping[str, str] = types.MappingProxyType(
    {
        "cleanup": "onnxslim_edge.passes.cleanup:Cleanup",
        "fold-batchnorm": "onnxslim_edge.passes.batchnorm:FoldBatchNorm",
        "prune-channels": "onnxslim_edge.passes.prune.channels:PruneChannels",
        "prune-magnitude": "onnxslim_edge.passes.prune.magnitude:PruneMagnitude",
        "sparsify-nm": "onnxslim_edge.passes.prune.nm:SparsifyNM",
        "quantize": "onnxslim_edge.passes.quantize.qdq:Quantize",
        "equalize": "onnxslim_edge.passes.quantize.equalize:Equalize",
        "bias-correct": "onnxslim_edge.passes.quantize.bias_correct:BiasCorrect",
        "fp16": "onnxslim_edge.passes.precision:ConvertFP16",
    }
)


class FidelityError(OnnxSlimEdgeError):
    """A result misses a fidelity floor, or a lossless pass changed the outputs."""


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """What the compressed model is for. Passes read their placement rules from here."""

    name: str
    round_to: int  # channel counts / ranks are rounded to multiples of this
    description: str


TARGETS: Mapping[str, Target] = types.MappingProxyType(
    {
        "tensorrt": Target("tensorrt", 8, "TensorRT explicit quantization (Jetson, GPUs)"),
        # 16: ONNX Runtime's NCHWc block on AVX-512 (8 on AVX2). Pruned channel counts off
        # the block made EfficientNet-Lite0 ~2x slower despite 20-50 % fewer MACs
        # (benchmarks/RESULTS.md, issue 4); on the block, the MAC saving turns into time.
        "onnxruntime-cpu": Target("onnxruntime-cpu", 16, "ONNX Runtime CPU kernels"),
    }
)


def get_target(name: str | Target) -> Target:
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"unknown target '{name}'; valid: {', '.join(TARGETS)}") from None


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class NoConfig:
    """A pass without options."""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert `value` (often a string from the CLI) to the type `hint`, or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if (
            value is None
            or (isinstance(value, str) and value.lower() == "none" and type(None) in args)
        ) and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (tuple, list, Sequence, typing.Sequence):
        items = value.split("|") if isinstance(value, str) else value
        if isinstance(items, str) or not isinstance(items, Iterable):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_hint = args[0] if args else Any
        return tuple(_coerce(v, item_hint, where) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def make_config(config_cls: type, options: Mapping[str, Any], *, where: str) -> Any:
    """Build a frozen config dataclass from a mapping, coercing strings to field types.

    Unknown keys raise ConfigError listing the valid ones; field validation in the
    dataclass's `__post_init__` may raise ConfigError too.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {valid}")
    hints = typing.get_type_hints(config_cls)
    values = {k: _coerce(v, hints.get(k, Any), f"{where}.{k}") for k, v in options.items()}
    try:
        return config_cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def config_dict(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


# --------------------------------------------------------------------------- reports


@dataclass
class Skip:
    """A part of the graph a pass left alone, and why."""

    node: str
    op: str
    reason: str


@dataclass
class PassReport:
    """What one pass changed, as data. The Pipeline fills the measured fields."""

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

    def skip(self, node: Any, reason: str) -> None:
        """Record that `node` (a gs.Node, NodeProto or name) was left alone, and why."""
        name = getattr(node, "name", None) or str(node)
        op = getattr(node, "op", None) or getattr(node, "op_type", "") or ""
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
        return _jsonable(dataclasses.asdict(self))


@dataclass
class PipelineReport:
    passes: list[PassReport] = field(default_factory=list)
    cost_before: dict[str, int] = field(default_factory=dict)
    cost_after: dict[str, int] = field(default_factory=dict)
    wall_time_s: float = 0.0
    target: str = "tensorrt"
    fidelity: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "target": self.target,
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
            rows.append((key, _human(b, key), _human(a, key), change))
        out = _format_rows(rows)
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
        return out + "\n\n" + _format_rows(prow)


def _human(value: int, key: str) -> str:
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


def _format_rows(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """What passes may need besides the graph.

    - `data`: calibration data (anything `onnxslim_edge.data.open_data` accepts).
    - `reference`: the reference (teacher) model; the Pipeline sets it to its input.
    - `target`: "tensorrt" (default) or "onnxruntime-cpu".
    - `input_shapes`: concrete shapes for symbolic input dims, e.g. {"x": (1, 3, 224, 224)}.
    Expensive analyses are cached with `cached()` until a pass changes the graph.
    """

    data: Any = None
    reference: onnx.ModelProto | None = None
    target: str | Target = "tensorrt"
    seed: int = 0
    progress: bool = False
    input_shapes: Mapping[str, Sequence[int]] | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.target = get_target(self.target)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """The analysis `key`, computed once until `invalidate()`."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def invalidate(self, preserve: Iterable[str] = ()) -> None:
        keep = set(preserve)
        for key in list(self._cache):
            if key not in keep:
                del self._cache[key]

    def rng(self, salt: int = 0) -> Any:
        import numpy as np

        return np.random.default_rng(self.seed + salt)


# --------------------------------------------------------------------------- passes


class Pass(abc.ABC):
    """A graph rewrite: `run(graph, ctx)` mutates `graph` and returns a PassReport.

    Subclasses set `name`, `Config` (a frozen, keyword-only dataclass), `lossless`
    (the Pipeline then checks outputs are unchanged) and `preserves` (cached analyses
    still valid after the pass). Construct with a config object or keyword options:
    `FoldBatchNorm()`, `Cleanup(fold_size_limit=1 << 20)`.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    lossless: ClassVar[bool] = False
    preserves: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: Any = None, /, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("give a config object or keyword options, not both")
        if config is None:
            config = make_config(self.Config, options, where=self.name)
        elif not isinstance(config, self.Config):
            raise ConfigError(f"{self.name}: config must be {self.Config.__name__}")
        self.config = config

    @abc.abstractmethod
    def run(self, graph: Any, ctx: Context) -> PassReport:
        """Rewrite `graph` (an onnx_graphsurgeon.Graph) in place; return the report."""

    def new_report(self) -> PassReport:
        return PassReport(self.name, config=config_dict(self.config))

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in config_dict(self.config).items())
        return f"{type(self).__name__}({options})"


# --------------------------------------------------------------------------- registry


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_passes() -> list[str]:
    """Names of every pass: built-ins and those registered by installed packages."""
    return sorted({*BUILTIN_PASSES, *_entry_points()})


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`."""
    if name in BUILTIN_PASSES:
        import importlib

        module, _, attr = BUILTIN_PASSES[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    eps = _entry_points()
    if name in eps:
        cls = eps[name].load()
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise ConfigError(f"entry point '{name}' does not name a Pass subclass")
        return cls
    raise ConfigError(f"unknown pass '{name}'; available: {', '.join(available_passes())}")


def create_pass(name: str, **options: Any) -> Pass:
    """Instantiate the pass registered as `name` with keyword options."""
    return get_pass(name)(**options)


def parse_pass_spec(spec: str) -> Pass:
    """`NAME` or `NAME:key=value,key=value` (lists as `a|b|c`) -> a configured Pass."""
    name, _, rest = spec.partition(":")
    options: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--pass {spec}: expected key=value, got '{item}'")
            options[key.strip()] = value.strip()
    return create_pass(name.strip(), **options)


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    passes: tuple[Pass, ...]
    target: str = "tensorrt"
    floors: Mapping[str, float] = field(default_factory=dict)


#: Fidelity floors a recipe may demand ([verify] table), checked on the final model.
FLOOR_KEYS = ("min_top1_agreement", "min_cosine", "min_sqnr_db", "max_abs_error")


def load_recipe(source: str | os.PathLike | Mapping[str, Any]) -> Recipe:
    """A recipe from a TOML file, TOML text or a mapping.

    target = "tensorrt"
    [[pass]]
    name = "cleanup"
    [[pass]]
    name = "fold-batchnorm"
    [verify]
    min_cosine = 0.999
    """
    origin = "<recipe>"
    if isinstance(source, Mapping):
        doc: Mapping[str, Any] = source
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        text = str(source)
        if isinstance(source, os.PathLike) or (
            not text.lstrip().startswith(("[", "#")) and "\n" not in text and "=" not in text
        ):
            path = Path(source)
            origin = str(path)
            if not path.is_file():
                raise ConfigError(f"{origin}: recipe file not found")
            text = path.read_text(encoding="utf-8", errors="replace")
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{origin}: not valid TOML ({exc})") from exc
    unknown = sorted(set(doc) - {"pass", "target", "verify"})
    if unknown:
        raise ConfigError(
            f"{origin}: unknown key(s) {', '.join(unknown)}; valid: pass, target, verify"
        )
    entries = doc.get("pass", [])
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ConfigError(f"{origin}: 'pass' must be an array of tables ([[pass]])")
    passes = []
    for i, entry in enumerate(entries):
        options = dict(entry)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"{origin}: [[pass]] number {i + 1} has no name")
        passes.append(create_pass(name, **options))
    target = doc.get("target", "tensorrt")
    get_target(target)
    floors = dict(doc.get("verify", {}))
    bad = sorted(set(floors) - set(FLOOR_KEYS))
    if bad:
        raise ConfigError(
            f"{origin}: unknown [verify] key(s) {', '.join(bad)}; valid: {', '.join(FLOOR_KEYS)}"
        )
    for key, value in floors.items():
        floors[key] = _coerce(value, float, f"{origin}: verify.{key}")
    return Recipe(tuple(passes), target=target, floors=floors)


# --------------------------------------------------------------------------- pipeline


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    report: PipelineReport

    def save(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        from onnxslim_edge.model import save_model

        return save_model(self.model, path, **kwargs)


def _fingerprint(model: onnx.ModelProto) -> str:
    """A digest of what the model computes: nodes, interface and every tensor's values.

    Insensitive to what a graphsurgeon round trip changes without changing the model:
    node order, attribute order, value_info, how tensor data is stored, and initializers
    listed as graph inputs (IR < 4). So `modified` means a pass really rewrote something.
    """
    from onnx import numpy_helper

    h = hashlib.blake2b(digest_size=16)
    init_names = {t.name for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        canon = onnx.NodeProto()
        canon.CopyFrom(node)
        attrs = sorted(canon.attribute, key=lambda a: a.name)
        del canon.attribute[:]
        canon.attribute.extend(attrs)
        canon.doc_string = ""
        nodes.append(canon.SerializeToString(deterministic=True))
    for blob in sorted(nodes):
        h.update(blob)
    for value in model.graph.input:
        if value.name not in init_names:
            h.update(b"in:" + value.name.encode())
    for value in model.graph.output:
        h.update(b"out:" + value.name.encode())
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        h.update(b"init:" + t.name.encode() + str((t.data_type, list(t.dims))).encode())
        h.update(numpy_helper.to_array(t).tobytes())
    return h.hexdigest()


def _cost(model: onnx.ModelProto) -> dict[str, int]:
    from onnxslim_edge.analysis.cost import model_cost

    c = model_cost(model)
    return {"nodes": c.nodes, "params": c.params, "size_bytes": c.size_bytes, "macs": c.macs}


def graph_from_model(model: onnx.ModelProto) -> Any:
    """Import a model into an onnx_graphsurgeon Graph (UnsupportedError if gs cannot)."""
    import onnx_graphsurgeon as gs

    try:
        return gs.import_onnx(model)
    except Exception as exc:  # gs raises bare errors on types it cannot represent
        raise UnsupportedError(
            f"onnx-graphsurgeon cannot import the model: {first_line(exc)}"
        ) from exc


def model_from_graph(graph: Any, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export a gs.Graph, keeping `like`'s model-level metadata, with a lowered IR version."""
    import onnx_graphsurgeon as gs

    try:
        model = gs.export_onnx(graph.cleanup().toposort(), do_type_check=False)
    except Exception as exc:  # e.g. optional/sequence types: UnboundLocalError inside gs
        raise UnsupportedError(
            f"onnx-graphsurgeon cannot export the graph: {first_line(exc)}"
        ) from exc
    for key in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, key, getattr(like, key))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    # gs writes the newest IR and drops initializers from IR-3 graph inputs: keep the
    # input's IR unless the exported graph needs a higher one.
    model.ir_version = max(like.ir_version or 3, min_ir_version(model))
    return lower_ir_version(model) if model.ir_version > 10 else model


class Pipeline:
    """An ordered list of passes run on a copy of a model.

    - `validate`: "session" (checker + an ONNX Runtime session, default), "checker", "none".
    - `verify_lossless`: compare each lossless pass's outputs with the previous model's
      (rtol/atol below; on the Context's data, else synthetic inputs) and stop with
      FidelityError when they differ.
    - `floors`: fidelity floors for the final model against the input (see FLOOR_KEYS).
    """

    def __init__(
        self,
        passes: Iterable[Pass | str],
        *,
        validate: Literal["session", "checker", "none"] = "session",
        verify_lossless: bool = True,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        floors: Mapping[str, float] | None = None,
        target: str = "tensorrt",
        max_samples: int = 4,
    ) -> None:
        self.passes = [parse_pass_spec(p) if isinstance(p, str) else p for p in passes]
        if validate not in ("session", "checker", "none"):
            raise ConfigError(f"validate must be session, checker or none, not {validate!r}")
        self.validate = validate
        self.verify_lossless = verify_lossless
        self.rtol, self.atol = rtol, atol
        self.floors = dict(floors or {})
        self.target = get_target(target).name
        self.max_samples = max_samples

    @classmethod
    def from_recipe(cls, source: str | os.PathLike | Mapping[str, Any], **kwargs: Any) -> Pipeline:
        recipe = load_recipe(source)
        kwargs.setdefault("target", recipe.target)
        kwargs.setdefault("floors", recipe.floors)
        return cls(recipe.passes, **kwargs)

    def __repr__(self) -> str:
        return "Pipeline([" + ", ".join(map(repr, self.passes)) + "])"

    def run(self, model: ModelSource, ctx: Context | None = None) -> PipelineResult:
        original = load_model(model)
        current = onnx.ModelProto()
        current.CopyFrom(original)
        if ctx is None:
            ctx = Context(target=self.target)
        if ctx.reference is None:
            ctx.reference = original
        report = PipelineReport(target=ctx.target.name, cost_before=_cost(current))
        self._check_data = _CheckData(original, ctx, self.max_samples)
        start = time.perf_counter()
        bar = _progress(self.passes, ctx.progress, "passes")
        for p in bar:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(p.name)
            current = self._run_pass(p, current, ctx, report)
        report.cost_after = _cost(current)
        if self.floors:
            report.fidelity = self._check_floors(original, current, ctx)
        report.wall_time_s = time.perf_counter() - start
        return PipelineResult(current, report)

    def _run_pass(
        self, p: Pass, model: onnx.ModelProto, ctx: Context, report: PipelineReport
    ) -> onnx.ModelProto:
        graph = graph_from_model(model)
        before_nodes = list(graph.nodes)  # keep them alive: identity marks removed nodes
        cost_before = report.passes[-1].cost_after if report.passes else report.cost_before
        before_fp = _fingerprint(model)
        t0 = time.perf_counter()
        try:
            pass_report = p.run(graph, ctx)
            new_model = model_from_graph(graph, model)
        except OnnxSlimEdgeError:
            raise
        except Exception as exc:
            raise RuntimeError(f"pass '{p.name}' failed: {exc}") from exc
        pass_report.wall_time_s = time.perf_counter() - t0
        before_ids = {id(n) for n in before_nodes}
        after_ids = {id(n) for n in graph.nodes}
        pass_report.nodes_before = len(before_ids)
        pass_report.nodes_after = len(after_ids)
        pass_report.nodes_added = len(after_ids - before_ids)
        pass_report.nodes_removed = len(before_ids - after_ids)
        pass_report.modified = _fingerprint(new_model) != before_fp
        pass_report.cost_before = cost_before
        pass_report.cost_after = _cost(new_model) if pass_report.modified else dict(cost_before)
        if pass_report.modified:
            ctx.invalidate(p.preserves)
            self._validate(new_model, p.name)
            if p.lossless and self.verify_lossless:
                pass_report.validation = self._compare_lossless(model, new_model, ctx, p.name)
        report.passes.append(pass_report)
        log.info(
            "%s: modified=%s, -%d/+%d nodes",
            p.name,
            pass_report.modified,
            pass_report.nodes_removed,
            pass_report.nodes_added,
        )
        return new_model if pass_report.modified else model

    def _validate(self, model: onnx.ModelProto, name: str) -> None:
        if self.validate == "none":
            return
        try:
            check_model(model, f"after pass '{name}'")
            if self.validate == "session":
                from onnxslim_edge.runtime import make_session

                make_session(model)
        except OnnxSlimEdgeError as exc:
            raise RuntimeError(f"pass '{name}' produced an invalid model: {exc}") from exc

    def _compare_lossless(
        self, before: onnx.ModelProto, after: onnx.ModelProto, ctx: Context, name: str
    ) -> dict[str, Any]:
        from onnxslim_edge.verify import compare

        def check(atol: float) -> Any:
            return compare(
                before,
                after,
                data=self._check_data.get(),
                rtol=self.rtol,
                atol=atol,
                atol_mode="range",
                max_samples=self.max_samples,
                input_shapes=ctx.input_shapes,
                seed=ctx.seed,
            )

        result = check(self.atol)
        noise = None
        if not result.passed:
            # Deep float32 graphs: the tolerance may not be tighter than ONNX Runtime's own
            # rewrites (which fold BN and fuse the same way) move the previous model.
            noise = self._float_noise(before, ctx)
            if 2 * noise > self.atol:
                result = check(2 * noise)
        summary = result.to_dict()
        summary["float32_noise"] = noise
        if not result.passed:
            raise FidelityError(f"lossless pass '{name}' changed the outputs: {result.summary()}")
        return summary

    def _float_noise(self, model: onnx.ModelProto, ctx: Context) -> float:
        """Largest output change, relative to the output's range, between running `model`
        with and without ONNX Runtime's graph optimizations: float32 noise of reordering."""
        import numpy as np

        from onnxslim_edge.runtime import make_session

        plain = make_session(model, optimization="disable")
        fused = make_session(model, optimization="all")
        names = [o.name for o in plain.get_outputs()]
        wanted = {i.name for i in plain.get_inputs()}
        worst: dict[str, float] = {}
        scale: dict[str, float] = {}
        for i, feed in enumerate(self._check_data.get()):
            if i >= self.max_samples:
                break
            feed = {k: v for k, v in feed.items() if k in wanted}
            for n, a, b in zip(names, plain.run(None, feed), fused.run(None, feed)):
                a, b = np.asarray(a), np.asarray(b)
                if a.dtype.kind != "f" or a.size == 0 or a.shape != b.shape:
                    continue
                a, b = a.astype(np.float64), b.astype(np.float64)
                finite = np.isfinite(a) & np.isfinite(b)
                worst[n] = max(worst.get(n, 0.0), float(np.abs(a - b)[finite].max(initial=0.0)))
                scale[n] = max(scale.get(n, 0.0), float(np.abs(a[finite]).max(initial=0.0)))
        return max((worst[n] / scale[n] for n in worst if scale[n] > 0), default=0.0)

    def _check_floors(
        self, original: onnx.ModelProto, final: onnx.ModelProto, ctx: Context
    ) -> dict[str, Any]:
        from onnxslim_edge.verify import compare

        result = compare(
            original,
            final,
            data=self._check_data.get(),
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


class _CheckData:
    """The inputs output checks run on: the Context's data, else one synthetic source.

    Built on first use, so a pipeline without lossless passes or floors reads nothing,
    and the warning that the data is synthetic is given once per run, not per pass.
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
                input_shapes=self._ctx.input_shapes,
                seed=self._ctx.seed,
            )
        return self._source


def _progress(items: Sequence[Any], enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="pass", leave=False)
