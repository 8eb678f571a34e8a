"""The wheel: `passes/` ships as `onnxslim_edge.passes`, never as a top-level `passes`.

Builds the wheel from a copy of the source tree (so the shared checkout gets no
`build/` or `*.egg-info` litter, and a `build/` folder cannot shadow the `build`
package), then checks its contents and metadata, installs it into a bare folder and
imports it from there in a fresh interpreter whose working folder is not the repository.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Not needed to build the wheel; heavy (benchmarks) or build output of the checkout.
_IGNORE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "benchmarks",
    "*.egg-info",
    "__pycache__",
    ".hypothesis",
    ".pytest_cache",
    ".ruff_cache",
    ".venv*",
)


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel once for this module with the current interpreter's tools."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(REPO, src, ignore=_IGNORE)
    out = work / "dist"
    if importlib.util.find_spec("build") is not None:
        # setuptools >= 70.1 builds wheels itself: the `wheel` entry of build-system.requires
        # may legitimately be missing, so the dependency check is skipped.
        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation"]
        cmd += ["--skip-dependency-check", "--outdir", str(out), str(src)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
        cmd += ["--wheel-dir", str(out), str(src)]
    _run(cmd, cwd=work)
    wheels = sorted(out.glob("onnxslim_edge-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {[w.name for w in wheels]}"
    return wheels[0]


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def _dist_info_file(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        matches = [n for n in zf.namelist() if n.endswith(f".dist-info/{name}")]
        assert len(matches) == 1, f"{name} not found once in the wheel: {matches}"
        return zf.read(matches[0]).decode()


@pytest.mark.slow
def test_wheel_contains_every_module(wheel: Path) -> None:
    names = _names(wheel)
    expected = {
        "onnxslim_edge/passes/" + p.relative_to(REPO / "passes").as_posix()
        for p in (REPO / "passes").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    expected |= {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "onnxslim_edge").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    # Package data: the shipped recipes and spaces (`--space edge`), the demo assets.
    expected |= {
        p.relative_to(REPO).as_posix() for p in (REPO / "onnxslim_edge" / "recipes").glob("*.toml")
    }
    assert "onnxslim_edge/recipes/edge.space.toml" in expected
    assert "onnxslim_edge/passes/__init__.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"modules missing from {wheel.name}: {missing}"
    top_level = sorted(n for n in names if n.startswith("passes/"))
    assert not top_level, f"top-level passes/ in the wheel: {top_level}"
    assert {n.split("/", 1)[0] for n in names if "/" in n} == {
        "onnxslim_edge",
        wheel.name.split("-py")[0] + ".dist-info",
    }


@pytest.mark.slow
def test_wheel_metadata(wheel: Path) -> None:
    entry_points = configparser.ConfigParser()
    entry_points.read_string(_dist_info_file(wheel, "entry_points.txt"))
    assert entry_points["console_scripts"]["onnxslim-edge"].strip() == "onnxslim_edge.cli:main"
    top_level = _dist_info_file(wheel, "top_level.txt").split()
    assert top_level == ["onnxslim_edge"]


_PROBE = """
import importlib, json, sys
import onnxslim_edge.passes.cleanup as cleanup
result = {"cleanup": cleanup.__file__, "package": importlib.import_module("onnxslim_edge").__file__}
try:
    import passes
    result["passes"] = getattr(passes, "__file__", None) or list(passes.__path__)
except ImportError:
    result["passes"] = None
print(json.dumps(result))
"""


@pytest.mark.slow
def test_installed_wheel_imports_passes_only_under_package(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-compile",
            "--target",
            str(target),
            str(wheel),
        ],
        cwd=tmp_path,
    )
    assert (target / "onnxslim_edge" / "passes" / "cleanup.py").is_file()
    assert not (target / "passes").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(target)
    proc = _run([sys.executable, "-c", _PROBE], cwd=target, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The installed copy is imported, not the checkout's (editable) one.
    assert Path(result["package"]).resolve().is_relative_to(target.resolve()), result
    assert Path(result["cleanup"]).resolve().is_relative_to(target.resolve()), result
    assert result["passes"] is None, f"`import passes` should fail, found {result['passes']}"


@pytest.mark.slow
def test_license_is_an_spdx_expression(wheel: Path) -> None:
    """pyproject's `license` is the SPDX string (the table form is deprecated and stops
    building in 2027); setuptools >= 77 writes it as License-Expression."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert any(
        r.replace(" ", "").startswith("setuptools>=77") for r in project["build-system"]["requires"]
    )
    metadata = _dist_info_file(wheel, "METADATA")
    assert "License-Expression: Apache-2.0" in metadata.splitlines()


@pytest.mark.slow
def test_sdist_carries_the_pages_the_readme_links(tmp_path: Path) -> None:
    import re
    import tarfile

    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_IGNORE)
    (src / "benchmarks").mkdir()  # _IGNORE drops benchmarks/; its linked pages come back
    shutil.copy(REPO / "benchmarks" / "RESULTS.md", src / "benchmarks" / "RESULTS.md")
    shutil.copytree(REPO / "benchmarks" / "results", src / "benchmarks" / "results")
    out = tmp_path / "dist"
    if importlib.util.find_spec("build") is not None:
        cmd = [sys.executable, "-m", "build", "--sdist", "--no-isolation"]
        cmd += ["--skip-dependency-check", "--outdir", str(out), str(src)]
    else:
        pytest.skip("the `build` package (dev extra) builds the sdist")
    _run(cmd, cwd=tmp_path)
    [sdist] = out.glob("onnxslim_edge-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    readme = (REPO / "README.md").read_text()
    linked = set(re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", readme))
    assert {"docs/design.md", "benchmarks/RESULTS.md"} <= linked
    missing = sorted(p for p in linked if p not in names)
    assert not missing, f"linked from the README but not in {sdist.name}: {missing}"
    docs = {p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")}
    assert docs <= names
