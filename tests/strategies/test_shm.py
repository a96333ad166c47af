"""The shared-memory all-reduce, with real processes: exact sums, the same bits on every rank,
chunking past a slot, every float dtype, a dead peer and a silent peer that raise instead of
hanging, and nothing left in /dev/shm."""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch

from dptrain.strategies import shm

pytestmark = pytest.mark.skipif(shm.supported() is not None, reason=f"{shm.supported()}")

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _inputs(rank: int, world: int) -> list[torch.Tensor]:
    per_slot = shm.slot_bytes(world) // 4
    gen = torch.Generator().manual_seed(100 + rank)
    sizes = (1, 7, 1000, 2 * per_slot + 13)  # the last one spans three chunks in float32
    return [torch.randn(n, generator=gen).to(dtype) for dtype in DTYPES for n in sizes]


def _reduce_worker(path: str, rank: int, world: int, barrier, queue) -> None:  # noqa: ANN001
    if rank != 0:
        barrier.wait()  # rank 0 has created the file
    reducer = shm.ShmAllReduce(path, rank, world, timeout_s=60)
    if rank == 0:
        barrier.wait()
    barrier.wait()  # everyone has mapped it
    reducer.connect()
    out = [reducer.all_reduce_(t.clone()) for t in _inputs(rank, world)]
    buffer = io.BytesIO()  # bytes, not tensors: a queued tensor would be shared by file descriptor
    torch.save(out, buffer)
    queue.put((rank, buffer.getvalue()))
    reducer.close()


def _run(target, world: int, path: str, *extra) -> list:  # noqa: ANN001
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(world), ctx.Queue()
    procs = [ctx.Process(target=target, args=(path, r, world, barrier, queue, *extra))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=120) for _ in range(world)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [(rank, torch.load(io.BytesIO(data))) for rank, data in sorted(results)]


@pytest.mark.parametrize("world", [2, 3])
def test_sums_are_exact_and_bitwise_equal_on_every_rank(tmp_path: Path, world: int) -> None:
    results = _run(_reduce_worker, world, str(tmp_path / "seg"))
    inputs = [_inputs(r, world) for r in range(world)]
    for i in range(len(inputs[0])):
        parts = [inputs[r][i] for r in range(world)]
        expected = parts[0] + parts[1] if world == 2 else torch.stack(parts).sum(0)
        for rank, out in results:
            assert out[i].dtype == parts[0].dtype
            assert torch.equal(out[i], expected), f"rank {rank}, tensor {i}"


def _fault_worker(path: str, rank: int, world: int, barrier, queue, fault: str) -> None:  # noqa: ANN001
    if rank != 0:
        barrier.wait()
    reducer = shm.ShmAllReduce(path, rank, world, timeout_s=2.0)
    if rank == 0:
        barrier.wait()
    barrier.wait()
    reducer.connect()
    if rank == 1:
        if fault == "dies":
            os._exit(0)
        if fault == "aborts":  # times out alone, then lingers (as a rank stuck in teardown)
            reducer.timeout_s = 0.3
            with contextlib.suppress(shm.ShmError):
                reducer.all_reduce_(torch.ones(10))
        time.sleep(30)  # alive, but never arrives
        return
    if fault == "aborts":
        time.sleep(1.0)  # arrive after rank 1 gave up
    start = time.monotonic()
    try:
        reducer.all_reduce_(torch.ones(10))
        queue.put((rank, "returned", time.monotonic() - start))
    except shm.ShmError as exc:
        queue.put((rank, str(exc), time.monotonic() - start))


@pytest.mark.parametrize("fault, message, within",
                         [("dies", "rank 1 (pid", 1.5), ("silent", "timed out after 2 s", 4.0),
                          ("aborts", "rank 1 failed in this collective", 1.0)])
def test_a_dead_or_silent_peer_raises_instead_of_hanging(tmp_path, fault, message, within):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    path = str(tmp_path / "seg")
    procs = [ctx.Process(target=_fault_worker, args=(path, r, 2, barrier, queue, fault))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        rank, text, elapsed = queue.get(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert rank == 0
    assert message in text
    assert elapsed < within


def test_segment_size_and_limits(tmp_path: Path) -> None:
    assert shm.slot_bytes(2) == 4 << 20
    assert shm.slot_bytes(64) == (32 << 20) // 128
    assert 2 * 64 * shm.slot_bytes(64) <= 32 << 20
    with pytest.raises(ValueError, match="at most 64"):
        shm.ShmAllReduce(str(tmp_path / "x"), 0, 65, 1.0)
    reducer = shm.ShmAllReduce(str(tmp_path / "one"), 0, 1, 1.0)
    with pytest.raises(ValueError, match="contiguous CPU"):
        reducer.all_reduce_(torch.ones(4, 4).t())
    reducer.close()


KILLED_RANK0 = """
import sys, time
from dptrain.strategies import shm

def broadcast(path):  # rank 0 has created the segment: report it, then "die" in the window
    print(path, flush=True)
    time.sleep(60)

shm.connect(0, 2, 60.0, None, required=False, broadcast=broadcast, gather=lambda f: [f])
"""


def _stale_segment() -> tuple[str, int]:
    """A real rank 0 that creates the segment and is killed with SIGKILL before unlinking it."""
    import signal
    import subprocess
    import sys

    from tests.conftest import clean_env

    proc = subprocess.Popen([sys.executable, "-c", KILLED_RANK0], stdout=subprocess.PIPE,
                            text=True, env=clean_env())
    try:
        path = proc.stdout.readline().strip()
        assert path.startswith(os.path.join(shm.SHM_DIR, shm.PREFIX)), path
        assert os.path.exists(path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return path, proc.pid


def test_segment_of_a_rank0_killed_before_unlink_is_swept_by_the_next_run():
    path, pid = _stale_segment()
    assert os.path.exists(path), "the kill landed in the window: the segment is left behind"
    assert f"-{pid}-" in os.path.basename(path)  # the name carries its creator
    # the next run's rank 0 on this host (here a one-rank job) removes it before creating its own
    reducer, how = shm.connect(0, 1, 5.0, None, required=True, broadcast=lambda x: x,
                               gather=lambda f: [f])
    try:
        assert how == "shm"
        assert not os.path.exists(path)
        assert not [n for n in os.listdir(shm.SHM_DIR) if n.startswith(shm.PREFIX)
                    and f"-{os.getpid()}-" in n], "the new segment was unlinked too"
    finally:
        reducer.close()


def test_sweep_leaves_live_creators_and_other_files_alone(tmp_path):
    mine = shm.segment_path(str(tmp_path))  # this (live) process created it
    Path(mine).write_bytes(b"x")
    ns = os.path.basename(mine).split("-")[2]
    dead = tmp_path / f"{shm.PREFIX}{ns}-999999999-abc"  # no such pid
    other_ns = tmp_path / f"{shm.PREFIX}1-999999999-abc"  # another pid namespace: unknowable
    foreign = tmp_path / "dptrain-allreduce-notours"
    for p in (dead, other_ns, foreign):
        p.write_bytes(b"x")
    assert shm.sweep_stale(str(tmp_path)) == [str(dead)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [os.path.basename(mine), other_ns.name, foreign.name])
