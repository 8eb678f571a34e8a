"""onnxslim-edge: compress ONNX models for edge devices, verified at every step.

    import onnxslim_edge as ose
    result = ose.Pipeline(["cleanup", "fold-batchnorm"]).run("model.onnx")
    ose.save_model(result.model, "model.slim.onnx")
    print(result.report.to_table())

A pass runs alone too: `ose.create_pass("cleanup")(model)` returns a `PassResult`
(`.model`, `.modified`, `.report`), measured as inside a pipeline. Passes come from the
`onnxslim_edge.passes` entry points of the installed package (`onnxslim_edge.registry`).
Importing this package imports neither torch, tensorrt nor onnxruntime.training.
"""

from __future__ import annotations

import importlib.util

from onnxslim_edge.errors import (
    ConfigError,
    DataError,
    InvalidModelError,
    OnnxSlimEdgeError,
    UnsupportedError,
)

if importlib.util.find_spec("onnxruntime") is None:  # pragma: no cover - depends on the env
    raise ImportError(
        "onnxslim-edge needs ONNX Runtime, and none is installed. Install one flavor: "
        "pip install 'onnxslim-edge[cpu]' (onnxruntime) or 'onnxslim-edge[train]' "
        "(onnxruntime-training-cpu==1.19.2 with torch, for distillation); never both."
    )


from onnxslim_edge.model import convert_opset, load_model, save_model
from onnxslim_edge.pipeline import (
    Context,
    Pass,
    PassReport,
    PassResult,
    Pipeline,
    PipelineReport,
    PipelineResult,
    available_passes,
    create_pass,
    load_recipe,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Context",
    "DataError",
    "InvalidModelError",
    "OnnxSlimEdgeError",
    "Pass",
    "PassReport",
    "PassResult",
    "Pipeline",
    "PipelineReport",
    "PipelineResult",
    "UnsupportedError",
    "__version__",
    "available_passes",
    "convert_opset",
    "create_pass",
    "load_model",
    "load_recipe",
    "save_model",
]
