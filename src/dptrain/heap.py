"""The C heap under PyTorch's CPU tensors, set for training (``--cpu-heap``).

PyTorch takes every CPU tensor from ``malloc``. A training step frees and allocates the same
few-MiB activations and gradients every step, and glibc's defaults give such blocks back to
the kernel (the heap's top is trimmed once 128 KiB are free; a block above the dynamic mmap
threshold is an ``mmap`` of its own), so the next step faults every page in again. Measured on
a 2-core AMD EPYC (Zen 5) in a bare training loop of fastnet at batch 128 in bf16
(``benchmarks/heap.py``, ``results/heap.json``): 2,058 minor page faults and 4.6 ms of kernel
time per step with the defaults, a 12.8 ms step; 0.02 faults and an 8.8 ms step with the heap
kept. dptrain's own loop faults far less to begin with (a whole recipe run: ~190,000 faults
with the defaults, ~90,000 kept, most of them the start-up's): there the final evaluation
gains (0.58x) and the training time does not measurably move.

``tuned`` keeps it: a trim threshold of 2 GiB - 1 (freed memory stays for the next step),
a top pad of 256 MiB (the heap grows in large steps; untouched pages cost nothing), and an
mmap threshold of 32 MiB, glibc's largest (blocks below it come from the reused heap; the
dataset's big arrays are still mapped and unmapped on their own). The three are set together:
setting a trim threshold alone turns glibc's dynamic mmap threshold off, and every block over
128 KiB would then be mapped afresh -- far worse than the defaults.

What it costs: memory freed during training stays with the process until it exits, where
glibc would have returned it; the peak resident size is the same (training reaches its
high-water mark every step). The settings last for the life of the process, so an in-process
``dptrain.fit`` leaves the caller's heap tuned. ``system`` leaves glibc's defaults (and any
``MALLOC_*`` environment variables) alone. Elsewhere (macOS, musl) there is nothing to set.
"""

from __future__ import annotations

import ctypes
import platform
import sys

CHOICES = ("tuned", "system")

# mallopt(3) parameters and the values ``tuned`` sets
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# (the mmap threshold first: if glibc refuses it, nothing else is set -- see the module's note)
TUNED = ((M_MMAP_THRESHOLD, 32 << 20), (M_TOP_PAD, 256 << 20), (M_TRIM_THRESHOLD, 2**31 - 1))

_described = "system"  # what :func:`configure` said last (summary.json's ``cpu_heap``)


def glibc_version() -> str:
    """glibc's version ("2.36"), or "" where the C library is another (or not Linux)."""
    if not sys.platform.startswith("linux"):
        return ""
    lib, version = platform.libc_ver()
    return version if lib == "glibc" else ""


def describe() -> str:
    """What this process's C heap is, as :func:`configure` last said."""
    return _described


def configure(mode: str) -> str:
    """Set this process's C heap for ``mode`` and say what it is now: ``tuned``, ``system``
    or ``system (...)`` with the reason nothing was set. Setting ``tuned`` again is a no-op;
    ``system`` after ``tuned`` cannot undo it (glibc offers no way back) and says so."""
    global _described
    _described = _configure(mode, tuned=_described.startswith("tuned"))
    return _described


def _configure(mode: str, tuned: bool) -> str:
    """:func:`configure`'s answer; ``tuned``: this process's heap is tuned already."""
    if mode not in CHOICES:
        raise ValueError(f"cpu heap mode {mode!r} is not one of {CHOICES}")
    if mode == "system":
        return "tuned (set earlier in this process)" if tuned else "system"
    if tuned:
        return "tuned"
    if not glibc_version():
        return "system (not glibc: nothing to set)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "system (mallopt not found)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for param, value in TUNED:
        if mallopt(param, value) != 1:
            return f"system (mallopt refused parameter {param} = {value})"
    return "tuned"
