"""The `onnxslim-edge` command. Every command maps to a Python call:

    inspect MODEL                 -> analysis.model_cost / analysis.io_info
    optimize MODEL -o OUT ...     -> Pipeline(...).run(model, Context(...)); save_model(...)
    verify REFERENCE CANDIDATE    -> verify.compare(reference, candidate, data)
    lint MODEL [--target T]       -> analysis.qdq_lint.lint_qdq / analysis.sparsity_nm.check_nm
    passes                        -> pipeline.available_passes / get_pass
    snapshot MODEL --data D -o G  -> regress.snapshot(model, data, golden)
    regress MODEL GOLDEN          -> regress.regress(model, golden, budget=...)
    build-engine MODEL -o E       -> engine.build_engine(model, engine, EngineConfig(...))
    bundle MODEL --jetpack V -o D -> jetson.bundle(model, jetpack, folder, ...)
    sweep MODEL --space S -o DIR  -> sweep.run.run_sweep(model, space, data=..., eval_data=...)
    demo                          -> demo.run_demo()

Exit status: 0 success, 1 `verify` found a difference beyond tolerance or a missed
fidelity floor, `lint` an error-level violation, `regress` a regression, `bundle` a
failed check or `build-engine` an engine whose outputs differ from ONNX Runtime's; 2
bad input (missing or corrupt file, wrong data, unknown pass or option, impossible
target, an output that would overwrite an input, an unwritable output folder): one
line on stderr naming the cause, and no output file; 3 an internal error (a bug: an
unexpected exception), one line saying so, the traceback with `-v`. SIGINT (130) and
SIGTERM (143) remove every temporary file; a closed stdout (`| head`) ends quietly (141).
All outputs of a run (model, external data, report) appear together or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from onnxslim_edge.errors import ConfigError, OnnxSlimEdgeError, UnsupportedError, first_line

__all__ = ["main"]

log = logging.getLogger("onnxslim_edge")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as ConfigError (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def _parse_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]] | None:
    """`x=1,3,224,224` (repeatable) -> {"x": (1, 3, 224, 224)}; every dim >= 1."""
    if not items:
        return None
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            raise ConfigError(
                f"--input-shape {item}: expected NAME=D0,D1,... with integers"
            ) from None
        if any(d < 1 for d in shapes[name]):
            raise ConfigError(f"--input-shape {item}: input '{name}' needs dims >= 1")
    return shapes


def _check_input_shapes(model: Any, shapes: dict[str, tuple[int, ...]] | None) -> None:
    """Each --input-shape names an input of `model` and agrees with its rank and fixed dims."""
    if not shapes:
        return
    initializers = {t.name for t in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in initializers}
    for name, dims in shapes.items():
        flag = f"--input-shape {name}={','.join(map(str, dims))}"
        if name not in inputs:
            raise ConfigError(
                f"{flag}: the model has no input '{name}'; inputs: {', '.join(inputs) or 'none'}"
            )
        ttype = inputs[name].type.tensor_type
        if not ttype.HasField("shape"):
            continue
        declared = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
        if len(declared) != len(dims):
            raise ConfigError(
                f"{flag}: input '{name}' has {len(declared)} dims in the model, not {len(dims)}"
            )
        for axis, (want, given) in enumerate(zip(declared, dims)):
            if want is not None and want > 0 and want != given:
                raise ConfigError(
                    f"{flag}: dim {axis} of input '{name}' is fixed at {want} in the model"
                )


def _int_in(low: int, high: int | None, expected: str) -> Any:
    """An argparse type: an integer in [low, high] (argparse reports others as usage errors)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _int_in(1, None, "a positive integer")
_seed = _int_in(0, None, "an integer >= 0")  # numpy's generators refuse negative seeds


def _opset(text: str) -> int:
    """argparse type: a default-domain opset this onnx knows."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    return _int_in(1, newest, f"an opset from 1 to {newest}")(text)


def _tolerance(text: str) -> float:
    """argparse type: a finite number >= 0 (NaN would make every comparison pass)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _data(spec: str | None, model: Any, args: argparse.Namespace, *, batch_size: int = 1) -> Any:
    if spec is None:
        return None
    from onnxslim_edge.data import open_data, parse_preprocess

    preprocess = parse_preprocess(args.preprocess) if args.preprocess else None
    return open_data(
        spec,
        model,
        batch_size=batch_size,
        limit=args.samples,
        preprocess=preprocess,
        input_shapes=args.input_shape,
        seed=args.seed,
    )


# --------------------------------------------------------------------------- commands


def cmd_inspect(args: argparse.Namespace) -> int:
    from onnxslim_edge.analysis import io_info, model_cost
    from onnxslim_edge.analysis.resolve import resolve_input_shapes
    from onnxslim_edge.model import load_model

    model = load_model(args.model)
    _check_input_shapes(model, args.input_shape)
    resolved = resolve_input_shapes(model, args.input_shape)
    for warning in resolved.warnings:
        log.warning("%s", warning)
    cost = model_cost(model, input_shapes=dict(resolved.shapes) if resolved.informative else None)
    inputs, outputs = io_info(model)
    info = {
        "model": str(args.model),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "params": cost.params,
        "size_bytes": cost.size_bytes,
        "macs": cost.macs,
        "macs_by_op": cost.macs_by_op,
        "input_shapes": resolved.to_dict(),
        "nodes": cost.nodes,
        "ops": cost.ops,
        "weight_sparsity": cost.sparsity,
        "cost_notes": cost.notes,
        "inputs": [_tensor_json(t) for t in inputs],
        "outputs": [_tensor_json(t) for t in outputs],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from onnxslim_edge.pipeline import _human

    print(
        f"{info['model']}  (IR {info['ir_version']}, opsets {info['opsets']}, {info['producer']})"
    )
    for key in ("nodes", "params", "size_bytes", "macs"):
        print(f"  {key:<12}{_human(info[key], key)}")
    if resolved.symbolic:
        print(f"  {'at shapes':<12}{resolved.describe()}")
    for note in cost.notes:
        print(f"  {'note':<12}{note}")
    print(f"  {'sparsity':<12}{cost.sparsity:.1%}")
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            print(f"  {kind[:-1]:<12}{t['name']}: {t['dtype']} {t['shape']}")
    top = ", ".join(f"{op} {n}" for op, n in list(cost.ops.items())[:12])
    print(f"  {'ops':<12}{top}")
    return 0


def _tensor_json(t: Any) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def _data_files(spec: str | None) -> list[Path]:
    """The files a data spec reads (a file, or every file under a folder)."""
    if not spec or spec == "random":
        return []
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file()]
    return []


def cmd_optimize(args: argparse.Namespace) -> int:
    from onnxslim_edge.model import Outputs, check_output_path, check_paths, load_model_and_files
    from onnxslim_edge.pipeline import Context, Pipeline, load_recipe, parse_pass_spec

    if not args.recipe and not args.passes:
        raise ConfigError("optimize: give --recipe FILE or at least one --pass NAME")
    src = Path(args.model)
    out = Path(args.output)
    if out.exists() and src.exists() and out.resolve() == src.resolve() and not args.overwrite:
        raise ConfigError(
            f"{out}: refusing to overwrite the input model; choose another -o or pass --overwrite"
        )
    check_output_path(out, "output")
    if args.report:
        check_output_path(args.report, "report")

    # Parse everything the user typed before any work starts.
    passes, floors, target = [], {}, args.target
    if args.recipe:
        recipe = load_recipe(Path(args.recipe) if Path(args.recipe).is_file() else args.recipe)
        passes.extend(recipe.passes)
        floors.update(recipe.floors)
        target = target or recipe.target
    passes.extend(parse_pass_spec(spec) for spec in args.passes or ())
    pipeline = Pipeline(
        passes,
        target=target or "tensorrt",
        floors=floors,
        verify_lossless=not args.no_verify,
        validate="none" if args.no_verify else "session",
    )
    model, model_files = load_model_and_files(src)
    # No output may be a file this run reads, nor two outputs one file.
    out_data = out.with_name(out.name + ".data")
    writes = [("-o", out), ("-o's external data", out_data)]
    if args.report:
        writes.append(("--report", Path(args.report)))
    reads = [("the input model", model_files[0])]
    reads += [("the input's external data", f) for f in model_files[1:]]
    reads += [("the calibration data", f) for f in _data_files(args.calib)]
    allow = []
    if args.overwrite:  # the input model (and its data file) replaced on purpose
        allow = [(out, src)] + [(out_data, f) for f in model_files[1:]]
    check_paths(writes, reads, allow=allow)
    _check_input_shapes(model, args.input_shape)
    ctx = Context(
        data=_data(args.calib, model, args),
        target=pipeline.target,
        seed=args.seed,
        progress=_progress_enabled(args),
        input_shapes=args.input_shape,
    )
    try:
        result = pipeline.run(model, ctx, copy=False)  # ours alone: no copy
    except RuntimeError as exc:
        _input_cannot_be_checked(model, src, pipeline, exc)
        raise
    with Outputs() as outputs:  # model, external data and report: all or none
        outputs.model(result.model, out, opset=args.opset)
        if args.report:
            outputs.text(args.report, result.report.to_json())
        outputs.commit()
    if not args.quiet:
        print(result.report.to_table())
        for p in result.report.passes:
            for skip in p.skips[:20]:
                print(f"  [{p.name}] skipped {skip.node} ({skip.op}): {skip.reason}")
            if len(p.skips) > 20:
                print(f"  [{p.name}] ... and {len(p.skips) - 20} more skips (see --report)")
            for warning in p.warnings:
                print(f"  [{p.name}] warning: {warning}")
        print(f"wrote {out}" + (f" and {args.report}" if args.report else ""))
    return 0


def _input_cannot_be_checked(model: Any, src: Path, pipeline: Any, exc: BaseException) -> None:
    """A pass's result failed validation: if the input itself fails it, say that (exit 2).

    ONNX Runtime refuses models with unknown op domains or unreleased opsets; then no
    pass result can be validated or compared, whatever the pass did.
    """
    if pipeline.checks.validate_mode != "session":
        return
    from onnxslim_edge.runtime import make_session

    try:
        make_session(model, optimization="disable")
    except UnsupportedError as err:
        raise UnsupportedError(
            f"{src}: {err}; the passes' results cannot be checked (--no-verify skips the checks)"
        ) from exc


def cmd_verify(args: argparse.Namespace) -> int:
    """Element-wise tolerances, or the recipes' fidelity floors (which then judge alone,
    unless --rtol/--atol are also given), as `regress` does."""
    from onnxslim_edge.model import load_model
    from onnxslim_edge.verify import compare

    floors = _floors(args)
    bad = [f"{k}={v}" for k, v in floors.items() if not math.isfinite(v)]
    if bad:  # a NaN floor would pass everything
        raise ConfigError(f"fidelity floors must be finite numbers (got {', '.join(bad)})")
    elementwise = not floors or args.rtol is not None or args.atol is not None
    reference = load_model(args.reference)
    candidate = load_model(args.candidate)
    _check_input_shapes(reference, args.input_shape)
    data = _data(args.data, reference, args)
    result = compare(
        reference,
        candidate,
        data,
        rtol=1e-5 if args.rtol is None else args.rtol,
        atol=1e-5 if args.atol is None else args.atol,
        atol_mode=args.atol_mode,
        max_samples=args.samples,
        input_shapes=args.input_shape,
        seed=args.seed,
        progress=_progress_enabled(args),
    )
    lines, missed = _floor_lines(result, floors)
    passed = (result.passed or not elementwise) and not missed
    if args.json:
        out = result.to_dict()
        if floors:
            out["elementwise"] = elementwise
            out["floors"] = floors
            out["floors_missed"] = missed
        out["passed"] = passed
        print(json.dumps(out, indent=2))
    else:
        print(result.to_table())
        if not elementwise:
            print("the floors judge, not rtol/atol (the 'ok' column); --rtol/--atol add them")
        for line in lines:
            print(line)
        if passed:
            print("PASS")
        else:
            why = [result.summary()] if elementwise and not result.passed else []
            print("FAIL: " + "; ".join(why + missed))
    return 0 if passed else 1


def _floor_lines(result: Any, floors: dict[str, float]) -> tuple[list[str], list[str]]:
    """One report line per fidelity floor (its worst output's value, met or missed) and
    the misses, from the fidelity engine's own `misses`. A comparison that failed (an
    output missing, a candidate ONNX Runtime cannot run) misses every floor."""
    from onnxslim_edge.verify import FLOOR_SPECS

    lines, missed = [], []
    for key, floor in floors.items():
        attr, label, sign = FLOOR_SPECS[key]
        misses = result.misses({key: floor})
        missed += [m for m in misses if m not in missed]
        worst = getattr(result, attr)
        bound = f"{label} {'>=' if sign > 0 else '<='} {floor:.10g}"
        if misses:
            verdict = "FAIL (" + "; ".join(misses) + ")"
        elif worst is None:
            verdict = "not applicable (no output defines it)"
        else:
            verdict = f"ok (worst {worst:.6g})"
        lines.append(f"floor {bound}: {verdict}")
    return lines, missed


def cmd_lint(args: argparse.Namespace) -> int:
    """The Q/DQ rules of --target (TensorRT's by default) and, with --nm, the N:M pattern."""
    from onnxslim_edge.analysis.qdq_lint import format_violations, lint_qdq
    from onnxslim_edge.analysis.sparsity_nm import check_nm, format_nm_results
    from onnxslim_edge.model import load_model

    model = load_model(args.model)
    violations = lint_qdq(model, args.target)
    failed = any(v.severity == "error" for v in violations)
    nm_results = None
    if args.nm:
        try:
            n, m = (int(v) for v in args.nm.split(":"))
            if not 0 < n < m:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--nm {args.nm}: expected N:M with 0 < N < M, e.g. 2:4") from None
        nm_results = check_nm(model, n, m)
        failed = failed or any(r.violation for r in nm_results)
    if args.json:
        out = {
            "target": args.target,
            "qdq": [dataclasses.asdict(v) for v in violations],
            "passed": not failed,
        }
        if nm_results is not None:
            out["nm"] = [dataclasses.asdict(r) for r in nm_results]
        print(json.dumps(out, indent=2))
    else:
        label = {"tensorrt": "TensorRT", "onnxruntime-cpu": "ONNX Runtime CPU"}[args.target]
        print(f"{label} Q/DQ rules: " + format_violations(violations))
        if nm_results is not None:
            print(format_nm_results(nm_results, n, m))
    return 1 if failed else 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from onnxslim_edge.regress import snapshot

    snap = snapshot(
        args.model,
        args.data,
        args.output,
        samples=args.samples,
        input_shapes=args.input_shape,
        latency_runs=args.latency_runs,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    if not args.quiet:
        sig = snap.signature
        print(
            f"wrote {snap.path}: {sig['samples']} sample(s), {sig['nodes']} nodes, "
            f"{sig['params']} params, {sig['macs']} MACs"
            + (f", {sig['latency']['median_ms']:.3f} ms median" if sig["latency"] else "")
        )
    return 0


def _floors(args: argparse.Namespace) -> dict[str, float]:
    pairs = {
        "min_cosine": args.min_cosine,
        "min_sqnr_db": args.min_sqnr,
        "min_top1_agreement": args.min_top1_agreement,
        "max_abs_error": args.max_abs_error,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def cmd_regress(args: argparse.Namespace) -> int:
    from onnxslim_edge.regress import regress

    result = regress(
        args.model,
        args.golden,
        budget=args.budget,
        rtol=args.rtol,
        atol=args.atol,
        atol_mode=args.atol_mode,
        floors=_floors(args),
        input_shapes=args.input_shape,
        latency_runs=args.latency_runs,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.to_text())
    return 0 if result.passed else 1


def cmd_build_engine(args: argparse.Namespace) -> int:
    from onnxslim_edge.engine import EngineConfig, build_engine, parse_profile

    config = EngineConfig(
        fp16=args.fp16,
        int8=args.int8,
        sparsity=args.sparsity,
        timing_cache=args.timing_cache,
        profiles=parse_profile(args.profile) if args.profile else {},
        workspace_mib=args.workspace,
    )
    result = build_engine(
        args.model,
        args.output,
        config,
        data=args.data,
        samples=args.samples,
        rtol=args.rtol,
        atol=args.atol,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"wrote {result.path} (TensorRT {result.tensorrt_version})")
        print(result.comparison.to_table())
        print(("PASS: " if result.passed else "FAIL: ") + result.comparison.summary())
    return 0 if result.passed else 1


def cmd_bundle(args: argparse.Namespace) -> int:
    from onnxslim_edge.engine import parse_profile
    from onnxslim_edge.jetson import bundle

    result = bundle(
        args.model,
        args.jetpack,
        args.output,
        data=args.data,
        samples=args.samples,
        profiles=parse_profile(args.profile) if args.profile else {},
        fp16=args.fp16,
        int8=args.int8,
        sparsity=args.sparsity,
        dla=args.dla,
        force=args.force,
        overwrite=args.overwrite,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_text())
    return 0 if result.passed else 1


def _space_path(spec: str) -> Path:
    """A space file, or the name of a shipped one (`edge` -> recipes/edge.space.toml)."""
    path = Path(spec)
    if path.exists() or path.suffix:
        return path
    from importlib.resources import files

    shipped = Path(str(files("onnxslim_edge") / "recipes" / f"{spec}.space.toml"))
    return shipped if shipped.is_file() else path


def cmd_sweep(args: argparse.Namespace) -> int:
    from onnxslim_edge.sweep.run import run_sweep

    out = Path(args.output)
    reads = [Path(args.model), Path(args.space)]
    reads += _data_files(args.data) + _data_files(args.eval)
    for path in reads:
        if path.exists() and out.exists() and out.resolve() == path.resolve():
            raise ConfigError(f"{out}: -o would overwrite an input; choose another folder")

    def echo(trial: Any, done: int, total: int) -> None:
        m = trial.metrics
        if m.get("status") != "ok":
            what = f"failed: {m.get('reason', '')}"
        else:
            parts = [
                f"{k} {m[k]}" if isinstance(m[k], int) else f"{k} {m[k]:.4g}"
                for k in dict.fromkeys([*space.cost, space.fidelity])
                if isinstance(m.get(k), (int, float))
            ]
            what = ", ".join(parts)
        tag = " (done before)" if trial.resumed else ""
        print(f"[{done}/{total}] {trial.id}{tag}: {what}", flush=True)

    from onnxslim_edge.sweep.space import load_space

    space = load_space(_space_path(args.space))
    result = run_sweep(
        args.model,
        space,
        data=args.data,
        eval_data=args.eval,
        out=out,
        workers=args.workers,
        address=args.address,
        search=args.search,
        trials=args.trials,
        seed=args.seed,
        on_trial=None if args.quiet else echo,
    )
    if not args.quiet:
        failed = sum(not t.ok for t in result.trials)
        print(
            f"{len(result.trials)} trials ({result.ran} run, {result.resumed} done before, "
            f"{failed} failed) in {result.wall_time_s:.1f} s; front: {len(result.front)} trials"
        )
        if result.best is None:
            print("no trial meets the constraints: no best.toml")
        else:
            print(f"best: trial {result.best.id}, {out / 'best.toml'}")
        print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    """Each pass: its whole first sentence, then per option its default, the values it
    takes (from the config's type hints) and its meaning (from the config docstring's
    `- `name`: ...` list)."""
    import textwrap
    import typing

    from onnxslim_edge.pipeline import available_passes, get_pass

    for name in available_passes():
        cls = get_pass(name)
        lossless = "  (lossless)" if cls.lossless else ""
        head = f"{name}{lossless}: {_first_sentence(cls.__doc__ or '')}"
        print(textwrap.fill(head, 96, subsequent_indent=" " * 4, break_on_hyphens=False))
        if not dataclasses.is_dataclass(cls.Config):
            continue
        meanings = _option_meanings(cls.Config.__doc__ or "")
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = "required" if f.default is dataclasses.MISSING else _option_value(default)
            allowed = _allowed_values(hints.get(f.name, Any))
            print(f"    {f.name} = {shown}" + (f"  [{allowed}]" if allowed else ""))
            meaning = meanings.get(f.name)
            if meaning:
                indent = " " * 8
                print(
                    textwrap.fill(
                        meaning,
                        96,
                        initial_indent=indent,
                        subsequent_indent=indent,
                        break_on_hyphens=False,
                    )
                )
    return 0


def _first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, whole ("e.g." does not end it)."""
    import re

    para = " ".join(doc.strip().split("\n\n")[0].split())
    end = re.search(r"(?<!\be\.g)(?<!\bi\.e)\.(?=\s|$)", para)
    return para[: end.end()] if end else para


def _option_meanings(doc: str) -> dict[str, str]:
    """`- `a`: text` (also `- `a` / `b`: text`, `- `a`, `b`: text`) items of a config
    docstring, continuation lines joined: option name -> text."""
    import re

    meanings: dict[str, str] = {}
    items = re.findall(r"^\s*- (.+?)(?=^\s*- |^\s*$|\Z)", doc, flags=re.M | re.S)
    for item in items:
        head, sep, text = item.partition(":")
        names = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", head)
        if not sep or not names or re.sub(r"`[^`]*`|[\s,/]|and", "", head):
            continue
        for n in names:
            meanings.setdefault(n, " ".join(text.split()))
    return meanings


def _option_value(value: Any) -> str:
    """A default as typed on the command line (`--pass NAME:key=value`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "|".join(map(str, value)) if value else "(empty)"
    return str(value)


def _allowed_values(hint: Any) -> str:
    """What an option takes, from its type hint: choices, true|false, a number ..."""
    import types
    import typing

    origin, targs = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_allowed_values(a) for a in targs if a is not type(None)]
        return " or ".join(p for p in parts if p) + (" or none" if type(None) in targs else "")
    if origin is typing.Literal:
        return " | ".join(map(str, targs))
    if origin in (tuple, list):
        item = _allowed_values(targs[0]) if targs else ""
        return "list" + (f" of {item}" if item else "") + ": a|b|c"
    return {bool: "true | false", int: "integer", float: "number", str: "text"}.get(hint, "")


def cmd_demo(args: argparse.Namespace) -> int:
    from onnxslim_edge.demo import run_demo

    run_demo(
        Path(args.out),
        progress=_progress_enabled(args),
        runs=args.runs,
        target=args.target,
        echo=not args.quiet,
    )
    return 0


def _progress_enabled(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxslim-edge",
        description="Compress ONNX models for edge devices (TensorRT on Jetson, ONNX Runtime "
        "on CPUs): inspect a model, optimize it with passes, verify and lint the result. "
        "`onnxslim-edge COMMAND --help` describes each command.",
        epilog="Exit status: 0 success; 1 a check found a problem (verify, lint, regress, "
        "bundle, build-engine); 2 bad input (one line on stderr, no output file); 3 an "
        "internal error (a bug; -v shows the traceback).",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--preprocess",
            help="image preprocessing, e.g. '224x224,mean=0.485|0.456|0.406,std=0.229|0.224|0.225'",
        )
        p.add_argument("--samples", type=_positive_int, help="use at most this many samples")
        p.add_argument(
            "--input-shape",
            action="append",
            metavar="NAME=D0,D1,..",
            help="concrete shape for symbolic input dims (repeatable)",
        )
        p.add_argument("--seed", type=_seed, default=0)
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or tables")

    def floor_options(p: argparse.ArgumentParser) -> None:
        """The recipes' fidelity floors (verify.FLOOR_KEYS), judged per output."""
        p.add_argument(
            "--min-cosine", type=float, help="fidelity floor: judges instead of rtol/atol"
        )
        p.add_argument("--min-sqnr", type=float, metavar="DB", help="fidelity floor in dB")
        p.add_argument(
            "--min-top1-agreement", type=float, help="fidelity floor for 2-D logits (0..1)"
        )
        p.add_argument("--max-abs-error", type=float, help="fidelity limit")

    p = sub.add_parser("inspect", help="params, size, MACs, ops, inputs and outputs of a model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,..")
    p.add_argument("-q", "--quiet", action="store_true", help="no ONNX Runtime warnings")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("optimize", help="run passes on a model and save the result")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output .onnx (written atomically)")
    p.add_argument(
        "--recipe",
        metavar="NAME|FILE",
        help=f"a shipped recipe ({', '.join(_shipped_recipes())}) or a TOML file ([[pass]] tables)",
    )
    p.add_argument(
        "--pass",
        dest="passes",
        action="append",
        metavar="NAME[:key=value,...]",
        help="a pass to run, in order (repeatable)",
    )
    p.add_argument(
        "--calib", help="calibration data: .npz, folder of .npz/.npy/images, or 'random'"
    )
    p.add_argument(
        "--target",
        choices=("tensorrt", "onnxruntime-cpu"),
        help="default: the recipe's target, else tensorrt (one rule, demo's too)",
    )
    p.add_argument("--report", help="write the pipeline report as JSON here")
    p.add_argument("--opset", type=_opset, help="convert the result to this opset")
    p.add_argument("--overwrite", action="store_true", help="allow -o to be the input file")
    p.add_argument(
        "--no-verify", action="store_true", help="skip validation and lossless output checks"
    )
    data_options(p)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("verify", help="compare two models' outputs on the same inputs")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument(
        "--data", help="inputs: .npz, folder of .npz/.npy/images; default: random (smoke test)"
    )
    p.add_argument("--rtol", type=_tolerance, help="element-wise tolerance (default 1e-5)")
    p.add_argument("--atol", type=_tolerance, help="default 1e-5 (x output range, see --atol-mode)")
    p.add_argument(
        "--atol-mode",
        choices=("absolute", "range"),
        default="range",
        help="range: atol is relative to max|reference| per output",
    )
    floor_options(p)
    p.add_argument("--json", action="store_true")
    data_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("lint", help="check a target's Q/DQ placement rules (and N:M sparsity)")
    p.add_argument("model")
    p.add_argument(
        "--target",
        choices=("tensorrt", "onnxruntime-cpu"),
        default="tensorrt",
        help="the runtime the model was quantized for (default tensorrt)",
    )
    p.add_argument(
        "--nm", metavar="N:M", help="also check N:M sparsity of Conv/Gemm/MatMul weights"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("snapshot", help="record a model's signature and outputs as a golden folder")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="inputs: .npz, folder of .npz/.npy, or 'random'")
    p.add_argument("-o", "--output", required=True, help="golden folder (written atomically)")
    p.add_argument(
        "--latency-runs",
        type=int,
        default=0,
        help="also record a median latency over this many runs (for reading only)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing golden folder")
    p.add_argument("--samples", type=int, help="record at most this many samples")
    p.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,..")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("regress", help="compare a model with a golden folder; exit 1 on regression")
    p.add_argument("model")
    p.add_argument("golden", help="folder written by snapshot")
    p.add_argument(
        "--budget",
        metavar="KEY=LIMIT,...",
        help="allowed growth: size, params, macs, nodes, latency; e.g. size=+2%%,macs=0,"
        "nodes=+0,latency=+10%% (latency timed side by side with the golden model)",
    )
    p.add_argument("--rtol", type=float, help="element-wise tolerance (default 1e-5)")
    p.add_argument("--atol", type=float, help="default 1e-5 (x output range, see --atol-mode)")
    p.add_argument("--atol-mode", choices=("absolute", "range"), default="range")
    floor_options(p)
    p.add_argument("--latency-runs", type=int, default=30, help="timed runs per model")
    p.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,..")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_regress)

    def engine_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--fp16", action="store_true", help="allow fp16 kernels")
        p.add_argument(
            "--int8", action="store_true", help="int8 from the model's Q/DQ nodes (explicit only)"
        )
        p.add_argument("--sparsity", action="store_true", help="use 2:4 sparse weights")
        p.add_argument(
            "--profile",
            action="append",
            metavar="NAME=MIN:OPT:MAX",
            help="optimization profile of a dynamic input, e.g. x=1x3x224x224:8x3x224x224:"
            "16x3x224x224 (repeatable, one per input)",
        )
        p.add_argument("--data", help="inputs for the comparison (.npz, folder); default random")
        p.add_argument("--samples", type=int, default=8, help="samples to compare")
        p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "build-engine", help="build a TensorRT engine (Polygraphy) and compare it with ONNX Runtime"
    )
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="engine file (written atomically)")
    p.add_argument("--timing-cache", metavar="FILE", help="read and update this timing cache")
    p.add_argument("--workspace", type=int, metavar="MIB", help="builder workspace limit")
    p.add_argument(
        "--rtol", type=float, help="default by precision: fp32 1e-3, fp16 1e-2, int8 5e-2"
    )
    p.add_argument("--atol", type=float, help="x output range; default by precision")
    engine_options(p)
    p.set_defaults(func=cmd_build_engine)

    p = sub.add_parser(
        "bundle", help="check a model against a JetPack's TensorRT and write a device hand-off"
    )
    p.add_argument("model")
    p.add_argument("--jetpack", required=True, choices=("5.1", "6.0", "6.1", "6.2", "7"))
    p.add_argument("-o", "--output", required=True, help="folder (written atomically)")
    p.add_argument("--dla", action="store_true", help="also check DLA constraints")
    p.add_argument("--force", action="store_true", help="write the folder despite errors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    engine_options(p)
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser(
        "sweep", help="try a space of recipes on Ray; write the Pareto front and best.toml"
    )
    p.add_argument("model")
    p.add_argument(
        "--space", required=True, help="space TOML (docs/sweep.md), or 'edge' for the shipped one"
    )
    p.add_argument("--data", help="calibration data: .npz, folder of .npz/.npy, or 'random'")
    p.add_argument("--eval", required=True, help="evaluation data fidelity is measured on")
    p.add_argument("-o", "--output", required=True, help="sweep folder (re-run it to resume)")
    p.add_argument("--workers", type=_positive_int, help="trials at once (default: the cores)")
    p.add_argument("--address", help="an existing Ray cluster (default: a local Ray)")
    p.add_argument("--search", choices=("grid", "optuna"), default="grid")
    p.add_argument("--trials", type=_positive_int, help="trials Optuna suggests (default 16)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no per-trial lines")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("passes", help="list the available passes and their options")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("demo", help="optimize the bundled digits CNN and print before/after")
    p.add_argument(
        "--out", default="onnxslim-edge-demo", help="folder for the optimized model and report"
    )
    p.add_argument(
        "--runs", type=_positive_int, default=30, help="timed runs per model for latency"
    )
    p.add_argument(
        "--target",
        choices=("tensorrt", "onnxruntime-cpu"),
        help="as for optimize: default the recipe's target (demo.toml: onnxruntime-cpu, "
        "the CPU the demo measures on), else tensorrt",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing (warnings only)")
    p.set_defaults(func=cmd_demo)
    return parser


def _shipped_recipes() -> list[str]:
    from onnxslim_edge.recipe import shipped_recipes

    return list(shipped_recipes())


def _version() -> str:
    from onnxslim_edge import __version__

    return f"onnxslim-edge {__version__}"


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt so every temporary file is removed."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean-up; SIGKILL still works
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread for the duration (then restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error(message: str) -> None:
    print("onnxslim-edge: " + " ".join(message.split()), file=sys.stderr)  # one line, always


def _quiet_stdout() -> None:
    """After a broken pipe: send what is left of stdout to /dev/null (no error at exit)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    verbose = 0
    try:
        with _sigterm_unwinds():
            from onnxslim_edge.runtime import return_freed_memory

            return_freed_memory()
            parser = build_parser()
            args = parser.parse_args(argv)
            verbose = args.verbose
            if getattr(args, "input_shape", None) is not None:
                args.input_shape = _parse_shapes(args.input_shape)
            level = logging.WARNING - 10 * min(args.verbose, 2)
            logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
            if getattr(args, "quiet", False):  # ONNX Runtime's own warnings too
                from onnxslim_edge.runtime import set_ort_log_severity

                set_ort_log_severity(3)
            rc = args.func(args)
            sys.stdout.flush()  # a closed pipe raises here, inside the handlers below
            return rc
    except OnnxSlimEdgeError as exc:
        _error(f"error: {exc}")
        return 2
    except BrokenPipeError:  # `onnxslim-edge inspect m.onnx | head`: stop quietly
        _quiet_stdout()
        return 141
    except OSError as exc:  # disk full, permission denied ...: the cause, not a traceback
        if verbose:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"error: {where}{exc.strerror or exc}")
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Terminated:
        _error("terminated (SIGTERM)")
        return 143
    except Exception as exc:  # a bug, not bad input: say so, with the traceback on -v
        if verbose:
            traceback.print_exc()
        _error(
            f"internal error: {type(exc).__name__}: {first_line(exc)}"
            + ("" if verbose else " (a bug in onnxslim-edge; -v shows the traceback)")
        )
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
