"""Strategies: single, dp, ddp. :func:`build` is the only place that chooses between them."""

from __future__ import annotations

import torch

from dptrain.config import TrainConfig
from dptrain.dist import DistEnv, resolve_backend
from dptrain.errors import UsageError
from dptrain.strategies.base import Strategy
from dptrain.strategies.ddp import DDPOptions, DistributedDataParallel
from dptrain.strategies.dp import DataParallel
from dptrain.strategies.single import SingleDevice

__all__ = ["Strategy", "build", "resolve_device", "resolve_strategy_name"]


def resolve_device(requested: str, env: DistEnv) -> torch.device:
    """``auto`` -> CUDA when present. Under several processes, each takes its local GPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA GPU is visible; use --device cpu "
                         "(or auto)")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if env.local_rank >= n:
        raise UsageError(f"local rank {env.local_rank} has no GPU (only {n} visible); start "
                         f"at most {n} processes per node")
    return torch.device("cuda", env.local_rank)


def resolve_strategy_name(requested: str, env: DistEnv, nproc: int = 1) -> str:
    if requested != "auto":
        return requested
    return "ddp" if env.distributed or nproc > 1 else "single"


def build(cfg: TrainConfig, env: DistEnv, *, count_comm: bool = False) -> Strategy:
    """The strategy for this process, with its device resolved."""
    name = resolve_strategy_name(cfg.strategy, env)
    if name == "single" and env.world_size > 1:
        raise UsageError(f"--strategy single cannot run in {env.world_size} processes; use "
                         "--strategy ddp (or auto)")
    device = resolve_device(cfg.device, env)
    if name == "dp":
        if cfg.device == "cpu":
            raise UsageError("--strategy dp needs CUDA GPUs; on CPU use --strategy ddp")
        return DataParallel(env, device)
    if name == "ddp":
        options = DDPOptions(
            bucket_cap_mb=cfg.bucket_cap_mb,
            gradient_as_bucket_view=cfg.gradient_as_bucket_view,
            static_graph=cfg.static_graph,
            find_unused_parameters=cfg.find_unused_parameters,
            comm_hook=cfg.comm_hook,
            cpu_allreduce=cfg.cpu_allreduce,
            count_comm=count_comm,
            sync_bn=cfg.sync_bn,
        )
        backend = resolve_backend(cfg.backend, device)
        return DistributedDataParallel(env, device, backend=backend, timeout_s=cfg.timeout_s,
                                       options=options)
    return SingleDevice(env, device)
