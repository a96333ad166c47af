"""``--balance auto``: DDP with per-rank micro-batch sizes in proportion to each rank's speed.

Workers of unequal speed (different GPUs; CPU processes with different ``--threads``) wait, in
DDP, for the slowest one at every all-reduce. This strategy measures each rank's speed during
warm-up and gives rank ``r`` a share ``b_r`` of every global micro-batch of ``G = B x N``
samples in proportion to it (``sum(b_r) == G``, each at least 1), so that all ranks finish
their part of a step at about the same time. The global batch, and the step, stay the same:

* data: the loader cuts the same ``G`` indices per micro-batch at the offsets of the shares
  (:meth:`~dptrain.data.loader.ShardedLoader.set_shares`), so their union is unchanged;
* gradients: DDP averages over ``N`` ranks, so rank ``r`` scales its loss (the mean over its
  ``b_r`` samples) by ``w_r = N * b_r / G``: the average of the scaled gradients is the
  gradient of the mean over the ``G`` samples -- the one-process step. The logged loss is the
  scaled one, whose mean over ranks is the global batch's mean loss.

Measuring: step 1 (the first: allocation, DDP's bucket rebuild) is not timed; steps 2 to
``1 + MEASURED_STEPS`` run their forward and backward under ``no_sync`` -- local work only,
timed with the device synchronised -- followed by one explicit all-reduce of the gradients
(divided by ``N``, as DDP's own hook does). Timing an ordinary DDP backward would include the
wait for the slowest rank in the all-reduce, making every rank look as slow as the slowest.
Each rank's median time per sample is all-gathered, and every rank computes the same shares
from the same list (:func:`proportional_shares`, largest-remainder rounding). The shares
apply from the next step on; speeds, shares and per-rank step times are logged and reported
by :meth:`describe` (``summary.json``). A resumed run measures again: exactness does not
depend on the shares.

Limits: the weighting assumes the loss is a mean over samples (the built-in losses are); a
model or loss that averages over something else (tokens) is weighted approximately. With
``--sync-bn`` the forward itself exchanges statistics, so the timings include waits and the
shares come out nearer equal. Evaluation keeps its equal contiguous shards.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dptrain.strategies.ddp import DistributedDataParallel

log = logging.getLogger("dptrain")

MEASURED_STEPS = 4  # warm-up steps timed (after the first, untimed one)


def proportional_shares(speeds: Sequence[float], total: int) -> tuple[int, ...]:
    """``total`` samples split in proportion to ``speeds``: each share at least 1, summing to
    ``total`` exactly, by largest remainder (ties to the lower rank); deterministic.

    Raises:
        ValueError: fewer samples than ranks, or a speed that is not positive and finite.
    """
    n = len(speeds)
    if n == 0 or total < n:
        raise ValueError(f"cannot give {n} ranks at least one of {total} samples each")
    if not all(math.isfinite(s) and s > 0 for s in speeds):
        raise ValueError(f"speeds must be positive and finite, got {list(speeds)}")
    whole = sum(speeds)
    quotas = [total * s / whole for s in speeds]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(n), key=lambda r: (-(quotas[r] - shares[r]), r))
    for r in by_remainder[:total - sum(shares)]:
        shares[r] += 1
    for r in range(n):  # a rank far slower than the rest still takes one sample
        while shares[r] < 1:
            donor = max(range(n), key=lambda i: (shares[i], -i))
            shares[donor] -= 1
            shares[r] += 1
    return tuple(shares)


class _Weighted:
    """An objective whose loss is scaled by ``weight`` (this rank's ``N * b_r / G``)."""

    def __init__(self, objective: Any, weight: float) -> None:
        self.objective, self.weight = objective, weight

    def loss(self, out: Any, targets: torch.Tensor | None) -> torch.Tensor:
        return self.objective.loss(out, targets) * self.weight

    def __getattr__(self, name: str) -> Any:
        return getattr(self.objective, name)


class BalancedDataParallel(DistributedDataParallel):
    """DDP whose ranks take shares of each global micro-batch in proportion to their speed."""

    name = "ddp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loader: Any = None
        self.calls = 0  # forward_backward calls in this run (a resumed run counts afresh)
        self.local_times: list[float] = []  # seconds of local forward+backward per timed step
        self.per_sample_s: list[float] | None = None  # every rank's median, gathered
        self.shares: tuple[int, ...] | None = None
        self.weight = 1.0
        self.balanced_after = 0  # steps of this run before the shares applied

    def attach_loader(self, loader: Any) -> Any:
        self.loader = loader
        return loader

    def forward_backward(self, model: nn.Module, micro: list[Any], objective: Any,
                         precision: Any) -> list[torch.Tensor]:
        self.calls += 1
        if 1 < self.calls <= 1 + MEASURED_STEPS and self.loader is not None:
            losses = self._timed_step(model, micro, objective, precision)
            if self.calls == 1 + MEASURED_STEPS:
                self.rebalance(micro)
            return losses
        if self.weight != 1.0:
            objective = _Weighted(objective, self.weight)
        return super().forward_backward(model, micro, objective, precision)

    def _timed_step(self, model: nn.Module, micro: list[Any], objective: Any,
                    precision: Any) -> list[torch.Tensor]:
        """Forward and backward without communication, timed; then one all-reduce."""
        self.synchronize()
        start = time.perf_counter()
        with self.no_sync(model):
            losses = super().forward_backward(model, micro, objective, precision)
        self.synchronize()
        self.local_times.append(time.perf_counter() - start)
        self.average_gradients(model)
        return losses

    def average_gradients(self, model: nn.Module) -> None:
        """DDP's gradient average, done explicitly: each gradient divided by ``N`` (as DDP's
        hook does), then summed in one all-reduce per dtype. A parameter that no rank used
        keeps no gradient; one used on some ranks only gets theirs (the others count zeros)."""
        params = [p for p in model.parameters() if p.requires_grad]
        had = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        self.all_reduce_sum(had)
        used = [p for p, n in zip(params, had.tolist(), strict=True) if n > 0]
        for dtype in dict.fromkeys(p.dtype for p in used):
            group = [p for p in used if p.dtype == dtype]
            flat = torch.cat([_grad_or_zeros(p).reshape(-1) for p in group])
            self.all_reduce_sum(flat.div_(self.world_size))
            for p, value in zip(group, flat.split([p.numel() for p in group]), strict=True):
                if p.grad is None:
                    p.grad = value.view_as(p).clone()
                else:
                    p.grad.copy_(value.view_as(p))

    def rebalance(self, micro: list[Any]) -> None:
        """Gather every rank's time per sample; set the shares and this rank's loss weight
        (a collective: every rank computes the same shares from the same list)."""
        samples = self.loader.local_batch * len(micro)
        mine = max(statistics.median(self.local_times), 1e-9) / samples
        self.per_sample_s = [float(t) for t in self.all_gather_object(mine)]
        total = self.loader.micro_global
        shares = proportional_shares([1.0 / t for t in self.per_sample_s], total)
        self.loader.set_shares(shares)
        self.shares = shares
        self.weight = self.world_size * shares[self.rank] / total
        self.balanced_after = self.calls
        if self.is_main:
            speeds = ", ".join(f"{1 / t:.0f}" for t in self.per_sample_s)
            log.info(f"balance: measured samples/s per rank [{speeds}] over steps 2-"
                     f"{1 + MEASURED_STEPS}; shares of each micro-batch of {total}: "
                     f"{list(shares)}, from this run's step {self.calls + 1} on")

    def describe(self) -> dict[str, Any]:
        measured = self.per_sample_s is not None
        return {**super().describe(), "balance": "auto",
                "balance_measured_steps": len(self.local_times),
                "balance_speeds": ([1.0 / t for t in self.per_sample_s] if measured
                                   else None),  # samples/s per rank, local compute only
                "balance_per_sample_s": self.per_sample_s,
                "balance_shares": list(self.shares) if self.shares else None,
                "balance_after_steps": self.balanced_after if measured else None}


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)
