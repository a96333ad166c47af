"""The interface every strategy implements. The training loop only ever talks to this."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dptrain.dist import DistEnv


class Strategy:
    """How one process takes part in data-parallel training.

    Attributes:
        name: ``single``, ``dp`` or ``ddp``.
        device: where this process keeps its model and its data.
        rank, world_size: position among the processes that *feed data* (1 for single/DP).
        backend: the process-group backend, or ``"none"``.
    """

    name = "base"
    backend = "none"
    comm = None  # a CommCounter when all-reduces are being counted (DDP)

    def __init__(self, env: DistEnv, device: torch.device) -> None:
        self.env = env
        self.device = device
        self.rank = env.rank
        self.world_size = env.world_size
        self.local_rank = env.local_rank

    # --- life cycle
    def setup(self) -> None:
        """Join whatever group the strategy needs. Called once, before anything else."""

    def teardown(self) -> None:
        """Leave the group. Called once, also after a failure."""

    # --- the model
    def wrap(self, model: nn.Module) -> nn.Module:
        """Model (already on ``device``) -> the module the loop trains."""
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The wrapped module -> the plain model (state_dict without ``module.`` prefixes)."""
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Inside, backward accumulates gradients locally without communicating."""
        yield

    # --- collectives (called on EVERY rank)
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place; returns it."""
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def barrier(self) -> None:
        """Wait for every rank."""

    def sync_buffers(self, model: nn.Module) -> None:
        """Make every rank's buffers (BatchNorm statistics) equal to rank 0's."""

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "world_size": self.world_size, "backend": self.backend,
                "device": str(self.device)}
