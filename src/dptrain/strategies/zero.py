"""ZeRO stage 1: DDP with the optimizer state sharded across the ranks.

Gradients are all-reduced exactly as in DDP (every rank holds all of them), but each rank keeps
the optimizer state -- SGD momenta, Adam's two moments -- of only its partition of the
parameters (PyTorch's ``ZeroRedundancyOptimizer``), updates that partition, and broadcasts
the updated parameters to the others. Per rank, the optimizer state shrinks by the world size;
parameters and gradients stay replicated. The update is the same as DDP's, so N processes x
batch B still equal one process x batch N*B.

``overlap_with_ddp`` (running the partition's update inside DDP's communication hook) needs
NCCL and a static graph, and is refused on gloo; dptrain runs the update after the backward
on every backend. The checkpoint holds the consolidated, globally indexed optimizer state (the
same format a plain optimizer writes), so a ZeRO checkpoint resumes under ddp, fsdp or ZeRO at
any world size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dptrain.strategies.ddp import DistributedDataParallel

if TYPE_CHECKING:
    from dptrain.config import TrainConfig
    from dptrain.precision import Precision


class ZeroDataParallel(DistributedDataParallel):
    name = "zero"

    def build_optimizer(self, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        from dptrain.optim import optimizer_class, param_groups

        self.grad_clip = cfg.grad_clip
        kind, kwargs = optimizer_class(cfg)
        groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias)
        first, rest = (groups[0], groups[1:]) if isinstance(groups[0], dict) else (
            {"params": groups}, [])
        kwargs = {**kwargs, **{k: v for k, v in first.items() if k != "params"}}
        opt = ZeroRedundancyOptimizer(first["params"], optimizer_class=kind, **kwargs)
        for group in rest:  # e.g. the no-decay group: ZeRO partitions every group
            opt.add_param_group(group)
        return opt

    def optimizer_step(self, optimizer: torch.optim.Optimizer, precision: Precision) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.grad_clip > 0:
            self.clip_gradients(params, optimizer, precision)
        # the partition's update, then a broadcast of every partition's parameters
        precision.step(optimizer, optimizer.step)
        for p in params:
            p.grad = None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The consolidated state, on the main rank (a collective); ``{}`` elsewhere."""
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if self.is_main else {}

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   precision: Precision) -> dict[str, Any]:
        state = super().state_dict(model, _NoState(), precision)
        state["optimizer"] = self.optimizer_state(optimizer)
        return state


class _NoState:
    """Stands in for the optimizer while the base class collects the rest of the state."""

    def state_dict(self) -> dict[str, Any]:
        return {}
