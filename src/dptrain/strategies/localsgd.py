"""Local SGD (post-local SGD): each rank steps alone; parameters are averaged every H steps.

Built from torch's PostLocalSGD pieces, combined as their documentation does:

* **DDP + ``post_localSGD_hook``** with ``PostLocalSGDState(start_localSGD_iter=W,
  post_local_gradient_allreduce=False)``: the first W optimizer steps (``--localsgd-warmup-
  steps``) are ordinary DDP steps, gradients all-reduced over the world group; afterwards the
  hook hands each rank its own gradient back, with no communication. The state's ``subgroup``
  (passed explicitly as ``None``) is only read when post-local gradients are all-reduced
  within a subgroup, which is off here -- so the hook never calls its default
  ``dist.new_subgroups()``, which needs CUDA.
* **``PostLocalSGDOptimizer(inner, PeriodicModelAverager(period=H, warmup_steps=W))``**: after
  every local update, torch's averager all-reduces all parameters (one flat buffer) at its step
  counter W, W+H, W+2H, ... (0-based), over the world group: across nodes too (gloo or NCCL).

H = 1 equals DDP: each rank's momentum buffer follows the same linear recursion and the
parameters are equal after every average, so the mean of the ranks' updates is DDP's update
with the mean gradient -- for SGD with momentum, Nesterov and weight decay, up to rounding
(tested within 1e-6). Not for Adam, whose update is not linear in the gradient.

Sharing DDP with ddp.py: DDP takes one comm hook, so the shared-memory all-reduce
(``connect_shm``) and ddp.py's counting hook are not used (warm-up gradients go over gloo). The
traffic is always counted, here: a wrapper around ``post_localSGD_hook`` counts the warm-up
buckets and :meth:`optimizer_step` each average's bytes; :meth:`describe` puts them in
summary.json as ``warmup_allreduce_calls/bytes`` and ``parameter_averages``/
``parameter_average_bytes`` (bytes each rank puts into the all-reduce, as ddp.py's counter
counts a bucket). ``self.comm`` stays ``None``: summary.json's ``allreduce_calls/bytes`` are
DDP's bucket counter, and ``bench --compare`` adds the three byte counts, so filling it too
would count the traffic twice.

The step: the base class's fast path calls the optimizer kernel directly and would skip the
averager, so :meth:`optimizer_step` runs ``PostLocalSGDOptimizer.step`` (the inner step, then
the averager) while the gradients still exist -- torch averages only parameters that have
one -- and drops them after. With ``--accum`` the hook runs on the last micro-batch only and the
averager once per optimizer step: both count optimizer steps.

Evaluation, checkpoints and FLOPs see the averaged model through :meth:`plain`: a copy made at
:meth:`wrap`, refreshed at most once per optimizer step. Between averages the ranks differ and
the copy is their average (one all-reduce, torch's ``average_parameters``, on the copy); right
after an average or a warm-up step they hold the same parameters and the copy is this rank's
own, bitwise, without communication. Averaging into the training model at evaluation time was
the alternative; it would add averages where epochs end or checkpoints fall, so ``--ckpt-every``
would change the result. The copy costs one model of memory and leaves torch's schedule alone.
BatchNorm statistics stay per rank in training; the copy keeps rank 0's, as ddp does.

Checkpoints: ``"model"`` is the averaged copy (``last.pt`` is a plain model), ``"optimizer"``
the inner optimizer's state with the ranks' tensors (momenta) averaged -- a plain optimizer
state, so ddp, zero and fsdp resume from it -- and ``"localsgd"`` every rank's own parameters,
buffers and optimizer state (gathered: world x model bytes per rank while saving). Resumed at the
same world size, each rank takes its own entry and the averager's step counter and the hook's
iteration counter are set from the checkpoint's position: the run continues exactly (tested at a
step between averages). At another world size (or from a ddp checkpoint) every rank starts from
the averaged model and averaged optimizer state, as if just after an average, with the counters
from the position (averages keep their schedule); that is not the run the old world size would
have made, and ``describe()["localsgd_resume"]`` says which way it resumed.

Refused, with the reason: ``--comm-hook`` and ``--cpu-allreduce shm`` (DDP's one hook is this
one), ``--find-unused-parameters`` (DDP would all-reduce its used-parameter map every step, and
a parameter unused on some ranks only would leave the ranks averaging different sets), and
``--precision 16`` (the GradScaler skips the step of a rank whose own gradients overflowed;
that rank would miss the average the others wait in). ``--sync-bn`` is refused by the plan.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
    PostLocalSGDState,
    post_localSGD_hook,
)
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.algorithms.model_averaging.utils import average_parameters
from torch.distributed.optim import PostLocalSGDOptimizer

from dptrain import dist
from dptrain.errors import UsageError
from dptrain.strategies.ddp import DDPOptions, DistributedDataParallel

if TYPE_CHECKING:
    from dptrain.config import TrainConfig
    from dptrain.precision import Precision


def averages_after(step: int, period: int, warmup: int) -> bool:
    """Whether ``PeriodicModelAverager(period, warmup)`` averages at its 0-based step counter
    ``step`` (its own rule, read here to count the bytes; pinned by a unit test)."""
    return step >= warmup and (step - warmup) % period == 0


def in_sync_after(steps_done: int, period: int, warmup: int) -> bool:
    """Whether every rank holds the same parameters after ``steps_done`` optimizer steps: none
    yet, the last one a warm-up (DDP) step, or it was followed by an average."""
    last = steps_done - 1
    return steps_done == 0 or last < warmup or averages_after(last, period, warmup)


class Traffic:
    """What local SGD sent, per rank: warm-up gradient all-reduces (DDP buckets), parameter
    averages in training, and averages made for the evaluated/saved copy (not training's)."""

    def __init__(self) -> None:
        self.grad_calls = self.grad_bytes = 0
        self.averages = self.average_bytes = 0
        self.copy_averages = self.copy_average_bytes = 0


def _counting_post_local(traffic: Traffic):  # noqa: ANN202 - torch's hook signature
    # no annotations on the hook: DDP checks them literally, and this module's are strings
    def hook(state, bucket):  # noqa: ANN001, ANN202
        if state.iter < state.start_localSGD_iter:  # a warm-up step: the hook all-reduces
            buffer = bucket.buffer()
            traffic.grad_calls += 1
            traffic.grad_bytes += buffer.numel() * buffer.element_size()
        return post_localSGD_hook(state, bucket)

    return hook


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _to_cpu(obj: Any) -> Any:
    """Tensors (in dicts, lists) detached onto the CPU: gathered state must not name a GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class LocalSGD(DistributedDataParallel):
    """``--strategy localsgd --sync-every H --localsgd-warmup-steps W`` (see the module)."""

    name = "localsgd"

    def __init__(self, env: dist.DistEnv, device: torch.device, *, backend: str,
                 timeout_s: float, options: DDPOptions | None = None) -> None:
        super().__init__(env, device, backend=backend, timeout_s=timeout_s, options=options)
        o = self.options
        refuse(o)
        self.period, self.warmup = o.sync_every, o.localsgd_warmup_steps
        self.traffic = Traffic()  # always counted; self.comm stays None (see the module)
        # ddp.py's wrap then builds DDP with no hook of its own (no shm, no counter)
        self.options = dataclasses.replace(o, cpu_allreduce="gloo", count_comm=False)
        self.hook_state: PostLocalSGDState | None = None
        self.steps_done = 0  # optimizer steps, counted from the checkpoint's position
        self.in_sync = True  # every rank holds the same parameters now
        self.copy_at: int | None = None  # steps_done when the averaged copy was refreshed
        self.resumed: str | None = None
        self._wrapped: dict[int, PostLocalSGDOptimizer] = {}

    # --- the model
    def wrap(self, model: nn.Module) -> nn.Module:
        self.template = copy.deepcopy(model)  # the averaged model: evaluation, last.pt
        return super().wrap(model)

    def comm_hook(self) -> tuple[Any, Any]:
        """Post-local SGD's: all-reduce for the warm-up steps, then none."""
        self.hook_state = PostLocalSGDState(process_group=tdist.group.WORLD, subgroup=None,
                                            start_localSGD_iter=self.warmup,
                                            post_local_gradient_allreduce=False)
        return _counting_post_local(self.traffic), self.hook_state

    def _own(self, model: nn.Module) -> nn.Module:
        """This rank's own (training) module, unwrapped."""
        return self.unwrap(getattr(model, "_orig_mod", model))

    def plain(self, model: nn.Module) -> nn.Module:
        """The averaged model (a collective between averages: every rank calls it)."""
        own = self._own(model)
        if own is getattr(model, "_orig_mod", model) or not hasattr(self, "template"):
            return own  # not the wrapped module (a plain one passed in)
        if self.copy_at != self.steps_done:
            with torch.no_grad():
                for mine, src in zip(self.template.state_dict().values(),
                                     own.state_dict().values(), strict=True):
                    mine.copy_(src)
            if not self.in_sync:
                params = [p for p in self.template.parameters() if p.requires_grad]
                average_parameters(iter(params), tdist.group.WORLD)
                self.traffic.copy_averages += 1
                self.traffic.copy_average_bytes += _nbytes(params)
            self.copy_at = self.steps_done
        return self.template

    # --- the step
    def build_optimizer(self, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
        return self.post_local(super().build_optimizer(cfg, model))

    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """A Session user's own optimizer, wrapped: the averager runs after its steps."""
        return self.post_local(optimizer)

    def post_local(self, optimizer: torch.optim.Optimizer) -> PostLocalSGDOptimizer:
        """``optimizer`` as a PostLocalSGDOptimizer (a user's own one is wrapped once)."""
        if isinstance(optimizer, PostLocalSGDOptimizer):
            return optimizer
        if id(optimizer) not in self._wrapped:
            with warnings.catch_warnings():  # H = 1 warns "use DDP": here it is the check
                warnings.simplefilter("ignore")
                averager = PeriodicModelAverager(period=self.period, warmup_steps=self.warmup,
                                                 process_group=tdist.group.WORLD)
            averager.step = self.steps_done
            self._wrapped[id(optimizer)] = PostLocalSGDOptimizer(optimizer, averager)
        return self._wrapped[id(optimizer)]

    def optimizer_step(self, optimizer: torch.optim.Optimizer, precision: Precision) -> None:
        """The local update, then torch's averager (gradients still present: it averages the
        parameters that have one); then the gradients are dropped."""
        opt = self.post_local(optimizer)
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.grad_clip > 0:  # the global norm in warm-up, this rank's own afterwards
            self.clip_gradients(params, opt.optim, precision)
        averaging = averages_after(opt.averager.step, self.period, self.warmup)
        if averaging:
            self.traffic.averages += 1
            self.traffic.average_bytes += _nbytes([p for p in params if p.grad is not None])
        precision.step(opt, self._post_local_step(opt))
        for p in params:
            p.grad = None
        self.steps_done += 1
        self.in_sync = in_sync_after(self.steps_done, self.period, self.warmup)

    def _post_local_step(self, opt: PostLocalSGDOptimizer) -> Any:
        """``PostLocalSGDOptimizer.step`` -- the local optimizer's ``step``, then the
        averager -- with the local update through :func:`dptrain.optim.direct_step`: the same
        update minus the wrapper that imports ``torch._dynamo`` (2.3 s at a worker's first
        step) and costs ~25 µs per step. A subclass's own ``step`` is called as it is."""
        if type(opt).step is not PostLocalSGDOptimizer.step:
            return opt.step
        local, _ = self._fast_step(opt.optim)  # direct_step, cached per optimizer

        def step() -> None:
            local()
            opt.averager.average_parameters(params=opt.param_groups)

        return step

    # --- state
    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   precision: Precision) -> dict[str, Any]:
        inner = self.post_local(optimizer).optim
        mine = _to_cpu({"model": self._own(model).state_dict(), "optimizer": inner.state_dict()})
        ranks = self.all_gather_object(mine)
        state = super().state_dict(model, _Averaged(self, inner), precision)
        state["localsgd"] = {"sync_every": self.period, "warmup_steps": self.warmup,
                             "ranks": ranks}
        return state

    def averaged_optimizer_state(self, inner: torch.optim.Optimizer) -> dict[str, Any]:
        """The inner optimizer's state with every floating-point state tensor (momenta, Adam's
        moments) averaged over the ranks: one all-reduce (a collective)."""
        sd = inner.state_dict()
        state = {i: dict(s) for i, s in sd["state"].items()}
        where = [(i, k) for i, s in state.items() for k, v in s.items()
                 if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0]
        if where:  # the same keys on every rank: the same optimizer over the same model
            copies = [state[i][k].detach().clone() for i, k in where]
            average_parameters(iter(copies), tdist.group.WORLD)
            for (i, k), t in zip(where, copies, strict=True):
                state[i][k] = t
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module,
                        optimizer: torch.optim.Optimizer, precision: Precision) -> None:
        """Each rank's own state at the same world size (exact), else the averaged one."""
        opt = self.post_local(optimizer)
        saved = state.get("localsgd") or {}
        ranks = saved.get("ranks") or []
        exact = len(ranks) == self.world_size == state["world_size"]
        source = ranks[self.rank] if exact else state
        own_state = {**state, "model": source["model"], "optimizer": source["optimizer"]}
        super().load_state_dict(own_state, self._own(model), opt.optim, precision)
        # load_state_dict gave the inner optimizer new group dicts; the wrapper's are the old
        # ones, where the loop would set each step's lr without it reaching the optimizer
        opt.param_groups = opt.optim.param_groups
        step = state["position"]["step"]
        opt.averager.step = self.steps_done = step
        if self.hook_state is not None:
            self.hook_state.iter = min(step, self.warmup)  # the hook stops counting at W
        # whether the saved ranks agreed follows the schedule they were written with
        self.in_sync = not exact or in_sync_after(
            step, saved.get("sync_every", self.period), saved.get("warmup_steps", self.warmup))
        self.copy_at = None
        self.resumed = "per-rank (exact)" if exact else "averaged"

    def describe(self) -> dict[str, Any]:
        t = self.traffic
        return {**super().describe(), "comm_hook": "post_localSGD", "sync_every": self.period,
                "localsgd_warmup_steps": self.warmup, "parameter_averages": t.averages,
                "parameter_average_bytes": t.average_bytes,
                "warmup_allreduce_calls": t.grad_calls, "warmup_allreduce_bytes": t.grad_bytes,
                "copy_averages": t.copy_averages, "copy_average_bytes": t.copy_average_bytes,
                "localsgd_resume": self.resumed}


class _Averaged:
    """Stands in for the optimizer while the base class collects the rest of the state."""

    def __init__(self, strategy: LocalSGD, inner: torch.optim.Optimizer) -> None:
        self.strategy, self.inner = strategy, inner

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.averaged_optimizer_state(self.inner)


def refuse(o: DDPOptions | TrainConfig) -> None:
    """The flags that cannot work with local SGD, each with the reason and the fix."""
    if o.comm_hook != "none":
        raise UsageError(f"--comm-hook {o.comm_hook} cannot apply to --strategy localsgd: DDP "
                         "takes one comm hook and local SGD's is torch's post_localSGD_hook; "
                         "drop --comm-hook")
    if o.cpu_allreduce == "shm":
        raise UsageError("--cpu-allreduce shm cannot apply to --strategy localsgd: the "
                         "shared-memory all-reduce is a DDP comm hook and DDP takes one (local "
                         "SGD's); drop --cpu-allreduce")
    if o.find_unused_parameters:
        raise UsageError("--find-unused-parameters cannot apply to --strategy localsgd: DDP "
                         "would all-reduce its used-parameter map every step, and a parameter "
                         "unused on some ranks would leave them averaging different sets; drop "
                         "it (every parameter must get a gradient), or use --strategy ddp")
    if o.precision == "16":
        raise UsageError("--precision 16 cannot apply to --strategy localsgd: the GradScaler "
                         "skips the step of a rank whose own gradients overflowed, and that "
                         "rank would miss the parameter average the others wait in; use "
                         "--precision bf16 or 32")
