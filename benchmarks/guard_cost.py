"""What the quantize pass's fidelity guard costs on CNNs, and whether it changes them.

For the digits CNN (`onnxslim_edge/assets`, calibrated on 64 test images) and, with
torch, the ResNet-18 and MobileNetV2 test fixtures' architectures at 3 x 64 x 64 (random
weights, 64 random-normal calibration samples), `quantize` runs with
`fidelity_guard` on and off on both targets, interleaved, `--repeats` times; reported:
median wall seconds of each, the ratio, and whether the two models are byte-identical.

    python -m benchmarks.guard_cost [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from typing import Any

import numpy as np

from benchmarks.harness import prefer_installed_package

prefer_installed_package()

__all__ = ["main", "run"]


def _models() -> dict[str, tuple[Any, list[dict[str, np.ndarray]]]]:
    import onnx

    from onnxslim_edge.demo import DIGITS_MODEL, load_digits_test

    images, _ = load_digits_test()
    name = onnx.load(str(DIGITS_MODEL)).graph.input[0].name
    return {"digits": (str(DIGITS_MODEL), [{name: images[:64].astype(np.float32)}])}


def _torch_models() -> dict[str, tuple[Any, list[dict[str, np.ndarray]]]]:
    import io
    import warnings

    import onnx
    import torch

    sys.path.insert(0, "tests")
    from fixtures import torch_models

    out = {}
    x = np.random.default_rng(0).standard_normal((64, 3, 64, 64)).astype(np.float32)
    for arch in ("resnet", "mobilenetv2"):
        model = torch_models.build(arch)
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.from_numpy(x[:1]),),
                buffer,
                dynamo=False,
                opset_version=13,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
            )
        out[arch] = (onnx.load_from_string(buffer.getvalue()), [{"x": x}])
    return out


def run(repeats: int = 3) -> dict[str, Any]:
    from onnxslim_edge.passes.quantize.qdq import Quantize
    from onnxslim_edge.pipeline import Context, Pipeline

    models = _models()
    with contextlib.suppress(ImportError):
        models.update(_torch_models())
    rows = {}
    for name, (model, data) in models.items():
        for target in ("onnxruntime-cpu", "tensorrt"):
            times: dict[bool, list[float]] = {True: [], False: []}
            results = {}
            for _ in range(repeats):
                for guard in (True, False):
                    t0 = time.perf_counter()
                    result = Pipeline([Quantize(fidelity_guard=guard)], target=target).run(
                        model, Context(data=data, target=target)
                    )
                    times[guard].append(time.perf_counter() - t0)
                    results[guard] = result.model.SerializeToString()
            on, off = statistics.median(times[True]), statistics.median(times[False])
            rows[f"{name} {target}"] = {
                "guard_on_s": round(on, 2),
                "guard_off_s": round(off, 2),
                "ratio": round(on / off, 2),
                "identical": results[True] == results[False],
            }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sys.stdout.write(json.dumps(run(args.repeats), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
