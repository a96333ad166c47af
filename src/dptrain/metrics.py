"""Rank-0 side effects behind one object: log lines, ``metrics.jsonl``, ``summary.json``.

Every rank gets a :class:`Reporter`; only the main process's one writes. The loop calls it
unconditionally -- it never asks ``if rank == 0``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("dptrain")


def setup_logging(rank: int, world_size: int, quiet: bool = False) -> None:
    """Standard-library logging with a rank prefix when several processes run."""
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    root = logging.getLogger("dptrain")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.WARNING if quiet else logging.INFO)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class Progress:
    """A tqdm bar on a terminal, plain periodic lines otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stdout.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                # a pseudo-terminal may report a 0x0 size, with which tqdm draws nothing
                size = shutil.get_terminal_size((100, 24))
                self.bar = tqdm(total=total, initial=initial, unit="step",
                                ncols=size.columns or 100, nrows=max(size.lines, 24),
                                file=sys.stdout)

    def update(self, step: int, epoch: int, loss: float, samples_per_s: float) -> bool:
        """Advance the bar; False when there is no bar (the caller logs a line instead)."""
        if self.bar is None:
            return False
        self.bar.n = step
        self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", sps=f"{samples_per_s:,.0f}",
                             refresh=False)
        self.bar.refresh()
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Reporter:
    """Writes the run's outputs. Inactive (all methods no-ops) except on the main process."""

    def __init__(self, out: Path | None, *, active: bool, quiet: bool = False,
                 tensorboard: bool = False) -> None:
        self.active = active and out is not None
        self.out = out
        self.quiet = quiet
        self._metrics = None
        self._tb = None
        self._progress: Progress | None = None
        if self.active:
            out.mkdir(parents=True, exist_ok=True)
            if tensorboard:  # first: a missing package must not leave a half-started run
                self._tb = _tensorboard_writer(out / "tb")
            self._metrics = (out / "metrics.jsonl").open("a", buffering=1)

    def start_progress(self, total: int, initial: int) -> None:
        if self.active and not self.quiet:
            self._progress = Progress(total, initial, enabled=True)

    def info(self, message: str) -> None:
        if self.active:
            log.info(message)

    def warning(self, message: str) -> None:
        if self.active:
            log.warning("warning: %s", message)

    def metrics(self, step: int, epoch: int, **values: float) -> None:
        if not self.active:
            return
        record = {"step": step, "epoch": epoch, "time": round(time.time(), 3), **values}
        self._metrics.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def train_step(self, step: int, total: int, epoch: int, loss: float, lr: float,
                   samples_per_s: float) -> None:
        if not self.active:
            return
        self.metrics(step, epoch, loss=loss, lr=lr, samples_per_s=samples_per_s)
        if self._progress is not None and self._progress.update(step, epoch, loss,
                                                                samples_per_s):
            return
        log.info("epoch %d step %d/%d loss %.4f lr %.3g %.0f samples/s", epoch, step, total,
                 loss, lr, samples_per_s)

    def evaluation(self, step: int, epoch: int, accuracy: float, loss: float,
                   samples: int) -> None:
        if not self.active:
            return
        self.metrics(step, epoch, test_accuracy=accuracy, test_loss=loss, test_samples=samples)
        log.info("epoch %d step %d test accuracy %.4f loss %.4f (%d samples)", epoch, step,
                 accuracy, loss, samples)

    def summary(self, summary: dict[str, Any]) -> None:
        if self.active:
            write_json_atomic(self.out / "summary.json", summary)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(path: Path):  # noqa: ANN202 - optional dependency
    from dptrain.errors import UsageError

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: "
                         "pip install 'dptrain[tensorboard]'") from None
    return SummaryWriter(str(path))
