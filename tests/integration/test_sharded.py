"""ZeRO-1 and FSDP2 on real gloo process groups: equal to one process, memory counted from
the shards, resume at another world size (between ddp, zero and fsdp), kill -9 and restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dptrain.verify import compare, run_pair
from tests.conftest import run_cli
from tests.integration.test_features import bitwise_equal, kill_a_worker_then_restart, params

BASE = {"dataset": "synthetic", "data_root": "unused", "model": "myplugins:mlp", "lr": 0.05,
        "momentum": 0.9, "seed": 5, "threads": 1}
MLP_PARAMS = 784 * 32 + 32 + 32 * 10 + 10  # myplugins:mlp


@pytest.mark.parametrize(("strategy", "nproc", "accum"), [
    ("zero", 2, 1), ("zero", 3, 2), ("fsdp", 2, 2), ("fsdp", 3, 1)])
def test_n_sharded_processes_equal_one_process(tmp_path, strategy, nproc, accum):
    s1, sn = run_pair({**BASE, "batch_size": 8, "accum": accum}, nproc, 30, tmp_path, strategy)
    assert sn["strategy"] == strategy and sn["world_size"] == nproc
    diff, where = compare(params(tmp_path / "one"), params(tmp_path / f"{strategy}{nproc}"))
    assert diff < 1e-5, where
    assert sn["test_samples"] == 1000 and sn["test_accuracy"] == pytest.approx(
        s1["test_accuracy"], abs=2e-3)
    ranks = sn["memory_per_rank"]
    assert len(ranks) == nproc
    full = MLP_PARAMS * 4
    if strategy == "fsdp":  # every rank holds its shard of parameters, gradients, momenta
        assert sum(r["param_bytes"] for r in ranks) == full
        assert all(r["param_bytes"] < full for r in ranks)
        assert sum(r["optim_bytes"] for r in ranks) == full
    else:  # zero: parameters and gradients replicated, momenta partitioned
        assert all(r["param_bytes"] == r["grad_bytes"] == full for r in ranks)
        assert sum(r["optim_bytes"] for r in ranks) == full
    assert s1["optim_bytes"] == full and all(r["peak_memory_bytes"] > 0 for r in ranks)
    # the prediction from the model's shapes is every rank's measured figure (exact)
    from dptrain.memory import predict, shapes
    from dptrain.models import build_model

    predicted = predict(shapes(build_model("myplugins:mlp")), strategy, nproc, states=1)
    for got, want in zip(ranks, predicted, strict=True):
        for key in ("param_bytes", "grad_bytes", "optim_bytes"):
            assert got[key] == want[key], (key, got[key], want[key])


def test_resume_at_other_world_sizes_between_strategies_matches_the_uninterrupted_run(
        tmp_path):
    """Global batch 48 throughout: 1 x 48 uninterrupted == ddp 2 x 24 (steps 0-8), then
    fsdp 3 x 16 (8-16), then zero 4 x 12 chosen by --keep-global-batch (16-24)."""
    common = ["train", "--dataset", "synthetic", "--model", "myplugins:mlp", "--lr", "0.05",
              "--momentum", "0.9", "--seed", "5", "--threads", "1", "--epochs", "5",
              "--ckpt-every", "8", "--quiet"]
    ref = run_cli(*common, "--batch-size", "48", "--max-steps", "24", "--out",
                  str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = str(tmp_path / "moved")
    legs = [("ddp", "2", ["--batch-size", "24"], 8),
            ("fsdp", "3", ["--batch-size", "16", "--resume", "auto"], 16),
            ("zero", "4", ["--batch-size", "5", "--keep-global-batch", "--resume", "auto"], 24)]
    for strategy, nproc, extra, steps in legs:
        r = run_cli(*common, "--strategy", strategy, "--nproc", nproc, *extra, "--max-steps",
                    str(steps), "--out", out, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        s = json.loads((Path(out) / "summary.json").read_text())
        assert (s["strategy"], s["world_size"], s["steps"], s["global_batch"]) == (
            strategy, int(nproc), steps, 48)
    config = (Path(out) / "config.toml").read_text()
    assert "batch_size = 12" in config  # what --keep-global-batch chose for 4 processes
    diff, where = compare(params(tmp_path / "ref"), params(Path(out)))
    assert diff < 1e-5, where


def test_another_global_batch_is_refused_with_the_settings_that_keep_it(tmp_path):
    out = tmp_path / "run"
    first = run_cli("train", "--dataset", "synthetic", "--batch-size", "24", "--nproc", "2",
                    "--max-steps", "4", "--quiet", "--threads", "1", "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    r = run_cli("train", "--dataset", "synthetic", "--batch-size", "24", "--strategy", "fsdp",
                "--nproc", "3", "--max-steps", "8", "--quiet", "--threads", "1",
                "--resume", "auto", "--out", str(out))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "global batch of 48" in lines[0]
    assert "--batch-size 16 --accum 1 keeps it with 3 processes" in lines[0]
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before


@pytest.mark.extended  # make test: test_dcp.py's kill -9 during an FSDP save, then restart
def test_kill_9_a_worker_during_fsdp_then_restart_finishes_bitwise(tmp_path):
    summary = kill_a_worker_then_restart(
        ["train", "--dataset", "synthetic", "--threads", "1", "--strategy", "fsdp", "--nproc",
         "2", "--model", "myplugins:mlp", "--batch-size", "16", "--momentum", "0.9",
         "--max-steps", "60", "--ckpt-every", "10", "--log-every", "5", "--quiet"], tmp_path,
        checkpoint="step-00000020.dcp")
    assert summary["restarts"] == 1 and summary["steps"] == 60
    assert bitwise_equal(params(tmp_path / "ref"), params(tmp_path / "killed"))
    last = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert all(not k.startswith("module.") for k in last["model"])  # plain, consolidated
    assert last["model"]["1.weight"].shape == (32, 784)


@pytest.mark.parametrize("strategy", ["fsdp", "zero"])
def test_grad_clip_under_sharding_equals_one_process(tmp_path, strategy):
    """--grad-clip clips by the global norm: over the shards under fsdp, of the synchronised
    gradients under zero -- the same clip as one process with the global batch."""
    s1, sn = run_pair({**BASE, "batch_size": 8, "grad_clip": 0.05}, 2, 20, tmp_path, strategy)
    diff, where = compare(params(tmp_path / "one"), params(tmp_path / f"{strategy}2"))
    assert diff < 1e-5, where
    unclipped = run_cli("train", "--dataset", "synthetic", "--model", "myplugins:mlp", "--lr",
                        "0.05", "--momentum", "0.9", "--seed", "5", "--threads", "1",
                        "--batch-size", "16", "--max-steps", "20", "--quiet", "--out",
                        str(tmp_path / "free"))
    assert unclipped.returncode == 0
    assert compare(params(tmp_path / "one"), params(tmp_path / "free"))[0] > 1e-3  # it bites


def test_fsdp_trains_in_bf16_with_its_mixed_precision_policy(tmp_path):
    out = tmp_path / "bf16"
    r = run_cli("train", "--dataset", "synthetic", "--model", "myplugins:mlp", "--strategy",
                "fsdp", "--nproc", "2", "--precision", "bf16", "--lr", "0.05", "--momentum",
                "0.9", "--batch-size", "32", "--max-steps", "60", "--threads", "1", "--quiet",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["precision"] == "bf16" and s["strategy"] == "fsdp"
    assert s["test_accuracy"] > 0.9
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in last["model"].values())  # fp32 master shards


def test_fsdp_trains_a_batchnorm_convnet_in_bf16(tmp_path):
    """BatchNorm keeps fp32 parameters under FSDP's bf16 policy: with bf16 ones beside its
    fp32 running statistics the CPU kernel refused (a traceback at the first forward)."""
    out = tmp_path / "bf16"
    r = run_cli("train", "--dataset", "synthetic", "--model", "convnet", "--strategy", "fsdp",
                "--nproc", "2", "--precision", "bf16", "--lr", "0.05", "--momentum", "0.9",
                "--batch-size", "32", "--max-steps", "40", "--threads", "1", "--quiet",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["precision"] == "bf16" and s["test_accuracy"] > 0.9
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert all(t.dtype in (torch.float32, torch.int64) for t in last["model"].values())


def test_fsdp_trains_convnet_contiguous_and_refuses_channels_last_up_front(tmp_path):
    """FSDP2 shards contiguous parameters only: ``auto`` keeps convnet contiguous under fsdp
    (it trains), while ``--channels-last on`` is refused before the run directory changes --
    not a traceback from inside fully_shard."""
    out = tmp_path / "run"
    common = ("train", "--dataset", "synthetic", "--model", "convnet", "--strategy", "fsdp",
              "--nproc", "2", "--batch-size", "8", "--max-steps", "2", "--quiet",
              "--threads", "1", "--out", str(out))
    first = run_cli(*common)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["memory_format"].startswith("contiguous")
    def files() -> dict[str, bytes]:  # the user's outputs (not the lock: it holds a pid)
        return {p.name: p.read_bytes() for p in out.rglob("*")
                if p.is_file() and p.name != ".dptrain.lock"}

    before = files()
    r = run_cli(*common, "--channels-last", "on", "--resume", "auto")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --strategy fsdp shards contiguous")
    assert "'1.0.weight' is not" in lines[0] and "Traceback" not in r.stderr
    assert files() == before


def test_a_resume_with_another_momentum_uses_it_under_single_and_fsdp(tmp_path):
    """The optimizer's hyper-parameters are the resuming run's (loading the state dict
    brought back the checkpoint's: --momentum 0 was ignored while config.toml said 0), and
    fsdp takes a momentum checkpoint into SGD without momentum (torch's loader failed)."""
    import shutil

    from dptrain import cli

    common = ["train", "--dataset", "synthetic", "--model", "myplugins:mlp", "--threads", "1",
              "--quiet", "--lr", "0.05"]
    start = tmp_path / "start"
    assert cli.main([*common, "--momentum", "0.9", "--batch-size", "32", "--max-steps", "5",
                     "--ckpt-every", "5", "--out", str(start)]) == 0
    full = tmp_path / "full"
    assert cli.main([*common, "--momentum", "0.9", "--batch-size", "32", "--max-steps", "10",
                     "--out", str(full)]) == 0
    runs = {}
    for name, layout in (("single", ["--batch-size", "32"]),
                         ("fsdp", ["--strategy", "fsdp", "--nproc", "2", "--batch-size", "16"])):
        shutil.copytree(start, tmp_path / name)
        assert cli.main([*common, *layout, "--momentum", "0", "--max-steps", "10",
                         "--resume", "auto", "--out", str(tmp_path / name)]) == 0
        s = json.loads((tmp_path / name / "summary.json").read_text())
        assert s["resumed_with_changes"] == {"momentum": [0.9, 0.0]}
        runs[name] = params(tmp_path / name)
    assert compare(runs["single"], runs["fsdp"])[0] < 1e-6
    assert compare(runs["single"], params(full))[0] > 1e-3  # momentum 0 did apply
