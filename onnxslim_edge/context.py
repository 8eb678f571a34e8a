"""What passes may need besides the graph: the `Context` (data, reference model, target,
seed, input shapes) and the deployment `Target`s whose placement rules passes read.

Analyses are not cached here: `onnxslim_edge.graph.infer_shapes` caches shapes per model
state and the pipeline carries each state's cost from one pass to the next.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    - `resolved`: the shapes a run uses (`analysis.resolve.ResolvedShapes`: explicit >
      data > metadata > a validated ladder), set when a pass or pipeline run starts;
      read it through `shapes_for` / `data_shapes`.
    """

    data: Any = None
    reference: onnx.ModelProto | None = None
    target: str | Target = "tensorrt"
    seed: int = 0
    progress: bool = False
    input_shapes: Mapping[str, Sequence[int]] | None = None
    resolved: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.target = get_target(self.target)

    def shapes_for(self, model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of `model`'s inputs for tool-initiated runs (MAC counts,
        budgets, synthetic data): the run's resolved shapes (resolved here, from the
        explicit shapes and the model, when no run set them), for the inputs `model` has."""
        from onnxslim_edge.analysis.resolve import resolve_input_shapes

        if self.resolved is None:
            self.resolved = resolve_input_shapes(model, self.input_shapes)
        names = {vi.name for vi in model.graph.input}
        return {n: tuple(s) for n, s in self.resolved.shapes.items() if n in names}

    def cost_shapes(self, model: onnx.ModelProto) -> dict[str, tuple[int, ...]] | None:
        """`shapes_for(model)` where they say more than symbolic dims read as 1 (see
        `ResolvedShapes.informative`), else None: MACs and shape inference as plain."""
        shapes = self.shapes_for(model)
        return shapes if self.resolved.informative else None

    def data_shapes(self, model: onnx.ModelProto) -> dict[str, tuple[int, ...]] | None:
        """`input_shapes` to open `data` with: the explicit ones for real data (its own
        shapes rule), the resolved ones for synthetic data (`data` None or "random")."""
        if self.data is None or (isinstance(self.data, str) and self.data == "random"):
            return self.shapes_for(model)
        return None if self.input_shapes is None else dict(self.input_shapes)
