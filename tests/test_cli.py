"""The `onnxslim-edge` command: every subcommand end to end, exit codes, no partial output."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from fixtures.models import conv_bn_model
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.cli import main
from onnxslim_edge.model import save_model

DIGITS = Path(__file__).resolve().parents[1] / "onnxslim_edge" / "assets" / "digits_cnn.onnx"
DIGITS_DATA = DIGITS.with_name("digits_test.npz")


def _conv_bn_model() -> onnx.ModelProto:
    return conv_bn_model(4)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save_model(_conv_bn_model(), tmp_path / "m.onnx")


def _only_line_of(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    return lines[0]


def test_inspect_json(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(model_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"params", "size_bytes", "macs", "nodes", "ops", "inputs", "outputs"} <= set(info)
    assert info["nodes"] == 4
    assert info["ops"] == {"Conv": 1, "BatchNormalization": 1, "Identity": 1, "Relu": 1}
    assert info["params"] == 4 * 3 * 3 * 3 + 4 * 4
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 3, 8, 8]}]
    assert info["outputs"][0]["name"] == "y"
    assert info["macs"] >= 4 * 8 * 8 * 27  # the conv alone, batch 1
    assert info["size_bytes"] > 0


def test_inspect_text(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "Conv 1" in out and "input" in out and "macs" in out


def test_optimize_then_verify(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    rc = main(
        [
            "optimize",
            str(model_path),
            "-o",
            str(out),
            "--pass",
            "cleanup",
            "--pass",
            "fold-batchnorm",
            "--report",
            str(report),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "before" in text and "fold-batchnorm" in text
    optimized = onnx.load(str(out))
    assert [n.op_type for n in optimized.graph.node] == ["Conv", "Relu"]
    assert optimized.ir_version <= 10
    data = json.loads(report.read_text())
    assert [p["name"] for p in data["passes"]] == ["cleanup", "fold-batchnorm"]
    assert data["cost_after"]["nodes"] == 2
    assert main(["verify", str(model_path), str(out)]) == 0
    assert "PASS" in capsys.readouterr().out


def test_verify_detects_a_difference(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _conv_bn_model()
    w = numpy_helper.to_array(model.graph.initializer[0]) * 1.01
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "w"))
    other = save_model(model, tmp_path / "other.onnx")
    assert main(["verify", str(model_path), str(other), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is False
    assert main(["verify", str(model_path), str(other), "--rtol", "0.5", "--atol", "0.5"]) == 0


def test_verify_with_data_file(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(3).standard_normal((5, 3, 8, 8)).astype(np.float32))
    assert main(["verify", str(model_path), str(model_path), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 5


def test_shipped_recipes_by_name(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "-o", str(out), "--recipe", "lossless", "-q"]) == 0
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Conv", "Relu"]
    argv = ["optimize", str(DIGITS), "-o", str(out), "--recipe", "edge", "--report"]
    argv += [str(tmp_path / "r.json"), "--calib", str(DIGITS_DATA), "-q"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [p["name"] for p in report["passes"]] == [
        "cleanup",
        "fold-batchnorm",
        "cleanup",
        "quantize",
    ]
    assert report["fidelity"]["floors"] == {"min_top1_agreement": 0.99}
    with pytest.raises(SystemExit):
        main(["optimize", "--help"])
    assert "shipped recipe (demo, edge, lossless)" in " ".join(capsys.readouterr().out.split())


def test_recipe_by_path(model_path: Path, tmp_path: Path) -> None:
    recipe = Path(__file__).resolve().parents[1] / "onnxslim_edge" / "recipes" / "lossless.toml"
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "-o", str(out), "--recipe", str(recipe), "-q"]) == 0
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Conv", "Relu"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["optimize", "{missing}", "-o", "{out}", "--pass", "cleanup"], "model file not found"),
        (["optimize", "{corrupt}", "-o", "{out}", "--pass", "cleanup"], "not an ONNX model"),
        (["optimize", "{model}", "-o", "{out}", "--pass", "nope"], "unknown pass 'nope'"),
        (
            ["optimize", "{model}", "-o", "{out}", "--pass", "cleanup:bogus=1"],
            "unknown option(s) bogus; valid:",
        ),
        (
            ["optimize", "{model}", "-o", "{out}", "--pass", "cleanup:fold_constants=maybe"],
            "expected true/false",
        ),
        (["optimize", "{model}", "-o", "{out}"], "give --recipe FILE or at least one --pass"),
        (["optimize", "{model}", "-o", "{out}", "--recipe", "{missing}"], "recipe file not found"),
        (
            ["optimize", "{model}", "-o", "{out}", "--recipe", "nope"],
            "unknown recipe 'nope'; shipped: demo, edge, lossless (or give a .toml file's path)",
        ),
        (
            ["optimize", "{model}", "-o", "{out}", "--pass", "cleanup", "--calib", "{baddata}"],
            "bad.npz",
        ),
        (
            ["optimize", "{model}", "-o", "{model}", "--pass", "cleanup"],
            "refusing to overwrite the input",
        ),
        (
            ["optimize", "{model}", "-o", "{out}", "--pass", "cleanup", "--target", "gpu"],
            "invalid choice",
        ),
        (
            [
                "optimize",
                "{model}",
                "-o",
                "{out}",
                "--pass",
                "cleanup",
                "--report",
                "{missing}/r.json",
            ],
            "report folder does not exist",
        ),
        (["verify", "{model}", "{corrupt}"], "not an ONNX model"),
        (["verify", "{model}", "{model}", "--data", "{missing}"], "not found"),
        (["inspect", "{corrupt}"], "not an ONNX model"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(
    model_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    fragment: str,
) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    baddata = tmp_path / "bad.npz"
    np.savez(baddata, x=np.zeros((2, 3, 5, 5), np.float32))  # wrong spatial size
    names = {
        "missing": tmp_path / "missing.onnx",
        "corrupt": corrupt,
        "model": model_path,
        "out": tmp_path / "out.onnx",
        "baddata": baddata,
    }
    before = sorted(os.listdir(tmp_path))
    model_bytes = model_path.read_bytes()
    rc = main([a.format(**{k: str(v) for k, v in names.items()}) for a in argv])
    assert rc == 2
    line = _only_line_of(capsys.readouterr().err)
    assert line.startswith("onnxslim-edge: error:") and fragment in line
    assert sorted(os.listdir(tmp_path)) == before, "no output or temporary file may be left"
    assert model_path.read_bytes() == model_bytes


def test_passes_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "cleanup  (lossless)" in out and "fold_size_limit" in out and "fold-batchnorm" in out
    # each pass: its whole first sentence (several lines of the docstring), never cut
    heads = {}
    for block in re.split(r"\n(?=\S)", out.strip()):  # one block per pass
        head = re.split(r"\n    \w+ = ", block)[0]  # the lines before the first option
        heads[block.split(":")[0].split()[0]] = " ".join(head.split())
    assert heads["fold-batchnorm"].endswith("that cannot itself be folded.")
    assert heads["bias-correct"].endswith("is created when missing).")
    assert heads["quantize"] == (
        "quantize: Float Conv/ConvTranspose/Gemm/MatMul -> int8 weights + Q/DQ'd activations."
    )
    assert all(t.endswith(".") for t in heads.values()), heads
    # each option: default, allowed values, and its meaning on the next line(s)
    assert "    method = percentile  [minmax | percentile | entropy | mse]\n        how" in out
    assert "    per_channel = true  [true | false]\n        one weight scale" in out
    assert "    exclude_ops = (empty)  [list of text: a|b|c]\n        op types left" in out
    assert "    max_samples = 256  [integer or none]\n        use at most" in out
    lines = out.splitlines()
    undocumented = [
        ln.strip()
        for ln, nxt in zip(lines, [*lines[1:], ""])
        if re.match(r"    \w+ = ", ln) and not nxt.startswith(" " * 8)
    ]
    assert undocumented == [], "every built-in option has a meaning in its Config docstring"


def test_top_level_help_ends_in_a_whole_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Compress ONNX models for edge devices" in text and not text.endswith(":")
    assert text.endswith("3 an internal error (a bug; -v shows the traceback).")


def test_console_script_is_installed(model_path: Path) -> None:
    exe = shutil.which("onnxslim-edge", path=str(Path(sys.executable).parent))
    assert exe, "the onnxslim-edge entry point is not installed in this environment"
    proc = subprocess.run(
        [exe, "inspect", str(model_path), "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["nodes"] == 4
    proc = subprocess.run(
        [exe, "inspect", str(model_path) + ".missing"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_lint_float_model_and_nm(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lint", str(model_path)]) == 0
    assert "no violations" in capsys.readouterr().out
    assert main(["lint", str(model_path), "--nm", "2:4"]) == 0, "Cin=3 can never hold 2:4"
    out = capsys.readouterr().out
    assert "n/a" in out and "not applicable: reduction dim Cin=3 is not divisible by 4" in out
    assert out.rstrip().endswith("0 of 0 layers follow 2:4 sparsity; 1 not applicable (run dense)")
    # the digits CNN: a Cin=1 stem (not applicable) and six dense layers that could be 2:4
    assert main(["lint", str(DIGITS), "--nm", "2:4", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is False
    assert [(r["applicable"], r["ok"]) for r in result["nm"]] == [(False, False)] + [
        (True, False)
    ] * 6
    sparse = tmp_path / "sparse.onnx"
    assert main(["optimize", str(DIGITS), "-o", str(sparse), "--pass", "sparsify-nm", "-q"]) == 0
    assert main(["lint", str(sparse), "--nm", "2:4"]) == 0
    out = capsys.readouterr().out
    assert "not applicable: reduction dim Cin=1 is not divisible by 4" in out
    assert out.rstrip().endswith("6 of 6 layers follow 2:4 sparsity; 1 not applicable (run dense)")
    assert main(["lint", str(model_path), "--nm", "4:2"]) == 2


def test_lint_flags_uint8_qdq(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("zp", TensorProto.UINT8, [], [128]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    path = save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "q.onnx"
    )
    assert main(["lint", str(path)]) == 1
    out = capsys.readouterr().out
    assert "non-int8" in out and "zero-point-nonzero" in out


def test_fold_quantize_bias_correct_on_the_digits_cnn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fold-batchnorm renames the residual Conv's output to the BN's; bias-correct exposes
    it, which ONNX Runtime's layout rewrites used to fuse away ("Failed to find node
    output ... BatchNormalization_output_0", exit 2)."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=np.load(DIGITS_DATA)["image"][:64])
    out = tmp_path / "x.onnx"
    argv = ["optimize", str(DIGITS), "-o", str(out), "--calib", str(calib), "-q"]
    argv += ["--pass", "fold-batchnorm", "--pass", "quantize:exclude_ops=Add"]
    argv += ["--pass", "bias-correct", "--report", str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert capsys.readouterr().out == "", "-q: nothing, not ONNX Runtime's EP Error banner"
    report = json.loads((tmp_path / "r.json").read_text())
    bias = next(p for p in report["passes"] if p["name"] == "bias-correct")
    assert bias["counters"]["layers_corrected"] >= 5 and not bias["skips"]
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "BatchNormalization" not in ops and "DequantizeLinear" in ops


def _crash(*args: object, **kwargs: object) -> None:
    raise ZeroDivisionError("boom")


def test_internal_error_exits_3_with_one_line(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from onnxslim_edge.passes.batchnorm import FoldBatchNorm

    monkeypatch.setattr(FoldBatchNorm, "run", _crash)
    out = tmp_path / "out.onnx"
    argv = ["optimize", str(model_path), "-o", str(out), "--pass", "fold-batchnorm"]
    assert main(argv) == 3
    line = _only_line_of(capsys.readouterr().err)
    assert line.startswith("onnxslim-edge: internal error:") and "boom" in line
    assert "-v" in line and not out.exists()
    assert main(["-v", *argv]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: boom" in err
    missing = ["optimize", str(tmp_path / "missing.onnx"), "-o", str(out), "--pass", "cleanup"]
    assert main(["-v", *missing]) == 2
    assert "internal error" not in capsys.readouterr().err, "bad input stays exit 2"


def _digits_int8(tmp_path: Path) -> tuple[Path, Path]:
    """The digits CNN quantized (lossy: element-wise verify fails) and its images."""
    calib = tmp_path / "images.npz"
    np.savez(calib, image=np.load(DIGITS_DATA)["image"][:64])
    q = tmp_path / "q.onnx"
    argv = ["optimize", str(DIGITS), "-o", str(q), "--calib", str(calib), "-q"]
    assert main([*argv, "--pass", "fold-batchnorm", "--pass", "quantize"]) == 0
    return q, calib


def test_verify_fidelity_floors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q, calib = _digits_int8(tmp_path)
    base = ["verify", str(DIGITS), str(q), "--data", str(calib)]
    assert main(base) == 1, "int8 differs element-wise"
    capsys.readouterr()
    assert (
        main([*base, "--min-cosine", "0.99", "--min-sqnr", "15", "--min-top1-agreement", "0.9"])
        == 0
    )
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("floor ")]
    assert [ln.split(":")[0] for ln in lines] == [
        "floor cosine >= 0.99",
        "floor SQNR >= 15",
        "floor top-1 agreement >= 0.9",
    ]
    assert all(": ok (worst " in ln for ln in lines) and out.rstrip().endswith("PASS")
    assert main([*base, "--min-cosine", "0.99", "--min-sqnr", "200"]) == 1
    out = capsys.readouterr().out
    assert "floor cosine >= 0.99: ok" in out and "floor SQNR >= 200: FAIL" in out
    assert "FAIL: output 'logits': SQNR" in out
    assert main([*base, "--min-cosine", "0.99", "--rtol", "1e-5"]) == 1, "both judge"
    capsys.readouterr()
    assert main([*base, "--min-top1-agreement", "0.9", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is True and result["floors"] == {"min_top1_agreement": 0.9}
    assert result["floors_missed"] == [] and result["elementwise"] is False
    assert main([*base, "--min-cosine", "nan"]) == 2
    assert "finite numbers (got min_cosine=nan)" in _only_line_of(capsys.readouterr().err)


def test_readme_quantize_for_onnxruntime_cpu_then_lint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: `optimize ... --target onnxruntime-cpu` then `lint q.onnx --target
    onnxruntime-cpu` passes; TensorRT's rules (the default) still flag its uint8 Q/DQ."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=np.load(DIGITS_DATA)["image"][:64])
    q = tmp_path / "q.onnx"
    argv = ["optimize", str(DIGITS), "-o", str(q), "--pass", "cleanup", "--pass"]
    argv += ["fold-batchnorm", "--pass", "quantize:method=percentile", "--calib", str(calib)]
    assert main([*argv, "--target", "onnxruntime-cpu", "-q"]) == 0
    assert main(["lint", str(q), "--target", "onnxruntime-cpu"]) == 0
    assert "ONNX Runtime CPU Q/DQ rules: no violations" in capsys.readouterr().out
    assert main(["lint", str(q)]) == 1
    assert "TensorRT needs int8" in capsys.readouterr().out


def test_the_bundled_test_set_serves_as_calib(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """digits_test.npz holds `image` and `label`; `label` is left out (with a note,
    tests/test_data.py)."""
    out = tmp_path / "q.onnx"
    argv = ["optimize", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_DATA), "-q"]
    assert main([*argv, "--pass", "quantize"]) == 0, "was: array 'label' is not an input"
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "QuantizeLinear" in ops
    assert main(["verify", str(DIGITS), str(out), "--data", str(DIGITS_DATA)]) == 1
    assert "450 sample(s)" in capsys.readouterr().out


def test_verify_json_stays_json_when_the_candidate_cannot_load(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ONNX Runtime prints an "EP Error" banner on stdout when it refuses a session; it
    must not land in the middle of --json output."""
    model = _conv_bn_model()
    model.graph.node[2].domain = "com.example.unknown"  # the Identity: no kernel anywhere
    model.opset_import.append(helper.make_opsetid("com.example.unknown", 1))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(model.SerializeToString())
    assert main(["verify", str(model_path), str(broken), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is False and "cannot load the model" in result["messages"][0]
