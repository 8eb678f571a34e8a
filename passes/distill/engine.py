"""The gradient-engine interface distillation trains through, and what every engine shares.

A `GradientEngine` compiles an ONNX *training problem* — a model whose one scalar output
is the loss (built by `losses.py`), a list of trainable initializers, an optimizer — into a
`TrainingProgram` that steps, evaluates the loss, reads and writes parameters and saves or
restores its whole state (parameters and optimizer moments) for resuming. Nothing here
knows ONNX Runtime training: `ort_engine.py` is one implementation, `ad_engine.py`
(gradient graphs of standard ONNX ops by `onnx-ad`, on plain onnxruntime) another.
`engine_for(name)` picks one and says which extra to install when none is.
"""

from __future__ import annotations

import abc
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import onnx

from onnxslim_edge.errors import ConfigError, UnsupportedError

__all__ = [
    "ENGINES",
    "GradientEngine",
    "OptimizerSpec",
    "TrainingProgram",
    "available_engines",
    "engine_for",
    "train_extra_missing",
]

log = logging.getLogger(__name__)

#: The message every entry point gives when no gradient engine can be imported.
TRAIN_EXTRA_MESSAGE = (
    "distill needs ONNX Runtime training, which this environment lacks: install the "
    "'train' extra (pip install 'onnxslim-edge[train]': onnxruntime-training-cpu==1.19.2 "
    "with torch, in place of onnxruntime)"
)


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    """The optimizer an engine builds. The learning rate is set before every step."""

    kind: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0  # AdamW only (decoupled)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.kind not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be adamw or sgd, not {self.kind!r}")
        if self.kind == "sgd" and self.weight_decay:
            raise ConfigError("weight_decay needs optimizer=adamw (the SGD block has none)")


class TrainingProgram(abc.ABC):
    """A compiled training problem. Feeds are `{input_name: array}` for `input_names`."""

    input_names: tuple[str, ...]
    trainable: tuple[str, ...]

    @abc.abstractmethod
    def step(self, feeds: Mapping[str, np.ndarray], lr: float) -> float:
        """One forward/backward/update at learning rate `lr`; returns the loss before it."""

    @abc.abstractmethod
    def loss(self, feeds: Mapping[str, np.ndarray]) -> float:
        """The loss on `feeds` without changing anything."""

    @abc.abstractmethod
    def get_parameters(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Copies of the trainable parameters (all, or `names`)."""

    @abc.abstractmethod
    def set_parameters(self, values: Mapping[str, np.ndarray]) -> None:
        """Overwrite trainable parameters (shapes and dtypes must match)."""

    @abc.abstractmethod
    def save_state(self, path: Path) -> None:
        """Write parameters and optimizer state to `path` (a file this engine owns)."""

    @abc.abstractmethod
    def load_state(self, path: Path) -> None:
        """Restore what `save_state` wrote, so training continues the same trajectory."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions and files."""


class GradientEngine(abc.ABC):
    """Turns a loss model into a `TrainingProgram`."""

    name: ClassVar[str]
    #: Ops this engine cannot differentiate (the pass freezes weights before them or stops).
    no_gradient: ClassVar[frozenset[str]] = frozenset()

    def untrainable(self, node: onnx.NodeProto, position: int) -> str | None:
        """Why this engine cannot train the weight `node` reads at `position` (None: it can)."""
        return None

    @abc.abstractmethod
    def compile(
        self,
        model: onnx.ModelProto,
        *,
        trainable: Sequence[str],
        optimizer: OptimizerSpec,
        workdir: Path,
        threads: int | None = None,
    ) -> TrainingProgram:
        """`model`'s only output is a scalar float loss; `trainable` names initializers.

        Raises UnsupportedError (one line, naming the op or node) when the engine cannot
        differentiate the graph.
        """


#: Engines by name: module:class, imported on use.
ENGINES: Mapping[str, str] = {
    "onnxruntime-training": "onnxslim_edge.passes.distill.ort_engine:OrtTrainingEngine",
    "onnx-ad": "onnxslim_edge.passes.distill.ad_engine:OnnxAdEngine",
}


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # pragma: no cover - a broken install
        return False


def available_engines() -> list[str]:
    """Engines that can run here, in the order "auto" tries them."""
    out = []
    if _found("onnxruntime") and _found("onnxruntime.training"):
        out.append("onnxruntime-training")
    if _found("onnxruntime") and _found("onnx_ad"):
        out.append("onnx-ad")
    return out


def train_extra_missing(name: str = "auto") -> str | None:
    """Why engine `name` cannot run here (the message naming the `train` extra), or None."""
    available = available_engines()
    if (name == "auto" and available) or name in available:
        return None
    if name == "onnx-ad":
        return "the onnx-ad gradient engine needs the onnx-ad package (pip install onnx-ad)"
    return TRAIN_EXTRA_MESSAGE


def engine_for(name: str = "auto") -> GradientEngine:
    """The engine called `name` ("auto": the first available); UnsupportedError if none."""
    import importlib

    if name != "auto" and name not in ENGINES:
        raise ConfigError(f"unknown gradient engine '{name}'; valid: auto, {', '.join(ENGINES)}")
    missing = train_extra_missing(name)
    if missing is not None:
        raise UnsupportedError(missing)
    chosen = available_engines()[0] if name == "auto" else name
    module, _, attr = ENGINES[chosen].partition(":")
    return getattr(importlib.import_module(module), attr)()
