"""snapshot / regress: the golden folder, each budget breaking when it should and not
otherwise, fidelity criteria, exit codes, and the Polygraphy replay by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from fixtures.tiny_models import W1, W2, mlp

from onnxslim_edge.cli import main
from onnxslim_edge.errors import ConfigError, DataError
from onnxslim_edge.model import save_model
from onnxslim_edge.regress import Limit, load_golden, parse_budget, regress, snapshot

RNG = np.random.default_rng(1)


@pytest.fixture
def golden(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(model path, data path, golden folder)."""
    model = save_model(mlp(), tmp_path / "model.onnx")
    data = tmp_path / "inputs.npz"
    np.savez(data, x=RNG.standard_normal((6, 4)).astype(np.float32))
    snapshot(model, data, tmp_path / "golden")
    return model, data, tmp_path / "golden"


def _save(tmp_path: Path, model: onnx.ModelProto, name: str = "candidate.onnx") -> Path:
    return save_model(model, tmp_path / name)


def test_snapshot_writes_the_golden_folder(golden: tuple[Path, Path, Path]) -> None:
    model, _, folder = golden
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["model.onnx", "inputs.json", "outputs.json", "signature.json"]
    )
    assert (folder / "model.onnx").read_bytes() == model.read_bytes()
    sig = json.loads((folder / "signature.json").read_text())
    assert sig["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 4]}]
    assert sig["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["N", 3]}]
    assert sig["ops"] == {"MatMul": 2, "Relu": 1}
    assert (sig["nodes"], sig["params"], sig["samples"], sig["batches"]) == (
        3,
        4 * 16 + 16 * 3,
        6,
        6,
    )
    assert sig["macs"] == 4 * 16 + 16 + 16 * 3  # per sample (N counts 1)
    assert sig["latency"] is None and sig["synthetic"] is False
    g = load_golden(folder)
    x = np.load(folder.parent / "inputs.npz")["x"]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in g.inputs]), x)
    expected = np.maximum(x @ W1, 0) @ W2
    got = np.concatenate([o["y"] for o in g.outputs])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_snapshot_latency_records_the_machine(tmp_path: Path, golden: tuple) -> None:
    model, data, _ = golden
    snap = snapshot(model, data, tmp_path / "g2", latency_runs=3)
    lat = snap.signature["latency"]
    assert lat["runs"] == 3 and lat["median_ms"] > 0
    assert lat["machine"]["cores"] >= 1 and lat["machine"]["onnxruntime"]


def test_unchanged_model_passes_every_budget(golden: tuple) -> None:
    model, _, folder = golden
    result = regress(model, folder, budget="size=0,params=0,macs=0,nodes=+0,latency=+300%")
    assert result.passed, result.to_text()
    assert [c.key for c in result.changes] == ["nodes", "params", "size", "macs", "latency"]
    assert all(c.delta == 0 for c in result.changes[:4])
    assert result.fidelity.outputs["y"].max_abs_error == 0
    assert "OK: no regression" in result.to_text()


def test_one_extra_node_breaks_nodes_budget_only(tmp_path: Path, golden: tuple) -> None:
    _, _, folder = golden
    cand = _save(tmp_path, mlp(extra_identity=True))
    broken = regress(cand, folder, budget="nodes=+0")
    assert not broken.passed
    assert broken.problems == ["nodes +1 (+33.3%) exceeds budget +0"]
    assert broken.ops == {"Identity": (0, 1)}
    text = broken.to_text()
    assert "BROKEN" in text and "Identity 0 -> 1" in text
    assert regress(cand, folder, budget="nodes=+1").passed
    assert regress(cand, folder).passed  # no budget: reported, not judged


def test_three_percent_larger_breaks_size_two_percent(tmp_path: Path, golden: tuple) -> None:
    model, _, folder = golden
    size = model.stat().st_size
    padded = next(  # an unused initializer making the file 2.5-3.5 % larger
        m
        for n in range(4, 64, 4)
        if 0.025 < (m := mlp(padding_bytes=n)).ByteSize() / size - 1 < 0.035
    )
    cand = _save(tmp_path, padded)
    result = regress(cand, folder, budget="size=+2%")
    change = next(c for c in result.changes if c.key == "size")
    assert 2.5 < change.percent < 3.5, change.percent
    assert not result.passed and result.problems[0].startswith("size +")
    assert regress(cand, folder, budget="size=+5%").passed
    assert regress(cand, folder, budget="nodes=+0,macs=0").passed


def test_more_macs_break_macs_budget(tmp_path: Path, golden: tuple) -> None:
    _, _, folder = golden
    w1 = np.concatenate([W1, np.zeros((4, 8), np.float32)], axis=1)  # 8 dead units
    w2 = np.concatenate([W2, np.zeros((8, 3), np.float32)], axis=0)
    cand = _save(tmp_path, mlp(w1=w1, w2=w2))
    result = regress(cand, folder, budget="macs=0")
    assert [p.split(" ")[0] for p in result.problems] == ["macs"]
    assert result.fidelity.passed  # same function, more work
    assert regress(cand, folder, budget="macs=+50%").passed


def test_different_outputs_fail_tolerance_and_floors_judge_lossy(
    tmp_path: Path, golden: tuple
) -> None:
    _, _, folder = golden
    noisy = W2 + RNG.standard_normal(W2.shape).astype(np.float32) * 0.01
    cand = _save(tmp_path, mlp(w2=noisy))
    strict = regress(cand, folder)
    assert not strict.passed and strict.problems[0].startswith("outputs: output 'y': max abs err")
    lossy = regress(cand, folder, floors={"min_cosine": 0.99, "min_sqnr_db": 20})
    assert lossy.passed, lossy.to_text()
    cos = lossy.fidelity.outputs["y"].cosine
    too_high = regress(cand, folder, floors={"min_cosine": 0.9999999})
    assert too_high.problems == [f"outputs: output 'y': cosine {cos:.6g} < floor 0.9999999"]
    both = regress(cand, folder, floors={"min_cosine": 0.99}, rtol=1e-5)
    assert not both.passed  # explicit rtol/atol apply next to the floors


def test_interface_change_is_a_regression(tmp_path: Path, golden: tuple) -> None:
    _, _, folder = golden
    cand = _save(tmp_path, mlp(output="logits"))
    result = regress(cand, folder)
    assert "interface: output 'y' removed" in result.problems
    assert "interface: output 'logits' added" in result.problems
    assert "output 'y' is missing from the candidate" in result.to_text()


def test_latency_budget_is_judged_side_by_side(tmp_path: Path, golden: tuple) -> None:
    _, _, folder = golden
    slow = _save(tmp_path, mlp(chain=24))  # same outputs, ~3M MACs more per sample
    result = regress(slow, folder, budget="latency=+10%", latency_runs=5)
    assert result.fidelity.passed
    assert result.latency["ratio"] > 3, result.latency
    assert any(p.startswith("latency x") for p in result.problems)
    assert "timed side by side in this run" in result.to_text()


def test_parse_budget() -> None:
    assert parse_budget("size=+2%,macs=0,nodes=+0,latency=+10%") == {
        "size": Limit(value=2, percent=True),
        "macs": Limit(value=0, percent=False),
        "nodes": Limit(value=0, percent=False),
        "latency": Limit(value=10, percent=True),
    }
    assert parse_budget(" params = -5% ") == {"params": Limit(value=-5, percent=True)}
    assert Limit(value=2, percent=True).allowed(100) == pytest.approx(102)
    for bad, message in [
        ("size=+2", None),
        ("speed=+2%", "budget: unknown key 'speed'; valid: nodes, params, size, macs, latency"),
        ("size=lots", "budget: size=lots: expected a number with an optional sign and %, e.g. +2% or 0"),
        ("size", "budget: 'size': expected KEY=LIMIT, e.g. size=+2%"),
        ("latency=+3", "budget: latency=+3: give a percentage (e.g. +10%); latency is judged as a side-by-side ratio, never in absolute time"),
        ("size=+1%,size=+2%", "budget: 'size' given twice"),
        ("size=-100%", "budget: size=-100%: a figure cannot shrink by 100% or more"),
        ("", "budget: empty; expected KEY=LIMIT[,KEY=LIMIT...]"),
    ]:  # fmt: skip
        if message is None:
            assert parse_budget(bad)["size"] == Limit(value=2, percent=False)
            continue
        with pytest.raises(ConfigError) as err:
            parse_budget(bad)
        assert str(err.value) == message


def test_cli_round_trip_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _save(tmp_path, mlp(), "model.onnx")
    data = tmp_path / "in.npz"
    np.savez(data, x=RNG.standard_normal((3, 4)).astype(np.float32))
    golden_dir = tmp_path / "golden"
    assert main(["snapshot", str(model), "--data", str(data), "-o", str(golden_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    # an existing golden folder is not replaced without --overwrite
    assert main(["snapshot", str(model), "--data", str(data), "-o", str(golden_dir)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["regress", str(model), str(golden_dir), "--budget", "nodes=+0"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK: no regression")
    cand = _save(tmp_path, mlp(extra_identity=True))
    assert main(["regress", str(cand), str(golden_dir), "--budget", "nodes=+0", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] is False and out["problems"] == ["nodes +1 (+33.3%) exceeds budget +0"]
    assert out["changes"][0] == {
        "key": "nodes", "golden": 3.0, "candidate": 4.0, "delta": 1.0,
        "percent": pytest.approx(100 / 3), "budget": "+0", "broken": True,
    }  # fmt: skip
    noisy = _save(tmp_path, mlp(w2=W2 * 1.01), "noisy.onnx")
    assert main(["regress", str(noisy), str(golden_dir)]) == 1
    assert main(["regress", str(noisy), str(golden_dir), "--min-cosine", "0.999"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget", "size=2x"], "budget: size=2x: expected a number"),
        (["--budget", "bogus=1"], "budget: unknown key 'bogus'"),
        (["--rtol", "-1"], "rtol and atol must be finite and >= 0"),
        (["--min-cosine", "nan"], "fidelity floors must be finite numbers (got min_cosine=nan)"),
        (["--latency-runs", "0"], "latency_runs must be >= 1, not 0"),
    ],
)
def test_cli_bad_options_exit_2(
    golden: tuple, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _, folder = golden
    assert main(["regress", str(model), str(folder), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_bad_golden_folders_exit_2(
    tmp_path: Path, golden: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _, folder = golden
    assert main(["regress", str(model), str(tmp_path / "nowhere")]) == 2
    assert "golden folder not found" in capsys.readouterr().err
    (folder / "outputs.json").rename(tmp_path / "outputs.json")
    assert main(["regress", str(model), str(folder)]) == 2
    assert "missing outputs.json; not a golden folder" in capsys.readouterr().err
    (tmp_path / "outputs.json").write_text("{not json")
    (tmp_path / "outputs.json").rename(folder / "outputs.json")
    with pytest.raises(DataError, match=r"outputs.json: malformed"):
        load_golden(folder)
    save_model(mlp(extra_identity=True), folder / "model.onnx")
    with pytest.raises(DataError, match=r"does not match the SHA-256 in signature\.json"):
        load_golden(folder)


def test_snapshot_failure_leaves_nothing(
    tmp_path: Path, golden: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data, _ = golden
    import onnxslim_edge.polygraphy_io

    def boom(outputs: object, path: Path, **kwargs: object) -> None:
        Path(path).write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnxslim_edge.polygraphy_io, "save_run_results", boom)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError, match="disk full"):
        snapshot(model, data, tmp_path / "g3")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((1, 4), np.float32))
    with pytest.raises(DataError, match="array 'image' is not an input of the model"):
        snapshot(model, wrong, tmp_path / "g4")
    assert not (tmp_path / "g4").exists()


def test_polygraphy_replays_the_golden_folder_by_hand(tmp_path: Path, golden: tuple) -> None:
    """The exact command of docs/regression.md, through the polygraphy CLI."""
    model, _, folder = golden
    polygraphy = Path(sys.executable).parent / "polygraphy"
    cmd = [str(polygraphy), "run", str(model), "--onnxrt"]
    cmd += ["--load-inputs", str(folder / "inputs.json")]
    cmd += ["--load-outputs", str(folder / "outputs.json")]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Passed: 6/6 iterations" in ok.stdout + ok.stderr
    other = _save(tmp_path, mlp(w2=W2 * 1.1))
    cmd[2] = str(other)
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert "FAILED" in bad.stdout + bad.stderr


def test_snapshot_and_regress_never_import_torch(tmp_path: Path) -> None:
    """Polygraphy's own JSON (de)serializers import torch wherever it is installed; ours don't."""
    save_model(mlp(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((2, 4), np.float32))
    code = (
        "import sys, onnxruntime, polygraphy.backend.onnxrt\n"
        "before = 'torch' in sys.modules  # a training flavor's onnxruntime may bring it\n"
        "from onnxslim_edge.regress import regress, snapshot\n"
        "snapshot('m.onnx', 'd.npz', 'g')\n"
        "assert regress('m.onnx', 'g').passed\n"
        "print('torch' in sys.modules and not before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_polygraphy_json_refuses_pickles_and_garbage(tmp_path: Path) -> None:
    import base64
    import io

    from onnxslim_edge.polygraphy_io import load_inputs, load_run_results, save_inputs

    feeds = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"x": np.zeros((1, 3), np.int64)}]
    save_inputs(feeds, tmp_path / "in.json")
    back = load_inputs(tmp_path / "in.json")
    assert [f["x"].dtype for f in back] == [np.float32, np.int64]
    np.testing.assert_array_equal(back[0]["x"], feeds[0]["x"])
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pickled = {"array": base64.b64encode(buf.getvalue()).decode(), "polygraphy_class": "ndarray"}
    (tmp_path / "pickle.json").write_text(json.dumps([{"x": pickled}]))
    with pytest.raises(
        DataError, match=r"pickle\.json: malformed \(Object arrays cannot be loaded"
    ):
        load_inputs(tmp_path / "pickle.json")
    (tmp_path / "dict.json").write_text('{"x": 1}')
    with pytest.raises(DataError, match=r"dict\.json: malformed \(expected a list of feed dicts\)"):
        load_inputs(tmp_path / "dict.json")
    with pytest.raises(DataError, match=r"not a Polygraphy RunResults file"):
        load_run_results(tmp_path / "in.json")
