"""The benchmark harness end to end on the digits CNN (quick mode), plus its failure paths."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import harness, report, scaling
from benchmarks import methods as bench_methods
from benchmarks import run as bench_run

_HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    written, skipped = bench_run.run(
        ["digits"], tmp / "results", quick=True, runs=3, md=tmp / "RESULTS.md", plots=_HAS_MPL
    )
    assert skipped == {}
    data = json.loads(written["digits"].read_text(encoding="utf-8"))
    return data, tmp


@pytest.mark.slow
def test_every_method_has_every_metric(digits_run: tuple[dict, Path]) -> None:
    data, _ = digits_run
    methods = data["methods"]
    assert list(methods) == bench_methods.method_names("digits")
    assert "ours-int8-ort" in methods and "ours-int8-trt" in methods
    assert not any(name.startswith("ours-prune") for name in methods)  # not run on digits
    assert set(bench_methods.method_names()) - set(methods) == {
        "ours-prune20",
        "ours-prune30",
        "ours-prune50",
        "ours-prune20-r16",
        "ours-prune30-r16",
        "ours-prune50-r16",
        "ours-int8-ort-fallback",
        "ours-int8-ort-entropy-kf",
    }
    assert "ours-int8-ort-bc" in methods
    for name, e in methods.items():
        spec = next(m for m in bench_methods.METHODS if m.name == name)
        if any(importlib.util.find_spec(mod.partition(".")[0]) is None for mod in spec.requires):
            assert e["status"] == "unavailable", name
            assert "not installed" in e["error"]
            continue
        assert e["status"] == "ok", (name, e["error"])
        cost = e["cost"]
        assert cost["size_bytes"] > 0 and cost["nodes"] > 0 and cost["macs"] > 0
        assert cost["weights"] > 0
        for batch in ("batch_1", "batch_8"):
            lat = e["latency"][batch]
            assert lat["runs"] == 3
            assert 0 < lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"]
            assert e["latency_ratio"][batch] > 0
        assert e["latency"]["batch_8"]["shape"] == {"image": [8, 1, 8, 8]}
        assert 0.0 <= e["fidelity"]["accuracy"] <= 1.0
        assert 0.0 <= e["fidelity"]["accuracy_full_test"] <= 1.0
        out = e["verify"]["outputs"]["logits"]
        assert set(out) == {"cosine", "sqnr_db", "max_abs_error", "top1_agreement", "kl_divergence"}
        assert e["verify"]["samples"] == 450 - 32  # the held-out part of the test split
        if name == "fp32":
            assert e["optimize"] is None
            assert e["latency_ratio"] == {"batch_1": 1.0, "batch_8": 1.0}
        else:
            opt = e["optimize"]
            assert opt["wall_s"] > 0
            assert opt["peak_rss_mb"] >= opt["rss_before_mb"] > 10


@pytest.mark.slow
def test_numbers_are_plausible(digits_run: tuple[dict, Path]) -> None:
    data, _ = digits_run
    m = data["methods"]
    base = m["fp32"]
    assert base["fidelity"]["accuracy"] > 0.97
    assert base["verify"]["equal"] is True
    assert base["verify"]["outputs"]["logits"]["max_abs_error"] == 0.0
    assert m["ours-lossless"]["kind"] == "lossless"
    lossless = [n for n, e in m.items() if e["tool"] == "onnxslim-edge" and e["kind"] == "lossless"]
    for name in lossless:
        assert m[name]["verify"]["equal"] is True
        assert m[name]["fidelity"]["accuracy"] == base["fidelity"]["accuracy"]
        assert m[name]["cost"]["nodes"] < base["cost"]["nodes"]  # BN folded into the convs
    for name, e in m.items():
        if e["kind"] == "quantize" and e["status"] == "ok":
            assert e["cost"]["size_bytes"] < 0.6 * base["cost"]["size_bytes"]
            assert e["verify"]["equal"] is False  # int8 is not exact, but close
            assert e["verify"]["outputs"]["logits"]["cosine"] > 0.99, name
    env = data["environment"]
    assert env["onnxruntime"] and env["cpu"] and env["date"]
    assert data["settings"]["quick"] is True and data["data"]["calibration_samples"] == 32


@pytest.mark.slow
def test_results_md_renders(digits_run: tuple[dict, Path]) -> None:
    data, tmp = digits_run
    text = (tmp / "RESULTS.md").read_text(encoding="utf-8")
    assert "## Digits CNN" in text
    assert "## How measured" in text
    commit = data["environment"]["git_commit"]
    if commit:
        assert f"commit `{commit}" in text
    for name, e in data["methods"].items():
        if e["status"] == "ok":
            assert f"| `{name}` |" in text
        else:
            assert f"- `{name}` ({e['label']}): {e['status']}" in text
    if _HAS_MPL:
        for png in ("size_vs_fidelity.png", "latency_vs_fidelity.png"):
            assert (tmp / "results" / png).read_bytes()[:4] == b"\x89PNG"
        assert "](results/size_vs_fidelity.png)" in text


def test_failed_method_is_a_result_not_a_crash(tmp_path: Path) -> None:
    """A method that raises in its child comes back as status failed with the reason."""
    result = harness.run_in_child("benchmarks.scaling:build_stack", (tmp_path / "m.onnx", "cnn", 1))
    assert result["status"] == "failed"
    assert "unknown family 'cnn'" in result["error"]
    assert not (tmp_path / "m.onnx").exists()


def test_report_lists_failures_and_ratios(tmp_path: Path) -> None:
    lat = {"median_ms": 2.0, "p10_ms": 1.5, "p90_ms": 2.5, "runs": 30, "shape": {"x": [1, 4]}}
    ok = {
        "status": "ok",
        "cost": {"size_bytes": 2048, "params": 10, "weights": 10, "macs": 100, "nodes": 4},
        "latency": {"batch_1": lat, "batch_8": lat},
        "latency_ratio": {"batch_1": 1.0, "batch_8": 1.0},
        "fidelity": {"accuracy": 0.5},
        "verify": {
            "equal": True,
            "outputs": {"y": {"cosine": 1.0, "sqnr_db": None, "max_abs_error": 0.0}},
        },
        "optimize": {"wall_s": 2.0, "peak_rss_mb": 200.0, "rss_before_mb": 50.0},
    }
    ours = json.loads(json.dumps(ok)) | {
        "tool": "onnxslim-edge",
        "kind": "lossless",
        "label": "ours",
    }
    ours["cost"]["nodes"] = 3
    ours["optimize"]["wall_s"] = 1.0
    result = {
        "model": "toy",
        "title": "Toy model",
        "source": "made up",
        "primary": "accuracy",
        "primary_label": "accuracy",
        "data": {"notes": "none"},
        "environment": {"git_commit": "abc1234", "git_dirty": False},
        "settings": {"runs": 30, "warmup": 5, "threads": 2, "quick": False},
        "methods": {
            "fp32": ok | {"tool": "fp32", "kind": "baseline", "label": "fp32", "optimize": None},
            "ours-lossless": ours,
            "onnxslim": ok | {"tool": "onnxslim", "kind": "lossless", "label": "slim"},
            "onnxsim": {
                "status": "failed",
                "error": "ValueError: boom",
                "tool": "onnxsim",
                "kind": "lossless",
                "label": "sim",
            },
        },
    }
    (tmp_path / "toy.json").write_text(json.dumps(result), encoding="utf-8")
    md = report.write_report(tmp_path, tmp_path / "RESULTS.md", plots=False)
    text = md.read_text(encoding="utf-8")
    assert "- `onnxsim` (sim): failed: ValueError: boom" in text
    assert "measured on commit `abc1234`" in text
    # ours / best peer (onnxslim): nodes 3/4, time 1/2
    row = next(
        line for line in text.splitlines() if line.startswith("| `ours-lossless` / `onnxslim`")
    )
    assert row.split(" | ")[1:3] == ["0.75x", "1.00x"]
    assert "| 0.50x |" in row


def _toy_entry(tool: str, kind: str, macs: int, b1: float, b8: float, fid: float) -> dict:
    def lat(ms: float) -> dict:
        return {"median_ms": ms, "p10_ms": ms, "p90_ms": ms, "runs": 30, "shape": {"x": [1]}}

    return {
        "status": "ok",
        "tool": tool,
        "kind": kind,
        "label": tool,
        "params": {},
        "cost": {"size_bytes": 100, "params": macs // 10, "weights": 10, "macs": macs, "nodes": 4},
        "latency": {"batch_1": lat(b1), "batch_8": lat(b8)},
        "latency_ratio": {"batch_1": b1 / 2.0, "batch_8": b8 / 16.0},
        "fidelity": {"top1_agreement": fid},
        "verify": {"equal": False, "samples": 1, "outputs": {}},
        "optimize": {"wall_s": 1.0, "peak_rss_mb": 100.0, "rss_before_mb": 50.0},
        "notes": {"target": "onnxruntime-cpu"} if tool == "onnxslim-edge" else {},
    }


def test_issue_sections_ratio_and_missed_targets() -> None:
    """Pruning: latency saved / MACs removed against the lossless recipe; int8: verdicts
    say by how much a target is missed."""
    prune = _toy_entry("onnxslim-edge", "prune", 70, 1.7, 14.0, 0.5)
    prune["params"] = {"macs_reduction": 0.3}
    ours_q = _toy_entry("onnxslim-edge", "quantize", 100, 1.0, 12.0, 0.93)
    ort_q = _toy_entry("onnxruntime", "quantize", 100, 1.2, 8.0, 0.90)
    ort_q["optimize"] = {"wall_s": 4.0, "peak_rss_mb": 80.0, "rss_before_mb": 50.0}
    result = {
        "model": "efficientnet_lite0",
        "title": "Toy",
        "source": "made up",
        "primary": "top1_agreement",
        "primary_label": "top-1 agreement",
        "data": {"notes": "none", "calibration_samples": 32},
        "methods": {
            "fp32": _toy_entry("fp32", "baseline", 110, 2.0, 16.0, 1.0) | {"optimize": None},
            "ours-lossless": _toy_entry("onnxslim-edge", "lossless", 100, 2.0, 16.0, 1.0),
            "ours-prune30": prune,
            "ours-int8-ort": ours_q,
            "ours-int8-ort-minmax": ours_q,
            "ort-minmax-u8": ort_q,
        },
    }
    text = report.render([result], None)
    row = next(line for line in text.splitlines() if line.startswith("| `ours-prune30` |"))
    # MACs 100 -> 70 (30 %), b1 2.0 -> 1.7 ms (15 %): ratio 0.5; b8 16 -> 14 (12.5 %): 0.42
    assert row.split(" | ")[1:8] == [
        "30.0 %",
        "30.0 %",
        "30.0 %",
        "15.0 %",
        "0.50",
        "12.5 %",
        "0.42",
    ]
    assert (
        "top-1 agreement >= 0.95: 0.9300 (`ours-int8-ort`) - missed by 0.02; ORT's best 0.9000"
        in text
    )
    assert "b1 latency <= ORT's fastest: ours `ours-int8-ort` 1.00 ms" in text
    assert (
        "b8 latency <= ORT's fastest: ours `ours-int8-ort` 12.00 ms, ORT `ort-minmax-u8` "
        "8.00 ms - missed: 1.50x ORT's time"
    ) in text
    assert (
        ">= 1.5x faster than fp32 at b8 (`ours-int8-ort`, top-1 agreement 0.9300): 1.33x - "
        "missed by 0.167x"
    ) in text
    assert "time 1.0 s vs 4.0 s (met), peak RSS 100 vs 80 MB (missed: 1.25x)" in text


def test_feeds_round_trip_with_different_shapes(tmp_path: Path) -> None:
    feeds = [{"x": np.ones((1, 3, 48, w), np.float32) * w} for w in (96, 320, 192)]
    harness.save_feeds(feeds, tmp_path / "f.npz")
    back = harness.load_feeds(tmp_path / "f.npz")
    assert [f["x"].shape[3] for f in back] == [96, 320, 192]
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(feeds, back))


def test_size_ladder() -> None:
    assert scaling.size_ladder(2.2) == [
        1 << 20,
        8 << 20,
        64 << 20,
        256 << 20,
        1 << 30,
        int(2.2 * (1 << 30)),
    ]
    assert scaling.size_ladder(0.5) == [1 << 20, 8 << 20, 64 << 20, 256 << 20, 512 << 20]
    assert scaling.size_ladder(1 / 1024) == [1 << 20]


@pytest.mark.parametrize("family", scaling.FAMILIES)
def test_synthetic_stack_runs_and_matches_numpy_size(tmp_path: Path, family: str) -> None:
    import onnx

    from onnxslim_edge.runtime import make_session

    info = scaling.build_stack(tmp_path / "m.onnx", family, 1 << 20)
    model = onnx.load(str(tmp_path / "m.onnx"))
    weights = sum(math.prod(t.dims) for t in model.graph.initializer)
    assert abs(weights * 4 - (1 << 20)) < 0.6 * (1 << 20)
    assert info["nodes"] == len(model.graph.node) and not info["external_data"]
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if family == "table":  # indices into the table
        x = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
        (y,) = make_session(model).run(None, {"x": x})
        assert y.shape == (*shape, 1024) and (y >= 0).all()
        return
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    (y,) = make_session(model).run(None, {"x": x})
    assert y.shape == x.shape and np.isfinite(y).all()


def test_table_over_the_protobuf_limit_is_written_as_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    import onnxslim_edge.model as model_mod
    from onnxslim_edge.model import load_model

    monkeypatch.setattr(model_mod, "PROTOBUF_LIMIT", 1 << 20)  # 2 GB's path at 4 MB
    info = scaling.build_stack(tmp_path / "m.onnx", "table", 4 << 20)
    assert info["external_data"] and (tmp_path / "m.onnx.data").stat().st_size == 4 << 20
    model = load_model(tmp_path / "m.onnx")
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).shape == (1024, 1024)
