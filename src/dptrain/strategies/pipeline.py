"""Pipeline parallelism: the model cut into S stages on S processes, times D replicas.

``--strategy pipeline --stages S --microbatches M --pipeline-schedule {gpipe,1f1b}`` runs
``S x D`` processes on a 2-D device mesh (``init_device_mesh(device type, (D, S))``, dims
``dp`` x ``pp``; "cpu" for gloo): global rank ``r`` is stage ``r % S`` of replica ``r // S``.
Every stage of a replica receives the same batches (``data_rank`` = the replica); stage 0
feeds the inputs in, the last stage computes the loss against the targets.

* **Cutting.** The model must be an ``nn.Sequential``; a stage is a run of its top-level
  children. Where stages 2..S begin comes from ``--split-points a,b``, else the model's own
  ``pipeline_split_points`` attribute (a list of names, or ``{stages: names}``; the built-in
  models have one), else the trainable-parameter count (the cut that minimises the largest
  stage; parameter-free layers such as ReLU stay with the layer before them). Every stage must
  hold trainable parameters; a model that cannot be cut so is a :class:`UsageError` naming why.
* **The step.** Each loader micro-batch (``--accum K`` of them per optimizer step) goes through
  one ``torch.distributed.pipelining`` schedule step (``ScheduleGPipe`` / ``Schedule1F1B`` over
  a manual ``PipelineStage``), cut into M pieces. This torch's schedules would divide the
  stage's *whole* gradient by M after every step (``scale_grads=True``), which is right for one
  step but wrong once K steps accumulate, so the schedule runs with ``scale_grads=False`` and
  the loss function returns ``loss / (M K)`` instead: the gradient is then the mean over the
  ``M K`` equal pieces, i.e. over the whole batch, as one process computes it. Then each
  stage's gradients are averaged over its D replicas (one flat all-reduce on the ``dp``
  group per optimizer step) and the stage's own optimizer steps.
* **Metadata.** Each stage's input and output shapes are given to ``PipelineStage`` (static
  mode), taken from one eval-mode, no-grad forward of the first piece through the whole
  model on every rank. Left to infer them itself, the stage would run a training-mode forward
  on uninitialised tensors, which can write garbage into BatchNorm running statistics.
* **The whole model.** Every rank keeps the full model it was given; its stage is a view of
  its own children. :meth:`plain` (a collective) broadcasts each stage's parameters and
  buffers from replica 0 into the other ranks' copies, once per optimizer step (cached), so
  evaluation, FLOP counting and ``checkpoints/last.pt`` see the trained whole model. The
  checkpoint's optimizer state is gathered into the globally indexed format a plain optimizer
  over the whole model writes, so pipeline, single and ddp checkpoints resume one another.
* **Bubble.** The theoretical idle fraction is ``(S-1)/(M+S-1)``. The measured one is, per
  stage, ``1 - compute / step``: *compute* = wall time inside the stage's
  ``forward_one_chunk``/``backward_one_chunk`` (and the last stage's loss), *step* = wall
  time of the schedule steps of one optimizer step (without the replica all-reduce and the
  optimizer); the median over the optimizer steps after the first, reported per stage (replica
  0's) and as their mean. On CUDA the device is synchronised around each timed chunk.
* Refused: ``--precision 16`` (GradScaler's skip-the-step decision would be taken per stage),
  ``--compile``, inputs that are not one tensor, and tensors other than one between stages.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
from torch import nn

from dptrain.errors import UsageError
from dptrain.strategies.base import Strategy, refuse_strided_parameters, with_own_kernels
from dptrain.strategies.ddp import DistributedDataParallel

if TYPE_CHECKING:
    from dptrain.config import TrainConfig
    from dptrain.data.loader import Batch
    from dptrain.objective import Objective
    from dptrain.precision import Precision

SCHEDULES = ("gpipe", "1f1b")


# ---------------------------------------------------------------------- cutting the model
@dataclass(frozen=True)
class Split:
    """The stages: each one's top-level child names, and how the cut was chosen."""

    stages: tuple[tuple[str, ...], ...]
    how: str  # "--split-points" | "the model's pipeline_split_points" | "parameter count"

    @property
    def points(self) -> list[str]:
        """Where stages 2..S begin (the ``--split-points`` that reproduce this cut)."""
        return [names[0] for names in self.stages[1:]]


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def split_model(model: nn.Module, stages: int, split_points: str = "") -> Split:
    """Cut ``model`` (an ``nn.Sequential``) into ``stages`` runs of its top-level children;
    any cut that cannot work is a :class:`UsageError` saying why."""
    what = f"the model ({type(model).__name__})"
    if not isinstance(model, nn.Sequential):
        raise UsageError(f"--strategy pipeline cuts an nn.Sequential into stages; {what} is not "
                         "one: return an nn.Sequential (its children run in order), or use "
                         "another --strategy")
    children = [(n, _trainable(m)) for n, m in model.named_children()]
    with_params = [n for n, w in children if w]
    if len(with_params) < stages:
        fix = (f"use --stages {len(with_params)}" if len(with_params) >= 2 else
               "use another --strategy")
        raise UsageError(f"{what} has {len(with_params)} top-level layer(s) with trainable "
                         f"parameters ({', '.join(with_params) or 'none'}); it cannot be cut "
                         f"into {stages} stages that each hold parameters: {fix}, or a model "
                         "with more layers")
    named, how = _named_points(model, stages, split_points)
    if named is None:
        return Split(_by_parameters(children, stages), "parameter count")
    return Split(_cut_at(children, named, how, stages), how)


def _named_points(model: nn.Module, stages: int, split_points: str
                  ) -> tuple[list[str] | None, str]:
    """The names where stages 2..S begin, if ``--split-points`` or the model names them."""
    if split_points.strip():
        return [s.strip() for s in split_points.split(",") if s.strip()], "--split-points"
    own = getattr(model, "pipeline_split_points", None)
    if isinstance(own, Mapping):
        own = own.get(stages)
    if own is None:
        return None, "parameter count"
    if isinstance(own, str) or not isinstance(own, Sequence):
        raise UsageError(f"the model's pipeline_split_points must be a list of module names "
                         f"(or {{stages: names}}), not {type(own).__name__}")
    return [str(s) for s in own], "the model's pipeline_split_points"


def _cut_at(children: list[tuple[str, int]], points: list[str], how: str, stages: int
            ) -> tuple[tuple[str, ...], ...]:
    names = [n for n, _ in children]
    if len(points) != stages - 1:
        raise UsageError(f"{how} names {len(points)} module(s) ({', '.join(points)}); {stages} "
                         f"stages need {stages - 1}: the names where stages 2..{stages} begin")
    unknown = [p for p in points if p not in names]
    if unknown:
        raise UsageError(f"{how}: {unknown[0]!r} is not a top-level module of the model; its "
                         f"top-level modules are {', '.join(names)}")
    at = [names.index(p) for p in points]
    if at != sorted(set(at)) or at[0] == 0:
        raise UsageError(f"{how} {','.join(points)}: give distinct names in the model's order, "
                         f"none of them its first module ({names[0]})")
    bounds = [0, *at, len(names)]
    cut = tuple(tuple(names[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        if not any(w for _, w in children[a:b]):
            raise UsageError(f"{how} {','.join(points)}: stage {i + 1} ({', '.join(cut[i])}) "
                             "would hold no trainable parameters; move the split points")
    return cut


def _by_parameters(children: list[tuple[str, int]], stages: int
                   ) -> tuple[tuple[str, ...], ...]:
    """The contiguous cut minimising the largest stage's parameter count (a small dynamic
    programme over the layers with parameters; parameter-free layers stay with the layer
    before them, leading ones with the first)."""
    items = [i for i, (_, w) in enumerate(children) if w]
    w = [children[i][1] for i in items]
    m, inf = len(w), float("inf")
    prefix = [0]
    for x in w:
        prefix.append(prefix[-1] + x)
    best = [[inf] * (m + 1) for _ in range(stages + 1)]
    back = [[0] * (m + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for j in range(k, m + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    starts, j = [], m
    for k in range(stages, 0, -1):
        j = back[k][j]
        starts.append(j)
    bounds = [0, *[items[i] for i in reversed(starts[:-1])], len(children)]
    return tuple(tuple(n for n, _ in children[a:b]) for a, b in zip(bounds, bounds[1:],
                                                                     strict=False))


class StageModule(nn.Module):
    """One stage: a run of the model's own children (shared with the whole model), called in
    order under the run's autocast; the forward/backward it does is what the clock times."""

    def __init__(self, pieces: list[nn.Module],
                 autocast: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        self.autocast = autocast

    def forward(self, x: torch.Tensor) -> Any:
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            for piece in self.pieces:
                x = piece(x)
        return x


# ---------------------------------------------------------------------- timing
class StageClock:
    """Compute seconds inside the stage per optimizer step, against the step's wall time."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self.synchronize = synchronize
        self.steps: list[tuple[float, float]] = []  # (compute s, step s) per optimizer step
        self.compute = 0.0
        self._start = 0.0

    def begin(self) -> None:
        self.synchronize()
        self.compute, self._start = 0.0, time.perf_counter()

    def end(self) -> None:
        self.synchronize()
        self.steps.append((self.compute, time.perf_counter() - self._start))

    def timed(self, fn: Callable[[], Any]) -> Any:
        self.synchronize()
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.synchronize()
            self.compute += time.perf_counter() - t

    def bubble(self) -> float | None:
        """Median idle fraction ``1 - compute/step`` over the steps after the first."""
        values = [max(0.0, 1.0 - c / s) for c, s in self.steps[1:] if s > 0]
        return statistics.median(values) if values else None


def _timed_stage_class() -> type:
    from torch.distributed.pipelining import PipelineStage

    class TimedStage(PipelineStage):
        """A manual ``PipelineStage`` whose chunk computations are timed by ``clock``."""

        clock: StageClock

        def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            return self.clock.timed(lambda: super(TimedStage, self).forward_one_chunk(
                *args, **kwargs))

        def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            return self.clock.timed(lambda: super(TimedStage, self).backward_one_chunk(
                *args, **kwargs))

    return TimedStage


# ---------------------------------------------------------------------- the strategy
class PipelineParallel(DistributedDataParallel):
    name = "pipeline"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stages = self.options.stages
        self.microbatches = self.options.microbatches
        self.stage_index = self.rank % self.stages
        self.clock = StageClock(self.synchronize)
        self.schedule: Any = None
        self._version = 0  # optimizer steps and loads so far: the plain copy's cache key
        self._plain_version = -1
        self._scale = 1.0
        self._pieces: list[torch.Tensor] = []

    @property
    def batch_multiple(self) -> int:
        return self.microbatches  # each micro-batch the same size: stages agree on p2p shapes

    @property
    def data_rank(self) -> int:
        return self.rank // self.stages

    @property
    def data_world(self) -> int:
        return self.world_size // self.stages

    @property
    def is_last_stage(self) -> bool:
        return self.stage_index == self.stages - 1

    def setup(self) -> None:
        o = self.options
        if o.pipeline_schedule not in SCHEDULES:
            raise UsageError(f"--pipeline-schedule {o.pipeline_schedule!r}: use one of "
                             f"{', '.join(SCHEDULES)}")
        if o.pipeline_schedule == "1f1b" and self.microbatches < self.stages:
            raise UsageError(f"--pipeline-schedule 1f1b needs at least as many micro-batches as "
                             f"stages: --microbatches {self.microbatches} < --stages "
                             f"{self.stages}; raise --microbatches, or use gpipe")
        if o.precision == "16":
            raise UsageError("--precision 16 cannot apply to --strategy pipeline (GradScaler "
                             "would skip steps stage by stage); use --precision bf16 or 32")
        super().setup()
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.data_world, self.stages),
                                     mesh_dim_names=("dp", "pp"))
        self.pp_group = self.mesh.get_group("pp")
        self.dp_group = self.mesh.get_group("dp")

    def teardown(self) -> None:
        # the schedule, stage and mesh hold the subgroups: let them go before the groups do
        self.schedule = self.mesh = self.pp_group = self.dp_group = None
        import gc

        gc.collect()
        super().teardown()

    # --- the model
    def check_model(self, model: nn.Module) -> None:
        split_model(model, self.stages, self.options.split_points)  # cuttable, or refused
        # gloo's point-to-point sends take contiguous tensors: channels_last activations fail
        # inside torch's schedule (and their gradients come back channels_last)
        refuse_strided_parameters(model, self.name, "sends activations between stages as "
                                  "contiguous tensors")

    def wrap(self, model: nn.Module) -> nn.Module:
        self.split = split_model(model, self.stages, self.options.split_points)
        self.template = model  # the whole model; this rank's stage is a view of its children
        names = self.split.stages[self.stage_index]
        self.stage = StageModule([model.get_submodule(n) for n in names])
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.stage_keys = [[k for k in model.state_dict() if k.split(".")[0] in set(stage)]
                           for stage in self.split.stages]
        return self.stage

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.plain(model)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Nothing to hold back: the stages exchange activations, not gradients, and the
        replicas average once per optimizer step in :meth:`forward_backward`."""
        yield

    def plain(self, model: nn.Module) -> nn.Module:
        """The whole model with every stage's current tensors (replica 0's), refreshed once
        per optimizer step -- a collective: every rank calls it."""
        if self._plain_version != self._version:
            sd = self.template.state_dict()
            for s, keys in enumerate(self.stage_keys):
                _broadcast_coalesced([sd[k] for k in keys], src=s)
            self._plain_version = self._version
        return self.template

    def sync_buffers(self, model: nn.Module) -> None:
        """Nothing to do: :meth:`plain` already gave every rank replica 0's buffers."""

    def bn_statistics(self) -> str:
        return ("per micro-batch (each of the M pieces is normalised by its own statistics); "
                "replica 0's running statistics are kept")

    # --- the step
    def build_optimizer(self, cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
        """This stage's optimizer, its groups those of a plain optimizer over the whole
        model (weight decay, no-decay) restricted to the stage's parameters."""
        from dptrain.optim import build_optimizer, param_groups

        if model is not self.stage:
            raise UsageError("--compile cannot apply to --strategy pipeline (the schedule "
                             "calls each stage itself); drop --compile")
        self.grad_clip = cfg.grad_clip
        full = param_groups(self.template, cfg.weight_decay, cfg.no_decay_norm_bias)
        full = full if isinstance(full[0], dict) else [{"params": full}]
        self.full_groups = [[self.names[id(p)] for p in g["params"]] for g in full]
        mine = {id(p) for p in self.stage.parameters()}
        groups, self.group_of = [], []  # group_of[j]: the full group of local group j
        for gi, g in enumerate(full):
            params = [p for p in g["params"] if id(p) in mine]
            if params:
                groups.append({**g, "params": params})
                self.group_of.append(gi)
        return build_optimizer(cfg, groups, self.device)

    def forward_backward(self, model: nn.Module, micro: list[Batch], objective: Objective,
                         precision: Precision) -> list[torch.Tensor]:
        """One schedule step per loader micro-batch (each cut into M pieces), then the
        stage's gradients averaged over the replicas. Returns the micro-batches' losses on
        the last stage (the mean of their pieces'), nothing elsewhere."""
        if self.schedule is None:
            self._build_schedule(micro[0][0], objective, precision)
        self._scale = float(self.microbatches * len(micro))
        losses = []
        self.clock.begin()
        for inputs, targets in micro:
            self._pieces = []
            if self.stage_index == 0:
                self.schedule.step(inputs, return_outputs=False)
            elif self.is_last_stage:
                self.schedule.step(target=targets, return_outputs=False)
                losses.append(torch.stack(self._pieces).mean())
            else:
                self.schedule.step(return_outputs=False)
        self.clock.end()
        self._average_over_replicas()
        return losses

    def _loss(self, output: Any, target: Any) -> torch.Tensor:
        """The schedule's loss function: the objective's mean loss of one piece, scaled by
        1/(M K) so that the accumulated gradient is the whole batch's mean."""
        def compute() -> torch.Tensor:
            with self.precision.autocast():
                return self.objective.loss(output, target)

        loss = self.clock.timed(compute)
        self._pieces.append(loss.detach())
        return loss / self._scale

    def _build_schedule(self, x: Any, objective: Objective, precision: Precision) -> None:
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

        if not isinstance(x, torch.Tensor):
            raise UsageError(f"--strategy pipeline feeds one input tensor to its first stage; "
                             f"this dataset's inputs are a {type(x).__name__}: use a dataset "
                             "with tensor inputs, or another --strategy")
        self.objective, self.precision = objective, precision
        self.stage.autocast = precision.autocast
        inputs, outputs = self._stage_io(x[: len(x) // self.microbatches], precision)
        stage = _timed_stage_class()(self.stage, self.stage_index, self.stages, self.device,
                                     input_args=inputs, output_args=outputs,
                                     group=self.pp_group)
        stage.clock = self.clock
        kind = ScheduleGPipe if self.options.pipeline_schedule == "gpipe" else Schedule1F1B
        self.schedule = kind(stage, self.microbatches, loss_fn=self._loss, scale_grads=False)

    def _stage_io(self, piece: torch.Tensor, precision: Precision) -> tuple[Any, Any]:
        """This stage's example input and output for one piece: one eval-mode, no-grad
        forward through the whole model (no state changes), every rank alike."""
        was_training, h, io = self.template.training, piece, []
        self.template.eval()
        try:
            with torch.no_grad(), precision.autocast():
                for i, names in enumerate(self.split.stages):
                    before = h
                    for n in names:
                        h = self.template.get_submodule(n)(h)
                    if i < self.stages - 1 and not isinstance(h, torch.Tensor):
                        raise UsageError(f"stage {i + 1} of the model ends in {names[-1]}, "
                                         f"whose output is a {type(h).__name__}; a stage must "
                                         "pass one tensor on: move the split points")
                    io.append((_example(before, grad=i > 0), _example(h, grad=True)))
        finally:
            self.template.train(was_training)
        return io[self.stage_index]

    def _average_over_replicas(self) -> None:
        """Each stage's gradients averaged over its D replicas: one flat all-reduce."""
        if self.data_world == 1:
            return
        grads = [p.grad for p in self.stage.parameters() if p.grad is not None]
        for same in _by_dtype(grads):
            flat = torch._utils._flatten_dense_tensors(same)
            tdist.all_reduce(flat, group=self.dp_group)
            flat.div_(self.data_world)
            for g, f in zip(same, torch._utils._unflatten_dense_tensors(flat, same),
                            strict=True):
                g.copy_(f)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, precision: Precision) -> None:
        super().optimizer_step(optimizer, precision)
        self._version += 1

    def clip_gradients(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                       precision: Precision) -> torch.Tensor:
        """Clip by the whole model's gradient norm: each stage's squared norm, summed over
        the stages of the replica (every replica holds the same averaged gradients)."""
        precision.unscale(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        local = (torch.nn.utils.get_total_norm(grads, foreach=True) if grads
                 else torch.zeros((), device=self.device))
        total = local.double().square().reshape(1)
        tdist.all_reduce(total, group=self.pp_group)
        norm = total.sqrt().to(local.dtype).reshape(())
        torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm, foreach=True)
        return norm

    # --- the state a checkpoint holds: the whole model, a plain optimizer's format
    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   precision: Precision) -> dict[str, Any]:
        return {"model": self.plain(model).state_dict(),
                "optimizer": self._global_optimizer_state(optimizer),
                "scaler": precision.state_dict(), "rng": self.rng_state(),
                "world_size": self.data_world}

    def _global_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Every stage's optimizer state (replica 0's), on the main rank, indexed as a
        plain optimizer over the whole model indexes it; ``{}`` elsewhere (a collective)."""
        local = optimizer.state_dict()
        order = [self.names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        by_name = {order[i]: _to_cpu(s) for i, s in local["state"].items()}
        hyper = {self.group_of[j]: {k: v for k, v in g.items() if k != "params"}
                 for j, g in enumerate(local["param_groups"])}
        parts: list[Any] = [None] * self.world_size if self.is_main else None
        tdist.gather_object((by_name, hyper) if self.data_rank == 0 else None, parts, dst=0)
        if not self.is_main:
            return {}
        state, groups, index = {}, {}, 0
        for part in filter(None, parts):
            state.update(part[0])
            for gi, h in part[1].items():
                groups.setdefault(gi, h)
        out: dict[str, Any] = {"state": {}, "param_groups": []}
        for gi, names in enumerate(self.full_groups):
            ids = list(range(index, index + len(names)))
            out["state"].update({i: state[n] for i, n in zip(ids, names, strict=True)
                                 if n in state})
            out["param_groups"].append({**groups[gi], "params": ids})
            index += len(names)
        return out

    def load_state_dict(self, state: dict[str, Any], model: nn.Module,
                        optimizer: torch.optim.Optimizer, precision: Precision) -> None:
        Strategy.load_state_dict(self, {**state, "optimizer": self._local_optimizer_state(
            state["optimizer"], optimizer), "rng": {"cpu": []}}, model, optimizer, precision)
        self._version += 1  # the stage's tensors came from the checkpoint: refresh the copy
        self._load_pipeline_rng(state["rng"])

    def _local_optimizer_state(self, saved: dict[str, Any], optimizer: torch.optim.Optimizer
                               ) -> dict[str, Any]:
        """A whole-model optimizer state -> this stage's part, in its local indexing."""
        groups = saved.get("param_groups") or []
        if len(groups) != len(self.full_groups) or any(
                len(g["params"]) != len(n) for g, n in zip(groups, self.full_groups,
                                                            strict=True)):
            raise UsageError(f"its optimizer state does not fit this optimizer ({len(groups)} "
                             f"parameter group(s) saved, {len(self.full_groups)} here, or "
                             "other sizes)")
        by_name = {n: saved["state"][i] for g, names in zip(groups, self.full_groups,
                                                             strict=True)
                   for i, n in zip(g["params"], names, strict=True) if i in saved["state"]}
        out: dict[str, Any] = {"state": {}, "param_groups": []}
        index = 0
        for j, g in enumerate(optimizer.param_groups):
            ids = []
            for p in g["params"]:
                if self.names[id(p)] in by_name:
                    out["state"][index] = by_name[self.names[id(p)]]
                ids.append(index)
                index += 1
            hyper = {k: v for k, v in groups[self.group_of[j]].items() if k != "params"}
            out["param_groups"].append({**hyper, "params": ids})
        return with_own_kernels(out, optimizer)

    def rng_state(self) -> dict[str, Any]:
        """``cpu``/``cuda``: one stream per replica (its first stage's), the checkpoint
        format's rule; ``pipeline``: every rank's, restored when the layout is the same."""
        every = super().rng_state()
        first = range(0, self.world_size, self.stages)
        return {"cpu": [every["cpu"][r] for r in first],
                "cuda": [every["cuda"][r] for r in first],
                "pipeline": {"stages": self.stages, **every}}

    def _load_pipeline_rng(self, rng: dict[str, Any]) -> None:
        """Each rank's own stream where the checkpoint has this layout; else every rank
        keeps the fresh stream it was seeded with."""
        pipe = rng.get("pipeline") or {}
        if pipe.get("stages") == self.stages and len(pipe.get("cpu", [])) == self.world_size:
            Strategy.load_rng_state(self, {"cpu": pipe["cpu"], "cuda": pipe.get("cuda", [])})

    def params_finite(self, model: nn.Module) -> bool:
        bad = torch.tensor([float(not all(bool(torch.isfinite(p).all())
                                          for p in self.stage.parameters()))])
        self.all_reduce_sum(bad)
        return bad.item() == 0

    # --- the summary
    def describe(self) -> dict[str, Any]:
        """Stages, micro-batches, schedule, the split and the bubble: theoretical and
        measured per stage (a collective: each rank's figures are gathered)."""
        s, m = self.stages, self.microbatches
        mine = {"stage": self.stage_index, "replica": self.data_rank,
                "bubble": self.clock.bubble(),
                "step_s": _median([t for _, t in self.clock.steps[1:]]),
                "compute_s": _median([c for c, _ in self.clock.steps[1:]])}
        ranks = self.all_gather_object(mine)
        first = sorted((r for r in ranks if r["replica"] == 0), key=lambda r: r["stage"])
        measured = [r["bubble"] for r in first]
        split = getattr(self, "split", None)
        return {**Strategy.describe(self), "stages": s, "microbatches": m,
                "pipeline_schedule": self.options.pipeline_schedule,
                "data_parallel_replicas": self.data_world,
                "split_points": split.points if split else None,
                "split_by": split.how if split else None,
                "stage_layers": [list(n) for n in split.stages] if split else None,
                "bubble_theoretical": (s - 1) / (m + s - 1),
                "bubble_measured": (statistics.mean(measured)
                                    if all(b is not None for b in measured) else None),
                "bubble_measured_per_stage": measured,
                "stage_step_s": [r["step_s"] for r in first],
                "stage_compute_s": [r["compute_s"] for r in first]}


def _example(x: Any, grad: bool) -> Any:
    """An example tensor as the schedule will see it in training: activations coming from a
    stage with parameters require grad (so that their gradient is sent back), data do not."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().requires_grad_(grad and x.is_floating_point())


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def _broadcast_coalesced(tensors: list[torch.Tensor], src: int) -> None:
    """``tensors`` (the same names and shapes on every rank) become rank ``src``'s: one
    broadcast per dtype."""
    for same in _by_dtype(tensors):
        flat = torch._utils._flatten_dense_tensors(same)
        tdist.broadcast(flat, src=src)
        for t, f in zip(same, torch._utils._unflatten_dense_tensors(flat, same), strict=True):
            t.copy_(f)


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
