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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dptrain.config import TrainConfig
from dptrain.data.loader import Normalizer, ShardedLoader, eval_batches, eval_shard
from dptrain.errors import UsageError
from dptrain.metrics import Reporter
from dptrain.optim import direct_step, lr_at, set_lr
from dptrain.strategies import Strategy


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the next step's place in its epoch."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


@dataclass
class LoopResult:
    position: Position
    last_loss: float = math.nan
    timed_steps: int = 0
    timed_samples: int = 0
    train_time_s: float = 0.0
    stopped_by_signal: bool = False
    losses: list[tuple[int, float]] = field(default_factory=list)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if cfg.precision == "16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def evaluate(model: nn.Module, x: torch.Tensor | torch.utils.data.Dataset,
             y: torch.Tensor | None, strategy: Strategy, normalize: Normalizer,
             batch_size: int, precision_ctx: contextlib.AbstractContextManager
             ) -> tuple[float, float, int]:
    """Accuracy, mean loss and sample count over the whole split, each sample counted once.

    Each rank takes a contiguous shard (sizes differ by at most one, no padding, no
    duplicates); correct counts and loss sums are summed over ranks in one all-reduce.
    """
    start, end = eval_shard(len(x), strategy.rank, strategy.world_size)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=strategy.device)
    with torch.no_grad(), precision_ctx:
        for xb, target in eval_batches(x, y, start, end, batch_size, strategy.device):
            logits = model(normalize(xb)).float()
            totals[0] += (logits.argmax(1) == target).sum()
            totals[1] += F.cross_entropy(logits, target, reduction="sum").double()
            totals[2] += len(target)
    model.train(was_training)
    strategy.all_reduce_sum(totals)
    correct, loss_sum, count = totals.tolist()
    return correct / count, loss_sum / count, int(count)


class Stopwatch:
    """Training time excluding warm-up (the first step), evaluation and checkpoints."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.elapsed = 0.0
        self.samples = 0
        self.steps = 0
        self._start: float | None = None
        self._started = False

    def after_step(self, samples: int) -> None:
        if not self._started:  # the first step (allocation, kernel selection) is warm-up
            synchronize(self.device)
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
            synchronize(self.device)
            self.elapsed += time.perf_counter() - self._start
            self._start = None
        try:
            yield
        finally:
            if self._started:
                self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            synchronize(self.device)
            self.elapsed += time.perf_counter() - self._start
            self._start = None


class Trainer:
    """Owns one run's model, optimizer and loader; ``run`` trains from a :class:`Position`."""

    def __init__(self, cfg: TrainConfig, strategy: Strategy, reporter: Reporter,
                 model: nn.Module, optimizer: torch.optim.Optimizer, loader: ShardedLoader,
                 scaler: torch.amp.GradScaler, peak_lr: float, total_steps: int,
                 on_checkpoint: Callable[[Position], None],
                 on_epoch_end: Callable[[Position], None], stop: StopRequest) -> None:
        self.cfg, self.strategy, self.reporter = cfg, strategy, reporter
        self.model, self.optimizer, self.loader, self.scaler = model, optimizer, loader, scaler
        self.peak_lr, self.total_steps = peak_lr, total_steps
        self.on_checkpoint, self.on_epoch_end = on_checkpoint, on_epoch_end
        self.stop = stop
        self.device = strategy.device
        # each micro-batch's loss since the last sync point, one slot per micro-batch (a single
        # copy on the hot path); read at the sync point to average, and to find the first
        # non-finite one exactly
        self.losses = torch.zeros(cfg.log_every * cfg.accum, device=self.device)
        self.n_losses = 0
        self.window_start = 0  # optimizer step of self.losses[0]
        self.scaler_enabled = scaler.is_enabled()
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.optimizer_step = direct_step(optimizer)
        self.precision_ctx = (autocast(cfg, self.device) if cfg.precision != "32"
                              else contextlib.nullcontext())

    def lr(self, step: int) -> float:
        return lr_at(self.cfg, self.peak_lr, step, self.loader.steps_per_epoch, self.total_steps)

    def step(self, micro: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> None:
        """One optimizer step over ``accum`` micro-batches; gradients synchronised once."""
        cfg, model, opt = self.cfg, self.model, self.optimizer
        set_lr(opt, self.lr(step))
        last = len(micro) - 1
        for k, (xb, yb) in enumerate(micro):
            ctx = contextlib.nullcontext() if k == last else self.strategy.no_sync(model)
            with ctx:
                with self.precision_ctx:
                    loss = F.cross_entropy(model(xb), yb, label_smoothing=cfg.label_smoothing)
                # mean over the K micro-batches == mean over one K-times larger batch
                scaled = loss if len(micro) == 1 else loss / len(micro)
                if self.scaler_enabled:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            if self.n_losses == len(self.losses):  # a longer window than planned: grow it
                self.losses = torch.cat([self.losses, torch.zeros_like(self.losses)])
            self.losses[self.n_losses].copy_(loss.detach())
            self.n_losses += 1
        if self.scaler_enabled:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            self.optimizer_step()
        for p in self.params:  # zero_grad(set_to_none=True) without its per-call wrapper cost
            p.grad = None

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
        if loader.steps_per_epoch == 0:
            raise UsageError(
                f"the global batch ({loader.step_global} = batch {cfg.batch_size} x "
                f"{self.strategy.world_size} processes x accum {cfg.accum}) is larger than "
                f"the training split ({len(loader.x)} samples); lower --batch-size")
        result = LoopResult(position=pos)
        timer = Stopwatch(self.device)
        last_log = (0.0, 0)  # (timed seconds, timed samples) at the previous log line
        self.model.train()
        self.window_start, self.n_losses = pos.step, 0
        stop = self.stop
        while pos.step < self.total_steps and not result.stopped_by_signal:
            for micro in loader.epoch(pos.epoch, pos.step_in_epoch):
                self.step(micro, pos.step)
                pos.step += 1
                pos.step_in_epoch += 1
                timer.after_step(loader.step_global)
                ckpt_due = bool(cfg.ckpt_every) and pos.step % cfg.ckpt_every == 0
                if (pos.step % cfg.log_every == 0 or pos.step == self.total_steps
                        or ckpt_due or pos.step_in_epoch == loader.steps_per_epoch):
                    loss, stop_now = self.sync_point(stop, pos.step)
                    now = timer.now()
                    dt, ds = now - last_log[0], timer.samples - last_log[1]
                    last_log = (now, timer.samples)
                    result.last_loss = loss
                    result.losses.append((pos.step, loss))
                    self.reporter.train_step(pos.step, self.total_steps, pos.epoch, loss,
                                             self.lr(pos.step - 1),
                                             ds / dt if dt > 0 and ds else math.nan)
                    if ckpt_due or stop_now:
                        with timer.paused():
                            self.on_checkpoint(pos)
                    if stop_now:
                        result.stopped_by_signal = True
                        break
                if pos.step >= self.total_steps:
                    break
            if pos.step_in_epoch == loader.steps_per_epoch and not result.stopped_by_signal:
                with timer.paused():
                    self.on_epoch_end(pos)
                pos.epoch += 1
                pos.step_in_epoch = 0
        timer.stop()
        result.train_time_s = timer.elapsed
        result.timed_steps = timer.steps
        result.timed_samples = timer.samples
        return result
