"""Per-layer quantization sensitivity: which layers lose the most fidelity when quantized.

`rank_layers(layers, build, evaluator)` scores, for every layer, the model `build(node)`
returns (that layer alone quantized: its weights and the Q/DQ its inputs need, the rest
in float) with an `onnxslim_edge.verify.Evaluator` holding the float model's outputs,
and ranks the layers most sensitive first: by SQNR (10 log10 of signal over error
energy, over all elements of all outputs), cosine, top-1 agreement or KL(softmax(float)
|| softmax(quantized)); a variant with NaN/inf mismatches ranks first. It knows nothing
about how variants are built, so it imports no builder (the `quantize` pass gives it a
closure over its `Quantizer`). `layer_sensitivity(model, data)` is the same for a model
and data given directly: calibrate once, then rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import onnx
import onnx_graphsurgeon as gs

from onnxslim_edge.data import open_data
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.model import load_model
from onnxslim_edge.passes.quantize.config import QuantizeConfig
from onnxslim_edge.passes.quantize.quantizer import Quantizer, prepare_float_model
from onnxslim_edge.pipeline import get_target
from onnxslim_edge.verify import Evaluator

__all__ = ["EVAL_SAMPLES", "METRICS", "LayerSensitivity", "layer_sensitivity", "rank_layers"]

log = logging.getLogger(__name__)

#: Samples of the calibration data the fidelity of a candidate is measured on.
EVAL_SAMPLES = 64

#: Ranking metric -> the `Fidelity` attribute it sorts by.
METRICS = {
    "sqnr": "sqnr_db",
    "kl": "kl_divergence",
    "cosine": "cosine",
    "top1": "top1_agreement",
}


class LayerSensitivity(NamedTuple):
    """Fidelity of the model with only `node` quantized (worst output; None where
    undefined) and its NaN/inf mismatches against the float model."""

    node: str
    op: str
    sqnr_db: float | None
    cosine: float | None
    kl_divergence: float | None
    top1_agreement: float | None
    nonfinite_mismatches: int = 0


def rank_layers(
    layers: Mapping[str, str],
    build: Callable[[str], onnx.ModelProto],
    evaluator: Evaluator,
    metric: str = "sqnr",
) -> list[LayerSensitivity]:
    """`layers` (node name -> op, in graph order), each quantized alone by `build(node)`
    and scored by `evaluator`, most sensitive first (ties in graph order)."""
    if metric not in METRICS:
        raise ConfigError(f"sensitivity metric {metric!r}; valid: {', '.join(METRICS)}")
    scored = []
    for node, op in layers.items():
        fid = evaluator.score(build(node))
        scored.append(
            (
                fid.rank_key(METRICS[metric]),
                LayerSensitivity(
                    node,
                    op,
                    fid.sqnr_db,
                    fid.cosine,
                    fid.kl_divergence,
                    fid.top1_agreement,
                    fid.nonfinite_mismatches,
                ),
            )
        )
        log.debug("sensitivity %s: %s dB", node, fid.sqnr_db)
    scored.sort(key=lambda item: item[0])
    return [item for _, item in scored]


def layer_sensitivity(
    model: Any,
    data: Any,
    *,
    quantize_config: QuantizeConfig | None = None,
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
    config = quantize_config if quantize_config is not None else QuantizeConfig()
    if not isinstance(config, QuantizeConfig):
        raise ConfigError("quantize_config must be a QuantizeConfig")
    if metric not in METRICS:
        raise ConfigError(f"sensitivity metric {metric!r}; valid: {', '.join(METRICS)}")
    float_model = prepare_float_model(gs.import_onnx(load_model(model)))
    quantizer = Quantizer(float_model, config, get_target(target).name)
    excluded = set(quantizer.config_exclusions())
    source = open_data(
        data, float_model, batch_size=batch_size, limit=config.max_calibration_samples
    )
    quantizer.calibrate(source, quantizer.tensors_to_calibrate(excluded))
    evaluator = Evaluator(float_model, source, max_samples=EVAL_SAMPLES, batch_size=batch_size)
    return rank_layers(
        quantizer.layers(excluded),
        lambda node: quantizer.build(excluded, only=[node]),
        evaluator,
        metric,
    )
