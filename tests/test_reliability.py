"""Issue 15: never destroy a file, never a traceback, refuse bad numbers, bounded resources.

One table (`CASES`) drives the bad-input promise through `onnxslim_edge.cli.main`: each
row is an argv over files made from `_FILES`, its exit code and a fragment of the one
stderr line; every row also asserts that no traceback reaches stderr, that no file is
created, changed or removed (sha256 of everything in the folder, before and after).
SIGTERM while saving and while checking a large model runs in a subprocess that is
held inside the write by a patched `_write` and signalled once its temporary exists.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from fixtures.models import conv_bn_model
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.cli import main
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.model import Outputs, check_paths, save_model

# --------------------------------------------------------------------------- models


def _conv_bn(opset: int = 13) -> onnx.ModelProto:
    return conv_bn_model(16, opset)  # the 1.7 KB weight goes to external data when asked


def _unknown_domain() -> onnx.ModelProto:
    model = _conv_bn()
    relu = model.graph.node[3]
    relu.op_type, relu.domain = "Foo", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def _opset99() -> onnx.ModelProto:
    model = _conv_bn()
    model.opset_import[0].version = 99
    return model


def _opset1() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)])
    model.ir_version = 3
    return model


def _save_raw(model: onnx.ModelProto, path: Path) -> None:
    path.write_bytes(model.SerializeToString())


def _external_with_location(path: Path, location: str) -> None:
    save_model(_conv_bn(), path, external_data=True)
    raw = onnx.load(str(path), load_external_data=False)
    for tensor in raw.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(raw.SerializeToString())


def _recipe(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(textwrap.dedent(text), encoding="utf-8")


#: Every file a row may use, made fresh in each row's folder.
_FILES: dict[str, Callable[[Path], object]] = {
    "m.onnx": lambda p: save_model(_conv_bn(), p),
    "e.onnx": lambda p: save_model(_conv_bn(), p, external_data=True),  # + e.onnx.data
    "nul.onnx": lambda p: _external_with_location(p, "w\x00.bin"),
    "unknown.onnx": lambda p: _save_raw(_unknown_domain(), p),
    "opset99.onnx": lambda p: _save_raw(_opset99(), p),
    "opset1.onnx": lambda p: _save_raw(_opset1(), p),
    "calib.npz": lambda p: np.savez(p, x=np.ones((2, 3, 8, 8), np.float32)),
    "reportdir": lambda p: p.mkdir(),
    "target_list.toml": _recipe('target = ["tensorrt"]\n[[pass]]\nname = "cleanup"\n'),
    "verify_int.toml": _recipe('verify = 3\n[[pass]]\nname = "cleanup"\n'),
    "verify_list.toml": _recipe('verify = [1, 2]\n[[pass]]\nname = "cleanup"\n'),
    "cosine_nan.toml": _recipe('[[pass]]\nname = "cleanup"\n[verify]\nmin_cosine = nan\n'),
    "sqnr_inf.toml": _recipe('[[pass]]\nname = "cleanup"\n[verify]\nmin_sqnr_db = inf\n'),
}

# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    fragment: str
    rc: int = 2
    setup: Callable[[Path], None] | None = field(default=None, compare=False)


def _hardlink_report(folder: Path) -> None:
    os.link(folder / "m.onnx", folder / "alias.json")


def _symlink_output(folder: Path) -> None:
    (folder / "link.onnx").symlink_to(folder / "m.onnx")


_OPT = ("optimize", "m.onnx", "-o", "o.onnx", "--pass", "cleanup")

CASES = [
    # -- data destroyed: an output that is an input, two outputs one file, unwritable places
    Case("report-is-input", (*_OPT, "--report", "m.onnx"), "--report would overwrite the input"),
    Case("report-is-output", (*_OPT, "--report", "o.onnx"), "--report and -o are the same file"),
    Case(
        "report-is-output-data",
        (*_OPT, "--report", "o.onnx.data"),
        "--report and -o's external data are the same file",
    ),
    Case(
        "output-is-input-data",
        ("optimize", "e.onnx", "-o", "e.onnx.data", "--pass", "cleanup"),
        "-o would overwrite the input's external data",
    ),
    Case(
        "report-is-input-data",
        ("optimize", "e.onnx", "-o", "o.onnx", "--pass", "cleanup", "--report", "e.onnx.data"),
        "--report would overwrite the input's external data",
    ),
    Case(
        "output-data-is-input-data-overwrite",
        ("optimize", "e.onnx", "-o", "e.onnx.data", "--pass", "cleanup", "--overwrite"),
        "-o would overwrite the input's external data",
    ),
    Case(
        "report-is-calibration-data",
        (*_OPT, "--calib", "calib.npz", "--report", "calib.npz"),
        "--report would overwrite the calibration data",
    ),
    Case(
        "report-hardlink-of-input",
        (*_OPT, "--report", "alias.json"),
        "--report would overwrite the input model",
        setup=_hardlink_report,
    ),
    Case(
        "output-symlink-to-input",
        ("optimize", "link.onnx", "-o", "m.onnx", "--pass", "cleanup"),
        "refusing to overwrite the input model",
        setup=_symlink_output,
    ),
    Case("report-is-folder", (*_OPT, "--report", "reportdir"), "report is a folder"),
    Case(
        "output-is-folder",
        ("optimize", "m.onnx", "-o", "reportdir", "--pass", "cleanup"),
        "output is a folder",
    ),
    Case(
        "output-is-device",
        ("optimize", "m.onnx", "-o", "/dev/null", "--pass", "cleanup"),
        "not a regular file",
    ),
    # -- tracebacks that were
    Case("external-location-nul", ("inspect", "nul.onnx"), "contains a NUL byte"),
    Case(
        "unknown-domain-fold-batchnorm",
        ("optimize", "unknown.onnx", "-o", "o.onnx", "--pass", "fold-batchnorm"),
        "com.example:Foo(-1) is not a registered function/op; the passes' results cannot be checked",
    ),
    Case(
        "unknown-domain-quantize",
        ("optimize", "unknown.onnx", "-o", "o.onnx", "--pass", "quantize", "--calib", "random"),
        # quantize's fidelity guard runs the input itself and names what ONNX Runtime refused
        "is not a registered function/op",
    ),
    Case(
        "opset99-fold-batchnorm",
        ("optimize", "opset99.onnx", "-o", "o.onnx", "--pass", "fold-batchnorm"),
        # ORT 1.32 names the opset, 1.19 the IR version the opset needs: both refuse the input
        "opset99.onnx: ONNX Runtime cannot load the model",
    ),
    Case(
        "fp16-opset1",
        ("optimize", "opset1.onnx", "-o", "o.onnx", "--pass", "fp16"),
        "fp16: the model's opset 1 is older than 6",
    ),
    Case(
        "recipe-target-list",
        ("optimize", "m.onnx", "-o", "o.onnx", "--recipe", "target_list.toml"),
        "target must be a string",
    ),
    Case(
        "recipe-verify-int",
        ("optimize", "m.onnx", "-o", "o.onnx", "--recipe", "verify_int.toml"),
        "'verify' must be a table",
    ),
    Case(
        "recipe-verify-list",
        ("optimize", "m.onnx", "-o", "o.onnx", "--recipe", "verify_list.toml"),
        "'verify' must be a table",
    ),
    Case(
        "demo-runs-0",
        ("demo", "--runs", "0", "--out", "demo"),
        "--runs: expected a positive integer, got 0",
    ),
    Case(
        "demo-runs-negative",
        ("demo", "--runs", "-1", "--out", "demo"),
        "expected a positive integer, got -1",
    ),
    Case("demo-out-file", ("demo", "--out", "m.onnx"), "the demo's output must be a folder"),
    # -- bad numbers
    Case(
        "verify-rtol-nan",
        ("verify", "m.onnx", "unknown.onnx", "--rtol", "nan"),
        "--rtol: expected a finite number >= 0",
    ),
    Case(
        "verify-atol-inf",
        ("verify", "m.onnx", "m.onnx", "--atol", "inf"),
        "--atol: expected a finite number >= 0",
    ),
    Case(
        "verify-rtol-negative",
        ("verify", "m.onnx", "m.onnx", "--rtol", "-1"),
        "--rtol: expected a finite number >= 0",
    ),
    Case(
        "recipe-min-cosine-nan",
        ("optimize", "m.onnx", "-o", "o.onnx", "--recipe", "cosine_nan.toml"),
        "verify.min_cosine must be a finite number, got nan",
    ),
    Case(
        "recipe-min-sqnr-inf",
        ("optimize", "m.onnx", "-o", "o.onnx", "--recipe", "sqnr_inf.toml"),
        "verify.min_sqnr_db must be a finite number, got inf",
    ),
    Case(
        "input-shape-unknown-input",
        ("inspect", "m.onnx", "--input-shape", "y=1,16,8,8"),
        "the model has no input 'y'; inputs: x",
    ),
    Case(
        "input-shape-negative",
        (*_OPT, "--input-shape", "x=-1,3,8,8"),
        "--input-shape x=-1,3,8,8: input 'x' needs dims >= 1",
    ),
    Case(
        "input-shape-zero",
        ("verify", "m.onnx", "m.onnx", "--input-shape", "x=0,3,8,8"),
        "input 'x' needs dims >= 1",
    ),
    Case(
        "input-shape-wrong-rank",
        ("inspect", "m.onnx", "--input-shape", "x=1,3,8"),
        "input 'x' has 4 dims in the model, not 3",
    ),
    Case(
        "input-shape-fixed-dim",
        (*_OPT, "--input-shape", "x=1,4,8,8"),
        "dim 1 of input 'x' is fixed at 3 in the model",
    ),
    Case(
        "seed-negative",
        ("verify", "m.onnx", "m.onnx", "--seed", "-5"),
        "--seed: expected an integer >= 0, got -5",
    ),
    Case("opset-unknown", (*_OPT, "--opset", "1000"), "--opset: expected an opset from 1 to"),
    Case(
        "samples-zero",
        ("verify", "m.onnx", "m.onnx", "--samples", "0"),
        "--samples: expected a positive integer",
    ),
]


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (links by their target path), by relative name."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("files")
    for name, make in _FILES.items():
        make(folder / name)
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(
    case: Case,
    files: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = tmp_path / "work"
    shutil.copytree(files, work, symlinks=True)
    if case.setup is not None:
        case.setup(work)
    monkeypatch.chdir(work)
    before = _snapshot(work)
    rc = main(list(case.argv))
    err = capfd.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got {err!r}"
    assert lines[0].startswith("onnxslim-edge: error:"), lines[0]
    assert case.fragment in lines[0]
    assert rc == case.rc
    assert _snapshot(work) == before, "no file may be created, changed or removed"


# --------------------------------------------------------------------------- unwritable places


def _make_read_only(folder: Path) -> Callable[[], None]:
    """Make `folder` unwritable (chmod, or chattr +i for root); return the undo, or skip."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: subprocess.run([chattr, "-i", str(folder)], check=True)
    pytest.skip("cannot make a folder read-only here (root without chattr +i)")


@pytest.mark.parametrize("which", ["output", "report"])
def test_read_only_folder_is_one_line_and_leaves_nothing(
    which: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    src = save_model(_conv_bn(), tmp_path / "m.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "o.onnx" if which == "output" else tmp_path / "o.onnx"
    report = locked / "r.json" if which == "report" else tmp_path / "r.json"
    undo = _make_read_only(locked)
    try:
        before = _snapshot(tmp_path)
        rc = main(
            ["optimize", str(src), "-o", str(out), "--pass", "cleanup", "--report", str(report)]
        )
        after = _snapshot(tmp_path)
    finally:
        undo()
    err = capfd.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and f"cannot write the {which} in {locked}" in err
    assert after == before


def test_outputs_commit_together_or_not_at_all(tmp_path: Path) -> None:
    """A failure while staging the second output removes the first's temporary file."""
    model = _conv_bn()
    with pytest.raises(ConfigError, match="is a folder"), Outputs() as outputs:
        outputs.model(model, tmp_path / "o.onnx", external_data=True)
        assert len(list(tmp_path.iterdir())) == 2  # model and data staged, not committed
        outputs.text(tmp_path, "{}")
    assert list(tmp_path.iterdir()) == []
    with Outputs() as outputs:
        outputs.model(model, tmp_path / "o.onnx", external_data=True)
        outputs.text(tmp_path / "r.json", "{}")
        committed = outputs.commit()
    assert committed == [tmp_path / "o.onnx.data", tmp_path / "o.onnx", tmp_path / "r.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx", "o.onnx.data", "r.json"]
    loaded = onnx.load(str(tmp_path / "o.onnx"))
    assert onnx.numpy_helper.to_array(loaded.graph.initializer[0]).shape == (16, 3, 3, 3)
    assert oct((tmp_path / "o.onnx").stat().st_mode & 0o777) != oct(0o600)


def test_check_paths_names_both_sides(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"--report would overwrite the input model \("):
        check_paths(
            [("--report", tmp_path / "sub" / ".." / "m.onnx")], [("the input model", model)]
        )
    check_paths([("-o", model)], [("the input model", model)], allow=[(model, model)])


def test_overwrite_replaces_the_input_on_purpose(tmp_path: Path) -> None:
    src = save_model(_conv_bn(), tmp_path / "e.onnx", external_data=True)
    before = src.read_bytes()
    assert (
        main(["optimize", str(src), "-o", str(src), "--pass", "cleanup", "--overwrite", "-q"]) == 0
    )
    assert src.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.onnx", "e.onnx.data"]


def test_closed_stdout_ends_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    """`inspect m.onnx | head -1`: the reader went away; no BrokenPipeError, exit 141."""
    src = save_model(_conv_bn(), tmp_path / "m.onnx")
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        rc = main(["inspect", str(src)])
    finally:
        monkeypatch.undo()
        stdout.close()
    assert rc == 141
    assert capfd.readouterr().err == ""


# --------------------------------------------------------------------------- SIGTERM

_HOLD_IN_WRITE = """
import os, sys, time
from pathlib import Path
import onnx
import onnxslim_edge.model as m

marker, where = Path(sys.argv[1]), sys.argv[2]

def hold(real):
    def held(*args, **kw):
        real(*args, **kw) if where == "write" else None
        partial = marker.with_suffix(".partial")  # renamed: the parent never reads it half-written
        partial.write_text(str(args[1] if where == "write" else args[0]))
        os.replace(partial, marker)
        time.sleep(60)
    return held

if where == "write":
    m._write = hold(m._write)
else:  # the checker, reading its skeleton from a temporary folder
    onnx.checker.check_model = hold(onnx.checker.check_model)
from onnxslim_edge.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _terminate_inside_write(
    tmp_path: Path, argv: list[str], where: str = "write", env=None
) -> tuple[int, str, Path]:
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_IN_WRITE, str(marker), where, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,  # not the checkout: its source folder would shadow the install
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the child never reached the write"
            time.sleep(0.05)
        written = Path(marker.read_text())
        assert written.exists(), "the temporary file exists while the write is held"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, written


def test_sigterm_while_saving_leaves_no_temporary_and_no_output(tmp_path: Path) -> None:
    src = save_model(_conv_bn(), tmp_path / "m.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["optimize", str(src), "-o", str(out_dir / "o.onnx"), "--pass", "cleanup", "-q"]
    argv += ["--report", str(out_dir / "r.json")]
    rc, err, written = _terminate_inside_write(tmp_path, argv)
    assert written.parent == out_dir and written.name.startswith(".o.onnx.")
    assert rc == 143, err
    assert err.strip().splitlines()[-1] == "onnxslim-edge: terminated (SIGTERM)"
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == [], "no temporary file and no output may remain"


def test_sigterm_while_inspect_checks_a_model_leaves_nothing_in_tmpdir(tmp_path: Path) -> None:
    """The checker reads a skeleton (and a sparse data file) from $TMPDIR: any size."""
    src = save_model(_conv_bn(), tmp_path / "m.onnx")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    rc, err, written = _terminate_inside_write(
        tmp_path, ["inspect", str(src)], where="checker", env=env
    )
    assert tmpdir in written.parents, "the checker reads its files under $TMPDIR"
    assert rc == 143 and "Traceback" not in err, err
    assert list(tmpdir.iterdir()) == [], "the temporary files must be removed"


# --------------------------------------------------------------------------- resource limits


def _constant_of_shape_model(dims: tuple[int, int]) -> onnx.ModelProto:
    """y = x + sum(ConstantOfShape(Abs(dims))): shape inference cannot size the constant."""
    graph = helper.make_graph(
        [
            helper.make_node("Abs", ["dims"], ["d"], name="abs"),
            helper.make_node(
                "ConstantOfShape",
                ["d"],
                ["big"],
                name="fill",
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
            ),
            helper.make_node("ReduceSum", ["big"], ["r"], keepdims=0, name="sum"),
            helper.make_node("Add", ["x", "r"], ["y"], name="add"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.array(dims, np.int64), "dims")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize(
    ("dims", "folded_ops"),
    [
        ((10, 10), {"Abs", "ConstantOfShape", "ReduceSum"}),  # 400 B: folded once Abs is
        ((4096, 4096), {"Abs"}),  # 64 MiB > the 16 MiB budget: computed at run time
    ],
)
def test_cleanup_folds_growing_ops_only_within_budget(
    dims: tuple[int, int], folded_ops: set[str]
) -> None:
    from onnxslim_edge.pipeline import Pipeline

    model = _constant_of_shape_model(dims)
    result = Pipeline(["cleanup"], validate="none", verify_lossless=False).run(model)
    kept = {n.op_type for n in result.model.graph.node}
    assert kept == {"Abs", "ConstantOfShape", "ReduceSum", "Add"} - folded_ops
    folded = max((t for t in result.model.graph.initializer), key=lambda t: len(t.raw_data))
    assert len(folded.raw_data) <= 16 * 2**20
    from onnxslim_edge.runtime import make_session

    x = np.zeros(1, np.float32)
    want = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(make_session(result.model).run(None, {"x": x})[0], want)


def _endless_loop_model() -> onnx.ModelProto:
    """A Loop of 10^9 iterations whose scan output ONNX cannot size: runs 'forever'."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
            helper.make_node("Identity", ["v_in"], ["scan"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("scan", TensorProto.FLOAT, [1]),
        ],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "cond", "x"], ["v", "s"], body=body)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [None, 1]),
        ],
        [
            numpy_helper.from_array(np.array(10**9, np.int64), "M"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


_INSPECT_WITH_BUDGET = """
import sys
import onnxslim_edge.sandbox as sandbox
sandbox.TIME_BUDGET_S = float(sys.argv[1])
from onnxslim_edge.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_inspect_stops_running_an_endless_model_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "loop.onnx"
    path.write_bytes(_endless_loop_model().SerializeToString())
    proc = subprocess.run(
        [sys.executable, "-c", _INSPECT_WITH_BUDGET, "1", "inspect", str(path), "--json", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the checkout: its source folder would shadow the install
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "shapes of 2 tensors not computed" in proc.stderr
    assert "time budget" in proc.stderr or "memory budget" in proc.stderr
    assert '"nodes": 1' in proc.stdout


def test_sandbox_reports_time_and_runtime_failures() -> None:
    from onnxslim_edge.sandbox import BudgetExceeded, RunFailed, output_shapes

    x = {"x": np.ones(1, np.float32)}
    with pytest.raises(BudgetExceeded, match="time budget"):
        output_shapes(_endless_loop_model(), ["v"], x, time_s=1)
    with pytest.raises(RunFailed):
        output_shapes(_constant_of_shape_model((2, 2)), ["y"], {"x": np.ones(3, np.int64)})
    assert output_shapes(_constant_of_shape_model((2, 2)), ["y"], x) == {"y": ("float32", (1,))}


def test_quiet_keeps_onnxruntime_warnings_off_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """An unused initializer makes ONNX Runtime warn at session creation (after cleanup's
    folding has silenced and restored its logger): -q must keep that off stderr."""
    from onnxslim_edge.runtime import set_ort_log_severity

    model = _conv_bn()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    try:
        rc = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--pass", "cleanup", "-q"])
    finally:
        set_ort_log_severity(2)
    err = capfd.readouterr().err
    assert rc == 0
    assert "onnxruntime" not in err and "Removing initializer" not in err, err


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_umask_not_mkstemps_0600(tmp_path: Path, umask: int) -> None:
    """Models, reports, golden folders, engines and scripts are written like any other
    tool's files: 0o666 (scripts, folders: 0o777) less the umask."""
    from onnxslim_edge.engine import _save_engine
    from onnxslim_edge.model import new_file_mode, write_text_atomic
    from onnxslim_edge.regress import atomic_folder

    def mode(p: Path) -> int:
        return p.stat().st_mode & 0o777

    src = save_model(_conv_bn(), tmp_path / "m.onnx")
    old = os.umask(umask)
    try:
        assert new_file_mode() == 0o666 & ~umask
        argv = ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--pass", "cleanup"]
        assert main([*argv, "--report", str(tmp_path / "r.json"), "-q"]) == 0
        write_text_atomic(tmp_path / "t.txt", "x")

        class FakeEngine:
            def serialize(self) -> bytes:
                return b"engine"

        _save_engine(FakeEngine(), tmp_path / "m.engine")
        with atomic_folder(tmp_path / "folder") as folder:
            (folder / "a.sh").write_text("true")
            (folder / "a.sh").chmod(new_file_mode(executable=True))
    finally:
        os.umask(old)
    for name in ("o.onnx", "r.json", "t.txt", "m.engine"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    assert mode(tmp_path / "folder") == 0o777 & ~umask
    assert mode(tmp_path / "folder" / "a.sh") == 0o777 & ~umask
