"""``dptrain.Session``: keep your own training loop; dptrain does the distributed parts.

Like Lightning Fabric or Accelerate, but built from the pieces ``dptrain train`` runs on, so a
script gets the same guarantees: the launcher environment read and checked once
(:func:`dptrain.dist.detect`), one resolved plan (:func:`dptrain.plan.make_plan`), the
strategy object for the model, the step and the state (:func:`dptrain.strategies.build`), the
index-sharded loaders (same order and drop-last as ``dptrain train``), exact evaluation,
atomic ``weights_only`` checkpoints written by rank 0, and rank-0 logging::

    import torch, torch.nn.functional as F, dptrain

    with dptrain.Session(seed=0, out="runs/mine") as s:        # joins the process group
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
        model, opt = s.setup(model, lambda params: torch.optim.SGD(params, lr=0.05))
        loader = s.loader(train_x, train_y, batch_size=64)     # this rank's shard
        start = s.resume(model, opt)                           # newest checkpoint in out, if any
        step = start.step
        for epoch in range(start.epoch, 3):
            for micro in loader.epoch(epoch, start.step_in_epoch if epoch == start.epoch else 0):
                for x, y in s.accumulate(model, micro):       # no_sync on all but the last
                    s.backward(F.cross_entropy(model(x), y) / len(micro))
                s.step(opt)
                step += 1
            s.log(step, loss=...)
        metrics = s.evaluate(model, test_x, test_y, step=step)  # each test sample once
        s.save(step, model, opt)

Launch it with ``dptrain run script.py --nproc N``, ``torchrun``, ``srun`` or plain ``python``.
Every method is called on every rank (collectives inside); only rank 0 writes. Nothing here
asks which strategy runs: the strategy object answers.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dptrain import checkpoint as ck
from dptrain import dist, strategies
from dptrain.config import SESSION_HEADER, TrainConfig, coerce, to_toml
from dptrain.data import batch as B
from dptrain.data.loader import Batch, DatasetLoader, Normalizer, ShardedLoader, eval_batches
from dptrain.errors import UsageError
from dptrain.evaluation import evaluate
from dptrain.metrics import Reporter, setup_logging
from dptrain.objective import Objective
from dptrain.plan import Plan, make_plan
from dptrain.precision import Precision
from dptrain.rundir import OutDirLock, check_out_dir, holds_run

__all__ = ["Resumed", "Session"]

# settings that belong to the launcher, not to the script's Session
_LAUNCHER_ONLY = ("nproc", "nnodes", "node_rank", "master_addr", "master_port", "max_restarts")
OptimizerArg = torch.optim.Optimizer | str | Callable[[Iterable[nn.Parameter]],
                                                      torch.optim.Optimizer]


@dataclass
class Resumed:
    """Where :meth:`Session.resume` continues: optimizer steps done and the next step's place
    in its epoch (all 0 when there was nothing to resume), the checkpoint it came from, and
    the ``extra`` state given to :meth:`Session.save`."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.path is not None


def _loggable(name: str, value: Any) -> Any:
    """One value for :meth:`Session.log`: a one-element tensor as its float; numbers, strings
    and booleans as they are; anything else a :class:`UsageError` that says what to log."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise UsageError(f"Session.log: {name} is a tensor of {value.numel()} values "
                             f"(shape {tuple(value.shape)}); log one number, e.g. "
                             f"{name}.mean()")
        return float(value.detach().float().item())
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise UsageError(f"Session.log: {name} is a {type(value).__name__}; log numbers, strings "
                     "or one-element tensors")


class Session:
    """One process's part in a data-parallel job driven by your own loop.

    Args:
        strategy: ``auto`` (ddp when launched as several processes, else single), ``single``,
            ``dp``, ``ddp``, or any strategy ``dptrain train --strategy`` has.
        seed: seeds torch at once (build the model after the Session: the same initial
            parameters on every rank and for every world size), the data order, and -- offset
            per rank after :meth:`setup` -- dropout.
        out: the run directory (``metrics.jsonl``, ``config.toml``, ``checkpoints/``), claimed
            on first use; ``None``: log to the console only, no checkpoints.
        precision: ``32``, ``bf16`` (autocast, :meth:`autocast`) or ``16`` (fp16 with a
            GradScaler, CUDA).
        device: ``auto``, ``cpu`` or ``cuda``; ``backend``: ``auto``, ``gloo``, ``nccl``.
        **options: any other ``dptrain train`` setting by its field name that applies to the
            strategy and the outputs, e.g. ``find_unused_parameters=True``, ``threads=2``,
            ``grad_clip=1.0``, ``timeout_s=60``, ``keep_ckpts=2``, ``quiet=True``,
            ``logger="jsonl,csv"``; and ``lr``, ``momentum``, ``weight_decay`` for an optimizer
            given by name to :meth:`setup`.

    Raises:
        UsageError: bad settings or launcher environment, as ``dptrain train`` would say.
    """

    def __init__(self, *, strategy: str = "auto", seed: int = 0, out: str | Path | None = None,
                 precision: str = "32", device: str = "auto", backend: str = "auto",
                 **options: Any) -> None:
        launcher = sorted(set(options) & set(_LAUNCHER_ONLY))
        if launcher:
            raise UsageError(f"dptrain.Session({launcher[0]}=...): a Session does not start "
                             "processes; launch the script with `dptrain run SCRIPT --nproc N` "
                             "(or torchrun/srun) instead")
        values = coerce({**options, "strategy": strategy, "seed": seed, "precision": precision,
                         "device": device, "backend": backend, "out": str(out or "")},
                        source="dptrain.Session")
        cfg = TrainConfig(**values).validate()
        if cfg.strategy == "pipeline":
            raise UsageError("dptrain.Session(strategy='pipeline'): a pipeline cuts the model "
                             "into stages that only dptrain's own step can drive (your loop's "
                             "forward cannot run it); use dptrain train or dptrain.fit for "
                             "pipeline, or another strategy in your own loop")
        env = dist.detect()
        self.plan: Plan = make_plan(cfg, env)
        self.env = self.plan.worker_env(env)
        # what the checkpoints' config records in place of dptrain train's model and dataset
        self.cfg = cfg.replace(model="session", dataset="session")
        setup_logging(self.env.rank, self.env.world_size, quiet=cfg.quiet)
        torch.set_num_threads(self.plan.threads_for(self.env.local_rank))
        self.strategy: strategies.Strategy = strategies.build(self.plan, self.env)
        self.strategy.setup()
        self.precision = Precision(cfg.precision, self.strategy.device)
        self.out = Path(out) if out else None
        self.reporter = Reporter(self.out, active=self.strategy.is_main, quiet=cfg.quiet,
                                 tensorboard=cfg.tensorboard, loggers=cfg.logger)
        self.checkpoints = (ck.Checkpointer(self.out / "checkpoints",
                                            is_main=self.strategy.is_main, keep=cfg.keep_ckpts)
                            if self.out else None)
        self._lock: list[OutDirLock] = []
        self._claimed = False
        self._started = False
        self._closed = False
        self._loader: ShardedLoader | None = None
        torch.manual_seed(cfg.seed)  # the model built next is the same on every rank

    # ------------------------------------------------------------------ where we are
    @property
    def rank(self) -> int:
        """This process's rank among the processes that feed data."""
        return self.strategy.rank

    @property
    def world_size(self) -> int:
        """Processes that feed data (1 for single and dp)."""
        return self.strategy.world_size

    @property
    def local_rank(self) -> int:
        return self.strategy.local_rank

    @property
    def is_main(self) -> bool:
        """True on the process that writes (rank 0)."""
        return self.strategy.is_main

    @property
    def device(self) -> torch.device:
        """Where this process keeps its model and data."""
        return self.strategy.device

    # ------------------------------------------------------------------ model and optimizer
    def setup(self, model: nn.Module, optimizer: OptimizerArg | None = None
              ) -> nn.Module | tuple[nn.Module, torch.optim.Optimizer]:
        """Move ``model`` to the device and wrap it for the strategy; build the optimizer.

        Args:
            model: the plain model (build it after creating the Session).
            optimizer: ``None`` (only the model is returned); a name (``sgd``, ``adam``,
                ``adamw``, ``adadelta``: built by the strategy from the Session's ``lr``,
                ``momentum``, ``weight_decay`` -- right for every strategy, sharded ones
                included); a factory ``fn(params) -> Optimizer`` called with the wrapped
                model's parameters; or an optimizer already built over ``model``'s parameters
                (fine for strategies that keep them, such as single, dp and ddp).

        Returns:
            The wrapped model, or ``(wrapped model, optimizer)``.
        """
        if not any(p.requires_grad for p in model.parameters()):
            raise UsageError("Session.setup: the model has no trainable parameters")
        self.cfg = self.cfg.replace(model=type(model).__qualname__)
        wrapped = self.strategy.wrap(model.to(self.device))
        if self.cfg.compile:
            wrapped = torch.compile(wrapped)
        # dropout: its own stream per rank (the initial parameters were drawn before)
        torch.manual_seed(self.cfg.seed * 1_000_003 + 7919 * (self.rank + 1))
        if optimizer is None:
            return wrapped
        return wrapped, self._optimizer(optimizer, wrapped)

    def _optimizer(self, optimizer: OptimizerArg, wrapped: nn.Module) -> torch.optim.Optimizer:
        if isinstance(optimizer, str):
            cfg = self.cfg.replace(optimizer=optimizer)
            cfg.replace(model="linear", dataset="synthetic").validate()  # the name, the lr
            self.cfg = cfg
            return self.strategy.build_optimizer(cfg, wrapped)
        self.strategy.grad_clip = self.cfg.grad_clip  # what build_optimizer would set
        if isinstance(optimizer, torch.optim.Optimizer):
            mine = {id(p) for p in wrapped.parameters()}
            if not all(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
                raise UsageError(
                    "Session.setup: the optimizer holds parameters that the wrapped model does "
                    f"not (strategy {self.strategy.name} replaces them); pass a factory instead: "
                    "s.setup(model, lambda params: torch.optim.SGD(params, lr=...))")
            return self.strategy.adopt_optimizer(optimizer)
        if callable(optimizer):
            built = optimizer(wrapped.parameters())
            if not isinstance(built, torch.optim.Optimizer):
                raise UsageError(f"Session.setup: the optimizer factory returned "
                                 f"{type(built).__name__}, not a torch.optim.Optimizer")
            return self.strategy.adopt_optimizer(built)
        raise UsageError(f"Session.setup: optimizer must be a name, a factory or a "
                         f"torch.optim.Optimizer, got {type(optimizer).__name__}")

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain model (no DDP/compile wrapper; the full parameters where sharded)."""
        return self.strategy.plain(model)

    # ------------------------------------------------------------------ data
    def loader(self, x: Any, y: torch.Tensor | None = None, *, batch_size: int, accum: int = 1,
               normalize: tuple[float | None, float | None] | None = None,
               augment: str = "none") -> ShardedLoader:
        """This rank's shard of a training split, exactly as ``dptrain train`` cuts it.

        Each epoch draws one permutation from ``(seed, epoch)``; an optimizer step takes
        ``batch_size x world_size x accum`` consecutive indices and this rank its slice, so the
        union over ranks is one process's batch of the global size; the tail that does not
        fill a step is dropped (another tail each epoch).

        Args:
            x: a tensor or a tuple/list/dict of tensors (moved to the device once), or a
                map-style ``Dataset`` (batches fetched by a DataLoader over this rank's indices).
            y: the targets (tensors only; a Dataset's samples carry their own).
            batch_size: samples per process per micro-batch.
            accum: micro-batches per optimizer step (see :meth:`accumulate`).
            normalize: ``(mean, std)`` of uint8 images: ``(x / 255 - mean) / std`` per batch.
            augment: ``none`` or ``shift`` (uint8 images, as ``--augment shift``).

        Returns:
            The loader: ``loader.epoch(e, start_step=0)`` yields, per optimizer step, the list
            of its ``accum`` micro-batches ``(x, y)``; ``steps_per_epoch``,
            ``samples_per_step``.
        """
        mean, std = normalize or (None, None)
        shard = {"batch_size": batch_size, "rank": self.rank, "world": self.world_size,
                 "accum": accum, "seed": self.cfg.seed, "normalize": Normalizer(mean, std)}
        if batch_size < 1 or accum < 1:
            raise UsageError(f"Session.loader: batch_size ({batch_size}) and accum ({accum}) "
                             "must be at least 1")
        if isinstance(x, torch.utils.data.Dataset):
            loader: ShardedLoader = DatasetLoader(x, device=self.device, **shard)
        else:
            n = B.num_samples(x)
            if y is not None and len(y) != n:
                raise UsageError(f"Session.loader: {n} inputs but {len(y)} targets")
            loader = ShardedLoader(B.to_device(x, self.device),
                                   None if y is None else y.to(self.device), augment=augment,
                                   **shard)
        if loader.steps_per_epoch == 0:
            raise UsageError(f"Session.loader: the global batch ({loader.samples_per_step} = "
                             f"batch {batch_size} x {self.world_size} processes x accum {accum}) "
                             f"is larger than the data ({len(loader)} samples); lower batch_size")
        self._loader = loader
        self.cfg = self.cfg.replace(batch_size=batch_size, accum=accum)
        return loader

    # ------------------------------------------------------------------ the step
    def accumulate(self, model: nn.Module, micro: list[Batch]) -> Iterator[Batch]:
        """Yield the micro-batches of one optimizer step; the backward of every one but the
        last runs under the strategy's ``no_sync`` (gradients are synchronised once).
        Scale each micro-batch's loss by ``1 / len(micro)`` to equal one larger batch."""
        last = len(micro) - 1
        for k, batch in enumerate(micro):
            if k == last:
                yield batch
            else:
                with self.strategy.no_sync(model):
                    yield batch

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Inside, backward accumulates gradients locally without communicating."""
        return self.strategy.no_sync(model)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's context for ``precision`` (nothing for ``32``)."""
        return self.precision.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the fp16 GradScaler when there is one."""
        self.precision.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the synchronised gradients (clipped to ``grad_clip`` if set) through the
        strategy, then drop them (no ``zero_grad`` needed)."""
        self.strategy.optimizer_step(optimizer, self.precision)

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """``tensor`` summed (``op="sum"``) or averaged (``"mean"``) over the ranks, in place."""
        if op not in ("sum", "mean"):
            raise UsageError(f"Session.all_reduce: op must be 'sum' or 'mean', got {op!r}")
        self.strategy.all_reduce_sum(tensor)
        return tensor.div_(self.world_size) if op == "mean" else tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return self.strategy.broadcast_object(obj)

    def barrier(self) -> None:
        self.strategy.barrier()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, x: Any, y: torch.Tensor | None = None, *,
                 loss: str = "cross_entropy", task: str = "auto", batch_size: int = 1000,
                 normalize: tuple[float | None, float | None] | None = None,
                 step: int | None = None, split: str = "test") -> dict[str, Any]:
        """Exact metrics over a whole split: each rank takes a contiguous shard (no padding,
        no duplicates), the metric sums are added over the ranks in one all-reduce.

        Args:
            model: the (wrapped) model; evaluated in eval mode, without gradients.
            x, y: tensors (or a structure of them), or a map-style Dataset.
            loss, task: as ``--loss``/``--task`` (``cross_entropy`` -> accuracy, ...).
            normalize: ``(mean, std)`` of uint8 images, as for :meth:`loader`.
            step: when given, the metrics are also logged (``test_*`` in ``metrics.jsonl``).

        Returns:
            ``samples``, ``loss`` and the task's metrics (``accuracy``, ``top5_accuracy``,
            ``mse``, ``r2``, ``f1_macro``, ...) -- equal to a one-process evaluation.
        """
        objective = Objective(loss, task)
        plain = self.strategy.plain(model)
        self.strategy.sync_buffers(plain)
        mean, std = normalize or (None, None)
        norm = Normalizer(mean, std)
        if not isinstance(x, torch.utils.data.Dataset):
            dtype = next((p.dtype for p in plain.parameters() if p.is_floating_point()),
                         torch.float32)
            x = B.to_device(x, self.device)
            y = objective.prepare_targets(None if y is None else y.to(self.device), split,
                                          dtype)
        self._check_output(plain, x, y, objective, norm)
        metrics = evaluate(plain, x, y, self.strategy, objective, self.precision, batch_size,
                           norm)
        if step is not None:
            self._start()
            self.reporter.evaluation(step, self._epoch(step), metrics, split)
        return metrics

    def _check_output(self, model: nn.Module, x: Any, y: torch.Tensor | None,
                      objective: Objective, norm: Normalizer) -> None:
        """One small batch through the model: its output fits the targets (and tells the
        objective the number of classes)."""
        xb, yb = next(iter(eval_batches(x, y, 0, 2, 2, self.device)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.precision.autocast():
                out = B.call_model(model, norm(xb))
        finally:
            model.train(was_training)
        objective.check_output(out, yb, [] if y is None or isinstance(
            x, torch.utils.data.Dataset) else [y])

    # ------------------------------------------------------------------ logging
    def log(self, step: int, **values: float | torch.Tensor) -> None:
        """Record ``values`` at ``step`` in ``metrics.jsonl`` (and the configured loggers) and
        as one console line -- on rank 0 only. Values are this rank's: average a loss over
        the ranks first with :meth:`all_reduce` (every rank calls ``log``)."""
        plain = {k: _loggable(k, v) for k, v in values.items()}
        self._start()
        self.reporter.metrics(step, self._epoch(step), **plain)
        self.reporter.info(f"step {step} " + " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k} {v}"
            for k, v in plain.items()))

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *,
             extra: dict[str, Any] | None = None) -> Path | None:
        """Write a checkpoint of everything exact resume needs (a collective: call it on every
        rank; rank 0 writes it atomically, ``torch.load(weights_only=True)``-loadable, with the
        unwrapped model under ``"model"``). ``extra``: your own state (tensors and plain
        containers, e.g. an lr scheduler's ``state_dict()``), given back by :meth:`resume`.

        Returns:
            The checkpoint's path on rank 0, ``None`` elsewhere.
        """
        if self.checkpoints is None:
            raise UsageError("Session.save needs a run directory: dptrain.Session(out=...)")
        self._start()
        if not self.strategy.params_finite(model):  # never replace a good checkpoint
            raise UsageError(f"non-finite parameters at step {step}; lower the learning rate; "
                             "the last good checkpoint is kept")
        self.strategy.sync_buffers(self.strategy.plain(model))
        state = ck.capture(self.strategy, model, optimizer, self.precision,
                           self._position(step), self.cfg)
        if extra:
            state["extra"] = extra
        path = self.checkpoints.save(state, step)
        self.strategy.barrier()
        return path

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer,
               path: str = "auto") -> Resumed:
        """Continue from a checkpoint: ``auto`` = the newest good one in ``out`` (corrupt ones
        skipped with a warning; nothing there: start from scratch), or a checkpoint path.
        Loads the model, the optimizer, the GradScaler and every rank's RNG through the
        strategy, after checking that they fit (call it after :meth:`loader`, so that the
        position is checked against the data too).

        Returns:
            A :class:`Resumed` (falsy when nothing was resumed) with ``step``, ``epoch`` and
            ``step_in_epoch`` to continue from, and the ``extra`` state saved with it.
        """
        if self.checkpoints is None:
            raise UsageError("Session.resume needs a run directory: dptrain.Session(out=...)")
        self._claim(path)
        opened: dict[str, dict[str, Any]] = {}

        def locate() -> str | None:
            found = ck.find_resume(self.checkpoints, path, info=self.reporter.info,
                                   warn=self.reporter.warning)
            if found is None:
                return None
            opened[found[0]] = found[1]
            return found[0]

        where = self.strategy.main_only(locate)
        if where is None:
            self._start()
            return Resumed()
        state = opened.pop(where, None) or ck.load(Path(where))  # opened on the main rank
        saved = state.get("config", {})
        here = self.cfg if self._loader is not None else self.cfg.replace(
            batch_size=saved.get("batch_size", self.cfg.batch_size),
            accum=saved.get("accum", self.cfg.accum))
        ck.check_compatible(state, here, where, self.world_size)
        ck.check_model(state, where, self.strategy.plain(model), self.cfg)
        pos = ck.Position(**state["position"])
        if self._loader is not None:
            ck.check_position(state, where, pos.step, self._loader.steps_per_epoch)
        ck.restore(state, where, self.strategy, model, optimizer, self.precision, self.cfg)
        self._start()
        self.reporter.info(f"resumed from {where} at step {pos.step} (epoch {pos.epoch}, step "
                           f"{pos.step_in_epoch} of it)")
        return Resumed(pos.step, pos.epoch, pos.step_in_epoch, str(where),
                       dict(state.get("extra") or {}))

    def _position(self, step: int) -> ck.Position:
        if self._loader is None:
            return ck.Position(step=step)
        epoch, in_epoch = divmod(step, self._loader.steps_per_epoch)
        return ck.Position(step=step, epoch=epoch, step_in_epoch=in_epoch)

    def _epoch(self, step: int) -> int:
        return self._position(step).epoch

    # ------------------------------------------------------------------ the run directory
    def _claim(self, resume: str = "") -> None:
        """On first use of ``out``: rank 0 checks it (a new run never writes into another
        run's directory) and locks it; every rank gets the verdict."""
        if self._claimed or self.out is None:
            return
        self._claimed = True
        out = self.out
        if not resume and dist.restart_count() > 0:  # an elastic restart continues the run
            resume = "auto"

        def claim() -> None:
            if resume != "auto":
                found = holds_run(out) if out.is_dir() else []
                if found and not resume:
                    raise UsageError(
                        f"dptrain.Session(out={str(out)!r}): it already holds a run "
                        f"({', '.join(found)}); call session.resume(model, optimizer) before "
                        "logging or saving to continue it, or choose another out")
            check_out_dir(out, resume)
            self._lock.append(OutDirLock(out))

        self.strategy.main_only(claim)

    def _start(self) -> None:
        """Start the outputs (``config.toml``, the loggers) once every check has passed."""
        if self._started:
            return
        self._claim()
        self._started = True
        if self.out is not None:
            self.reporter.start(self._config_toml())
            if self.checkpoints is not None:
                self.checkpoints.sweep()

    def _config_toml(self) -> str:
        """The Session's resolved settings; the model, data and loop are the script's, so
        ``dptrain train --config`` cannot replay it: ``dptrain run`` the script can."""
        script = sys.argv[0] if sys.argv and sys.argv[0] else "<interactive>"
        args = sys.argv[1:]
        replay = " ".join(["dptrain run", script, "--nproc", str(self.env.local_world_size),
                           *args])
        settings = to_toml(self.cfg).splitlines()[1:]
        return "\n".join([
            f"{SESSION_HEADER}: the settings of a script's own training loop (not a `dptrain "
            "train` run:",
            "# its model, data and loop are the script's). Replay: dptrain run SCRIPT --nproc N "
            "ARGS (as below)",
            "[session]",
            f"script = {_toml_str(script)}",
            f"argv = [{', '.join(_toml_str(a) for a in args)}]",
            f"world_size = {self.world_size}",
            f"strategy = {_toml_str(self.strategy.name)}",
            f"launcher = {_toml_str(self.env.source)}",
            f"replay = {_toml_str(replay)}",
            "",
            "[session.settings]",
            *settings, ""])

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Close the outputs, release ``out`` and leave the process group (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.reporter.close()
            for held in self._lock:
                held.release()
        finally:
            self.strategy.teardown()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Session(strategy={self.strategy.name!r}, rank={self.rank}, world_size="
                f"{self.world_size}, device={str(self.device)!r}, out={str(self.out or '')!r})")


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
