"""Tests for the repository's `benchmarks/` folder (real models, real data).

pytest imports this folder as the package `benchmarks` (tests/ is on `sys.path`, and
tests/conftest.py takes the repository root off it), which hides the repository's own
`benchmarks/` package. So that `from benchmarks.models import ...` still finds the
repository's modules, that folder is added to this package's search path.
"""

from pathlib import Path

_REPO_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if _REPO_BENCHMARKS.is_dir() and str(_REPO_BENCHMARKS) not in __path__:
    __path__.append(str(_REPO_BENCHMARKS))
