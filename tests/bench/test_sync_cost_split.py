"""benchmarks/sync_cost.py's lock-step split: E[slower] of two processes, and its ratios."""

from __future__ import annotations

import pytest

from tests.bench import load_benchmark


@pytest.fixture(scope="module")
def sc():
    return load_benchmark("sync_cost")


def test_expected_slower_of_two_independent_processes(sc) -> None:
    # A: 40 or 60 ms; B: always 50 ms -> max is 50 or 60, equally often
    assert sc.expected_slower([40.0, 60.0], [50.0, 50.0, 50.0]) == pytest.approx(55.0)
    assert sc.expected_slower([50.0], [40.0]) == pytest.approx(50.0)  # a slower process


def test_lockstep_compares_sync_with_waiting_alone(sc) -> None:
    runs = {"none": {"compute_ms": [[40.0, 60.0], [50.0, 50.0]],
                     "compute_ms_mean": [50.0, 50.0], "step_ms": [50.0, 50.0]},
            "sync_shm": {"step_ms": [57.75, 57.75], "compute_ms_mean": [51.0, 51.0],
                         "wait_ms_mean": [6.75, 6.75]}}
    split = sc.lockstep(runs, "sync_shm")
    assert split["expected_slower_ms"] == pytest.approx(55.0)
    assert split["sync_step_over_expected_slower"] == pytest.approx(1.05)
    assert split["sync_compute_over_none_compute"] == pytest.approx(1.02)
    assert split["sync_wait_ms"] == pytest.approx(6.75)
