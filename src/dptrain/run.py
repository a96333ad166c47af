"""One process's part of a training run, as a short sequence of named steps.

:func:`train` is what every worker runs, however it was started (in-process, the elastic
launcher, torchrun, srun, the legacy launcher): join the group, claim the run directory, then
:meth:`Run.execute` -- data -> model -> loader -> checkpoint found and checked -> outputs
started -> wrap -> optimizer -> restore -> train -> final evaluation and checkpoint -> summary.
Nothing here asks which strategy runs: the strategy object answers.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from dptrain import affinity, dist, heap, strategies
from dptrain import checkpoint as ck
from dptrain.config import TrainConfig, to_toml
from dptrain.data import batch as B
from dptrain.data import shared
from dptrain.data.datasets import Splits, load_splits
from dptrain.data.loader import DatasetLoader, Normalizer, ShardedLoader
from dptrain.errors import UsageError
from dptrain.evaluation import evaluate
from dptrain.loop import (
    LoopResult,
    Position,
    StopRequest,
    Trainer,
    TrainStep,
    check_fits,
    epoch_steps,
)
from dptrain.metrics import Reporter, build_summary, setup_logging
from dptrain.models import build_model, has_batchnorm, memory_format
from dptrain.objective import Objective
from dptrain.optim import lr_at, scaled_lr
from dptrain.plan import Plan
from dptrain.precision import Precision
from dptrain.profiling import StepProfiler
from dptrain.rundir import OutDirLock, check_out_dir, default_out

__all__ = ["Run", "default_out", "train"]


def train(plan: Plan, env: dist.DistEnv | None = None, *, started_at: float | None = None,
          count_comm: bool = False) -> dict[str, Any]:
    """Run (or resume) training in this process and return the summary (on every rank)."""
    started_at = time.time() if started_at is None else started_at
    env = plan.worker_env(dist.detect() if env is None else env)
    setup_logging(env.rank, env.world_size, quiet=plan.cfg.quiet)
    affinity.bind(plan.cfg.cpu_bind, env.local_rank,
                  [plan.threads_for(r) for r in range(env.local_world_size)], plan.device)
    torch.set_num_threads(plan.threads_for(env.local_rank))
    heap.configure(plan.cfg.cpu_heap)
    strategy = strategies.build(plan, env, count_comm=count_comm)
    strategy.setup()
    lock: list[OutDirLock] = []
    opened: dict[str, dict[str, Any]] = {}  # --resume PATH, loaded once on the main rank
    run: Run | None = None
    try:
        restart = dist.restart_count()
        resume = plan.cfg.resume or ("auto" if restart > 0 else "")
        out = Path(strategy.broadcast_object(plan.cfg.out or default_out()))
        strategy.main_only(lambda: _claim(out, resume, lock, opened))
        run = Run(plan.cfg.replace(out=str(out)), strategy, started_at=started_at,
                  restart=restart, resume=resume, opened=opened)
        with StopRequest() as stop:  # from here on, SIGTERM means "checkpoint, then stop"
            return run.execute(stop)
    finally:
        if run is not None:
            run.reporter.close()
            run.release()
        for held in lock:
            held.release()
        strategy.teardown()


def check_inputs(cfg: TrainConfig) -> None:
    """In this process, on the CPU, without a process group: the model builds, the data
    loads, one small batch goes through the model and its output fits the targets (and the
    loss). Bad input raises :class:`UsageError`; nothing is written. For commands whose
    workers would otherwise each fail on it in turn (``dptrain bench``)."""
    from dptrain.strategies.single import SingleDevice

    cfg = cfg.replace(device="cpu", strategy="single", out="", quiet=True)
    run = Run(cfg, SingleDevice(dist.DistEnv(), torch.device("cpu")), started_at=time.time(),
              restart=0, resume="")
    model = run.build_model()
    run.strategy.check_model(model)
    run.load_data(model)


def _claim(out: Path, resume: str, lock: list[OutDirLock],
           opened: dict[str, dict[str, Any]]) -> None:
    """On the main rank: open ``--resume PATH`` (before ``--out`` is created; kept in
    ``opened``), check ``--out``, then lock it."""
    if resume not in ("", "auto"):
        opened[resume] = ck.load(Path(resume))
    check_out_dir(out, resume)
    lock.append(OutDirLock(out))


class Run:
    """One run in one process: its configuration, strategy, outputs, and the steps."""

    def __init__(self, cfg: TrainConfig, strategy: strategies.Strategy, *, started_at: float,
                 restart: int, resume: str,
                 opened: dict[str, dict[str, Any]] | None = None) -> None:
        self.cfg, self.strategy = cfg, strategy
        self.device = strategy.device
        self.started_at, self.restart, self.resume = started_at, restart, resume
        self.opened = opened or {}
        self.reporter = Reporter(Path(cfg.out), active=strategy.is_main, quiet=cfg.quiet,
                                 tensorboard=cfg.tensorboard, loggers=cfg.logger)
        self.objective = Objective(cfg.loss, cfg.task, label_smoothing=cfg.label_smoothing)
        self.precision = Precision(cfg.precision, self.device)
        self.memory_format = torch.contiguous_format  # build_model: --channels-last
        self.memory_format_why = ""
        self.checkpoints = ck.Checkpointer(Path(cfg.out) / "checkpoints",
                                           is_main=strategy.is_main, keep=cfg.keep_ckpts)
        self.has_bn = False
        self.last_eval: dict[str, Any] = {}
        # timed training before this process (a resume): seconds and samples, from the
        # checkpoint, so that time to --target-accuracy counts the whole run
        self.earlier = ck.Timing()
        self.trainer: Trainer | None = None
        self.resume_changes: dict[str, list[Any]] = {}
        self.history: list[dict[str, Any]] = []  # ck.settings_history

    def execute(self, stop: StopRequest) -> dict[str, Any]:
        cfg, strategy = self.cfg, self.strategy
        model = self.build_model()
        strategy.check_model(model)
        splits = self.load_data(model)
        found = self.find_checkpoint()
        if found and cfg.keep_global_batch:
            cfg = self.cfg = ck.keep_global_batch(found[1], cfg, found[0],
                                                  strategy.data_world, strategy.batch_multiple)
        loader = strategy.attach_loader(self.build_loader(splits))
        check_fits(loader, cfg, strategy.world_size)  # before the run directory changes
        self.splits, self.loader = splits, loader
        peak_lr = scaled_lr(cfg, loader.samples_per_step)
        total = epoch_steps(cfg.epochs, loader.steps_per_epoch)
        total = min(total, cfg.max_steps) if cfg.max_steps else total
        self.check_checkpoint(found, model, total, loader.steps_per_epoch)
        if cfg.target_accuracy and self.objective.task == "regression":
            raise UsageError("--target-accuracy needs a task with an accuracy (classification "
                             "or multilabel); this run is a regression: drop it")
        done = self.already_complete(found, total)
        if done is not None:
            return done
        # every check has passed: outputs may change now
        self.reporter.start(ck.history_header(self.history) + to_toml(cfg),
                            found[1]["position"]["step"] if found else 0)
        self.checkpoints.sweep()
        self.model = strategy.wrap(model)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.optimizer = strategy.build_optimizer(cfg, self.model)
        torch.manual_seed(cfg.seed * 1_000_003 + 7919 * (strategy.rank + 1))  # dropout, per rank
        pos = self.restore(found)
        step = TrainStep(strategy, self.model, self.optimizer, self.objective, self.precision,
                         lambda s: lr_at(cfg, peak_lr, s, loader.steps_per_epoch, total))
        trainer = self.trainer = Trainer(
            cfg, strategy, self.reporter, step, loader, total, on_checkpoint=self.save_checkpoint,
            on_epoch_end=self.epoch_end, stop=stop, on_eval=self.evaluate_due,
            earlier=self.earlier)
        self.reporter.info(f"{strategy.name} on {self.device} x {strategy.world_size} "
                           f"({strategy.backend}), model {cfg.model}, loss {cfg.loss} "
                           f"({self.objective.task}), global batch {loader.samples_per_step}, "
                           f"lr {peak_lr:g}, {total} steps ({loader.steps_per_epoch}/epoch)")
        self.reporter.start_progress(total, pos.step)
        with StepProfiler(Path(cfg.out) / "profile", cfg.profile, active=strategy.is_main,
                          device=self.device, log=self.reporter.info) as profiler:
            trainer.on_step = lambda _step: profiler.step()
            result = trainer.run(pos)
        self.finish(result, pos)
        summary = build_summary(self, result, pos, self.last_eval, loader.steps_per_epoch,
                                loader.samples_per_step, peak_lr, found and found[0])
        summary.update(self.outcome(result, pos, summary.get("test_accuracy")))
        summary.update(self.memory())
        summary.update(self.data_summary())
        summary.update(self.flops(summary["train_samples_per_s"]))
        self.reporter.summary(summary)
        return summary

    def already_complete(self, found: tuple[str, dict[str, Any]] | None, total: int
                         ) -> dict[str, Any] | None:
        """Resuming a run that trained all its steps and wrote its summary: there is nothing
        to do, and its outputs stay as they are (a second final evaluation and a summary of no
        timed step would replace the real one). Returns that summary; ``None``: train."""
        if found is None or found[1]["position"]["step"] < total:
            return None
        path = Path(self.cfg.out) / "summary.json"

        def finished() -> dict[str, Any] | None:
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError):
                return None  # killed between its last checkpoint and its summary: finish it
            return summary if isinstance(summary, dict) and summary.get("steps") == total else None

        summary = self.strategy.main_only(finished)
        if summary is not None:
            self.reporter.info(f"{self.cfg.out}: the run is complete ({total} steps, "
                               f"{path} written); nothing to train: raise --max-steps or "
                               "--epochs to continue it")
        return summary

    def outcome(self, result: LoopResult, pos: Position, final: float | None
                ) -> dict[str, Any]:
        """The summary's ``target_accuracy``/``target_reached`` (a target met only at the
        final evaluation, ``final``, counts: no earlier one was due) and
        ``resumed_with_changes``, where they apply."""
        out: dict[str, Any] = {}
        target = self.cfg.target_accuracy
        if target:
            reached = result.target_reached  # None: not reached
            if reached is None and final is not None and final >= target:
                reached = {"step": pos.step,
                           "train_time_s": self.earlier.train_time_s + result.train_time_s,
                           "accuracy": final,
                           "samples": self.earlier.samples + result.timed_samples,
                           "at": "the final evaluation"}
            out.update(target_accuracy=target, target_reached=reached)
        if self.resume_changes:
            out["resumed_with_changes"] = self.resume_changes
        if self.history:
            out["settings_history"] = self.history
        return out

    def memory(self) -> dict[str, Any]:
        """Per-rank bytes of parameters, gradients and optimizer state (the tensors each rank
        holds), and peak memory; the top-level figures are rank 0's."""
        mine = self.strategy.memory(self.model, self.optimizer)
        ranks = self.strategy.all_gather_object(mine)
        return {**ranks[0], "memory_per_rank": ranks}

    def flops(self, samples_per_s: float | None) -> dict[str, Any]:
        """Model FLOPs per sample, the measured peak for this precision and the MFU
        (counted and measured on the main rank, shared with the others)."""
        from dptrain.flops import summary_fields

        plain = self.strategy.plain(self.model)  # every rank (a collective where sharded)

        def count() -> dict[str, Any]:
            try:
                return summary_fields(plain, self.example_inputs,
                                      samples_per_s=samples_per_s,
                                      world_size=self.strategy.world_size,
                                      precision=self.cfg.precision, device=self.device)
            except Exception as exc:  # noqa: BLE001 - a model FLOP counting cannot trace
                self.reporter.warning(f"FLOPs not counted ({type(exc).__name__}: {exc})")
                return {"model_flops_per_sample": None, "mfu": None}

        return self.strategy.main_only(count)

    def release(self) -> None:
        """Drop the wrapped model and the optimizer before the process group is destroyed.
        DDP's reducer (and ZeRO's optimizer) hold the gloo group: freed after it, the group's
        destructor would run in their deallocation, with the GIL held, and join a gloo thread
        that waits for the GIL to free a finished collective's tensors -- a deadlock at exit."""
        import gc

        self.model = self.optimizer = None
        gc.collect()

    # ------------------------------------------------------------------ data and model
    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.cfg.seed)  # identical initial parameters for every world size
        model = build_model(self.cfg.model, self.cfg.model_args)
        if not any(p.requires_grad for p in model.parameters()):
            raise UsageError(f"--model {self.cfg.model} has no trainable parameters; return a "
                             "model with parameters that require grad")
        self.has_bn = has_batchnorm(model)
        if self.cfg.sync_bn and not self.has_bn:
            self.reporter.warning(f"--sync-bn: --model {self.cfg.model} has no BatchNorm layer, "
                                  "so there is nothing to synchronise; the flag changes nothing")
        self.memory_format, self.memory_format_why = memory_format(
            self.cfg.channels_last, self.cfg.model, model, self.device, self.strategy.name)
        return model.to(self.device, memory_format=self.memory_format)

    def load_data(self, model: torch.nn.Module) -> Splits:
        """Both splits, their inputs in the model's dtype and targets checked against the
        task, on the device; then one dry-run batch through the model."""
        def build() -> Splits:
            return load_splits(self.cfg.dataset, self.cfg.data_root, log=self.reporter.info)

        # tensors of a plug-in or MNIST: built once per node, shared by its processes
        splits = (shared.load_once_per_node(build, self.strategy)
                  if shared.wanted(self.strategy) and self.cfg.dataset != "synthetic"
                  else build())
        splits = splits.hold_out(self.cfg.val_fraction, self.cfg.seed)
        self.float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                                torch.float32)
        extra = B.float_dtypes((splits.train_x, splits.test_x)) - {self.float_dtype}
        if extra and not splits.is_dataset:
            self._warn_cast(extra)
        if splits.is_dataset:
            self.prepare = _BatchPreparer(self.objective, self.float_dtype, self._warn_cast)
        else:
            self.prepare = None
            splits = splits.replace(
                train_x=self._cast(splits.train_x), test_x=self._cast(splits.test_x),
                train_y=self.objective.prepare_targets(splits.train_y, "train",
                                                       self.float_dtype),
                test_y=self.objective.prepare_targets(splits.test_y, "test", self.float_dtype))
            if splits.has_val:
                splits = splits.replace(val_x=self._cast(splits.val_x),
                                        val_y=self.objective.prepare_targets(
                                            splits.val_y, "val", self.float_dtype))
        if self.cfg.augment != "none" and not (isinstance(splits.train_x, torch.Tensor)
                                               and splits.train_x.dtype == torch.uint8):
            raise UsageError(f"--augment {self.cfg.augment} shifts uint8 images; this dataset's "
                             "inputs are not: drop --augment")
        splits = splits.to(self.device)
        self._normalization = splits.normalization()
        self.normalize = Normalizer(splits.mean, splits.std, self.memory_format)
        self.example_inputs = _dry_run(model, splits, self.objective, self.normalize,
                                       self.prepare, self.device, self.cfg)
        return splits

    def _cast(self, x: Any) -> Any:
        return B.cast_floats(x, self.float_dtype)

    def _warn_cast(self, dtypes: set[torch.dtype]) -> None:
        self.reporter.warning(f"the dataset's inputs are {', '.join(sorted(map(str, dtypes)))}; "
                              f"converted once to the model's {self.float_dtype}")

    def data_info(self) -> dict[str, Any]:
        """What a checkpoint and the summary record about the data: the normalisation that
        inference must apply (see ``dptrain.load_model``) and the validation hold-out."""
        return {"normalization": dict(self._normalization),
                "val_fraction": self.cfg.val_fraction}

    def build_loader(self, splits: Splits) -> ShardedLoader:
        s = self.strategy
        shard = {"batch_size": self.cfg.batch_size, "rank": s.data_rank, "world": s.data_world,
                 "accum": self.cfg.accum, "seed": self.cfg.seed, "normalize": self.normalize}
        if splits.is_dataset:
            return DatasetLoader(splits.train_x, device=self.device, prepare=self.prepare,
                                 num_workers=self.cfg.workers, **shard)
        return ShardedLoader(splits.train_x, splits.train_y, augment=self.cfg.augment, **shard)

    # ------------------------------------------------------------------ checkpoints
    def find_checkpoint(self) -> tuple[str, dict[str, Any]] | None:
        """The checkpoint to resume from, loaded once per process (nothing written yet)."""
        if not self.resume:
            return None
        def locate() -> str | None:
            if self.resume in self.opened:
                return self.resume
            found = ck.find_resume(self.checkpoints, self.resume, info=self.reporter.info,
                                   warn=self.reporter.warning)
            if found is not None:
                self.opened[found[0]] = found[1]
            return None if found is None else found[0]

        path = self.strategy.main_only(locate)
        if path is None:
            return None
        state = self.opened.pop(path, None) or ck.load(Path(path))  # opened on the main rank
        return path, state

    def check_checkpoint(self, found: tuple[str, dict[str, Any]] | None,
                         model: torch.nn.Module, total: int, steps_per_epoch: int) -> None:
        """The checkpoint fits this run: settings, global batch, tensors, position -- checked
        before anything in the run directory changes."""
        if found is None:
            return
        path, state = found
        ck.check_compatible(state, self.cfg, path, self.strategy.data_world,
                            self.strategy.batch_multiple)
        ck.check_model(state, path, model, self.cfg)
        ck.check_position(state, path, total, steps_per_epoch)
        self.resume_changes = ck.changed_settings(state, self.cfg, total, steps_per_epoch)
        self.history = ck.settings_history(state, self.resume_changes)
        if self.resume_changes:
            step = state["position"]["step"]
            self.reporter.warning("resuming with other settings than the checkpoint's run ("
                                  + ", ".join(f"{k} {new!r}, was {old!r}" for k, (old, new)
                                              in self.resume_changes.items())
                                  + f"): steps after {step} use them; summary.json records "
                                  "this as resumed_with_changes")

    def restore(self, found: tuple[str, dict[str, Any]] | None) -> Position:
        if found is None:
            return Position()
        path, state = found
        ck.restore(state, path, self.strategy, self.model, self.optimizer, self.precision,
                   self.cfg)
        pos = Position(**state["position"])
        self.earlier = ck.Timing.saved(state)
        self.reporter.info(f"resumed from {path} at step {pos.step} (epoch {pos.epoch}, "
                           f"step {pos.step_in_epoch} of it)")
        return pos

    def save_checkpoint(self, pos: Position) -> None:
        if not self.strategy.params_finite(self.model):  # never replace a good checkpoint
            raise UsageError(f"non-finite parameters at step {pos.step}; lower --lr; the last "
                             "good checkpoint is kept")
        self.strategy.sync_buffers(self.strategy.plain(self.model))
        state = ck.capture(self.strategy, self.model, self.optimizer, self.precision, pos,
                           self.cfg)  # collective: on every rank
        state["normalization"] = self.data_info()["normalization"]  # for load_model/predict
        timer = self.trainer.timer if self.trainer is not None else None
        state["timing"] = self.earlier.plus(timer).to_dict()
        if self.history:
            state["settings_history"] = self.history
        self.checkpoints.save(state, pos.step)
        self.strategy.barrier()

    # ------------------------------------------------------------------ evaluation
    def run_eval(self, pos: Position, split: str = "test") -> None:
        """Evaluate ``split`` ("test", or "val": the --val-fraction hold-out)."""
        plain = self.strategy.plain(self.model)
        self.strategy.sync_buffers(plain)
        x, y = ((self.splits.val_x, self.splits.val_y) if split == "val"
                else (self.splits.test_x, self.splits.test_y))
        metrics = evaluate(plain, x, y, self.strategy, self.objective, self.precision,
                           self.cfg.eval_batch_size, self.normalize, self.prepare)
        if split == "val":
            self.last_val = {"step": pos.step, "metrics": metrics}
        else:
            self.last_eval = {"step": pos.step, "metrics": metrics}
        self.reporter.evaluation(pos.step, pos.epoch, metrics, split=split)

    def epoch_end(self, pos: Position) -> None:
        if self.cfg.eval_every_epoch:
            self.evaluate_due(pos)

    def evaluate_due(self, pos: Position) -> float | None:
        """The periodic evaluation (hold-out if any, else test), once per step; its
        accuracy (None for tasks without one)."""
        split = "val" if self.splits.has_val else "test"
        done = getattr(self, "last_val", {}) if split == "val" else self.last_eval
        if done.get("step") != pos.step:
            self.run_eval(pos, split)
            done = self.last_val if split == "val" else self.last_eval
        return done["metrics"].get("accuracy")

    def finish(self, result: LoopResult, pos: Position) -> None:
        """Final evaluation and checkpoint -- or, stopped by a signal, only the checkpoint
        the loop already wrote. With a validation hold-out: the hold-out at the last step
        (unless just done), then the test split, once."""
        if result.stopped_by_signal:
            self.reporter.warning(f"stop requested (signal): checkpoint written at step "
                                  f"{pos.step}; continue with --resume auto")
            return
        if self.splits.has_val and getattr(self, "last_val", {}).get("step") != pos.step:
            self.run_eval(pos, "val")
        if self.last_eval.get("step") != pos.step:
            self.run_eval(pos)
        self.save_checkpoint(pos)

    def data_summary(self) -> dict[str, Any]:
        """summary.json's data fields: the normalisation, and the hold-out's last metrics."""
        out: dict[str, Any] = {"normalization": dict(self._normalization)}
        if self.splits.has_val:
            out["val_fraction"] = self.cfg.val_fraction
            out["val_metrics"] = getattr(self, "last_val", {}).get("metrics")
        return out


class _BatchPreparer:
    """A Dataset's batches, on the CPU: inputs cast to the model's dtype (warned once),
    targets checked against the task (the tensor path checks whole splits instead)."""

    def __init__(self, objective: Objective, dtype: torch.dtype, warn: Any) -> None:
        self.objective, self.dtype, self.warn, self.warned = objective, dtype, warn, False
        self.labels: list[torch.Tensor] = []

    def __call__(self, x: Any, y: Any) -> tuple[Any, Any]:
        extra = B.float_dtypes(x) - {self.dtype}
        if extra and not self.warned:
            self.warned = True
            self.warn(extra)
        x = B.cast_floats(x, self.dtype)
        y = self.objective.prepare_targets(y, "batch", self.dtype)
        if y is not None and self.objective.task == "classification" and self.objective.width:
            self.objective.check_labels([y])
        return x, y


def _dry_run(model: torch.nn.Module, splits: Splits, objective: Objective, normalize: Any,
             prepare: Any, device: torch.device, cfg: TrainConfig) -> Any:
    """One small batch through the model (eval mode, no grad: no state changes) to check that
    the model takes the data, and that its output fits the targets and the labels the
    classes -- before any training, not after it."""
    from dptrain.data.loader import eval_batches

    n = min(len(splits.train_x) if splits.is_dataset else B.num_samples(splits.train_x),
            max(2, min(cfg.batch_size, 8)))
    xb, yb = next(iter(eval_batches(splits.train_x, splits.train_y, 0, n, n, device, prepare)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = B.call_model(model, normalize(xb))
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise UsageError(f"--model {cfg.model} cannot take the batches of --dataset "
                         f"{cfg.dataset} ({type(exc).__name__}: {first}); make the model's "
                         "input match the data") from None
    finally:
        model.train(was_training)
    all_targets = [] if splits.is_dataset else [t for t in (splits.train_y, splits.test_y)
                                                if t is not None]
    objective.check_output(out, yb, all_targets)
    return normalize(xb)  # one batch of model inputs (for counting FLOPs)
