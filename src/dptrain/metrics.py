"""Rank-0 side effects behind one object: log lines, the loggers (``metrics.jsonl``, ...),
``summary.json``.

Every rank gets a :class:`Reporter`; only the main process's one writes. The loop calls it
unconditionally -- it never asks ``if rank == 0``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("dptrain")


def setup_logging(rank: int, world_size: int, quiet: bool = False) -> None:
    """Standard-library logging with a rank prefix when several processes run: progress on
    stdout, warnings and errors on stderr (where ``2>&1``-less pipelines and CI logs keep them
    apart from the figures)."""
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    for handler in (progress, problems):
        handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    root = logging.getLogger("dptrain")
    root.handlers[:] = [progress, problems]
    root.propagate = False
    root.setLevel(logging.WARNING if quiet else logging.INFO)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


HEADLINE = ("accuracy", "top5_accuracy", "f1_micro", "f1_macro", "mse", "mae", "r2", "loss")


def format_metrics(metrics: dict[str, Any]) -> str:
    """``accuracy 0.9812 loss 0.0613``: the scalar metrics in a fixed order."""
    return " ".join(f"{k} {metrics[k]:.4f}" for k in HEADLINE
                    if isinstance(metrics.get(k), int | float))


def build_summary(run: Any, result: Any, pos: Any, last_eval: dict[str, Any],
                  steps_per_epoch: int, samples_per_step: int, peak_lr: float,
                  resumed_from: str | None) -> dict[str, Any]:
    """``summary.json``: the contract's keys, the final metrics, what ran and how fast.

    ``run`` is the :class:`~dptrain.run.Run` (its config, strategy, objective, start time)."""
    import time

    import torch

    from dptrain import affinity, heap

    cfg, strategy, metrics = run.cfg, run.strategy, last_eval.get("metrics", {})
    summary = {
        "test_accuracy": metrics.get("accuracy"),
        "test_loss": metrics.get("loss"),
        "test_samples": metrics.get("samples"),
        "test_metrics": metrics,
        "train_samples_per_s": (result.timed_samples / result.train_time_s
                                if result.train_time_s > 0 else None),
        "train_time_s": result.train_time_s,
        "timed_steps": result.timed_steps,
        "wall_time_s": time.time() - run.started_at,
        "steps": pos.step,
        "epochs": round(pos.step / steps_per_epoch, 4),
        "world_size": strategy.world_size,
        "global_batch": samples_per_step,
        "effective_lr": peak_lr,
        "final_loss": result.last_loss,
        "bn_statistics": strategy.bn_statistics() if run.has_bn else "none",
        "model": cfg.model, "dataset": cfg.dataset, "loss": cfg.loss,
        "task": run.objective.task, "precision": cfg.precision, "accum": cfg.accum,
        "seed": cfg.seed, "resumed_from": resumed_from, "restarts": run.restart,
        "stopped_by_signal": result.stopped_by_signal,
        "torch_version": str(torch.__version__), "out": cfg.out, "cpu_heap": heap.describe(),
        "cpu_bind": affinity.describe(), "memory_format": run.memory_format_why,
        **strategy.describe(),
    }
    if strategy.comm is not None:
        summary["allreduce_calls"] = strategy.comm.calls
        summary["allreduce_bytes"] = strategy.comm.bytes
    return summary


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


class MetricsFile:
    """``metrics.jsonl``, each line written whole or not at all: a failed write (a full disk)
    is cut back to the last complete line and reported as one :class:`UsageError`, so what
    was written stays readable and a later ``--resume auto`` appends onto a clean file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self.fd).st_size
        if size:  # a record cut by an earlier crash (kill -9 mid-write): drop the fragment
            with path.open("rb") as fh:
                fh.seek(max(0, size - (1 << 16)))
                tail = fh.read()
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size < 1 << 16
                                                                   else size)
                os.ftruncate(self.fd, keep)

    def append(self, line: str) -> None:
        self._write(line.encode())

    def _write(self, data: bytes) -> None:
        from dptrain.checkpoint import write_fix
        from dptrain.errors import UsageError

        before = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:  # a short write is followed by the one that says why
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, before)
            raise UsageError(f"cannot write {self.path}: {exc.strerror or exc}; "
                             f"{write_fix(exc)} (the lines already written are intact; continue "
                             "with --resume auto)") from None

    def close(self) -> None:
        os.close(self.fd)


class Reporter:
    """Writes the run's outputs. Inactive (all methods no-ops) except on the main process.

    Nothing is written before :meth:`start`, which the run calls once every check has passed
    (so a refused resume leaves the run directory exactly as it was). The records go to the
    configured experiment loggers (:mod:`dptrain.loggers`: ``--logger jsonl,csv,mlflow,
    tensorboard``; ``tensorboard=True`` is the older ``--tensorboard`` and adds that one)."""

    def __init__(self, out: Path | None, *, active: bool, quiet: bool = False,
                 tensorboard: bool = False, loggers: str | list[str] = "jsonl") -> None:
        from dptrain import loggers as lg

        self.active = active and out is not None
        self.out = out
        self.quiet = quiet
        self.logger_names = lg.parse(loggers, tensorboard=tensorboard)
        lg.check_available(self.logger_names)  # on every rank: all fail alike, nothing hangs
        self._loggers: list[lg.Logger] = []
        self._started = False
        self._progress: Progress | None = None

    def start(self, config_toml: str, continue_from: int | None = None) -> None:
        """Write ``config.toml`` and open the loggers (``metrics.jsonl``, ...).
        ``continue_from``: the step this run continues from (0: from scratch); in a run
        directory that already holds a run, the records past it are dropped first."""
        if not self.active:
            return
        import tomllib

        from dptrain import loggers as lg

        lg.preload(self.logger_names)  # first: a missing package must not half-start a run
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = (self.out / "config.toml").exists()
        # the loggers first: one that cannot open its store leaves no config.toml behind
        self._loggers = lg.open_loggers(self.logger_names, self.out, resumed=resumed,
                                        purge_after=continue_from if resumed else None)
        write_text_atomic(self.out / "config.toml", config_toml)
        self._started = True
        config = tomllib.loads(config_toml)
        for logger in self._loggers:
            logger.log_params(config)

    def start_progress(self, total: int, initial: int) -> None:
        if self.active and not self.quiet:
            self._progress = Progress(total, initial, enabled=True)

    def info(self, message: str) -> None:
        if self.active:
            log.info(message)

    def warning(self, message: str) -> None:
        if self.active:
            log.warning("warning: %s", message)

    def metrics(self, step: int, epoch: int, **values: Any) -> None:
        if not self.active:
            return
        record = {"step": step, "epoch": epoch, "time": round(time.time(), 6), **values}
        for logger in self._loggers:
            logger.log_metrics(step, record)

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

    def evaluation(self, step: int, epoch: int, metrics: dict[str, Any],
                   split: str = "test") -> None:
        if not self.active:
            return
        self.metrics(step, epoch, **{f"{split}_{k}": v for k, v in metrics.items()})
        log.info("epoch %d step %d %s %s (%d samples)", epoch, step, split,
                 format_metrics(metrics), metrics["samples"])

    def summary(self, summary: dict[str, Any]) -> None:
        """``summary.json``; the loggers get the summary, then the final checkpoint
        (``checkpoints/last.pt``), ``config.toml`` and ``summary.json`` as artifacts."""
        if not self.active or not self._started:
            return
        write_json_atomic(self.out / "summary.json", summary)
        for logger in self._loggers:
            logger.log_summary(summary)
        last = self.out / "checkpoints" / "last.pt"
        if last.is_file():
            self.artifact(last, "checkpoints")
        self.artifact(self.out / "config.toml")
        self.artifact(self.out / "summary.json")

    def artifact(self, path: Path, folder: str | None = None) -> None:
        """Store a file with the loggers that keep artifacts (MLflow), under ``folder``."""
        if not self.active:
            return
        for logger in self._loggers:
            logger.log_artifact(Path(path), folder)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        loggers, self._loggers = self._loggers, []
        for logger in loggers:
            logger.close()
