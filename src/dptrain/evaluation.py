"""Exact evaluation: every sample of a split counted once, for any world size.

Each rank takes a contiguous shard (sizes differ by at most one, no padding, no duplicates);
the objective's metric *sums* are added over ranks in one all-reduce, so the metrics equal a
one-process evaluation's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dptrain.data.batch import call_model
from dptrain.data.loader import Prepare, eval_batches, eval_shard
from dptrain.objective import Objective
from dptrain.precision import Precision
from dptrain.strategies import Strategy


def evaluate(model: nn.Module, x: Any, y: torch.Tensor | None, strategy: Strategy,
             objective: Objective, precision: Precision, batch_size: int,
             normalize: Callable[[Any], Any] = lambda x: x, prepare: Prepare | None = None
             ) -> dict[str, Any]:
    """The objective's metrics over the whole split (``samples``, ``loss``, task metrics)."""
    n = len(x) if isinstance(x, torch.utils.data.Dataset | torch.Tensor) else None
    if n is None:
        from dptrain.data.batch import num_samples

        n = num_samples(x)
    start, end = eval_shard(n, strategy.rank, strategy.world_size)
    was_training = model.training
    model.eval()
    sums = objective.metric_sums(strategy.device)
    with torch.no_grad(), precision.autocast():
        for xb, target in eval_batches(x, y, start, end, batch_size, strategy.device, prepare):
            sums.update(call_model(model, normalize(xb)), target)
    model.train(was_training)
    strategy.all_reduce_sum(sums.totals)
    return sums.finish()
