"""Hogwild: N processes on one machine step the same parameters in shared memory, no locks.

As PyTorch's ``examples/mnist_hogwild`` (Recht et al., 2011): every process trains on its own
shard of the data with its own optimizer (its own momentum) and applies its updates in place to
one copy of the parameters that all processes share. There is no gradient communication at all;
the processes read parameters that others are writing. **The update order is nondeterministic
by nature**: two runs with the same seed differ, updates may overlap (one process can overwrite
part of another's step), and N processes are not one process with N times the batch -- each
makes its own optimizer step, so a run makes N times the updates per sample that ddp makes.
``dptrain verify`` does not offer hogwild (it is not exact); ``describe()`` says
``"exact": false`` and rank 0 prints a warning line at the start.

How the parameters are shared. dptrain's workers are started by its launcher (the torch elastic
agent), not by ``mp.Process(model)``, so ``model.share_memory()`` cannot hand tensors over.
Instead rank 0 creates one file in ``/dev/shm`` sized for every parameter (64-byte aligned
slots; ``posix_fallocate``, so a full ``/dev/shm`` is an error now, not a SIGBUS later) and
broadcasts its name; the other ranks map it; once every rank has mapped it (a gather, which
also carries any rank's failure -- every rank then raises the same ``error:``), rank 0 unlinks
it, so nothing is left behind even if a process is killed later. Should rank 0 die in that
short window, the file's name carries its pid and pid namespace, and the next hogwild run's
rank 0 removes it (:func:`sweep_stale`, as ``shm.py`` does for its segments). Rank 0 copies
its parameters in, every rank points its parameters into the mapping (``p.data = view``,
strides kept, e.g. channels-last), and a barrier ends the set-up. All ranks start from the same
seeded parameters; the shared copy is rank 0's. Gradients, optimizer state and buffers
(BatchNorm running statistics) stay private to each process.

Where the processes meet. A process group (gloo, as ddp) stays for what must be exact: the
loop's sync points (one all-reduce per ``--log-every`` window: loss, stop votes), evaluation,
checkpoints, ``main_only``. Between sync points every process steps freely. Before evaluation
or a checkpoint, :meth:`Hogwild.sync_buffers` and :meth:`Hogwild.params_finite` first wait for
every rank (a barrier), so no rank is still writing while the others read; then rank 0's
buffers are broadcast. Evaluation is therefore exact (each test sample once, on the parameters
as they stand), and so are checkpoints.

Checkpoints and resume. ``model`` is the shared parameters (cloned out of the mapping) with rank
0's buffers; ``optimizer`` is rank 0's optimizer state (what ddp and the others load), and
``optimizer_per_rank`` holds every rank's (gathered on rank 0). The same world size resumes
each rank's own momentum; another world size resumes the model and gives *every* rank rank
0's optimizer state (a warning says so). After loading, a barrier: no rank starts stepping while
another still copies the checkpoint into the shared parameters.

Memory. Each rank's ``param_bytes`` counts the parameters it addresses (all of them, as in
ddp), and ``shared_param_bytes`` says how many of those bytes live in the one shared segment
(the same pages for every rank of the node; each process's peak RSS includes them too). A
node's total is therefore ``sum(param_bytes - shared_param_bytes) + shared_param_bytes``: the
shared parameters counted once. ``describe()`` reports the segment's size.

Limits (refused by ``plan.py``): one node only (shared host memory), CPU only, no
``--sync-bn``. ``--grad-clip`` clips each rank's own gradients.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
from torch import nn

from dptrain.errors import UsageError
from dptrain.procs import stamped_path, sweep_dead
from dptrain.strategies.base import Strategy
from dptrain.strategies.ddp import DistributedDataParallel
from dptrain.strategies.shm import SHM_DIR

if TYPE_CHECKING:
    from dptrain.precision import Precision

log = logging.getLogger("dptrain.hogwild")

PREFIX = "dptrain-hogwild-"
ALIGN = 64  # bytes: every parameter's slot starts on a cache line
NONDETERMINISTIC = ("--strategy hogwild updates shared parameters without locks: the update "
                    "order is nondeterministic, so runs with the same seed differ and do not "
                    "equal one process (exact: false)")


# ------------------------------------------------------------------ the segment
def segment_path(directory: str = SHM_DIR) -> str:
    """A fresh name naming its creator: ``dptrain-hogwild-<pidns>-<pid>-<random>``."""
    return stamped_path(directory, PREFIX)


def sweep_stale(directory: str = SHM_DIR) -> list[str]:
    """Remove hogwild segments whose creator (in our pid namespace) is dead; the paths removed."""
    return sweep_dead(directory, PREFIX)


def layout(params: list[torch.Tensor]) -> tuple[list[int], int]:
    """Each parameter's byte offset in the segment (``ALIGN``-aligned) and the segment's size."""
    offsets, end = [], 0
    for p in params:
        offsets.append(end)
        end += -(-p.numel() * p.element_size() // ALIGN) * ALIGN
    return offsets, max(end, ALIGN)


class SharedSegment:
    """One file in ``/dev/shm``, mapped shared: created (and sized) by rank 0, opened by others.

    The mapping lives as long as any tensor viewing it (``torch.frombuffer`` keeps the ``mmap``
    object alive), so it is never closed explicitly."""

    def __init__(self, path: str, nbytes: int, *, create: bool) -> None:
        self.path, self.nbytes = path, nbytes
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.posix_fallocate(fd, 0, nbytes)  # ENOSPC now, not SIGBUS on first write
            elif os.fstat(fd).st_size != nbytes:
                raise OSError(f"{path} has {os.fstat(fd).st_size} bytes, expected {nbytes}")
            self._map = mmap.mmap(fd, nbytes)  # MAP_SHARED: every process sees every write
        finally:
            os.close(fd)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def view_like(self, offset: int, p: torch.Tensor) -> torch.Tensor:
        """A tensor of ``p``'s dtype, shape and strides over the segment at ``offset``."""
        n = p.numel() * p.element_size()
        flat = self.bytes[offset:offset + n].view(p.dtype)
        dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(
            memory_format=torch.channels_last))
        return flat.as_strided(p.shape, p.stride()) if dense else flat.view(p.shape)


def share_parameters(model: nn.Module, segment: SharedSegment, *, fill: bool) -> int:
    """Point every parameter of ``model`` into ``segment`` (``fill``: copy the values in
    first, on the creating rank). Returns the bytes of parameters now shared."""
    params = list(model.parameters())
    offsets, _ = layout(params)
    with torch.no_grad():
        for p, offset in zip(params, offsets, strict=True):
            view = segment.view_like(offset, p)
            if fill:
                view.copy_(p)
            p.data = view
    return sum(p.numel() * p.element_size() for p in params)


def optimizer_state_for(state: dict[str, Any], rank: int, world_size: int
                        ) -> tuple[dict[str, Any], str | None]:
    """Which saved optimizer state ``rank`` continues from: its own when the checkpoint was
    written by as many hogwild processes, else rank 0's (``optimizer``, what every strategy
    writes), with a note saying so."""
    per_rank = state.get("optimizer_per_rank") or []
    if len(per_rank) == world_size:
        return per_rank[rank], None
    if per_rank:
        return state["optimizer"], (f"the checkpoint was written by {len(per_rank)} hogwild "
                                    f"processes, this run has {world_size}: every rank "
                                    "continues from rank 0's optimizer state")
    return state["optimizer"], None


# ------------------------------------------------------------------ the strategy
class Hogwild(DistributedDataParallel):
    """Lock-free asynchronous training on one node: shared parameters, private optimizers."""

    name = "hogwild"
    segment: SharedSegment | None = None
    shared_bytes = 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model itself, its parameters moved into one segment every rank maps."""
        if self.device.type != "cpu":  # plan.py refuses it; a Session could still ask
            raise UsageError("--strategy hogwild runs on CPU (shared host memory): add "
                             "--device cpu")
        self.segment = self._map_segment(layout(list(model.parameters()))[1])
        self.shared_bytes = share_parameters(model, self.segment, fill=self.is_main)
        self.barrier()  # rank 0's values are in before anyone steps them
        if self.is_main:
            log.warning("warning: %s; %d processes share %d parameter bytes in /dev/shm",
                        NONDETERMINISTIC, self.world_size, self.segment.nbytes)
        return model

    def _map_segment(self, nbytes: int) -> SharedSegment:
        """Create the segment on rank 0, map it everywhere, unlink it (a collective)."""
        segment, failure, path = None, None, None
        try:
            if self.is_main:
                sweep_stale()  # segments of runs whose rank 0 died before it could unlink
                path = segment_path()
                try:
                    segment = SharedSegment(path, nbytes, create=True)
                except OSError as exc:
                    failure = f"rank 0 cannot create {path} ({exc.strerror or exc})"
            shared = self.broadcast_object(path if segment is not None else None)
            if not self.is_main and shared is not None:
                try:
                    segment = SharedSegment(shared, nbytes, create=False)
                except OSError as exc:
                    failure = f"rank {self.rank} cannot map {shared} ({exc.strerror or exc})"
            failures = [f for f in self.all_gather_object(failure) if f]
        finally:
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # every rank has it mapped (or gave up): nothing left
        if failures or segment is None:
            why = failures[0] if failures else "rank 0 could not create the shared segment"
            raise UsageError(f"--strategy hogwild cannot share its parameters: {why}; it "
                             f"needs {SHM_DIR} writable with {nbytes} bytes free (free space "
                             "or raise its size), or use --strategy ddp")
        return segment

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        yield  # nothing is ever synchronised

    # --- where the processes meet
    def sync_buffers(self, model: nn.Module) -> None:
        """Wait until no rank is still stepping, then give every rank rank 0's buffers."""
        self.barrier()
        super().sync_buffers(model)

    def params_finite(self, model: nn.Module) -> bool:
        """Every rank's verdict on the shared parameters (and its buffers), after a barrier."""
        self.barrier()
        bad = torch.tensor([0.0 if Strategy.params_finite(self, model) else 1.0])
        self.all_reduce_sum(bad)
        return bad.item() == 0

    # --- checkpoints
    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   precision: Precision) -> dict[str, Any]:
        """The shared parameters (cloned out of the mapping), rank 0's optimizer state as
        ``optimizer`` and every rank's as ``optimizer_per_rank`` (gathered on rank 0)."""
        self.barrier()
        mine = optimizer.state_dict()
        ranks: list[Any] | None = [None] * self.world_size if self.is_main else None
        tdist.gather_object(mine, ranks, dst=0)
        return {"model": {k: v.clone() for k, v in self.plain(model).state_dict().items()},
                "optimizer": mine, "optimizer_per_rank": ranks or [],
                "scaler": precision.state_dict(), "rng": self.rng_state(),
                "world_size": self.data_world}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module,
                        optimizer: torch.optim.Optimizer, precision: Precision) -> None:
        """The model into the shared parameters, this rank's optimizer state (rank 0's when the
        world size changed), then a barrier before anyone steps."""
        own, note = optimizer_state_for(state, self.rank, self.world_size)
        if note and self.is_main:
            log.warning("warning: %s", note)
        state = {**state, "optimizer": own}
        super().load_state_dict(state, model, optimizer, precision)
        self.barrier()

    # --- what the summary says
    def memory(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The base's figures plus ``shared_param_bytes``: of ``param_bytes``, the bytes in the
        segment every rank of the node maps (count them once per node)."""
        return {**super().memory(model, optimizer), "shared_param_bytes": self.shared_bytes}

    def describe(self) -> dict[str, Any]:
        return {**Strategy.describe(self), "exact": False,
                "update_order": "nondeterministic (lock-free, asynchronous)",
                "gradient_communication": "none",
                "shared_memory_bytes": self.segment.nbytes if self.segment else 0}
