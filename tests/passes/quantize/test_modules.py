"""The modules of `passes/quantize/`: no import cycle, even through function-level imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import onnxslim_edge.passes.quantize as package

PACKAGE = "onnxslim_edge.passes.quantize"
ROOT = Path(package.__file__).parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def _imports(path: Path) -> set[str]:
    """Modules of this package `path` imports anywhere (module level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, f"{path.name}: relative import"
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE:
                found.add("__init__")
            elif name.startswith(PACKAGE + "."):
                found.add(name[len(PACKAGE) + 1 :].split(".")[0])
    return {m for m in found if m in MODULES} - {path.stem}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*stack, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycle_among_quantize_modules():
    graph = {m: _imports(ROOT / f"{m}.py") for m in MODULES}
    assert "qdq" in graph and "sensitivity" in graph and "quantizer" in graph
    assert "qdq" not in graph["sensitivity"] and "sensitivity" in graph["qdq"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_detection_sees_function_level_imports(tmp_path):
    """The cycle this test was written for: qdq and sensitivity imported each other
    inside functions."""
    (tmp_path / "sensitivity.py").write_text(
        f"def rank():\n    from {PACKAGE}.qdq import Quantizer, _name_nodes\n"
    )
    (tmp_path / "qdq.py").write_text(
        f"import {PACKAGE}\ndef run():\n    from {PACKAGE} import sensitivity\n"
    )
    graph = {m: _imports(tmp_path / f"{m}.py") for m in ("qdq", "sensitivity")}
    assert graph == {"qdq": {"__init__", "sensitivity"}, "sensitivity": {"qdq"}}
    assert _cycle(graph) == ["qdq", "sensitivity", "qdq"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", MODULES)
def test_every_module_opens_with_a_docstring(name: str):
    doc = ast.get_docstring(ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8")))
    assert doc and len(doc.split()) > 15, f"{name}.py: no docstring saying what it owns"
