"""--cpu-heap: glibc's malloc kept for reuse between steps (dptrain.heap)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dptrain import heap
from tests.bench import load_benchmark

# Page faults per training step of the recipe's old net in a fresh process (the setting lasts
# for a process's life, so the test process stays untouched): benchmarks/heap.py's own step
# measurement, 20 timed steps after its warm-up.
STEP = load_benchmark("heap")._STEP


def faults(mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", STEP, mode, "20"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.skipif(not heap.glibc_version(), reason="the tuned heap is glibc's")
def test_the_tuned_heap_stops_the_page_faults_of_every_step():
    system, tuned = faults("system"), faults("tuned")
    assert system["said"] == "system" and tuned["said"] == "tuned"
    # glibc's defaults give the step's blocks back and fault them in again every step
    # (hundreds of faults); kept, a step reuses them
    assert system["faults_per_step"] > 50, system
    assert tuned["faults_per_step"] < 0.1 * system["faults_per_step"], (system, tuned)


@pytest.fixture
def fresh(monkeypatch):
    """heap's per-process state as in a new process (other tests may have tuned this one)."""
    monkeypatch.setattr(heap, "_described", "system")


def test_system_sets_nothing(fresh, monkeypatch):
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda *a: pytest.fail("system called mallopt"))
    assert heap.configure("system") == "system"
    assert heap.describe() == "system"


class FakeMallopt:
    """mallopt(3) as ctypes shows it: argtypes/restype to set, and a call."""

    def __init__(self, calls: list[tuple[int, int]], refuse: int | None) -> None:
        self.calls, self.refuse = calls, refuse

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 0 if param == self.refuse else 1


class FakeLibc:
    def __init__(self, refuse: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.mallopt = FakeMallopt(self.calls, refuse)


def test_tuned_sets_the_mmap_threshold_first_then_pad_and_trim(fresh, monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(heap, "glibc_version", lambda: "2.36")
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda *a: libc)
    assert heap.configure("tuned") == "tuned"
    assert libc.calls == [(heap.M_MMAP_THRESHOLD, 32 << 20), (heap.M_TOP_PAD, 256 << 20),
                          (heap.M_TRIM_THRESHOLD, 2**31 - 1)]
    assert heap.configure("tuned") == "tuned" and len(libc.calls) == 3  # once per process
    # glibc cannot go back: asking for the defaults afterwards says what the heap really is
    assert heap.configure("system") == "tuned (set earlier in this process)"
    assert heap.describe() == "tuned (set earlier in this process)"


def test_a_refused_mmap_threshold_sets_nothing_else(fresh, monkeypatch):
    libc = FakeLibc(refuse=heap.M_MMAP_THRESHOLD)
    monkeypatch.setattr(heap, "glibc_version", lambda: "2.36")
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda *a: libc)
    said = heap.configure("tuned")
    assert said.startswith("system (mallopt refused parameter -3")
    assert libc.calls == [(heap.M_MMAP_THRESHOLD, 32 << 20)]
    assert heap.describe() == said


def test_elsewhere_there_is_nothing_to_set(fresh, monkeypatch):
    monkeypatch.setattr(heap, "glibc_version", lambda: "")
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda *a: pytest.fail("mallopt outside glibc"))
    assert heap.configure("tuned") == "system (not glibc: nothing to set)"


def test_an_unknown_mode_is_refused(fresh):
    with pytest.raises(ValueError, match="not one of"):
        heap.configure("jemalloc")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc is Linux's")
def test_glibc_version_is_the_c_library_s_own():
    import ctypes

    try:
        own = ctypes.CDLL(None).gnu_get_libc_version
    except AttributeError:  # musl
        assert heap.glibc_version() == ""
        return
    own.restype = ctypes.c_char_p
    assert heap.glibc_version() == own().decode()
