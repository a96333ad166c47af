"""localsgd's rules without a process group: the average schedule is torch's averager's own,
the ranks are known equal exactly after averages and warm-up steps, the refused flags."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.distributed.algorithms.model_averaging import averagers

from dptrain.errors import UsageError
from dptrain.strategies.ddp import DDPOptions
from dptrain.strategies.localsgd import _to_cpu, averages_after, in_sync_after, refuse


@pytest.mark.parametrize(("period", "warmup"), [(1, 0), (8, 0), (4, 2), (3, 7)])
def test_the_schedule_is_the_one_torchs_averager_runs(monkeypatch, period, warmup):
    calls = []
    monkeypatch.setattr(averagers.utils, "average_parameters_or_parameter_groups",
                        lambda params, group: calls.append(averager.step))
    with pytest.warns(UserWarning) if period == 1 else contextlib.nullcontext():
        averager = averagers.PeriodicModelAverager(period, warmup, process_group=object())
    predicted = []
    for step in range(40):
        if averages_after(step, period, warmup):
            predicted.append(step)
        averager.average_parameters([])
    assert calls == predicted and calls  # torch averaged exactly where we count bytes


def test_ranks_are_equal_before_any_step_in_warm_up_and_right_after_an_average():
    # H = 4 after W = 2 DDP steps: averages after steps 3, 7, 11 (counters 2, 6, 10)
    equal = [n for n in range(13) if in_sync_after(n, 4, 2)]
    assert equal == [0, 1, 2, 3, 7, 11]
    assert all(in_sync_after(n, 1, 0) for n in range(10))  # H = 1: an average every step


@pytest.mark.parametrize(("change", "says"), [
    ({"comm_hook": "bf16"}, "--comm-hook bf16 cannot apply"),
    ({"cpu_allreduce": "shm"}, "--cpu-allreduce shm cannot apply"),
    ({"find_unused_parameters": True}, "--find-unused-parameters cannot apply"),
    ({"precision": "16"}, "miss the parameter average")])
def test_flags_that_cannot_work_are_refused_with_the_fix(change, says):
    with pytest.raises(UsageError, match="localsgd") as err:
        refuse(DDPOptions(**change))
    assert says in str(err.value)
    refuse(DDPOptions(precision="bf16", cpu_allreduce="auto"))  # these are fine


def test_gathered_state_is_moved_to_the_cpu_and_detached():
    x = torch.ones(2, requires_grad=True)
    out = _to_cpu({"a": [x * 2, (x, 3)], "b": None})
    assert not out["a"][0].requires_grad and out["a"][1][1] == 3 and out["b"] is None
    assert isinstance(out["a"][1], tuple) and out["a"][0].device.type == "cpu"
