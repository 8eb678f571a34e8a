"""Run the benchmark: `python -m benchmarks.run [--models a,b] [--quick] [--out DIR]`.

For each model (default: all of `benchmarks.specs.MODEL_NAMES`) every method of
`benchmarks.methods` runs and is measured (see `benchmarks.harness`); the results go
to `<out>/<model>.json`, then RESULTS.md and the plots are regenerated from every JSON
in `<out>` (see `benchmarks.report`). A model whose data or weights cannot be prepared (e.g. a missing
optional package) is skipped with a message; the exit status is 1 when any was skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import prefer_installed_package

prefer_installed_package()

__all__ = ["DEFAULT_OUT", "main", "run"]

log = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from benchmarks.methods import method_names
    from benchmarks.specs import MODEL_NAMES

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--models",
        default=",".join(MODEL_NAMES),
        help=f"comma-separated, from: {', '.join(MODEL_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of: {', '.join(method_names())} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer timed runs (10, warm-up 2)")
    parser.add_argument(
        "--runs", type=int, default=None, help="timed runs per latency (default 30)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for <model>.json and plots"
    )
    parser.add_argument(
        "--md",
        type=Path,
        default=None,
        help="where RESULTS.md goes (default: benchmarks/RESULTS.md for the default --out, "
        "else <out>/RESULTS.md)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def run(
    models: Sequence[str],
    out: Path,
    *,
    quick: bool = False,
    runs: int | None = None,
    methods: Sequence[str] | None = None,
    md: Path | None = None,
    plots: bool = True,
) -> tuple[dict[str, Path], dict[str, str]]:
    """Benchmark `models` into `out`; return (model -> JSON path, model -> why skipped)."""
    from benchmarks import harness, report, specs
    from benchmarks import methods as bench_methods
    from onnxslim_edge.errors import ConfigError

    unknown = [m for m in models if m not in specs.MODEL_NAMES]
    if unknown:
        raise ConfigError(
            f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(specs.MODEL_NAMES)}"
        )
    if methods is not None:
        bad = [m for m in methods if m not in bench_methods.method_names()]
        if bad:
            raise ConfigError(
                f"unknown method(s) {', '.join(bad)}; valid: {', '.join(bench_methods.method_names())}"
            )
    overrides = {} if runs is None else {"runs": runs}
    if methods is not None:
        overrides["methods"] = tuple(methods)
    settings = (
        harness.BenchmarkSettings.quick_mode(**overrides)
        if quick
        else harness.BenchmarkSettings(**overrides)
    )
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for name in models:
        t0 = time.perf_counter()
        try:
            spec = specs.build_spec(name, settings)
        except Exception as exc:  # missing optional packages, no cached wheel and no network
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            skipped[name] = f"{type(exc).__name__}: {first}"
            log.error("%s: cannot prepare the model or its data: %s", name, first)
            continue
        workdir = harness.default_workdir()
        try:
            result = harness.run_model(spec, settings, workdir)
        finally:
            harness.cleanup_workdir(workdir)
        if methods is None and name in specs.CALIBRATION_MEMORY_MODELS:
            workdir = harness.default_workdir()
            try:
                result["calibration_memory"] = harness.calibration_memory(name, settings, workdir)
            finally:
                harness.cleanup_workdir(workdir)
        result["benchmark_wall_s"] = time.perf_counter() - t0
        path = out / f"{name}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(
            json.dumps(_finite(result), indent=2, allow_nan=False, default=_json_default),
            encoding="utf-8",
        )
        os.replace(tmp, path)
        written[name] = path
        log.info("%s: wrote %s (%.0f s)", name, path, result["benchmark_wall_s"])
    if md is None:
        md = (
            Path(__file__).resolve().parent / "RESULTS.md"
            if out.resolve() == DEFAULT_OUT
            else out / "RESULTS.md"
        )
    report.write_report(out, md, plots=plots)
    return written, skipped


def _finite(value: Any) -> Any:
    """The value with every non-finite float (an SQNR of identical outputs is inf) as None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()  # type: ignore[attr-defined]
    if isinstance(value, Path):
        return str(value)
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    from onnxslim_edge.errors import OnnxSlimEdgeError

    try:
        written, skipped = run(
            models,
            args.out,
            quick=args.quick,
            runs=args.runs,
            methods=methods,
            md=args.md,
            plots=not args.no_plots,
        )
    except OnnxSlimEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name}: {path}")
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})", file=sys.stderr)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
