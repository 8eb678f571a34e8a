"""The lossless pipeline `cleanup` + `fold-batchnorm` on whole architectures.

Two corpora:
- the models shipped in the onnx wheel (`fixtures.corpus`): every case ONNX Runtime can
  run must, after the pipeline, pass the full ONNX checker, load in ONNX Runtime,
  reproduce onnx's reference outputs at onnx's tolerances for that case (where the
  original does) and match the original's ONNX Runtime outputs within rtol 1e-5 and
  atol 1e-5 x the output's range;
- small PyTorch exports (`fixtures.torch_models`): additionally every BatchNormalization
  is folded away where each follows a Conv/Gemm, and the node count strictly drops.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from fixtures import corpus, torch_models

PASSES = ("cleanup", "fold-batchnorm")

#: Lossless means equal up to float reassociation: rtol plus atol relative to the range.
RTOL = 1e-5
ATOL_OF_RANGE = 1e-5

CASES = corpus.corpus_cases()


def _slim(model: onnx.ModelProto, *, pipeline_checks: bool = True) -> onnx.ModelProto:
    """The model after the pipeline. Without `pipeline_checks` the Pipeline neither
    opens ONNX Runtime sessions nor compares outputs on synthetic data after each pass:
    the corpus test does both itself, on reference data, and the ConstantOfShape-built
    `light/` models grow to ~100 MB when folded, which makes those checks cost seconds.
    """
    from onnxslim_edge import Pipeline

    if pipeline_checks:
        pipeline = Pipeline(list(PASSES), max_samples=1)
    else:
        pipeline = Pipeline(list(PASSES), validate="checker", verify_lossless=False)
    result = pipeline.run(model)
    assert [p.name for p in result.report.passes] == list(PASSES)
    return result.model


def _assert_same_interface(slim: onnx.ModelProto, original: onnx.ModelProto) -> None:
    initializers = {t.name for t in original.graph.initializer}
    inputs = [i.name for i in original.graph.input if i.name not in initializers]
    slim_initializers = {t.name for t in slim.graph.initializer}
    slim_inputs = [i.name for i in slim.graph.input if i.name not in slim_initializers]
    assert slim_inputs == inputs
    assert [o.name for o in slim.graph.output] == [o.name for o in original.graph.output]


def assert_outputs_close(
    actual: Sequence[np.ndarray],
    expected: Sequence[np.ndarray],
    *,
    rtol: float,
    atol: float | None = None,
    atol_of_range: float | None = None,
    label: str = "",
) -> None:
    """Shapes and dtypes equal; floats within rtol/atol (NaN == NaN); others exactly equal.

    `atol_of_range` makes atol that fraction of the expected output's finite range.
    """
    assert len(actual) == len(expected), f"{label}: {len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = np.asarray(a), np.asarray(e)
        where = f"{label} output {i}"
        assert a.shape == e.shape, f"{where}: shape {a.shape} != {e.shape}"
        assert a.dtype == e.dtype, f"{where}: dtype {a.dtype} != {e.dtype}"
        if e.dtype.kind not in "fc":
            np.testing.assert_array_equal(a, e, err_msg=where)
            continue
        tol = atol or 0.0
        if atol_of_range is not None:
            finite = e[np.isfinite(e)]
            spread = float(np.ptp(finite.astype(np.float64))) if finite.size else 0.0
            tol = max(tol, atol_of_range * spread)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=tol, equal_nan=True, err_msg=where)


def _matches(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], case) -> bool:
    try:
        assert_outputs_close(actual, expected, rtol=case.rtol, atol=case.atol)
    except AssertionError:
        return False
    return True


# --------------------------------------------------------------------------- onnx corpus


def test_corpus_is_found_and_mostly_runnable() -> None:
    kinds = collections.Counter(c.kind for c in CASES)
    assert kinds["light"] >= 9 and kinds["simple"] >= 20, kinds
    assert kinds["pytorch-converted"] >= 80 and kinds["pytorch-operator"] >= 30, kinds
    runnable = [c for c in CASES if c.ort_error() is None]
    assert len(runnable) >= 100, f"only {len(runnable)} of {len(CASES)} cases run in ONNX Runtime"
    # The reference comparison in test_corpus_case runs only where ONNX Runtime itself
    # reproduces onnx's reference outputs: make sure that is nearly everywhere.
    reproduced = [
        c
        for c in runnable
        if c.has_reference and _matches(c.original_run()[1], c.data_sets()[0].outputs, c)
    ]
    assert len(reproduced) >= 100, f"ONNX Runtime reproduces only {len(reproduced)} references"
    # The runner's rule for light/ inputs reproduces the stored outputs (checks the rule).
    light = next(c for c in CASES if c.id == "light/light_squeezenet")
    _, outputs = light.original_run()
    assert _matches(outputs, light.data_sets()[0].outputs, light)


@pytest.mark.parametrize("case", CASES, ids=corpus.corpus_ids(CASES))
def test_corpus_case(case: corpus.CorpusCase) -> None:
    reason = case.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    feeds, original_outputs = case.original_run()
    model = case.load_model()
    slim = _slim(model, pipeline_checks=False)

    onnx.checker.check_model(slim, full_check=True)
    _assert_same_interface(slim, model)
    slim_outputs = corpus.run_ort(slim, feeds)
    assert_outputs_close(
        slim_outputs,
        original_outputs,
        rtol=RTOL,
        atol_of_range=ATOL_OF_RANGE,
        label=f"{case.id} vs original",
    )
    for k, data in enumerate(case.data_sets()):
        reference_run = original_outputs if k == 0 else corpus.run_ort(model, data.inputs)
        if not _matches(reference_run, data.outputs, case):
            continue  # ONNX Runtime itself differs from the reference here
        outputs = slim_outputs if k == 0 else corpus.run_ort(slim, data.inputs)
        assert_outputs_close(
            outputs,
            data.outputs,
            rtol=case.rtol,
            atol=case.atol,
            label=f"{case.id} data set {k} vs reference",
        )


# --------------------------------------------------------------------------- torch exports


def _bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


@pytest.mark.parametrize("arch", torch_models.ARCHITECTURES)
def test_torch_fixture_is_faithful(arch: str, torch_model: Callable[[str], Path]) -> None:
    """The exported file is small, keeps its BatchNorms and computes what torch computes."""
    import torch

    path = torch_model(arch)
    assert path.stat().st_size < 200 * 1024
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert (_bn_count(model) > 0) == (arch in torch_models.BN_ARCHITECTURES)
    x = torch_models.example_input(arch, seed=1)
    with torch.no_grad():
        expected = torch_models.build(arch)(torch.from_numpy(x)).numpy()
    (actual,) = corpus.run_ort(model, {"x": x})
    assert_outputs_close([actual], [expected], rtol=RTOL, atol_of_range=ATOL_OF_RANGE, label=arch)


@pytest.mark.parametrize("arch", torch_models.ARCHITECTURES)
def test_torch_architecture(arch: str, torch_model: Callable[[str], Path]) -> None:
    model = onnx.load(str(torch_model(arch)))
    slim = _slim(model)

    onnx.checker.check_model(slim, full_check=True)
    _assert_same_interface(slim, model)
    if arch in torch_models.BN_ARCHITECTURES:
        assert _bn_count(model) > 0
        assert _bn_count(slim) == 0
    assert len(slim.graph.node) < len(model.graph.node)
    batches = (1, 3) if arch == "dynamic" else (None,)
    for batch in batches:
        x = torch_models.example_input(arch, seed=2, batch=batch)
        assert_outputs_close(
            corpus.run_ort(slim, {"x": x}),
            corpus.run_ort(model, {"x": x}),
            rtol=RTOL,
            atol_of_range=ATOL_OF_RANGE,
            label=f"{arch} batch {batch}",
        )
    if arch == "dynamic":
        dim = slim.graph.input[0].type.tensor_type.shape.dim[0]
        assert dim.dim_param == "batch" and not dim.HasField("dim_value")


@pytest.mark.parametrize("case", CASES, ids=corpus.corpus_ids(CASES))
def test_corpus_case_through_the_cli(
    case: corpus.CorpusCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's acceptance loop as a user types it: optimize, then verify (exit 0).

    The CLI verifies on random inputs. A few corpus models cannot run on random data at
    all (shape tensors as inputs, strings, split sizes): those are skipped with the
    reason, and `test_corpus_case` covers them with their reference inputs.
    """
    from onnxslim_edge.cli import main

    reason = case.skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out.onnx"
    argv = ["optimize", str(case.model_path), "-o", str(out), "-q", "--samples", "1"]
    rc = main([*argv, "--pass", "cleanup", "--pass", "fold-batchnorm"])
    err = capsys.readouterr().err
    if rc == 2 and ("reference: ONNX Runtime failed" in err or "random data cannot" in err):
        pytest.skip(f"random inputs cannot drive this model: {err.strip()}")
    assert rc == 0, err
    rc = main(["verify", str(case.model_path), str(out), "--samples", "2", "-q"])
    err = capsys.readouterr().err
    if rc == 2 and ("reference: ONNX Runtime failed" in err or "random data cannot" in err):
        pytest.skip(f"random inputs cannot drive this model: {err.strip()}")
    assert rc == 0, err


_REFUSED = [c for c in CASES if c.skip_reason() is not None]


@pytest.mark.parametrize("case", _REFUSED, ids=corpus.corpus_ids(_REFUSED))
def test_corpus_case_onnx_runtime_cannot_run_stays_valid(case: corpus.CorpusCase) -> None:
    """Models ONNX Runtime refuses (opset 1/6 ops, training ops) still come out valid."""
    from onnxslim_edge import Pipeline
    from onnxslim_edge.errors import UnsupportedError

    original = case.load_model()
    try:
        result = Pipeline(list(PASSES), validate="checker", verify_lossless=False).run(original)
    except UnsupportedError as exc:  # e.g. graphsurgeon cannot represent the types
        pytest.skip(f"refused cleanly: {exc}")
    onnx.checker.check_model(result.model)
    _assert_same_interface(result.model, original)
