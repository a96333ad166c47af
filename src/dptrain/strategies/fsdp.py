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
* Evaluation and ``last.pt`` use a plain copy of the model, refreshed from the shards by an
  all-gather (every rank calls it), so evaluation runs each rank's shard of the test set with
  no collective inside the forward, and ``last.pt`` holds the unwrapped, consolidated model.
  The copy is refreshed only when the model may have changed since the last gather (an
  optimizer step, a training forward -- BatchNorm statistics -- or a load: counted by hooks;
  the version counters of DTensor shards do not move under the optimizer's foreach
  kernels), so a checkpoint, and an evaluation at the same step, share one gather.
* Numbered checkpoints are sharded (``checkpoint_dcp``): :meth:`sharded_state_dict` hands
  DCP each rank's DTensor shards of the parameters and of the optimizer state, keyed by
  parameter name -- nothing is gathered -- and :meth:`load_sharded` has DCP read just this
  rank's part of any such checkpoint (written by fsdp or zero, at any world size), so ddp,
  zero and fsdp checkpoints stay interchangeable. :meth:`state_dict` still gives the
  consolidated state (optimizer indexed by position in the parameter groups, on rank 0).
* ``--sync-bn`` is refused (BatchNorm statistics stay per rank; rank 0's are kept, as in DDP).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from dptrain import checkpoint_dcp
from dptrain.errors import UsageError
from dptrain.strategies.base import refuse_strided_parameters, with_own_kernels
from dptrain.strategies.ddp import DistributedDataParallel

if TYPE_CHECKING:
    from dptrain.config import TrainConfig
    from dptrain.precision import Precision



def _state_dict_api():  # noqa: ANN202 - torch.distributed.checkpoint takes ~2 s to import
    from torch.distributed.checkpoint import state_dict as api

    return api


class FullyShardedDataParallel(DistributedDataParallel):
    name = "fsdp"

    def check_model(self, model: nn.Module) -> None:
        # FSDP2 refuses non-contiguous parameters deep inside fully_shard, after the run
        # directory is written: refuse them before
        refuse_strided_parameters(model, self.name, "shards contiguous parameters only")

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
        if o.precision == "bf16":
            # BatchNorm keeps fp32 parameters, as under autocast: its running statistics are
            # fp32 buffers (FSDP casts parameters only), and the CPU kernel takes bf16 input
            # with fp32 weight and statistics, not bf16 weight with fp32 statistics
            fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(
                        p.requires_grad for p in m.parameters()):
                    fully_shard(m, **{**kwargs, "mp_policy": fp32})
        for block in model.children():
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        model.register_forward_pre_hook(self._forward_seen)
        return model

    changes = 0  # optimizer steps, training forwards and loads so far: when plain() is stale

    def _forward_seen(self, module: nn.Module, _args: Any) -> None:
        if module.training:
            self.changes += 1

    def _step_seen(self, *_args: Any) -> None:
        self.changes += 1

    def build_optimizer(self, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
        """The multi-tensor (foreach) kernels: the fused ones have no DTensor sharding rule."""
        from dptrain.optim import optimizer_class, param_groups

        self.grad_clip = cfg.grad_clip
        kind, kwargs = optimizer_class(cfg)
        opt = kind(param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias),
                   foreach=True, **kwargs)
        opt.register_step_post_hook(self._step_seen)  # also a user's own optimizer.step()
        return opt

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    gathers = 0  # full-model all-gathers so far (tests, bench)

    def plain(self, model: nn.Module) -> nn.Module:
        """The plain copy, holding the full parameters (an all-gather: every rank calls it;
        skipped on every rank alike when nothing changed the model since the last one)."""
        model = getattr(model, "_orig_mod", model)
        if not isinstance(model, FSDPModule):
            return model
        if self.changes == getattr(self, "_gathered", None):
            return self.template
        api = _state_dict_api()
        self.template.load_state_dict(api.get_model_state_dict(
            model, options=api.StateDictOptions(full_state_dict=True)))
        self._gathered = self.changes
        self.gathers += 1
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
                "optimizer": checkpoint_dcp.by_index(osd) if self.is_main else {},
                "scaler": precision.state_dict(), "rng": self.rng_state(),
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module,
                        optimizer: torch.optim.Optimizer, precision: Precision) -> None:
        api = _state_dict_api()
        full = api.StateDictOptions(full_state_dict=True)
        api.set_model_state_dict(model, state["model"], options=full)
        try:
            osd = _by_name(with_own_kernels(_unused_state_dropped(state["optimizer"],
                                                                  optimizer), optimizer),
                           _group_names(model, optimizer))
            if osd.get("state"):  # else nothing to load (SGD without momentum keeps no state)
                api.set_optimizer_state_dict(model, optimizer, osd, options=full)
        except (ValueError, KeyError, IndexError, RuntimeError, AssertionError) as exc:
            # AssertionError: torch's loader on state this optimizer never makes (momentum
            # buffers for SGD without momentum)
            raise UsageError(f"its optimizer state does not fit this optimizer "
                             f"({exc or type(exc).__name__})") from None
        precision.load_state_dict(state.get("scaler") or {})
        if len(state["rng"]["cpu"]) == self.world_size:
            self.load_rng_state(state["rng"])
        self.changes += 1

    def sharded_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                           precision: Precision) -> dict[str, Any]:
        """Each rank's shards, by parameter name, for DCP (no gather): the parameters and
        the optimizer state as DTensors, the buffers (rank 0's, broadcast first, as the
        consolidated checkpoint keeps them) as plain tensors."""
        api = _state_dict_api()
        model = getattr(model, "_orig_mod", model)
        self.sync_buffers(model)
        osd = api.get_optimizer_state_dict(model, optimizer)
        tensors, scalars = checkpoint_dcp.split_state(osd["state"], {k: k for k in osd["state"]})
        return {"tensors": {"model": api.get_model_state_dict(model), "optim": tensors},
                "optim_scalars": scalars, "param_groups": osd["param_groups"],
                "scaler": precision.state_dict(), "rng": self.rng_state(),
                "world_size": self.world_size}

    def load_sharded(self, state: dict[str, Any], model: nn.Module,
                     optimizer: torch.optim.Optimizer, precision: Precision) -> None:
        """A DCP checkpoint, this rank reading only its shards (a collective)."""
        api = _state_dict_api()
        path = Path(state["sharded"])
        msd = api.get_model_state_dict(model)
        params = dict(model.named_parameters())
        optim = {fqn: {item: _like(params[fqn], shape, dtype)
                       for item, (shape, dtype) in items.items()}
                 for fqn, items in checkpoint_dcp.optim_keys(path, list(params)).items()}
        checkpoint_dcp.load_into({"model": msd, "optim": optim}, path, collective=True)
        api.set_model_state_dict(model, msd)
        for fqn, items in (state.get("optim_scalars") or {}).items():
            optim.setdefault(fqn, {}).update(items)
        groups = with_own_kernels({"param_groups": state["param_groups"]}, optimizer)
        try:
            api.set_optimizer_state_dict(model, optimizer, {"state": optim, **groups})
        except (ValueError, KeyError, IndexError, RuntimeError) as exc:
            raise UsageError(f"its optimizer state does not fit this optimizer ({exc})"
                             ) from None
        precision.load_state_dict(state.get("scaler") or {})
        self.load_rng_state(state["rng"])
        self.changes += 1

    def params_finite(self, model: nn.Module) -> bool:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        bad = torch.tensor([float(any(not bool(torch.isfinite(t).all()) for t in local))])
        self.all_reduce_sum(bad)
        return bad.item() == 0

    def bn_statistics(self) -> str:
        return "per process (rank 0's are kept)"


def _like(param: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Where a saved optimizer tensor loads: sharded like its parameter when it has the
    parameter's shape (momenta, Adam's moments), else a plain tensor (Adam's step)."""
    if tuple(shape) == tuple(param.shape):
        return torch.zeros_like(param, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Each parameter group's parameters by name (the model's own, fully_shard keeps them)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def _by_name(sd: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """Inverse of :func:`checkpoint_dcp.by_index` for this optimizer's groups."""
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


def _unused_state_dropped(osd: dict[str, Any], optimizer: torch.optim.Optimizer
                          ) -> dict[str, Any]:
    """The checkpoint's momentum buffers dropped when this run's SGD has no momentum (a
    resume with --momentum 0): a plain optimizer ignores them, torch's FSDP loader fails on
    state its optimizer never makes."""
    if not all(g.get("momentum", 1) == 0 for g in optimizer.param_groups):
        return osd
    state = {k: {n: v for n, v in s.items() if n != "momentum_buffer"}
             for k, s in osd.get("state", {}).items()}
    return {**osd, "state": {k: s for k, s in state.items() if s}}
