"""How the lossless recipe's cost grows with model size, from ~1 MB to beyond 2 GB.

`python -m benchmarks.scaling [--max-gb 2.2] [--families mlp,transformer] [--out DIR]`

Builds synthetic stacks with random weights (numpy, seed 0) with `onnx.helper`, saves
them with `onnxslim_edge.model.save_model` (external data when over protobuf's 2 GB
limit), runs `recipes/lossless.toml` on each through `Pipeline` (load, passes, checks on
random inputs, save) in a fresh spawn child, and records the child's wall time and peak
resident set (VmHWM) against the model's size:

- `mlp`: x (1, D) -> [MatMul(x, Transpose(Wt)) + b -> Identity -> Relu] x L. The
  Transpose of a constant is folded by `cleanup` (up to its 16 MiB limit), the
  Identity removed.
- `transformer`: x (1, 16, D) -> L blocks of LayerNorm, single-head attention
  (Q, K, V, output projections), residual Add, LayerNorm, a 4x MLP with bias and Relu,
  an Identity, residual Add.
- `table`: one embedding table (rows x 1024 float32) read by Gather(x: 16 indices) ->
  Identity -> Relu: a single initializer of the whole size (past 2 GB, the case
  protobuf cannot serialize).

Sizes follow the ladder 1, 8, 64, 256, 1024 MB up to `--max-gb`, plus `--max-gb` itself
when it is above the last rung. Results merge into `<out>/scaling.json` (keyed by family
and size), and RESULTS.md is regenerated. Each model is built in its own child process
and deleted after its run: the largest case needs a few times its size in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import prefer_installed_package

prefer_installed_package()

__all__ = [
    "FAMILIES",
    "build_stack",
    "default_rss_cap_mb",
    "main",
    "optimize_stack",
    "run_scaling",
    "size_ladder",
]

log = logging.getLogger(__name__)

FAMILIES = ("mlp", "transformer", "table")
_LADDER_MB = (1, 8, 64, 256, 1024)
_SEQ = 16
_DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def size_ladder(max_gb: float) -> list[int]:
    """Target sizes in bytes: the ladder up to `max_gb`, plus `max_gb` itself above it."""
    limit = int(max_gb * (1 << 30))
    sizes = [mb << 20 for mb in _LADDER_MB if (mb << 20) <= limit]
    if not sizes or limit > sizes[-1] * 1.05:
        sizes.append(limit)
    return sizes


def _dim(family: str, target: int) -> int:
    if family == "mlp":
        return 256 if target < (16 << 20) else 1024 if target < (512 << 20) else 2048
    return 128 if target < (16 << 20) else 512 if target < (512 << 20) else 1024


_TABLE_DIM = 1024


def _build_table(path: Path, target_bytes: int, seed: int) -> dict[str, Any]:
    """One embedding table of about `target_bytes` (float32, `_TABLE_DIM` wide) read by
    a Gather of 16 indices, then Identity and Relu: the single-initializer case. Over
    protobuf's 2 GB limit the table goes straight to external data, written in slices
    (no message could hold it for `save_model`)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from onnxslim_edge.model import PROTOBUF_LIMIT, save_model

    rows = max(16, target_bytes // (4 * _TABLE_DIM))
    rng = np.random.default_rng(seed)
    external = rows * _TABLE_DIM * 4 >= PROTOBUF_LIMIT
    if external:
        data = path.with_name(path.name + ".data")
        with open(data, "wb") as f:
            for start in range(0, rows, 1 << 16):
                n = min(1 << 16, rows - start)
                f.write(rng.standard_normal((n, _TABLE_DIM), dtype=np.float32).tobytes())
        table = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[rows, _TABLE_DIM])
        table.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", data.name),
            ("offset", 0),
            ("length", rows * _TABLE_DIM * 4),
        ):
            entry = table.external_data.add()
            entry.key, entry.value = key, str(value)
    else:
        values = rng.standard_normal((rows, _TABLE_DIM), dtype=np.float32)
        table = numpy_helper.from_array(values, "table")
    nodes = [
        helper.make_node("Gather", ["table", "x"], ["rows"], name="gather", axis=0),
        helper.make_node("Identity", ["rows"], ["rows_id"], name="id"),
        helper.make_node("Relu", ["rows_id"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "synthetic_table",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, _TABLE_DIM])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.producer_name = "benchmarks.scaling"
    if external:
        model.ir_version = 8
        path.write_bytes(model.SerializeToString())
    else:
        save_model(model, path)
    return {"dim": _TABLE_DIM, "layers": 1, "nodes": len(nodes), "external_data": external}


def build_stack(
    path: Path, family: str, target_bytes: int, calibration: Any = None, *, seed: int = 0
) -> dict[str, Any]:
    """Write a `family` stack of about `target_bytes` of float32 weights to `path`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxslim_edge.model import save_model

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    if family == "table":
        return _build_table(Path(path), target_bytes, seed)
    rng = np.random.default_rng(seed)
    d = _dim(family, target_bytes)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def weight(name: str, shape: tuple[int, ...], scale: float) -> str:
        arr = rng.standard_normal(shape, dtype=np.float32)
        arr *= scale
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    if family == "mlp":
        per_layer = 4 * (d * d + d)
        layers = max(1, round(target_bytes / per_layer))
        x_shape = [1, d]
        x = "x"
        for i in range(layers):
            wt = weight(f"l{i}.wt", (d, d), 1.0 / math.sqrt(d))
            w = node("Transpose", [wt], f"l{i}.w", perm=[1, 0])
            b = weight(f"l{i}.b", (d,), 0.01)
            h = node("MatMul", [x, w], f"l{i}.mm")
            h = node("Add", [h, b], f"l{i}.add")
            h = node("Identity", [h], f"l{i}.id")
            x = node("Relu", [h], f"l{i}.relu")
    else:
        per_layer = 4 * (12 * d * d + 9 * d)
        layers = max(1, round(target_bytes / per_layer))
        x_shape = [1, _SEQ, d]
        x = "x"
        s = 1.0 / math.sqrt(d)
        inits.append(numpy_helper.from_array(np.array(s, dtype=np.float32), "attn_scale"))
        for i in range(layers):
            p = f"b{i}"
            g1, b1 = weight(f"{p}.ln1.g", (d,), 0.1), weight(f"{p}.ln1.b", (d,), 0.01)
            h = node("LayerNormalization", [x, g1, b1], f"{p}.ln1", axis=-1)
            q = node("MatMul", [h, weight(f"{p}.wq", (d, d), s)], f"{p}.q")
            k = node("MatMul", [h, weight(f"{p}.wk", (d, d), s)], f"{p}.k")
            v = node("MatMul", [h, weight(f"{p}.wv", (d, d), s)], f"{p}.v")
            kt = node("Transpose", [k], f"{p}.kt", perm=[0, 2, 1])
            a = node("MatMul", [q, kt], f"{p}.scores")
            a = node("Mul", [a, "attn_scale"], f"{p}.scaled")
            a = node("Softmax", [a], f"{p}.softmax", axis=-1)
            o = node("MatMul", [a, v], f"{p}.attn")
            o = node("MatMul", [o, weight(f"{p}.wo", (d, d), s)], f"{p}.proj")
            x = node("Add", [x, o], f"{p}.res1")
            g2, b2 = weight(f"{p}.ln2.g", (d,), 0.1), weight(f"{p}.ln2.b", (d,), 0.01)
            h = node("LayerNormalization", [x, g2, b2], f"{p}.ln2", axis=-1)
            f = node("MatMul", [h, weight(f"{p}.w1", (d, 4 * d), s)], f"{p}.fc1")
            f = node("Add", [f, weight(f"{p}.bias1", (4 * d,), 0.01)], f"{p}.fc1b")
            f = node("Relu", [f], f"{p}.relu")
            f = node("MatMul", [f, weight(f"{p}.w2", (4 * d, d), 0.5 * s)], f"{p}.fc2")
            f = node("Add", [f, weight(f"{p}.bias2", (d,), 0.01)], f"{p}.fc2b")
            f = node("Identity", [f], f"{p}.id")
            x = node("Add", [x, f], f"{p}.res2")
    out = node("Identity", [x], "y")
    graph = helper.make_graph(
        nodes,
        f"synthetic_{family}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, x_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.producer_name = "benchmarks.scaling"
    saved = save_model(model, Path(path))
    data = saved.with_name(saved.name + ".data")
    return {
        "dim": d,
        "layers": layers,
        "nodes": len(model.graph.node),
        "external_data": data.exists(),
    }


def optimize_stack(model_path: Path, out_path: Path, calibration: Any = None) -> dict[str, Any]:
    """`recipes/lossless.toml` on the model at `model_path` (random inputs for the checks)."""
    from importlib.resources import files

    from onnxslim_edge.pipeline import Context, Pipeline
    from onnxslim_edge.runtime import return_freed_memory

    return_freed_memory()  # as the CLI does
    recipe = Path(str(files("onnxslim_edge") / "recipes" / "lossless.toml"))
    result = Pipeline.from_recipe(recipe).run(Path(model_path), Context())
    result.save(out_path)
    return {
        "nodes_before": result.report.cost_before.get("nodes"),
        "nodes_after": result.report.cost_after.get("nodes"),
        "passes": {
            p.name + f"#{i}": round(p.wall_time_s, 3) for i, p in enumerate(result.report.passes)
        },
    }


def _disk_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def default_rss_cap_mb() -> float:
    """Three quarters of the memory available now (MemAvailable), at most 16 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return min(16 * 1024.0, 0.75 * int(line.split()[1]) / 1024)
    except (OSError, ValueError, IndexError):
        pass
    return 16 * 1024.0


def run_scaling(
    families: Sequence[str],
    sizes: Sequence[int],
    *,
    timeout_s: float = 3600.0,
    max_rss_mb: float | None = None,
) -> list[dict[str, Any]]:
    """Build, optimize and measure each (family, size); one result dict per pair.

    A child whose resident set passes `max_rss_mb` (default `default_rss_cap_mb()`) is
    stopped and the pair recorded as failed with the size it had reached: the machine's
    other work must not run out of memory.
    """
    from benchmarks.harness import environment

    cap = default_rss_cap_mb() if max_rss_mb is None else max_rss_mb
    env = environment()
    from benchmarks.harness import run_in_child

    runs = []
    for family in families:
        for target in sizes:
            tmp = Path(tempfile.mkdtemp(prefix=f"scaling-{family}-"))
            entry: dict[str, Any] = {
                "family": family,
                "target_bytes": target,
                "status": "ok",
                "git_commit": env["git_commit"],
                "date": env["date"],
            }
            try:
                src, dst = tmp / "model.onnx", tmp / "out.onnx"
                t0 = time.perf_counter()
                built = run_in_child(
                    "benchmarks.scaling:build_stack",
                    (src, family, target),
                    timeout_s=timeout_s,
                    max_rss_mb=cap,
                )
                entry["build_s"] = time.perf_counter() - t0
                if built["status"] != "ok":
                    entry.update(
                        status="failed", error=f"build: {built['error']}", size_bytes=target
                    )
                    runs.append(entry)
                    continue
                entry.update(built["notes"])
                entry["size_bytes"] = _disk_size(src)
                log.info("%s %.1f MB: optimizing", family, entry["size_bytes"] / (1 << 20))
                child = run_in_child(
                    "benchmarks.scaling:optimize_stack",
                    (src, dst),
                    timeout_s=timeout_s,
                    max_rss_mb=cap,
                )
                entry["rss_cap_mb"] = cap
                if child["status"] != "ok":
                    entry.update(status="failed", error=child["error"])
                else:
                    entry.update(
                        wall_s=child["wall_s"],
                        peak_rss_mb=child["peak_rss_mb"],
                        rss_before_mb=child["rss_before_mb"],
                        nodes_after=child["notes"].get("nodes_after"),
                        pass_wall_s=child["notes"].get("passes"),
                        out_size_bytes=_disk_size(dst),
                    )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("%s: %s", family, entry)
            runs.append(entry)
    return runs


def _merge(path: Path, runs: list[dict[str, Any]]) -> dict[str, Any]:
    from benchmarks.harness import environment

    old: list[dict[str, Any]] = []
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8")).get("runs", [])
    keys = {(r["family"], r["target_bytes"]) for r in runs}
    merged = [r for r in old if (r["family"], r["target_bytes"]) not in keys] + runs
    merged.sort(key=lambda r: (r["family"], r["target_bytes"]))
    return {"environment": environment(), "recipe": "recipes/lossless.toml", "runs": merged}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--max-gb", type=float, default=2.2, help="largest model in GiB (default 2.2)"
    )
    parser.add_argument("--min-gb", type=float, default=0.0, help="skip sizes below this (GiB)")
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help=f"comma-separated: {', '.join(FAMILIES)}"
    )
    parser.add_argument(
        "--max-rss-gb",
        type=float,
        default=None,
        help="stop a child past this resident set (default: 3/4 of available memory, <= 16)",
    )
    parser.add_argument("--out", type=Path, default=_DEFAULT_OUT)
    parser.add_argument(
        "--md", type=Path, default=None, help="RESULTS.md (default benchmarks/RESULTS.md)"
    )
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in FAMILIES]
    if bad or args.max_gb <= 0:
        print(
            f"error: families must be from {', '.join(FAMILIES)} and --max-gb > 0", file=sys.stderr
        )
        return 2
    sizes = [s for s in size_ladder(args.max_gb) if s >= args.min_gb * (1 << 30)]
    cap = None if args.max_rss_gb is None else args.max_rss_gb * 1024
    runs = run_scaling(families, sizes, max_rss_mb=cap)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "scaling.json"
    data = _merge(path, runs)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    from benchmarks import report

    md = args.md or (
        Path(__file__).resolve().parent / "RESULTS.md"
        if args.out.resolve() == _DEFAULT_OUT
        else args.out / "RESULTS.md"
    )
    report.write_report(args.out, md, plots=not args.no_plots)
    for r in runs:
        size = r.get("size_bytes", r["target_bytes"]) / (1 << 20)
        if r["status"] == "ok":
            print(
                f"{r['family']:12s} {size:9.1f} MB  {r['wall_s']:8.2f} s  peak {r['peak_rss_mb']:8.0f} MB"
            )
        else:
            print(f"{r['family']:12s} {size:9.1f} MB  {r['status']}: {r.get('error')}")
    return 1 if any(r["status"] != "ok" for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
