"""Summaries, predictions, report and plots from made-up repeats -- including the GPU-only paths
(DataParallel's per-GPU memory, its inseparable communication) that CPU machines cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dptrain.bench import predict as P
from dptrain.bench.analysis import add_efficiency, predictions, summarise
from dptrain.bench.harness import combine_ranks
from dptrain.bench.plan import Config
from dptrain.bench.report import throughput_rows, write_report

MIB = 1024 * 1024
GRAD = 116_136


def rank(r: int, *, step: float, compute: float, data: float, comm: float | None,
         memory: list[tuple[str, int]], steps: int = 4, feed: int = 64) -> dict:
    return {"rank": r, "train_s": step * steps, "steps": steps, "feed_batch": feed,
            "data_s": data, "compute_s": compute, "comm_s": comm, "allreduce_calls": steps,
            "nosync_times_s": [compute + r * 1e-3] * 3,
            "sync_step_s": compute + (comm or 0.0),
            "allreduce_bytes": GRAD * steps, "grad_bytes": GRAD,
            "loss_curve": [2.0, 1.5, 1.0, 0.5 + r / 10],
            "memory": [{"device": d, "kind": "cuda_max_allocated", "bytes": b}
                       for d, b in memory], "threads": 4, "backend": "nccl",
            "device": memory[0][0]}


def ran(strategy: str, n: int, reps: list[dict]) -> Config:
    c = Config(strategy, n, "convnet", 64, 4)
    c.repeats = reps
    return c


@pytest.fixture
def configs() -> list[Config]:
    ddp1 = ran("ddp", 1, [combine_ranks({0: rank(0, step=s, compute=s - 2e-3, data=1e-3,
                                                 comm=1e-3, memory=[("cuda:0", 300 * MIB)])})
                          for s in (0.010, 0.011)])
    ddp2 = ran("ddp", 2, [combine_ranks({r: rank(r, step=0.012, compute=0.0095, data=1e-3,
                                                 comm=1.5e-3, memory=[(f"cuda:{r}", 300 * MIB)])
                                         for r in (0, 1)})])
    dp1 = ran("dp", 1, [combine_ranks({0: rank(0, step=0.010, compute=0.009, data=1e-3,
                                               comm=None, memory=[("cuda:0", 300 * MIB)])})])
    dp2 = ran("dp", 2, [combine_ranks({0: rank(0, step=0.016, compute=0.015, data=1e-3,
                                               comm=None, feed=128,
                                               memory=[("cuda:0", 500 * MIB),
                                                       ("cuda:1", 250 * MIB)])})])
    skipped = Config("single", 2, "convnet", 64, 4, skip="single runs exactly one process")
    base = Config("tutorial", 1, "linear", 64, 20, role="baseline")
    base.repeats = [{"samples_per_s": 1000.0, "final_loss": 0.5,
                     "memory": [{"device": "cpu", "kind": "peak_rss", "bytes": 300 * MIB,
                                 "rank": 0}]}]
    out = [ddp1, ddp2, dp1, dp2, skipped, base]
    for c in out:
        summarise(c)
    add_efficiency(out)
    return out


def test_combine_ranks_and_summaries(configs: list[Config]) -> None:
    ddp1, ddp2, dp1, dp2, skipped, _ = configs
    assert ddp1.summary["samples_per_s"]["mean"] == pytest.approx((6400 + 64 / 0.011) / 2)
    assert ddp1.summary["samples_per_s"]["n"] == 2 and ddp1.summary["samples_per_s"]["std"] > 0
    assert ddp2.summary["global_batch"] == 128
    assert ddp2.summary["samples_per_s"]["mean"] == pytest.approx(128 / 0.012)
    assert ddp2.repeats[0]["loss_curve"][-1] == pytest.approx(0.55)  # mean over ranks
    assert dp2.summary["comm_s"] is None and dp2.summary["global_batch"] == 128
    assert [m["device"] for m in dp2.summary["memory"]] == ["cuda:0", "cuda:1"]
    assert skipped.summary == {}
    eff = ddp2.summary["efficiency"]
    assert eff["mean"] == pytest.approx(P.efficiency(128 / 0.012, 2,
                                                     ddp1.summary["samples_per_s"]["mean"]))
    assert eff["std"] > 0 and eff["relative_to"] == "ddp n=1"
    assert dp2.summary["efficiency"]["mean"] == pytest.approx(8000 / (2 * 6400))


def test_predictions_validate_ddp_and_skip_dp(configs: list[Config]) -> None:
    fit = P.Fit(alpha_s=1e-5, beta_Bps=1e10, rel_rms=0.0, points=4)
    pred = predictions(configs, fit, cpu=False, bucket_cap_mb=25)
    assert pred["based_on"] == "ddp n=1" and pred["buckets"] == 1
    measured_link = pred["links"]["measured link (this machine)"]["rows"]
    # GPUs: no contention model, compute at n = 2 as measured there: the slower rank's 10.5 ms
    comm = P.allreduce_time(GRAD, 2, 1e-5, 1e10)
    assert measured_link[1]["step_s"] == pytest.approx(0.0105 + 1e-3 + comm)
    ddp_row, dp_row = pred["validation"]
    assert ddp_row["config"] == "ddp n=2"
    assert ddp_row["error_pct"] == pytest.approx(100 * ((0.0115 + comm) - 0.012) / 0.012)
    assert ddp_row["measured_median_step_s"] == pytest.approx(0.0095 + 1.5e-3 + 1e-3)
    assert "DataParallel" in dp_row["skipped"]
    no_fit = predictions(configs, None, cpu=False, bucket_cap_mb=25, fit_note="no sweep")
    assert no_fit["measured_link_skipped"] == "no sweep" and len(no_fit["links"]) == 4
    assert no_fit["validation"][0]["skipped"] == "no sweep"


def test_report_shows_gpu_memory_imbalance_and_skips(configs: list[Config],
                                                     tmp_path: Path) -> None:
    pred = predictions(configs, None, cpu=False, bucket_cap_mb=25)
    results = {
        "machine": {"command": "dptrain bench", "date": "today", "cpu_model": "cpu",
                    "cores": 16, "gpu_names": ["H100", "H100"], "torch_version": "2",
                    "python_version": "3.11"},
        "options": {"model": "convnet", "dataset": "synthetic", "batch_size": 64, "warmup": 1,
                    "steps": 4, "repeats": 2, "threads": 0, "seed": 0},
        "comm": {"sweeps": [], "skipped": [{"n": 2, "reason": "only 1 GPU"}], "fit": None,
                 "fit_note": "no sweep"},
        "prediction": pred, "plots": {"skipped": "matplotlib is not installed"},
        "wall_time_s": 12.0,
    }
    text = write_report(tmp_path, results, configs)
    assert (tmp_path / "report.md").read_text() == text
    dp_row = next(line for line in text.splitlines() if line.startswith("| DataParallel"))
    assert "500 / 250 MiB (max/min 2.00)" in dp_row and "on 2 GPUs" in dp_row
    ddp_row = next(line for line in text.splitlines()
                   if line.startswith("| DistributedDataParallel"))
    assert "113.4 KiB in 1 bucket(s)" in ddp_row and "(max/min 1.00)" in ddp_row
    assert "| single n=2 | skipped: single runs exactly one process |" in text
    assert "n=2: skipped: only 1 GPU" in text and "Plots skipped: matplotlib" in text
    dp2_row = next(r for r in throughput_rows(configs) if r.startswith("| dp n=2 "))
    assert "| – |" in dp2_row  # exposed comm not separable for dp
    json.dumps(results)  # everything the report reads is JSON


def test_plots_from_summaries(configs: list[Config], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from dptrain.bench.plots import write_plots

    fit = P.Fit(alpha_s=1e-5, beta_Bps=1e10, rel_rms=0.0, points=2)
    sweeps = [{"n": 2, "backend": "nccl",
               "points": [{"bytes": b, "time_s": fit.time(b, 2), "busbw_Bps": b / fit.time(b, 2)}
                          for b in (4096, 2**20)]}]
    pred = predictions(configs, fit, cpu=False, bucket_cap_mb=25)
    files = write_plots(tmp_path, configs, sweeps, fit, pred)["files"]
    assert files == ["throughput.png", "efficiency.png", "breakdown.png", "memory.png",
                     "loss.png", "comm_busbw.png"]
    assert all((tmp_path / f).stat().st_size > 1000 for f in files)


def test_predictions_with_a_target(configs: list[Config]) -> None:
    from dptrain.bench.analysis import target_for
    from dptrain.bench.report import compute_sources, prediction_rows

    fit = P.Fit(alpha_s=1e-5, beta_Bps=1e10, rel_rms=0.0, points=4)
    target = target_for({"target": "a100:bf16", "batch_size": 64, "target_mfu": 0.5},
                        forward_flops_per_sample=10**9)
    assert target["compute_s"] == pytest.approx(3e9 * 64 / (312e12 * 0.5))
    pred = predictions(configs, fit, cpu=False, bucket_cap_mb=25, target=target)
    pcie = pred["links"]["PCIe 4.0 x16 (16 GB/s, 10 µs)"]
    assert pcie["compute"]["compute_s"] == target["compute_s"] and pcie["compute"]["data_s"] == 0
    comm = P.allreduce_time(GRAD, 2, 10e-6, 16e9)
    assert pcie["rows"][1]["step_s"] == pytest.approx(target["compute_s"] + comm)
    here = pred["links"]["measured link (this machine)"]
    assert here["compute"]["compute_s"] == pytest.approx(0.0085)  # still this machine's
    assert "measured on this machine: ddp n=1" in here["compute"]["source"]
    lines = compute_sources(pred)
    assert any(line.startswith("- **PCIe 4.0 x16") and "NVIDIA A100" in line and
               "312 TFLOP/s x MFU 0.5" in line for line in lines)
    assert not any("--target h100" in line for line in lines)
    assert "Compute time per step behind each column:" in prediction_rows(pred)
    # given directly
    given = target_for({"target_compute_ms": 2.5, "batch_size": 64}, None)
    assert given["compute_s"] == 0.0025 and "--target-compute-ms 2.5" in given["source"]
    with pytest.raises(ValueError, match="--target-compute-ms instead"):
        target_for({"target": "h100", "batch_size": 64}, None)
    assert target_for({"batch_size": 64}, 100) is None


def test_without_a_target_the_report_says_it_is_this_machine(configs: list[Config]) -> None:
    from dptrain.bench.report import compute_sources

    pred = predictions(configs, None, cpu=False, bucket_cap_mb=25)
    assert pred["target"] is None
    pcie = pred["links"]["PCIe 4.0 x16 (16 GB/s, 10 µs)"]["compute"]
    assert pcie["compute_s"] == pytest.approx(0.0085) and pcie["data_s"] == pytest.approx(1e-3)
    text = "\n".join(compute_sources(pred))
    assert "*this machine's* compute time" in text and "--target h100" in text


def test_cpu_this_target_uses_the_measured_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    from dptrain import hardware
    from dptrain.bench.analysis import target_for

    monkeypatch.setattr(hardware, "matmul_peak", lambda dtype, **kw: 1e11)
    t = target_for({"target": "cpu-this", "batch_size": 10, "threads": 1}, 1000)
    assert t["peak_flops"] == 1e11 and t["precision"] == "fp32" and t["mfu"] == 0.5
    assert t["compute_s"] == pytest.approx(3000 * 10 / (1e11 * 0.5))


def test_roofline_rows(configs: list[Config], monkeypatch: pytest.MonkeyPatch) -> None:
    from dptrain.bench import analysis
    from dptrain.bench.report import roofline_rows

    monkeypatch.setattr(analysis, "_peak", lambda p: {"fp32": 1e11, "bf16": 3e11}[p])
    monkeypatch.setattr(analysis, "micro_step_s", lambda model, batch, p, seconds: {
        "step_s": {"fp32": 0.01, "bf16": 0.005}[p], "steps": 5, "note": None})
    o = {"model": "convnet", "batch_size": 64, "threads": 2}
    roof = analysis.roofline(configs, o, 5_676_160, seconds=0.1)
    fp32, bf16 = roof["rows"]
    train = 3 * 5_676_160
    assert fp32["micro_samples_per_s"] == pytest.approx(6400)
    assert fp32["micro_mfu"] == pytest.approx(train * 6400 / 1e11)
    assert bf16["micro_mfu"] == pytest.approx(train * 12800 / 3e11)
    base_sps = configs[0].summary["samples_per_s"]["mean"]  # ddp n=1: no single n=1 ran
    assert fp32["run"] == "ddp n=1" and fp32["run_mfu"] == pytest.approx(train * base_sps / 1e11)
    assert bf16["run"] is None
    rows = roofline_rows(roof)
    assert rows[0].startswith("Model `convnet`: 5,676,160 forward FLOPs per sample")
    fp32_row = next(r for r in rows if r.startswith("| fp32 |"))
    assert "| 100.00 | 6,400 | 108.98 | 109.0% |" in fp32_row
    assert "(the bench trains in fp32)" in next(r for r in rows if r.startswith("| bf16 |"))
    assert roofline_rows(None) == ["Roofline not measured (`--no-roofline`)."]
    assert "could not be counted" in roofline_rows(analysis.roofline(configs, o, None))[0]


def test_micro_step_is_timed_for_real() -> None:
    from dptrain.bench.analysis import micro_step_s

    r = micro_step_s("linear", 32, "fp32", seconds=0.5)
    assert r["step_s"] > 0 and r["steps"] <= 30
    # normally several steps; on a badly overloaded machine one, and then it says so
    assert (r["steps"] >= 3) == (r["note"] is None)


def test_predictions_beyond_the_measured_n_wait_for_the_slowest(configs: list[Config]) -> None:
    """ddp n=2's ranks computed 9.5 and 10.5 ms per step (3 steps each): pooled, E[max of 2]
    is 10.25 ms and E[max of 4] 10.4375 ms, against a 10 ms mean."""
    fit = P.Fit(alpha_s=1e-5, beta_Bps=1e10, rel_rms=0.0, points=4)
    gpu = predictions(configs, fit, cpu=False, bucket_cap_mb=25)
    assert gpu["straggler"] == {"from": "ddp n=2", "measured_n": 2, "step_times": 6}
    rows = {r["n"]: r for r in gpu["links"]["measured link (this machine)"]["rows"]}
    assert rows[1]["straggler"] == rows[2]["straggler"] == 1.0  # measured there
    grow = 10.4375 / 10.25
    assert rows[4]["straggler"] == pytest.approx(grow)
    # no contention model off CPU: n=2's slowest-rank compute (10.5 ms), grown beyond it
    comm = P.allreduce_time(GRAD, 4, 1e-5, 1e10)
    assert rows[4]["step_s"] == pytest.approx((0.0105 + gpu["data_1_s"]) * grow + comm)
    assert rows[4]["step_s"] > rows[2]["step_s"]
    # the stated links have no per-step times of their device: no factor
    assert all(r["straggler"] == 1.0 for r in gpu["links"]["NVLink (300 GB/s, 5 µs)"]["rows"])
    cpu = predictions(configs, fit, cpu=True, bucket_cap_mb=25)
    rows = {r["n"]: r for r in cpu["links"]["measured link (this machine)"]["rows"]}
    assert rows[4]["straggler"] == pytest.approx(grow)
