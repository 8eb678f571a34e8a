"""docs/regression.md runs: its commands, its pytest test and its GitHub Actions workflow's
`run:` steps execute as written in a scratch project, and its sample diff is the real one."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxslim_edge.cli import main
from onnxslim_edge.demo import DIGITS_MODEL

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "regression.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def _workflow_steps(yaml_text: str) -> list[str]:
    """The `run:` commands of the workflow, in order (one line each here)."""
    return [m.strip() for m in re.findall(r"^\s*(?:- )?run: (.+)$", yaml_text, flags=re.M)]


def _run(cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`onnxslim-edge ...` in this process (what the console script calls), the rest
    (polygraphy, python -m pytest) as subprocesses with the venv first on PATH."""
    argv = shlex.split(cmd)
    if argv[0] == "onnxslim-edge":
        out, err = io.StringIO(), io.StringIO()
        old = Path.cwd()
        os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(argv[1:])
        finally:
            os.chdir(old)
        return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if argv[0] == "python":
        argv[0] = sys.executable
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _with_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """The digits CNN with one Identity before its output: same outputs, one node more."""
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{out}_pre" if o == out else o for o in node.output]
    model.graph.node.append(helper.make_node("Identity", [f"{out}_pre"], [out]))
    return model


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "tests").mkdir()
    shutil.copy(DIGITS_MODEL, tmp_path / "models" / "model.onnx")
    images = np.load(DIGITS_MODEL.parent / "digits_test.npz")["image"][:16]
    np.savez(tmp_path / "data" / "inputs.npz", image=images)
    (tmp_path / "tests" / "test_model_regression.py").write_text(_blocks("python")[0])
    return tmp_path


@pytest.mark.slow
def test_regression_page_runs(project: Path) -> None:
    commands = [line for block in _blocks("bash") for line in block.strip().splitlines()]
    assert [c.split()[:2] for c in commands] == [
        ["onnxslim-edge", "snapshot"],
        ["polygraphy", "run"],
        ["onnxslim-edge", "regress"],
    ]
    for cmd in commands:
        done = _run(cmd, project)
        assert done.returncode == 0, f"{cmd}\n{done.stdout}{done.stderr}"

    steps = _workflow_steps(_blocks("yaml")[0])
    assert steps[0].startswith("pip install") and len(steps) == 3
    for cmd in steps[1:]:  # the installed venv stands in for the pip install
        done = _run(cmd, project)
        assert done.returncode == 0, f"{cmd}\n{done.stdout}{done.stderr}"
    assert "1 passed" in done.stdout

    # the page's sample diff is what regress prints for one node more
    model = project / "models" / "model.onnx"
    onnx.save(_with_identity(onnx.load(model)), model)
    done = _run(commands[2], project)
    assert done.returncode == 1
    (sample,) = _blocks("text")
    assert done.stdout.strip() == sample.strip()
    for cmd in steps[1:]:
        assert _run(cmd, project).returncode == 1, cmd
