"""benchmarks/ddp_scaling.py's pure helpers: round order, per-round ratios, the prediction."""

from __future__ import annotations

import pytest

from dptrain.bench import predict as P
from tests.bench import load_benchmark


@pytest.fixture(scope="module")
def ds():
    return load_benchmark("ddp_scaling")


def test_round_order_alternates_abba(ds) -> None:
    assert ds.round_order(0) == ["ddp1", "single", "ddp2", "ceiling", "ddp2_gloo"]
    assert ds.round_order(1) == ["ddp2_gloo", "ceiling", "ddp2", "single", "ddp1"]
    assert ds.round_order(2) == ds.round_order(0)
    for r in range(4):  # ddp2 always sits between the two runs its ratios are taken against
        order = ds.round_order(r)
        i = order.index("ddp2")
        assert {order[i - 1], order[i + 1]} == {"single", "ceiling"}


def test_spread_is_median_min_max(ds) -> None:
    s = ds.spread([1.56, 2.00, 1.90, 1.88])
    assert s["median"] == pytest.approx(1.89)
    assert (s["min"], s["max"], s["n"]) == (1.56, 2.00, 4)
    assert s["values"] == [1.56, 2.00, 1.90, 1.88]
    assert ds.spread([])["median"] is None


def test_round_ratios(ds) -> None:
    r = ds.round_ratios({"single": 2000.0, "ddp2": 3800.0, "ceiling": 4000.0,
                         "ddp2_gloo": 3400.0})
    assert r["ddp2_over_ceiling"] == pytest.approx(0.95)
    assert r["ddp2_over_single"] == pytest.approx(1.9)
    assert r["ddp2_gloo_over_ceiling"] == pytest.approx(0.85)
    assert r["ddp2_gloo_over_single"] == pytest.approx(1.7)
    assert r["ceiling_over_single"] == pytest.approx(2.0)


def test_predict_ddp2_is_contended_step_plus_allreduce(ds) -> None:
    # 1 process: 64 samples in 32 ms; the ceiling: 2 x 64 samples per 40 ms (k = 1.25);
    # the all-reduce of 116,136 bytes: 50 µs + 116136 / 1e9 s
    fit = P.Fit(alpha_s=25e-6, beta_Bps=1e9, rel_rms=0.0, points=5)
    out = ds.predict_ddp2(base_sps=2000.0, single_sps=2000.0, ceiling_sps=3200.0, batch=64,
                          grad_bytes=116_136, fit=fit)
    ar = 2 * 25e-6 + 116_136 / 1e9
    assert out["contention_factor"] == pytest.approx(1.25)
    assert out["buckets"] == 1
    assert out["allreduce_s"] == pytest.approx(ar)
    assert out["comm_exposed_s"] == pytest.approx(ar)  # one bucket: nothing hides under backward
    assert out["predicted_step_s"] == pytest.approx(0.040 + ar)
    assert out["predicted_samples_per_s"] == pytest.approx(128 / (0.040 + ar))


def test_predict_ddp2_free_comm_is_the_ceiling(ds) -> None:
    fit = P.Fit(alpha_s=0.0, beta_Bps=float("inf"), rel_rms=0.0, points=2)
    out = ds.predict_ddp2(base_sps=2200.0, single_sps=2200.0, ceiling_sps=4100.0, batch=64,
                          grad_bytes=116_136, fit=fit)
    assert out["predicted_samples_per_s"] == pytest.approx(4100.0)


def test_predict_ddp2_steps_from_the_base_contention_from_single(ds) -> None:
    # 1-process DDP: 40 ms per step; plain process 32 ms alone, 40 ms per process in the ceiling
    fit = P.Fit(alpha_s=0.0, beta_Bps=float("inf"), rel_rms=0.0, points=2)
    out = ds.predict_ddp2(base_sps=1600.0, single_sps=2000.0, ceiling_sps=3200.0, batch=64,
                          grad_bytes=116_136, fit=fit)
    assert out["contention_factor"] == pytest.approx(1.25)
    assert out["predicted_step_s"] == pytest.approx(0.040 * 1.25)
    assert out["predicted_samples_per_s"] == pytest.approx(128 / 0.050)


def test_concurrent_rate_counts_only_the_common_window(ds) -> None:
    # process a: 10 steps/s from t=0 to t=10; b starts at t=4 at 5 steps/s until t=12
    a = [[float(t), 10.0 * t] for t in range(0, 11)]
    b = [[float(t), 5.0 * (t - 4)] for t in range(4, 13)]
    out = ds.concurrent_rate([a, b], batch=64)
    assert out["window_s"] == pytest.approx(6.0)  # t = 4 .. 10
    assert out["per_process"] == [pytest.approx(640.0), pytest.approx(320.0)]
    assert out["samples_per_s"] == pytest.approx(960.0)


def test_concurrent_rate_interpolates_between_records(ds) -> None:
    a = [[0.0, 0.0], [2.0, 20.0], [4.0, 40.0]]
    b = [[1.0, 0.0], [3.0, 10.0], [5.0, 20.0]]
    out = ds.concurrent_rate([a, b], batch=1)
    assert out["window_s"] == pytest.approx(3.0)  # t = 1 .. 4
    assert out["per_process"] == [pytest.approx(10.0), pytest.approx(5.0)]


def test_concurrent_rate_none_without_a_long_enough_window(ds) -> None:
    a = [[0.0, 0.0], [1.0, 10.0]]
    b = [[0.8, 0.0], [2.0, 10.0]]
    assert ds.concurrent_rate([a, b], batch=64) is None
    assert ds.concurrent_rate([a, [[0.5, 0.0]]], batch=64) is None


def test_ceiling_for_prediction_prefers_the_common_window(ds) -> None:
    run = {"samples_per_s": 3000.0, "concurrent": {"samples_per_s": 3300.0}}
    assert ds.ceiling_for_prediction(run) == (3300.0, "concurrent window")
    sps, source = ds.ceiling_for_prediction({"samples_per_s": 3000.0, "concurrent": None})
    assert sps == 3000.0 and source.startswith("whole runs")


def test_predict_ddp2_waits_for_the_slower_process(ds) -> None:
    # the ceiling's per-step times: 36 or 44 ms, equally often (mean 40 ms); two processes
    # drawing independently: the slower is 44 ms 3 times in 4, E[max] = 42 ms (factor 1.05)
    fit = P.Fit(alpha_s=0.0, beta_Bps=float("inf"), rel_rms=0.0, points=2)
    out = ds.predict_ddp2(base_sps=2000.0, single_sps=2000.0, ceiling_sps=3200.0, batch=64,
                          grad_bytes=116_136, fit=fit, step_times=[0.036, 0.044] * 50)
    assert out["straggler_factor"] == pytest.approx(1.05)
    assert out["predicted_step_s"] == pytest.approx(0.042)
    assert out["without_straggler"]["predicted_step_s"] == pytest.approx(0.040)


def test_step_times_per_step_within_the_window(ds) -> None:
    log = [[0.0, 0.0], [0.1, 1.0], [0.3, 2.0], [0.6, 5.0], [0.7, 6.0]]
    assert ds.step_times(log) == pytest.approx([0.1, 0.2, 0.1, 0.1, 0.1, 0.1])
    assert ds.step_times(log, start=0.1, end=0.6) == pytest.approx([0.2, 0.1, 0.1, 0.1])
    run = {"parts": [{"log": log}, {"log": [[0.2, 0.0], [0.5, 1.0], [0.9, 2.0]]}],
           "concurrent": {"start": 0.2, "end": 0.7}}
    assert ds.ceiling_step_times(run) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.3])
