"""FSDP2: parameters, gradients and optimizer state sharded across the ranks.

``torch.distributed.fsdp.fully_shard`` is applied to every top-level block that holds
parameters and then to the root, over a 1-D device mesh built on the training device's type
("cpu" for gloo -- explicitly, also when a GPU is visible -- or "cuda" for NCCL). Each
parameter becomes a DTensor sharded on dim 0: a rank stores 1/N of it, all-gathers a block's
parameters just before that block's forward (and, with ``--reshard-after-forward``, frees them
after it and gathers them again for the backward), and reduce-scatters the gradients, so each
rank holds and updates only its shard of gradients and optimizer state. The arithmetic is
DDP's (gradients averaged over ranks), so N processes x batch B equal one process x batch N*B.

* ``--accum``: ``set_requires_gradient_sync(False)`` on all but the last micro-batch (the
  gradients accumulate unsharded, then one reduce-scatter).
* ``--precision bf16``: a ``MixedPrecisionPolicy`` (bf16 parameters in compute, fp32
  gradient reduction and fp32 master shards), on top of bf16 autocast.
* ``--grad-clip``: the global norm over the sharded gradients (DTensor arithmetic: one
  all-reduce).
* Evaluation and checkpoints use a plain copy of the model, refreshed from the shards by an
  all-gather (every rank calls it), so evaluation runs each rank's shard of the test set with
  no collective inside the forward, and ``last.pt`` holds the unwrapped, consolidated model.
  The optimizer state is consolidated on rank 0 in the format a plain optimizer writes
  (indexed by position in the parameter groups), so ddp, zero and fsdp checkpoints are
  interchangeable, at any world size.
* ``--sync-bn`` is refused (BatchNorm statistics stay per rank; rank 0's are kept, as in DDP).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from dptrain.errors import UsageError
from dptrain.strategies.base import with_own_kernels
from dptrain.strategies.ddp import DistributedDataParallel

if TYPE_CHECKING:
    from dptrain.config import TrainConfig
    from dptrain.precision import Precision



def _state_dict_api():  # noqa: ANN202 - torch.distributed.checkpoint takes ~2 s to import
    from torch.distributed.checkpoint import state_dict as api

    return api


class FullyShardedDataParallel(DistributedDataParallel):
    name = "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        o = self.options
        if o.sync_bn:
            raise UsageError("--sync-bn cannot apply to --strategy fsdp (BatchNorm statistics "
                             "stay per rank); drop --sync-bn, or use --strategy ddp or zero")
        self.template = copy.deepcopy(model)  # the plain model: evaluation, last.pt
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if o.precision == "bf16" else MixedPrecisionPolicy())
        kwargs = {"mesh": mesh, "reshard_after_forward": o.reshard_after_forward,
                  "mp_policy": policy}
        for block in model.children():
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def build_optimizer(self, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
        """The multi-tensor (foreach) kernels: the fused ones have no DTensor sharding rule."""
        from dptrain.optim import optimizer_class, param_groups

        self.grad_clip = cfg.grad_clip
        kind, kwargs = optimizer_class(cfg)
        return kind(param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias),
                    foreach=True, **kwargs)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def plain(self, model: nn.Module) -> nn.Module:
        """The plain copy, holding the full parameters (an all-gather: every rank calls it)."""
        model = getattr(model, "_orig_mod", model)
        if not isinstance(model, FSDPModule):
            return model
        api = _state_dict_api()
        self.template.load_state_dict(api.get_model_state_dict(
            model, options=api.StateDictOptions(full_state_dict=True)))
        return self.template

    def clip_gradients(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                       precision: Precision) -> torch.Tensor:
        precision.unscale(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=False)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # --- state: consolidated, in the format a plain optimizer writes
    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   precision: Precision) -> dict[str, Any]:
        api = _state_dict_api()
        osd = api.get_optimizer_state_dict(
            model, optimizer, options=api.StateDictOptions(full_state_dict=True,
                                                           cpu_offload=True))
        return {"model": self.plain(model).state_dict(),
                "optimizer": _by_index(osd) if self.is_main else {},
                "scaler": precision.state_dict(), "rng": self.rng_state(),
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module,
                        optimizer: torch.optim.Optimizer, precision: Precision) -> None:
        api = _state_dict_api()
        full = api.StateDictOptions(full_state_dict=True)
        api.set_model_state_dict(model, state["model"], options=full)
        try:
            osd = _by_name(with_own_kernels(state["optimizer"], optimizer),
                           _group_names(model, optimizer))
            api.set_optimizer_state_dict(model, optimizer, osd, options=full)
        except (ValueError, KeyError, IndexError, RuntimeError) as exc:
            raise UsageError(f"its optimizer state does not fit this optimizer ({exc})"
                             ) from None
        precision.load_state_dict(state.get("scaler") or {})
        if len(state["rng"]["cpu"]) == self.world_size:
            self.load_rng_state(state["rng"])

    def params_finite(self, model: nn.Module) -> bool:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        bad = torch.tensor([float(any(not bool(torch.isfinite(t).all()) for t in local))])
        self.all_reduce_sum(bad)
        return bad.item() == 0

    def bn_statistics(self) -> str:
        return "per process (rank 0's are kept)"


def _group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Each parameter group's parameters by name (the model's own, fully_shard keeps them)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def _by_index(osd: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed full optimizer state -> torch's own format (positions in the groups)."""
    state, groups, index = {}, [], 0
    for group in osd["param_groups"]:
        ids = []
        for name in group["params"]:
            if name in osd["state"]:
                state[index] = osd["state"][name]
            ids.append(index)
            index += 1
        groups.append({**group, "params": ids})
    return {"state": state, "param_groups": groups}


def _by_name(sd: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """Inverse of :func:`_by_index` for this optimizer's groups."""
    if len(sd["param_groups"]) != len(names):
        raise ValueError(f"{len(sd['param_groups'])} parameter groups saved, "
                         f"{len(names)} here")
    state, groups = {}, []
    for group, here in zip(sd["param_groups"], names, strict=True):
        if len(group["params"]) != len(here):
            raise ValueError(f"a group of {len(group['params'])} parameters saved, "
                             f"{len(here)} here")
        for i, name in zip(group["params"], here, strict=True):
            if i in sd["state"]:
                state[name] = sd["state"][i]
        groups.append({**group, "params": list(here)})
    return {"state": state, "param_groups": groups}
