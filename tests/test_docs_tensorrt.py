"""docs/tensorrt.md runs: its commands execute on the digits CNN as written; build-engine
prints the page's one-line error where TensorRT is missing."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from onnxslim_edge.cli import main
from onnxslim_edge.demo import DIGITS_MODEL
from onnxslim_edge.engine import tensorrt_unavailable

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tensorrt.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def test_tensorrt_page_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(DIGITS_MODEL, tmp_path / "model.onnx")
    images = np.load(DIGITS_MODEL.parent / "digits_test.npz")["image"][:8]
    np.savez(tmp_path / "calib.npz", image=images)
    monkeypatch.chdir(tmp_path)
    build, bundle = (shlex.split(b.strip()) for b in _blocks("bash"))
    assert build[:2] == ["onnxslim-edge", "build-engine"] and bundle[1] == "bundle"

    assert main(bundle[1:]) == 0
    assert sorted(p.name for p in (tmp_path / "jetson").iterdir()) == [
        "README.md", "build_engine.sh", "checks.json", "compare.sh", "golden", "model.onnx",
    ]  # fmt: skip
    capsys.readouterr()

    if tensorrt_unavailable() is None:  # pragma: no cover - a GPU machine
        assert main(build[1:]) in (0, 1)
        assert (tmp_path / "model.engine").is_file()
        return
    reason = tensorrt_unavailable()
    assert main(build[1:]) == 2
    assert capsys.readouterr().err.strip() == f"onnxslim-edge: error: {reason}"
    assert not (tmp_path / "model.engine").exists()
    if "cannot import tensorrt" in reason:  # the page quotes this case
        (error,) = _blocks("text")
        assert error.strip() == f"onnxslim-edge: error: {reason}"
