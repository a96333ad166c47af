"""A tiny real bench on the synthetic set: fresh launches, results.json, report.md, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dptrain.bench import command, plots
from dptrain.bench.plan import Config


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench") / "out"
    code = command.main(["--dataset", "synthetic", "--model", "linear", "--batch-size", "64",
                         "--strategies", "single,ddp,dp", "--nproc", "1,2", "--steps", "6",
                         "--warmup", "1", "--repeats", "1", "--baseline-steps", "20",
                         "--sizes", "4K,64K,256K", "--iters", "4", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def _config(results: dict, name: str) -> dict:
    return next(c for c in results["configurations"] if c["name"] == name)


def test_results_json_is_well_formed(bench: tuple[Path, dict]) -> None:
    _, results = bench
    assert {"schema", "options", "machine", "configurations", "comm", "prediction",
            "wall_time_s"} <= set(results)
    machine = results["machine"]
    for key in ("cpu_model", "cores", "torch_version", "python_version", "date", "command"):
        assert machine[key]
    assert machine["gpus"] == 0
    names = [c["name"] for c in results["configurations"]]
    # in --strategies order; single n=1 doubles as the linear batch-64 row beside the baseline
    assert names == ["single n=1", "single n=2", "ddp n=1", "ddp n=2", "dp n=1", "dp n=2",
                     "tutorial loop (linear, b64)"]
    for name in ("single n=1", "ddp n=1", "ddp n=2"):
        c = _config(results, name)
        assert c["status"] == "ok" and c["reason"] is None
        (rep,) = c["repeats"]
        assert rep["samples_per_s"] > 0 and rep["step_s"] > 0 and rep["compute_s"] > 0
        assert rep["data_s"] > 0 and rep["comm_s"] >= 0
        assert len(rep["loss_curve"]) == 6 and all(math.isfinite(v) for v in rep["loss_curve"])
        assert len(rep["ranks"]) == c["nproc"]
        assert all(m["bytes"] > 0 for m in rep["memory"]) and len(rep["memory"]) == c["nproc"]
        s = c["summary"]
        assert s["samples_per_s"]["n"] == 1 and s["samples_per_s"]["mean"] > 0
        assert s["grad_bytes"] == (784 * 10 + 10) * 4
    # DDP all-reduces every gradient byte once per step, in one bucket for this model
    ddp2 = _config(results, "ddp n=2")["summary"]
    assert ddp2["allreduce_calls_per_step"] == 1
    assert ddp2["allreduce_bytes_per_step"] == (784 * 10 + 10) * 4
    assert ddp2["global_batch"] == 128 and ddp2["efficiency"]["mean"] > 0
    assert _config(results, "single n=1")["summary"]["allreduce_calls_per_step"] == 0
    assert _config(results, "ddp n=1")["summary"]["efficiency"]["mean"] == pytest.approx(1.0)
    for name in ("single n=1", "ddp n=1", "ddp n=2"):  # linear: nothing to lay out
        assert _config(results, name)["summary"]["memory_format"].startswith(
            "contiguous (auto: no 2-d convolution")


def test_bench_trains_in_the_layout_dptrain_train_would() -> None:
    """convnet on the CPU: channels_last, as `dptrain train --channels-last auto` trains it
    (the bench measured it contiguous, a different and slower path, until it said)."""
    from dptrain.bench.harness import bench_worker

    spec = {"strategy": "single", "model": "convnet", "dataset": "synthetic",
            "data_root": "unused", "batch_size": 16, "steps": 2, "warmup": 1, "threads": 1,
            "seed": 0, "lr": 0.01, "device": "cpu", "bucket_cap_mb": 25.0, "diag_steps": 2}
    result = bench_worker(spec)
    assert result["memory_format"] == "channels_last (auto: a built-in conv model on the CPU)"
    assert len(result["loss_curve"]) == 2 and all(math.isfinite(v) for v in result["loss_curve"])


def test_same_seed_same_loss(bench: tuple[Path, dict]) -> None:
    _, results = bench
    single = _config(results, "single n=1")["repeats"][0]["loss_curve"]
    ddp1 = _config(results, "ddp n=1")["repeats"][0]["loss_curve"]
    assert single == pytest.approx(ddp1, rel=1e-5)


def test_skipped_configurations_have_reasons(bench: tuple[Path, dict]) -> None:
    out, results = bench
    for name in ("dp n=1", "dp n=2"):
        c = _config(results, name)
        assert c["status"] == "skipped" and "CUDA" in c["reason"] and c["repeats"] == []
    single2 = _config(results, "single n=2")
    assert single2["status"] == "skipped" and "one process" in single2["reason"]
    report = (out / "report.md").read_text()
    assert report.count("| skipped: ") >= 3
    dp_row = next(line for line in report.splitlines() if line.startswith("| DataParallel"))
    assert "skipped" in dp_row and "CUDA" in dp_row


def test_comm_sweep_and_prediction(bench: tuple[Path, dict]) -> None:
    _, results = bench
    (sweep,) = results["comm"]["sweeps"]
    assert sweep["n"] == 2 and sweep["backend"] == "gloo"
    assert [p["bytes"] for p in sweep["points"]] == [4096, 65536, 262144]
    for p in sweep["points"]:
        assert p["time_s"] > 0 and len(p["times_s"]) == 4
        assert p["busbw_Bps"] == pytest.approx(p["algbw_Bps"])  # n = 2
    fit = results["comm"]["fit"]
    assert fit["alpha_s"] >= 0 and fit["points"] == 3
    pred = results["prediction"]
    assert pred["based_on"] == "ddp n=1" and len(pred["links"]) == 5
    for link in pred["links"].values():
        assert [r["n"] for r in link["rows"]] == [1, 2, 4, 8, 16, 32, 64]
        assert link["rows"][0]["efficiency"] == pytest.approx(1.0)
    (val,) = pred["validation"]
    assert val["config"] == "ddp n=2" and val["predicted_step_s"] > 0
    assert math.isfinite(val["error_pct"])


def test_baseline_row(bench: tuple[Path, dict]) -> None:
    out, results = bench
    base = _config(results, "tutorial loop (linear, b64)")
    assert base["status"] == "ok" and base["summary"]["samples_per_s"]["mean"] > 0
    assert base["repeats"][0]["timed_steps"] == 20
    report = (out / "report.md").read_text()
    assert "tutorial: per-sample `Dataset` + `DataLoader`" in report
    assert "dptrain: device-resident tensors" in report


def test_report_and_plots(bench: tuple[Path, dict]) -> None:
    out, results = bench
    report = (out / "report.md").read_text()
    for heading in ("## Throughput", "## DP vs DDP, measured", "## All-reduce sweep",
                    "## Scaling prediction", "### Prediction against measurement", "## Plots"):
        assert heading in report
    assert "| parallel mode | communication | memory balance | code needed | use case |" in report
    assert " ± " in report and "α = " in report and "%" in report
    if results["plots"].get("skipped"):  # no matplotlib here: the report says so
        assert "Plots skipped: matplotlib is not installed (pip install matplotlib)" in report
        assert not list(out.glob("*.png"))
    pytest.importorskip("matplotlib")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) >= 4 and sorted(results["plots"]["files"]) == pngs
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report


def test_plots_skipped_without_matplotlib(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    def missing() -> None:
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(plots, "_pyplot", missing)
    result = plots.write_plots(tmp_path, [Config("ddp", 1, "linear", 64, 5)], [], None, {})
    assert "pip install matplotlib" in result["skipped"]
    assert list(tmp_path.iterdir()) == []


def test_bench_comm_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "comm"
    assert command.main(["comm", "--nproc", "2", "--sizes", "4K,16K", "--iters", "3",
                         "--no-plots", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| processes | size | time (µs) | algbw (GB/s) | busbw (GB/s) |" in text
    doc = json.loads((out / "comm.json").read_text())
    assert [p["bytes"] for p in doc["sweeps"][0]["points"]] == [4096, 16384]


def test_failing_configuration_is_reported_not_dropped(tmp_path: Path) -> None:
    # DDP refuses a model with a parameter that gets no gradient (find_unused_parameters off):
    # its worker fails on the second step; the single-process row still runs
    out = tmp_path / "out"
    assert command.main(["--dataset", "synthetic", "--model", "myplugins:with_unused",
                         "--strategies", "single,ddp", "--nproc", "1", "--steps", "2",
                         "--warmup", "1", "--repeats", "1", "--baseline-steps", "0",
                         "--no-plots", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    single, ddp = results["configurations"]
    assert single["status"] == "ok" and len(single["repeats"]) == 1
    assert ddp["status"] == "failed" and ddp["repeats"] == []
    assert ddp["reason"].startswith("worker failed: RuntimeError: ")
    assert f"| ddp n=1 | failed: {ddp['reason']} |" in (out / "report.md").read_text()


def test_flops_and_roofline_in_results(bench: tuple[Path, dict]) -> None:
    out, results = bench
    assert results["flops"]["forward_flops_per_sample"] == 2 * 784 * 10
    assert results["flops"]["train_flops_per_sample"] == 3 * 2 * 784 * 10
    roof = results["roofline"]
    assert [r["precision"] for r in roof["rows"]] == ["fp32", "bf16"]
    fp32 = roof["rows"][0]
    assert fp32["peak_flops"] > 0 and fp32["run"] == "single n=1"
    assert fp32["run_mfu"] == pytest.approx(
        3 * 15680 * fp32["run_samples_per_s"] / fp32["peak_flops"])
    report = (out / "report.md").read_text()
    assert "## Roofline: achieved FLOP/s against this machine's peak" in report
    assert "Model `linear`: 15,680 forward FLOPs per sample" in report
    assert "Compute time per step behind each column:" in report
    assert "*this machine's* compute time" in report  # no --target given


def _usage(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``dptrain bench ARGV``: exit 2 and exactly one ``error:`` line, nothing else."""
    assert command.main([*argv, "--out", "/nonexistent/never-created"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


@pytest.mark.parametrize(("argv", "needle"), [
    (["--threads", "99999999999"], "--threads must be at most 1,024"),
    (["--nproc", "999999"], "at most"),
    (["--nproc", "1,2,100000"], "processes here"),
    (["--batch-size", str(1 << 40)], "--batch-size must be at most"),
    (["--repeats", "100000"], "--repeats must be at most 1,000"),
    (["--seed", str(2**70)], "--seed must be at most"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--bucket-cap-mb", "nan"], "--bucket-cap-mb must be a positive number"),
    (["--settle", "inf"], "--settle must be 0 to 3600"),
    (["--target", "b200"], "unknown target 'b200'"),
    (["--target", "v100:bf16"], "has no bf16"),
    (["--target-mfu", "0.3"], "--target-mfu needs --target"),
    (["--target", "h100", "--target-mfu", "1.5"], "--target-mfu must be in (0, 1]"),
    (["--target", "h100", "--target-compute-ms", "2"], "give one of them"),
    (["--target-compute-ms", "0"], "--target-compute-ms must be a positive"),
])
def test_bad_numbers_are_refused_at_once(capsys: pytest.CaptureFixture[str], argv: list[str],
                                         needle: str) -> None:
    assert needle in _usage(capsys, *argv)


def test_nproc_limit_names_the_machine() -> None:
    from dptrain.bench import usable_cores

    limit, what = command.nproc_limit("cpu")
    assert limit == 4 * usable_cores() and f"{usable_cores()} usable core(s)" in what


def test_every_configuration_failing_exits_non_zero(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert command.main(["--dataset", "synthetic", "--model", "myplugins:with_unused",
                         "--strategies", "ddp", "--nproc", "1", "--steps", "2", "--warmup", "1",
                         "--repeats", "1", "--baseline-steps", "0", "--no-plots",
                         "--no-roofline", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "bench: no configuration ran (1 failed, 0 skipped or not run)" in err
    results = json.loads((out / "results.json").read_text())
    assert results["configurations"][0]["status"] == "failed" and results["roofline"] is None


def test_refused_input_leaves_no_out_directory(tmp_path, capsys):
    """A plug-in that fails, or one that does not fit the data, is refused before a bench
    (or a training run) creates anything: no empty --out is left behind."""
    from dptrain import cli

    for argv in (["bench", "--quick", "--dataset", "synthetic", "--model",
                  "taskplugins:raising_model"],
                 ["bench", "--quick", "--dataset", "taskplugins:class_data", "--model",
                  "taskplugins:wrong_width_model"],
                 ["train", "--dataset", "taskplugins:class_data", "--model",
                  "taskplugins:raising_model", "--quiet"]):
        out = tmp_path / "new" / "out"
        assert cli.main([*argv, "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith("error: --model")
        assert not (tmp_path / "new").exists()
