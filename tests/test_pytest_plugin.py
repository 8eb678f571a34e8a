"""The `onnx_regression` pytest plugin, run through pytester as a user's project would:
loaded by its pytest11 entry point, golden folder created once, regressions failing with
the diff, `--onnx-update-golden` accepting a change."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from fixtures.tiny_models import mlp

from onnxslim_edge.model import save_model

pytest_plugins = ["pytester"]

USER_TEST = """
def test_model(onnx_regression):
    onnx_regression.check("model.onnx", data="inputs.npz", budget="nodes=+0")
"""


def test_registered_as_pytest11_entry_point() -> None:
    (ep,) = [e for e in entry_points(group="pytest11") if e.name == "onnxslim_edge"]
    assert ep.value == "onnxslim_edge.pytest_plugin"
    assert callable(ep.load().onnx_regression)


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    save_model(mlp(), pytester.path / "model.onnx")
    x = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)
    np.savez(pytester.path / "inputs.npz", x=x)
    pytester.makepyfile(test_user=USER_TEST)
    return pytester


def test_golden_created_then_checked_then_updated(project: pytest.Pytester) -> None:
    golden = project.path / "golden" / "test_user" / "test_model"
    first = project.runpytest("-p", "no:cacheprovider")
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines(["*golden folder*did not exist; recorded it*commit it*"])
    assert (golden / "outputs.json").is_file() and (golden / "signature.json").is_file()

    project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)

    save_model(mlp(extra_identity=True), project.path / "model.onnx")  # one node more
    broken = project.runpytest("-p", "no:cacheprovider")
    broken.assert_outcomes(failed=1)
    broken.stdout.fnmatch_lines(
        [
            "*nodes*3*4*+1 (+33.3%)*+0*BROKEN*",
            "*REGRESSION: nodes +1 (+33.3%) exceeds budget +0*",
            "*accept the change with pytest --onnx-update-golden*",
        ]
    )

    updated = project.runpytest("-p", "no:cacheprovider", "--onnx-update-golden")
    updated.assert_outcomes(passed=1)
    updated.stdout.fnmatch_lines(["*onnx-regression: rewrote 1 golden folder(s)*", f"*{golden}"])
    assert '"nodes": 4' in (golden / "signature.json").read_text()
    project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_missing_golden_without_data_fails_clearly(pytester: pytest.Pytester) -> None:
    save_model(mlp(), pytester.path / "model.onnx")
    pytester.makepyfile(
        test_nodata="""
def test_it(onnx_regression):
    onnx_regression.check("model.onnx")
"""
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*does not exist yet; give data= to record it*"])
    assert not (Path(pytester.path) / "golden").exists()
