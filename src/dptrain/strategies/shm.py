"""Intra-node all-reduce of CPU gradients through shared memory (DDP on CPU, one host).

Why: gloo all-reduces over TCP even between processes on one host. On a small VM every gloo
all-reduce of more than one element costs about 2 ms whatever its size (measured on this
project's 2-core machine: 0.25 ms for 4 bytes, 2.0-2.5 ms for 16 bytes to 400 KiB), because
each ring step hands the data between several threads and sockets. For a small model the
gradients of a step fit in one bucket, so that latency is paid, unhidden, every step.

How: rank 0 creates one file in ``/dev/shm``; every local rank maps it and rank 0 unlinks it at
once (the mapping lives on; nothing is left behind, even after a crash). The file's name carries
rank 0's pid (and pid namespace): should rank 0 be killed in the short window between creating
and unlinking it, the next run's rank 0 on that host removes it (:func:`sweep_stale`). For each all-reduce
every rank copies its tensor into its own slot, publishes a sequence number, waits until every
rank has published the same number, then sums the slots into its tensor, all ranks the same way
in a fixed order (``torch.sum`` over the rank dimension), so every rank computes bitwise the
same result. Slots alternate between two buffers: a rank can only overwrite a buffer after every
rank has arrived at the next call, that is, after every rank has finished reading it. Tensors
larger than a slot go through in chunks.

Waiting is a short busy spin, then ``sched_yield`` for about 2 ms, then short naps (so an
oversubscribed machine still makes progress), with three ways out: the process-group timeout,
a peer that marked itself aborted, and a check that the ranks still waited for are alive -- a
dead rank raises here instead of hanging the others.

Limits: one host (every rank of the job local), CPU tensors, x86-64 (the protocol relies on its
ordered stores; elsewhere dptrain stays on gloo). Used only where all of that holds; the
strategy falls back to gloo otherwise, and ``--cpu-allreduce gloo`` turns it off.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from dptrain.errors import UsageError
from dptrain.procs import pid_alive, stamped_path, sweep_dead

SHM_DIR = "/dev/shm"
HEADER = 4096  # one 64-byte line per rank: [sequence, pid], then padding
LINE = 64
MAX_TOTAL = 32 << 20  # bytes of slots in all (2 buffers x world slots)
SPIN = 2000  # busy checks before yielding the CPU
YIELD_FOR = 0.002  # seconds of sched_yield before sleeping between checks (long waits)
NAP = 50e-6  # the sleep between checks of a long wait: leaves the core to the awaited rank
CHECK_EVERY = 0.05  # seconds between liveness/timeout checks while waiting
ABORTED = -1  # a rank's sequence word after it failed inside a collective


class ShmError(RuntimeError):
    """A peer died or did not arrive in time."""


def supported() -> str | None:
    """Why shared memory cannot be used on this machine, or ``None`` when it can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"{platform.machine()} is not x86-64"
    if not (os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)):
        return f"{SHM_DIR} is not a writable directory"
    return None


PREFIX = "dptrain-allreduce-"




def segment_path(directory: str = SHM_DIR) -> str:
    """A fresh segment name naming its creator: ``dptrain-allreduce-<pidns>-<pid>-<random>``."""
    return stamped_path(directory, PREFIX)


def sweep_stale(directory: str = SHM_DIR) -> list[str]:
    """Remove the segments whose creator is dead (it was killed before it could unlink its
    file); only names this module makes, only creators in our pid namespace. Returns the paths
    removed."""
    return sweep_dead(directory, PREFIX)


def slot_bytes(world_size: int) -> int:
    return max(64 << 10, min(4 << 20, MAX_TOTAL // (2 * world_size))) // 64 * 64


class ShmAllReduce:
    """Sum CPU tensors across the ``world_size`` local ranks through one mapped file."""

    def __init__(self, path: str, rank: int, world_size: int, timeout_s: float) -> None:
        if world_size > HEADER // LINE:
            raise ValueError(f"at most {HEADER // LINE} ranks, got {world_size}")
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.slot = slot_bytes(world_size)
        size = HEADER + 2 * world_size * self.slot
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if rank == 0 else 0), 0o600)
        try:
            if rank == 0:
                os.posix_fallocate(fd, 0, size)  # ENOSPC now, not SIGBUS on first write
            elif os.fstat(fd).st_size != size:
                raise ShmError(f"{path} has {os.fstat(fd).st_size} bytes, expected {size}")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("q")  # int64 view of the header
        data = torch.frombuffer(self._map, dtype=torch.uint8, offset=HEADER,
                                count=2 * world_size * self.slot)
        self._buffers = data.view(2, world_size, self.slot)
        self._seq = 0
        self._words[self._word(rank, 1)] = os.getpid()
        self._pids: list[int] = []

    @staticmethod
    def _word(rank: int, field: int) -> int:
        return rank * (LINE // 8) + field

    def connect(self) -> None:
        """After every rank has mapped the file (a barrier): learn the peers' pids."""
        self._pids = [self._words[self._word(r, 1)] for r in range(self.world_size)]

    def close(self) -> None:
        self._buffers = None  # type: ignore[assignment]
        self._words.release()
        with contextlib.suppress(BufferError):  # a view still alive: it goes with the process
            self._map.close()

    # -- the collective -------------------------------------------------------------------
    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (contiguous, CPU) over all ranks, in place; same bits on every rank."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("shared-memory all-reduce takes contiguous CPU tensors")
        flat = tensor.view(-1)
        per_chunk = self.slot // tensor.element_size()
        try:
            for start in range(0, flat.numel(), per_chunk):
                self._reduce_chunk(flat[start:start + per_chunk])
        except BaseException:
            # failing (timeout, a dead peer, Ctrl-C): tell the others at once, so that they
            # fail too instead of waiting for this rank until their own timeout
            self._words[self._word(self.rank, 0)] = ABORTED
            raise
        return tensor

    def _reduce_chunk(self, chunk: torch.Tensor) -> None:
        self._seq += 1
        seq = self._seq
        nbytes = chunk.numel() * chunk.element_size()
        slots = self._buffers[seq % 2, :, :nbytes].view(chunk.dtype)  # (world, n)
        slots[self.rank].copy_(chunk)
        # publish. The copy's stores (some by OpenMP threads, which joined before copy_
        # returned; glibc's non-temporal copies end with a fence) are visible before this one:
        # x86 does not reorder stores with stores. That is why the path is x86-64 only.
        self._words[self._word(self.rank, 0)] = seq
        self._wait_for(seq)
        if self.world_size == 2:
            torch.add(slots[0], slots[1], out=chunk)
        else:
            torch.sum(slots, dim=0, out=chunk)

    def _wait_for(self, seq: int) -> None:
        words, ranks = self._words, range(self.world_size)
        index = [self._word(r, 0) for r in ranks]
        spins = 0
        deadline = next_check = None
        while True:
            if all(words[i] >= seq for i in index):
                return
            spins += 1
            if spins < SPIN:
                continue
            now = time.monotonic()
            if deadline is None:
                started = now
                deadline, next_check = now + self.timeout_s, now + CHECK_EVERY
            if now - started < YIELD_FOR:
                os.sched_yield()
            else:
                time.sleep(NAP)
            if now >= next_check:
                next_check = now + CHECK_EVERY
                late = [r for r in ranks if words[index[r]] < seq]
                aborted = [r for r in late if words[index[r]] == ABORTED]
                if aborted:
                    raise ShmError(f"shared-memory all-reduce: rank {aborted[0]} failed in "
                                   "this collective (see its error)")
                self._check_alive(late)
                if now >= deadline:
                    raise ShmError(f"shared-memory all-reduce timed out after "
                                   f"{self.timeout_s:g} s (--timeout-s) waiting for rank(s) "
                                   f"{', '.join(map(str, late))}")

    def _check_alive(self, ranks: list[int]) -> None:
        for r in ranks:
            pid = self._pids[r] if self._pids else 0
            if pid > 0 and not pid_alive(pid):
                raise ShmError(f"shared-memory all-reduce: rank {r} (pid {pid}) died")




def connect(rank: int, world_size: int, timeout_s: float, blocker: str | None, *,
            required: bool, broadcast: Callable[[Any], Any],
            gather: Callable[[Any], list[Any]]) -> tuple[ShmAllReduce | None, str]:
    """Map one segment on every rank of the job, or on none (a collective of ``broadcast`` and
    ``gather``, the process group's object collectives). ``blocker``: this rank's reason not to
    (``None``: no objection). Returns the reducer (``None``: stay on gloo) and a description
    of the path taken for the summary. ``required``: a failure is a :class:`UsageError`."""
    if blocker is not None and required:
        raise UsageError(f"--cpu-allreduce shm is not possible here: {blocker}; "
                         "use --cpu-allreduce auto or gloo")
    reducer, failure, path = None, blocker, None
    try:
        if rank == 0 and blocker is None:  # create (and size) the file before others open it
            sweep_stale()  # segments of runs whose rank 0 was killed before it could unlink
            path = segment_path()
            try:
                reducer = ShmAllReduce(path, 0, world_size, timeout_s)
            except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
                failure = f"rank 0: {exc}"
        shared = broadcast(path if reducer is not None else None)
        if rank != 0 and shared is not None:
            try:
                reducer = ShmAllReduce(shared, rank, world_size, timeout_s)
            except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
                failure = f"rank {rank}: {exc}"
        elif rank != 0:
            failure = failure or "rank 0 could not create the shared segment"
        failures = [f for f in gather(failure) if f]
    finally:
        if rank == 0 and path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # every rank has it mapped (or gave up): nothing left behind
    if failures:
        if reducer is not None:
            reducer.close()
        if required:
            raise UsageError(f"--cpu-allreduce shm failed: {failures[0]}; "
                             "use --cpu-allreduce gloo")
        return None, f"gloo ({failures[0]})"
    assert reducer is not None
    reducer.connect()
    return reducer, "shm"


def allreduce_hook(state, bucket):  # noqa: ANN001, ANN201 - DDP checks annotations literally
    """DDP comm hook: average the bucket through shared memory; the future is already done."""
    buffer = bucket.buffer()
    state.all_reduce_(buffer).div_(state.world_size)
    future = torch.futures.Future()
    future.set_result(buffer)
    return future
