"""Sweep spaces (onnxslim_edge/sweep/space.py): parsing, grids, errors, recipes as TOML.

No Ray needed: a space is parsed and checked before any trial runs.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

from onnxslim_edge.errors import ConfigError
from onnxslim_edge.recipe import load_recipe
from onnxslim_edge.sweep.space import dump_toml, load_space, trial_id

SPACE = """
target = "onnxruntime-cpu"

[[pass]]
name = "cleanup"

[[pass]]
name = "prune-channels"
enabled = [false, true]
macs_reduction = [0.2, 0.4]

[[pass]]
name = "quantize"
method = { choices = ["minmax", "percentile"] }
min_top1_agreement = { low = 0.9, high = 0.99, step = 0.03 }

[objectives]
cost = ["size", "latency"]
fidelity = "cosine"
latency_runs = 7

[constraints]
min_top1_agreement = 0.95
max_latency_ratio = 1.5
"""


def test_space_parses_axes_objectives_constraints() -> None:
    space = load_space(SPACE)
    assert [a.key for a in space.axes] == [
        "prune-channels.enabled",
        "prune-channels.macs_reduction",
        "quantize.method",
        "quantize.min_top1_agreement",
    ]
    assert space.target == "onnxruntime-cpu"
    assert space.cost == ("size", "latency_ms")  # `latency` is short for latency_ms
    assert space.fidelity == "cosine"
    assert space.latency_runs == 7
    assert space.needs_latency
    assert space.axes[3].grid_values() == (0.9, 0.93, 0.96, 0.99)
    # Only constraints a recipe's [verify] knows go into the recipes.
    assert space.floors() == {"min_top1_agreement": 0.95}


def test_grid_runs_each_distinct_recipe_once() -> None:
    space = load_space(SPACE)
    points = space.grid()
    # 2 x 2 x 2 x 4 = 32 points; without the pruning pass its macs_reduction does not
    # matter, so those 8 + 8 points collapse to 8: 24 distinct recipes.
    assert len(points) == 24
    recipes = [space.recipe(p) for p in points]
    assert len({trial_id(r) for r in recipes}) == 24
    dropped = [r for r in recipes if all(p["name"] != "prune-channels" for p in r["pass"])]
    assert len(dropped) == 8
    assert all(r["verify"] == {"min_top1_agreement": 0.95} for r in recipes)


def test_recipe_toml_round_trips_through_load_recipe() -> None:
    space = load_space(SPACE)
    point = space.grid()[-1]
    text = dump_toml(space.recipe(point), header=["a trial"])
    assert text.startswith("# a trial\n")
    recipe = load_recipe(text)
    assert [p.name for p in recipe.passes] == ["cleanup", "prune-channels", "quantize"]
    assert recipe.passes[1].config.macs_reduction == 0.4
    assert recipe.passes[2].config.method == "percentile"
    assert recipe.passes[2].config.min_top1_agreement == 0.99
    assert recipe.target == "onnxruntime-cpu"
    assert recipe.floors == {"min_top1_agreement": 0.95}


def test_trial_id_depends_on_recipe_and_inputs() -> None:
    space = load_space(SPACE)
    a, b = (space.recipe(p) for p in space.grid()[:2])
    assert trial_id(a) == trial_id(dict(a))
    assert trial_id(a) != trial_id(b)
    assert trial_id(a, {"model": "x"}) != trial_id(a, {"model": "y"})


def test_num_and_log_ranges_and_integers() -> None:
    space = load_space(
        """
[[pass]]
name = "prune-channels"
ratio = { low = 0.1, high = 0.4, num = 4 }
round_to = { low = 2, high = 8, num = 3, log = true }
min_channels = { low = 1, high = 4, step = 2 }
"""
    )
    ratio, round_to, min_channels = space.axes
    assert ratio.grid_values() == (0.1, 0.2, 0.3, 0.4)
    assert round_to.grid_values() == (2, 4, 8)
    assert min_channels.grid_values() == (1, 3)


def test_continuous_range_needs_step_for_a_grid() -> None:
    space = load_space('[[pass]]\nname = "prune-channels"\nratio = { low = 0.1, high = 0.4 }\n')
    with pytest.raises(ConfigError, match=r"needs 'step' or 'num' for a grid"):
        space.grid()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[[pass]]\nname = "quantize"\nmethod = ["minmax", "nope"]\n', "quantize.method"),
        ('[[pass]]\nname = "quantize"\nbogus = [1, 2]\n', "bogus"),
        ('[[pass]]\nname = "no-such-pass"\n', "no-such-pass"),
        ('[[pass]]\nname = "quantize"\nmethod = []\n', "empty list"),
        ('[[pass]]\nname = "quantize"\n[constraints]\nmin_speed = 2\n', "unknown metric 'speed'"),
        ('[[pass]]\nname = "quantize"\n[constraints]\ntop1 = 0.9\n', "min_<metric>"),
        ('[[pass]]\nname = "quantize"\n[objectives]\nfidelity = "size"\n', "higher is better"),
        ('[[pass]]\nname = "quantize"\n[objectives]\nspeed = 1\n', "unknown \\[objectives\\]"),
        ('[[pass]]\nname = "cleanup"\nenabled = ["yes"]\n', "true, false"),
        ('[[pass]]\nname = "prune-channels"\nratio = { low = 0.5, high = 0.1 }\n', "low <= high"),
        ('[[pass]]\nname = "prune-channels"\nratio = { low = 0.1, high = 0.5, by = 1 }\n', "by"),
        ("target = 3\n[[pass]]\nname = 'cleanup'\n", "target must be a string"),
        ("seed = 3\n[[pass]]\nname = 'cleanup'\n", "unknown key"),
        ("target = 'onnxruntime-cpu'\n", "no \\[\\[pass\\]\\]"),
        ("[[pass]\nname = 'x'\n", "not valid TOML"),
    ],
)
def test_bad_spaces_are_one_line_config_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_space(text)
    assert "\n" not in str(info.value)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="space file not found"):
        load_space(tmp_path / "nope.toml")


def test_custom_metrics_are_declared() -> None:
    text = '[[pass]]\nname = "cleanup"\n[objectives]\nfidelity = "accuracy"\n'
    with pytest.raises(ConfigError, match="unknown metric 'accuracy'"):
        load_space(text)
    space = load_space(text + '[metrics]\ncustom = ["accuracy"]\n')
    assert space.fidelity == "accuracy"
    assert space.misses({"accuracy": 0.5}) == []


def test_misses_reads_min_and_max_constraints() -> None:
    space = load_space(SPACE)
    ok = {"status": "ok", "top1_agreement": 0.97, "latency_ratio": 0.8}
    assert space.misses(ok) == []
    bad = {"status": "ok", "top1_agreement": 0.9, "latency_ratio": 2.0}
    assert space.misses(bad) == ["top1_agreement 0.9 < 0.95", "latency_ratio 2 > 1.5"]
    assert space.misses({"status": "failed"}) == [
        "top1_agreement not measured",
        "latency_ratio not measured",
    ]


def test_shipped_edge_space_parses() -> None:
    space = load_space(Path(str(files("onnxslim_edge") / "recipes" / "edge.space.toml")))
    assert len(space.grid()) == 24  # pruning off or at 3 reductions x 3 methods x 2 floors
    assert space.target == "onnxruntime-cpu"
    assert space.constraints == {"min_top1_agreement": 0.95}


# --------------------------------------------------------------------------- the CLI's bad input


@pytest.fixture
def cli_inputs(tmp_path: Path) -> dict[str, Path]:
    import shutil

    import numpy as np

    from onnxslim_edge.demo import DIGITS_MODEL

    shutil.copy(DIGITS_MODEL, tmp_path / "m.onnx")
    np.savez(tmp_path / "eval.npz", image=np.zeros((4, 1, 8, 8), np.float32))
    (tmp_path / "space.toml").write_text(
        '[[pass]]\nname = "prune-channels"\nratio = { low = 0.1, high = 0.3 }\n'
    )
    (tmp_path / "bad.toml").write_text('[[pass]]\nname = "quantize"\nmethod = ["nope"]\n')
    return {"model": tmp_path / "m.onnx", "eval": tmp_path / "eval.npz", "folder": tmp_path}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--space", "{folder}/bad.toml"], "quantize.method"),
        (["--space", "{folder}/nope.toml"], "space file not found"),
        (["--space", "{folder}/space.toml"], "needs 'step' or 'num' for a grid"),
        (["--space", "edge", "--trials", "3"], "--trials is for --search optuna"),
        (["--space", "edge", "--workers", "0"], "--workers"),
        (["--space", "edge", "--search", "random"], "--search"),
        (["--space", "edge", "--data", "{folder}/missing.npz"], "missing.npz"),
    ],
)
def test_sweep_cli_bad_input_exits_2_without_output(
    cli_inputs: dict[str, Path], args: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnxslim_edge.cli import main

    out = cli_inputs["folder"] / "sweep"
    argv = ["sweep", str(cli_inputs["model"]), "--eval", str(cli_inputs["eval"]), "-o", str(out)]
    argv += [a.format(folder=cli_inputs["folder"]) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err
    assert not out.exists()


def test_importing_the_sweep_package_imports_no_ray() -> None:
    import subprocess
    import sys

    code = (
        "import sys, onnxslim_edge.sweep as s; assert callable(s.run_sweep); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'optuna', 'matplotlib')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
