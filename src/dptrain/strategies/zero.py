"""ZeRO stage 1: DDP with the optimizer state sharded across the ranks.

Gradients are all-reduced exactly as in DDP (every rank holds all of them), but each rank keeps
the optimizer state -- SGD momenta, Adam's two moments -- of only its partition of the
parameters (PyTorch's ``ZeroRedundancyOptimizer``), updates that partition, and broadcasts
the updated parameters to the others. Per rank, the optimizer state shrinks by the world size;
parameters and gradients stay replicated. The update is the same as DDP's, so N processes x
batch B still equal one process x batch N*B.

``overlap_with_ddp`` (running the partition's update inside DDP's communication hook) needs
NCCL and a static graph, and is refused on gloo; dptrain runs the update after the backward
on every backend.

Numbered checkpoints are sharded (``checkpoint_dcp``): :meth:`sharded_state_dict` gives DCP
this rank's partition of the optimizer state keyed by parameter name, and the replicated
model, of which DCP's planner has each rank write a share -- no rank consolidates anything.
Such a checkpoint resumes under ddp, fsdp or ZeRO at any world size; loading one, ZeRO takes
the full state (read by each rank, no collective) through ``load_state_dict``, which keeps this
rank's partition. :meth:`state_dict` still gives the consolidated, globally indexed state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dptrain import checkpoint_dcp
from dptrain.strategies.ddp import DistributedDataParallel

if TYPE_CHECKING:
    from dptrain.config import TrainConfig
    from dptrain.precision import Precision


class ZeroDataParallel(DistributedDataParallel):
    name = "zero"

    def build_optimizer(self, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
        from dptrain.optim import optimizer_class, param_groups

        self.grad_clip = cfg.grad_clip
        kind, kwargs = optimizer_class(cfg)
        groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias)
        first, rest = (groups[0], groups[1:]) if isinstance(groups[0], dict) else (
            {"params": groups}, [])
        kwargs = {**kwargs, **{k: v for k, v in first.items() if k != "params"}}
        return _zero(kind, first["params"], kwargs, rest)  # rest: e.g. the no-decay group

    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The user's optimizer as a ZeroRedundancyOptimizer of its class, with each param
        group's settings (so its state is sharded, as --strategy zero promises)."""
        import inspect

        from torch.distributed.optim import ZeroRedundancyOptimizer

        from dptrain.errors import UsageError

        if isinstance(optimizer, ZeroRedundancyOptimizer):
            return optimizer
        if optimizer.state:
            raise UsageError("strategy zero shards the optimizer state, and this optimizer "
                             "already has some (it has stepped); pass a fresh optimizer, or "
                             "a factory fn(params)")
        kind = type(optimizer)
        accepted = set(inspect.signature(kind).parameters) - {"params"}
        groups = [{k: v for k, v in g.items() if k == "params" or k in accepted}
                  for g in optimizer.param_groups]
        first = groups[0]
        return _zero(kind, first["params"], {k: v for k, v in first.items() if k != "params"},
                     groups[1:])

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

    def sharded_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                           precision: Precision) -> dict[str, Any]:
        """This rank's partition of the optimizer state, by parameter name, and the model
        (replicated: DCP has each rank write a share) -- for DCP, nothing gathered."""
        plain = self.plain(model)
        names = {id(p): n for n, p in plain.named_parameters()}
        local = optimizer.optim.state  # this rank's partition only
        tensors, scalars = checkpoint_dcp.split_state(
            {id(p): items for p, items in local.items()}, names)
        # each rank's own partition first: DCP's planner then hands the replicated model's
        # tensors to the ranks that hold the fewest bytes so far, evening out the shards
        return {"tensors": {"optim": tensors, "model": plain.state_dict()},
                "optim_scalars": self.merged(scalars),
                "param_groups": checkpoint_dcp.named_groups(optimizer.param_groups, names),
                "scaler": precision.state_dict(), "rng": self.rng_state(),
                "world_size": self.data_world}

    def merged(self, mine: dict[str, Any]) -> dict[str, Any]:
        """Every rank's non-tensor per-parameter values, in one dict (a collective)."""
        out: dict[str, Any] = {}
        for part in self.all_gather_object(mine):
            out.update(part)
        return out


class _NoState:
    """Stands in for the optimizer while the base class collects the rest of the state."""

    def state_dict(self) -> dict[str, Any]:
        return {}


def _zero(kind: type, params: Any, kwargs: dict[str, Any], rest: list[dict[str, Any]]
          ) -> torch.optim.Optimizer:
    """A ZeroRedundancyOptimizer of ``kind`` over ``params`` with ``kwargs``, then the further
    param groups ``rest`` (ZeRO partitions every group), built without importing
    ``torch._dynamo``: ``add_param_group`` is dynamo-disabled (:mod:`dptrain.lazydynamo`), and
    ZeRO's ``step`` runs its shard's update through the local optimizer's ``step``, whose
    PyTorch wrapper imports dynamo (2.3 s at a worker's first step) and costs ~25 µs per step.
    The local optimizer gets :func:`dptrain.optim.direct_step`'s update instead, the same
    function under ``no_grad`` (it falls back to the wrapper itself when hooks are
    registered)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from dptrain import lazydynamo
    from dptrain.optim import direct_step

    lazydynamo.defer(torch.optim.Optimizer, ZeroRedundancyOptimizer)
    zero = ZeroRedundancyOptimizer(params, optimizer_class=kind, **kwargs)
    for group in rest:
        zero.add_param_group(group)
    local = zero.optim
    fast = direct_step(local)
    if getattr(fast, "__self__", None) is not local:  # not direct_step's fallback
        local.step = fast
    return zero
