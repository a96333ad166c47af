"""Device-resident, index-sharded batches: no DataLoader, no per-sample Python.

The whole split lives on the training device as one tensor. Each epoch draws ONE permutation
from a generator seeded by ``(seed, epoch)`` -- identical on every rank and recomputable after
a restart, so no generator state needs saving. An optimizer step consumes a *global* batch of
``batch_size * world * accum`` consecutive permuted indices; micro-batch ``k`` of rank ``r`` is

    perm[step*G*K + k*G + r*B : ... + B]        (G = B * world)

so the union over ranks of micro-batch ``k`` is exactly micro-batch ``k`` of one process with
batch ``B * world``: training does not depend on the world size.

Unequal shares (``--balance auto``): :meth:`ShardedLoader.set_shares` gives rank ``r`` ``b_r``
samples of every global micro-batch (``sum(b_r) == G``, each at least 1): it takes
``[offset_r, offset_r + b_r)`` of the same ``G`` indices (``offset_r = b_0 + ... + b_{r-1}``),
so the union per micro-batch, and hence the step, is unchanged. Equal shares are the case
``b_r = B``; both use the same gather. A change applies from the next step the epoch's
iterator yields: the chunk gathered ahead is cut off there and regathered with the new shares.

Drop-last: the last ``N mod (B * world * accum)`` samples of each epoch's permutation are not
used that epoch (a different tail each epoch, since the permutation changes). Evaluation never
drops: :func:`eval_shard` splits the test set into contiguous shards of sizes differing by at
most one, so every sample is counted exactly once for any world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils.data

from dptrain.data import batch as B
from dptrain.data.datasets import split_sample

Batch = tuple[Any, torch.Tensor | None]  # (inputs: a tensor or a structure, targets)
Prepare = Callable[[Any, Any], Batch]  # a Dataset's CPU batch -> checked (inputs, targets)


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

    def __call__(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):  # a structure of inputs: used as given
            return x
        if self.scale is not None:
            x = x.float().mul_(self.scale).add_(self.shift)
            if x.dim() == 3:  # (N, H, W) images -> (N, 1, H, W)
                x = x.unsqueeze(1)
        if self.memory_format is not torch.contiguous_format and x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x


CHUNK_FLOATS = 1 << 20  # normalised values per gathered chunk (4 MiB in fp32: stays in cache)


class ShardedLoader:
    """Global-batch sharding over ranks and gradient-accumulation micro-batches."""

    def __init__(self, x: Any, y: torch.Tensor | None, *, batch_size: int, rank: int,
                 world: int, accum: int, seed: int, normalize: Normalizer,
                 augment: str = "none") -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of size {world}")
        self.x, self.y = x, y
        self.batch_size, self.rank, self.world, self.accum = batch_size, rank, world, accum
        self.seed = seed
        self.normalize = normalize
        self.augment = augment
        self.n = len(x) if isinstance(x, torch.Tensor | _Length) else B.num_samples(x)
        self.micro_global = batch_size * world  # samples per micro-batch over all ranks
        self.samples_per_step = self.micro_global * accum  # samples per optimizer step, global
        self.steps_per_epoch = self.n // self.samples_per_step
        self.shares: tuple[int, ...] | None = None  # None: B samples per rank
        self.local_batch, self.offset = batch_size, rank * batch_size  # this rank's cut
        self._version = 0  # bumped by each set_shares: an epoch's iterator regathers

    def __len__(self) -> int:
        return self.n

    def set_shares(self, shares: Sequence[int] | None) -> None:
        """Samples of every global micro-batch per rank, from the next step yielded on (also
        mid-epoch). ``None`` or ``B`` each: the equal shares."""
        if shares is not None:
            shares = tuple(int(b) for b in shares)
            if (len(shares) != self.world or sum(shares) != self.micro_global
                    or min(shares) < 1):
                raise ValueError(f"shares {list(shares)}: need {self.world} counts, each at "
                                 f"least 1, summing to {self.micro_global}")
            if all(b == self.batch_size for b in shares):
                shares = None
        self.shares = shares
        self.local_batch = self.batch_size if shares is None else shares[self.rank]
        self.offset = (self.rank * self.batch_size if shares is None
                       else sum(shares[:self.rank]))
        self._version += 1

    def permutation(self, epoch: int) -> torch.Tensor:
        perm = torch.randperm(self.n, generator=epoch_generator(self.seed, epoch))
        leaf = B.leaves(self.x)
        return perm.to(leaf[0].device) if leaf else perm

    def indices(self, perm: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """This rank's indices for micro-batch ``micro`` of optimizer step ``step``."""
        start = step * self.samples_per_step + micro * self.micro_global + self.offset
        return perm[start:start + self.local_batch]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[Batch]]:
        """Yield, per optimizer step from ``start_step``, the ``accum`` micro-batches.

        This rank's samples are gathered a chunk of steps at a time (one ``index_select`` for
        about ``CHUNK_FLOATS`` normalised values, then slices): the same batches, bit for bit,
        as gathering each micro-batch on its own, for a fraction of the per-step operations.
        A :meth:`set_shares` between two steps ends the chunk there; the rest is regathered.
        """
        if self.augment not in ("none", "shift"):
            raise ValueError(f"unknown augmentation {self.augment!r}")
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start step {start_step} outside the epoch's "
                             f"{self.steps_per_epoch} steps")
        perm = self.permutation(epoch)
        sample = max(1, sum(t[0].numel() for t in B.leaves(self.x))) if self.n else 1
        step = start_step
        while step < self.steps_per_epoch:
            version = self._version
            chunk_steps = max(1, CHUNK_FLOATS // (self.local_batch * self.accum * sample))
            last = min(step + chunk_steps, self.steps_per_epoch)
            for micro in self._chunk(perm, epoch, step, last):
                yield micro
                step += 1
                if self._version != version:  # new shares from this step on
                    break

    def _chunk(self, perm: torch.Tensor, epoch: int, first: int,
               last: int) -> Iterator[list[Batch]]:
        """Steps ``[first, last)``: this rank's samples gathered at once, then sliced."""
        b, accum, g = self.local_batch, self.accum, self.samples_per_step
        # (steps, micro-batches, global micro-batch) -> this rank's cut, in step/micro order
        idx = perm[first * g:last * g].view(last - first, accum, self.micro_global)
        idx = idx[:, :, self.offset:self.offset + b].reshape(-1)
        xs = B.index(self.x, idx)
        ys = None if self.y is None else self.y.index_select(0, idx)
        if self.augment == "none":
            xs = self.normalize(xs)
        for i, step in enumerate(range(first, last)):
            micro = []
            for k in range(accum):
                lo = (i * accum + k) * b
                xb = B.slice_(xs, lo, lo + b)
                if self.augment == "shift":
                    xb = self.normalize(random_shift(xb, self.seed, epoch, step, k,
                                                     self.rank))
                micro.append((xb, None if ys is None else ys[lo:lo + b]))
            yield micro


class DatasetLoader(ShardedLoader):
    """The same global-batch sharding for a map-style ``Dataset`` (a plug-in's own data).

    A ``torch.utils.data.DataLoader`` fetches each rank's samples through a batch sampler that
    yields exactly the indices :class:`ShardedLoader` would use, so equivalence across world
    sizes and exact resume hold for plug-in datasets too; batches are then moved to ``device``.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, *, batch_size: int, rank: int,
                 world: int, accum: int, seed: int, normalize: Normalizer,
                 device: torch.device, num_workers: int = 0,
                 prepare: Prepare | None = None, pin_memory: bool | None = None) -> None:
        self.dataset = dataset
        self.device = device
        self.num_workers = num_workers
        self.pin_memory = (torch.device(device).type == "cuda" if pin_memory is None
                           else pin_memory)
        self.prepare = prepare or (lambda x, y: (x, y))
        self._sampler = _BatchList()
        self._loader: torch.utils.data.DataLoader | None = None
        n = len(dataset)
        super().__init__(_Length(n), _Length(n), batch_size=batch_size, rank=rank, world=world,
                         accum=accum, seed=seed, normalize=normalize)

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.dataset), generator=epoch_generator(self.seed, epoch))

    def loader(self) -> torch.utils.data.DataLoader:
        """One DataLoader for the whole run (its workers persist across epochs); the batch
        sampler it iterates is refilled with each epoch's indices."""
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self._sampler, num_workers=self.num_workers,
                pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
        return self._loader

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[Batch]]:
        perm = self.permutation(epoch)
        step = start_step
        while step < self.steps_per_epoch:
            version = self._version
            self._sampler.batches = [self.indices(perm, s, k).tolist()
                                     for s in range(step, self.steps_per_epoch)
                                     for k in range(self.accum)]
            micro: list[Batch] = []
            for batch in self.loader():  # a new iteration drains what workers fetched ahead
                xb, yb = self.prepare(*split_sample(batch))
                xb = self.normalize(B.to_device(xb, self.device))
                micro.append((xb, B.to_device(yb, self.device)))
                if len(micro) == self.accum:
                    yield micro
                    micro, step = [], step + 1
                    if self._version != version:  # new shares: refill from this step on
                        break
            else:
                return


class _BatchList:
    """A batch sampler whose batches are set per epoch (read in the main process each time
    the DataLoader is iterated, so persistent workers see the new epoch's indices)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


class _Length:
    """Stands in for a tensor where only ``len()`` is needed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def eval_batches(x: Any, y: torch.Tensor | None, start: int, end: int, batch_size: int,
                 device: torch.device, prepare: Prepare | None = None) -> Iterator[Batch]:
    """Batches of samples ``[start, end)``: slices of tensors (or of a structure of them), or
    a DataLoader over a Dataset (its batches checked by ``prepare``, then moved)."""
    if not isinstance(x, torch.utils.data.Dataset):
        for i in range(start, end, batch_size):
            j = min(i + batch_size, end)
            yield B.slice_(x, i, j), None if y is None else y[i:j]
        return
    subset = torch.utils.data.Subset(x, range(start, end))
    for batch in torch.utils.data.DataLoader(subset, batch_size=batch_size):
        xb, yb = split_sample(batch)
        if prepare is not None:
            xb, yb = prepare(xb, yb)
        yield B.to_device(xb, device), B.to_device(yb, device)


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

