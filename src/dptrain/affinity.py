"""Each local process on its own cores (``--cpu-bind auto``; the default, ``none``, leaves
scheduling to the OS as torchrun does).

Two DDP processes on a 2-core VM, one thread each, synchronise at every step; measured with
``benchmarks/sync_cost.py`` on a Zen 5 VM (``results/sync_cost_zen5.json``), computing in
lock-step ran 1.15x slower than the same two processes computing independently, and a bare
one-float all-reduce per step cost 25 % of the no-communication ceiling. With each worker
pinned to its own core (``--cpu-bind auto``, ``results/sync_cost_zen5_pinned.json``, the same
command half an hour later), the medians over 5 rounds moved: DDP with dptrain's shared-memory
all-reduce 0.821 -> 0.924 of the ceiling, gloo DDP 0.780 -> 0.828, the bare synchronisation
0.749 -> 0.780, the lock-step compute 1.147x -> 1.114x. Measured properly, pinned and
unpinned interleaved in the same rounds (``benchmarks/cpu_bind.py``, ``results/cpu_bind.json``,
5 rounds), pinning gave DDP no throughput: pinned / unpinned 1.000x median (0.885-1.163), and
it slowed two independent processes (0.916x). Hence opt-in: it changes nothing measurable on
that VM, and may on machines with more cores or sockets, where Intel's and MPI's launchers
pin by default. Pinning also has a hazard the OS does not: two
jobs started side by side on one machine would both take the first cores (give each its own
with ``taskset``/``numactl``: the mask is respected).

``auto`` pins local rank r to the next ``threads(r)`` cores of the cores this process may use
(``os.sched_getaffinity``), in order, when the processes run on the CPU, there are two or more
of them on this node, and their threads fit those cores. A mask too small for all of them (a
SLURM step that already bound each task to its own cores, say) is left as it is. Intel's
``run_cpu`` launcher and MPI's ``--bind-to core`` pin the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

CHOICES = ("none", "auto")
_described = "none"  # what :func:`bind` did last in this process


def describe() -> str:
    """What :func:`bind` did in this process ("none" before it ran)."""
    return _described


def cores_for(local_rank: int, threads: Sequence[int], allowed: Sequence[int]
              ) -> list[int] | None:
    """The cores local rank ``local_rank`` gets when local ranks 0..n-1 run ``threads[r]``
    threads each over the ``allowed`` cores (in order); None when they do not all fit."""
    if not 0 <= local_rank < len(threads) or any(t < 1 for t in threads):
        raise ValueError(f"local rank {local_rank} of {len(threads)}, threads {list(threads)}")
    cores = sorted(allowed)
    if sum(threads) > len(cores):
        return None
    start = sum(threads[:local_rank])
    return cores[start:start + threads[local_rank]]


def bind(mode: str, local_rank: int, threads: Sequence[int], device: str) -> str:
    """Pin this process for ``mode`` (see the module docstring); what was done, in words
    (``summary.json``'s ``cpu_bind``)."""
    global _described
    _described = _bind(mode, local_rank, threads, device)
    return _described


def _bind(mode: str, local_rank: int, threads: Sequence[int], device: str) -> str:
    if mode not in CHOICES:
        raise ValueError(f"cpu bind mode {mode!r} is not one of {CHOICES}")
    if mode == "none":
        return "none"
    if device != "cpu":
        return "none (not on the CPU)"
    if len(threads) < 2:
        return "none (one local process)"
    if not hasattr(os, "sched_setaffinity"):
        return "none (no CPU affinity on this OS)"
    allowed = sorted(os.sched_getaffinity(0))
    cores = cores_for(local_rank, threads, allowed)
    if cores is None:
        return (f"none ({sum(threads)} threads of {len(threads)} local processes over "
                f"{len(allowed)} usable cores)")
    os.sched_setaffinity(0, cores)
    return f"cores {','.join(map(str, cores))}"
