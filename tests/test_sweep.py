"""Sweeps on Ray (onnxslim_edge/sweep/run.py) on the bundled digits CNN.

Each sweep starts a local Ray (2 CPUs, no dashboard) and must stop it: every test
checks that no raylet or gcs_server is left among this process's children.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="sweeps need the sweep extra (ray[tune])")
psutil = pytest.importorskip("psutil")

from onnxslim_edge.demo import DIGITS_MODEL, DIGITS_TEST  # noqa: E402
from onnxslim_edge.sweep.run import run_sweep  # noqa: E402
from onnxslim_edge.sweep.space import load_space  # noqa: E402

RAY_DAEMONS = ("raylet", "gcs_server")

# Two options: prune 10 % or 30 % of the MACs, with or without int8 after it.
GRID = """
target = "onnxruntime-cpu"

[[pass]]
name = "cleanup"

[[pass]]
name = "fold-batchnorm"

[[pass]]
name = "prune-channels"
macs_reduction = [0.1, 0.3]

[[pass]]
name = "quantize"
enabled = [false, true]
method = "minmax"

[objectives]
cost = ["size", "latency"]
fidelity = "top1_agreement"
latency_runs = 5

[constraints]
min_top1_agreement = 0.9
"""


def _ray_children() -> list[str]:
    names = []
    for child in psutil.Process().children(recursive=True):
        try:
            names.append(child.name())
        except psutil.Error:
            continue
    return [n for n in names if any(d in n for d in RAY_DAEMONS)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits CNN, calibration images (128) and evaluation images (the other 322)."""
    folder = tmp_path_factory.mktemp("digits")
    with np.load(DIGITS_TEST) as d:
        images, labels = d["image"], d["label"]
    np.savez(folder / "calib.npz", image=images[:128])
    np.savez(folder / "eval.npz", image=images[128:])
    np.save(folder / "eval_labels.npy", labels[128:])
    shutil.copy(DIGITS_MODEL, folder / "digits.onnx")
    return {
        "model": folder / "digits.onnx",
        "calib": folder / "calib.npz",
        "eval": folder / "eval.npz",
        "labels": folder / "eval_labels.npy",
        "folder": folder,
    }


@pytest.fixture(scope="module")
def grid_sweep(digits: dict[str, Path]) -> object:
    result = run_sweep(
        digits["model"],
        GRID,
        data=digits["calib"],
        eval_data=digits["eval"],
        out=digits["folder"] / "grid",
        workers=2,
    )
    assert _ray_children() == []
    return result


def _direct_metrics(recipe_path: Path, digits: dict[str, Path]) -> tuple[int, float]:
    """Size and top-1 agreement of a recipe run directly (no sweep, no Ray)."""
    from onnxslim_edge.data import open_data
    from onnxslim_edge.model import load_model, save_model
    from onnxslim_edge.pipeline import Context, Pipeline
    from onnxslim_edge.recipe import load_recipe
    from onnxslim_edge.verify import compare

    recipe = load_recipe(recipe_path)
    original = load_model(digits["model"])
    result = Pipeline(recipe.passes, target=recipe.target).run(
        original, Context(data=open_data(digits["calib"], original), target=recipe.target)
    )
    path = save_model(result.model, recipe_path.with_name("direct.onnx"))
    fidelity = compare(original, result.model, digits["eval"], batch_size=32)
    return path.stat().st_size, fidelity.top1_agreement


def test_grid_finds_the_best_point(grid_sweep: object, digits: dict[str, Path]) -> None:
    result = grid_sweep
    assert result.ran == 4 and result.resumed == 0
    assert len(result.trials) == 4 and all(t.ok for t in result.trials)
    # The known best point: every recipe run directly, the smallest meeting the floor.
    measured = {}
    for trial in result.trials:
        for name in ("recipe.toml", "report.json", "metrics.json", "model.onnx"):
            assert (trial.folder / name).is_file()
        size, top1 = _direct_metrics(trial.folder / "recipe.toml", digits)
        assert trial.metrics["size"] == size
        assert trial.metrics["top1_agreement"] == pytest.approx(top1)
        measured[trial.id] = (size, top1)
    feasible = [(s, -a, tid) for tid, (s, a) in measured.items() if a >= 0.9]
    assert feasible, "the floor should leave at least one trial"
    expected = min(feasible)[2]
    assert result.best is not None and result.best.id == expected
    # Not a trivial grid: some point misses the floor, and int8 shrinks the model.
    assert len(feasible) < 4
    best_point = result.best.point
    assert best_point["quantize.enabled"] is True


def test_trial_folders_and_ids(grid_sweep: object) -> None:
    result = grid_sweep
    ids = [t.id for t in result.trials]
    assert len(set(ids)) == 4
    for trial in result.trials:
        assert trial.folder.name == trial.id
        metrics = json.loads((trial.folder / "metrics.json").read_text())
        assert metrics["status"] == "ok"
        assert metrics["point"] == trial.point
        assert {"size", "size_ratio", "params", "macs", "top1_agreement", "cosine"} <= set(metrics)
        assert metrics["latency_ms"] > 0 and metrics["original_latency_ms"] > 0
        assert metrics["latency_ratio"] == pytest.approx(
            metrics["latency_ms"] / metrics["original_latency_ms"]
        )
        text = (trial.folder / "recipe.toml").read_text()
        assert "[verify]\nmin_top1_agreement = 0.9" in text


def test_latency_timings_never_overlap(grid_sweep: object) -> None:
    # Two trials ran at once, but the one latency_slot let one timing run at a time.
    windows = sorted(t.metrics["latency_window"] for t in grid_sweep.trials)
    assert len(windows) == 4
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert end <= start


def test_results_front_plot_and_best(grid_sweep: object) -> None:
    out = grid_sweep.out
    summary = json.loads((out / "results.json").read_text())
    rows = summary["rows"]
    assert [r["trial"] for r in rows][: len(summary["front"])] == summary["front"]
    assert summary["best"] == grid_sweep.best.id and summary["ran"] == 4
    feasible = [r for r in rows if r["meets_constraints"]]
    front = [r for r in rows if r["front"]]
    assert front and all(r["meets_constraints"] for r in front)
    # On the front: no feasible trial is at least as small and as faithful, and better.
    for r in front:
        s, a = r["metrics"]["size"], r["metrics"]["top1_agreement"]
        for o in feasible:
            os_, oa = o["metrics"]["size"], o["metrics"]["top1_agreement"]
            assert not (os_ <= s and oa >= a and (os_ < s or oa > a))
    misses = [r for r in rows if not r["meets_constraints"]]
    assert misses and all(r["misses"] for r in misses)
    table = (out / "results.md").read_text()
    assert table.count("| best |") == 1 and grid_sweep.best.id in table
    assert "misses top1_agreement" in table
    png = (out / "front.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    best = (out / "best.toml").read_text()
    assert (
        best.split("target = ", 1)[1]
        == (grid_sweep.best.folder / "recipe.toml").read_text().split("target = ", 1)[1]
    )


def test_best_toml_runs_with_optimize(grid_sweep: object, digits: dict[str, Path]) -> None:
    from onnxslim_edge.cli import main

    out = digits["folder"] / "best.onnx"
    rc = main(
        [
            "optimize",
            str(digits["model"]),
            "--recipe",
            str(grid_sweep.out / "best.toml"),
            "--calib",
            str(digits["calib"]),
            "-o",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    # The same recipe on the same data: the model the sweep measured, byte for byte.
    assert out.read_bytes() == (grid_sweep.best.folder / "model.onnx").read_bytes()


def test_resume_runs_no_trial_and_starts_no_ray(
    grid_sweep: object, digits: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("a resumed sweep with nothing to do must not start Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    before = {t.id: (t.folder / "metrics.json").stat().st_mtime_ns for t in grid_sweep.trials}
    again = run_sweep(
        digits["model"],
        GRID,
        data=digits["calib"],
        eval_data=digits["eval"],
        out=digits["folder"] / "grid",
        workers=2,
    )
    assert again.ran == 0 and again.resumed == 4
    assert again.best is not None and again.best.id == grid_sweep.best.id
    after = {t.id: (t.folder / "metrics.json").stat().st_mtime_ns for t in again.trials}
    assert after == before


def test_resume_runs_only_unfinished_trials(grid_sweep: object, digits: dict[str, Path]) -> None:
    out = digits["folder"] / "grid_partial"
    shutil.copytree(digits["folder"] / "grid", out)
    victim = sorted((out / "trials").iterdir())[0]
    (victim / "metrics.json").unlink()  # as if interrupted before the trial finished
    again = run_sweep(
        digits["model"],
        GRID,
        data=digits["calib"],
        eval_data=digits["eval"],
        out=out,
        workers=2,
    )
    assert again.ran == 1 and again.resumed == 3
    assert (victim / "metrics.json").is_file()
    assert _ray_children() == []


FAILING = """
target = "onnxruntime-cpu"

[[pass]]
name = "quantize"
method = "minmax"
calibration_cache = ["cache.json", "/no/such/folder/cache.json"]

[constraints]
min_accuracy = 0.5

[metrics]
custom = ["accuracy"]
"""


def test_failing_trial_is_recorded_and_the_sweep_goes_on(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    labels = np.load(digits["labels"])
    images = np.load(digits["eval"])["image"]
    crash = tmp_path / "crash"
    crash.touch()

    def accuracy(candidate: object, original: object) -> dict[str, float]:
        import os

        from onnxslim_edge.runtime import make_session

        if crash.exists():
            os._exit(3)  # the worker dies, as under Ray's out-of-memory killer
        scores = make_session(candidate).run(None, {"image": images})[0]
        return {"accuracy": float(np.mean(np.argmax(scores, axis=1) == labels))}

    space = load_space(FAILING.replace("cache.json", str(tmp_path / "cache.json"), 1))

    def sweep() -> object:
        result = run_sweep(
            digits["model"],
            space,
            data=digits["calib"],
            eval_data=digits["eval"],
            out=tmp_path / "sweep",
            workers=2,
            metrics_callback=accuracy,
        )
        assert _ray_children() == []
        return result

    first = sweep()
    assert first.ran == 2 and not any(t.ok for t in first.trials)
    by_error = {t.metrics["error"]: t for t in first.trials}
    bad = by_error["ConfigError"]  # the recipe's fault: recorded for good
    record = json.loads((bad.folder / "metrics.json").read_text())
    assert record["status"] == "failed" and "retry" not in record
    assert "/no/such/folder" in record["reason"]
    assert (bad.folder / "recipe.toml").is_file()
    (died,) = (t for t in first.trials if t is not bad)
    record = json.loads((died.folder / "metrics.json").read_text())
    assert record["status"] == "failed" and record["retry"] is True
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "failed: " in table and "/no/such/folder" in table
    assert first.best is None and not (tmp_path / "sweep" / "best.toml").exists()

    crash.unlink()
    again = sweep()  # the worker that died runs again; the recipe that failed does not
    assert again.ran == 1 and again.resumed == 1
    ok = next(t for t in again.trials if t.ok)
    assert ok.id == died.id
    # The callback's metric is in metrics.json and decides the constraint.
    assert 0.5 < ok.metrics["accuracy"] <= 1.0
    assert again.best is not None and again.best.id == ok.id


OPTUNA = """
target = "onnxruntime-cpu"

[[pass]]
name = "prune-channels"
macs_reduction = { low = 0.05, high = 0.4 }

[[pass]]
name = "quantize"
method = ["minmax", "percentile", "entropy"]
"""


def test_optuna_with_a_seed_gives_the_same_trials(digits: dict[str, Path], tmp_path: Path) -> None:
    def sweep(out: Path, seed: int, trials: int) -> object:
        result = run_sweep(
            digits["model"],
            OPTUNA,
            data=digits["calib"],
            eval_data=digits["eval"],
            out=out,
            search="optuna",
            trials=trials,
            seed=seed,
            workers=2,
        )
        assert _ray_children() == []
        return result

    first = sweep(tmp_path / "a", 7, 4)
    points = [t.point for t in first.trials]
    assert first.ran == 4 and len(points) == 4
    ranges = [p["prune-channels.macs_reduction"] for p in points]
    assert all(0.05 <= r <= 0.4 for r in ranges) and len(set(ranges)) == 4
    # The same seed suggests the same trials: all found finished, none run again.
    again = sweep(tmp_path / "a", 7, 4)
    assert again.ran == 0 and again.resumed == 4
    assert [t.point for t in again.trials] == points
    # Another seed, other points.
    other = sweep(tmp_path / "c", 8, 2)
    assert other.ran == 2 and [t.point for t in other.trials] != points[:2]


def _ray_daemons(folder: Path | None = None) -> set[int]:
    """Ray's daemons; with `folder`, only those started from inside it (local Ray starts
    from the sweep's output folder: other Ray users on the machine do not count)."""
    pids = set()
    for proc in psutil.process_iter(["name"]):
        if any(d in (proc.info["name"] or "") for d in RAY_DAEMONS):
            try:
                cwd = Path(proc.cwd())
            except (psutil.Error, OSError):
                continue
            if folder is None or cwd == folder or folder in cwd.parents:
                pids.add(proc.pid)
    return pids


def test_cli_from_the_repository_root_with_the_shipped_space(digits: dict[str, Path]) -> None:
    """The console script run in the checkout's root, where the source folder
    `onnxslim_edge/` (without `passes`) could shadow the install in Ray's workers."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    exe = shutil.which("onnxslim-edge", path=str(Path(sys.executable).parent))
    assert exe is not None
    out = digits["folder"] / "cli"
    argv = [exe, "sweep", str(digits["model"]), "--space", "edge", "--data", str(digits["calib"])]
    argv += ["--eval", str(digits["eval"]), "-o", str(out), "--workers", "2"]
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("[1/24] ") and lines[23].startswith("[24/24] ")
    assert "24 trials (24 run, 0 done before, 0 failed)" in proc.stdout
    summary = json.loads((out / "results.json").read_text())
    assert all(r["status"] == "ok" for r in summary["rows"])  # workers imported the install
    assert summary["best"] is not None and (out / "best.toml").is_file()
    assert _ray_daemons(out.resolve()) == set()  # the CLI's Ray is gone with it
    again = subprocess.run([*argv, "-q"], cwd=root, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == ""
    assert json.loads((out / "results.json").read_text())["ran"] == 0


_HEAD = """
import sys, ray
ctx = ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
               object_store_memory=100 * 2**20)
print(ctx.address_info["gcs_address"], flush=True)
sys.stdin.read()
ray.shutdown()
"""


_DRIVER = """
import json, sys
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.sweep import run_sweep

address, model, calib, evaluation, out, timed, untimed = sys.argv[1:]
kwargs = {"data": calib, "eval_data": evaluation, "address": address}
try:
    run_sweep(model, timed, out=out + "/timed", **kwargs)
    refused = None
except ConfigError as exc:
    refused = str(exc)
result = run_sweep(model, untimed, out=out + "/ok", **kwargs)
print(json.dumps({"refused": refused, "ran": result.ran, "ok": [t.ok for t in result.trials]}))
"""


def test_address_runs_on_an_existing_cluster(digits: dict[str, Path], tmp_path: Path) -> None:
    """A Ray started by another process (without a latency_slot), used through address.

    Both ends run in child processes with Ray's token authentication off (it keeps a
    driver's own local cluster to itself): Ray reads that setting once per process.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [sys.executable, "-c", _HEAD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        address = head.stdout.readline().strip()
        assert address, "the head process did not start Ray"
        untimed = 'target = "onnxruntime-cpu"\n[[pass]]\nname = "quantize"\nmethod = ["minmax"]\n'
        argv = [address, digits["model"], digits["calib"], digits["eval"], tmp_path, GRID, untimed]
        proc = subprocess.run(
            [sys.executable, "-c", _DRIVER, *map(str, argv)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        head.stdin.close()
        head.wait(timeout=60)
    # GRID asks for latency, which needs a latency_slot: refused, and no folder left.
    assert "no 'latency_slot' resource" in report["refused"]
    assert not (tmp_path / "timed").exists()
    assert report["ran"] == 1 and report["ok"] == [True]
    assert _ray_daemons(tmp_path.resolve()) == set()  # the cluster's processes went with it
