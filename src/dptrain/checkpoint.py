"""Checkpoints: atomic, loaded safely, with a fallback when corrupt.

Layout under ``OUT/checkpoints/``: ``step-00000120.pt`` (the newest ``--keep-ckpts`` are kept)
and ``last.pt`` (a hard link to the newest one), written by rank 0 from the consolidated state
``Strategy.state_dict`` gathers. Every file is written to a temporary name, fsync'd, then
renamed over the target, so a crash or a full disk never leaves a half-written file under a
real name. Loading always uses ``torch.load(weights_only=True)``: a checkpoint can hold
tensors and plain containers, never code.

A strategy with ``sharded_state_dict`` (fsdp, zero) writes ``step-00000120.dcp/``
directories instead, every rank its own shard, through ``torch.distributed.checkpoint``;
``last.pt`` is then the consolidated plain model plus a pointer (``sharded``) to the newest
directory. :mod:`dptrain.checkpoint_dcp` holds that format and explains its design; this
module dispatches to it (:func:`load` of a directory, :func:`capture`, :meth:`Checkpointer.save`,
:func:`restore`), so both formats resume under every strategy.
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dptrain.errors import UsageError
from dptrain.procs import pid_alive

if TYPE_CHECKING:
    from dptrain.config import TrainConfig
    from dptrain.precision import Precision
    from dptrain.strategies import Strategy

FORMAT = "dptrain-checkpoint-1"
_WRITE_FIXES = {
    errno.ENOSPC: "free disk space, or pass another --out",
    errno.EDQUOT: "free space within your disk quota, or pass another --out",
    errno.EFBIG: "raise the file size limit (ulimit -f), or pass another --out",
    errno.EACCES: "make the directory writable, or pass another --out",
    errno.EPERM: "make the directory writable, or pass another --out",
    errno.EROFS: "the filesystem is read-only: pass another --out",
    errno.EISDIR: "a directory is in the way of the file: remove it, or pass another --out",
    errno.ENOTDIR: "a file is in the way of the checkpoints directory: remove it, or pass "
                   "another --out",
}


def write_fix(exc: OSError) -> str:
    """How to get past a failed write, by its errno."""
    return _WRITE_FIXES.get(exc.errno, "free disk space or fix the permissions")


_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")  # atomic_save's .NAME.tmpPID
_NUMBERED = re.compile(r"^step-(\d{8})\.(pt|dcp)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Sink:
    """The file ``torch.save`` writes to, remembering why a write failed: torch reports a
    failed write (disk full, file too large) as a bare ``RuntimeError`` ("unexpected pos")."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, rename. On failure the target is untouched;
    a failed write comes out as the ``OSError`` that caused it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            sink = _Sink(fh)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                if sink.error is not None:
                    raise sink.error from None
                raise
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load and sanity-check one checkpoint (a ``.pt`` file, or a DCP directory: its
    metadata, the tensors' data left on disk); any problem is a :class:`UsageError`."""
    if path.is_dir():
        from dptrain import checkpoint_dcp

        return checkpoint_dcp.read(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist (or is not a file); check --resume")
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise UsageError(f"checkpoint {path} is corrupt or truncated (not a torch.save zip "
                         "archive); resume from an earlier checkpoint or start a fresh run")
    bad = _bad_member(path)
    if bad:
        raise UsageError(f"checkpoint {path} is corrupt ({bad}); resume from an earlier "
                         "checkpoint or start a fresh run")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = next((line.strip().rstrip(".") for line in str(exc).splitlines()
                       if "nsupported global" in line.lower() or "Unsupported operand" in line
                       or "unsupported GLOBAL" in line),
                      "objects outside the allowed set")
        raise UsageError(f"checkpoint {path} holds objects that are not allowed with "
                         f"weights_only=True ({reason}); refusing to load it") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"checkpoint {path} is corrupt or truncated ({first}); resume from "
                         "an earlier checkpoint or start a fresh run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UsageError(f"checkpoint {path} is not a dptrain checkpoint (no '{FORMAT}' format "
                         "marker); pass a file written by dptrain train")
    if isinstance(state.get("sharded"), str):  # last.pt of a sharded run: the rest beside it
        state["sharded"] = str(path.parent / Path(state["sharded"]).name)
    problem = incomplete(state)
    if problem:
        raise UsageError(f"checkpoint {path} is incomplete or inconsistent ({problem}); resume "
                         "from an earlier checkpoint or start a fresh run")
    return state


def _bad_member(path: Path) -> str | None:
    """What fails the zip archive's CRC-32 check (``None``: every member intact). torch.load
    does not check them, so a flipped or zeroed byte inside a tensor would load as a silently
    different weight; reading the file once more costs about as much as loading it."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if bad is None else f"CRC mismatch in {bad}"


REQUIRED = ("model", "optimizer", "position", "rng", "world_size")


def incomplete(state: dict[str, Any]) -> str | None:
    """What makes a loaded checkpoint unusable for exact resume (None: nothing)."""
    sharded = "sharded" in state  # the optimizer state is in the DCP directory
    missing = [k for k in REQUIRED if k not in state and not (sharded and k == "optimizer")]
    if missing:
        return f"no {', '.join(repr(k) for k in missing)}"
    model = state["model"]
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        return "'model' is not a state dict of named tensors"
    for name, t in model.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"parameter {name!r} holds NaN/inf values"
    opt = state.get("optimizer", {"state": {}, "param_groups": []})
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
            and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    for g in opt["param_groups"])):
        return "'optimizer' is not an optimizer state dict (state, param_groups)"
    pos = state["position"]
    if not isinstance(pos, dict) or sorted(pos) != ["epoch", "step", "step_in_epoch"] or not all(
            type(v) is int and v >= 0 for v in pos.values()):
        return "'position' must be non-negative integers step, epoch, step_in_epoch"
    world = state["world_size"]
    rng = state["rng"]
    if type(world) is not int or world < 1:
        return "'world_size' is not a positive integer"
    if not (isinstance(rng, dict) and isinstance(rng.get("cpu"), list)
            and len(rng["cpu"]) == world
            and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                    and t.numel() == _CPU_RNG_BYTES for t in rng["cpu"])):
        return (f"'rng' must hold {world} CPU generator states (one per rank, "
                f"{_CPU_RNG_BYTES} bytes each)")
    config = state.get("config", {})
    if not isinstance(config, dict):
        return "'config' is not a mapping of settings"
    for key in ("batch_size", "accum"):
        if key in config and not (type(config[key]) is int and config[key] >= 1):
            return f"'config' {key} is {config[key]!r}, not a positive integer"
    return None


_CPU_RNG_BYTES = torch.get_rng_state().numel()  # what torch.set_rng_state accepts


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the next step's place in its epoch."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch}


@dataclass
class Timing:
    """Timed training so far (:class:`dptrain.loop.Stopwatch`'s seconds and samples, each
    process's first step excluded), summed over the processes a resumed run has had."""

    train_time_s: float = 0.0
    samples: int = 0

    @classmethod
    def saved(cls, state: dict[str, Any]) -> Timing:
        """A checkpoint's record (none before dptrain recorded it: zero)."""
        got = state.get("timing")
        if not isinstance(got, dict):
            return cls()
        t, n = got.get("train_time_s"), got.get("samples")
        ok = (isinstance(t, int | float) and isinstance(n, int) and math.isfinite(t)
              and t >= 0 and n >= 0)
        return cls(float(t), n) if ok else cls()

    def plus(self, timer: Any) -> Timing:
        """This and a running stopwatch's figures (``None``: nothing timed yet)."""
        if timer is None:
            return Timing(self.train_time_s, self.samples)
        return Timing(self.train_time_s + timer.now(), self.samples + timer.samples)

    def to_dict(self) -> dict[str, Any]:
        return {"train_time_s": self.train_time_s, "samples": self.samples}


# ------------------------------------------------------------------ resume
def find_resume(ckpt: Checkpointer, resume: str, *, info: Callable[[str], None],
                warn: Callable[[str], None]) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint ``--resume`` names, loaded once (on the main rank): ``auto`` = the newest
    good one under ``--out`` (``None`` when there is none), else the path given."""
    if resume == "auto":
        found = ckpt.latest_good(warn=warn)
        if found is None:
            info("no checkpoint to resume from: starting from scratch")
            return None
        return str(found[0]), found[1]
    return resume, load(Path(resume))


COMPATIBLE = ("model", "model_args", "dataset", "val_fraction", "seed", "loss", "task",
              "optimizer")


# settings a resume may change (a lower lr for the rest of the run, say), but never silently:
# the run warns and its summary records each one (config.toml describes the resumed run)
TRAINING_SETTINGS = ("lr", "momentum", "nesterov", "weight_decay", "schedule", "step_size",
                     "gamma", "warmup_steps", "grad_clip", "no_decay_norm_bias", "lr_scaling",
                     "ref_batch", "precision", "label_smoothing", "augment")


# schedules whose curve is laid out over the whole run: a resume that changes the run's
# length (--epochs, --max-steps) moves the rest of the curve (a cosine at its end starts again)
LENGTH_SCHEDULES = ("cosine", "onecycle")


def changed_settings(state: dict[str, Any], cfg: TrainConfig, total_steps: int | None = None,
                     steps_per_epoch: int | None = None) -> dict[str, list[Any]]:
    """The :data:`TRAINING_SETTINGS` this run sets differently from the checkpoint's run:
    ``{name: [checkpoint's value, this run's]}``. With ``total_steps`` and
    ``steps_per_epoch`` (this run's), also ``total_steps`` where a schedule of
    :data:`LENGTH_SCHEDULES` is laid out over another number of steps than the checkpoint's
    run was."""
    from dptrain.loop import epoch_steps

    saved = state.get("config", {})
    changed = {k: [saved[k], getattr(cfg, k)] for k in TRAINING_SETTINGS
               if k in saved and saved[k] != getattr(cfg, k)}
    if (total_steps is not None and steps_per_epoch and cfg.schedule in LENGTH_SCHEDULES
            and isinstance(saved.get("epochs"), int | float)
            and isinstance(saved.get("max_steps"), int)):
        before = epoch_steps(saved["epochs"], steps_per_epoch)
        before = min(before, saved["max_steps"]) if saved["max_steps"] else before
        if before != total_steps:
            changed["total_steps"] = [before, total_steps]
    return changed


def settings_history(state: dict[str, Any] | None, changes: dict[str, list[Any]]
                     ) -> list[dict[str, Any]]:
    """The resumes with other settings a run has had (``[{"step", "changes"}]``, oldest first):
    the checkpoint's record, and this resume's ``changes`` if any. Checkpoints carry it, so a
    later resume without changes still knows that the run's first steps had other settings."""
    saved = (state or {}).get("settings_history")
    history = [h for h in saved if isinstance(h, dict) and isinstance(h.get("step"), int)
               and isinstance(h.get("changes"), dict)] if isinstance(saved, list) else []
    if changes and state is not None:
        history.append({"step": state["position"]["step"], "changes": changes})
    return history


RESUMED_MARK = "# replayable = false: resumed at step"


def history_header(history: list[dict[str, Any]]) -> str:
    """``config.toml``'s first lines for a run with a :func:`settings_history`: the file holds
    the latest settings, which a replay from scratch would train every step with."""
    if not history:
        return ""
    parts = ["{} ({})".format(h["step"], ", ".join(f"{k} {new!r}, was {old!r}"
                                                   for k, (old, new) in h["changes"].items()))
             for h in history]
    return (f"{RESUMED_MARK} {'; at step '.join(parts)}.\n"
            "# The values below are the last ones. `dptrain train --config` on this file "
            "refuses a new run from it\n# (every step would use them); with --resume it "
            "continues this run.\n")


def saved_global_batch(state: dict[str, Any]) -> tuple[int, int, int] | None:
    """(batch per process, processes, accum) the checkpoint was written with, if recorded."""
    saved = state.get("config", {})
    if "batch_size" not in saved or "accum" not in saved:
        return None
    return saved["batch_size"], state["world_size"], saved["accum"]


def global_batch_settings(samples_per_step: int, world_size: int, batch_size: int,
                          multiple: int = 1) -> tuple[int, int] | None:
    """(batch per process, accum) that keep ``samples_per_step`` with ``world_size``
    processes, the batch closest to ``batch_size`` (then the least accumulation); the batch
    a multiple of ``multiple`` (a pipeline's micro-batches)."""
    options = [(samples_per_step // (world_size * a), a) for a in range(1, samples_per_step + 1)
               if samples_per_step % (world_size * a) == 0
               and (samples_per_step // (world_size * a)) % multiple == 0]
    if not options:
        return None
    return min(options, key=lambda o: (abs(o[0] - batch_size), o[1]))


def check_compatible(state: dict[str, Any], cfg: TrainConfig, path: str, world_size: int,
                     multiple: int = 1) -> None:
    """Resuming under other settings would silently be a different run: refuse. Another number
    of processes is fine when the global batch (batch x processes x accum) is kept: the data
    order continues at the same sample and every step is the same step."""
    saved = state.get("config", {})
    from dptrain._objects import is_object_spec

    for key in COMPATIBLE:
        if (key in saved and isinstance(saved[key], str) and is_object_spec(saved[key])
                and is_object_spec(str(getattr(cfg, key)))):
            continue  # Python objects given to dptrain.fit get a fresh name per call; their
            # tensors are checked by name, shape and dtype (check_model) and the data by
            # the position's fit to the epoch
        if key in saved and saved[key] != getattr(cfg, key):
            raise UsageError(f"checkpoint {path} was written with {key}={saved[key]!r}, this run "
                             f"has {key}={getattr(cfg, key)!r}; resume with the same settings")
    written = saved_global_batch(state)
    if written is None:  # an old checkpoint without its config: the world size must match
        if state["world_size"] != world_size:
            raise UsageError(f"checkpoint {path} was written by {state['world_size']} "
                             f"processes, this run has {world_size}; resume with as many")
        return
    b, w, a = written
    here = cfg.batch_size * world_size * cfg.accum
    if b * w * a == here:
        return
    keep = global_batch_settings(b * w * a, world_size, b, multiple)
    how = (f"--batch-size {keep[0]} --accum {keep[1]} keeps it with {world_size} processes, "
           "or pass --keep-global-batch" if keep else
           f"no batch/accum keeps it with {world_size} processes: use a world size that "
           f"divides {b * w * a}")
    raise UsageError(f"checkpoint {path} was written with a global batch of {b * w * a} "
                     f"(batch {b} x {w} processes x accum {a}); this run has {here} "
                     f"(batch {cfg.batch_size} x {world_size} x accum {cfg.accum}): {how}")


def keep_global_batch(state: dict[str, Any], cfg: TrainConfig, path: str, world_size: int,
                      multiple: int = 1) -> TrainConfig:
    """``--keep-global-batch``: this run's batch/accum chosen to keep the checkpoint's (each
    process's batch a multiple of ``multiple``)."""
    written = saved_global_batch(state)
    if written is None:
        return cfg
    b, w, a = written
    keep = global_batch_settings(b * w * a, world_size, b, multiple)
    if keep is None:
        cut = (f" into batches that --microbatches {multiple} divides" if multiple > 1
               else " evenly")
        raise UsageError(f"checkpoint {path} was written with a global batch of {b * w * a}, "
                         f"which {world_size} data-parallel replica(s) cannot split{cut}; use a "
                         f"world size (or --microbatches) that fits {b * w * a}")
    return cfg.replace(batch_size=keep[0], accum=keep[1])


def check_position(state: dict[str, Any], path: str, total_steps: int,
                   steps_per_epoch: int) -> Position:
    """The saved position, checked against the run being resumed (its data and length)."""
    pos = Position(**state["position"])
    if pos.step > total_steps:
        raise UsageError(f"checkpoint {path} is at step {pos.step}, beyond this run's "
                         f"{total_steps} steps; raise --epochs/--max-steps or start a fresh run")
    if pos.step_in_epoch > steps_per_epoch or (
            pos.epoch * steps_per_epoch + pos.step_in_epoch != pos.step):
        raise UsageError(
            f"checkpoint {path} is at step {pos.step_in_epoch} of epoch {pos.epoch} (step "
            f"{pos.step}), which does not fit this run's {steps_per_epoch} steps per epoch: the "
            "dataset or batch changed since it was written; resume with the same data, or start "
            "a fresh run")
    return pos


def capture(strategy: Strategy, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            precision: Precision, pos: Position, cfg: TrainConfig) -> dict[str, Any]:
    """Everything exact resume needs (a collective: call on every rank)."""
    if hasattr(strategy, "sharded_state_dict"):
        from dptrain import checkpoint_dcp

        return checkpoint_dcp.capture(strategy, model, optimizer, precision, {
            "position": pos.to_dict(), "config": cfg.to_dict(), "data_seed": cfg.seed,
            "torch_version": str(torch.__version__)})
    state = strategy.state_dict(model, optimizer, precision)
    state["rng"]["data_seed"] = cfg.seed
    return {**state, "position": pos.to_dict(), "config": cfg.to_dict(),
            "torch_version": str(torch.__version__)}


def check_model(state: dict[str, Any], path: str, model: torch.nn.Module, cfg: TrainConfig
                ) -> None:
    """The saved tensors fit the (plain) model: the same names, shapes and dtypes -- checked
    before anything is loaded or written, and never cast. For a sharded checkpoint the
    tensors checked are the ones its directory holds (``last.pt``'s copy: checked as well)."""
    saved = [state["model"]]
    if "sharded" in state:
        from dptrain import checkpoint_dcp

        saved.append(checkpoint_dcp.read(Path(state["sharded"]))["model"])
    for tensors in saved:
        _check_tensors(tensors, path, model, cfg)


def _check_tensors(saved: dict[str, torch.Tensor], path: str, model: torch.nn.Module,
                   cfg: TrainConfig) -> None:
    from dptrain.models import layout_hint

    own = model.state_dict()
    fix = "resume with the model it was written for"
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or extra:
        what = (f"missing {', '.join(missing[:3])}" if missing else
                f"unexpected {', '.join(extra[:3])}")
        raise UsageError(f"checkpoint {path} does not fit --model {cfg.model} ({what}); {fix}"
                         f"{layout_hint(cfg.model, saved)}")
    for name, t in saved.items():
        mine = own[name]
        if t.shape != mine.shape:
            raise UsageError(f"checkpoint {path} does not fit --model {cfg.model} ({name!r} has "
                             f"shape {tuple(t.shape)}, the model's {tuple(mine.shape)}); {fix}"
                             f"{layout_hint(cfg.model, saved)}")
        if t.dtype != mine.dtype:
            raise UsageError(
                f"checkpoint {path}: {name!r} is stored as {str(t.dtype).removeprefix('torch.')}"
                f", the model's is {str(mine.dtype).removeprefix('torch.')}; refusing to "
                "cast it: resume from a checkpoint dptrain wrote for this model")


def restore(state: dict[str, Any], path: str, strategy: Strategy, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, precision: Precision, cfg: TrainConfig) -> None:
    """Load ``state`` into the wrapped model, optimizer, precision and RNGs. The optimizer's
    hyper-parameters (momentum, weight decay, ...) stay this run's: loading a state dict would
    bring back the checkpoint's, and a changed ``--momentum`` would be ignored while
    config.toml claimed it (:func:`changed_settings` reports the change)."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        if "sharded" in state:
            from dptrain import checkpoint_dcp

            checkpoint_dcp.restore(state, strategy, model, optimizer, precision)
        else:
            strategy.load_state_dict(state, model, optimizer, precision)
    except UsageError as exc:
        fix = ("resume with the model it was written for" if "model" in str(exc) else
               "resume with the settings it was written with")
        raise UsageError(f"checkpoint {path} does not fit --model {cfg.model}: {exc}; {fix}"
                         ) from None
    if len(settings) == len(optimizer.param_groups):
        for group, own in zip(optimizer.param_groups, settings, strict=True):
            group.update(own)


class Checkpointer:
    """Saves (call :meth:`save` on every rank: rank 0 writes a ``.pt``, every rank its
    shard of a DCP directory), rotates, sweeps dead writers' temporaries, finds the newest."""

    def __init__(self, directory: Path, *, is_main: bool, keep: int = 3) -> None:
        self.dir = directory
        self.is_main = is_main
        self.keep = keep

    def sweep(self) -> list[Path]:
        """Remove temporaries left by a writer that died mid-save (kill -9): ``.NAME.tmpPID``
        whose process is gone. Returns what was removed."""
        if not self.is_main or not self.dir.is_dir():
            return []
        removed = []
        for p in self.dir.iterdir():
            m = _TEMPORARY.match(p.name)
            if m and not pid_alive(int(m.group(1))):
                _remove(p)
                removed.append(p)
        return removed

    def numbered(self) -> list[Path]:
        """Numbered checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _NUMBERED.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, state: dict[str, Any], step: int) -> Path | None:
        """Write ``state`` as checkpoint ``step`` (call on every rank); rank 0's path."""
        if hasattr(state, "tensors"):  # a checkpoint_dcp.ShardedState: every rank writes
            from dptrain import checkpoint_dcp

            path = checkpoint_dcp.save(state, self.dir, step, is_main=self.is_main)
            self._rotate()
            return path
        if not self.is_main:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{step:08d}.pt"
        try:
            atomic_save({"format": FORMAT, **state}, path)
            # last.pt: the same inode as the newest numbered file, swapped in atomically
            tmp = self.dir / f".last.pt.tmp{os.getpid()}"
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)
            except OSError:  # a filesystem without hard links: write a second copy
                atomic_save({"format": FORMAT, **state}, tmp)
            os.replace(tmp, self.dir / "last.pt")
            _fsync_dir(self.dir)
        except OSError as exc:
            fix = write_fix(exc)
            raise UsageError(f"cannot write checkpoint {path}: {exc.strerror or exc}; {fix} "
                             "(earlier checkpoints are intact)") from None
        self._rotate()
        return path

    def _rotate(self) -> None:
        if self.is_main:
            for old in self.numbered()[self.keep:]:
                _remove(old)

    def latest_good(self, device: torch.device | str = "cpu",
                    warn=lambda msg: None) -> tuple[Path, dict[str, Any]] | None:  # noqa: ANN001
        """Newest checkpoint that loads; corrupt ones are skipped with a warning."""
        for path in self.numbered():
            try:
                return path, load(path, device)
            except UsageError as exc:
                warn(f"{exc}; trying the previous checkpoint")
        last = self.dir / "last.pt"
        if last.is_file():
            try:
                state = load(last, device)
            except UsageError as exc:
                warn(str(exc))
                return None
            # a sharded run's last.pt points at a directory already tried above
            return None if "sharded" in state else (last, state)
        return None


def _remove(path: Path) -> None:
    """A numbered checkpoint or a temporary: a file, or a DCP directory."""
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
