"""Hogwild's pieces without a process group: the segment layout, two mappings of one segment
seeing each other's writes (an optimizer step through one model moves the other), strides
kept, stale segments swept, the optimizer state each rank resumes, and the plan's refusals."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from dptrain import procs
from dptrain.config import TrainConfig
from dptrain.dist import DistEnv
from dptrain.errors import UsageError
from dptrain.plan import Hardware, make_plan
from dptrain.strategies import hogwild
from dptrain.strategies.hogwild import (
    ALIGN,
    Hogwild,
    SharedSegment,
    layout,
    optimizer_state_for,
    share_parameters,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def test_layout_aligns_every_parameter_and_sizes_the_segment():
    params = [torch.zeros(3), torch.zeros(16), torch.zeros(0), torch.zeros(5, dtype=torch.float64)]
    offsets, total = layout(params)
    assert offsets == [0, 64, 128, 128] and total == 192
    assert all(o % ALIGN == 0 for o in offsets)
    assert layout([torch.zeros(0)]) == ([0], ALIGN)  # never a zero-byte mapping


def test_two_mappings_of_one_segment_share_the_parameters(tmp_path):
    a, b = _net().to(memory_format=torch.channels_last), _net()
    b[2].weight.data.add_(1.0)  # b starts elsewhere: the segment's values are a's
    before = {k: v.clone() for k, v in a.state_dict().items()}
    strides = [p.stride() for p in a.parameters()]
    nbytes = layout(list(a.parameters()))[1]
    path = str(tmp_path / "segment")
    first = SharedSegment(path, nbytes, create=True)
    second = SharedSegment(path, nbytes, create=False)
    os.unlink(path)  # as rank 0 does once every rank has mapped it
    assert share_parameters(a, first, fill=True) == sum(
        p.numel() * 4 for p in a.parameters())
    share_parameters(b, second, fill=False)
    assert [p.stride() for p in a.parameters()] == strides  # channels-last kept
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    base = first.bytes.data_ptr()
    assert all(base <= p.data_ptr() < base + nbytes for p in a.parameters())
    # one optimizer step through b (its own optimizer) moves a's parameters: the same memory
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    b(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    assert not torch.equal(a[2].weight, before["2.weight"])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not os.path.exists(path)


def test_a_segment_of_another_size_is_refused(tmp_path):
    path = str(tmp_path / "segment")
    SharedSegment(path, 128, create=True)
    with pytest.raises(OSError, match="has 128 bytes, expected 256"):
        SharedSegment(path, 256, create=False)
    with pytest.raises(FileExistsError):  # O_EXCL: never someone else's file
        SharedSegment(path, 128, create=True)


def _dead_pid() -> int:
    proc = mp.get_context("fork").Process(target=lambda: None)
    proc.start()
    proc.join()
    return proc.pid


def test_sweep_removes_only_segments_whose_creator_is_dead(tmp_path, monkeypatch):
    monkeypatch.setattr(procs, "pid_namespace", lambda: "77")
    dead = Path(tmp_path / f"dptrain-hogwild-77-{_dead_pid()}-abc123")
    alive = Path(tmp_path / f"dptrain-hogwild-77-{os.getpid()}-abc123")
    elsewhere = Path(tmp_path / f"dptrain-hogwild-78-{_dead_pid()}-abc123")  # other namespace
    other = Path(tmp_path / f"dptrain-allreduce-77-{_dead_pid()}-abc123")  # shm.py's to sweep
    for p in (dead, alive, elsewhere, other):
        p.write_bytes(b"x")
    assert hogwild.sweep_stale(str(tmp_path)) == [str(dead)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (alive, elsewhere, other))
    name = Path(hogwild.segment_path(str(tmp_path))).name
    assert re.fullmatch(rf"dptrain-hogwild-77-{os.getpid()}-[0-9a-f]+", name)


def test_each_rank_resumes_its_own_optimizer_state_or_rank_0s_at_another_world_size():
    per_rank = [{"state": {0: {"momentum_buffer": torch.full((2,), float(r))}},
                 "param_groups": []} for r in range(3)]
    state = {"optimizer": per_rank[0], "optimizer_per_rank": per_rank}
    assert optimizer_state_for(state, 2, 3) == (per_rank[2], None)
    own, note = optimizer_state_for(state, 1, 2)
    assert own is per_rank[0] and "written by 3 hogwild processes, this run has 2" in note
    ddp = {"optimizer": per_rank[1]}  # a ddp/zero/fsdp checkpoint: one optimizer state
    assert optimizer_state_for(ddp, 1, 2) == (per_rank[1], None)


def test_describe_says_it_is_not_exact():
    s = Hogwild(DistEnv(source="local"), torch.device("cpu"), backend="gloo", timeout_s=10)
    d = s.describe()
    assert d["exact"] is False and d["strategy"] == "hogwild"
    assert "nondeterministic" in d["update_order"] and d["gradient_communication"] == "none"


@pytest.mark.parametrize(("values", "message"), [
    ({"device": "cuda"}, "runs on CPU here"),
    ({"device": "auto"}, "add --device cpu"),
    ({"nnodes": 2, "master_port": 29500}, "cannot span 2 nodes"),
])
def test_plan_refuses_hogwild_on_cuda_and_across_nodes(values, message):
    cfg = TrainConfig(strategy="hogwild", nproc="2", **values).validate()
    with pytest.raises(UsageError, match=message):
        make_plan(cfg, DistEnv(), Hardware(cuda=True, gpus=2, cores=4))
    cpu = TrainConfig(strategy="hogwild", nproc="2", device="cpu").validate()
    plan = make_plan(cpu, DistEnv(), Hardware(cuda=True, gpus=2, cores=4))
    assert (plan.strategy, plan.device, plan.backend) == ("hogwild", "cpu", "gloo")


def _alone() -> Hogwild:
    """A one-rank strategy whose collectives are the identity (no process group)."""
    s = Hogwild(DistEnv(source="local"), torch.device("cpu"), backend="gloo", timeout_s=10)
    s.broadcast_object = lambda obj: obj
    s.all_gather_object = lambda obj: [obj]
    s.barrier = lambda: None
    return s


def test_wrap_moves_the_parameters_into_an_unlinked_segment(tmp_path, monkeypatch):
    path = str(tmp_path / "dptrain-hogwild-1-2-ab")
    monkeypatch.setattr(hogwild, "segment_path", lambda: path)
    monkeypatch.setattr(hogwild, "sweep_stale", lambda: [])
    s, model = _alone(), _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert s.wrap(model) is model and s.unwrap(model) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    base = s.segment.bytes.data_ptr()
    assert all(base <= p.data_ptr() < base + s.segment.nbytes for p in model.parameters())
    assert not os.path.exists(path)  # unlinked once mapped
    full = sum(p.numel() * 4 for p in model.parameters())
    assert s.describe()["shared_memory_bytes"] == s.segment.nbytes >= full
    mem = s.memory(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert mem["shared_param_bytes"] == mem["param_bytes"] == full


def test_a_segment_that_cannot_be_created_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(hogwild, "segment_path", lambda: str(tmp_path / "absent" / "seg"))
    monkeypatch.setattr(hogwild, "sweep_stale", lambda: [])
    with pytest.raises(UsageError, match=r"cannot share its parameters: rank 0 cannot create "
                                         r".*No such file or directory.*or use --strategy ddp"):
        _alone().wrap(_net())
