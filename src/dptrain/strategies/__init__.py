"""Strategies: single, dp, ddp (balanced), zero, fsdp, pipeline, hogwild, localsgd.

:func:`build` is the only place that chooses between them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dptrain.dist import DistEnv
from dptrain.errors import UsageError
from dptrain.strategies.base import Strategy
from dptrain.strategies.ddp import DDPOptions
from dptrain.strategies.dp import DataParallel
from dptrain.strategies.single import SingleDevice

if TYPE_CHECKING:
    from dptrain.plan import Plan

__all__ = ["Strategy", "build", "local_device"]

# one process per device, in a process group; zero and fsdp imported when used (their
# torch modules -- distributed.optim, distributed.checkpoint -- take seconds to import)
SHARDED_OR_DDP = {"ddp": "dptrain.strategies.ddp:DistributedDataParallel",
                  "zero": "dptrain.strategies.zero:ZeroDataParallel",
                  "fsdp": "dptrain.strategies.fsdp:FullyShardedDataParallel",
                  "pipeline": "dptrain.strategies.pipeline:PipelineParallel",
                  "hogwild": "dptrain.strategies.hogwild:Hogwild",
                  "localsgd": "dptrain.strategies.localsgd:LocalSGD",
                  "ddp+balance": "dptrain.strategies.balance:BalancedDataParallel"}


def strategy_class(name: str) -> type[Strategy]:
    import importlib

    module, _, cls = SHARDED_OR_DDP[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def local_device(kind: str, env: DistEnv) -> torch.device:
    """The plan's device kind -> this process's device (each local rank takes its own GPU)."""
    if kind == "cpu":
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if env.local_rank >= n:
        raise UsageError(f"local rank {env.local_rank} has no GPU (only {n} visible); start "
                         f"at most {n} processes per node")
    return torch.device("cuda", env.local_rank)


def build(plan: Plan, env: DistEnv, *, count_comm: bool = False) -> Strategy:
    """The strategy object for this process, as the plan resolved it."""
    cfg = plan.cfg
    device = local_device(plan.device, env)
    if plan.strategy == "dp":
        return DataParallel(env, device)
    if plan.strategy in SHARDED_OR_DDP:
        options = DDPOptions(
            bucket_cap_mb=cfg.bucket_cap_mb,
            gradient_as_bucket_view=cfg.gradient_as_bucket_view,
            static_graph=cfg.static_graph,
            find_unused_parameters=cfg.find_unused_parameters,
            comm_hook=cfg.comm_hook,
            cpu_allreduce=cfg.cpu_allreduce,
            count_comm=count_comm,
            sync_bn=cfg.sync_bn,
            reshard_after_forward=cfg.reshard_after_forward,
            precision=cfg.precision,
            stages=cfg.stages or plan.world_size,
            microbatches=cfg.microbatches or 2 * (cfg.stages or plan.world_size),
            pipeline_schedule=cfg.pipeline_schedule,
            split_points=cfg.split_points,
            sync_every=cfg.sync_every,
            localsgd_warmup_steps=cfg.localsgd_warmup_steps,
        )
        name = "ddp+balance" if plan.strategy == "ddp" and cfg.balance == "auto" else (
            plan.strategy)
        return strategy_class(name)(env, device, backend=plan.backend,
                                             timeout_s=cfg.timeout_s, options=options)
    return SingleDevice(env, device)
