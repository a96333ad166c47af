"""--strategy hogwild on real 2-process gloo jobs: accuracy in one epoch, one shared copy of the
parameters (bitwise the same on every rank, N times the updates per sample of ddp), private
momenta, checkpoints and resume (--resume auto, SIGTERM, kill -9 and restart, another world
size through dptrain.fit), the refusal across nodes, and nothing left in /dev/shm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dptrain
from dptrain.data.datasets import load_splits
from dptrain.data.loader import Normalizer, ShardedLoader
from dptrain.strategies.hogwild import PREFIX
from tests.conftest import clean_env, run_cli
from tests.integration.test_features import _wait_for, _workers

MLP_BYTES = (784 * 32 + 32 + 32 * 10 + 10) * 4  # myplugins:mlp, float32
SETTINGS = {"threads": 1, "lr": 0.05, "momentum": 0.9,
            "batch_size": 32, "quiet": True}
HOG = ["train", "--dataset", "synthetic", "--model", "myplugins:mlp", "--threads", "1",
       "--lr", "0.05", "--momentum", "0.9", "--batch-size", "32", "--quiet",
       "--strategy", "hogwild", "--nproc", "2"]
EPOCH = 6000 // 64  # optimizer steps per epoch of the synthetic set, 2 x batch 32


def segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(PREFIX)}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def last(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


def test_two_processes_reach_97_percent_in_one_epoch_with_their_own_momenta(tmp_path):
    before = segments()
    r = run_cli(*HOG, "--epochs", "1", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "update order is nondeterministic" in r.stderr  # the warning line, even --quiet
    s = summary(tmp_path / "run")
    assert (s["strategy"], s["world_size"], s["steps"], s["test_samples"]) == (
        "hogwild", 2, EPOCH, 1000)
    assert s["test_accuracy"] >= 0.97 and s["exact"] is False
    assert s["gradient_communication"] == "none" and s["shared_memory_bytes"] >= MLP_BYTES
    for rank in s["memory_per_rank"]:  # the parameters live once, in the shared segment
        assert rank["param_bytes"] == rank["shared_param_bytes"] == MLP_BYTES
        assert rank["optim_bytes"] == MLP_BYTES  # but every rank has its own momenta
    state = last(tmp_path / "run")
    assert sorted(state["model"]) == ["1.bias", "1.weight", "3.bias", "3.weight"]
    mine, theirs = (o["state"] for o in state["optimizer_per_rank"])
    assert all(torch.equal(state["optimizer"]["state"][i]["momentum_buffer"],
                           mine[i]["momentum_buffer"]) for i in mine)
    assert not torch.equal(mine[0]["momentum_buffer"], theirs[0]["momentum_buffer"])
    assert segments() == before  # unlinked as soon as both ranks had mapped it


PROBE_LOOP = '''
import sys
import torch
import torch.nn.functional as F
from torch import nn
import dptrain
from dptrain.data.datasets import load_splits


class Probed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.probe = nn.Parameter(torch.zeros(10))

    def forward(self, x):  # the probe's gradient: x's first 10 pixels, no parameter in it
        return self.fc(x), (self.probe * x.flatten(1)[:, :10]).sum(1)


strategy, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
with dptrain.Session(strategy=strategy, seed=3, out=out, threads=1, quiet=True) as s:
    data = load_splits("synthetic", "unused")
    model, opt = s.setup(Probed(), lambda params: torch.optim.SGD(params, lr=0.02))
    loader = s.loader(data.train_x, data.train_y, batch_size=16,
                      normalize=(data.mean, data.std))
    for step, micro in enumerate(loader.epoch(0), 1):  # no collective: the ranks run freely
        for x, y in s.accumulate(model, micro):
            logits, term = model(x)
            s.backward(F.cross_entropy(logits, y) + term.mean())
        s.step(opt)
        if step == steps:
            break
    s.save(steps, model, opt)  # waits for every rank: nobody is stepping any more
    plain = {k: v.clone() for k, v in s.unwrap(model).state_dict().items()}
    torch.save(plain, f"{out}/rank{s.rank}.pt")
'''


def probe_updates(steps: int, lr: float = 0.02) -> list[torch.Tensor]:
    """What each rank's plain-SGD updates move the probe by: -lr x the mean of its batches'
    first 10 pixels, summed over its steps (the same loader as the Session's)."""
    data = load_splits("synthetic", "unused")
    moves = []
    for rank in (0, 1):
        loader = ShardedLoader(data.train_x, data.train_y, batch_size=16, rank=rank, world=2,
                               accum=1, seed=3, normalize=Normalizer(data.mean, data.std))
        batches = [micro[0][0] for micro, _ in zip(loader.epoch(0), range(steps))]
        moves.append(-lr * sum(x.flatten(1)[:, :10].double().mean(0) for x in batches))
    return moves


def test_every_rank_holds_the_same_parameters_updated_n_times_per_sample(tmp_path):
    """Plain SGD on a probe whose gradient is the data's alone: ddp would move it by lr x the
    mean over the global batch per step (the mean of the two ranks' moves); hogwild moves it
    by both ranks' moves, each applied by its own optimizer -- twice as far as ddp, once
    every update lands in the one shared copy (a copy per rank would hold its own only)."""
    script = tmp_path / "probe_loop.py"
    script.write_text(PROBE_LOOP)
    r = run_cli("run", "--nproc", "2", str(script), "hogwild", str(tmp_path / "run"), "40",
                env=clean_env(OMP_NUM_THREADS="1"), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    h0, h1 = (torch.load(tmp_path / "run" / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(h0[k], h1[k]) for k in h0)  # one copy: bitwise the same
    mine, theirs = probe_updates(40)
    ddp = (mine + theirs) / 2
    assert ddp.abs().min() > 1e-3 and (mine - theirs).abs().max() > 1e-3
    ratio = h0["probe"].double() / ddp
    # updates lost to races: ~1 % on average, up to 10 % for one element under the full
    # suite (a fresh-clone CI saw 1.90); a copy per rank would give ~1 everywhere
    assert abs(ratio.mean() - 2) < 0.05 and ((ratio - 2).abs() < 0.15).all(), ratio
    assert torch.allclose(h0["probe"].double(), mine + theirs, rtol=0.075, atol=1e-5)
    assert last(tmp_path / "run")["position"]["step"] == 40


def test_fit_trains_hogwild_and_another_world_size_resumes_with_rank_0s_momenta(tmp_path,
                                                                                capfd):
    out = str(tmp_path / "fit")
    first = dptrain.fit("myplugins:mlp", "synthetic", strategy="hogwild", nproc=2,
                        epochs=1, max_steps=40, out=out, **SETTINGS)
    assert (first["strategy"], first["world_size"], first["steps"]) == ("hogwild", 2, 40)
    saved = last(Path(out))
    assert all(torch.equal(p, saved["model"][k]) for k, p in first.model.state_dict().items())
    # one process, the same global batch (64): the shared model, rank 0's momenta, step 40
    capfd.readouterr()
    again = dptrain.fit("myplugins:mlp", "synthetic", strategy="hogwild", nproc=1, epochs=1,
                        out=out, resume="auto", **{**SETTINGS, "batch_size": 64,
                                                   "quiet": False})
    assert "every rank continues from rank 0's optimizer state" in capfd.readouterr().err
    assert again["resumed_from"].endswith("step-00000040.pt")
    assert (again["steps"], again["world_size"]) == (EPOCH, 1)
    assert again["test_accuracy"] >= 0.97


@pytest.mark.extended
def test_sigterm_mid_run_checkpoints_and_resume_auto_finishes(tmp_path):
    out, args = tmp_path / "run", [*HOG, "--epochs", "10", "--log-every", "5"]
    proc = subprocess.Popen([sys.executable, "-m", "dptrain", *args, "--out", str(out)],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    stopped = last(out)["position"]["step"]
    assert 0 < stopped < 10 * EPOCH and len(last(out)["optimizer_per_rank"]) == 2
    again = run_cli(*args, "--resume", "auto", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    s = summary(out)
    assert s["resumed_from"] is not None and s["steps"] == 10 * EPOCH
    assert s["test_accuracy"] >= 0.97


@pytest.mark.extended
def test_kill_9_a_worker_then_restart_finishes_and_leaves_no_segment(tmp_path):
    before, out = segments(), tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dptrain", *HOG, "--epochs", "10",
                             "--ckpt-every", "20", "--log-every", "5", "--max-restarts", "1",
                             "--out", str(out)], env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoints" / "step-00000020.pt", proc)
    workers = _workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)  # rank 1 dies with the segment mapped
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    s = summary(out)
    assert (s["restarts"], s["steps"]) == (1, 10 * EPOCH) and s["resumed_from"] is not None
    assert s["test_accuracy"] >= 0.97
    assert segments() == before


def test_hogwild_across_nodes_is_refused_before_anything_starts(tmp_path):
    r = run_cli(*HOG, "--nnodes", "2", "--master-port", "29500", "--out",
                str(tmp_path / "no"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --strategy hogwild")
    assert "cannot span 2 nodes" in lines[0] and not (tmp_path / "no").exists()
