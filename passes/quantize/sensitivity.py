"""Per-layer quantization sensitivity, and the fidelity measure of automatic fallback.

`layer_sensitivity(model, data)` calibrates once, then quantizes one layer at a time
(its weights and the Q/DQ its inputs need on the chosen target, everything else in
float) and measures each variant's outputs against the float model on the same data:
SQNR (10 log10 of signal over error energy, over all elements of all outputs), cosine,
and for 2-D logits top-1 agreement and KL(softmax(float) || softmax(quantized)). The
result is ranked most sensitive first.

`Evaluator` keeps the float model's outputs on (at most `EVAL_SAMPLES` of) the data and
scores candidates against them, batch by batch: cosine and SQNR from sums over all
elements of all batches, top-1 agreement and KL over all rows, so batches may differ in
shape (recognition lines of different widths, detection crops of different sizes).
`Quantize` uses it for its fallback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import onnx

from onnxslim_edge.errors import ConfigError

__all__ = [
    "EVAL_SAMPLES",
    "Evaluator",
    "Fidelity",
    "LayerSensitivity",
    "layer_sensitivity",
    "rank_layers",
]

log = logging.getLogger(__name__)

#: Samples of the calibration data the fidelity of a candidate is measured on.
EVAL_SAMPLES = 64


class LayerSensitivity(NamedTuple):
    """Fidelity of the model with only `node` quantized (None where undefined)."""

    node: str
    op: str
    sqnr_db: float
    cosine: float
    kl_divergence: float | None
    top1_agreement: float | None


@dataclass
class Fidelity:
    """Worst-output fidelity of a candidate against the float model, and per output."""

    sqnr_db: float
    cosine: float
    top1_agreement: float | None
    kl_divergence: float | None
    per_output: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def misses(self, floors: Mapping[str, float]) -> list[str]:
        """One line per missed floor (min_sqnr_db, min_cosine, min_top1_agreement)."""
        out = []
        for key, floor in floors.items():
            attr = key.removeprefix("min_")
            for name, values in self.per_output.items():
                value = values.get(attr)
                if value is not None and value < floor:
                    out.append(f"output '{name}': {attr} {value:.4g} < floor {floor:g}")
        return out

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "sqnr_db": clean(self.sqnr_db),
            "cosine": self.cosine,
            "top1_agreement": self.top1_agreement,
            "kl_divergence": self.kl_divergence,
            "per_output": {
                k: {m: clean(v) for m, v in d.items()} for k, d in self.per_output.items()
            },
        }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


class Evaluator:
    """The float model's outputs on a few batches, and scores of candidates on them."""

    def __init__(self, reference: onnx.ModelProto, data: Iterable[Mapping[str, Any]]) -> None:
        from onnxslim_edge.runtime import make_session

        self.feeds: list[dict[str, np.ndarray]] = []
        count = 0
        for feed in data:
            self.feeds.append({k: np.asarray(v) for k, v in feed.items()})
            count += len(next(iter(feed.values()))) if feed else 1
            if count >= EVAL_SAMPLES:
                break
        session = make_session(reference)
        self.names = [o.name for o in session.get_outputs()]
        self.reference = [self._run(session, f) for f in self.feeds]

    def _run(self, session: Any, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        wanted = {i.name for i in session.get_inputs()}
        return session.run(self.names, {k: v for k, v in feed.items() if k in wanted})

    def score(self, candidate: onnx.ModelProto) -> Fidelity:
        from onnxslim_edge.runtime import make_session

        session = make_session(candidate)
        sums = {n: [0.0, 0.0, 0.0, 0.0] for n in self.names}  # rr, ee, cc, rc
        top = {n: [0, 0] for n in self.names}
        kl = {n: [0.0, 0] for n in self.names}
        for feed, ref in zip(self.feeds, self.reference):
            for name, r, c in zip(self.names, ref, self._run(session, feed)):
                r64 = np.asarray(r, np.float64)
                c64 = np.asarray(c, np.float64)
                if not np.isfinite(r64).all():
                    continue
                e = np.nan_to_num(c64 - r64, nan=1e30, posinf=1e30, neginf=1e30)
                s = sums[name]
                s[0] += float((r64 * r64).sum())
                s[1] += float((e * e).sum())
                c64 = np.nan_to_num(c64, nan=0.0, posinf=0.0, neginf=0.0)
                s[2] += float((c64 * c64).sum())
                s[3] += float((r64 * c64).sum())
                if r64.ndim == 2 and r64.shape[1] > 1:
                    top[name][0] += int((r64.argmax(1) == c64.argmax(1)).sum())
                    top[name][1] += r64.shape[0]
                    lp, lq = _log_softmax(r64), _log_softmax(c64)
                    kl[name][0] += float((np.exp(lp) * (lp - lq)).sum())
                    kl[name][1] += r64.shape[0]
        per_output: dict[str, dict[str, float | None]] = {}
        for name in self.names:
            rr, ee, cc, rc = sums[name]
            sqnr = math.inf if ee == 0 else (-math.inf if rr == 0 else 10 * math.log10(rr / ee))
            if rr == 0 and cc == 0:
                cos = 1.0
            elif rr == 0 or cc == 0:
                cos = 0.0
            else:
                cos = max(-1.0, min(1.0, rc / math.sqrt(rr * cc)))
            per_output[name] = {
                "sqnr_db": sqnr,
                "cosine": cos,
                "top1_agreement": top[name][0] / top[name][1] if top[name][1] else None,
                "kl_divergence": kl[name][0] / kl[name][1] if kl[name][1] else None,
            }
        tops = [v["top1_agreement"] for v in per_output.values() if v["top1_agreement"] is not None]
        kls = [v["kl_divergence"] for v in per_output.values() if v["kl_divergence"] is not None]
        return Fidelity(
            sqnr_db=min((v["sqnr_db"] for v in per_output.values()), default=math.inf),  # type: ignore[type-var]
            cosine=min((v["cosine"] for v in per_output.values()), default=1.0),  # type: ignore[type-var]
            top1_agreement=min(tops) if tops else None,
            kl_divergence=max(kls) if kls else None,
            per_output=per_output,
        )


_METRICS = ("sqnr", "kl", "cosine", "top1")


def _sort_key(metric: str) -> Any:
    if metric == "sqnr":
        return lambda r: r.sqnr_db
    if metric == "cosine":
        return lambda r: r.cosine
    if metric == "kl":
        return lambda r: -(r.kl_divergence if r.kl_divergence is not None else -math.inf)
    return lambda r: r.top1_agreement if r.top1_agreement is not None else math.inf


def rank_layers(
    quantizer: Any, evaluator: Evaluator, excluded: Iterable[str] = (), metric: str = "sqnr"
) -> list[LayerSensitivity]:
    """Every layer not in `excluded`, quantized alone, most sensitive first (ties in
    graph order). `quantizer` is a calibrated `qdq.Quantizer`."""
    if metric not in _METRICS:
        raise ConfigError(f"sensitivity metric {metric!r}; valid: {', '.join(_METRICS)}")
    skip = set(excluded)
    results = []
    for layer in quantizer.analysis.layers:
        if layer.node in skip:
            continue
        fid = evaluator.score(quantizer.build(skip, only=[layer.node]))
        results.append(
            LayerSensitivity(
                layer.node,
                layer.op,
                fid.sqnr_db,
                fid.cosine,
                fid.kl_divergence,
                fid.top1_agreement,
            )
        )
        log.debug("sensitivity %s: %.2f dB", layer.node, fid.sqnr_db)
    return sorted(results, key=_sort_key(metric))


def layer_sensitivity(
    model: Any,
    data: Any,
    *,
    quantize_config: Any = None,
    target: str = "tensorrt",
    metric: Literal["sqnr", "kl", "cosine", "top1"] = "sqnr",
    batch_size: int = 8,
) -> list[LayerSensitivity]:
    """Quantize one layer of `model` at a time; rank the layers, most sensitive first.

    `data` is anything `onnxslim_edge.data.open_data` accepts (calibration statistics
    are collected once over it and reused for every variant; fidelity is measured on
    its first `EVAL_SAMPLES` samples). `quantize_config` is a `QuantizeConfig` (method,
    activation dtype, exclusions: excluded layers are not ranked).
    """
    import onnx_graphsurgeon as gs

    from onnxslim_edge.data import open_data
    from onnxslim_edge.model import load_model
    from onnxslim_edge.passes.quantize.qdq import QuantizeConfig, Quantizer, _name_nodes
    from onnxslim_edge.pipeline import get_target

    config = quantize_config if quantize_config is not None else QuantizeConfig()
    if not isinstance(config, QuantizeConfig):
        raise ConfigError("quantize_config must be a QuantizeConfig")
    graph = gs.import_onnx(load_model(model))
    _name_nodes(graph)
    float_model = gs.export_onnx(graph, do_type_check=False)
    float_model.ir_version = min(max(float_model.ir_version, 7), 10)
    quantizer = Quantizer(float_model, config, get_target(target).name)
    excluded = set(quantizer.config_exclusions())
    source = open_data(
        data, float_model, batch_size=batch_size, limit=config.max_calibration_samples
    )
    quantizer.calibrate(source, quantizer.tensors_to_calibrate(excluded))
    return rank_layers(quantizer, Evaluator(float_model, source), excluded, metric)
