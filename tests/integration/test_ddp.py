"""Real gloo process groups on 127.0.0.1: equivalence, exact evaluation, launchers, crashes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from dptrain import launch
from dptrain.dist import DistEnv, free_port
from dptrain.strategies.single import SingleDevice
from dptrain.verify import compare, run_pair
from tests.conftest import clean_env, run_cli
from tests.integration.workers import eval_worker, evaluate_fixed

BASE = {"dataset": "synthetic", "data_root": "unused", "batch_size": 8, "lr": 0.05,
        "momentum": 0.9, "seed": 11, "threads": 1}


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "checkpoints" / "last.pt", weights_only=True)["model"]


def losses(path: Path) -> list[float]:
    import json

    return [json.loads(x)["loss"] for x in (path / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x]


@pytest.mark.parametrize("nproc, model, allreduce", [(1, "linear", "auto"),
                                                    (2, "myplugins:mlp", "auto"),
                                                    (2, "myplugins:mlp", "gloo"),
                                                    (3, "linear", "auto")])
def test_n_processes_equal_one_process_with_the_global_batch(tmp_path, nproc, model, allreduce):
    s1, sn = run_pair({**BASE, "model": model, "cpu_allreduce": allreduce}, nproc, 25, tmp_path)
    assert s1["global_batch"] == sn["global_batch"] == 8 * nproc
    assert sn["world_size"] == nproc and sn["strategy"] == "ddp" and s1["strategy"] == "single"
    # auto: shared memory between local processes; gloo's TCP when asked (or one process)
    assert sn["allreduce"] == ("shm" if allreduce == "auto" and nproc > 1 else "gloo")
    assert not list(Path("/dev/shm").glob("dptrain-allreduce-*"))  # nothing left behind
    diff, _ = compare(load(tmp_path / "one"), load(tmp_path / f"ddp{nproc}"))
    assert diff <= 1e-5
    l1, ln = losses(tmp_path / "one"), losses(tmp_path / f"ddp{nproc}")
    assert len(l1) == len(ln) == 25
    assert max(abs(a - b) for a, b in zip(l1, ln)) <= 1e-5
    assert s1["test_accuracy"] == sn["test_accuracy"]


@pytest.mark.parametrize(("world", "model", "dataset", "loss"), [
    (2, "convnet", "synthetic", "cross_entropy"),
    (3, "convnet", "synthetic", "cross_entropy"),
    (3, "taskplugins:regressor", "taskplugins:regression_data", "mse"),
    (3, "taskplugins:multilabel_model", "taskplugins:multilabel_data", "bce"),
])
def test_distributed_evaluation_counts_each_sample_once(world, model, dataset, loss,
                                                         monkeypatch):
    """Every metric is a function of per-sample sums: N ranks equal one process."""
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(  # the workers import the plug-ins
        [str(Path(__file__).parents[1] / "plugins"), os.environ.get("PYTHONPATH", "")]))
    results = launch.launch(eval_worker, (model, dataset, loss), nproc=world)
    ref = evaluate_fixed(model, dataset, loss, SingleDevice(DistEnv(), torch.device("cpu")))
    n = 1000 if dataset == "synthetic" else 256  # neither divisible by 3: no padding
    assert ref["samples"] == n
    for metrics in results.values():
        assert metrics["samples"] == n
        assert metrics.keys() == ref.keys()
        # counts (accuracy, F1) are exact; sums of floats computed in other batch shapes
        # (a conv kernel picks its algorithm by batch size) agree to float rounding
        assert metrics.get("accuracy") == ref.get("accuracy")
        for key, value in ref.items():
            assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_worker_crash_ends_the_job_quickly_with_rank_and_traceback(tmp_path):
    t0 = time.monotonic()
    r = run_cli("train", "--nproc", "2", "--dataset", "synthetic", "--model",
                "myplugins:exploding", "--out", str(tmp_path / "o"), "--threads", "1",
                "--timeout-s", "60", timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode not in (0, 2)
    assert "worker rank 1" in r.stderr
    assert "Traceback" in r.stderr and "injected failure in rank 1" in r.stderr
    assert elapsed < 45  # the other worker was stopped, not left waiting for the timeout


def test_external_torchrun_and_legacy_launcher_match_our_launcher(tmp_path):
    args = ["--dataset", "synthetic", "--model", "linear", "--max-steps", "20", "--seed", "3",
            "--threads", "1", "--quiet"]
    ours = run_cli("train", "--nproc", "2", *args, "--out", str(tmp_path / "ours"))
    assert ours.returncode == 0, ours.stderr
    env = clean_env()
    tr = run_cli("--standalone", "--nproc-per-node", "2", "-m", "dptrain", "train", *args,
                 "--out", str(tmp_path / "torchrun"), module="torch.distributed.run", env=env, timeout=120)
    assert tr.returncode == 0, tr.stderr[-2000:]
    legacy = run_cli("--nproc-per-node", "2", "--master-port", str(free_port()),
                     "-m", "dptrain", "train", *args, "--out", str(tmp_path / "legacy"),
                     module="torch.distributed.launch", env=env, timeout=120)
    assert legacy.returncode == 0, legacy.stderr[-2000:]
    a = load(tmp_path / "ours")
    for other in ("torchrun", "legacy"):
        b = load(tmp_path / other)
        assert all(torch.equal(a[k], b[k]) for k in a), other
    assert "test accuracy" in tr.stdout


def test_verify_command_passes_for_two_processes():
    r = run_cli("verify", "--nproc", "2", "--steps", "10", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PASS" in r.stdout and "largest parameter difference" in r.stdout


def test_verify_sync_bn_and_localsgd_pass_in_process(capsys):
    """verify --sync-bn: the one-process reference drops --sync-bn (its BatchNorm sees the
    whole batch already; it was refused); localsgd: the exact H = 1 by default. 5 steps: a
    BatchNorm convnet drifts ~1e-4 after 5 steps from float reassociation alone."""
    from dptrain import cli

    for extra, tol in ((["--model", "convnet", "--sync-bn"], "1e-4"),
                       (["--strategy", "localsgd"], "1e-5")):
        assert cli.main(["verify", "--nproc", "2", "--steps", "5", "--threads", "1",
                         "--tol", tol, *extra]) == 0
        assert "PASS" in capsys.readouterr().out


def test_verify_fails_when_runs_differ():
    # dropout: different masks per process, by design -> the check must say FAIL (exit 1)
    r = run_cli("verify", "--nproc", "2", "--steps", "5", "--model", "cnn", "--threads", "1")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "FAIL" in r.stdout


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("process-group tests run on Linux")


@pytest.mark.parametrize(("allreduce", "gloo_calls"), [("auto", 0), ("gloo", 3)])
def test_scalar_sums_take_the_gradients_path(allreduce, gloo_calls):
    from dptrain.strategies import shm

    if allreduce == "auto" and shm.supported() is not None:
        pytest.skip(f"no shared-memory all-reduce here: {shm.supported()}")
    """The sync point's and the evaluation's small sums go through the shared segment when the
    gradients do (gloo costs ~1-2 ms for each here: 22 % of a convnet step at --log-every 1),
    and stay exact, non-contiguous and integer tensors included."""
    from tests.integration.workers import scalar_sum_worker

    results = launch.launch(scalar_sum_worker, (allreduce,), nproc=3)
    expected = [[1.5 + 3.0 + 4.5, 3.0, 0.0, 1.0],
                [[0.0, 18.0], [6.0, 24.0], [12.0, 30.0]],
                [6, 21]]
    for got in results.values():
        assert got["path"] == ("shm" if allreduce == "auto" else "gloo")
        assert got["sums"] == expected
        assert got["gloo_calls"] == gloo_calls


def test_one_process_ddp_makes_no_all_reduce():
    """A sum over one rank is the tensor itself: a one-process DDP job (``--nproc 1``, what
    ``dptrain bench`` bases its efficiencies on) skips gloo for its gradients and its sync
    points (~70 us per bucket and ~20 us per sum here) and keeps the same gradients."""
    from tests.integration.workers import one_process_ddp_worker

    (got,) = launch.launch(one_process_ddp_worker, (), nproc=1).values()
    assert got == {"gloo_calls": 0, "sum": [2.5, 1.0], "grads_equal": True}


def test_sync_bn_on_a_model_without_batchnorm_is_warned_about(tmp_path):
    r = run_cli("train", "--dataset", "synthetic", "--model", "linear", "--strategy", "ddp",
                "--nproc", "1", "--sync-bn", "--max-steps", "2", "--quiet", "--out",
                str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert "warning: --sync-bn: --model linear has no BatchNorm layer" in r.stderr
    assert "warning" not in r.stdout  # warnings go to stderr, beside errors
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["bn_statistics"] == "none"
