"""The interface every strategy implements. The training loop only ever talks to this.

A strategy owns how one process takes part in training:

* the model: :meth:`wrap` / :meth:`unwrap` / :meth:`no_sync`;
* the step: :meth:`build_optimizer`, :meth:`forward_backward` (forward and backward over the
  accumulation micro-batches, gradients synchronised once) and :meth:`optimizer_step`;
* the state it saves and restores: :meth:`state_dict` / :meth:`load_state_dict` (model,
  optimizer, precision, per-rank RNG), which ``checkpoint.py`` writes and reads;
* the collectives the loop, evaluation and checkpoints need.

The defaults below are data parallelism with one optimizer per rank; a new strategy
(sharding, pipelining, local SGD) overrides what it changes, in its own file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dptrain.data.batch import call_model
from dptrain.dist import DistEnv
from dptrain.errors import UsageError

if TYPE_CHECKING:
    from dptrain.config import TrainConfig
    from dptrain.data.loader import Batch
    from dptrain.objective import Objective
    from dptrain.precision import Precision


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

    @property
    def data_rank(self) -> int:
        """Which shard of each global batch this process trains on (a pipeline's stages of
        one replica share theirs)."""
        return self.rank

    @property
    def data_world(self) -> int:
        """How many shards each global batch is cut into: batch x data_world x accum samples
        per optimizer step."""
        return self.world_size

    @property
    def batch_multiple(self) -> int:
        """What every per-process batch must be a multiple of (``--keep-global-batch`` chooses
        among those): 1 here, a pipeline's micro-batch count there."""
        return 1

    def attach_loader(self, loader: Any) -> Any:
        """The training loader, before the first step (a balancing strategy resizes its
        per-rank shares); returns the loader the loop iterates."""
        return loader

    # --- life cycle
    def setup(self) -> None:
        """Join whatever group the strategy needs. Called once, before anything else."""

    def teardown(self) -> None:
        """Leave the group. Called once, also after a failure."""

    # --- the model
    def check_model(self, model: nn.Module) -> None:
        """Refuse (:class:`UsageError`) a model this strategy cannot train -- called before
        anything in the run directory is written."""

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

    def plain(self, model: nn.Module) -> nn.Module:
        """The trained module (wrapped, maybe compiled) -> the user's model."""
        return self.unwrap(getattr(model, "_orig_mod", model))

    # --- the step
    def build_optimizer(self, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over the wrapped model's parameters."""
        from dptrain.optim import build_optimizer, param_groups

        self.grad_clip = cfg.grad_clip
        groups = param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias)
        return build_optimizer(cfg, groups, self.device)

    def forward_backward(self, model: nn.Module, micro: list[Batch], objective: Objective,
                         precision: Precision) -> list[torch.Tensor]:
        """Forward and backward over one optimizer step's micro-batches; gradients are
        synchronised once, in the last backward. Returns each micro-batch's loss (detached).

        The mean of K micro-batch losses, each scaled by 1/K, is the loss of one K-times
        larger batch, so accumulation equals a larger batch."""
        losses = []
        last = len(micro) - 1
        for k, (inputs, targets) in enumerate(micro):
            with contextlib.nullcontext() if k == last else self.no_sync(model):
                with precision.autocast():
                    loss = objective.loss(call_model(model, inputs), targets)
                scaled = loss if len(micro) == 1 else loss / len(micro)
                precision.scale(scaled).backward()
            losses.append(loss.detach())
        return losses

    grad_clip = 0.0  # --grad-clip, set by build_optimizer

    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """An optimizer the user built over the wrapped model's parameters (own loop) -> the
        one this strategy steps: itself here; a strategy that shards or wraps the optimizer
        (zero, localsgd) rebuilds it as its own kind with the same class and settings."""
        return optimizer

    def optimizer_step(self, optimizer: torch.optim.Optimizer, precision: Precision) -> None:
        """Apply the synchronised gradients (clipped to ``--grad-clip``), then drop them."""
        fast, params = self._fast_step(optimizer)
        if self.grad_clip > 0:
            self.clip_gradients(params, optimizer, precision)
        precision.step(optimizer, fast)
        for p in params:  # zero_grad(set_to_none=True) without its per-call wrapper cost
            p.grad = None

    def clip_gradients(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                       precision: Precision) -> torch.Tensor:
        """Scale the gradients so that their global L2 norm is at most ``--grad-clip``. The
        gradients are already synchronised (every rank holds the same ones), so each rank's
        norm is the global one; a sharding strategy overrides this with the sharded norm."""
        precision.unscale(optimizer)
        return torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)

    def _fast_step(self, optimizer: torch.optim.Optimizer
                   ) -> tuple[Callable[[], None], list[torch.Tensor]]:
        cache = self.__dict__.setdefault("_steps", {})
        if id(optimizer) not in cache:
            from dptrain.optim import direct_step

            params = [p for g in optimizer.param_groups for p in g["params"]]
            cache[id(optimizer)] = (optimizer, direct_step(optimizer), params)
        _, fast, params = cache[id(optimizer)]
        return fast, params

    # --- the state a checkpoint holds (collectives: called on every rank)
    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   precision: Precision) -> dict[str, Any]:
        """What this strategy needs to continue exactly: the plain model's parameters and
        buffers, the optimizer and precision state, and every rank's RNG streams."""
        return {"model": self.plain(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": precision.state_dict(), "rng": self.rng_state(),
                "world_size": self.data_world}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module,
                        optimizer: torch.optim.Optimizer, precision: Precision) -> None:
        """Inverse of :meth:`state_dict`, after :meth:`wrap` and :meth:`build_optimizer`.
        A state that does not fit is a :class:`UsageError` (checkpoint.py adds the path)."""
        try:
            self.plain(model).load_state_dict(state["model"])
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines()]
            why = next((ln for ln in lines if ln.startswith(("Missing key", "Unexpected key",
                                                              "size mismatch"))), lines[0])
            raise UsageError(f"its model does not fit ({why[:200]})") from None
        try:
            optimizer.load_state_dict(with_own_kernels(state["optimizer"], optimizer))
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise UsageError(f"its optimizer state does not fit this optimizer ({exc})"
                             ) from None
        match_layouts(optimizer)
        precision.load_state_dict(state.get("scaler") or {})
        self.load_rng_state(state["rng"])

    def params_finite(self, model: nn.Module) -> bool:
        """Every floating-point parameter and buffer finite (a collective where sharded)."""
        values = [t for t in self.plain(model).state_dict().values() if t.is_floating_point()]
        return not values or bool(torch.stack([torch.isfinite(t).all() for t in values]).all())

    def memory(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Bytes this rank holds: parameters, their gradients (one per trainable parameter
        element, as during the backward) and optimizer state -- counted from the tensors
        themselves (a shard counts as its local part) -- and the peak memory of the process
        (peak RSS on CPU, CUDA max allocated on a GPU)."""
        params = [p for p in model.parameters()]
        local = [_local(p) for p in params]
        return {
            "param_bytes": sum(t.numel() * t.element_size() for t in local),
            "grad_bytes": sum(t.numel() * t.element_size() for t, p in zip(local, params,
                                                                          strict=True)
                              if p.requires_grad),
            "optim_bytes": optimizer_bytes(optimizer),
            **peak_memory(self.device),
        }

    def rng_state(self) -> dict[str, Any]:
        """Every rank's CPU (and CUDA) generator state, gathered (a collective)."""
        cuda = (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                else torch.empty(0, dtype=torch.uint8))
        return {"cpu": self.all_gather_object(torch.get_rng_state()),
                "cuda": self.all_gather_object(cuda)}

    def load_rng_state(self, rng: dict[str, Any]) -> None:
        """Each rank continues its own random stream (dropout) where it was saved. Saved by
        another number of processes, the streams cannot map onto these ranks: each rank keeps
        the fresh stream it was seeded with."""
        if len(rng["cpu"]) != self.world_size:
            return
        torch.set_rng_state(rng["cpu"][self.rank].cpu())
        cuda = rng.get("cuda") or []
        if self.device.type == "cuda" and len(cuda) == self.world_size and cuda[0].numel():
            torch.cuda.set_rng_state(cuda[self.rank].cpu(), self.device)

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

    def synchronize(self) -> None:
        """Wait for the work queued on this process's device (timing)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def sync_buffers(self, model: nn.Module) -> None:
        """Make every rank's buffers (BatchNorm statistics) equal to rank 0's."""

    def main_only(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the main rank only; every rank returns its result, or raises its
        :class:`UsageError` -- so a refusal on rank 0 never leaves the others waiting."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UsageError as exc:
                error = str(exc)
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise UsageError(error)
        return result

    def bn_statistics(self) -> str:
        """Whose BatchNorm running statistics the saved model holds."""
        return "single process" if self.world_size == 1 else "per process (rank 0's are kept)"

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "world_size": self.world_size, "backend": self.backend,
                "device": str(self.device)}


def refuse_strided_parameters(model: nn.Module, strategy: str, why: str) -> None:
    """:meth:`Strategy.check_model` for strategies that need contiguous parameters (and
    activations): a :class:`UsageError` naming the first one that is not (``--channels-last
    on`` makes convolution weights channels_last)."""
    strided = next((n for n, p in model.named_parameters() if not p.is_contiguous()), None)
    if strided is not None:
        raise UsageError(f"--strategy {strategy} {why}, and {strided!r} is not contiguous "
                         "(--channels-last on?); use --channels-last off or auto, or --strategy "
                         "ddp or zero")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer state tensors this rank holds (momenta, Adam moments)."""
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer: the local shard
    total = 0
    for state in inner.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                t = _local(v)
                total += t.numel() * t.element_size()
    return total


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_memory_kind": "cuda_max_allocated"}
    peak = None
    try:
        for line in open("/proc/self/status").read().splitlines():  # noqa: SIM115
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_memory_bytes": peak, "peak_memory_kind": "peak_rss"}


IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def with_own_kernels(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A saved optimizer state whose groups use *this* optimizer's kernels (fused, foreach):
    a checkpoint of a fused DDP optimizer loads into FSDP's foreach one, and back. The
    hyperparameters (lr, momentum, ...) come from the checkpoint, as torch loads them."""
    if not saved.get("param_groups") or len(saved["param_groups"]) != len(
            optimizer.param_groups):
        return saved
    groups = []
    for group, mine in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        group = {k: v for k, v in group.items() if k not in IMPLEMENTATION}
        groups.append({**group, **{k: mine[k] for k in IMPLEMENTATION if k in mine}})
    return {**saved, "param_groups": groups}


def match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Per-parameter optimizer state (momentum, Adam's moments) in its parameter's memory
    layout. A checkpoint saved contiguous and resumed in channels_last (or back) would
    otherwise hold buffers whose strides differ from the parameters', and the fused kernels
    walk parameter, gradient and buffers as if they shared one layout."""
    state = getattr(optimizer, "state", None)
    if not isinstance(state, Mapping):  # a wrapper keeping its state elsewhere (ZeRO's)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = state.get(p)
            if not isinstance(entry, dict):
                continue
            for key, value in list(entry.items()):
                if (isinstance(value, torch.Tensor) and value.shape == p.shape
                        and value.stride() != p.stride()):
                    entry[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
