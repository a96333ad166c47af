"""The cost model, the nccl-tests formulas and the predictor, on numbers known in advance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dptrain.bench import predict as P
from dptrain.bench.comm import algbw, busbw


def test_algbw_busbw_nccl_tests_definitions() -> None:
    # 1 MB in 1 ms: algbw 1 GB/s; ring all-reduce over 4 ranks moves 2*3/4 of it per link
    assert algbw(1e6, 1e-3) == pytest.approx(1e9)
    assert busbw(1e6, 1e-3, 4) == pytest.approx(1.5e9)
    assert busbw(1e6, 1e-3, 2) == pytest.approx(1e9)  # n = 2: busbw == algbw


def test_efficiency_formula() -> None:
    assert P.efficiency(150.0, 2, 100.0) == pytest.approx(0.75)
    assert P.efficiency(400.0, 4, 100.0) == pytest.approx(1.0)


def test_allreduce_time_ring_model() -> None:
    # alpha * 2(n-1) + S * 2(n-1)/n / beta
    assert P.allreduce_time(8e6, 4, 1e-5, 1e9) == pytest.approx(6e-5 + 8e6 * 1.5 / 1e9)
    assert P.allreduce_time(8e6, 1, 1e-5, 1e9) == 0.0
    assert P.ring_steps(8) == 14


def _synthetic_points(alpha: float, beta: float, noise: float = 0.0
                      ) -> list[tuple[int, float, float]]:
    points = []
    for i, n in enumerate((2, 4, 8)):
        for j, size in enumerate(4096 * 4**k for k in range(8)):
            wobble = 1 + noise * math.sin(1.7 * i + 2.3 * j)  # deterministic "noise"
            points.append((n, float(size), P.allreduce_time(size, n, alpha, beta) * wobble))
    return points


@pytest.mark.parametrize("alpha,beta", [(50e-6, 3.1e9), (5e-6, 300e9), (200e-6, 0.5e9)])
def test_fit_recovers_alpha_beta_exactly(alpha: float, beta: float) -> None:
    fit = P.fit_cost_model(_synthetic_points(alpha, beta))
    assert fit.alpha_s == pytest.approx(alpha, rel=1e-6)
    assert fit.beta_Bps == pytest.approx(beta, rel=1e-6)
    assert fit.rel_rms < 1e-9
    assert fit.points == 24


def test_fit_recovers_alpha_beta_with_noise() -> None:
    fit = P.fit_cost_model(_synthetic_points(50e-6, 3.1e9, noise=0.03))
    assert fit.alpha_s == pytest.approx(50e-6, rel=0.05)
    assert fit.beta_Bps == pytest.approx(3.1e9, rel=0.05)
    assert 0 < fit.rel_rms < 0.05


def test_fit_single_n_identifies_both_parameters() -> None:
    points = [p for p in _synthetic_points(80e-6, 2e9) if p[0] == 2]
    fit = P.fit_cost_model(points)
    assert (fit.alpha_s, fit.beta_Bps) == (pytest.approx(80e-6), pytest.approx(2e9))


def test_fit_keeps_parameters_non_negative() -> None:
    # time falling with size: no bandwidth term can explain it -> latency only, beta = inf
    fit = P.fit_cost_model([(2, 4096.0, 2e-4), (2, 1e6, 1e-4)])
    assert fit.alpha_s > 0 and math.isinf(fit.beta_Bps)


def test_fit_needs_two_multi_process_points() -> None:
    with pytest.raises(ValueError, match="at least two"):
        P.fit_cost_model([(2, 4096.0, 1e-4), (1, 4096.0, 1e-6)])


def test_bucket_sizes() -> None:
    mib = 1024 * 1024
    assert P.bucket_sizes(116_136, 25) == [116_136]
    assert P.bucket_sizes(60 * mib, 25) == [25 * mib, 25 * mib, 10 * mib]
    assert P.bucket_sizes(3 * mib, 25, first_bucket_bytes=mib) == [mib, 2 * mib]


def test_comm_schedule_overlap() -> None:
    cost = lambda nbytes, n: 1e-3  # noqa: E731 - every bucket takes 1 ms
    # one bucket: ready only when backward ends -> all of it exposed
    assert P.comm_schedule(0.3, [100], 2, cost, 2 / 3) == pytest.approx((1e-3, 1e-3))
    # four buckets during a 200 ms backward: all but the last hide
    total, exposed = P.comm_schedule(0.3, [25, 25, 25, 25], 2, cost, 2 / 3)
    assert total == pytest.approx(4e-3) and exposed == pytest.approx(1e-3)
    # communication slower than backward: it piles up and shows
    slow = lambda nbytes, n: 0.1  # noqa: E731
    total, exposed = P.comm_schedule(0.3, [25, 25, 25, 25], 2, slow, 2 / 3)
    assert total == pytest.approx(0.4) and exposed == pytest.approx(0.25)
    assert P.comm_schedule(0.3, [100], 1, cost) == (0.0, 0.0)


def test_predict_step_and_scaling_table() -> None:
    link = P.Link("test", 1e9, 1e-4)
    row = P.predict_step(compute_s=0.1, data_s=0.01, global_batch_per_proc=64, n=4,
                         grad_bytes=1_000_000, bucket_cap_mb=25, cost=P.link_cost(link))
    comm = P.allreduce_time(1_000_000, 4, 1e-4, 1e9)
    assert row["step_s"] == pytest.approx(0.11 + comm)
    assert row["samples_per_s"] == pytest.approx(4 * 64 / (0.11 + comm))
    table = P.scaling_table(compute_s=0.1, data_s=0.01, batch=64, grad_bytes=1_000_000,
                            bucket_cap_mb=25, cost=P.link_cost(link))
    assert [r["n"] for r in table] == list(P.PREDICT_N)
    assert table[0]["efficiency"] == pytest.approx(1.0)
    effs = [r["efficiency"] for r in table]
    assert effs == sorted(effs, reverse=True) and effs[-1] < 1
    assert table[1]["efficiency"] == pytest.approx(0.11 / (0.11 + P.allreduce_time(1e6, 2, 1e-4,
                                                                                      1e9)))


def test_faster_links_predict_better_scaling() -> None:
    common = dict(compute_s=0.01, data_s=0.0, batch=64, grad_bytes=100 * 2**20,
                  bucket_cap_mb=25)
    by_link = {link.name: P.scaling_table(**common, cost=P.link_cost(link))[-1]["efficiency"]
               for link in P.STATED_LINKS}
    nvlink = next(v for k, v in by_link.items() if k.startswith("NVLink"))
    ethernet = next(v for k, v in by_link.items() if k.startswith("25 GbE"))
    assert nvlink > ethernet


def test_contention_factor() -> None:
    measured = {1: 1.0, 2: 2.0}  # 2 processes on 2 cores: each runs at half speed
    assert P.contention_factor(2, measured, cpu=True) == 2.0
    assert P.contention_factor(8, measured, cpu=True) == pytest.approx(8.0)  # capacity 1
    assert P.contention_factor(8, {1: 1.0, 2: 1.0}, cpu=True) == pytest.approx(4.0)
    assert P.contention_factor(8, measured, cpu=False) == 1.0
    assert P.contention_factor(3, {}, cpu=True) == 1.0


def test_prediction_error_sign() -> None:
    assert P.prediction_error(110.0, 100.0) == pytest.approx(10.0)
    assert P.prediction_error(90.0, 100.0) == pytest.approx(-10.0)


def test_target_profiles_and_parsing() -> None:
    assert set(P.TARGETS) == {"h100", "h200", "a100", "v100", "cpu-this"}
    assert P.TARGETS["h100"].peak["bf16"] == 989.4e12 and "bf16" not in P.TARGETS["v100"].peak
    assert P.parse_target("H100") == ("h100", None)
    assert P.parse_target("a100:tf32") == ("a100", "tf32")
    assert P.parse_target("cpu-this:bf16") == ("cpu-this", "bf16")  # peak measured later
    for bad, needle in (("b200", "unknown target"), ("h100:int4", "unknown precision"),
                        ("v100:bf16", "has no bf16"), ("h100:", "no precision after")):
        with pytest.raises(ValueError, match=needle):
            P.parse_target(bad)


def test_target_compute_from_flops() -> None:
    # a big step: arithmetic decides. 1e12 FLOP per sample x 3 x 100 samples
    big = P.target_compute(P.TARGETS["a100"], "bf16", train_flops_per_sample=3e12, batch=100,
                           mfu=0.5)
    assert big["compute_s"] == pytest.approx(3e14 / (312e12 * 0.5))
    assert big["bound"] == "arithmetic" and big["train_flops_per_step"] == 3e14
    assert "312 TFLOP/s x MFU 0.5" in big["source"]
    # the DDP tutorial's convnet at batch 64 on an H100 is launch-bound, and says so
    small = P.target_compute(P.TARGETS["h100"], "bf16", train_flops_per_sample=3 * 5_676_160,
                             batch=64)
    assert small["arithmetic_s"] == pytest.approx(3 * 5_676_160 * 64 / (989.4e12 * 0.35))
    assert small["compute_s"] == P.GPU_FLOOR_S and small["bound"] == "launch floor"
    assert "below the 0.2 ms launch floor" in small["source"]
    with pytest.raises(ValueError, match="no bf16 peak"):
        P.target_compute(P.TARGETS["v100"], "bf16", train_flops_per_sample=1, batch=1)
    with pytest.raises(ValueError, match="MFU"):
        P.target_compute(P.TARGETS["h100"], "bf16", train_flops_per_sample=1, batch=1, mfu=2)


def test_target_compute_makes_communication_matter() -> None:
    """The issue's point: with a GPU's compute time, the same links scale far worse."""
    common = dict(data_s=0.0, batch=64, grad_bytes=116_136, bucket_cap_mb=25)
    pcie = P.link_cost(P.STATED_LINKS[0])
    cpu = P.scaling_table(compute_s=0.030, **common, cost=pcie)
    gpu = P.scaling_table(compute_s=P.GPU_FLOOR_S, **common, cost=pcie)
    assert cpu[-1]["efficiency"] > 0.9 > 0.5 > gpu[-1]["efficiency"]


def test_assumptions_name_the_compute_source() -> None:
    assert "this machine's 1-process compute" in P.describe_assumptions()[4]
    assert "H100 says so" in P.describe_assumptions(target_source="H100 says so")[4]



def test_expected_max_order_statistics() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert P.expected_max(xs, 1) == pytest.approx(2.5)
    # the largest of 2 draws: x_(k) with probability (k^2 - (k-1)^2) / 16
    assert P.expected_max(xs, 2) == pytest.approx((1 * 1 + 2 * 3 + 3 * 5 + 4 * 7) / 16)
    assert P.expected_max(xs, 1000) == pytest.approx(4.0)
    assert P.expected_max([5.0] * 7, 8) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        P.expected_max([], 2)


def test_expected_max_matches_sampling() -> None:
    rng = np.random.default_rng(0)
    xs = rng.exponential(1.0, 4000)
    draws = rng.choice(xs, size=(200_000, 4)).max(axis=1).mean()
    assert P.expected_max(xs, 4) == pytest.approx(draws, rel=0.01)


def test_straggler_factor_grows_with_n_and_is_1_without_spread() -> None:
    times = [0.036, 0.044] * 10
    assert P.straggler_factor(times, 1) == pytest.approx(1.0)
    assert P.straggler_factor(times, 2) == pytest.approx(1.05)
    assert P.straggler_factor(times, 4) > P.straggler_factor(times, 2)
    assert P.straggler_factor([0.04] * 9, 64) == pytest.approx(1.0)


def test_scaling_table_straggler_scales_compute_and_data() -> None:
    free = lambda nbytes, n: 0.0  # noqa: E731
    [row] = P.scaling_table(compute_s=0.03, data_s=0.01, batch=64, grad_bytes=1000,
                            bucket_cap_mb=25.0, cost=free, straggler=lambda n: 1.1, ns=(2,))
    assert row["step_s"] == pytest.approx(0.044)
