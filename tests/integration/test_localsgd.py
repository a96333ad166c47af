"""``--strategy localsgd`` on real gloo groups: H = 1 equals ddp and one process, H = 8 reaches
ddp's accuracy with 1/8 of its traffic, exact resume between averages, the averaged model in
``last.pt``, ``dptrain.fit``, and the flags it refuses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dptrain
from dptrain.bench.compare import comm_bytes  # what bench --compare counts
from dptrain.cli import run_training
from dptrain.config import TrainConfig
from dptrain.dist import free_port
from dptrain.verify import compare
from tests.conftest import clean_env, run_cli
from tests.integration.test_features import bitwise_equal, params
from tests.integration.test_multinode import namespaces  # noqa: F401 - the two hosts

BASE = {"dataset": "synthetic", "data_root": "unused", "model": "myplugins:mlp", "lr": 0.05,
        "momentum": 0.9, "seed": 5, "threads": "1", "quiet": True, "eval_every_epoch": False}
MLP_BYTES = (784 * 32 + 32 + 32 * 10 + 10) * 4  # myplugins:mlp, fp32


def train(out: Path, **values: object) -> dict:
    """One run through the launcher, all-reduces counted (as the bench counts them)."""
    cfg = TrainConfig(**{**BASE, "nproc": "2", "batch_size": 16, **values, "out": str(out)})
    return run_training(cfg.validate(), count_comm=True)


@pytest.mark.parametrize(("warmup", "accum", "weight_decay"), [(0, 1, 0.0), (5, 2, 1e-3)])
def test_sync_every_1_equals_ddp(tmp_path, warmup, accum, weight_decay):
    """Averaging is linear: per-rank momenta + an average every step == DDP's mean gradient
    (SGD with momentum, weight decay, accumulation; W DDP steps first)."""
    common = {"max_steps": 30, "accum": accum, "weight_decay": weight_decay}
    ddp = train(tmp_path / "ddp", strategy="ddp", **common)
    local = train(tmp_path / "local", strategy="localsgd", sync_every=1,
                  localsgd_warmup_steps=warmup, **common)
    diff, where = compare(params(tmp_path / "ddp"), params(tmp_path / "local"))
    assert diff < 1e-6, where
    assert local["test_accuracy"] == pytest.approx(ddp["test_accuracy"], abs=2e-3)
    # W warm-up steps all-reduce the gradients, each later step averages the parameters
    assert (local["warmup_allreduce_bytes"], local["parameter_averages"]) == (
        warmup * MLP_BYTES, 30 - warmup)
    assert local["parameter_average_bytes"] == (30 - warmup) * MLP_BYTES
    # as much as ddp's gradient all-reduces, counted once (not as ddp's bucket counter too)
    assert ddp["allreduce_bytes"] == 30 * MLP_BYTES and "allreduce_bytes" not in local
    assert comm_bytes(local) == comm_bytes(ddp)
    assert local["copy_averages"] == 0  # in sync at the end: the saved model is rank 0's own


def test_sync_every_1_equals_one_process_and_verify_says_so(tmp_path):
    """``dptrain verify`` (``run_pair``: 1 process x batch 24 vs localsgd 3 x 8) exits 0, and
    the runs it kept agree within 1e-5."""
    r = run_cli("verify", "--strategy", "localsgd", "--sync-every", "1",
                "--localsgd-warmup-steps", "4", "--nproc", "3", "--batch-size", "8",
                "--model", "myplugins:mlp", "--steps", "20", "--threads", "1",
                "--keep", str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    diff, where = compare(params(tmp_path / "one"), params(tmp_path / "localsgd3"))
    assert diff < 1e-5, where
    many = json.loads((tmp_path / "localsgd3" / "summary.json").read_text())
    assert (many["strategy"], many["world_size"], many["parameter_averages"]) == (
        "localsgd", 3, 16)


@pytest.mark.slow
def test_sync_every_8_reaches_ddp_accuracy_on_convnet_with_an_eighth_of_the_traffic(tmp_path):
    """convnet, synthetic, 2 epochs of 93 steps (2 x 32 per step): two runs of ~19 s of
    training each; the test took 63 s on the shared 2-core machine at load ~5, 123 s at ~10."""
    common = {"model": "convnet", "batch_size": 32, "epochs": 2, "lr": 0.05}
    ddp = train(tmp_path / "ddp", strategy="ddp", **common)
    local = train(tmp_path / "local", strategy="localsgd", sync_every=8, **common)
    assert ddp["steps"] == local["steps"] == 186 and local["test_samples"] == 1000
    assert abs(local["test_accuracy"] - ddp["test_accuracy"]) <= 0.005
    assert local["test_accuracy"] > 0.95
    averages = -(-186 // 8)  # at step counters 0, 8, ..., 184
    assert local["parameter_averages"] == averages and local["warmup_allreduce_calls"] == 0
    # every average carries the gradient bytes of one ddp step
    assert local["parameter_average_bytes"] * ddp["steps"] == ddp["allreduce_bytes"] * averages


def _ckpt(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"step-{step:08d}.pt", weights_only=True)


def test_resume_between_averages_continues_bitwise(tmp_path):
    """H = 4 after 2 warm-up steps: averages after steps 3, 7, 11, ...; a checkpoint at step 9
    holds each rank's own (different) state; resumed, the run ends bitwise as the
    uninterrupted one. At another world size it resumes from the averaged state."""
    common = {"strategy": "localsgd", "sync_every": 4, "localsgd_warmup_steps": 2,
              "ckpt_every": 9, "epochs": 5}
    train(tmp_path / "ref", max_steps=20, **common)
    train(tmp_path / "cut", max_steps=9, **common)
    saved = _ckpt(tmp_path / "cut", 9)
    ranks = [r["model"] for r in saved["localsgd"]["ranks"]]
    assert compare(ranks[0], ranks[1])[0] > 1e-4  # between averages: the ranks differ
    mean = {k: (ranks[0][k] + ranks[1][k]) / 2 for k in ranks[0]}
    assert compare(saved["model"], mean)[0] < 1e-6  # last.pt: the averaged, plain model
    assert sorted(saved["model"]) == ["1.bias", "1.weight", "3.bias", "3.weight"]
    assert bitwise_equal(_ckpt(tmp_path / "ref", 9)["model"], saved["model"])
    resumed = train(tmp_path / "cut", max_steps=20, resume="auto", **common)
    assert resumed["localsgd_resume"] == "per-rank (exact)" and resumed["steps"] == 20
    assert resumed["parameter_averages"] == 3  # after steps 11, 15, 19
    assert bitwise_equal(params(tmp_path / "ref"), params(tmp_path / "cut"))
    # one process x batch 32 (the same global batch) from the averaged state
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "cut" / "checkpoints", tmp_path / "saved")
    one = train(other, max_steps=20, nproc="1", batch_size=32,
                resume=str(tmp_path / "saved" / "step-00000009.pt"), **common)
    assert one["localsgd_resume"] == "averaged" and one["world_size"] == 1
    assert one["test_accuracy"] > 0.9


def test_fit_runs_local_sgd_and_returns_the_averaged_model(tmp_path):
    out = tmp_path / "fit"
    r = dptrain.fit("myplugins:mlp", "synthetic", strategy="localsgd", nproc=2, sync_every=4,
                    max_steps=10, batch_size=16, threads="1", out=str(out), quiet=True)
    assert r["strategy"] == "localsgd" and r["sync_every"] == 4 and r["steps"] == 10
    assert r["parameter_averages"] == 3  # after steps 1, 5, 9
    assert r["copy_averages"] == 1  # after step 10 the ranks differ: last.pt is their mean
    assert bitwise_equal(r.model.state_dict(), params(out))
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] == r["test_accuracy"]


SESSION_SCRIPT = """
import sys, torch, dptrain
from sessionloop import ten_steps

strategy, path, extra = sys.argv[1], sys.argv[2], {"sync_every": int(sys.argv[3])}
with dptrain.Session(strategy=strategy, seed=3, **extra) as s:
    wrapped, opt, flat = ten_steps(s)
    if s.is_main:
        torch.save(flat, path)
        print("RESULT", type(opt).__name__)
"""


@pytest.mark.extended
def test_a_session_with_its_own_optimizer_runs_local_sgd(tmp_path):
    """The user's SGD is adopted (wrapped in PostLocalSGDOptimizer); H = 1 trains like ddp,
    H = 8 does not (the flag reaches the strategy)."""
    script = tmp_path / "loop.py"
    script.write_text(SESSION_SCRIPT)
    flat = {}
    for strategy, h in (("localsgd", "1"), ("localsgd", "8"), ("ddp", "8")):
        path = tmp_path / f"{strategy}{h}.pt"
        r = run_cli("run", "--nproc", "2", str(script), strategy, str(path), h,
                    env=clean_env(OMP_NUM_THREADS="1"), timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        kind = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")).split()[1]
        assert kind == ("PostLocalSGDOptimizer" if strategy == "localsgd" else "SGD")
        flat[strategy + h] = torch.load(path, weights_only=True)
    assert (flat["localsgd1"] - flat["ddp8"]).abs().max() < 1e-6
    assert (flat["localsgd8"] - flat["ddp8"]).abs().max() > 1e-4


@pytest.mark.parametrize(("flag", "says"), [
    (["--sync-bn"], "--sync-bn would synchronise every step"),
    (["--comm-hook", "fp16"], "DDP takes one comm hook"),
    (["--find-unused-parameters"], "used-parameter map every step"),
    (["--cpu-allreduce", "shm"], "DDP takes one (local SGD's)")])
def test_flags_local_sgd_cannot_take_exit_2_with_one_error_line(tmp_path, flag, says):
    out = tmp_path / "bad"
    # one process: the strategy's own refusals come before any worker is launched
    nproc = "2" if flag == ["--sync-bn"] else "1"
    r = run_cli("train", "--dataset", "synthetic", "--strategy", "localsgd", "--nproc", nproc,
                "--threads", "1", "--max-steps", "2", "--quiet", *flag, "--out", str(out),
                timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert says in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.extended
@pytest.mark.slow
@pytest.mark.usefixtures("namespaces")
def test_two_nodes_average_like_one_node(tmp_path):
    """Two "hosts" (network namespaces, one process each) run the same local SGD as two
    processes on one host: the averages cross the veth link. Skipped where namespaces cannot
    be made; ~100 s here under load (three interpreters, most of it start-up)."""
    args = ["--dataset", "synthetic", "--model", "myplugins:mlp", "--max-steps", "12",
            "--batch-size", "16", "--threads", "1", "--quiet", "--strategy", "localsgd",
            "--sync-every", "4", "--localsgd-warmup-steps", "2"]
    common = ["--nnodes", "2", "--nproc", "1", "--master-addr", "10.77.0.1", "--master-port",
              str(free_port()), "--timeout-s", "60", *args, "--out", str(tmp_path / "two")]
    procs = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "dptrain",
                               "train", "--node-rank", str(rank), *common],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env(GLOO_SOCKET_IFNAME="dpt0"))
             for ns, rank in (("dpt_a", 0), ("dpt_b", 1))]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "localsgd x 2" in outs[0][0]
    one = run_cli("train", "--nproc", "2", *args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["parameter_averages"] == 3  # after steps 3, 7, 11
    diff, where = compare(params(tmp_path / "two"), params(tmp_path / "one"))
    assert diff < 1e-6, where


def test_a_resume_keeps_the_lr_schedule(tmp_path):
    """Resumed from its step-6 checkpoint, a cosine run continues bitwise as the
    uninterrupted one. Loading the inner optimizer's state gave it new param groups while the
    post-local-SGD wrapper kept the old ones, so every later lr went nowhere (1.2e-2 off)."""
    from dptrain import cli
    from tests.integration.test_features import params

    run = ["train", "--threads", "1", "--quiet", "--dataset", "synthetic", "--model",
           "myplugins:mlp", "--momentum", "0.9", "--strategy", "localsgd", "--nproc", "2",
           "--batch-size", "16", "--sync-every", "4", "--schedule", "cosine",
           "--max-steps", "12"]
    full = tmp_path / "full"
    assert cli.main([*run, "--ckpt-every", "6", "--out", str(full)]) == 0
    resumed = tmp_path / "resumed"
    assert cli.main([*run, "--resume", str(full / "checkpoints" / "step-00000006.pt"),
                     "--out", str(resumed)]) == 0
    a, b = params(full), params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
