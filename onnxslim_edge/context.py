"""What passes may need besides the graph: the `Context` (data, reference model, target,
seed, input shapes) and the deployment `Target`s whose placement rules passes read.

Analyses are not cached here: `onnxslim_edge.graph.infer_shapes` caches shapes per model
state and the pipeline carries each state's cost from one pass to the next.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from onnxslim_edge.errors import ConfigError

__all__ = ["TARGETS", "Context", "Target", "get_target"]


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


@dataclass
class Context:
    """What passes may need besides the graph.

    - `data`: calibration data (anything `onnxslim_edge.data.open_data` accepts).
    - `reference`: the reference (teacher) model; a pass or pipeline called without one
      sets it to its input.
    - `target`: "tensorrt" (default) or "onnxruntime-cpu".
    - `seed`: seeds every synthetic input and random choice (passes pass it on to
      `onnxslim_edge.data`), so runs are reproducible.
    - `input_shapes`: concrete shapes for symbolic input dims, e.g. {"x": (1, 3, 224, 224)}.
    """

    data: Any = None
    reference: onnx.ModelProto | None = None
    target: str | Target = "tensorrt"
    seed: int = 0
    progress: bool = False
    input_shapes: Mapping[str, Sequence[int]] | None = None

    def __post_init__(self) -> None:
        self.target = get_target(self.target)
