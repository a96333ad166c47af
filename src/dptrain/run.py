"""One process's part of a training run: parse -> build -> (resume) -> train -> evaluate -> close.

:func:`train` is what every worker runs, however it was started (in-process, the elastic
launcher, torchrun, srun, the legacy launcher). It returns the run summary.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from dptrain import dist, strategies
from dptrain.checkpoint import Checkpointer, load
from dptrain.config import TrainConfig, to_toml
from dptrain.data.datasets import load_splits
from dptrain.data.loader import DatasetLoader, Normalizer, ShardedLoader
from dptrain.errors import UsageError
from dptrain.loop import LoopResult, Position, StopRequest, Trainer, autocast, evaluate
from dptrain.metrics import Reporter, setup_logging
from dptrain.models import build_model, has_batchnorm
from dptrain.optim import build_optimizer, scaled_lr

RUN_MARKERS = ("summary.json", "checkpoints", "metrics.jsonl")


def default_out() -> str:
    return str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def default_threads(local_world_size: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_world_size))


def check_out_dir(out: Path, resuming: bool) -> None:
    """A new run never writes into another run's directory (it would mix their outputs)."""
    if resuming or not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; choose another --out")
    # an empty metrics.jsonl is what a run that failed before its first step leaves behind
    found = [m for m in RUN_MARKERS if (out / m).exists()
             and not (m == "metrics.jsonl" and (out / m).stat().st_size == 0)]
    if found:
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}); pass "
                         "--resume auto to continue it, or choose another --out")


class OutDirLock:
    """An exclusive lock on ``OUT/.dptrain.lock`` held by rank 0 for the whole run.

    Two runs pointed at the same directory would interleave metrics and checkpoints; the
    second one is refused instead. The kernel drops the lock when the holder dies, so an
    elastic restart or a later ``--resume auto`` can take it again.
    """

    def __init__(self, out: Path) -> None:
        import fcntl

        try:
            out.mkdir(parents=True, exist_ok=True)
            self.fh = (out / ".dptrain.lock").open("a+")
        except OSError as exc:
            raise UsageError(f"cannot create --out {out}: {exc.strerror or exc}; choose a "
                             "writable directory") from None
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "?"
            self.fh.close()
            raise UsageError(f"--out {out} is in use by another running dptrain (pid {holder}); "
                             "wait for it or choose another --out") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()

    def release(self) -> None:
        self.fh.close()


def _local_env(cfg: TrainConfig, env: dist.DistEnv) -> dist.DistEnv:
    """A one-process DDP run still needs a (private) rendezvous address."""
    if env.distributed or strategies.resolve_strategy_name(cfg.strategy, env) != "ddp":
        return env
    return dist.DistEnv(master_port=cfg.master_port or dist.free_port(), source="local")


def train(cfg: TrainConfig, env: dist.DistEnv | None = None, *, started_at: float | None = None,
          count_comm: bool = False) -> dict[str, Any]:
    """Run (or resume) training in this process and return the summary (on every rank)."""
    started_at = time.time() if started_at is None else started_at
    env = _local_env(cfg, dist.detect() if env is None else env)
    setup_logging(env.rank, env.world_size, quiet=cfg.quiet)
    torch.set_num_threads(cfg.threads or default_threads(env.local_world_size))
    strategy = strategies.build(cfg, env, count_comm=count_comm)
    strategy.setup()
    reporter = Reporter(None, active=False)
    lock: OutDirLock | None = None
    try:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        resume = cfg.resume or ("auto" if restart > 0 else "")
        out = Path(strategy.broadcast_object(cfg.out or default_out()))
        verdict = None
        if strategy.is_main:
            try:
                if resume not in ("", "auto"):
                    load(Path(resume))  # a bad --resume PATH must not create --out first
                check_out_dir(out, resuming=bool(resume))
                lock = OutDirLock(out)
            except UsageError as exc:
                verdict = str(exc)
        verdict = strategy.broadcast_object(verdict)
        if verdict:
            raise UsageError(verdict)
        cfg = cfg.replace(out=str(out))
        reporter = Reporter(out, active=strategy.is_main, quiet=cfg.quiet,
                            tensorboard=cfg.tensorboard)
        if strategy.is_main:
            (out / "config.toml").write_text(to_toml(cfg))
        with StopRequest() as stop:  # from here on, SIGTERM means "checkpoint, then stop"
            return _train(cfg, strategy, reporter, resume, started_at, restart, stop)
    finally:
        reporter.close()
        if lock is not None:
            lock.release()
        strategy.teardown()


def _train(cfg: TrainConfig, strategy: strategies.Strategy, reporter: Reporter, resume: str,
           started_at: float, restart: int, stop: StopRequest) -> dict[str, Any]:
    device = strategy.device
    splits = load_splits(cfg.dataset, cfg.data_root, log=reporter.info).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    normalize = Normalizer(splits.mean, splits.std, memory_format)

    torch.manual_seed(cfg.seed)  # identical initial parameters for every world size
    model = build_model(cfg.model)
    bn = has_batchnorm(model)
    model = model.to(device, memory_format=memory_format)

    shard = {"batch_size": cfg.batch_size, "rank": strategy.rank,
             "world": strategy.world_size, "accum": cfg.accum, "seed": cfg.seed,
             "normalize": normalize}
    if splits.is_dataset:
        loader = DatasetLoader(splits.train_x, device=device, **shard)
    else:
        loader = ShardedLoader(splits.train_x, splits.train_y, augment=cfg.augment, **shard)
    global_batch = loader.step_global
    peak_lr = scaled_lr(cfg, global_batch)
    total_steps = cfg.epochs * loader.steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    ckpt = Checkpointer(Path(cfg.out) / "checkpoints", is_main=strategy.is_main,
                        keep=cfg.keep_ckpts)
    pos, state, resumed_from = Position(), None, None
    if resume:
        path = None
        if strategy.is_main:
            path = _find_resume(ckpt, resume, reporter)
        path = strategy.broadcast_object(path)
        if path is not None:
            state = load(Path(path), device)
            _check_compatible(state, cfg, path, strategy.world_size)
            resumed_from = path
            try:
                model.load_state_dict(state["model"])
            except RuntimeError as exc:
                lines = [ln.strip() for ln in str(exc).splitlines()]
                why = next((ln for ln in lines if ln.startswith(("Missing key", "Unexpected key",
                                                                  "size mismatch"))), lines[0])
                raise UsageError(f"checkpoint {path} does not fit --model {cfg.model} "
                                 f"({why[:200]}); resume with the model it was written for"
                                 ) from None
            pos = Position(**state["position"])
            reporter.info(f"resumed from {path} at step {pos.step} (epoch {pos.epoch}, "
                          f"step {pos.step_in_epoch} of it)")

    wrapped = strategy.wrap(model)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    optimizer = build_optimizer(cfg, wrapped.parameters(), device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "16")
    # dropout randomness differs per rank; restored exactly from the checkpoint on resume
    torch.manual_seed(cfg.seed * 1_000_003 + 7919 * (strategy.rank + 1))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _restore_rng(state, strategy)

    precision_ctx = autocast(cfg, device)
    last_eval: dict[str, Any] = {}

    def checkpoint_state(p: Position) -> dict[str, Any]:
        rng_cpu = strategy.all_gather_object(torch.get_rng_state())
        rng_cuda = strategy.all_gather_object(
            torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0,
                                                                                        dtype=torch.uint8))
        return {
            "model": strategy.unwrap(_uncompiled(wrapped)).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "position": {"step": p.step, "epoch": p.epoch, "step_in_epoch": p.step_in_epoch},
            "rng": {"cpu": rng_cpu, "cuda": rng_cuda, "data_seed": cfg.seed},
            "world_size": strategy.world_size,
            "config": cfg.to_dict(),
            "torch_version": str(torch.__version__),
        }

    def save_checkpoint(p: Position) -> None:
        plain = strategy.unwrap(_uncompiled(wrapped))
        finite = torch.stack([torch.isfinite(t).all() for t in plain.state_dict().values()
                              if t.is_floating_point()]).all()
        if not bool(finite):  # never replace a good checkpoint with a diverged model
            raise UsageError(f"non-finite parameters at step {p.step}; lower --lr; the last "
                             "good checkpoint is kept")
        strategy.sync_buffers(plain)
        state = checkpoint_state(p)  # collective: on every rank
        ckpt.save(state, p.step)
        strategy.barrier()

    def run_eval(p: Position) -> None:
        plain = strategy.unwrap(_uncompiled(wrapped))
        strategy.sync_buffers(plain)
        acc, loss, n = evaluate(plain, splits.test_x, splits.test_y, strategy, normalize,
                                cfg.eval_batch_size, precision_ctx)
        last_eval.update(step=p.step, accuracy=acc, loss=loss, samples=n)
        reporter.evaluation(p.step, p.epoch, acc, loss, n)

    def on_epoch_end(p: Position) -> None:
        if cfg.eval_every_epoch:
            run_eval(p)

    trainer = Trainer(cfg, strategy, reporter, wrapped, optimizer, loader, scaler, peak_lr,
                      total_steps, on_checkpoint=save_checkpoint, on_epoch_end=on_epoch_end,
                      stop=stop)
    reporter.info(f"{strategy.name} on {device} x {strategy.world_size} "
                  f"({strategy.backend}), model {cfg.model}, global batch {global_batch}, "
                  f"lr {peak_lr:g}, {total_steps} steps ({loader.steps_per_epoch}/epoch)")
    reporter.start_progress(total_steps, pos.step)
    result: LoopResult = trainer.run(pos)
    if result.stopped_by_signal:
        reporter.warning(f"stop requested (SIGTERM): checkpoint written at step {pos.step}; "
                         "continue with --resume auto")
    else:
        if last_eval.get("step") != pos.step:
            run_eval(pos)
        save_checkpoint(pos)

    summary = {
        "test_accuracy": last_eval.get("accuracy"),
        "test_loss": last_eval.get("loss"),
        "test_samples": last_eval.get("samples"),
        "train_samples_per_s": (result.timed_samples / result.train_time_s
                                if result.train_time_s > 0 else None),
        "train_time_s": result.train_time_s,
        "timed_steps": result.timed_steps,
        "wall_time_s": time.time() - started_at,
        "steps": pos.step,
        "epochs": round(pos.step / loader.steps_per_epoch, 4),
        "world_size": strategy.world_size,
        "global_batch": global_batch,
        "effective_lr": peak_lr,
        "final_loss": result.last_loss,
        "bn_statistics": ("none" if not bn else "synchronized (SyncBatchNorm)"
                          if cfg.sync_bn and strategy.name == "ddp" else
                          "per process (rank 0's are kept)" if strategy.world_size > 1
                          else "single process"),
        "model": cfg.model,
        "dataset": cfg.dataset,
        "precision": cfg.precision,
        "accum": cfg.accum,
        "seed": cfg.seed,
        "resumed_from": resumed_from,
        "restarts": restart,
        "stopped_by_signal": result.stopped_by_signal,
        "torch_version": str(torch.__version__),
        "out": cfg.out,
        **strategy.describe(),
    }
    if strategy.comm is not None:
        summary["allreduce_calls"] = strategy.comm.calls
        summary["allreduce_bytes"] = strategy.comm.bytes
    reporter.summary(summary)
    return summary


def _uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)


def _find_resume(ckpt: Checkpointer, resume: str, reporter: Reporter) -> str | None:
    if resume == "auto":
        found = ckpt.latest_good(warn=reporter.warning)
        if found is None:
            reporter.info("no checkpoint to resume from: starting from scratch")
            return None
        return str(found[0])
    path = Path(resume)
    load(path)  # fail early, on rank 0, with a clear message
    return str(path)


def _check_compatible(state: dict[str, Any], cfg: TrainConfig, path: str,
                      world_size: int) -> None:
    """Resuming under other settings would silently be a different run: refuse."""
    saved = state.get("config", {})
    for key in ("model", "dataset", "batch_size", "accum", "seed"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise UsageError(f"checkpoint {path} was written with {key}={saved[key]!r}, this run "
                             f"has {key}={getattr(cfg, key)!r}; resume with the same settings")
    if state.get("world_size", world_size) != world_size:
        raise UsageError(f"checkpoint {path} was written by {state['world_size']} processes, "
                         f"this run has {world_size}; resume with the same number of processes")


def _restore_rng(state: dict[str, Any], strategy: strategies.Strategy) -> None:
    """Each rank continues its own random stream (dropout) exactly where it was saved."""
    rng = state.get("rng", {})
    torch.set_rng_state(rng["cpu"][strategy.rank].cpu())
    cuda = rng.get("cuda") or []
    if strategy.device.type == "cuda" and len(cuda) == strategy.world_size and cuda[0].numel():
        torch.cuda.set_rng_state(cuda[strategy.rank].cpu(), strategy.device)
