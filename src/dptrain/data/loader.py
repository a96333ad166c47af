"""Device-resident, index-sharded batches: no DataLoader, no per-sample Python.

The whole split lives on the training device as one tensor. Each epoch draws ONE permutation
from a generator seeded by ``(seed, epoch)`` -- identical on every rank and recomputable after
a restart, so no generator state needs saving. An optimizer step consumes a *global* batch of
``batch_size * world * accum`` consecutive permuted indices; micro-batch ``k`` of rank ``r`` is

    perm[step*G*K + k*G + r*B : ... + B]        (G = B * world)

so the union over ranks of micro-batch ``k`` is exactly micro-batch ``k`` of one process with
batch ``B * world``: training does not depend on the world size.

Drop-last: the last ``N mod (B * world * accum)`` samples of each epoch's permutation are not
used that epoch (a different tail each epoch, since the permutation changes). Evaluation never
drops: :func:`eval_shard` splits the test set into contiguous shards of sizes differing by at
most one, so every sample is counted exactly once for any world size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.utils.data

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The epoch's permutation generator: a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class Normalizer:
    """uint8 -> float, ``(x / 255 - mean) / std`` in one fused multiply-add, plus channel dim."""

    def __init__(self, mean: float | None, std: float | None,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.scale = None if mean is None else 1.0 / (255.0 * std)
        self.shift = None if mean is None else -mean / std
        self.memory_format = memory_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x.float().mul_(self.scale).add_(self.shift)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if self.memory_format is not torch.contiguous_format and x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x


CHUNK_FLOATS = 1 << 20  # normalised values per gathered chunk (4 MiB in fp32: stays in cache)


class ShardedLoader:
    """Global-batch sharding over ranks and gradient-accumulation micro-batches."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, rank: int,
                 world: int, accum: int, seed: int, normalize: Normalizer,
                 augment: str = "none") -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of size {world}")
        self.x, self.y = x, y
        self.batch_size, self.rank, self.world, self.accum = batch_size, rank, world, accum
        self.seed = seed
        self.normalize = normalize
        self.augment = augment
        self.micro_global = batch_size * world  # samples per micro-batch over all ranks
        self.step_global = self.micro_global * accum  # samples per optimizer step
        self.steps_per_epoch = len(x) // self.step_global

    def permutation(self, epoch: int) -> torch.Tensor:
        perm = torch.randperm(len(self.x), generator=epoch_generator(self.seed, epoch))
        return perm.to(self.x.device)

    def indices(self, perm: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """This rank's indices for micro-batch ``micro`` of optimizer step ``step``."""
        start = step * self.step_global + micro * self.micro_global + self.rank * self.batch_size
        return perm[start:start + self.batch_size]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[Batch]]:
        """Yield, per optimizer step from ``start_step``, the ``accum`` micro-batches.

        This rank's samples are gathered a chunk of steps at a time (one ``index_select`` for
        about ``CHUNK_FLOATS`` normalised values, then slices): the same batches, bit for bit,
        as gathering each micro-batch on its own, for a fraction of the per-step operations.
        """
        if self.augment not in ("none", "shift"):
            raise ValueError(f"unknown augmentation {self.augment!r}")
        perm = self.permutation(epoch)
        b, accum, world = self.batch_size, self.accum, self.world
        sample = max(1, self.x[0].numel()) if len(self.x) else 1
        chunk_steps = max(1, CHUNK_FLOATS // (b * accum * sample))
        for first in range(start_step, self.steps_per_epoch, chunk_steps):
            last = min(first + chunk_steps, self.steps_per_epoch)
            # (steps, micro-batches, ranks, batch) -> this rank's column, in step/micro order
            idx = perm[first * self.step_global:last * self.step_global]
            idx = idx.view(last - first, accum, world, b)[:, :, self.rank].reshape(-1)
            xs, ys = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if self.augment == "none":
                xs = self.normalize(xs)
            for i, step in enumerate(range(first, last)):
                micro = []
                for k in range(accum):
                    lo = (i * accum + k) * b
                    xb = xs[lo:lo + b]
                    if self.augment == "shift":
                        xb = self.normalize(random_shift(xb, self.seed, epoch, step, k,
                                                         self.rank))
                    micro.append((xb, ys[lo:lo + b]))
                yield micro


class DatasetLoader(ShardedLoader):
    """The same global-batch sharding for a map-style ``Dataset`` (a plug-in's own data).

    A ``torch.utils.data.DataLoader`` fetches each rank's samples through a batch sampler that
    yields exactly the indices :class:`ShardedLoader` would use, so equivalence across world
    sizes and exact resume hold for plug-in datasets too; batches are then moved to ``device``.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, *, batch_size: int, rank: int,
                 world: int, accum: int, seed: int, normalize: Normalizer,
                 device: torch.device, num_workers: int = 0) -> None:
        self.dataset = dataset
        self.device = device
        self.num_workers = num_workers
        n = len(dataset)
        super().__init__(_Length(n), _Length(n), batch_size=batch_size, rank=rank, world=world,
                         accum=accum, seed=seed, normalize=normalize)

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.dataset), generator=epoch_generator(self.seed, epoch))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[Batch]]:
        perm = self.permutation(epoch)
        sampler = [self.indices(perm, step, k).tolist()
                   for step in range(start_step, self.steps_per_epoch) for k in range(self.accum)]
        batches = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler,
                                              num_workers=self.num_workers)
        micro: list[Batch] = []
        for xb, yb in batches:
            xb = xb.to(self.device, non_blocking=True)
            micro.append((self.normalize(xb), yb.to(self.device, non_blocking=True).long()))
            if len(micro) == self.accum:
                yield micro
                micro = []


class _Length:
    """Stands in for a tensor where only ``len()`` is needed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def eval_batches(x: torch.Tensor | torch.utils.data.Dataset, y: torch.Tensor | None,
                 start: int, end: int, batch_size: int, device: torch.device
                 ) -> Iterator[Batch]:
    """Batches of samples ``[start, end)``: tensor slices, or a DataLoader over a Dataset."""
    if isinstance(x, torch.Tensor):
        for i in range(start, end, batch_size):
            j = min(i + batch_size, end)
            yield x[i:j], y[i:j]
        return
    subset = torch.utils.data.Subset(x, range(start, end))
    for xb, yb in torch.utils.data.DataLoader(subset, batch_size=batch_size):
        yield xb.to(device), yb.to(device).long()


def random_shift(x: torch.Tensor, seed: int, epoch: int, step: int, micro: int,
                 rank: int, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill), deterministic per step.

    Done for the whole batch with one gather: pad, then pick a shifted 28x28 window per sample.
    """
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    g = torch.Generator().manual_seed(((seed * 7919 + epoch) * 1_000_003 + step) * 64
                                      + micro * 8 + rank)
    shifts = torch.randint(0, 2 * max_shift + 1, (2, n), generator=g).to(x.device)
    padded = torch.nn.functional.pad(x, (max_shift, max_shift, max_shift, max_shift))
    rows = (torch.arange(h, device=x.device).view(1, h) + shifts[0].view(n, 1))  # n, h
    cols = (torch.arange(w, device=x.device).view(1, w) + shifts[1].view(n, 1))  # n, w
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, rows.view(n, h, 1), cols.view(n, 1, w)]


def eval_shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of ``n`` samples for ``rank``; sizes differ by at most one."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)

