"""onnxslim-edge: compress ONNX models for edge devices, verified at every step.

    import onnxslim_edge as ose
    result = ose.Pipeline(["cleanup", "fold-batchnorm"]).run("model.onnx")
    ose.save_model(result.model, "model.slim.onnx")
    print(result.report.to_table())

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


def _source_checkout_passes() -> None:
    """Run from a source checkout, `passes/` sits beside this folder instead of inside it.

    Installs (wheel or editable) map it to `onnxslim_edge/passes` and skip this; in a bare
    checkout (e.g. `python -c ...` from the repository root) register it under its real
    name so `import onnxslim_edge.passes.cleanup` works there too.
    """
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    source = here.parent / "passes"
    if (here / "passes").exists() or not (source / "__init__.py").is_file():
        return
    if "onnxslim_edge.passes" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "onnxslim_edge.passes", source / "__init__.py", submodule_search_locations=[str(source)]
    )
    if spec is None or spec.loader is None:  # pragma: no cover - defensive
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_source_checkout_passes()

from onnxslim_edge.model import convert_opset, load_model, save_model  # noqa: E402
from onnxslim_edge.pipeline import (  # noqa: E402
    Context,
    Pass,
    PassReport,
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
