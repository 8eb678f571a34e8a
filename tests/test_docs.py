"""Documentation runs: the README's and docs' Python blocks execute as written."""

from __future__ import annotations

import re
import shutil
import sys
import types
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def test_writing_a_pass_runs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _python_blocks(ROOT / "docs" / "writing-a-pass.md")
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("docs_example")  # dataclasses look their module up
    monkeypatch.setitem(sys.modules, "docs_example", module)
    for block in blocks:
        exec(compile(block, "writing-a-pass.md", "exec"), module.__dict__)


def test_readme_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxslim_edge.demo import DIGITS_MODEL

    blocks = _python_blocks(ROOT / "README.md")
    assert len(blocks) >= 2
    shutil.copy(DIGITS_MODEL, tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "model.slim.onnx").is_file()
    from onnxslim_edge.data import open_data

    calib = open_data(tmp_path / "calib.npz", onnx.load(tmp_path / "model.onnx"))
    assert calib.num_samples == 256 and not calib.is_synthetic


def test_lowrank_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxslim_edge.demo import DIGITS_MODEL

    blocks = _python_blocks(ROOT / "docs" / "lowrank.md")
    assert len(blocks) == 1
    shutil.copy(DIGITS_MODEL, tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "lowrank.md", "exec"), {"__name__": "docs_lowrank"})
    assert (tmp_path / "model.lowrank.onnx").is_file()


def test_sweep_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray", reason="the sweep page needs the sweep extra")
    blocks = _python_blocks(ROOT / "docs" / "sweep.md")
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs_sweep"}
    exec(compile(blocks[0], "sweep.md", "exec"), namespace)
    result = namespace["result"]
    assert len(result.trials) == 2 and all(t.ok for t in result.trials)
    assert all(0.5 < t.metrics["accuracy"] <= 1 for t in result.trials)
    assert (tmp_path / "sweep" / "results.md").is_file()


def test_readme_set_up_is_two_commands_and_pip_is_prose() -> None:
    """The set-up block holds exactly the two script commands; a plain pip install is
    offered beside it (not as a third set-up command), and the test run's duration is said."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert commands == ["bash scripts/demo", "bash scripts/test"]
    prose = re.sub(r"```.*?```", "", section, flags=re.S)
    assert 'pip install ".[cpu]"' in prose
    assert re.search(r"scripts/test` takes about \d+[–-]\d+ minutes on 2\s+cores", prose)


def test_docs_advertise_only_passes_that_exist() -> None:
    """The README's pass table, design.md's registry list and the package description
    name registered passes only, and the table lists every built-in one."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    from onnxslim_edge.pipeline import available_passes, get_pass

    passes = set(available_passes())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Passes", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M))
    assert listed == passes
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    registry = design.split("- **Registry**: passes are found by name", 1)[1].split(")", 1)[0]
    assert set(re.findall(r"`([a-z0-9-]+)`", registry)) <= passes
    for name in listed:
        assert get_pass(name).__doc__, name
    description = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    words = {"prune": "prune-channels", "quantize": "quantize", "low-rank": "lowrank"}
    words["distill"] = "distill"
    for word, name in words.items():
        assert word not in description or name in passes, (word, description)
