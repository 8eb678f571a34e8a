"""Side-by-side ONNX Runtime latency: models timed interleaved, medians and ratios.

On a few shared cores absolute times drift with whatever else runs, so models are
measured in the same loop (one run of each, round after round) and compared by the
ratio of their medians. Idle threads do not spin (`session.intra_op.allow_spinning=0`),
which otherwise inflates alternating sessions about 3x.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LatencyStats", "measure_latency"]


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def to_dict(self) -> dict[str, float]:
        return {
            "median_ms": self.median_ms,
            "p10_ms": self.p10_ms,
            "p90_ms": self.p90_ms,
            "runs": self.runs,
        }


def measure_latency(
    models: Mapping[str, Any],
    feeds: Mapping[str, np.ndarray],
    *,
    runs: int = 30,
    warmup: int = 5,
    threads: int = 2,
) -> dict[str, LatencyStats]:
    """Median latency per model (ModelProto or path), runs interleaved round by round."""
    from onnxslim_edge.runtime import make_session

    if runs < 1:
        raise ValueError("runs must be >= 1")
    sessions = {
        name: make_session(m, threads=threads, spinning=False) for name, m in models.items()
    }
    feed_for = {}
    for name, sess in sessions.items():
        wanted = {i.name for i in sess.get_inputs()}
        feed_for[name] = {k: v for k, v in feeds.items() if k in wanted}
    for _ in range(warmup):
        for name, sess in sessions.items():
            sess.run(None, feed_for[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feed_for[name])
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        q = np.percentile(ts, [10, 90])
        out[name] = LatencyStats(statistics.median(ts), float(q[0]), float(q[1]), len(ts))
    return out
