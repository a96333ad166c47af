"""Optimizers and learning-rate schedules.

The schedule is a pure function of the optimizer step (:func:`lr_at`), applied before every
step: nothing to checkpoint but the step counter, and resume is exact by construction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from dptrain.config import TrainConfig


def build_optimizer(cfg: TrainConfig, params: Iterable[torch.nn.Parameter],
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer, as a fused kernel where PyTorch has one (one launch for all parameters
    and no Python loop per tensor), else the multi-tensor ``foreach`` implementation."""
    params = list(params)
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
             "adadelta": torch.optim.Adadelta}
    kwargs: dict = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    kind = kinds[cfg.optimizer]
    if cfg.optimizer != "adadelta":
        try:
            return kind(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device/dtype
            pass
    return kind(params, foreach=True, **kwargs)


def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The peak learning rate after ``--lr-scaling`` against ``--ref-batch``."""
    ratio = global_batch / cfg.ref_batch
    if cfg.lr_scaling == "linear":
        return cfg.lr * ratio
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(ratio)
    return cfg.lr


def lr_at(cfg: TrainConfig, peak: float, step: int, steps_per_epoch: int,
          total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if cfg.schedule == "onecycle":
        # OneCycle (cos anneal, three-phase off): up over 25 %, then down to peak/1e4
        up = max(1, int(0.25 * total_steps))
        start, end = peak / 25.0, peak / 1e4
        if step < up:
            return start + (peak - start) * (1 - math.cos(math.pi * step / up)) / 2
        t = min(1.0, (step - up) / max(1, total_steps - up))
        return end + (peak - end) * (1 + math.cos(math.pi * t)) / 2
    lr = peak
    if cfg.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        lr = peak * cfg.gamma ** (epoch // cfg.step_size)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
