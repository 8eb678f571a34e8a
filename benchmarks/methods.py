"""The benchmark's methods: every way of producing a model from the fp32 model.

A *method* (`MethodSpec`) is the fp32 baseline itself, onnxslim-edge's lossless and
edge recipes, its pruning (`ours-prune*`) and int8 (`ours-int8-*`) pass lists, or a
peer of `benchmarks.peers` (onnxslim, onnxsim, ONNX Runtime's `quantize_static`
variants). `METHODS` lists them in table order, as data; the `optimize_*` functions
here are what a method's child process calls (by "module:attr") to write its model
and return notes from the pipeline's report. Measuring them is `benchmarks.harness`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CALIBRATION_MEMORY_METHODS",
    "METHODS",
    "MethodSpec",
    "method_names",
    "optimize_edge",
    "optimize_lossless",
    "optimize_passes",
    "recipe_path",
]

Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One way of producing a model from the fp32 model.

    `function` is "module:attr", called in a child process as
    `fn(model_path, out_path, calibration_feeds, **params)`; None for the baseline.
    `requires` names modules that must be importable (else the result is "unavailable").
    `models` limits the method to those models (the others do not list it at all).
    """

    name: str
    label: str
    kind: str  # "baseline", "lossless" or "quantize"
    tool: str  # "fp32", "onnxslim-edge", "onnxslim", "onnxsim", "onnxruntime"
    function: str | None
    params: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None  # the models it runs on; None: every model


def _ort_variants() -> list[MethodSpec]:
    variants = [
        ("MinMax", "QInt8"),
        ("Entropy", "QInt8"),
        ("Percentile", "QInt8"),
        ("MinMax", "QUInt8"),
    ]
    out = []
    for method, act in variants:
        short = "s8" if act == "QInt8" else "u8"
        out.append(
            MethodSpec(
                name=f"ort-{method.lower()}-{short}",
                label=f"ORT quantize_static {method}, act {act}",
                kind="quantize",
                tool="onnxruntime",
                function="benchmarks.peers:ort_quantize",
                params={"calibrate_method": method, "activation": act},
                requires=("onnxruntime.quantization",),
            )
        )
    return out


#: The exact clean-up every pass list below starts with.
_PREFIX: tuple[str, ...] = ("cleanup", "fold-batchnorm", "cleanup")

#: The models channel pruning is measured on (issue 4).
PRUNE_MODELS: tuple[str, ...] = ("efficientnet_lite0", "ppocr_det")

#: Channel importance for the pruning rows. Compared once on EfficientNet-Lite0 at 30 %
#: of MACs (no recovery): top-1 agreement with fp32 0.0 with `l1`, 0.45 with `activation`
#: (mean |x| over the calibration data), so `activation`.
PRUNE_IMPORTANCE = "activation"


#: ONNX Runtime's NCHWc block size on this benchmark's AVX-512 CPU: convolutions whose
#: channel counts are not multiples of it leave the blocked layout (reorders around them).
NCHWC_BLOCK = 16


def _prune_variants() -> list[MethodSpec]:
    out = []
    for round_to in (None, NCHWC_BLOCK):
        for pct in (20, 30, 50):
            option = f",round_to={round_to or 1}"  # explicit: the target's default moves
            out.append(
                MethodSpec(
                    name=f"ours-prune{pct}" + ("" if round_to is None else f"-r{round_to}"),
                    label=f"onnxslim-edge prune-channels, {pct} % of MACs "
                    f"({PRUNE_IMPORTANCE}), onnxruntime-cpu, round_to "
                    f"{1 if round_to is None else round_to}, no recovery",
                    kind="prune",
                    tool="onnxslim-edge",
                    function="benchmarks.methods:optimize_passes",
                    params={
                        "passes": [
                            *_PREFIX,
                            f"prune-channels:macs_reduction={pct / 100:g},"
                            f"importance={PRUNE_IMPORTANCE}{option}",
                            "cleanup",
                        ],
                        "target": "onnxruntime-cpu",
                        "macs_reduction": pct / 100,
                    },
                    models=PRUNE_MODELS,
                )
            )
    return out


def _ours_int8(
    name: str,
    what: str,
    passes: Sequence[str],
    target: str = "onnxruntime-cpu",
    models: tuple[str, ...] | None = None,
) -> MethodSpec:
    """One of our int8 rows: `passes` after the clean-up prefix, through Pipeline."""
    return MethodSpec(
        name=name,
        label=f"onnxslim-edge {what}, target {target}",
        kind="quantize",
        tool="onnxslim-edge",
        function="benchmarks.methods:optimize_passes",
        params={"passes": [*_PREFIX, *passes], "target": target},
        models=models,
    )


def _int8_variants() -> list[MethodSpec]:
    percentile = "quantize:method=percentile"
    return [
        _ours_int8("ours-int8-ort", "quantize (percentile)", [percentile]),
        _ours_int8("ours-int8-trt", "quantize (percentile)", [percentile], target="tensorrt"),
        _ours_int8(
            "ours-int8-ort-fallback",
            "quantize (percentile), automatic fallback to top-1 agreement 0.95 on the "
            "calibration data",
            [*FALLBACK_EXTRA, FALLBACK_QUANTIZE],
            models=("efficientnet_lite0",),
        ),
        _ours_int8(
            "ours-int8-ort-bc",
            "quantize (percentile) then bias-correct",
            [percentile, "bias-correct"],
        ),
        # Detection only: there the input image and the stem's output cost the most
        # (quantized alone, the uint8 input costs 17 dB of map SQNR).
        _ours_int8(
            "ours-int8-ort-entropy-kf",
            "quantize (entropy, first layer kept in float)",
            ["quantize:method=entropy,keep_first=true"],
            models=("ppocr_det",),
        ),
        _ours_int8("ours-int8-ort-minmax", "quantize (minmax)", ["quantize:method=minmax"]),
        _ours_int8("ours-int8-ort-entropy", "quantize (entropy)", ["quantize:method=entropy"]),
    ]


#: Passes the fallback method adds before its quantize. `equalize` was tried once on
#: EfficientNet-Lite0 (percentile, onnxruntime-cpu): top-1 agreement 0.946 without it,
#: 0.911 with it, so it is left out.
FALLBACK_EXTRA: tuple[str, ...] = ()
FALLBACK_QUANTIZE = "quantize:method=percentile,min_top1_agreement=0.95"


#: Every method, in table order.
METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="fp32", label="fp32 (input model)", kind="baseline", tool="fp32", function=None
    ),
    MethodSpec(
        name="ours-lossless",
        label="onnxslim-edge lossless recipe",
        kind="lossless",
        tool="onnxslim-edge",
        function="benchmarks.methods:optimize_lossless",
    ),
    MethodSpec(
        name="ours-edge",
        label="onnxslim-edge edge recipe (its kind follows the recipe's passes)",
        kind="lossless",
        tool="onnxslim-edge",
        function="benchmarks.methods:optimize_edge",
    ),
    MethodSpec(
        name="onnxslim",
        label="onnxslim.slim",
        kind="lossless",
        tool="onnxslim",
        function="benchmarks.peers:onnxslim_slim",
        requires=("onnxslim",),
    ),
    MethodSpec(
        name="onnxsim",
        label="onnxsim.simplify",
        kind="lossless",
        tool="onnxsim",
        function="benchmarks.peers:onnxsim_simplify",
        requires=("onnxsim",),
    ),
    *_prune_variants(),
    *_int8_variants(),
    *_ort_variants(),
)


def method_names(model: str | None = None) -> list[str]:
    """Every method's name; with `model`, those that run on it."""
    return [m.name for m in METHODS if model is None or m.models is None or model in m.models]


def recipe_path(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("onnxslim_edge") / "recipes" / f"{name}.toml"))


def _optimize(recipe: str, model_path: Path, out_path: Path, calibration: Sequence[Feed]) -> dict:
    from onnxslim_edge.pipeline import Context, Pipeline, load_recipe

    target = load_recipe(recipe_path(recipe)).target
    ctx = Context(data=list(calibration), target=target)
    result = Pipeline.from_recipe(recipe_path(recipe)).run(model_path, ctx)
    result.save(out_path)
    return _notes(result.report)


def optimize_passes(
    model_path: Path,
    out_path: Path,
    calibration: Sequence[Feed],
    *,
    passes: Sequence[str],
    target: str,
    macs_reduction: float | None = None,
) -> dict:
    """`Pipeline(passes, target=target)` on the calibration data (lossless passes checked).

    `macs_reduction` is the pruning target, recorded in the notes for the report. With it
    the Context gets the calibration feeds' shapes as `input_shapes` when they all agree:
    prune-channels counts symbolic dims as 1 otherwise, so on a model with dynamic height
    and width (PP-OCR detection) it would rank layers by MACs at a 1 x 1 image.
    """
    from onnxslim_edge.pipeline import Context, Pipeline

    shapes = {k: tuple(np.shape(v)) for k, v in calibration[0].items()} if calibration else None
    if macs_reduction is None or any(
        {k: tuple(np.shape(v)) for k, v in f.items()} != shapes for f in calibration
    ):
        shapes = None
    ctx = Context(data=list(calibration), target=target, input_shapes=shapes)
    result = Pipeline(list(passes), target=target).run(model_path, ctx)
    result.save(out_path)
    notes = _notes(result.report)
    notes["target"] = target
    if macs_reduction is not None:
        notes["macs_reduction_target"] = macs_reduction
        notes["input_shapes"] = None if shapes is None else {k: list(v) for k, v in shapes.items()}
    return notes


def _small(value: Any, depth: int = 0) -> bool:
    """A scalar, or a short list or dict of them (nested once): fit for the notes."""
    if isinstance(value, (int, float, str, bool, type(None))):
        return True
    if depth > 1:
        return False
    if isinstance(value, (list, tuple)):
        return len(value) <= 64 and all(_small(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return len(value) <= 64 and all(_small(v, depth + 1) for v in value.values())
    return False


def _notes(report: Any) -> dict:
    return {
        "passes": [
            {
                "name": p.name,
                "modified": p.modified,
                "nodes_removed": p.nodes_removed,
                "nodes_added": p.nodes_added,
                "wall_time_s": p.wall_time_s,
                "counters": dict(p.counters),
                "skips": len(p.skips),
                "equal": None if p.validation is None else bool(p.validation.get("passed")),
                "warnings": list(p.warnings)[:8],
                # scalar summaries only (what fallback kept in float, the MACs reached ...)
                "summary": [
                    kept
                    for d in p.details
                    if not any(k in d for k in ("layer", "tensor", "node", "group"))
                    and (kept := {k: v for k, v in d.items() if _small(v)})
                ][:8],
            }
            for p in report.passes
        ],
        "cost_before": dict(report.cost_before),
        "cost_after": dict(report.cost_after),
    }


def optimize_lossless(model_path: Path, out_path: Path, calibration: Sequence[Feed]) -> dict:
    """onnxslim-edge's lossless recipe (`recipes/lossless.toml`), checked on the calibration data."""
    return _optimize("lossless", model_path, out_path, calibration)


def optimize_edge(model_path: Path, out_path: Path, calibration: Sequence[Feed]) -> dict:
    """onnxslim-edge's edge recipe (`recipes/edge.toml`), with its fidelity floors."""
    return _optimize("edge", model_path, out_path, calibration)


#: (label, function, params) of each quantizer in the calibration-memory check.
CALIBRATION_MEMORY_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (
        "ours-minmax",
        "benchmarks.methods:optimize_passes",
        {"passes": [*_PREFIX, "quantize:method=minmax"], "target": "onnxruntime-cpu"},
    ),
    (
        "ort-minmax-u8",
        "benchmarks.peers:ort_quantize",
        {"calibrate_method": "MinMax", "activation": "QUInt8"},
    ),
)
