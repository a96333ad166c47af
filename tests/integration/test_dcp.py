"""Sharded (DCP) checkpoints on real gloo groups: each rank writes its own shard, a kill -9
in the middle of a save leaves the previous checkpoint to resume from, fsdp and zero
directories resume at other world sizes and under other strategies exactly, last.pt stays
the plain model, and a directory that does not fit the model is refused up front."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from dptrain import checkpoint_dcp
from dptrain.checkpoint import load
from dptrain.verify import compare
from tests.conftest import ROOT, clean_env, run_cli
from tests.integration.test_features import bitwise_equal, params

MODEL = "tests.integration.test_dcp:mlp_with_faults"
COMMON = ["train", "--dataset", "synthetic", "--model", MODEL, "--lr", "0.05", "--momentum",
          "0.9", "--seed", "5", "--threads", "1", "--epochs", "5", "--quiet"]
PAYLOAD = 2 * (784 * 32 + 32 + 32 * 10 + 10) * 4  # the model and its SGD momenta, fp32


def mlp_with_faults() -> nn.Module:
    """``myplugins:mlp`` (hidden width ``$DPTRAIN_TEST_HIDDEN``, default 32). With
    ``$DPTRAIN_TEST_KILL_SAVE=K``, rank 1 of the first attempt SIGKILLs itself inside its
    K-th sharded save, right after its shard is on disk: rank 0 is still in the save."""
    kill_at = int(os.environ.get("DPTRAIN_TEST_KILL_SAVE", "0"))
    if kill_at and os.environ.get("RANK") == "1" and os.environ.get(
            "TORCHELASTIC_RESTART_COUNT", "0") == "0":
        from torch.distributed.checkpoint import FileSystemWriter

        original, calls = FileSystemWriter.write_data, []

        def write_data(self, plan, planner):  # noqa: ANN001, ANN202
            done = original(self, plan, planner)
            calls.append(1)
            if len(calls) == kill_at:
                done.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            return done

        FileSystemWriter.write_data = write_data
    hidden = int(os.environ.get("DPTRAIN_TEST_HIDDEN", "32"))
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _env(**extra: str) -> dict[str, str]:
    env = clean_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env["PYTHONPATH"]])  # this module
    return env


def _train(*args: str, env: dict[str, str] | None = None) -> dict:
    r = run_cli(*COMMON, *args, env=env or _env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "summary.json").read_text())


def _no_temporaries(ckpts: Path) -> bool:
    return not [p for p in ckpts.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("strategy", ["fsdp", "zero"])
def test_each_rank_writes_its_own_shard_and_last_pt_is_the_plain_model(tmp_path, strategy):
    out = tmp_path / "run"
    _train("--strategy", strategy, "--nproc", "2", "--batch-size", "16", "--max-steps", "4",
           "--ckpt-every", "2", "--keep-ckpts", "1", "--out", str(out))
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step-00000004.dcp"]
    shards = {p.name: p.stat().st_size for p in (ckpts / "step-00000004.dcp").iterdir()
              if p.suffix == ".distcp"}
    assert sorted(shards) == ["__0_0.distcp", "__1_0.distcp"]  # one file per rank
    assert sum(shards.values()) >= PAYLOAD  # together: the whole state, once
    assert all(0.25 * PAYLOAD < n < 0.75 * PAYLOAD for n in shards.values()), shards
    last = torch.load(ckpts / "last.pt", weights_only=True)
    plain = mlp_with_faults()
    plain.load_state_dict(last["model"])  # strict: the unwrapped model, no module. prefix
    full = checkpoint_dcp.materialize(load(ckpts / "step-00000004.dcp"))
    assert bitwise_equal(full["model"], last["model"])
    assert len(full["optimizer"]["state"]) == 4  # every parameter's momentum, from 2 ranks
    assert last["position"]["step"] == 4 and _no_temporaries(ckpts)


@pytest.mark.extended
def test_fsdp_2_to_fsdp_3_to_ddp_to_zero_matches_the_uninterrupted_run(tmp_path):
    """Global batch 48: one process x 48 == fsdp 2 x 24 (steps 0-3), fsdp 3 x 16 from its
    directory (3-6), ddp 2 x 24 from --resume DIR (6-9), zero 3 x 16 (9-12)."""
    _train("--batch-size", "48", "--max-steps", "12", "--out", str(tmp_path / "ref"))
    out = str(tmp_path / "moved")
    dcp6 = str(Path(out) / "checkpoints" / "step-00000006.dcp")
    legs = [("fsdp", "2", "24", [], 3), ("fsdp", "3", "16", ["--resume", "auto"], 6),
            ("ddp", "2", "24", ["--resume", dcp6], 9), ("zero", "3", "16", ["--resume", "auto"],
                                                       12)]
    for strategy, nproc, batch, extra, steps in legs:
        s = _train("--strategy", strategy, "--nproc", nproc, "--batch-size", batch,
                   "--ckpt-every", "3", "--max-steps", str(steps), *extra, "--out", out)
        assert (s["strategy"], s["world_size"], s["steps"]) == (strategy, int(nproc), steps)
    names = sorted(p.name for p in (Path(out) / "checkpoints").iterdir())
    assert names == ["last.pt", "step-00000006.dcp", "step-00000009.pt", "step-00000012.dcp"]
    diff, where = compare(params(tmp_path / "ref"), params(Path(out)))
    assert diff < 1e-5, where


@pytest.mark.extended
def test_zero_shards_load_into_fsdp_at_another_world_size(tmp_path):
    _train("--batch-size", "48", "--max-steps", "6", "--out", str(tmp_path / "ref"))
    out = str(tmp_path / "moved")
    _train("--strategy", "zero", "--nproc", "2", "--batch-size", "24", "--max-steps", "3",
           "--out", out)
    s = _train("--strategy", "fsdp", "--nproc", "3", "--batch-size", "16", "--max-steps", "6",
               "--resume", "auto", "--out", out)
    assert s["resumed_from"].endswith("step-00000003.dcp")
    diff, where = compare(params(tmp_path / "ref"), params(Path(out)))
    assert diff < 1e-5, where


def test_kill_9_during_a_sharded_save_resumes_from_the_previous_one(tmp_path):
    args = ["--strategy", "fsdp", "--nproc", "2", "--batch-size", "16", "--max-steps", "9",
            "--ckpt-every", "3", "--log-every", "3"]
    _train(*args, "--out", str(tmp_path / "ref"))
    s = _train(*args, "--max-restarts", "1", "--out", str(tmp_path / "killed"),
               env=_env(DPTRAIN_TEST_KILL_SAVE="2"))  # rank 1 dies inside the step-6 save
    assert s["restarts"] == 1 and s["steps"] == 9
    assert s["resumed_from"].endswith("step-00000003.dcp")  # step 6 never became visible
    assert bitwise_equal(params(tmp_path / "ref"), params(tmp_path / "killed"))
    ckpts = tmp_path / "killed" / "checkpoints"
    assert _no_temporaries(ckpts)  # the half-written directory was swept
    assert {"step-00000006.dcp", "step-00000009.dcp"} <= {p.name for p in ckpts.iterdir()}


def test_a_directory_of_another_model_is_refused_before_anything_changes(tmp_path):
    out = tmp_path / "run"
    _train("--strategy", "fsdp", "--nproc", "2", "--batch-size", "16", "--max-steps", "2",
           "--ckpt-every", "2", "--out", str(out))
    before = _files(out)
    r = run_cli(*COMMON, "--batch-size", "32", "--max-steps", "4", "--resume",
                str(out / "checkpoints" / "step-00000002.dcp"), "--out", str(out),
                env=_env(DPTRAIN_TEST_HIDDEN="16"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint "), r.stderr[-2000:]
    assert "step-00000002.dcp does not fit" in lines[0] and "(32, 784)" in lines[0]
    assert _files(out) == before  # config.toml, metrics, checkpoints: untouched


def _files(out: Path) -> dict[Path, bytes]:
    """Every file of a run directory but its lock (which holds the pid of its last user)."""
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()
            and p.name != ".dptrain.lock"}


def test_localsgd_resumes_a_sharded_checkpoint(tmp_path):
    """fsdp 0-5 (a DCP directory), then localsgd at H = 1 5-10 equals one process 0-10. It
    was a KeyError traceback: the full state read from the shards had no position."""
    from dptrain import cli

    common = ["train", "--threads", "1", "--quiet", "--dataset", "synthetic", "--model",
              "myplugins:mlp", "--momentum", "0.9", "--max-steps", "10"]
    out = tmp_path / "moved"
    assert cli.main([*common, "--strategy", "fsdp", "--nproc", "2", "--batch-size", "16",
                     "--max-steps", "5", "--ckpt-every", "5", "--out", str(out)]) == 0
    assert (out / "checkpoints" / "step-00000005.dcp").is_dir()
    assert cli.main([*common, "--strategy", "localsgd", "--nproc", "2", "--batch-size", "16",
                     "--sync-every", "1", "--resume", "auto", "--out", str(out)]) == 0
    assert cli.main([*common, "--batch-size", "32", "--out", str(tmp_path / "ref")]) == 0
    assert compare(params(out), params(tmp_path / "ref"))[0] < 1e-6
