"""Shared pytest fixtures: PyTorch-exported models, exported once per session.

    def test_x(torch_model):
        path = torch_model("resnet")          # exported on first use, then reused

    def test_all(torch_models_dir):
        torch_models_dir["mlp"]               # every architecture, exported up front

Both skip the test when torch is not installed. This folder is on `sys.path` (pytest
inserts the rootdir conftest's folder), so tests import helpers as `from fixtures
import corpus, torch_models`.

Tests use the installed package (a strict editable install while developing):
`python -m pytest` puts the repository root first on `sys.path`, where the source
folder `onnxslim_edge/` lacks `passes` (the install maps `passes/` into it), so the
root is taken off `sys.path` here, before any test imports onnxslim_edge.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO_ROOT]

from fixtures import torch_models  # noqa: E402


@pytest.fixture(scope="session")
def torch_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A function `name -> Path` exporting architecture `name` once per session."""
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("torch_models")
    exported: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in exported:
            exported[name] = torch_models.export(name, folder / f"{name}.onnx")
        return exported[name]

    return get


@pytest.fixture(scope="session")
def torch_models_dir(torch_model: Callable[[str], Path]) -> dict[str, Path]:
    """Every architecture in `torch_models.ARCHITECTURES`, exported: name -> path."""
    return {name: torch_model(name) for name in torch_models.ARCHITECTURES}
