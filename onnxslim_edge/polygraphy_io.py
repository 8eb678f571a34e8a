"""Polygraphy's JSON formats, read and written without Polygraphy's serializers.

`save_inputs(feeds, "inputs.json")` writes what `polygraphy run --load-inputs` reads (a
JSON list of feed dicts) and `save_run_results(outputs, "outputs.json")` a one-runner
`RunResults` (`--load-outputs`); `load_inputs` / `load_run_results` read them back,
raising DataError for anything malformed. Arrays are `.npy` bytes in base64 (never
pickled), as Polygraphy stores them. Polygraphy's own (de)serializers ask every array
whether it is a torch tensor, which imports torch (seconds) wherever it is installed;
tests/test_regress.py replays these files through the polygraphy CLI.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxslim_edge.errors import DataError, first_line

__all__ = ["load_inputs", "load_run_results", "save_inputs", "save_run_results"]


def _encode_array(array: np.ndarray) -> dict[str, str]:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return {"array": base64.b64encode(buf.getvalue()).decode(), "polygraphy_class": "ndarray"}


def _decode_array(obj: Any) -> np.ndarray:
    if isinstance(obj, dict) and obj.get("polygraphy_class") == "LazyArray":
        obj = obj.get("values")
    if not (isinstance(obj, dict) and obj.get("polygraphy_class") == "ndarray"):
        raise ValueError("expected a Polygraphy ndarray")
    raw = base64.b64decode(str(obj.get("array", "")).encode(), validate=True)
    array = np.load(io.BytesIO(raw), allow_pickle=False)
    if not isinstance(array, np.ndarray):
        raise ValueError("not a single array")
    return array


def save_inputs(feeds: Sequence[Mapping[str, np.ndarray]], path: str | os.PathLike) -> None:
    """Feed dicts as `polygraphy run --load-inputs` reads them (a JSON list)."""
    data = [{k: _encode_array(v) for k, v in feed.items()} for feed in feeds]
    Path(path).write_text(json.dumps(data), encoding="utf-8")


def save_run_results(
    outputs: Sequence[Mapping[str, np.ndarray]],
    path: str | os.PathLike,
    *,
    runner: str = "onnxslim-edge-golden",
    runtimes: Sequence[float] | None = None,
) -> None:
    """One runner's outputs per iteration as a Polygraphy `RunResults` JSON file
    (`polygraphy run --load-outputs`)."""
    iterations = [
        {
            "outputs": {
                k: {"values": _encode_array(v), "polygraphy_class": "LazyArray"}
                for k, v in out.items()
            },
            "runtime": float(runtimes[i]) if runtimes is not None else None,
            "runner_name": runner,
            "polygraphy_class": "IterationResult",
        }
        for i, out in enumerate(outputs)
    ]
    data = {"lst": [[runner, iterations]], "polygraphy_class": "RunResults"}
    Path(path).write_text(json.dumps(data), encoding="utf-8")


def load_inputs(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Feed dicts from a Polygraphy inputs JSON file; DataError when malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(f, dict) for f in data):
            raise ValueError("expected a list of feed dicts")
        return [{k: _decode_array(v) for k, v in feed.items()} for feed in data]
    except (ValueError, TypeError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: malformed ({first_line(exc)})") from exc


def load_run_results(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """The iterations' outputs of the single runner in a Polygraphy `RunResults` file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("polygraphy_class") != "RunResults":
            raise ValueError("not a Polygraphy RunResults file")
        runs = data.get("lst")
        if not isinstance(runs, list) or len(runs) != 1:
            raise ValueError("expected the results of exactly one runner")
        iterations = runs[0][1]
        return [{k: _decode_array(v) for k, v in it["outputs"].items()} for it in iterations]
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: malformed ({first_line(exc)})") from exc
