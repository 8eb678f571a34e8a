"""benchmarks/sweep.py renders its committed results as committed (the Markdown is the JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import sweep

_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.mark.parametrize("model", sweep.MODELS)
def test_committed_markdown_is_rendered_from_the_json(model: str) -> None:
    results = json.loads((_RESULTS / f"sweep_{model}.json").read_text(encoding="utf-8"))
    assert (_RESULTS / f"sweep_{model}.md").read_text(encoding="utf-8") == sweep.render(results)
    runs = {r["workers"]: r for r in results["runs"]}
    assert runs[1]["speedup"] == 1.0
    assert runs[2]["speedup"] == pytest.approx(
        runs[1]["wall_time_s"] / runs[2]["wall_time_s"], abs=0.01
    )
    best = [r for r in results["rows"] if r["best"]]
    assert len(best) == 1 and best[0]["meets_constraints"] and best[0]["front"]


def test_the_benchmark_space_parses() -> None:
    from onnxslim_edge.sweep import load_space

    space = load_space(sweep.EFFICIENTNET_SPACE)
    assert len(space.grid()) == 8
