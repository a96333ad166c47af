"""The training loop and exact evaluation. Strategy-agnostic: no ``if ddp`` anywhere here.

The hot path does no host synchronisation: losses accumulate in a device tensor and are read
(one all-reduce for loss, non-finite flag and stop request) only every ``--log-every`` steps.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dptrain.checkpoint import Position, Timing
from dptrain.config import TrainConfig
from dptrain.data.loader import Batch, ShardedLoader
from dptrain.errors import UsageError
from dptrain.metrics import Reporter
from dptrain.objective import Objective
from dptrain.optim import set_lr
from dptrain.precision import Precision
from dptrain.strategies import Strategy

__all__ = ["LoopResult", "Position", "StopRequest", "Stopwatch", "TrainStep", "Trainer",
           "epoch_steps"]


def epoch_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps in ``epochs`` passes (a fraction trains that share of the last pass,
    rounded up: at least one step). ``epoch_steps(0.85, 468) == 398``."""
    return max(1, math.ceil(round(epochs * steps_per_epoch, 6)))


@dataclass
class LoopResult:
    last_loss: float = math.nan
    timed_steps: int = 0
    timed_samples: int = 0
    train_time_s: float = 0.0
    stopped_by_signal: bool = False
    target_reached: dict[str, Any] | None = None  # {"step", "train_time_s", "accuracy"}


class TrainStep:
    """One optimizer step, exactly as training runs it (the bench harness times this too):
    set the step's learning rate, the strategy's forward/backward over the micro-batches,
    the strategy's optimizer step. Returns the micro-batches' losses (device tensors)."""

    def __init__(self, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer,
                 objective: Objective, precision: Precision,
                 lr_at: Callable[[int], float] | None = None) -> None:
        self.strategy, self.model, self.optimizer = strategy, model, optimizer
        self.objective, self.precision = objective, precision
        self.lr_at = lr_at

    def __call__(self, micro: list[Batch], step: int) -> list[torch.Tensor]:
        if self.lr_at is not None:
            set_lr(self.optimizer, self.lr_at(step))
        losses = self.strategy.forward_backward(self.model, micro, self.objective,
                                                self.precision)
        self.strategy.optimizer_step(self.optimizer, self.precision)
        return losses


class StopRequest:
    """SIGTERM/SIGUSR1 (SLURM preemption, the elastic agent) -> checkpoint, then stop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Stopwatch:
    """Training time excluding warm-up (the first step), evaluation and checkpoints."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self.synchronize = synchronize  # the strategy's: waits for the device's queued work
        self.elapsed = 0.0
        self.samples = 0
        self.steps = 0
        self._start: float | None = None
        self._started = False

    def after_step(self, samples: int) -> None:
        if not self._started:  # the first step (allocation, kernel selection) is warm-up
            self.synchronize()
            self._started = True
            self._start = time.perf_counter()
            return
        self.steps += 1
        self.samples += samples

    def now(self) -> float:
        """Timed seconds so far."""
        running = time.perf_counter() - self._start if self._start is not None else 0.0
        return self.elapsed + running

    @contextlib.contextmanager
    def paused(self) -> Any:
        if self._start is not None:
            self.synchronize()
            self.elapsed += time.perf_counter() - self._start
            self._start = None
        try:
            yield
        finally:
            if self._started:
                self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self.synchronize()
            self.elapsed += time.perf_counter() - self._start
            self._start = None


def check_fits(loader: Any, cfg: Any, world_size: int) -> None:
    """At least one optimizer step per epoch: the global batch fits the training split."""
    if loader.steps_per_epoch == 0:
        raise UsageError(
            f"the global batch ({loader.samples_per_step} = batch {cfg.batch_size} x "
            f"{world_size} processes x accum {cfg.accum}) is larger than the training split "
            f"({len(loader)} samples); lower --batch-size, --accum or the processes")


class Trainer:
    """Runs :class:`TrainStep` over the loader from a :class:`Position`: sync points, logs,
    checkpoints and epoch ends at their intervals, stop requests."""

    def __init__(self, cfg: TrainConfig, strategy: Strategy, reporter: Reporter,
                 step: TrainStep, loader: ShardedLoader, total_steps: int,
                 on_checkpoint: Callable[[Position], None],
                 on_epoch_end: Callable[[Position], None], stop: StopRequest,
                 on_step: Callable[[int], None] | None = None,
                 on_eval: Callable[[Position], float | None] | None = None,
                 earlier: Timing | None = None) -> None:
        self.cfg, self.strategy, self.reporter = cfg, strategy, reporter
        self.step, self.loader, self.total_steps = step, loader, total_steps
        self.on_checkpoint, self.on_epoch_end = on_checkpoint, on_epoch_end
        self.on_step = on_step or (lambda step: None)
        self.on_eval = on_eval  # --eval-every: evaluate, return the accuracy (or None)
        self.stop = stop
        self.device = strategy.device
        self.earlier = earlier or Timing()  # a resumed run's timed training before this process
        self.timer: Stopwatch | None = None  # this process's, while run() runs (checkpoints)
        # each micro-batch's loss since the last sync point, one slot per micro-batch (a single
        # copy on the hot path); read at the sync point to average, and to find the first
        # non-finite one exactly
        self.losses = torch.zeros(cfg.log_every * cfg.accum, device=self.device)
        self.n_losses = 0
        self.window_start = 0  # optimizer step of self.losses[0]

    def lr(self, step: int) -> float:
        return self.step.lr_at(step) if self.step.lr_at is not None else math.nan

    def record(self, losses: list[torch.Tensor]) -> None:
        for loss in losses:
            if self.n_losses == len(self.losses):  # a longer window than planned: grow it
                self.losses = torch.cat([self.losses, torch.zeros_like(self.losses)])
            self.losses[self.n_losses].copy_(loss)
            self.n_losses += 1

    def sync_point(self, stop: StopRequest, step: int) -> tuple[float, bool]:
        """One all-reduce of [loss sum, count, non-finite count, stop votes] for the window
        since the last sync point (which ends at optimizer step ``step``); raises on NaN/inf."""
        window = self.losses[:self.n_losses]
        finite = torch.isfinite(window)
        stats = torch.stack([torch.where(finite, window, 0.0).sum(),
                             torch.tensor(float(self.n_losses), device=self.device),
                             (~finite).sum().float(),
                             torch.tensor(float(stop.requested), device=self.device)])
        self.strategy.all_reduce_sum(stats)
        loss_sum, count, bad, stop_votes = stats.tolist()
        if bad > 0:
            local = (~finite).nonzero()
            where = (f"step {self.window_start + int(local[0]) // self.cfg.accum + 1}"
                     if len(local) else f"a step between {self.window_start + 1} and {step} "
                     "on another rank")
            raise UsageError(f"non-finite loss at {where}; lower --lr, or check the data; "
                             "the last good checkpoint is kept")
        self.n_losses = 0
        self.window_start = step
        return (loss_sum / count if count else math.nan), stop_votes > 0

    def run(self, pos: Position) -> LoopResult:
        cfg, loader = self.cfg, self.loader
        check_fits(loader, cfg, self.strategy.world_size)
        result = LoopResult()
        timer = self.timer = Stopwatch(self.strategy.synchronize)
        self.last_log = (0.0, 0)  # (timed seconds, timed samples) at the previous log line
        self.step.model.train()
        self.window_start, self.n_losses = pos.step, 0
        while pos.step < self.total_steps and not self._done(result):
            for micro in loader.epoch(pos.epoch, pos.step_in_epoch):
                self.record(self.step(micro, pos.step))
                pos.step += 1
                pos.step_in_epoch += 1
                timer.after_step(loader.samples_per_step)
                self.on_step(pos.step)
                if (self._boundary(pos, timer, result) or self._evaluate(pos, timer, result)
                        or pos.step >= self.total_steps):
                    break
            if pos.step_in_epoch >= loader.steps_per_epoch and not self._done(result):
                with timer.paused():  # an epoch ends however the last loop exited
                    self.on_epoch_end(pos)
                pos.epoch += 1
                pos.step_in_epoch = 0
        if self.n_losses:  # stopped at the target between log lines: log the last window
            self._boundary(pos, timer, result, force=True)
        timer.stop()
        result.train_time_s = timer.elapsed
        result.timed_steps = timer.steps
        result.timed_samples = timer.samples
        return result

    @staticmethod
    def _done(result: LoopResult) -> bool:
        return result.stopped_by_signal or result.target_reached is not None

    def _evaluate(self, pos: Position, timer: Stopwatch, result: LoopResult) -> bool:
        """``--eval-every``: evaluate (timer paused); True once ``--target-accuracy`` is met."""
        every, target = self.cfg.eval_every, self.cfg.target_accuracy
        if self.on_eval is None or result.stopped_by_signal:
            return False
        epoch_end = pos.step_in_epoch == self.loader.steps_per_epoch and self.cfg.eval_every_epoch
        if not (every and pos.step % every == 0) and not (epoch_end and target):
            return False
        with timer.paused():  # an epoch's last step: the epoch-end evaluation, done here
            accuracy = self.on_eval(pos)
        if target and accuracy is not None and accuracy >= target:
            so_far = self.earlier.plus(timer)
            result.target_reached = {"step": pos.step, "train_time_s": so_far.train_time_s,
                                     "accuracy": accuracy, "samples": so_far.samples}
            self.reporter.info(f"target accuracy {target:g} reached at step {pos.step} "
                               f"({accuracy:.4f}, {so_far.train_time_s:.2f} s of training)")
        return result.target_reached is not None

    def _boundary(self, pos: Position, timer: Stopwatch, result: LoopResult,
                  force: bool = False) -> bool:
        """Sync point, log line and checkpoint where one is due (``force``: a sync point and
        log line in any case); True when told to stop."""
        cfg = self.cfg
        ckpt_due = bool(cfg.ckpt_every) and pos.step % cfg.ckpt_every == 0
        if not (force or pos.step % cfg.log_every == 0 or pos.step == self.total_steps or ckpt_due
                or pos.step_in_epoch == self.loader.steps_per_epoch):
            return False
        loss, stop_now = self.sync_point(self.stop, pos.step)
        now = timer.now()
        dt, ds = now - self.last_log[0], timer.samples - self.last_log[1]
        self.last_log = (now, timer.samples)
        result.last_loss = loss
        self.reporter.train_step(pos.step, self.total_steps, pos.epoch, loss,
                                 self.lr(pos.step - 1), ds / dt if dt > 0 and ds else math.nan)
        if ckpt_due or stop_now:
            with timer.paused():
                self.on_checkpoint(pos)
        result.stopped_by_signal = stop_now
        return stop_now
