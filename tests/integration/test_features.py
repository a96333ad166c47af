"""Training features, each proven on values: accumulation, SyncBN, LR scaling, precision,
checkpoints and exact resume (in-process and after kill -9 / SIGTERM of real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dptrain.cli import run_training
from dptrain.config import TrainConfig
from dptrain.verify import compare
from tests.conftest import clean_env, launcher_workers, run_cli, train_inproc

SYN = ["--dataset", "synthetic", "--threads", "1"]


def cfg(out: Path, **kw) -> TrainConfig:
    base = dict(dataset="synthetic", data_root="unused", lr=0.01, momentum=0.9, seed=2,
                threads=1, quiet=True, epochs=100, eval_every_epoch=False, out=str(out))
    return TrainConfig(**{**base, **kw}).validate()


def params(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_accumulation_equals_the_larger_batch_and_cuts_allreduces_by_k(tmp_path):
    # 1 process, batch 32  ==  1 process, accum 4 x batch 8  ==  2 processes, accum 2 x batch 8
    run_training(cfg(tmp_path / "big", batch_size=32, max_steps=20, model="myplugins:mlp"))
    run_training(cfg(tmp_path / "acc", batch_size=8, accum=4, max_steps=20, model="myplugins:mlp"))
    run_training(cfg(tmp_path / "ddp", batch_size=8, accum=2, max_steps=20, nproc="2",
                     model="myplugins:mlp"))
    big = params(tmp_path / "big")
    assert compare(big, params(tmp_path / "acc"))[0] <= 1e-5
    assert compare(big, params(tmp_path / "ddp"))[0] <= 1e-5
    # same number of micro-batches (16); all-reduces counted by a DDP communication hook
    s1 = run_training(cfg(tmp_path / "c1", batch_size=8, accum=1, max_steps=16, nproc="2"),
                      count_comm=True)
    s4 = run_training(cfg(tmp_path / "c4", batch_size=8, accum=4, max_steps=4, nproc="2"),
                      count_comm=True)
    assert s1["allreduce_calls"] == 16 and s4["allreduce_calls"] == 4
    assert s1["allreduce_bytes"] == 4 * s4["allreduce_bytes"] == 16 * (784 * 10 + 10) * 4


def test_sync_bn_matches_one_process_and_plain_bn_is_reported_per_process(tmp_path):
    # 30 steps compare only where both sides run the same convolution kernels: contiguous.
    # In channels_last oneDNN picks its kernel by batch and thread count, and that rounding
    # alone (1.7e-4 after 5 steps between 1 process in channels_last and in contiguous) grows
    # to 2.5e-2 by step 30, as a change of thread count does
    one = run_training(cfg(tmp_path / "one", model="convnet", batch_size=32, max_steps=30,
                           channels_last="off"))
    sync = run_training(cfg(tmp_path / "sync", model="convnet", batch_size=16, max_steps=30,
                            nproc="2", sync_bn=True, channels_last="off"))
    plain = run_training(cfg(tmp_path / "plain", model="convnet", batch_size=16, max_steps=30,
                             nproc="2", channels_last="off"))
    diff, where = compare(params(tmp_path / "one"), params(tmp_path / "sync"))
    assert diff <= 1e-4, where  # parameters AND running statistics
    assert compare(params(tmp_path / "one"), params(tmp_path / "plain"))[0] > 1e-3
    assert sync["bn_statistics"].startswith("synchronized")
    assert plain["bn_statistics"].startswith("per process")
    assert one["bn_statistics"] == "single process"


def test_lr_scaling_and_warmup(tmp_path):
    lin = run_training(cfg(tmp_path / "lin", batch_size=32, nproc="1", lr_scaling="linear",
                           ref_batch=64, lr=0.1, max_steps=3))
    sq = run_training(cfg(tmp_path / "sq", batch_size=256, lr_scaling="sqrt", ref_batch=64,
                          lr=0.1, max_steps=3, warmup_steps=2, log_every=1))
    assert lin["effective_lr"] == 0.05 and lin["global_batch"] == 32
    assert abs(sq["effective_lr"] - 0.2) < 1e-12
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "sq" / "metrics.jsonl").read_text()
           .splitlines() if '"lr"' in x]
    assert lrs[:3] == [0.1, 0.2, 0.2]  # warm-up: (step+1)/2 of the peak, then the peak


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny):
    s = train_inproc(tmp_path / "bf", *tiny, "--precision", "bf16", "--model", "myplugins:mlp",
                     "--momentum", "0.9",  # the SGD default this test was written for
                     "--max-steps", "60")
    assert s["precision"] == "bf16" and s["test_accuracy"] > 0.8


def test_resume_mid_epoch_is_bitwise_identical_with_dropout(tmp_path, tiny):
    args = [*tiny, "--model", "cnn", "--max-steps", "20", "--ckpt-every", "7", "--keep-ckpts",
            "5", "--batch-size", "16"]
    train_inproc(tmp_path / "full", *args)
    # continue from step 7 (mid-epoch: 375 steps per epoch) in a fresh directory
    ckpt = tmp_path / "full" / "checkpoints" / "step-00000007.pt"
    s = train_inproc(tmp_path / "resumed", *args, "--resume", str(ckpt))
    assert s["resumed_from"] == str(ckpt) and s["steps"] == 20
    assert bitwise_equal(params(tmp_path / "full"), params(tmp_path / "resumed"))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    r = run_cli("train", *SYN, "--lr", "1e37", "--max-steps", "50", "--ckpt-every", "1",
                "--log-every", "1", "--out", str(tmp_path / "nan"))
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: non-finite")
    assert "step" in line[0]
    good = torch.load(tmp_path / "nan" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in good["model"].values())


def _workers(pid: int) -> list[int]:
    """The launcher's worker processes (spawned or forked from its fork server)."""
    return launcher_workers(pid)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def kill_a_worker_then_restart(args: list[str], tmp_path: Path,
                               checkpoint: str = "step-00000020.pt") -> dict:
    """Run ``args`` uninterrupted (``ref``) and again (``killed``) with ``--max-restarts``,
    kill -9 one of its 2 workers after the step-20 ``checkpoint`` (a DCP directory for the
    sharded strategies); the second run's summary."""
    ref = run_cli(*args, "--out", str(tmp_path / "ref"), timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "dptrain", *args, "--max-restarts", "2",
                             "--out", str(tmp_path / "killed")], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "killed" / "checkpoints" / checkpoint, proc)
    workers = _workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)  # a real worker process, mid-epoch
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads((tmp_path / "killed" / "summary.json").read_text())


@pytest.mark.extended  # make test: test_faults.py kills 3 times, each resuming bitwise
def test_kill_9_a_worker_then_elastic_restart_resumes_bitwise(tmp_path):
    summary = kill_a_worker_then_restart(
        ["train", *SYN, "--nproc", "2", "--model", "cnn", "--batch-size", "16",
         "--max-steps", "60", "--ckpt-every", "10", "--log-every", "5", "--quiet"], tmp_path)
    assert summary["restarts"] == 1 and summary["steps"] == 60
    assert summary["resumed_from"] is not None
    assert bitwise_equal(params(tmp_path / "ref"), params(tmp_path / "killed"))


def test_sigterm_checkpoints_then_resume_auto_finishes_bitwise(tmp_path):
    args = ["train", *SYN, "--model", "cnn", "--batch-size", "16", "--max-steps", "200",
            "--log-every", "5", "--ckpt-every", "100", "--quiet"]
    ref = run_cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "dptrain", *args, "--out",
                             str(tmp_path / "pre")], env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "pre" / "metrics.jsonl", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by signal" in err and "--resume auto" in err  # stderr, as the launcher's
    assert "stopped by signal" not in out
    stopped = torch.load(tmp_path / "pre" / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < stopped["position"]["step"] < 200
    again = run_cli(*args, "--resume", "auto", "--out", str(tmp_path / "pre"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert bitwise_equal(params(tmp_path / "ref"), params(tmp_path / "pre"))
