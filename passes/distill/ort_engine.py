"""The ONNX Runtime training engine (`onnxruntime-training-cpu` 1.19.2, the `train` extra).

`OrtTrainingEngine.compile` writes the loss model to a work folder and generates ORT's
training artifacts (training, eval and optimizer models and a checkpoint) in a *child
process*: ORT's gradient builder aborts the whole process on some graphs (a C++
assertion on `If`), so a crash there becomes one clear `UnsupportedError` instead of
killing the pipeline. A missing gradient is reported with the op and node names. The
optimizer model is stamped with the `onnx` package's newest IR version, which ORT 1.19
refuses; every artifact is lowered to the IR its opsets need before loading.

Torch: in this wheel `import onnxruntime` itself imports torch
(`onnxruntime.capi.onnxruntime_validation` imports `onnxruntime.training.ortmodule`), and
`onnxruntime.training.artifacts` imports it again through `onnxruntime.tools`. Neither
needs it for what we use, so the child process imports them with stubs in place
(`import_training_without_torch`: 1-3 s less per compile, measured here); the
pipeline's own process imports onnxruntime normally, and there the `train` extra's
pinned torch 2.13.0 is what gets imported. Nothing imports this module until a
`distill` pass runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxslim_edge.errors import UnsupportedError, first_line
from onnxslim_edge.passes.distill.engine import GradientEngine, OptimizerSpec, TrainingProgram
from onnxslim_edge.passes.distill.legalize import NO_GRADIENT

__all__ = ["OrtTrainingEngine", "OrtTrainingProgram"]

log = logging.getLogger(__name__)

_MISSING_GRADIENT = re.compile(r"(?:gradient|Gradient)[^\n]*?(?:op|Op|type)[ :=]+'?(\w+)'?")


class OrtTrainingEngine(GradientEngine):
    """Gradient graphs by ONNX Runtime training's builder; AdamW/SGD as ORT optimizer models."""

    name = "onnxruntime-training"
    no_gradient = NO_GRADIENT

    def compile(
        self,
        model: onnx.ModelProto,
        *,
        trainable: Sequence[str],
        optimizer: OptimizerSpec,
        workdir: Path,
        threads: int | None = None,
    ) -> OrtTrainingProgram:
        from onnxslim_edge.graph import clamp_ir

        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        source = workdir / "loss_model.onnx"
        onnx.save(clamp_ir(_copy(model)), source)
        spec = {
            "model": str(source),
            "out": str(workdir),
            "trainable": list(trainable),
            "optimizer": {
                "kind": optimizer.kind,
                "weight_decay": optimizer.weight_decay,
                "betas": list(optimizer.betas),
                "eps": optimizer.eps,
            },
        }
        (workdir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        _generate_in_child(workdir / "spec.json", model)
        for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
            path = workdir / name
            artifact = onnx.load(path)
            if artifact.ir_version > 10:
                onnx.save(clamp_ir(artifact), path)
        return OrtTrainingProgram(workdir, tuple(trainable), threads=threads)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _generate_in_child(spec_path: Path, model: onnx.ModelProto) -> None:
    """Run `generate(spec)` in a fresh interpreter; map a failure to one error line."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "onnxslim_edge.passes.distill.ort_engine", str(spec_path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        # `-m` puts the working folder first on sys.path; in a source checkout its
        # `onnxslim_edge/` (without `passes/`) would shadow the installed package
        cwd=spec_path.parent,
    )
    if proc.returncode == 0:
        return
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "[I:onnxruntime" not in ln]
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        control = sorted(
            {n.op_type for n in model.graph.node if n.op_type in ("If", "Loop", "Scan")}
        )
        hint = (
            f" (the graph has {', '.join(control)}, which it cannot differentiate)"
            if control
            else ""
        )
        raise UnsupportedError(
            f"ONNX Runtime training crashed ({sig}) building the gradient graph{hint}; "
            "freeze the layers around it (distill:frozen=...) or remove it first"
        )
    message = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
    if "gradient_builder != nullptr" in message or "GetGradientForOp" in message:
        ops = _ops_in(message, model)
        which = f" for {', '.join(ops)}" if ops else ""
        raise UnsupportedError(
            f"ONNX Runtime training has no gradient{which} on the path from the trainable "
            "weights to the loss; freeze the layers before it (distill:frozen=...)"
        )
    raise UnsupportedError(
        "ONNX Runtime training cannot build the gradient graph: " + _short(message)
    )


def _ops_in(message: str, model: onnx.ModelProto) -> list[str]:
    """Op types of `model` named in an ORT message (the gradient registry names the op)."""
    ops = {n.op_type for n in model.graph.node}
    found = [op for op in sorted(ops) if re.search(rf"\b{re.escape(op)}\b", message)]
    match = _MISSING_GRADIENT.search(message)
    if match and match.group(1) in ops and match.group(1) not in found:
        found.append(match.group(1))
    return found


def _short(message: str) -> str:
    """ORT prefixes messages with a source path and a C++ signature: keep the reason."""
    text = first_line(Exception(message)) if message else "no message"
    for marker in (" was false. ", "] : ", "RuntimeError: "):
        if marker in text:
            text = text.rsplit(marker, 1)[-1]
    return text[:300]


class OrtTrainingProgram(TrainingProgram):
    """An ORT `Module` + `Optimizer` over generated artifacts in `workdir`."""

    def __init__(self, workdir: Path, trainable: tuple[str, ...], *, threads: int | None) -> None:
        self.workdir = Path(workdir)
        self.trainable = trainable
        self._threads = threads
        from onnxruntime.training import api

        self._api = api
        self._open(api.CheckpointState.load_checkpoint(str(self.workdir / "checkpoint")))

    def _open(self, state: Any) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self._threads is not None:
            opts.intra_op_num_threads = self._threads
            opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._state = state
        self._module = self._api.Module(
            str(self.workdir / "training_model.onnx"),
            state,
            str(self.workdir / "eval_model.onnx"),
            session_options=opts,
        )
        self._optimizer = self._api.Optimizer(
            str(self.workdir / "optimizer_model.onnx"), self._module
        )
        self.input_names = tuple(self._module.input_names())

    def _inputs(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [np.ascontiguousarray(feeds[n]) for n in self.input_names]

    def step(self, feeds: Mapping[str, np.ndarray], lr: float) -> float:
        self._module.train()
        self._optimizer.set_learning_rate(float(lr))
        out = self._module(*self._inputs(feeds))
        self._optimizer.step()
        self._module.lazy_reset_grad()
        return float(np.asarray(out[0] if isinstance(out, (list, tuple)) else out))

    def loss(self, feeds: Mapping[str, np.ndarray]) -> float:
        self._module.eval()
        out = self._module(*self._inputs(feeds))
        return float(np.asarray(out[0] if isinstance(out, (list, tuple)) else out))

    def get_parameters(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        params = self._state.parameters
        return {n: np.array(params[n].data, copy=True) for n in (names or self.trainable)}

    def set_parameters(self, values: Mapping[str, np.ndarray]) -> None:
        params = self._state.parameters
        for name, value in values.items():
            params[name] = np.ascontiguousarray(value, dtype=params[name].data.dtype)

    def save_state(self, path: Path) -> None:
        self._api.CheckpointState.save_checkpoint(
            self._state, str(path), include_optimizer_state=True
        )

    def load_state(self, path: Path) -> None:
        self._open(self._api.CheckpointState.load_checkpoint(str(path)))

    def close(self) -> None:
        self._module = self._optimizer = self._state = None


def import_training_without_torch() -> tuple[Any, Any]:
    """`(onnxruntime.training.artifacts, onnxruntime.training.onnxblock)` without torch.

    For a fresh interpreter only (the child): `onnxruntime.training`'s `__init__` (amp,
    optim: torch), `ortmodule` (torch) and `tools.pytorch_export_helpers` (torch) are
    replaced by stubs before anything imports onnxruntime.
    """
    import importlib.util
    import types

    spec = importlib.util.find_spec("onnxruntime")
    assert spec is not None and spec.origin is not None
    training = types.ModuleType("onnxruntime.training")
    training.__path__ = [str(Path(spec.origin).parent / "training")]
    helpers = types.ModuleType("onnxruntime.tools.pytorch_export_helpers")

    def infer_input_info(*args: Any, **kwargs: Any) -> Any:  # pragma: no cover - unused
        raise RuntimeError("torch-based ONNX Runtime tools are not available here")

    helpers.infer_input_info = infer_input_info  # type: ignore[attr-defined]
    sys.modules.setdefault("onnxruntime.training", training)
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)  # type: ignore[arg-type]
    sys.modules.setdefault("onnxruntime.tools.pytorch_export_helpers", helpers)
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    from onnxruntime.training import artifacts, onnxblock

    return artifacts, onnxblock


def generate(spec_path: str) -> None:
    """The child's work: ORT training artifacts for the spec `compile` wrote."""
    artifacts, onnxblock = import_training_without_torch()

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    opt = spec["optimizer"]
    if opt["kind"] == "adamw":
        block = onnxblock.optim.AdamW(
            betas=tuple(opt["betas"]), eps=opt["eps"], weight_decay=opt["weight_decay"]
        )
    else:
        block = onnxblock.optim.SGD()
    artifacts.generate_artifacts(
        onnx.load(spec["model"]),
        requires_grad=spec["trainable"],
        frozen_params=[],
        loss=None,
        optimizer=block,
        artifact_directory=spec["out"],
    )


if __name__ == "__main__":  # the child process of `_generate_in_child`
    generate(sys.argv[1])
