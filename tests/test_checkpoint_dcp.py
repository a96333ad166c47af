"""DCP checkpoint directories without a process group: written by one process through the
same code the ranks run, then read back, checked, refused, rotated and swept."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dptrain import checkpoint, checkpoint_dcp
from dptrain.checkpoint import Checkpointer, load
from dptrain.config import TrainConfig
from dptrain.errors import UsageError


class _OneProcess:
    """The two collectives a sharded save needs, for a world of one."""

    name = "fsdp"

    def broadcast_object(self, obj):  # noqa: ANN001, ANN201
        return obj


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _sharded(model: nn.Module, step: int) -> checkpoint_dcp.ShardedState:
    """What a strategy hands the Checkpointer: SGD momenta by name, plus the metadata."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, scalars = checkpoint_dcp.split_state(
        {id(p): s for p, s in opt.state.items()}, names)
    meta = {"param_groups": checkpoint_dcp.named_groups(opt.param_groups, names),
            "optim_scalars": scalars, "scaler": {}, "world_size": 1,
            "rng": {"cpu": [torch.get_rng_state()], "cuda": [torch.empty(0, dtype=torch.uint8)],
                    "data_seed": 0},
            "position": {"step": step, "epoch": 0, "step_in_epoch": step},
            "config": TrainConfig().to_dict(), "strategy": "fsdp"}
    state = checkpoint_dcp.ShardedState(meta, {"optim": tensors, "model": model.state_dict()},
                                        model.state_dict(), _OneProcess())
    state.optimizer = opt
    return state


def test_a_directory_round_trips_into_the_consolidated_format(tmp_path: Path):
    model = _model()
    state = _sharded(model, 3)
    ck = Checkpointer(tmp_path, is_main=True)
    path = ck.save(state, 3)
    assert path == tmp_path / "step-00000003.dcp" and path.is_dir()
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "dptrain.pt"]
    assert not list(tmp_path.glob(".*tmp*"))  # nothing left under a temporary name
    read = load(path)
    assert read["position"]["step"] == 3 and read["sharded"] == str(path)
    assert {k: (tuple(t.shape), t.device.type) for k, t in read["model"].items()} == {
        k: (tuple(t.shape), "meta") for k, t in model.state_dict().items()}
    full = checkpoint_dcp.materialize(read)
    assert all(torch.equal(full["model"][k], v) for k, v in model.state_dict().items())
    want = state.optimizer.state_dict()
    assert full["optimizer"]["param_groups"] == want["param_groups"]
    for i, s in want["state"].items():
        assert torch.equal(full["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"])
    fresh = _model()  # the full state loads into a plain optimizer, as a .pt one does
    opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.0)
    opt.load_state_dict(full["optimizer"])
    assert opt.param_groups[0]["momentum"] == 0.9


def test_last_pt_is_the_plain_model_and_points_at_its_directory(tmp_path: Path):
    model = _model()
    Checkpointer(tmp_path, is_main=True).save(_sharded(model, 5), 5)
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert raw["sharded"] == "step-00000005.dcp" and "optimizer" not in raw
    plain = _model()
    plain.load_state_dict(raw["model"])  # plain PyTorch, strict
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in model.state_dict().items())
    state = load(tmp_path / "last.pt")  # for resume: the directory beside it
    assert state["sharded"] == str(tmp_path / "step-00000005.dcp")
    checkpoint.check_model(state, "p", _model(), TrainConfig())
    # copied away from its directory: still a model for inference, no longer resumable
    shutil.copy(tmp_path / "last.pt", tmp_path / "model.pt")
    shutil.rmtree(tmp_path / "step-00000005.dcp")
    away = load(tmp_path / "model.pt")
    assert torch.equal(away["model"]["0.weight"], model.state_dict()["0.weight"])
    with pytest.raises(UsageError, match="incomplete"):
        checkpoint.check_model(away, "p", _model(), TrainConfig())


def test_other_model_shapes_are_refused_from_the_index(tmp_path: Path):
    path = Checkpointer(tmp_path, is_main=True).save(_sharded(_model(), 1), 1)
    other = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(UsageError, match=r"does not fit .*'0.weight' has shape \(3, 4\)"):
        checkpoint.check_model(load(path), str(path), other, TrainConfig())


def _flip_a_byte(shard: Path) -> None:
    """Damage inside a tensor's bytes: the size stays, so only a checksum can tell (it used
    to resume with a wrong weight, silently)."""
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: (p / "dptrain.pt").unlink(), "no dptrain.pt"),
    (lambda p: (p / ".metadata").unlink(), "no .metadata"),
    (lambda p: (p / "__0_0.distcp").unlink(), "shard __0_0.distcp is missing or truncated"),
    (lambda p: os.truncate(p / "__0_0.distcp", 100), "missing or truncated"),
    (lambda p: (p / ".metadata").write_bytes(b"\x80\x04garbage"), ".metadata is unreadable"),
    (lambda p: _flip_a_byte(p / "__0_0.distcp"), "shard __0_0.distcp fails its CRC-32 check"),
])
def test_an_incomplete_directory_is_refused(tmp_path: Path, damage, message):
    path = Checkpointer(tmp_path, is_main=True).save(_sharded(_model(), 1), 1)
    damage(path)
    with pytest.raises(UsageError, match=message) as exc:
        load(path)
    assert str(exc.value).startswith(f"checkpoint {path}")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_metadata_pickle_that_runs_code_is_refused_and_not_run(tmp_path: Path,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = Checkpointer(tmp_path, is_main=True).save(_sharded(_model(), 1), 1)
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UsageError, match="unsupported global posix.system"):
        load(path)
    assert not (tmp_path / "pwned").exists()


def test_rotation_keeps_directories_and_resume_falls_back_past_a_broken_one(tmp_path: Path):
    ck = Checkpointer(tmp_path, is_main=True, keep=2)
    for step in (1, 2, 3):
        ck.save(_sharded(_model(), step), step)
    assert [p.name for p in ck.numbered()] == ["step-00000003.dcp", "step-00000002.dcp"]
    (tmp_path / "step-00000003.dcp" / ".metadata").unlink()
    warned: list[str] = []
    path, state = ck.latest_good(warn=warned.append)
    assert path.name == "step-00000002.dcp" and state["position"]["step"] == 2
    assert len(warned) == 1 and "step-00000003.dcp is incomplete" in warned[0]


def test_sweep_removes_a_dead_writers_directory_and_keeps_a_live_one(tmp_path: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".step-00000004.dcp.tmp{int(dead.stdout)}"
    live = tmp_path / f".step-00000006.dcp.tmp{os.getpid()}"
    for d in (stale, live):
        d.mkdir()
        (d / "__0_0.distcp").write_bytes(b"half")
    removed = Checkpointer(tmp_path, is_main=True).sweep()
    assert removed == [stale] and not stale.exists() and live.is_dir()
    assert Checkpointer(tmp_path, is_main=True).numbered() == []  # never a checkpoint


def test_saving_a_step_again_replaces_its_directory(tmp_path: Path):
    ck = Checkpointer(tmp_path, is_main=True)
    ck.save(_sharded(_model(), 2), 2)
    again = _model()
    with torch.no_grad():
        again[0].weight.fill_(7.0)
    ck.save(_sharded(again, 2), 2)
    full = checkpoint_dcp.materialize(load(tmp_path / "step-00000002.dcp"))
    assert float(full["model"]["0.weight"].mean()) == pytest.approx(7.0, abs=0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step-00000002.dcp"]
