"""Lossless passes keep onnx's operator conformance suite passing.

`onnx.backend.test.case.node.collect_testcases(None)` builds ~1,900 single-op models in
memory, each with inputs and expected outputs. For every case the installed ONNX
Runtime can run *and* whose original model reproduces the expected outputs (onnx's
rtol/atol for the case, compared the way onnx's backend runner compares), the model
after `cleanup` then `fold-batchnorm` (each pass run on a fresh onnx_graphsurgeon
import, exported with `model_from_graph`, as the Pipeline does) must reproduce them too.

One test walks all cases and collects failures so that a regression shows the whole
picture at once. A pass may refuse a model with a one-line `UnsupportedError` (it then
emits no model, which is allowed); any other exception, an ONNX Runtime failure on the
result or a changed output is a failure. The test asserts a minimum number of verified
cases so that it cannot silently check (or refuse) everything. Sessions use one thread and no ONNX Runtime graph
optimizations (faster to create, and nothing rewrites the model behind our back).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import onnx
import pytest

from onnxslim_edge.errors import UnsupportedError

PASSES = ("cleanup", "fold-batchnorm")

#: ONNX Runtime 1.19 (the training flavor) lacks the newest opsets and runs ~740 cases
#: of onnx 1.23's suite; the latest release runs ~1,500.
MIN_CHECKED_LATEST = 1000
MIN_CHECKED_1_19 = 600


@pytest.fixture(scope="module")
def node_cases() -> list[Any]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the generators overflow/divide by zero on purpose
        return collect_testcases(None)


def _session_options() -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _run(model: onnx.ModelProto, feeds: dict[str, Any], opts: Any) -> list[Any]:
    import onnxruntime as ort

    from onnxslim_edge.runtime import serialized

    session = ort.InferenceSession(serialized(model), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _mismatch(actual: Any, expected: Any, rtol: float, atol: float, where: str = "") -> str | None:
    """Why `actual` differs from `expected` as onnx's backend runner judges it, or None."""
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return f"{where}: expected a sequence of {len(expected)}, got {type(actual).__name__}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            reason = _mismatch(a, e, rtol, atol, f"{where}[{i}]")
            if reason:
                return reason
        return None
    if expected is None or actual is None:
        return None if expected is None and actual is None else f"{where}: None vs a value"
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return f"{where}: shape {actual.shape} != {expected.shape}"
    if expected.dtype == object:
        return None if np.array_equal(actual, expected) else f"{where}: strings differ"
    if actual.dtype != expected.dtype:
        return f"{where}: dtype {actual.dtype} != {expected.dtype}"
    if expected.dtype.name == "bfloat16":  # numpy cannot compare it with a float tolerance
        actual, expected = actual.astype(np.float32), expected.astype(np.float32)
        rtol = max(rtol, 2**-6)
    try:
        ok = np.allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    except TypeError:  # float8 and other exotic dtypes: exact comparison
        ok = np.array_equal(actual.view(np.uint8), expected.view(np.uint8))
    if ok:
        return None
    with np.errstate(all="ignore"):
        err = np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))
    return f"{where}: max abs error {err:.3g} (rtol {rtol:g}, atol {atol:g})"


def _outputs_mismatch(
    actual: list[Any], expected: list[Any], rtol: float, atol: float
) -> str | None:
    if len(actual) != len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        reason = _mismatch(a, e, rtol, atol, f"output {i}")
        if reason:
            return reason
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _apply_passes(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    from onnxslim_edge.pipeline import Context, create_pass, model_from_graph

    for name in PASSES:
        graph = gs.import_onnx(model)
        create_pass(name).run(graph, Context())
        model = model_from_graph(graph, model)
    return model


@pytest.mark.slow
def test_lossless_passes_keep_conformance(node_cases: list[Any]) -> None:
    import onnxruntime as ort

    opts = _session_options()
    start = time.perf_counter()
    checked = not_runnable = original_differs = 0
    failures: list[str] = []
    refused: list[str] = []
    for case in node_cases:
        model = case.model
        inputs, expected = case.data_sets[0]
        feeds = {vi.name: value for vi, value in zip(model.graph.input, inputs)}
        try:
            original = _run(model, feeds, opts)
        except Exception:
            not_runnable += 1
            continue
        if _outputs_mismatch(original, expected, case.rtol, case.atol) is not None:
            original_differs += 1
            continue
        checked += 1
        try:
            slim = _apply_passes(model)
        except UnsupportedError as exc:  # a typed, one-line refusal: no wrong model emitted
            refused.append(f"{case.name}: {exc}")
            continue
        except Exception as exc:
            failures.append(f"{case.name}: a pass raised {_first_line(exc)}")
            continue
        try:
            outputs = _run(slim, feeds, opts)
        except Exception as exc:
            failures.append(f"{case.name}: ONNX Runtime fails on the result: {_first_line(exc)}")
            continue
        reason = _outputs_mismatch(outputs, expected, case.rtol, case.atol)
        if reason is not None:
            failures.append(f"{case.name}: {reason}")
    elapsed = time.perf_counter() - start

    verified = checked - len(refused)
    summary = (
        f"{checked} cases checked, {len(failures)} failed, {len(refused)} refused with "
        f"UnsupportedError; {not_runnable} not runnable by ONNX Runtime {ort.__version__}, "
        f"{original_differs} where the original differs from onnx's expected outputs; "
        f"{elapsed:.1f} s"
    )
    print(summary)
    assert not failures, summary + "\n" + "\n".join(failures[:20])
    version = tuple(int(p) for p in ort.__version__.split(".")[:2])
    minimum = MIN_CHECKED_LATEST if version >= (1, 20) else MIN_CHECKED_1_19
    assert verified >= minimum, summary + "\nrefused:\n" + "\n".join(refused[:20])
