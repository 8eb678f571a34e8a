"""Calibration statistics, threshold methods, scales, the cache and the Calibrator."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_edge.errors import ConfigError, DataError
from onnxslim_edge.passes.quantize import calibrate as cal
from onnxslim_edge.passes.quantize.calibrate import (
    Calibrator,
    TensorStats,
    amax_entropy,
    amax_minmax,
    amax_mse,
    amax_percentile,
    cache_entry,
    compute_amax,
    compute_range,
    entropy_bin,
    entropy_divergences,
    estimated_sqnr_db,
    load_cache,
    mse_bin,
    mse_errors,
    save_cache,
    scale_from_amax,
)

# ----------------------------------------------------------------------- helpers


def stats_of(*arrays: np.ndarray, bins: int = 2048) -> TensorStats:
    s = TensorStats(bins)
    for a in arrays:
        s.update(a)
    return s


def first_best(scores: np.ndarray) -> int:
    best = float(np.min(scores))
    return int(np.flatnonzero(scores <= best + 1e-10 + 1e-9 * abs(best))[0])


def reference_entropy(hist: np.ndarray, levels: int = 128, eps: float = 1e-4):
    """TensorRT's KL search written plainly: build P and Q for every candidate.

    Bin j of candidate i belongs to level floor(j * levels / i) (TensorRT's even
    spread). P and Q are both divided by the whole count, so Q lacks the clipped mass.
    """
    h = np.asarray(hist, dtype=np.float64)
    kls = []
    for i in range(levels, h.size + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        level = np.arange(i) * levels // i
        sums = np.bincount(level, weights=h[:i], minlength=levels)
        nonzero = np.bincount(level, weights=(p > 0).astype(float), minlength=levels)
        q = np.where(p > 0, sums[level] / np.maximum(nonzero[level], 1), 0.0)
        zeros = q == 0
        n0, n1 = int(zeros.sum()), int((~zeros).sum())
        if n1 == 0:
            kls.append(math.inf)
            continue
        q = q + eps * zeros - (eps * n0 / n1) * (~zeros)
        used = p > 0
        if (q[used] <= 0).any():
            kls.append(math.inf)
            continue
        pn, qn = p / h.sum(), q / h.sum()
        kls.append(float(np.sum(pn[used] * np.log(pn[used] / qn[used]))))
    kls = np.array(kls)
    return levels + first_best(kls), kls


def brute_force_mse(hist: np.ndarray, levels: int = 127):
    h = np.asarray(hist, dtype=np.float64)
    center = np.arange(h.size) + 0.5
    errs = []
    for i in range(1, h.size + 1):
        t = float(i)
        rounding = h[:i].sum() * (t / levels) ** 2 / 12
        clipping = np.sum(h[i:] * (center[i:] - t) ** 2)
        errs.append(rounding + clipping)
    errs = np.array(errs)
    return first_best(errs) + 1, errs


RNG_SEED = 20240601


@functools.cache
def fixed_histograms() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(RNG_SEED)
    gauss = np.concatenate([rng.standard_normal(200_000), rng.uniform(8, 30, 25)])
    lap = rng.laplace(0, 1, 200_000)
    relu = np.maximum(rng.standard_normal(100_000) * 2, 0)
    gapped = np.zeros(512)
    gapped[[0, 3, 4, 40, 41, 42, 200, 201]] = [50, 7, 9, 1000, 30, 2, 3, 1]
    gapped[500] = 4  # lone outliers far beyond an empty stretch
    return {
        "gauss+outliers": stats_of(gauss.astype(np.float32)).hist,
        "laplace": stats_of(lap.astype(np.float32)).hist,
        "relu": stats_of(relu.astype(np.float32)).hist,
        "gapped": gapped,
    }


# ---------------------------------------------------------------- TensorStats


def test_histogram_is_independent_of_batching_and_merging() -> None:
    rng = np.random.default_rng(0)
    # growing ranges force repeated re-binning; outliers arrive late
    parts = [rng.standard_normal(3000).astype(np.float32) * 2.0**k for k in range(-3, 6)]
    parts.append(np.array([1234.5, -0.0, 0.0, -77.0], np.float32))
    whole = stats_of(np.concatenate(parts))
    small = stats_of(*parts)
    reversed_ = stats_of(*parts[::-1])
    merged = stats_of(*parts[:4])
    merged.merge(stats_of(*parts[4:]))
    for s in (small, reversed_, merged):
        np.testing.assert_array_equal(s.hist, whole.hist)
        assert (s.min, s.max, s.count) == (whole.min, whole.max, whole.count)
        assert s.hist_max == whole.hist_max == 2048.0  # smallest power of two > 1234.5
    assert whole.hist.sum() == whole.count == sum(p.size for p in parts)


def test_histogram_memory_is_flat() -> None:
    rng = np.random.default_rng(1)
    s = TensorStats(2048)
    sizes = set()
    for k in range(200):
        s.update(rng.standard_normal(256).astype(np.float32) * (1 + k))
        sizes.add((s.hist.shape, s.hist.nbytes))
    assert sizes == {((2048,), 2048 * 8)}
    assert s.count == 200 * 256


def test_non_power_of_two_bins_stay_within_one_bin() -> None:
    rng = np.random.default_rng(2)
    parts = [rng.standard_normal(5000).astype(np.float32) * (k + 1) for k in range(6)]
    whole, small = stats_of(np.concatenate(parts), bins=1000), stats_of(*parts, bins=1000)
    assert whole.hist.sum() == small.hist.sum() == 30000
    # a value may only move to a neighbouring bin, so the CDFs differ by a few counts
    assert np.abs(np.cumsum(whole.hist - small.hist)).max() <= 3


def test_rebinning_places_values_in_the_right_bins() -> None:
    s = TensorStats(2048)
    s.update(np.zeros(5, np.float32))  # zeros only: no range yet, counted in bin 0
    assert s.hist_max == 0.0 and s.hist[0] == 5
    s.update(np.array([0.3], np.float32))
    assert s.hist_max == 0.5
    assert s.hist[int(np.float32(0.3) / 0.5 * 2048)] == 1
    s.update(np.array([-3.0, 0.5], np.float32))  # 0.5 must not sit in the last bin of [0, 0.5)
    assert s.hist_max == 4.0
    assert s.hist[int(np.float32(0.3) / 4 * 2048)] == 1
    assert s.hist[256] == 1 and s.hist[1536] == 1 and s.hist[0] == 5
    assert (s.min, s.max, s.count) == (-3.0, 0.5, 8)


def test_non_finite_values_are_counted_and_left_out() -> None:
    s = stats_of(np.array([1.0, np.nan, -np.inf, -2.0], np.float32))
    assert (s.nonfinite, s.count, s.min, s.max) == (2, 2, -2.0, 1.0)
    assert s.hist.sum() == 2


def test_stats_reject_bad_input() -> None:
    with pytest.raises(ConfigError, match="bins"):
        TensorStats(0)
    with pytest.raises(DataError, match="cannot collect statistics"):
        TensorStats().update(np.array(["a"]))
    with pytest.raises(ConfigError, match="cannot merge"):
        TensorStats(64).merge(TensorStats(128))


# ------------------------------------------------------------------ thresholds


def test_minmax_is_the_exact_absmax() -> None:
    s = stats_of(np.array([0.25, -3.1, 2.0], np.float32))
    assert amax_minmax(s) == pytest.approx(3.1, rel=1e-7)
    assert compute_amax(s, "minmax") == amax_minmax(s)


@pytest.mark.parametrize("p", [50.0, 99.0, 99.99])
def test_percentile_on_a_known_distribution(p: float) -> None:
    # |x| is uniform on [0, 3): its p-th percentile is 3 * p / 100
    n = 400_000
    mags = (np.arange(n, dtype=np.float64) + 0.5) / n * 3.0
    signs = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    s = stats_of((mags * signs).astype(np.float32))
    got = amax_percentile(s, p)
    assert got == pytest.approx(3.0 * p / 100, abs=s.bin_width)
    assert got == pytest.approx(np.percentile(mags, p), abs=s.bin_width)


def test_percentile_rejects_bad_p() -> None:
    with pytest.raises(ConfigError, match="percentile"):
        amax_percentile(stats_of(np.ones(3)), 0)
    with pytest.raises(ConfigError, match="percentile"):
        amax_percentile(stats_of(np.ones(3)), 100.5)


@pytest.mark.parametrize("name", ["gauss+outliers", "laplace", "relu", "gapped"])
def test_entropy_matches_reference_implementation(name: str) -> None:
    hist = fixed_histograms()[name]
    want_bin, want_kl = reference_entropy(hist)
    cand, kl = entropy_divergences(hist)
    assert cand[0] == 128 and cand[-1] == hist.size
    finite = np.isfinite(want_kl)
    np.testing.assert_array_equal(np.isfinite(kl), finite)
    np.testing.assert_allclose(kl[finite], want_kl[finite], rtol=1e-9, atol=1e-12)
    assert entropy_bin(hist) == want_bin


def test_entropy_levels_are_spread_evenly() -> None:
    """No jump where the bins per level go from 1 to 2 (i = 255 -> 256).

    Giving the last level the remainder (i // 128 bins per level) made candidate 255
    quantize 127 of its 128 levels exactly: on this sample 256's divergence was 1.9x
    255's and 384's 2.9x 383's, and on PP-OCRv4 recognition the search picked 255 or
    383 for 29 of 298 tensors.
    """
    hist = fixed_histograms()["gauss+outliers"]
    cand, kl = entropy_divergences(hist)
    at = {int(i): float(k) for i, k in zip(cand, kl)}
    assert abs(at[256] - at[255]) < 0.01 * at[255]
    assert abs(at[384] - at[383]) < 0.01 * at[383]


def test_entropy_clips_outliers() -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(100_000), [60.0, -55.0]]).astype(np.float32)
    s = stats_of(x)
    amax = amax_entropy(s)
    assert 2.5 < amax < 10.0  # far below the outliers, beyond the bulk
    assert (amax / s.bin_width).is_integer()


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("laplace", 0.8, 1.6), ("student-t3", 0.6, 1.4), ("student-t2", 0.5, 1.5)],
)
def test_entropy_stays_near_the_percentile_on_heavy_tails(name: str, low: float, high: float):
    rng = np.random.default_rng(RNG_SEED)
    if name == "laplace":
        x = rng.laplace(0, 1, 200_000)
    else:
        x = rng.standard_t(int(name[-1]), 200_000)
    s = stats_of(x.astype(np.float32))
    ratio = amax_entropy(s) / np.percentile(np.abs(x), 99.99)
    assert low < ratio < high


def test_entropy_covers_the_other_signs_tail() -> None:
    """99 % of the values in [-2.25, 0] (a HardSwish's negative half), 1 % positive up
    to ~20: the |x| search clipped at 2.25 (amax 5.9), wiping out the positive signal."""
    rng = np.random.default_rng(RNG_SEED)
    bulk = -2.25 + 2.25 * rng.beta(0.3, 1.5, 99_000)
    tail = rng.exponential(4.0, 1_000)
    s = stats_of(np.concatenate([bulk, tail]).astype(np.float32))
    amax = amax_entropy(s)
    assert amax >= 0.8 * np.percentile(tail, 99.9)
    assert amax <= s.absmax
    # one sign alone: the same as the search over that sign's histogram
    only = stats_of(tail.astype(np.float32))
    h = only.hist.copy()
    h[0] = min(h[0], h[1])
    assert amax_entropy(only) == min(entropy_bin(h) * only.bin_width, only.absmax)


def test_entropy_does_not_clip_at_the_minimum() -> None:
    """All values far from 0 (an SE block's gate input): with Q renormalized over the
    kept values, a threshold at the smallest value had divergence 0 and won (amax 1.16
    for values in [1.1, 10.7]); the clipped mass now costs -log(kept fraction)."""
    x = 1.1 + np.random.default_rng(RNG_SEED).gamma(2.0, 1.0, 1280)
    s = stats_of(x.astype(np.float32))
    assert amax_entropy(s) >= np.percentile(x, 99)
    cand, kl = entropy_divergences(s.hist)
    kept = np.cumsum(s.hist)[cand - 1] / s.hist.sum()
    with np.errstate(divide="ignore"):
        assert (kl >= -np.log(kept) - 1e-12).all()  # Gibbs: KL >= -log(sum Q)


def test_entropy_on_a_bimodal_tensor_keeps_the_far_mode() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = np.concatenate([rng.normal(0, 0.1, 150_000), rng.normal(3, 0.3, 50_000)])
    s = stats_of(x.astype(np.float32))
    assert amax_entropy(s) >= np.percentile(x, 99.9)


def test_negative_histogram_is_independent_of_batching() -> None:
    rng = np.random.default_rng(8)
    parts = [rng.standard_normal(2000).astype(np.float32) * 2.0**k - 0.5 for k in range(-2, 5)]
    whole, small = stats_of(np.concatenate(parts)), stats_of(*parts[::-1])
    merged = stats_of(*parts[:3])
    merged.merge(stats_of(*parts[3:]))
    data = np.concatenate(parts)
    want = np.bincount((-data[data < 0] / whole.bin_width).astype(np.int64), minlength=whole.bins)
    for s in (whole, small, merged, whole.copy()):
        np.testing.assert_array_equal(s.neg, want)
        assert (s.hist >= s.neg).all()


def test_entropy_is_fast() -> None:
    import time

    hist = fixed_histograms()["laplace"]
    start = time.perf_counter()
    for _ in range(5):
        entropy_bin(hist)
    assert (time.perf_counter() - start) / 5 < 0.5  # one 2048-bin search, vectorized


@pytest.mark.parametrize("name", ["gauss+outliers", "laplace", "gapped"])
def test_mse_matches_brute_force(name: str) -> None:
    hist = fixed_histograms()[name]
    want_bin, want = brute_force_mse(hist)
    np.testing.assert_allclose(mse_errors(hist), want, rtol=1e-9)
    assert mse_bin(hist) == want_bin


def test_mse_threshold_is_near_optimal_on_real_quantization() -> None:
    rng = np.random.default_rng(4)
    x = rng.laplace(0, 1, 100_000).astype(np.float32)
    s = stats_of(x)

    def real_mse(amax: float) -> float:
        scale = amax / 127
        return float(np.mean((x - np.clip(np.rint(x / scale), -127, 127) * scale) ** 2))

    chosen = amax_mse(s)
    grid = np.linspace(0.5, s.absmax, 400)
    best = min(real_mse(a) for a in grid)
    assert chosen < 0.9 * s.absmax  # it clips the tail
    assert real_mse(chosen) <= 1.05 * best


def test_compute_amax_dispatch_and_unknown_method() -> None:
    s = stats_of(np.random.default_rng(5).standard_normal(10_000).astype(np.float32))
    assert compute_amax(s, "percentile", percentile=90) == amax_percentile(s, 90)
    assert compute_amax(s, "entropy") == amax_entropy(s)
    assert compute_amax(s, "mse") == amax_mse(s)
    with pytest.raises(ConfigError, match="unknown calibration method 'kl'; valid: minmax"):
        compute_amax(s, "kl")


def test_all_zero_tensor() -> None:
    s = stats_of(np.zeros(10, np.float32))
    assert [compute_amax(s, m) for m in cal.METHODS] == [0.0] * 4
    assert scale_from_amax(0.0) == 1.0


@pytest.mark.parametrize(
    ("amax", "bits", "symmetric", "want"),
    [
        (12.7, 8, True, 0.1),
        (127.0, 8, True, 1.0),
        (1.0, 8, True, 1 / 127),
        (7.0, 4, True, 1.0),
        (255.0, 8, False, 2.0),
        (1.0, 8, False, 2 / 255),
    ],
)
def test_scale_from_amax(amax: float, bits: int, symmetric: bool, want: float) -> None:
    assert scale_from_amax(amax, bits, symmetric) == pytest.approx(want, rel=1e-12)


def test_scale_from_amax_rejects_bad_values() -> None:
    for amax in (-1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="amax"):
            scale_from_amax(amax)
    with pytest.raises(ConfigError, match="bits"):
        scale_from_amax(1.0, bits=1)


# ------------------------------------------------------------------------ cache


def test_cache_round_trip_and_hand_edit(tmp_path) -> None:
    s = stats_of(np.array([-2.0, 0.5, 1.5], np.float32))
    cache = {
        "conv1_out": cache_entry(s, "minmax"),
        "x": cache_entry(s, "percentile", percentile=99),
    }
    path = tmp_path / "calib.json"
    save_cache(path, cache)
    assert load_cache(path) == cache
    assert cache["conv1_out"] == {
        "amax": 2.0,
        "method": "minmax",
        "min": -2.0,
        "max": 1.5,
        "lo": -2.0,
        "hi": 1.5,
    }
    assert cache["x"]["method"] == "percentile:99"
    raw = json.loads(path.read_text())
    raw["conv1_out"]["amax"] = 4  # edited by hand, an int is fine
    raw["extra"] = {"amax": 1.25, "method": "manual"}
    path.write_text(json.dumps(raw))
    loaded = load_cache(path)
    assert loaded["conv1_out"]["amax"] == 4.0
    assert loaded["extra"] == {
        "amax": 1.25,
        "method": "manual",
        "min": None,
        "max": None,
        "lo": None,
        "hi": None,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.json"]  # no temp files left


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"t": 3}', "entry must be an object"),
        ('{"t": {"amax": "big", "method": "minmax"}}', "'amax' must be a finite number"),
        ('{"t": {"amax": NaN, "method": "minmax"}}', "not valid JSON"),
        ('{"t": {"amax": -1, "method": "minmax"}}', "'amax' must be a finite number >= 0"),
        ('{"t": {"amax": true, "method": "minmax"}}', "'amax' must be a finite number"),
        ('{"t": {"amax": 1}}', "missing 'method'"),
        ('{"t": {"amax": 1, "method": "minmax", "scale": 2}}', "unknown key 'scale'"),
        ('{"t": {"amax": 1, "method": "minmax", "min": 2, "max": 1}}', "greater than 'max'"),
        ('{"t": {"amax": 1, "method": ""}}', "'method' must be a non-empty string"),
    ],
)
def test_malformed_cache_is_a_data_error(tmp_path, text: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as info:
        load_cache(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_cache_file(tmp_path) -> None:
    with pytest.raises(DataError, match="calibration cache not found"):
        load_cache(tmp_path / "nope.json")


def test_save_cache_validates_and_leaves_no_file(tmp_path) -> None:
    path = tmp_path / "c.json"
    with pytest.raises(DataError, match="'amax'"):
        save_cache(path, {"t": {"amax": math.inf, "method": "minmax"}})
    assert not path.exists()


# -------------------------------------------------------------------- Calibrator


def tiny_conv_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(6)
    w = rng.standard_normal((2, 1, 3, 3)).astype(np.float32)
    b = np.array([0.5, -0.25], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["conv_out"], name="conv"),
            helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
            helper.make_node("ReduceMean", ["relu_out"], ["y"], name="mean", keepdims=0),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, w, b


def numpy_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(x[:, 0], (3, 3), axis=(1, 2))
    return np.einsum("nhwij,oij->nohw", windows, w[:, 0]) + b[None, :, None, None]


def test_calibrator_matches_numpy_statistics() -> None:
    model, w, b = tiny_conv_model()
    before = model.SerializeToString()
    rng = np.random.default_rng(7)
    batches = [
        rng.standard_normal((n, 1, 5, 5)).astype(np.float32) * (k + 1)
        for k, n in enumerate([2, 3, 1, 4])
    ]
    feeds = ({"x": x} for x in batches)  # a generator: consumed once, never stored
    stats = Calibrator(model, ["conv_out", "relu_out", "x", "W"]).collect(feeds)
    assert model.SerializeToString() == before
    conv = np.concatenate([numpy_conv(x, w, b) for x in batches]).astype(np.float64)
    relu = np.maximum(conv, 0)
    xs = np.concatenate(batches)
    for name, ref in (("conv_out", conv), ("relu_out", relu), ("x", xs), ("W", w)):
        s = stats[name]
        assert s.count == ref.size, name
        assert s.min == pytest.approx(ref.min(), rel=1e-5, abs=1e-6), name
        assert s.max == pytest.approx(ref.max(), rel=1e-5, abs=1e-6), name
        assert s.hist.sum() == ref.size
    np.testing.assert_array_equal(stats["x"].hist, stats_of(*batches).hist)
    np.testing.assert_array_equal(stats["W"].hist, stats_of(w).hist)  # counted once
    assert stats["relu_out"].min == 0.0


def test_calibrator_cuts_runs_to_its_fetch_budget() -> None:
    """Runs are cut on axis 0 so the fetched tensors stay within the budget; the
    statistics are the same as from whole batches."""
    model, _, _ = tiny_conv_model()
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((8, 1, 5, 5)).astype(np.float32) for _ in range(2)]
    whole = Calibrator(model, ["conv_out", "relu_out"])
    ref = whole.collect([{"x": x} for x in batches])
    assert whole._rows is not None and whole._rows >= 8  # tiny tensors: whole batches
    cut = Calibrator(model, ["conv_out", "relu_out"])
    per_sample = 2 * 2 * 3 * 3 * 4  # two fetched tensors of 2 x 3 x 3 float32
    cut.fetch_budget = 3 * per_sample
    runs: list[int] = []
    real = cut._make_session

    def counting_session():
        session = real()

        class Spy:
            def run(self, names, feed):
                runs.append(len(feed["x"]))
                return session.run(names, feed)

        return Spy()

    cut._make_session = counting_session
    got = cut.collect([{"x": x} for x in batches])
    assert runs == [1, 3, 3, 1, 3, 3, 2]  # one sample sizes the runs, then 3 at a time
    for name in ("conv_out", "relu_out"):
        np.testing.assert_array_equal(got[name].hist, ref[name].hist)
        assert (got[name].min, got[name].max) == (ref[name].min, ref[name].max)


def test_calibrator_errors() -> None:
    model, _, _ = tiny_conv_model()
    with pytest.raises(ConfigError, match="'nope' is not in the model"):
        Calibrator(model, ["nope"])
    calib = Calibrator(model, ["conv_out"])
    with pytest.raises(DataError, match="no batches"):
        calib.collect([])
    with pytest.raises(DataError, match="batch 1: ONNX Runtime failed"):
        calib.collect([{"x": np.zeros((1, 2, 5, 5), np.float32)}])
    with pytest.raises(DataError, match="batch 1: expected a dict"):
        calib.collect([np.zeros((1, 1, 5, 5), np.float32)])
    with pytest.raises(DataError, match="input 'x' is missing"):
        Calibrator(model, ["x"]).collect([{}])


def test_entropy_is_not_dominated_by_relu_zeros() -> None:
    """ReLU outputs are half exact zeros: the threshold must still cover the bulk."""
    from onnxslim_edge.passes.quantize.calibrate import TensorStats, compute_amax

    x = np.maximum(np.random.default_rng(0).standard_normal(200_000), 0).astype(np.float32)
    stats = TensorStats()
    stats.update(x)
    assert compute_amax(stats, "entropy") >= np.percentile(x[x > 0], 99.9)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_range_thresholds_each_sign_alone(method: str) -> None:
    """A HardSwish-like tensor: a dense negative half in [-0.375, 0] and a long positive
    tail. Each side's threshold comes from its own values: the negative side stays
    within its own extreme, the positive side is not clipped to the negative bulk."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(200_000).astype(np.float32) * 3
    y = x * np.clip(x + 3, 0, 6) / 6
    s = stats_of(y)
    lo, hi = compute_range(s, method)
    assert float(y.min()) <= lo <= 0 and 0 < hi <= float(y.max())
    assert lo == pytest.approx(float(y.min()), rel=0.05) or method in ("percentile", "mse")
    assert hi >= 0.5 * float(np.percentile(y[y > 0], 99.9))
    # the same threshold as the method gives a one-signed tensor of those magnitudes
    pos = stats_of(np.concatenate([y[y >= 0], np.zeros(0, np.float32)]))
    assert hi == pytest.approx(compute_range(pos, method)[1], rel=1e-6)


def test_range_rejects_bad_method_and_percentile() -> None:
    s = stats_of(np.array([-1.0, 2.0], np.float32))
    with pytest.raises(ConfigError, match="unknown calibration method"):
        compute_range(s, "median")
    with pytest.raises(ConfigError, match="0 < p <= 100"):
        compute_range(s, "percentile", percentile=0)


def test_estimated_sqnr_matches_fake_quantization() -> None:
    """The histogram estimate agrees with quantizing the samples themselves, for a
    symmetric int8 grid that clips and an asymmetric uint8 one."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(200_000).astype(np.float64) * 2 + 0.5
    s = stats_of(x.astype(np.float32))

    def measured(scale: float, qmin: int, qmax: int) -> float:
        q = np.clip(np.rint(x / scale), qmin, qmax) * scale
        return 10 * np.log10((x**2).sum() / ((x - q) ** 2).sum())

    for scale, qmin, qmax in ((6.0 / 127, -128, 127), (0.02, -100, 155), (0.05, -128, 127)):
        assert estimated_sqnr_db(s, scale, qmin, qmax) == pytest.approx(
            measured(scale, qmin, qmax), abs=0.3
        )
    assert estimated_sqnr_db(TensorStats(), 0.1, -128, 127) is None


# ------------------------------------------------------------------ methods table


def test_methods_are_one_table_and_unknown_names_are_refused() -> None:
    """Every caller dispatches through `THRESHOLDS`: the per-sign threshold used to fall
    through to mse for any unknown name."""
    s = stats_of(np.random.default_rng(5).normal(size=4000).astype(np.float32))
    assert cal.METHODS == tuple(cal.THRESHOLDS) == ("minmax", "percentile", "entropy", "mse")
    for name, method in cal.THRESHOLDS.items():
        assert compute_amax(s, name, percentile=99.0) == method.amax(s, 99.0)
        lo, hi = compute_range(s, name, percentile=99.0)
        assert hi == cal._side_threshold(s, False, name, 99.0)
        assert lo == -cal._side_threshold(s, True, name, 99.0)
    valid = "valid: minmax, percentile, entropy, mse"
    for call in (
        lambda: cal._side_threshold(s, False, "kl", 99.0),
        lambda: compute_range(s, "kl"),
        lambda: compute_amax(s, "kl"),
        lambda: cal.cache_entry(s, "kl"),
        lambda: cal.threshold_method(None),
    ):
        with pytest.raises(ConfigError, match=f"unknown calibration method .*; {valid}$"):
            call()
    from onnxslim_edge.passes.quantize.config import QuantizeConfig

    with pytest.raises(
        ConfigError, match=f"^quantize.method: unknown calibration method 'kl'; {valid}$"
    ):
        QuantizeConfig(method="kl")
