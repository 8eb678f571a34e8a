"""RESULTS.md and the plots, generated from the benchmark's JSON files.

`python -m benchmarks.report [--out benchmarks/results] [--md benchmarks/RESULTS.md]`
reads every `<model>.json` (written by `benchmarks.run`), `scaling.json` (written by
`benchmarks.scaling`) and `findings.md` (hand-written notes on what the numbers mean)
in the results folder and writes:

- RESULTS.md: the pruning summary (MACs removed against latency saved, issue 4) and
  the int8 summary (ours against ONNX Runtime's quantize_static with the targets of
  `benchmarks.specs`, met or missed by how much, and the calibration-memory check;
  issue 5), one table per model (size, params, MACs, nodes, latency at batch 1 and 8
  in ms and as a ratio to the fp32 model, fidelity, the method's own wall time and
  peak memory), our recipes' ratios against the best peer, the commit and machine each
  model was measured on, how it was measured, and the scaling benchmark's table;
- `size_vs_fidelity.png`, `latency_vs_fidelity.png` and `scaling.png` (matplotlib, Agg
  backend) in the results folder, when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.specs import (
    CALIBRATION_MEMORY_FLAT_RATIO,
    MODEL_NAMES,
    SAME_METHOD_PAIRS,
    TARGETS,
    ModelTargets,
)

__all__ = ["load_results", "main", "plot_fidelity", "plot_scaling", "render", "write_report"]

log = logging.getLogger(__name__)

_DEFAULT_OUT = Path(__file__).resolve().parent / "results"
_DEFAULT_MD = Path(__file__).resolve().parent / "RESULTS.md"
_PEER_TOOLS = ("onnxslim", "onnxsim", "onnxruntime")


def load_results(folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(model results in report order, scaling results or None) from `folder`."""
    models = []
    scaling = None
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if path.name == "scaling.json":
            scaling = data
        elif isinstance(data, dict) and "methods" in data:
            models.append(data)
    order = {name: i for i, name in enumerate(MODEL_NAMES)}
    models.sort(key=lambda d: (order.get(d["model"], len(order)), d["model"]))
    return models, scaling


# --------------------------------------------------------------------------- formatting


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _ratio(r: float | None) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}"
    return str(v)


def _ms(lat: Mapping[str, Any] | None) -> str:
    if not lat:
        return "-"
    return f"{lat['median_ms']:.2f} ({lat['p10_ms']:.2f}-{lat['p90_ms']:.2f})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return lines


def _ok(entry: Mapping[str, Any]) -> bool:
    return entry.get("status") == "ok"


def _primary(result: Mapping[str, Any], entry: Mapping[str, Any]) -> float | None:
    value = (entry.get("fidelity") or {}).get(result["primary"])
    return value if isinstance(value, (int, float)) else None


def _verify_summary(entry: Mapping[str, Any]) -> str:
    verify = entry.get("verify") or {}
    outputs = verify.get("outputs") or {}
    if not outputs:
        return "-"
    if not verify.get("samples"):
        return "not compared: " + "; ".join(verify.get("messages") or ["no samples"])
    parts = []
    for m in outputs.values():
        cos, sqnr, err = m.get("cosine"), m.get("sqnr_db"), m.get("max_abs_error")
        sq = "inf" if sqnr is None and err == 0 else _num(sqnr, 1)
        parts.append(
            f"cos {_num(cos, 5)}, SQNR {sq} dB, max err {_num(err, 2) if err is None or err >= 0.01 else f'{err:.1e}'}"
        )
    return "; ".join(parts[:1])


def _other_fidelity(result: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
    fid = entry.get("fidelity") or {}
    return ", ".join(
        f"{k} {'inf (identical)' if v is None and 'sqnr' in k else _num(v)}"
        for k, v in fid.items()
        if k != result["primary"]
    )


# --------------------------------------------------------------------------- markdown


def _model_section(result: Mapping[str, Any]) -> list[str]:
    env = result.get("environment", {})
    settings = result.get("settings", {})
    methods: Mapping[str, Mapping[str, Any]] = result["methods"]
    base = methods.get("fp32", {})
    base_size = (base.get("cost") or {}).get("size_bytes")
    commit = env.get("git_commit") or "unknown"
    if env.get("git_dirty"):
        commit += " (with uncommitted changes)"
    lines = [
        f"## {result['title']}",
        "",
        f"- model: {result['source']}",
        f"- data: {result['data']['notes']}",
        f"- measured on commit `{commit}`, {env.get('date', '?')}, {env.get('cpu', '?')} "
        f"({settings.get('threads', '?')} threads), ONNX Runtime {env.get('onnxruntime')}, "
        f"onnx {env.get('onnx')}, onnxslim {env.get('onnxslim')}, onnxsim {env.get('onnxsim')}",
        f"- latency: {settings.get('runs')} timed runs after {settings.get('warmup')} warm-up, "
        "interleaved with the fp32 model"
        + (" (quick mode)" if settings.get("quick") else "")
        + "; batch shapes "
        + ", ".join(
            f"b{k.split('_')[1]} {tuple(next(iter(v['shape'].values())))}"
            for k, v in (base.get("latency") or {}).items()
        ),
        "",
    ]
    header = [
        "method",
        "size",
        "size/fp32",
        "weights",
        "MACs (b1)",
        "nodes",
        "b1 ms (p10-p90)",
        "b1/fp32",
        "b8 ms (p10-p90)",
        "b8/fp32",
        result["primary_label"],
        "outputs vs fp32",
        "equal",
        "opt. time",
        "opt. peak RSS",
    ]
    rows = []
    failed = []
    for name, e in methods.items():
        if not _ok(e):
            failed.append(f"- `{name}` ({e.get('label')}): {e.get('status')}: {e.get('error')}")
            continue
        cost = e.get("cost") or {}
        lat = e.get("latency") or {}
        ratio = e.get("latency_ratio") or {}
        opt = e.get("optimize") or {}
        size = cost.get("size_bytes")
        rows.append(
            [
                f"`{name}`",
                _size(size),
                _ratio(size / base_size if size and base_size else None),
                _count(cost.get("weights", cost.get("params"))),
                _count(cost.get("macs")),
                str(cost.get("nodes", "-")),
                _ms(lat.get("batch_1")),
                _ratio(ratio.get("batch_1")),
                _ms(lat.get("batch_8")),
                _ratio(ratio.get("batch_8")),
                _num(_primary(result, e)),
                _verify_summary(e),
                _num((e.get("verify") or {}).get("equal"))
                if (e.get("verify") or {}).get("samples")
                else "-",
                f"{opt['wall_s']:.2f} s" if opt else "-",
                f"{opt['peak_rss_mb']:.0f} MB" if opt else "-",
            ]
        )
    lines += _table(header, rows, "l" + "r" * (len(header) - 1))
    lines.append("")
    others = [
        f"- `{name}`: {_other_fidelity(result, e)}"
        for name, e in methods.items()
        if _ok(e) and _other_fidelity(result, e)
    ]
    if others:
        lines += ["Other fidelity metrics:", "", *others, ""]
    notes = []
    for name, e in methods.items():
        n = e.get("notes") or {}
        if _ok(e) and n.get("pre_process", "full") != "full":
            notes.append(f"- `{name}`: quant_pre_process {n['pre_process']}")
        if _ok(e) and n.get("opset"):
            notes.append(f"- `{name}`: {n['opset']}")
        if _ok(e) and n.get("check_ok") is False:
            notes.append(f"- `{name}`: onnxsim's own output check reported a mismatch")
    if notes:
        lines += ["Notes:", "", *notes, ""]
    if failed:
        lines += ["Methods without results:", "", *failed, ""]
    lines += _versus_peers(result)
    return lines


def _best_peer(methods: Mapping[str, Mapping[str, Any]], kind: str, key: Any) -> str | None:
    peers = [
        (key(e), name)
        for name, e in methods.items()
        if _ok(e) and e.get("kind") == kind and e.get("tool") in _PEER_TOOLS and key(e) is not None
    ]
    return min(peers)[1] if peers else None


def _rel(a: float | None, b: float | None) -> str:
    return _ratio(a / b) if a is not None and b else "-"


def _versus_peers(result: Mapping[str, Any]) -> list[str]:
    methods = result["methods"]
    lines: list[str] = []

    def nodes(e: Mapping[str, Any]) -> Any:
        c = e.get("cost") or {}
        lat = (e.get("latency") or {}).get("batch_1", {})
        return None if "nodes" not in c else (c["nodes"], lat.get("median_ms", 0.0))

    def ours_of(kind: str) -> list[str]:
        return [
            n
            for n, e in methods.items()
            if _ok(e) and e.get("tool") == "onnxslim-edge" and e.get("kind") == kind
        ]

    def ratio_rows(names: Sequence[str], peer: str, fidelity: bool) -> list[list[str]]:
        p = methods[peer]
        rows = []
        for name in names:
            e = methods[name]
            row = [f"`{name}` / `{peer}`"]
            if fidelity:
                row.append(f"{_num(_primary(result, e))} vs {_num(_primary(result, p))}")
            row += [
                _rel(e["cost"]["nodes"], p["cost"]["nodes"]),
                _rel(e["cost"]["size_bytes"], p["cost"]["size_bytes"]),
                _rel(e["latency"]["batch_1"]["median_ms"], p["latency"]["batch_1"]["median_ms"]),
                _rel(e["latency"]["batch_8"]["median_ms"], p["latency"]["batch_8"]["median_ms"]),
                _rel(e["optimize"]["wall_s"], p["optimize"]["wall_s"]),
                _rel(e["optimize"]["peak_rss_mb"], p["optimize"]["peak_rss_mb"]),
            ]
            rows.append(row)
        return rows

    header = ["nodes", "size", "b1 latency", "b8 latency", "opt. time", "opt. peak RSS"]
    peer = _best_peer(methods, "lossless", nodes)
    ours = ours_of("lossless")
    if peer and ours:
        lines += [
            f"Ours against the best lossless peer (`{peer}`: fewest nodes, then fastest at "
            "batch 1), as ours / peer:",
            "",
            *_table(["", *header], ratio_rows(ours, peer, False)),
            "",
        ]
    elif ours:
        lines += ["No lossless peer produced a result on this model.", ""]

    def by_fidelity(e: Mapping[str, Any]) -> Any:
        v = _primary(result, e)
        return None if v is None else -v

    qpeer = _best_peer(methods, "quantize", by_fidelity)
    if qpeer:
        q = methods[qpeer]
        base_size = methods["fp32"]["cost"]["size_bytes"]
        text = (
            f"Best ONNX Runtime quantization by {result['primary_label']}: `{qpeer}` "
            f"({_num(_primary(result, q))}, size {_ratio(q['cost']['size_bytes'] / base_size)} "
            f"of fp32, batch-1 latency {_ratio(q['latency_ratio'].get('batch_1'))} of fp32)."
        )
        ours_q = ours_of("quantize")
        if ours_q:
            lines += [
                text + " Ours against it, as ours / peer:",
                "",
                *_table(["", result["primary_label"], *header], ratio_rows(ours_q, qpeer, True)),
                "",
            ]
        else:
            lines += [text + " No quantized result from onnxslim-edge to compare.", ""]
    return lines


_HOW = """## How measured

- Command: `python -m benchmarks.run` (all models; `--models digits,efficientnet_lite0,ppocr_det,ppocr_rec,ppocr_cls`
  to choose, `--quick` for 10 timed runs instead of 30), then `python -m benchmarks.scaling`;
  `python -m benchmarks.report` regenerates this file and the plots from `benchmarks/results/*.json`.
- Methods: `fp32` is the input model. `ours-lossless` and `ours-edge` run onnxslim-edge's
  `recipes/lossless.toml` and `recipes/edge.toml` through `Pipeline` (every lossless pass
  checked against the previous graph on the calibration data; the edge recipe also holds
  the lossy passes that have landed, and its fidelity floor), with the same 32 calibration
  samples as the peers. `ours-prune20/30/50` (EfficientNet-Lite0 and detection only) and
  `ours-int8-*` run explicit pass lists through `Pipeline` (see the issue sections above;
  `ours-int8-ort-fallback`, EfficientNet-Lite0 only, checks its fidelity floor on the
  calibration samples; `ours-int8-ort-bc` runs `bias-correct` after `quantize`;
  `ours-int8-ort-entropy-kf`, detection only, keeps the first layer in float).
  `onnxslim` and `onnxsim` are the
  peers' default clean-ups. `ort-*` are ONNX Runtime `quantize_static` runs (QDQ, weights
  QInt8 per channel symmetric; activations QInt8 symmetric (`s8`) or QUInt8 asymmetric
  (`u8`); MinMax, Entropy or Percentile calibration on the same calibration samples), each
  after ONNX Runtime's recommended `quant_pre_process` (retried without symbolic shape
  inference where that fails; the tables' notes say so). Every model is saved by
  `onnxslim_edge.model.save_model`. With symmetric activations ONNX Runtime's Entropy
  calibration produced the same activation scales as MinMax here (checked on the digits
  CNN's quantized files), so those rows agree.
- Size is the file on disk; weights are the elements of every constant tensor of any
  type (int8 weights of QDQ models included; the JSON also has `params`, float weights
  only); MACs (at the batch-1 latency shape) and nodes come from
  `onnxslim_edge.analysis.model_cost` (a QDQ model's Q/DQ nodes count as nodes).
- Latency: ONNX Runtime CPU, 2 intra-op threads, spinning off, all graph optimizations,
  every method's model and the fp32 model in one interleaved loop (one run of each per
  round) so that drift on shared cores hits all alike; median and p10-p90 in ms, and the
  median's ratio to the fp32 model's (below 1 is faster). The absolute numbers are from a
  shared 2-core cloud VM: read the ratios.
- Fidelity: the task metric of each model (column), and the first output compared with the
  fp32 model's through `onnxslim_edge.verify.compare` (cosine, SQNR, max abs error; `equal`
  means every element within 1e-5 of the output's range, relative 1e-5).
- Optimization time and peak memory: each method runs in a fresh `multiprocessing` spawn
  child; the time is the call alone, the peak is the child's peak resident set (VmHWM from
  /proc: the whole process with Python and the libraries it imported, 50-100 MB before any
  work; `ru_maxrss` is not used because Linux carries the parent's over into a spawned child).
"""


def _scaling_section(scaling: Mapping[str, Any]) -> list[str]:
    env = scaling.get("environment", {})
    lines = [
        "## Scaling: lossless recipe against model size",
        "",
        "Synthetic stacks with random weights (numpy, seed 0) built with `onnx.helper` and saved "
        "by `onnxslim_edge.model.save_model` (external data above 2 GB): `mlp` is "
        "MatMul(x, Transpose(Wt)) + bias -> Identity -> Relu blocks, `transformer` is "
        "single-head attention plus a 4x MLP with LayerNormalization and residual adds. Each "
        "model runs through `recipes/lossless.toml` in a fresh spawn child (load, passes, "
        "checks, save); the peak is the child's peak resident set (VmHWM).",
        "",
        "Measured on commit(s) "
        + ", ".join(
            f"`{c}`" for c in sorted({r.get("git_commit") or "?" for r in scaling.get("runs", [])})
        )
        + f", {env.get('cpu')}; last run {env.get('date')}.",
        "",
    ]
    rows = []
    for r in sorted(scaling.get("runs", []), key=lambda r: (r["family"], r["size_bytes"])):
        if r.get("status") != "ok":
            rows.append(
                [
                    r["family"],
                    _size(r["size_bytes"]),
                    str(r.get("nodes", "-")),
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"{r.get('status')}: {r.get('error')}",
                ]
            )
            continue
        rows.append(
            [
                r["family"],
                _size(r["size_bytes"]),
                str(r.get("nodes", "-")),
                "yes" if r.get("external_data") else "no",
                f"{r['wall_s']:.2f} s",
                f"{r['peak_rss_mb']:.0f} MB",
                f"{r['peak_rss_mb'] * (1 << 20) / r['size_bytes']:.2f}x",
                _beyond_baseline(r),
                f"{r.get('nodes_after', '-')} nodes after",
            ]
        )
    lines += _table(
        [
            "family",
            "model size",
            "nodes",
            "external data",
            "wall time",
            "peak RSS",
            "peak / size",
            "(peak - baseline) / size",
            "notes",
        ],
        rows,
    )
    lines += [
        "",
        "The baseline is the child's resident set before it loads the model (the interpreter "
        "and imports); the issue's goal for `optimize --pass cleanup` is at most 3x beyond it.",
        "",
        "![scaling](results/scaling.png)",
        "",
    ]
    return lines


def _beyond_baseline(run: Mapping[str, Any]) -> str:
    before = run.get("rss_before_mb")
    if before is None:
        return "-"
    return f"{(run['peak_rss_mb'] - before) * (1 << 20) / run['size_bytes']:.2f}x"


def render(
    models: Sequence[Mapping[str, Any]],
    scaling: Mapping[str, Any] | None,
    *,
    image_dir: str = "results",
    findings: str | None = None,
) -> str:
    """RESULTS.md as text; `findings` (markdown written by hand: what the numbers mean,
    why a target is missed) goes before the issue summaries."""
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`; do not edit "
        "by hand. Each table says the commit and machine it was measured on.",
        "",
    ]
    if models:
        lines += [
            "Models: " + ", ".join(f"[{m['model']}](#{_anchor(m['title'])})" for m in models),
            "",
        ]
        lines += [
            f"![size vs fidelity]({image_dir}/size_vs_fidelity.png)",
            f"![latency vs fidelity]({image_dir}/latency_vs_fidelity.png)",
            "",
        ]
    if findings:
        lines += [findings.strip(), ""]
    lines += _pruning_section(models)
    lines += _int8_section(models)
    for m in models:
        lines += _model_section(m)
    if scaling:
        lines += _scaling_section(scaling)
    lines += [_HOW]
    return "\n".join(lines).rstrip() + "\n"


def _anchor(title: str) -> str:
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


# --------------------------------------------------------------------------- issue summaries


def _macs(e: Mapping[str, Any]) -> float | None:
    return (e.get("cost") or {}).get("macs")


def _lat(e: Mapping[str, Any], batch: str) -> float | None:
    return ((e.get("latency") or {}).get(batch) or {}).get("median_ms")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def _pruning_section(models: Sequence[Mapping[str, Any]]) -> list[str]:
    """Issue 4: each pruning row's MAC reduction against its measured latency reduction."""
    blocks: list[str] = []
    for result in models:
        methods = result["methods"]
        prune = {n: e for n, e in methods.items() if e.get("kind") == "prune"}
        if not prune:
            continue
        # The pruning recipes start with cleanup + fold-batchnorm: their own saving is
        # measured against the lossless recipe's model (same prefix, same loop), else fp32.
        ref_name = "ours-lossless" if _ok(methods.get("ours-lossless", {})) else "fp32"
        ref = methods[ref_name]
        rows = []
        failed = []
        for name, e in prune.items():
            target = (e.get("params") or {}).get("macs_reduction")
            if not _ok(e):
                failed.append(f"- `{name}`: {e.get('status')}: {e.get('error')}")
                continue
            macs_red = 1 - _macs(e) / _macs(ref) if _macs(e) and _macs(ref) else None
            p_e = (e.get("cost") or {}).get("params")
            p_r = (ref.get("cost") or {}).get("params")
            row = [
                f"`{name}`" + (" (separate run)" if e.get("reference_latency") else ""),
                _pct(target),
                _pct(macs_red),
                _pct(1 - p_e / p_r if p_e and p_r else None),
            ]
            # a row measured in a separate run carries that run's reference latency
            other = e.get("reference_latency") or {}
            for batch in ("batch_1", "batch_8"):
                a, b = _lat(e, batch), other.get(batch) or _lat(ref, batch)
                lat_red = 1 - a / b if a and b else None
                row += [
                    _pct(lat_red),
                    _num(lat_red / macs_red, 2) if lat_red is not None and macs_red else "-",
                ]
            row += [_num(_primary(result, e)), _other_fidelity(result, e) or "-"]
            rows.append(row)
        header = [
            "method",
            "MACs target",
            "MACs removed",
            "params removed",
            "b1 latency saved",
            "b1 ratio",
            "b8 latency saved",
            "b8 ratio",
            result["primary_label"] + " (no recovery)",
            "other fidelity",
        ]
        blocks += [f"### {result['title']}", ""]
        blocks += [
            f"Reductions against `{ref_name}` (the same clean-up and BatchNorm folding, "
            f"{_ms(ref.get('latency', {}).get('batch_1'))} ms at b1, "
            f"{_ms(ref.get('latency', {}).get('batch_8'))} ms at b8, timed in the same loop); "
            f"fp32 {result['primary_label']} is {_num(_primary(result, methods['fp32']))}.",
            "",
            *_table(header, rows, "l" + "r" * (len(header) - 1)),
            "",
        ]
        if failed:
            blocks += ["Without results:", "", *failed, ""]
    if not blocks:
        return []
    return [
        "## Issue 4: channel pruning, MACs against latency",
        "",
        "`prune-channels:macs_reduction=X,importance=activation` after `cleanup`, "
        "`fold-batchnorm`, `cleanup` (and a final `cleanup`), target `onnxruntime-cpu` "
        "(round_to 1; the `-r16` rows round kept channels to 16, ONNX Runtime's NCHWc block "
        "on this AVX-512 CPU), no recovery training. Rows marked *separate run* were "
        "measured after the main run, with their latency saving against that run's "
        "`ours-lossless` (timed in its loop). The pass gets the calibration feeds' shape "
        "as `input_shapes` (detection: 256 x 256 crops); MACs removed are counted at the "
        "batch-1 latency shape (see the findings on detection). The ratio is the latency saved over the MACs "
        "removed: 1.0 means every theoretical saving turned into time, below 1 less. "
        "Channel importance: `activation` (mean |x| on the calibration data); on "
        "EfficientNet-Lite0 at 30 % it kept top-1 agreement 0.45 where `l1` kept 0.0.",
        "",
        *blocks,
    ]


def _best(
    methods: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
    key: Any,
) -> str | None:
    cands = [(key(methods[n]), n) for n in names if _ok(methods.get(n, {}))]
    cands = [c for c in cands if c[0] is not None]
    return min(cands)[1] if cands else None


def _verdict(measured: float | None, target: float, *, higher: bool, unit: str = "") -> str:
    if measured is None:
        return "not measured"
    gap = measured - target if higher else target - measured
    if gap >= 0:
        return "met"
    return f"missed by {abs(gap):.3g}{unit}"


def _int8_model(result: Mapping[str, Any]) -> list[str]:
    """One model's issue-5 table and targets (empty without int8 from both sides)."""
    lines: list[str] = []
    methods = result["methods"]
    ours = [
        n
        for n, e in methods.items()
        if e.get("tool") == "onnxslim-edge" and e.get("kind") == "quantize"
    ]
    peers = [
        n
        for n, e in methods.items()
        if e.get("tool") == "onnxruntime" and e.get("kind") == "quantize"
    ]
    if not ours or not peers:
        return []
    base = methods["fp32"]

    def by_fid(e: Mapping[str, Any]) -> Any:
        v = _primary(result, e)
        return None if v is None else -v

    best_ours = _best(methods, ours, by_fid)
    best_peer = _best(methods, peers, by_fid)
    ort_cpu = [
        n for n in ours if (methods[n].get("notes") or {}).get("target") == "onnxruntime-cpu"
    ]
    rows = []

    def row(label: str, name: str | None) -> list[str]:
        if name is None:
            return [label, "-", "-", "-", "-", "-", "-", "-"]
        e = methods[name]
        opt = e.get("optimize") or {}
        return [
            f"{label} `{name}`",
            _num(_primary(result, e)),
            _ms(e["latency"]["batch_1"]),
            _ratio(e["latency_ratio"]["batch_1"]),
            _ms(e["latency"]["batch_8"]),
            _ratio(e["latency_ratio"]["batch_8"]),
            f"{opt['wall_s']:.1f} s" if opt else "-",
            f"{opt['peak_rss_mb']:.0f} MB" if opt else "-",
        ]

    fastest_peer = {
        b: _best(methods, peers, lambda e, b=b: _lat(e, b)) for b in ("batch_1", "batch_8")
    }
    fastest_ours = {
        b: _best(methods, ort_cpu, lambda e, b=b: _lat(e, b)) for b in ("batch_1", "batch_8")
    }
    rows.append(row("fp32", "fp32"))
    rows.append(row("ours, best fidelity:", best_ours))
    rows.append(row("ORT, best fidelity:", best_peer))
    for b in ("batch_1", "batch_8"):
        rows.append(row(f"ours onnxruntime-cpu, fastest b{b[-1]}:", fastest_ours[b]))
        rows.append(row(f"ORT, fastest b{b[-1]}:", fastest_peer[b]))
    header = [
        "",
        result["primary_label"],
        "b1 ms",
        "b1/fp32",
        "b8 ms",
        "b8/fp32",
        "quant. time",
        "quant. peak RSS",
    ]
    lines += [f"### {result['title']}", "", *_table(header, rows, "l" + "r" * 7), ""]

    # targets
    checks: list[str] = []
    fid_ours = _primary(result, methods[best_ours]) if best_ours else None
    fid_peer = _primary(result, methods[best_peer]) if best_peer else None
    targets = TARGETS.get(result["model"], ModelTargets())
    goal = targets.int8_fidelity
    if goal is not None:
        if goal.floor is not None:
            floor: float | None = goal.floor
            what = f"{goal.metric} >= {goal.floor:g}"
        else:
            assert goal.below_fp32 is not None
            ref = _primary(result, base)
            floor = None if ref is None else ref - goal.below_fp32
            what = (
                f"{goal.metric} within {100 * goal.below_fp32:g} points of fp32 "
                f"({_num(ref)}, so >= {_num(floor)})"
            )
        checks.append(
            f"{what}: {_num(fid_ours)} (`{best_ours}`) - "
            f"{_verdict(fid_ours, floor, higher=True) if floor is not None else '-'}; "
            f"ORT's best {_num(fid_peer)}"
        )
    for b in ("batch_1", "batch_8"):
        o, p = fastest_ours[b], fastest_peer[b]
        if o and p:
            lo, lp = _lat(methods[o], b), _lat(methods[p], b)
            verdict = "met" if lo <= lp else f"missed: {lo / lp:.2f}x ORT's time"
            checks.append(
                f"b{b[-1]} latency <= ORT's fastest: ours `{o}` {lo:.2f} ms, "
                f"ORT `{p}` {lp:.2f} ms - {verdict}"
            )
    for name in targets.speedup_methods:
        if name not in methods:
            continue
        assert targets.int8_speedup_b8 is not None
        e = methods[name]
        speed = 1 / e["latency_ratio"]["batch_8"] if _ok(e) else None
        checks.append(
            f">= {targets.int8_speedup_b8:g}x faster than fp32 at b8 (`{name}`, "
            f"{result['primary_label']} {_num(_primary(result, e))}): "
            f"{'-' if speed is None else f'{speed:.2f}x'} - "
            f"{_verdict(speed, targets.int8_speedup_b8, higher=True, unit='x')}"
        )
    for mine, theirs in SAME_METHOD_PAIRS:
        a, b = methods.get(mine, {}), methods.get(theirs, {})
        if _ok(a) and _ok(b):
            oa, ob = a["optimize"], b["optimize"]
            t = (
                "met"
                if oa["wall_s"] <= ob["wall_s"]
                else f"missed: {oa['wall_s'] / ob['wall_s']:.2f}x"
            )
            m = (
                "met"
                if oa["peak_rss_mb"] <= ob["peak_rss_mb"]
                else f"missed: {oa['peak_rss_mb'] / ob['peak_rss_mb']:.2f}x"
            )
            checks.append(
                f"`{mine}` vs `{theirs}`: time {oa['wall_s']:.1f} s vs {ob['wall_s']:.1f} s "
                f"({t}), peak RSS {oa['peak_rss_mb']:.0f} vs {ob['peak_rss_mb']:.0f} MB ({m}); "
                f"{result['primary_label']} {_num(_primary(result, a))} vs "
                f"{_num(_primary(result, b))}"
            )
    fb = methods.get("ours-int8-ort-fallback")
    if fb is not None:
        if _ok(fb):
            kept = [
                s.get("kept_float")
                for p in (fb.get("notes") or {}).get("passes", [])
                for s in p.get("summary", [])
                if s.get("kept_float") is not None
            ]
            checks.append(
                "`ours-int8-ort-fallback` checks its floor (top-1 agreement 0.95) on the "
                f"{result['data'].get('calibration_samples', '?')} calibration samples, not the "
                "evaluation data; kept in float: "
                f"{', '.join(map(str, kept[0])) if kept and kept[0] else 'none'}"
            )
        else:
            checks.append(f"`ours-int8-ort-fallback`: {fb.get('status')}: {fb.get('error')}")
    cal = result.get("calibration_memory")
    flat_pct = round(100 * (CALIBRATION_MEMORY_FLAT_RATIO - 1), 6)
    if cal:
        for label, entry in cal["methods"].items():
            runs = entry["runs"]
            sizes = [str(s) for s in cal["sizes"]]
            if "peak_ratio" not in entry:
                bad = next(r for r in runs.values() if r["status"] != "ok")
                checks.append(f"calibration memory `{label}`: {bad['error']}")
                continue
            checks.append(
                f"memory flat when the calibration set grows {sizes[0]} -> {sizes[-1]} "
                f"(`{label}`, minmax): peak RSS "
                + " -> ".join(f"{runs[s]['peak_rss_mb']:.0f}" for s in sizes)
                + f" MB ({entry['peak_ratio']:.2f}x; the call's own growth "
                f"{entry['call_growth_mb']:+.0f} MB beyond the larger feeds), time "
                + " -> ".join(f"{runs[s]['wall_s']:.1f}" for s in sizes)
                + f" s - {'met' if entry['flat'] else 'missed'} (flat = within {flat_pct:g} %)"
            )
    if checks:
        lines += ["Targets:", "", *[f"- {c}" for c in checks], ""]
    return lines


def _int8_section(models: Sequence[Mapping[str, Any]]) -> list[str]:
    """Issue 5: our best int8 against ORT's best, with the issue's targets."""
    lines: list[str] = []
    for result in models:
        lines += _int8_model(result)
    if not lines:
        return []
    return [
        "## Issue 5: int8 against ONNX Runtime's quantize_static",
        "",
        "Same models, calibration data and run. Ours: `cleanup`, `fold-batchnorm`, `cleanup`, "
        "`quantize` (`percentile` unless the name says `minmax` / `entropy`), for target "
        "`onnxruntime-cpu` (uint8 activations, int8 weights) or `tensorrt` (`-trt`, and the "
        "edge recipe). Best fidelity = the highest primary metric; fastest = the lowest "
        "median latency (ours among the onnxruntime-cpu outputs). Same-method comparisons: "
        "our minmax against ORT MinMax with uint8 activations (the same types), our "
        "entropy against ORT Entropy (int8 activations, its only entropy row).",
        "",
        *lines,
    ]


# --------------------------------------------------------------------------- plots

_COLORS = {
    "fp32": "black",
    "onnxslim-edge": "tab:green",
    "onnxslim": "tab:blue",
    "onnxsim": "tab:purple",
    "onnxruntime": "tab:orange",
}
_MARKERS = {"baseline": "s", "lossless": "o", "quantize": "^", "prune": "v"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _clusters(points: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, list[str]]]:
    """Points closer than 8% of the axis ranges share one label (names stacked)."""
    if not points:
        return []
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    dx = (max(xs) - min(xs)) or 1.0
    dy = (max(ys) - min(ys)) or 1.0
    groups: list[tuple[float, float, list[str]]] = []
    for px, py, name in sorted(points, key=lambda p: (-p[1], p[0])):
        for gx, gy, names in groups:
            if abs(px - gx) / dx < 0.08 and abs(py - gy) / dy < 0.08:
                names.append(name)
                break
        else:
            groups.append((px, py, [name]))
    return groups


def plot_fidelity(models: Sequence[Mapping[str, Any]], out: Path, *, x: str) -> Path | None:
    """One panel per model: x = size or batch-1 latency relative to fp32, y = fidelity."""
    if not models:
        return None
    plt = _plt()
    n = len(models)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    xlabel = "file size / fp32" if x == "size" else "batch-1 latency / fp32 (median)"
    for ax, result in zip(axes.flat, models):
        methods = result["methods"]
        base_size = (methods.get("fp32", {}).get("cost") or {}).get("size_bytes")
        points = []
        for name, e in methods.items():
            y = _primary(result, e)
            if not _ok(e) or y is None:
                continue
            if x == "size":
                xv = e["cost"]["size_bytes"] / base_size if base_size else None
            else:
                xv = (e.get("latency_ratio") or {}).get("batch_1")
            if xv is None:
                continue
            points.append((xv, y, name))
            ax.scatter(
                xv,
                y,
                s=60,
                c=_COLORS.get(e["tool"], "gray"),
                marker=_MARKERS.get(e["kind"], "o"),
                edgecolors="white",
                linewidths=0.6,
                zorder=3,
            )
        xs = [p[0] for p in points] or [1.0]
        right = max(xs) - 0.3 * ((max(xs) - min(xs)) or 1.0)
        for cx, cy, names in _clusters(points):
            left_side = cx > right
            ax.annotate(
                "\n".join(names),
                (cx, cy),
                textcoords="offset points",
                xytext=(-7 if left_side else 7, -5),
                ha="right" if left_side else "left",
                va="top",
                fontsize=7.5,
            )
        ax.margins(x=0.12, y=0.12)
        ax.set_title(result["model"], fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(result["primary_label"])
        ax.grid(True, alpha=0.3)
        ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=c, label=t) for t, c in _COLORS.items()
    ] + [plt.Line2D([], [], marker=m, ls="", color="gray", label=k) for k, m in _MARKERS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    title = (
        "Size vs fidelity" if x == "size" else "Latency vs fidelity (ONNX Runtime CPU, 2 threads)"
    )
    fig.suptitle(title + " - lower-left is smaller/faster, top is more faithful", fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = out / ("size_vs_fidelity.png" if x == "size" else "latency_vs_fidelity.png")
    _save_fig(fig, path)
    plt.close(fig)
    return path


def plot_scaling(scaling: Mapping[str, Any], out: Path) -> Path | None:
    """Wall time and peak RSS of the lossless recipe against model size (log-log)."""
    runs = [r for r in scaling.get("runs", []) if r.get("status") == "ok"]
    if not runs:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for family in sorted({r["family"] for r in runs}):
        rs = sorted((r for r in runs if r["family"] == family), key=lambda r: r["size_bytes"])
        mb = [r["size_bytes"] / (1 << 20) for r in rs]
        ax1.plot(mb, [r["wall_s"] for r in rs], "o-", label=family)
        ax2.plot(mb, [r["peak_rss_mb"] for r in rs], "o-", label=family)
    sizes = sorted(r["size_bytes"] / (1 << 20) for r in runs)
    ax2.plot(sizes, sizes, ":", color="gray", label="1x model size")
    for ax, ylabel in ((ax1, "wall time (s)"), (ax2, "peak RSS of the child (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model size (MB)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.axvline(2048, color="red", lw=0.8, ls="--")
        ax.legend(fontsize=9)
    fig.suptitle("Lossless recipe cost against model size (2 GB protobuf limit dashed)")
    fig.tight_layout()
    path = out / "scaling.png"
    _save_fig(fig, path)
    plt.close(fig)
    return path


def _save_fig(fig: Any, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_report(out: Path, md: Path, *, plots: bool = True) -> Path:
    """Regenerate `md` (and the plots in `out` when matplotlib is installed) from `out`'s JSON."""
    models, scaling = load_results(out)
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.warning("matplotlib is not installed: no plots")
            plots = False
    if plots:
        plot_fidelity(models, out, x="size")
        plot_fidelity(models, out, x="latency")
        if scaling:
            plot_scaling(scaling, out)
    image_dir = os.path.relpath(out, md.parent)
    findings = out / "findings.md"
    text = render(
        models,
        scaling,
        image_dir=Path(image_dir).as_posix(),
        findings=findings.read_text(encoding="utf-8") if findings.exists() else None,
    )
    if scaling:
        text = text.replace(
            "](results/scaling.png)", f"]({Path(image_dir).as_posix()}/scaling.png)"
        )
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, md)
    return md


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, default=_DEFAULT_OUT, help="results folder (JSON in, PNG out)"
    )
    parser.add_argument(
        "--md", type=Path, default=None, help="RESULTS.md path (default benchmarks/RESULTS.md)"
    )
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    md = args.md or (_DEFAULT_MD if args.out.resolve() == _DEFAULT_OUT else args.out / "RESULTS.md")
    if not args.out.is_dir():
        print(f"error: {args.out}: results folder not found", file=sys.stderr)
        return 2
    print(write_report(args.out, md, plots=not args.no_plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
