"""Jetson hand-off: static checks against a JetPack's TensorRT, then a folder for the device.

`check_jetpack(model, "6.1")` checks a model, without TensorRT or a GPU, against what the
TensorRT ONNX parser of that JetPack accepts (the facts are data, `jetpack.toml`):

| check | what fails |
| --- | --- |
| `opset` | a default-domain opset outside the parser's range (JP 5.1/6.0: <= 17; 6.1/6.2: 9-20) |
| `ir` | an IR version the model needs above what the parser reads |
| `ops` | an op (any graph, If/Loop bodies included) the parser does not parse, or a non-ONNX domain |
| `int64` | TensorRT 8.x: INT64 weights are cast to INT32 (a warning; an error past the INT32 range, except Slice bounds, which TensorRT clamps) |
| `dynamic-shape` | a dynamic input without an optimization profile, or a profile that does not fit |
| `qdq` | TensorRT's explicit-quantization rules (`lint_qdq` errors; warnings stay warnings) |
| `int8` | `int8` asked of a model without Q/DQ nodes |
| `sparsity` | with `sparsity`: no Conv/Gemm/MatMul weight follows 2:4 (layers that do not are warnings) |
| `dla` | with `dla`: no DLA on the JetPack (Thor), no fp16/int8, dynamic shapes; ops or sizes the DLA does not run are warnings (GPU fallback) |

`bundle(model, "6.1", "out/")` runs the checks and, when none fails (or `force`), writes
atomically: `model.onnx` (IR lowered to what its opsets need), `build_engine.sh` (the
trtexec command with the flags and profiles), `compare.sh` (Polygraphy: the engine
against the golden outputs), `golden/inputs.json` + `golden/outputs.json` (ONNX
Runtime on the host, Polygraphy's formats), `checks.json` and a `README.md` for the
device. Nothing here runs TensorRT.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from onnxslim_edge.engine import ShapeProfile, check_profiles, has_qdq
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.model import ModelSource, iter_graphs, load_model, min_ir_version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

__all__ = [
    "JETPACKS",
    "BundleResult",
    "Finding",
    "TensorRTTarget",
    "bundle",
    "check_jetpack",
    "target_for",
]

log = logging.getLogger(__name__)

_DATA = Path(__file__).with_name("jetpack.toml")
_INT32 = (-(2**31), 2**31 - 1)


@functools.cache
def _facts() -> dict[str, Any]:
    with open(_DATA, "rb") as fh:
        return tomllib.load(fh)


#: JetPack releases `check_jetpack` knows, oldest first.
JETPACKS = tuple(_facts()["jetpack"])


@dataclass(frozen=True, kw_only=True)
class TensorRTTarget:
    """The TensorRT of one JetPack, as `jetpack.toml` describes it."""

    jetpack: str
    tensorrt: str
    min_opset: int
    max_opset: int
    max_ir: int
    ops: frozenset[str]
    int64_native: bool
    dla: bool


def target_for(jetpack: str) -> TensorRTTarget:
    """The TensorRT facts of `jetpack` ("5.1", "6.0", "6.1", "6.2", "7"); ConfigError else."""
    facts = _facts()
    key = str(jetpack)
    if key not in facts["jetpack"]:
        raise ConfigError(f"--jetpack {jetpack}: unknown; known: {', '.join(JETPACKS)}")
    trt = facts["tensorrt"][facts["jetpack"][key]]
    ops = frozenset(op for group in trt["ops"] for op in facts["ops"][group])
    return TensorRTTarget(
        jetpack=key,
        tensorrt=trt["version"],
        min_opset=trt["min_opset"],
        max_opset=trt["max_opset"],
        max_ir=trt["max_ir"],
        ops=ops,
        int64_native=trt["int64_native"],
        dla=trt["dla"],
    )


@dataclass(frozen=True)
class Finding:
    """One check's verdict: `check` (see the module docstring), severity "error" or
    "warning", a one-line message."""

    check: str
    message: str
    severity: str = "error"


# --------------------------------------------------------------------------- checks


def _check_opset(model: onnx.ModelProto, t: TensorRTTarget) -> list[Finding]:
    out = []
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and not t.min_opset <= o.version <= t.max_opset:
            out.append(
                Finding(
                    "opset",
                    f"opset {o.version}: TensorRT {t.tensorrt} (JetPack {t.jetpack}) parses "
                    f"opsets {t.min_opset}-{t.max_opset}; convert with "
                    f"onnxslim-edge optimize --opset {min(max(o.version, t.min_opset), t.max_opset)}",
                )
            )
    ir = min_ir_version(model)
    if ir > t.max_ir:
        out.append(
            Finding(
                "ir",
                f"the model needs IR version {ir}; TensorRT {t.tensorrt}'s parser reads up to "
                f"{t.max_ir}",
            )
        )
    return out


def _check_ops(model: onnx.ModelProto, t: TensorRTTarget) -> list[Finding]:
    local = {(f.domain, f.name) for f in model.functions}
    unsupported: dict[str, list[str]] = {}
    for graph in iter_graphs(model.graph):
        for i, node in enumerate(graph.node):
            if (node.domain, node.op_type) in local:
                continue  # a model-local function: its body's ops are what counts
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            if node.domain not in ("", "ai.onnx") or node.op_type not in t.ops:
                unsupported.setdefault(op, []).append(node.name or f"{node.op_type}#{i}")
    for f in model.functions:
        for node in f.node:
            if node.domain in ("", "ai.onnx") and node.op_type not in t.ops:
                unsupported.setdefault(node.op_type, []).append(f"{f.name}/{node.name}")
    out = []
    for op, nodes in sorted(unsupported.items()):
        shown = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
        out.append(
            Finding(
                "ops",
                f"{op} ({len(nodes)} node(s): {shown}) is not parsed by TensorRT {t.tensorrt}'s "
                "ONNX parser",
            )
        )
    return out


def _check_int64(model: onnx.ModelProto, t: TensorRTTarget) -> list[Finding]:
    if t.int64_native:
        return []
    slice_bounds = set()
    users: dict[str, set[str]] = {}
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            for slot, name in enumerate(node.input):
                users.setdefault(name, set()).add(node.op_type)
                if node.op_type == "Slice" and slot in (1, 2, 4):
                    slice_bounds.add(name)
    cast, out = [], []
    for graph in iter_graphs(model.graph):
        for init in graph.initializer:
            if init.data_type != onnx.TensorProto.INT64:
                continue
            cast.append(init.name)
            values = numpy_helper.to_array(init)
            beyond = values.size and (values.min() < _INT32[0] or values.max() > _INT32[1])
            only_slices = (
                all(op == "Slice" for op in users.get(init.name, ())) and init.name in slice_bounds
            )
            if beyond and not only_slices:
                out.append(
                    Finding(
                        "int64",
                        f"INT64 initializer '{init.name}' holds values outside the INT32 range; "
                        f"TensorRT {t.tensorrt} casts INT64 to INT32 and would clamp them",
                    )
                )
    if cast:
        out.insert(
            0,
            Finding(
                "int64",
                f"{len(cast)} INT64 initializer(s) ({', '.join(cast[:3])}"
                f"{' ...' if len(cast) > 3 else ''}) will be cast to INT32 by TensorRT {t.tensorrt}",
                "warning",
            ),
        )
    return out


def _check_qdq(model: onnx.ModelProto, int8: bool) -> list[Finding]:
    qdq = has_qdq(model)
    if int8 and not qdq:
        return [
            Finding(
                "int8",
                "int8 asked, but the model has no QuantizeLinear/DequantizeLinear nodes: TensorRT "
                "int8 comes only from explicit quantization (optimize --pass quantize)",
            )
        ]
    if not qdq:
        return []
    from onnxslim_edge.analysis.qdq_lint import lint_qdq

    return [Finding("qdq", f"{v.rule} {v.node}: {v.message}", v.severity) for v in lint_qdq(model)]


def _check_sparsity(model: onnx.ModelProto) -> list[Finding]:
    from onnxslim_edge.analysis.sparsity_nm import check_nm

    results = check_nm(model, 2, 4)
    eligible = [r for r in results if r.ok]
    if not eligible:
        return [
            Finding(
                "sparsity",
                f"sparsity asked, but none of the {len(results)} Conv/Gemm/MatMul weight(s) "
                "follows 2:4 (onnxslim-edge optimize --pass sparsify-nm)",
            )
        ]
    return [
        Finding("sparsity", f"{r.op} '{r.node}' is not 2:4 ({r.reason}); it runs dense", "warning")
        for r in results
        if not r.ok
    ]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _check_dla(
    model: onnx.ModelProto,
    t: TensorRTTarget,
    *,
    fp16: bool,
    int8: bool,
    profiles: Mapping[str, ShapeProfile],
) -> list[Finding]:
    if not t.dla:
        return [Finding("dla", f"JetPack {t.jetpack}'s Jetson (Thor) has no DLA")]
    limits = _facts()["dla"]
    out = []
    if not (fp16 or int8 or has_qdq(model)):
        out.append(Finding("dla", "the DLA runs fp16 or int8 only: add --fp16 or --int8"))
    for p in profiles.values():
        if not p.static:
            out.append(
                Finding("dla", f"input '{p.name}': the DLA needs static shapes (min = opt = max)")
            )
    fallback: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in limits["ops"]:
            fallback[node.op_type] = fallback.get(node.op_type, 0) + 1
            continue
        why = _dla_limit(node, limits)
        if why:
            out.append(
                Finding(
                    "dla", f"{node.op_type} '{node.name}': {why}; it runs on the GPU", "warning"
                )
            )
    for op, n in sorted(fallback.items()):
        out.append(
            Finding(
                "dla",
                f"{op} ({n} node(s)) does not run on the DLA; it falls back to the GPU",
                "warning",
            )
        )
    return out


def _dla_limit(node: onnx.NodeProto, limits: Mapping[str, Any]) -> str | None:
    if node.op_type in ("Conv", "ConvTranspose"):
        kernel = _attr(node, "kernel_shape") or []
        if any(k > limits["max_kernel"] for k in kernel):
            return f"kernel {list(kernel)} over the DLA's {limits['max_kernel']}"
        if any(s > limits["max_stride"] for s in _attr(node, "strides") or []):
            return f"strides over the DLA's {limits['max_stride']}"
        if any(p > limits["max_padding"] for p in _attr(node, "pads") or []):
            return f"padding over the DLA's {limits['max_padding']}"
        if any(d > limits["max_dilation"] for d in _attr(node, "dilations") or []):
            return f"dilation over the DLA's {limits['max_dilation']}"
    if node.op_type in ("MaxPool", "AveragePool"):
        kernel = _attr(node, "kernel_shape") or []
        if any(k > limits["max_pool_window"] for k in kernel):
            return f"pooling window {list(kernel)} over the DLA's {limits['max_pool_window']}"
    return None


def check_jetpack(
    model: ModelSource,
    jetpack: str,
    *,
    profiles: Mapping[str, ShapeProfile] | None = None,
    fp16: bool = False,
    int8: bool = False,
    sparsity: bool = False,
    dla: bool = False,
) -> list[Finding]:
    """Every finding of the static checks of the module docstring, errors and warnings."""
    t = target_for(jetpack)
    proto = load_model(model)
    profiles = dict(profiles or {})
    findings = _check_opset(proto, t) + _check_ops(proto, t) + _check_int64(proto, t)
    findings += [Finding("dynamic-shape", p) for p in check_profiles(proto, profiles)]
    findings += _check_qdq(proto, int8)
    if sparsity:
        findings += _check_sparsity(proto)
    if dla:
        findings += _check_dla(proto, t, fp16=fp16, int8=int8, profiles=profiles)
    return findings


# --------------------------------------------------------------------------- bundle


@dataclass(kw_only=True)
class BundleResult:
    """The findings, and the folder written (None when a check failed without force)."""

    jetpack: str
    tensorrt: str
    findings: list[Finding]
    path: Path | None = None
    files: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def passed(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "jetpack": self.jetpack,
            "tensorrt": self.tensorrt,
            "written": str(self.path) if self.path else None,
            "files": list(self.files),
            "findings": [asdict(f) for f in self.findings],
        }

    def to_text(self) -> str:
        head = f"JetPack {self.jetpack} (TensorRT {self.tensorrt}): "
        errors = len(self.errors)
        head += f"{errors} error(s), {len(self.findings) - errors} warning(s)"
        lines = [head]
        lines += [f"  {f.severity:<7}  {f.check:<13}  {f.message}" for f in self.findings]
        if self.path is not None:
            lines.append(f"wrote {self.path}: {', '.join(self.files)}")
        elif errors:
            lines.append("nothing written (fix the errors, or pass --force)")
        return "\n".join(lines)


def _trtexec_args(
    *, fp16: bool, int8: bool, sparsity: bool, dla: bool, profiles: Mapping[str, ShapeProfile]
) -> list[str]:
    args = ["--onnx=model.onnx", "--saveEngine=model.engine", "--timingCacheFile=timing.cache"]
    if fp16:
        args.append("--fp16")
    if int8:
        args.append("--int8")
    if sparsity:
        args.append("--sparsity=enable")
    if profiles:
        for which in ("min", "opt", "max"):
            shapes = ",".join(p.trtexec(which) for p in profiles.values())
            args.append(f"--{which}Shapes={shapes}")
    if dla:
        args += ["--useDLACore=0", "--allowGPUFallback"]
    return args


def _script(lines: Sequence[str]) -> str:
    return "\n".join(["#!/usr/bin/env bash", *lines, ""])


def bundle(
    model: ModelSource,
    jetpack: str,
    output: str | os.PathLike,
    *,
    data: Any = None,
    samples: int = 8,
    profiles: Mapping[str, ShapeProfile] | None = None,
    fp16: bool = False,
    int8: bool = False,
    sparsity: bool = False,
    dla: bool = False,
    force: bool = False,
    overwrite: bool = False,
) -> BundleResult:
    """Check `model` for `jetpack` and write the hand-off folder `output` (see the module
    docstring). With errors and no `force`, nothing is written and the result says why.
    `data` gives the golden inputs (None: random at the profiles' opt shapes, marked
    synthetic in the README)."""
    from onnxslim_edge.data import open_data
    from onnxslim_edge.engine import default_tolerance
    from onnxslim_edge.model import new_file_mode
    from onnxslim_edge.polygraphy_io import save_inputs, save_run_results
    from onnxslim_edge.regress import _run_outputs, atomic_folder

    if samples < 1:
        raise ConfigError(f"samples must be >= 1, not {samples}")
    t = target_for(jetpack)
    proto = load_model(model)
    profiles = dict(profiles or {})
    findings = check_jetpack(
        proto, jetpack, profiles=profiles, fp16=fp16, int8=int8, sparsity=sparsity, dla=dla
    )
    result = BundleResult(jetpack=t.jetpack, tensorrt=t.tensorrt, findings=findings)
    if not result.passed and not force:
        return result
    qdq = has_qdq(proto)
    shapes = {n: p.opt for n, p in profiles.items()} or None
    source = open_data(
        "random" if data is None else data, proto, limit=samples, input_shapes=shapes
    )
    feeds = [dict(f) for f in source]
    outputs, times = _run_outputs(proto, feeds)
    from onnxslim_edge.engine import EngineConfig

    rtol, atol = default_tolerance(EngineConfig(fp16=fp16, int8=int8 and qdq), qdq)
    trtexec = _trtexec_args(
        fp16=fp16, int8=int8 or qdq, sparsity=sparsity, dla=dla, profiles=profiles
    )
    from onnxslim_edge.model import save_model

    files = ["model.onnx", "build_engine.sh", "compare.sh", "golden/inputs.json",
             "golden/outputs.json", "checks.json", "README.md"]  # fmt: skip
    with atomic_folder(output, overwrite=overwrite) as tmp:
        save_model(proto, tmp / "model.onnx")
        (tmp / "golden").mkdir()
        save_inputs(feeds, tmp / "golden" / "inputs.json")
        save_run_results(outputs, tmp / "golden" / "outputs.json", runtimes=times)
        build = _script(
            [
                f"# Build model.engine on the Jetson (JetPack {t.jetpack}, TensorRT {t.tensorrt}).",
                "set -euo pipefail",
                'cd "$(dirname "$0")"',
                "TRTEXEC=${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}",
                '"$TRTEXEC" ' + " ".join(shlex.quote(a) for a in trtexec) + ' "$@"',
            ]
        )
        compare = _script(
            [
                "# Compare model.engine with the ONNX Runtime outputs recorded on the host.",
                "set -euo pipefail",
                'cd "$(dirname "$0")"',
                "polygraphy run model.engine --model-type engine --trt "
                "--load-inputs golden/inputs.json --load-outputs golden/outputs.json "
                f"--rtol {rtol:g} --atol {atol:g}",
            ]
        )
        for name, text in (("build_engine.sh", build), ("compare.sh", compare)):
            (tmp / name).write_text(text)
            (tmp / name).chmod(new_file_mode(executable=True))  # 0o755 under umask 022
        (tmp / "checks.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        (tmp / "README.md").write_text(
            _readme(t, result, trtexec, source.describe(), source.is_synthetic, rtol, atol, force)
        )
    result.path = Path(output)
    result.files = files
    return result


def _readme(
    t: TensorRTTarget,
    result: BundleResult,
    trtexec: Sequence[str],
    data: str,
    synthetic: bool,
    rtol: float,
    atol: float,
    forced: bool,
) -> str:
    findings = "\n".join(f"- {f.severity}: {f.check}: {f.message}" for f in result.findings)
    lines = [
        f"# TensorRT hand-off for JetPack {t.jetpack} (TensorRT {t.tensorrt})",
        "",
        "Written by `onnxslim-edge bundle`. Nothing here was run on a Jetson or a GPU yet.",
        "",
        "On the device:",
        "",
        "```bash",
        "./build_engine.sh      # trtexec: writes model.engine and timing.cache",
        "./compare.sh           # polygraphy: model.engine vs the golden ONNX Runtime outputs",
        "```",
        "",
        f"`build_engine.sh` runs `trtexec {' '.join(trtexec)}`; set `TRTEXEC` if trtexec is "
        "not in /usr/src/tensorrt/bin, and pass extra trtexec flags as arguments.",
        f"`compare.sh` holds the engine to rtol {rtol:g}, atol {atol:g} (Polygraphy's "
        "element-wise check). Golden inputs: "
        + data
        + (" — random, a smoke test only" if synthetic else "")
        + ".",
        "",
        "## Static checks on the host",
        "",
        findings or "All passed.",
    ]
    if forced and result.errors:
        lines += ["", "Written with --force despite the errors above: expect the build to fail."]
    return "\n".join(lines) + "\n"
