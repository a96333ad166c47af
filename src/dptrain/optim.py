"""Optimizers and learning-rate schedules.

The schedule is a pure function of the optimizer step (:func:`lr_at`), applied before every
step: nothing to checkpoint but the step counter, and resume is exact by construction.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable

import torch
import torch.optim.optimizer as torch_optimizer

from dptrain import lazydynamo
from dptrain.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_norm_bias: bool
                 ) -> list[dict] | list[torch.nn.Parameter]:
    """The trainable parameters; with ``no_decay_norm_bias``, two groups: weights with
    ``weight_decay``, and biases plus every normalisation layer's parameters without it."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not no_decay_norm_bias:
        return [p for _, p in trainable]
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm,
             torch.nn.LocalResponseNorm)
    exempt = {id(p) for m in model.modules() if isinstance(m, norms)
              for p in m.parameters(recurse=False)}
    exempt |= {id(p) for n, p in trainable if n.endswith("bias") or p.dim() <= 1}
    decay = [p for _, p in trainable if id(p) not in exempt]
    rest = [p for _, p in trainable if id(p) in exempt]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": rest, "weight_decay": 0.0}) if g["params"]]


def optimizer_class(cfg: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    """``--optimizer`` and its settings: the class and its keyword arguments."""
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
             "adadelta": torch.optim.Adadelta}
    kwargs: dict = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return kinds[cfg.optimizer], kwargs


def build_optimizer(cfg: TrainConfig, params: Iterable[torch.nn.Parameter] | list[dict],
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer, as a fused kernel where PyTorch has one (one launch for all parameters
    and no Python loop per tensor), else the multi-tensor ``foreach`` implementation.
    ``params``: parameters or parameter groups (:func:`param_groups`). Building it does not
    import ``torch._dynamo`` (:mod:`dptrain.lazydynamo`)."""
    lazydynamo.defer(torch.optim.Optimizer)
    params = list(params)
    kind, kwargs = optimizer_class(cfg)
    if cfg.optimizer != "adadelta":
        try:
            return kind(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device/dtype
            pass
    return kind(params, foreach=True, **kwargs)


def direct_step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """``optimizer.step`` minus the wrapper PyTorch puts around every call.

    ``Optimizer.step`` is wrapped twice: a profiler ``record_function`` plus the step-hook
    loops, and a grad-mode switch with an ``import torch._dynamo`` and two
    ``torch._dynamo.graph_break()`` calls. Together about 25 µs per step here, 6 % of a
    batch-64 ``linear`` step. The update itself is the same function
    (``_init_group`` and the fused/foreach kernel), run under ``no_grad`` as the wrapper does
    for a non-differentiable optimizer, so parameters and state are bitwise the same (tested).
    Falls back to the wrapped ``step`` while step hooks are registered (they would be skipped),
    when ``step`` was replaced on the instance, for differentiable optimizers, or when the
    wrapping is not the expected one.
    """
    step = getattr(type(optimizer), "step", None)
    plain = inspect.unwrap(step) if step is not None else None
    hooks = (getattr(optimizer, "_optimizer_step_pre_hooks", None),
             getattr(optimizer, "_optimizer_step_post_hooks", None),
             getattr(torch_optimizer, "_global_optimizer_pre_hooks", None),
             getattr(torch_optimizer, "_global_optimizer_post_hooks", None))
    if (plain is None or plain is step or any(h is None for h in hooks)
            or "step" in vars(optimizer)  # patched on the instance (e.g. by an LR scheduler)
            or optimizer.defaults.get("differentiable", False)):
        return optimizer.step

    def run() -> None:
        if any(hooks):  # hooks registered since: keep their semantics
            optimizer.step()
            return
        with torch.no_grad():
            plain(optimizer)

    return run


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
    if cfg.schedule == "cosine":  # after the warm-up, half a cosine from peak down to 0
        warm = min(cfg.warmup_steps, max(0, total_steps - 1))
        t = min(1.0, max(0, step - warm) / max(1, total_steps - warm))
        lr = peak * (1 + math.cos(math.pi * t)) / 2
    if cfg.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        lr = peak * cfg.gamma ** (epoch // cfg.step_size)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
