"""The pytest plugin: an `onnx_regression` fixture over `regress.snapshot` / `regress.regress`.

Registered through the `pytest11` entry point, so installing onnxslim-edge is enough:

    def test_model(onnx_regression):
        onnx_regression.check("model.onnx", data="inputs.npz", budget="nodes=+0")

Golden folders live beside the test file, in `golden/<test module>/<test name>/` (one
per test, parametrized ids included), unless `check(..., golden=...)` names one.
Relative model/data/golden paths are read from the test file's folder when they exist
there, else from the current folder. A missing golden folder is created and the test
fails once, asking to commit it (CI never accepts a model silently);
`pytest --onnx-update-golden` rewrites the golden folders of the tests it runs and
passes them, listing what it rewrote at the end of the run. A regression fails the test
with the readable diff of `RegressResult.to_text()`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

__all__ = ["OnnxRegression", "onnx_regression"]

_UPDATED = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("onnx-regression", "ONNX model regression checks (onnxslim-edge)")
    group.addoption(
        "--onnx-update-golden",
        action="store_true",
        default=False,
        help="rewrite the golden folders of onnx_regression checks from the current models",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_UPDATED] = []


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    updated = config.stash.get(_UPDATED, [])
    if updated:
        terminalreporter.write_sep("-", f"onnx-regression: rewrote {len(updated)} golden folder(s)")
        for path in updated:
            terminalreporter.write_line(f"  {path}")


class OnnxRegression:
    """What the `onnx_regression` fixture gives a test: `check(...)`."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._base = Path(request.node.path).parent
        self.update = bool(request.config.getoption("onnx_update_golden"))
        self._checks = 0

    def _path(self, value: str | os.PathLike) -> Path:
        path = Path(value)
        if path.is_absolute():
            return path
        beside = self._base / path
        return beside if beside.exists() else Path.cwd() / path

    def default_golden(self) -> Path:
        """`golden/<module>/<test name>` beside the test file (a counter after the first
        check of one test)."""
        node = self._request.node
        name = re.sub(r"[^\w.\-]+", "_", node.name).strip("_") or "test"
        if self._checks:
            name += f"-{self._checks}"
        return self._base / "golden" / Path(node.path).stem / name

    def check(
        self,
        model: Any,
        data: Any = None,
        *,
        golden: str | os.PathLike | None = None,
        budget: str | Mapping[str, Any] | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        floors: Mapping[str, float] | None = None,
        samples: int | None = None,
        latency_runs: int = 30,
    ) -> Any:
        """Compare `model` with its golden folder; fail the test on a regression.

        `data` (an `.npz`, a folder, feed dicts ...) is needed only to create or update
        the golden folder; the comparison uses the inputs stored there. Returns the
        `RegressResult` (None when the golden folder was just written)."""
        from onnxslim_edge.regress import regress, snapshot

        folder = self._path(golden) if golden is not None else self.default_golden()
        self._checks += 1
        if isinstance(model, (str, os.PathLike)):
            model = self._path(model)
        if isinstance(data, (str, os.PathLike)) and str(data) != "random":
            data = self._path(data)
        exists = folder.is_dir() and any(folder.iterdir())
        if self.update or not exists:
            if data is None:
                pytest.fail(
                    f"onnx_regression: {folder} does not exist yet; give data= to record it",
                    pytrace=False,
                )
            folder.parent.mkdir(parents=True, exist_ok=True)
            snapshot(model, data, folder, samples=samples, overwrite=True)
            if self.update:
                self._request.config.stash[_UPDATED].append(str(folder))
                return None
            pytest.fail(
                f"onnx_regression: golden folder {folder} did not exist; recorded it from "
                "the current model. Review and commit it, then re-run.",
                pytrace=False,
            )
        result = regress(
            model,
            folder,
            budget=budget,
            rtol=rtol,
            atol=atol,
            floors=floors,
            latency_runs=latency_runs,
        )
        if not result.passed:
            pytest.fail(
                result.to_text() + "\n(accept the change with pytest --onnx-update-golden)",
                pytrace=False,
            )
        return result


@pytest.fixture
def onnx_regression(request: pytest.FixtureRequest) -> OnnxRegression:
    """Check an ONNX model against its golden folder: `onnx_regression.check(model, data=...)`."""
    return OnnxRegression(request)
