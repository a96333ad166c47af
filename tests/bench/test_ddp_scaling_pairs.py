"""benchmarks/ddp_scaling.py's pure helpers: round order, per-round ratios, the prediction."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dptrain.bench import predict as P

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ddp_scaling.py"


@pytest.fixture(scope="module")
def ds():
    spec = importlib.util.spec_from_file_location("ddp_scaling_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_round_order_alternates_abba(ds) -> None:
    assert ds.round_order(0) == ["single", "ddp2", "ceiling", "ddp2_gloo"]
    assert ds.round_order(1) == ["ddp2_gloo", "ceiling", "ddp2", "single"]
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
    out = ds.predict_ddp2(single_sps=2000.0, ceiling_sps=3200.0, batch=64, grad_bytes=116_136,
                          fit=fit)
    ar = 2 * 25e-6 + 116_136 / 1e9
    assert out["contention_factor"] == pytest.approx(1.25)
    assert out["buckets"] == 1
    assert out["allreduce_s"] == pytest.approx(ar)
    assert out["comm_exposed_s"] == pytest.approx(ar)  # one bucket: nothing hides under backward
    assert out["predicted_step_s"] == pytest.approx(0.040 + ar)
    assert out["predicted_samples_per_s"] == pytest.approx(128 / (0.040 + ar))


def test_predict_ddp2_free_comm_is_the_ceiling(ds) -> None:
    fit = P.Fit(alpha_s=0.0, beta_Bps=float("inf"), rel_rms=0.0, points=2)
    out = ds.predict_ddp2(single_sps=2200.0, ceiling_sps=4100.0, batch=64, grad_bytes=116_136,
                          fit=fit)
    assert out["predicted_samples_per_s"] == pytest.approx(4100.0)
