"""Interleaved latency measurement on stub sessions with a scripted clock: exact statistics."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import numpy as np
import pytest

from onnxslim_edge import runtime, timing
from onnxslim_edge.timing import LatencyStats, measure_latency


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _Session:
    """Takes `durations_ms[i]` on its i-th run (cycling), records every call in `log`."""

    def __init__(self, name: str, inputs: list[str], durations_ms: list[float], clock, log):
        self.name, self.inputs, self.durations = name, inputs, durations_ms
        self.clock, self.log, self.calls = clock, log, 0

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=n) for n in self.inputs]

    def run(self, outputs, feed):
        assert outputs is None
        self.log.append((self.name, sorted(feed)))
        self.clock.now += self.durations[self.calls % len(self.durations)] / 1e3
        self.calls += 1
        return []


@pytest.fixture
def stubs(monkeypatch: pytest.MonkeyPatch):
    clock, log, made = _Clock(), [], {}
    plans = {
        "a": (["x"], [5.0, 1.0, 3.0, 2.0, 4.0]),
        "b": (["x", "mask"], [10.0]),
    }

    def make_session(model, *, threads=None, spinning=False, **_):
        made[model] = {"threads": threads, "spinning": spinning}
        inputs, durations = plans[model]
        return _Session(model, inputs, durations, clock, log)

    monkeypatch.setattr(runtime, "make_session", make_session)
    monkeypatch.setattr(timing, "time", clock)
    return log, made


def test_models_run_interleaved_after_warmup(stubs):
    log, made = stubs
    feeds = {"x": np.zeros(2), "mask": np.ones(2), "unused": np.ones(1)}
    measure_latency({"a": "a", "b": "b"}, feeds, runs=3, warmup=2, threads=4)
    assert [name for name, _ in log] == ["a", "b"] * 5  # 2 warm-up rounds, then 3 timed
    # each session gets only the inputs it takes
    assert {name: keys for name, keys in log} == {"a": ["x"], "b": ["mask", "x"]}
    assert made == {
        "a": {"threads": 4, "spinning": False},
        "b": {"threads": 4, "spinning": False},
    }


def test_stats_are_median_and_percentiles_of_the_timed_runs(stubs):
    stats = measure_latency({"a": "a", "b": "b"}, {"x": np.zeros(1)}, runs=5, warmup=0)
    times = [5.0, 1.0, 3.0, 2.0, 4.0]
    a = stats["a"]
    assert isinstance(a, LatencyStats) and a.runs == 5
    assert a.median_ms == pytest.approx(statistics.median(times))
    assert a.p10_ms == pytest.approx(float(np.percentile(times, 10)))
    assert a.p90_ms == pytest.approx(float(np.percentile(times, 90)))
    assert stats["b"].median_ms == pytest.approx(10.0)
    assert stats["b"].median_ms / a.median_ms == pytest.approx(10 / 3)


def test_warmup_runs_are_not_timed(stubs):
    # a's first two runs (5 and 1 ms) are warm-up: the timed ones are 3, 2, 4
    stats = measure_latency({"a": "a"}, {"x": np.zeros(1)}, runs=3, warmup=2)
    assert stats["a"].median_ms == pytest.approx(3.0)
    assert stats["a"].p10_ms == pytest.approx(float(np.percentile([3.0, 2.0, 4.0], 10)))


def test_runs_must_be_positive(stubs):
    log, _ = stubs
    with pytest.raises(ValueError, match="runs must be >= 1"):
        measure_latency({"a": "a"}, {"x": np.zeros(1)}, runs=0)
    assert log == []


def test_to_dict_round_trips_the_fields():
    s = LatencyStats(median_ms=2.0, p10_ms=1.0, p90_ms=3.0, runs=7)
    assert s.to_dict() == {"median_ms": 2.0, "p10_ms": 1.0, "p90_ms": 3.0, "runs": 7}
    assert LatencyStats(**s.to_dict()) == s


def test_real_sessions_on_a_tiny_model():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    stats = measure_latency({"m": model, "n": model}, {"x": np.ones((1, 4), np.float32)}, runs=3)
    assert set(stats) == {"m", "n"}
    for s in stats.values():
        assert s.runs == 3 and 0 < s.p10_ms <= s.median_ms <= s.p90_ms
