"""`Quantizer`: the calibrated quantization of one float model, buildable for any layers.

Statistics are collected once (`calibrate`, through `calibrate.Calibrator` and the
optional JSON cache) for every tensor any variant may quantize; `qparams` turns them
into per-tensor parameters (threshold method, per-tensor overrides, range narrowing by
`ranges.useful_range`, shared Concat scales); `build(excluded)` gives the quantized
model with those nodes left in float, and `apply(graph, excluded)` rewrites a graph in
place the same way. `prepare_float_model(graph)` is the float model every variant is
built from (nodes named, IR version clamped).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Literal

import onnx
import onnx_graphsurgeon as gs

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.graph import clamp_ir
from onnxslim_edge.passes.quantize.builder import apply_placement
from onnxslim_edge.passes.quantize.calibrate import (
    METHODS,
    Calibrator,
    cache_entry,
    estimated_sqnr_db,
    load_cache,
    method_label,
    save_cache,
)
from onnxslim_edge.passes.quantize.config import QuantizeConfig, parse_override
from onnxslim_edge.passes.quantize.numerics import (
    QParams,
    asymmetric_qparams,
    symmetric_qparams,
)
from onnxslim_edge.passes.quantize.placement import (
    ORT_EXTRA_OPS,
    Analysis,
    Placement,
    is_activation,
    make_placement,
    name_nodes,
)
from onnxslim_edge.passes.quantize.ranges import useful_range
from onnxslim_edge.pipeline import PassReport

__all__ = ["Quantizer", "check_cache", "describe_data", "prepare_float_model"]


def describe_data(data: Any) -> str | None:
    """What identifies calibration data in a cache entry: the data source's description
    without its batch size (the path or kind, and the sample count), or None."""
    describe = getattr(data, "describe", None)
    if describe is None:
        return None
    text = str(describe())
    head, sep, _ = text.rpartition(", batch ")
    return head if sep else text


def check_cache(
    path: str, cache: dict[str, dict[str, Any]], label: str, data: str | None
) -> list[str]:
    """Refuse (ConfigError) a calibration cache with an entry measured by another
    threshold method than `label`, or on other data than `data`; return notes on the
    entries used without a record of their data. Entries whose method is not a
    threshold method (written by hand, e.g. "manual") are the user's and are used."""
    unrecorded = []
    for name, entry in cache.items():
        method = str(entry["method"])
        if method.split(":")[0] in METHODS and method != label:
            raise ConfigError(
                f"{path}: calibration cache entry '{name}' was measured with {method}, "
                f"but quantize.method is {label}; delete the cache to re-calibrate, or set "
                "the method it was made with"
            )
        recorded = entry.get("data")
        if recorded is None:
            unrecorded.append(name)
        elif data is not None and recorded != data:
            raise ConfigError(
                f"{path}: calibration cache entry '{name}' was measured on {recorded}, not "
                f"on {data}; delete the cache to re-calibrate on this data"
            )
    if not unrecorded:
        return []
    return [
        f"calibration cache {path}: {len(unrecorded)} entr{'y' if len(unrecorded) == 1 else 'ies'} "
        f"with no record of their data (e.g. '{unrecorded[0]}') used as they are"
    ]


def prepare_float_model(graph: gs.Graph) -> onnx.ModelProto:
    """The float model quantized variants are built from: every node named (placement
    is keyed by node name; `graph` gets the names too), IR version in [7, 10]."""
    name_nodes(graph)
    return clamp_ir(gs.export_onnx(graph.copy(), do_type_check=False))


class Quantizer:
    """Calibrated quantization of one float model, buildable for any set of layers.

    Statistics are collected once (`calibrate`) for every tensor any variant may
    quantize; `build(excluded)` then gives the quantized model with those nodes left
    in float, and `apply(graph, excluded)` rewrites a graph in place the same way.
    """

    def __init__(self, model: onnx.ModelProto, config: QuantizeConfig, target: str) -> None:
        self.model = model
        self.config = config
        self.layout: Literal["tensorrt", "ort"] = "tensorrt" if target == "tensorrt" else "ort"
        dtype = config.activation_dtype
        if dtype == "auto":
            dtype = "int8" if self.layout == "tensorrt" else "uint8"
        if self.layout == "tensorrt" and dtype != "int8":
            raise ConfigError("quantize: target tensorrt needs int8 activations (zero point 0)")
        self.act_dtype = dtype
        self.analysis = Analysis(gs.import_onnx(model))
        self.stats: dict[str, Any] = {}
        self.cache: dict[str, dict[str, Any]] = {}
        self.cache_notes: list[str] = []
        self.data_label: str | None = None
        self.overrides = dict(parse_override(t) for t in config.overrides)
        self._tensors = self.analysis.graph.tensors()
        self._outputs = frozenset(t.name for t in self.analysis.graph.outputs)

    # -- which layers

    def config_exclusions(self) -> dict[str, str]:
        """Node name -> why the config keeps it in float."""
        cfg = self.config
        out: dict[str, str] = {}
        patterns = [(p, re.compile(p)) for p in cfg.exclude_nodes]
        for node in self.analysis.graph.nodes:
            if node.op in cfg.exclude_ops:
                out[node.name] = f"excluded by op type {node.op}"
                continue
            for text, pattern in patterns:
                if node.name == text or pattern.fullmatch(node.name):
                    out[node.name] = f"excluded by name pattern {text!r}"
                    break
        layers = [layer for layer in self.analysis.layers if layer.node not in out]
        if cfg.keep_first and layers:
            out[layers[0].node] = "kept in float: first layer (keep_first)"
        if cfg.keep_last and layers:
            out.setdefault(layers[-1].node, "kept in float: last layer (keep_last)")
        return out

    def layers(self, excluded: Iterable[str] = ()) -> dict[str, str]:
        """Quantizable layers not in `excluded`: node name -> op, in graph order."""
        skip = set(excluded)
        return {lay.node: lay.op for lay in self.analysis.layers if lay.node not in skip}

    def placement(self, excluded: Iterable[str], only: Iterable[str] | None = None) -> Placement:
        excluded = set(excluded)
        if only is not None:
            included = set(only)
            extra: tuple[str, ...] = ()
        else:
            included = {lay.node for lay in self.analysis.layers if lay.node not in excluded}
            extra = ORT_EXTRA_OPS
        placement = make_placement(
            self.analysis,
            included,
            layout=self.layout,
            excluded=excluded,
            extra_ops=extra,
            region=self.analysis.region,
        )
        # A tensor that took inf/NaN in calibration (a -inf attention mask) has no grid:
        # quantized, -inf would come back as the grid's end. It stays float.
        for name in [n for n in placement.acts if getattr(self.stats.get(n), "nonfinite", 0)]:
            del placement.acts[name]
            for group in placement.groups:
                group.discard(name)
        placement.groups = [g for g in placement.groups if len(g) > 1]
        return placement

    # -- calibration

    def tensors_to_calibrate(self, excluded: Iterable[str]) -> list[str]:
        p = self.placement(excluded)
        names = set(p.acts)
        if self.layout == "tensorrt":  # both sides of residual Adds (fallback may need either)
            dtypes = self.analysis.dtypes
            for node in self.analysis.graph.nodes:
                if node.op == "Add" and len(node.inputs) == 2:
                    names.update(t.name for t in node.inputs if is_activation(t, dtypes))
        return sorted(names)

    def calibrate(self, data: Any, tensors: list[str], *, progress: bool = False) -> None:
        """Statistics of `tensors` on `data`, except those an existing calibration cache
        holds. A cache entry measured with another method or on other data is refused
        (ConfigError); one without a record of its data is used, with a note."""
        self.data_label = describe_data(data)
        path = self.config.calibration_cache
        if path and os.path.exists(path):
            cache = load_cache(path)
            self.cache_notes = check_cache(
                path,
                cache,
                method_label(self.config.method, self.config.percentile),
                self.data_label,
            )
            self.cache = cache
        todo = [t for t in tensors if t not in self.cache and t not in self.overrides]
        if todo:
            self.stats = Calibrator(self.model, todo, progress=progress).collect(data)

    def qparams(self, placement: Placement) -> dict[str, QParams]:
        cfg = self.config
        ranges: dict[str, tuple[float, float, float, str]] = {}
        for name in placement.acts:
            lo = hi = None
            if name in self.stats and name not in self.cache:  # thresholds once per tensor
                entry = cache_entry(self.stats[name], cfg.method, percentile=cfg.percentile)
                if self.data_label:
                    entry["data"] = self.data_label
                self.cache[name] = entry
            entry = self.cache.get(name)
            if entry is not None:
                amax, method = float(entry["amax"]), str(entry["method"])
                lo, hi = entry.get("min"), entry.get("max")
                if self.act_dtype != "int8" and None not in (entry.get("lo"), entry.get("hi")):
                    # uint8 with a zero point: each sign's own threshold, not |x|'s
                    lo, hi = entry["lo"], entry["hi"]
                    amax = max(-lo, hi)
            else:
                amax, method = 0.0, "none"
            if name in self.overrides:
                amax, method = self.overrides[name], "override"
            lo = -amax if lo is None else lo
            hi = amax if hi is None else hi
            if cfg.consumer_ranges and name not in self.overrides:
                amax, lo, hi, method = self._clamp(placement, name, amax, lo, hi, method)
            ranges[name] = (amax, lo, hi, method)
        for group in placement.groups:
            amax = max(ranges[n][0] for n in group)
            lo = min(ranges[n][1] for n in group)
            hi = max(ranges[n][2] for n in group)
            for n in group:
                ranges[n] = (amax, lo, hi, ranges[n][3] + "+concat")
        out = {}
        for name, (amax, lo, hi, method) in ranges.items():
            if self.act_dtype == "int8":
                qp = symmetric_qparams(amax, method)
                qmin, qmax = -128, 127
            else:
                qp = asymmetric_qparams(lo, hi, amax, method)
                qmin, qmax = -qp.zero_point, 255 - qp.zero_point
            stats = self.stats.get(name)
            if stats is not None:
                sqnr = estimated_sqnr_db(stats, qp.scale, qmin, qmax)
                finite = sqnr is not None and math.isfinite(sqnr)
                qp = replace(qp, sqnr_db=round(sqnr, 2) if finite else None)
            out[name] = qp
        return out

    def _clamp(
        self, placement: Placement, name: str, amax: float, lo: float, hi: float, method: str
    ) -> tuple[float, float, float, str]:
        """Narrow a calibrated range to the part the rewired consumers can tell apart."""
        tensor = self._tensors[name]
        wanted = placement.acts.get(name)
        if wanted is None:
            consumers = [n for n in tensor.outputs if n.name not in placement.skip_rewire]
        else:
            consumers = [n for n in tensor.outputs if any(n.name == c for c, _ in wanted)]
        useful = useful_range(tensor, consumers, outputs=self._outputs)
        if useful is None:
            return amax, lo, hi, method
        new_lo, new_hi = max(lo, useful[0]), min(hi, useful[1])
        new_amax = min(amax, max(-new_lo, new_hi, 0.0))
        if (new_lo, new_hi, new_amax) == (lo, hi, amax) or new_lo > new_hi:
            return amax, lo, hi, method
        return new_amax, new_lo, new_hi, f"{method}+consumers[{useful[0]:g},{useful[1]:g}]"

    def save_cache(self) -> None:
        if self.config.calibration_cache:
            save_cache(self.config.calibration_cache, self.cache)

    # -- building

    def apply(
        self,
        graph: gs.Graph,
        excluded: Iterable[str],
        *,
        only: Iterable[str] | None = None,
        report: PassReport | None = None,
    ) -> Placement:
        placement = self.placement(excluded, only)
        apply_placement(
            graph,
            placement,
            self.qparams(placement),
            per_channel=self.config.per_channel,
            report=report,
        )
        return placement

    def build(
        self, excluded: Iterable[str], *, only: Iterable[str] | None = None
    ) -> onnx.ModelProto:
        graph = gs.import_onnx(self.model)
        self.apply(graph, excluded, only=only)
        return clamp_ir(gs.export_onnx(graph.cleanup().toposort(), do_type_check=False))
