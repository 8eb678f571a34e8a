"""The CLI on bad calibration/evaluation numbers: exit 2, one error line, no output file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.cli import main
from onnxslim_edge.model import save_model


def _model() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = save_model(_model(), tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32)
    nan, inf = x.copy(), x.copy()
    nan[:] = np.nan  # all-NaN calibration data
    inf[4, 0, 0, 0] = np.inf
    np.savez(tmp_path / "nan.npz", x=nan)
    np.savez(tmp_path / "inf.npz", x=inf)
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3, 8, 8), np.float32))
    (tmp_path / "images").mkdir()
    return {
        "model": model,
        "out": tmp_path / "out.onnx",
        "nan": tmp_path / "nan.npz",
        "inf": tmp_path / "inf.npz",
        "empty": tmp_path / "empty.npz",
        "images": tmp_path / "images",
    }


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["optimize", "{model}", "-o", "{out}", "--pass", "quantize", "--calib", "{nan}", "-q"],
            "{nan}: array 'x' holds NaN at sample 0 (counting from 0); calibration and "
            "evaluation data must be finite",
        ),
        (
            ["optimize", "{model}", "-o", "{out}", "--pass", "quantize", "--calib", "{inf}", "-q"],
            "{inf}: array 'x' holds infinity at sample 4 (counting from 0); calibration and "
            "evaluation data must be finite",
        ),
        (
            ["verify", "{model}", "{model}", "--data", "{inf}"],
            "{inf}: array 'x' holds infinity at sample 4 (counting from 0); calibration and "
            "evaluation data must be finite",
        ),
        (["verify", "{model}", "{model}", "--data", "{empty}"], "{empty}: holds no samples"),
        (
            ["optimize", "{model}", "-o", "{out}", "--pass", "quantize", "--calib", "{empty}"],
            "{empty}: holds no samples",
        ),
        (
            ["verify", "{model}", "{model}", "--data", "{images}", "--preprocess", "8x8,mean=nan"],
            "preprocess: mean=nan|nan|nan is not finite",
        ),
        (
            ["verify", "{model}", "{model}", "--data", "{images}", "--preprocess", "8x8,std=inf"],
            "preprocess: std=inf|inf|inf is not finite",
        ),
        (
            ["verify", "{model}", "{model}", "--data", "{images}", "--preprocess", "8x8,std=0"],
            "preprocess: std must not be 0",
        ),
    ],
)
def test_bad_numbers_exit_2_with_one_line_and_no_output(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], argv: list[str], line: str
) -> None:
    names = {k: str(v) for k, v in files.items()}
    before = sorted(os.listdir(files["model"].parent))
    model_bytes = files["model"].read_bytes()
    assert main([a.format(**names) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.strip()]
    assert lines == ["onnxslim-edge: error: " + line.format(**names)]
    assert captured.out == ""
    assert sorted(os.listdir(files["model"].parent)) == before, "no output file may be left"
    assert files["model"].read_bytes() == model_bytes


def test_seed_reaches_random_calibration(
    files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    outs = {}
    for seed in (0, 7, 7):
        out = files["out"].with_name(f"q{seed}.onnx")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            argv = ["optimize", str(files["model"]), "-o", str(out), "--pass", "quantize"]
            argv += ["--calib", "random", "--seed", str(seed), "-q"]
            assert main(argv) == 0
        warnings = [
            r.getMessage() for r in caplog.records if "random (synthetic)" in r.getMessage()
        ]
        assert warnings and all(f"seed {seed};" in w for w in warnings), warnings
        outs.setdefault(seed, []).append(out.read_bytes())
    assert outs[0][0] != outs[7][0]  # other calibration data, other scales
    assert outs[7][0] == outs[7][1]  # the same seed, the same model


def test_verify_names_the_seed_of_random_data(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(files["model"])
    assert main(["verify", model, model, "--data", "random", "--seed", "7", "--json"]) == 0
    assert "random data (seed 7)" in capsys.readouterr().out
