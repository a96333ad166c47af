"""Per-rank memory of model state, predicted from the model's shapes (the ZeRO formulas, made
exact for how PyTorch actually partitions).

For Psi parameter elements of ``p`` bytes, gradients of ``g`` bytes and ``K`` optimizer-state
elements per parameter (SGD with momentum 1, Adam 2, plain SGD 0), the ZeRO paper's per-rank
bytes are

* replicated (ddp, single): ``(p + g + K*4) * Psi``
* optimizer state sharded (zero, stage 1): ``(p + g) * Psi + K*4*Psi / N``
* everything sharded (fsdp): ``(p + g + K*4) * Psi / N``

``Psi / N`` is the ideal. The prediction follows the real partitioning instead, so it holds for
every rank, not on average: ``ZeroRedundancyOptimizer`` gives whole tensors to ranks (largest
first, each to the rank holding least), and ``fully_shard`` splits every parameter along
dim 0 in chunks of ``ceil(rows / N)`` (the last ranks may get fewer rows, or none). The state
of the optimizer is fp32; under ``--precision bf16`` parameters and gradients stay fp32 too
(autocast; FSDP's bf16 parameters exist only while gathered).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

STATE_PER_PARAM = {"sgd": 1, "sgd-no-momentum": 0, "adam": 2, "adamw": 2, "adadelta": 2}


def optimizer_states(optimizer: str, momentum: float) -> int:
    """Optimizer-state elements kept per parameter element."""
    if optimizer == "sgd":
        return STATE_PER_PARAM["sgd"] if momentum > 0 else 0
    return STATE_PER_PARAM[optimizer]


def shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """The trainable parameters' shapes, in order."""
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def zero_partition(sizes: Sequence[int], n: int) -> list[int]:
    """Elements per rank as ``ZeroRedundancyOptimizer`` partitions one parameter group:
    largest tensor first, each to the rank with the fewest elements so far."""
    load = [0] * n
    for size in sorted(sizes, reverse=True):
        load[load.index(min(load))] += size
    return load


def fsdp_shard(shape: Sequence[int], n: int) -> list[int]:
    """Elements per rank of one parameter sharded on dim 0 by ``fully_shard``."""
    if not shape:
        return [1 if r == 0 else 0 for r in range(n)]
    rows, per_row = shape[0], _numel(shape[1:])
    chunk = math.ceil(rows / n)
    return [max(0, min(rows, (r + 1) * chunk) - r * chunk) * per_row for r in range(n)]


def predict(param_shapes: Sequence[Sequence[int]], strategy: str, n: int, *,
            states: int, param_bytes: int = 4, grad_bytes: int = 4) -> list[dict[str, int]]:
    """Per rank: ``param_bytes``, ``grad_bytes``, ``optim_bytes`` and their ``total``."""
    sizes = [_numel(s) for s in param_shapes]
    total = sum(sizes)
    if strategy == "fsdp":
        per_rank = [sum(col) for col in zip(*(fsdp_shard(s, n) for s in param_shapes),
                                            strict=True)] if sizes else [0] * n
        params = grads = optim = per_rank
    else:
        params = grads = [total] * n
        optim = zero_partition(sizes, n) if strategy == "zero" else [total] * n
    return [{"param_bytes": params[r] * param_bytes, "grad_bytes": grads[r] * grad_bytes,
             "optim_bytes": optim[r] * 4 * states,
             "total": params[r] * param_bytes + grads[r] * grad_bytes + optim[r] * 4 * states}
            for r in range(n)]


def table(param_shapes: Sequence[Sequence[int]], *, states: int,
          ns: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
          strategies: Sequence[str] = ("ddp", "zero", "fsdp")) -> list[dict[str, Any]]:
    """The largest rank's predicted bytes for each strategy and world size."""
    rows = []
    for n in ns:
        row: dict[str, Any] = {"n": n}
        for strategy in strategies:
            row[strategy] = max(r["total"] for r in predict(param_shapes, strategy, n,
                                                            states=states))
        rows.append(row)
    return rows


def fits_from(param_shapes: Sequence[Sequence[int]], device_bytes: int, *, states: int,
              strategy: str, max_n: int = 64) -> int | None:
    """The smallest world size from which every rank's model state fits ``device_bytes``."""
    for n in range(1, max_n + 1):
        if max(r["total"] for r in predict(param_shapes, strategy, n, states=states)) \
                <= device_bytes:
            return n
    return None
