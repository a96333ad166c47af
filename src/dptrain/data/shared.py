"""Tensor datasets built once per node and shared by the node's processes.

A plug-in factory (or the MNIST/Fashion-MNIST parser) run by every rank costs every rank the
build time and a full copy of the data in memory: with 8 processes per node, 8 copies. Here the
node's local rank 0 builds the splits, writes their tensors once into a file in ``/dev/shm``
(memory, not disk), and every other local rank maps that file (``torch.load(mmap=True)``): the
pages are the same physical memory for all of them, so the node holds one copy. The file is
unlinked as soon as every rank has mapped it (the mappings keep it alive), so neither a finished
nor a crashed run leaves it behind for long; a stale one from a killed run is swept by name
(named by its pid namespace and pid: ``procs.sweep_dead``) the next time.

A failure of the build on local rank 0 (a bad factory, a corrupt file) reaches every rank as the
same :class:`UsageError` -- no rank waits forever for a file that never comes. Map-style
Datasets are not shared (they load lazily); each rank builds its own, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dptrain.errors import UsageError
from dptrain.procs import stamped_path, sweep_dead

if TYPE_CHECKING:
    from dptrain.data.datasets import Splits
    from dptrain.strategies import Strategy

PREFIX = "dptrain-data-"


def shared_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def wanted(strategy: Strategy) -> bool:
    """Several processes of this job on this node: worth sharing."""
    return strategy.world_size > 1 and strategy.env.local_world_size > 1


def load_once_per_node(build: Callable[[], Splits], strategy: Strategy) -> Splits:
    """``build()`` on local rank 0 only; the node's other ranks map its tensors (collective:
    every rank of the job calls this)."""
    env = strategy.env
    node = strategy.rank // max(1, env.local_world_size)
    path = Path(stamped_path(str(shared_dir()), PREFIX))  # local rank 0's is the one used
    built, status = None, "ok"
    if env.local_rank == 0:
        sweep_dead(str(shared_dir()), PREFIX, suffix=".tmp")
        try:
            built = build()
            status = "dataset" if built.is_dataset else _write(built, path)
        except UsageError as exc:
            status = f"error:{exc}"
    statuses = strategy.all_gather_object((node, env.local_rank, status, str(path)))
    errors = [s[6:] for _, _, s, _ in statuses if s.startswith("error:")]
    if errors:
        raise UsageError(errors[0])
    kind, source = next((s, p) for n, lr, s, p in statuses if n == node and lr == 0)
    if env.local_rank != 0:
        built = build() if kind == "dataset" else _read(Path(source))
    strategy.barrier()  # every rank has mapped the file: it may go
    if env.local_rank == 0 and kind != "dataset":
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return built


def _write(splits: Splits, path: Path) -> str:
    tmp = path.with_name(path.name + ".tmp")
    fields = {f.name: getattr(splits, f.name) for f in dataclasses.fields(splits)}
    torch.save(fields, tmp)
    tmp.rename(path)  # complete or absent
    return "ok"


def _read(path: Path) -> Splits:
    from dptrain.data.datasets import Splits

    fields: dict[str, Any] = torch.load(path, mmap=True, weights_only=True)
    return Splits(**fields)
