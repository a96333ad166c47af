"""--cpu-bind: each local process on its own cores (dptrain.affinity); no process groups."""

from __future__ import annotations

import pytest

from dptrain import affinity


def test_cores_follow_the_local_ranks_threads_in_order():
    assert affinity.cores_for(0, [1, 1], [0, 1]) == [0]
    assert affinity.cores_for(1, [1, 1], [0, 1]) == [1]
    assert affinity.cores_for(0, [2, 1], [4, 2, 3]) == [2, 3]  # the allowed cores, sorted
    assert affinity.cores_for(1, [2, 1], [4, 2, 3]) == [4]
    assert affinity.cores_for(1, [2, 2], [0, 1, 2, 3, 4, 5]) == [2, 3]  # spare cores unused
    assert affinity.cores_for(0, [2, 1], [0, 1]) is None  # 3 threads over 2 cores: no pinning
    for bad in ((2, [1, 1]), (-1, [1, 1]), (0, [0, 1])):
        with pytest.raises(ValueError):
            affinity.cores_for(*bad, [0, 1])


@pytest.fixture
def machine(monkeypatch):
    """A 4-core affinity mask, and the calls that would pin this (the test) process."""
    pinned: list[list[int]] = []
    monkeypatch.setattr(affinity.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(affinity.os, "sched_setaffinity", lambda pid, cores: pinned.append(
        sorted(cores)))
    monkeypatch.setattr(affinity, "_described", "none")
    return pinned


def test_auto_pins_cpu_processes_that_fit(machine):
    assert affinity.bind("auto", 1, [2, 2], "cpu") == "cores 2,3"
    assert machine == [[2, 3]] and affinity.describe() == "cores 2,3"


@pytest.mark.parametrize(("mode", "rank", "threads", "device", "said"), [
    ("none", 0, [1, 1], "cpu", "none"),
    ("auto", 0, [1, 1], "cuda", "none (not on the CPU)"),
    ("auto", 0, [4], "cpu", "none (one local process)"),
    ("auto", 1, [2, 3], "cpu", "none (5 threads of 2 local processes over 4 usable cores)")])
def test_otherwise_nothing_is_pinned_and_the_summary_says_why(machine, mode, rank, threads,
                                                              device, said):
    assert affinity.bind(mode, rank, threads, device) == said
    assert machine == [] and affinity.describe() == said


def test_an_unknown_mode_is_refused(machine):
    with pytest.raises(ValueError, match="not one of"):
        affinity.bind("cores", 0, [1, 1], "cpu")
