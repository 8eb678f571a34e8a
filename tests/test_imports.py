"""Importing onnxslim_edge is light, and fails clearly without ONNX Runtime.

Each check runs in a fresh interpreter (a test process has imported everything by
then) whose working folder is outside the repository, so the installed package is
what gets imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: Heavy or flavor-specific modules that importing the package must not pull in.
HEAVY = ("torch", "tensorrt", "onnxruntime.training", "onnxruntime")

#: Modules a user imports for everyday work (not passes that need a runtime anyway).
LIGHT_MODULES = (
    "onnxslim_edge",
    "onnxslim_edge.model",
    "onnxslim_edge.pipeline",
    "onnxslim_edge.runtime",
    "onnxslim_edge.regress",
    "onnxslim_edge.engine",
    "onnxslim_edge.jetson",
    "onnxslim_edge.pytest_plugin",
    "onnxslim_edge.polygraphy_io",
)


def _python(code: str, cwd: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"interpreter failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_import_pulls_in_no_heavy_module(module: str, tmp_path: Path) -> None:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    loaded = _python(code, tmp_path)
    assert loaded == [], f"import {module} imported {loaded}"


_WITHOUT_ORT = """
import json, sys
sys.modules["onnxruntime"] = None  # as if no onnxruntime distribution were installed
try:
    import onnxslim_edge
except ImportError as exc:
    print(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
else:
    print(json.dumps({"type": None, "message": ""}))
"""


def test_import_without_onnxruntime_names_the_extras(tmp_path: Path) -> None:
    result = _python(_WITHOUT_ORT, tmp_path)
    assert result["type"] == "ImportError", result
    message = result["message"]
    assert "onnxslim-edge[cpu]" in message and "onnxslim-edge[train]" in message, message
    assert "\n" not in message


def test_cli_command_runs_from_a_source_checkout() -> None:
    """The installed `onnxslim-edge` command works from the repository root (a console
    script does not put the working folder on sys.path), and finds every built-in pass
    through the entry points."""
    root = Path(__file__).resolve().parents[1]
    command = Path(sys.executable).with_name("onnxslim-edge")
    proc = subprocess.run(
        [str(command), "passes"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    listed = {line.split(":")[0].split()[0] for line in proc.stdout.splitlines() if line[:1] != " "}
    assert {"cleanup", "fold-batchnorm", "quantize", "prune-channels"} <= listed


def test_source_folder_shadowing_the_install_gives_one_clear_error() -> None:
    """`python` in the repository root imports the source folder, which has no passes/
    inside: asking for a pass names the cause instead of a bare ModuleNotFoundError."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import onnxslim_edge as o\n"
        "try:\n    o.create_pass('cleanup')\n"
        "except o.ConfigError as exc:\n    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert message.startswith(
        "pass 'cleanup' is registered as onnxslim_edge.passes.cleanup:Cleanup but cannot be imported"
    ), message
    assert "run the installed package, not a source folder shadowing it" in message
