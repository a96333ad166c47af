"""The run directory: who may write into it, and the lock that keeps a second run out."""

from __future__ import annotations

import contextlib
import os
import re
from datetime import datetime
from pathlib import Path

from dptrain.errors import UsageError

RUN_MARKERS = ("summary.json", "checkpoints", "metrics.jsonl")


def default_out() -> str:
    """``runs/<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``, ... where a run started in the same
    second already took the name (a sweep starting several at once)."""
    base = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not path.exists():
            return str(path)
    return str(base)


def holds_run(out: Path) -> list[str]:
    """The run outputs already in ``out`` (an empty ``metrics.jsonl`` is what a run that
    failed before its first step leaves behind, and does not count)."""
    return [m for m in RUN_MARKERS if (out / m).exists()
            and not (m == "metrics.jsonl" and (out / m).stat().st_size == 0)]


def check_out_dir(out: Path, resume: str) -> None:
    """A new run never writes into another run's directory (it would mix their outputs).

    ``resume``: ``""`` (a new run), ``auto`` (continue the run in ``out``) or a checkpoint
    path, which belongs to the run directory it was written in: resuming from it may write
    there, or into a new directory, never into a third, existing run."""
    if out.name == "checkpoints" and holds_run(out.parent):
        raise UsageError(f"--out {out} is the checkpoints directory of the run in {out.parent}; "
                         "choose another --out")
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; choose another --out")
    for name in ("checkpoints", "profile"):
        if (out / name).exists() and not (out / name).is_dir():
            raise UsageError(f"--out {out} holds a file named {name}, where the run writes its "
                             f"{name} directory; move it, or choose another --out")
    if (out / "config.toml").exists() and not written_by_dptrain(out / "config.toml"):
        raise UsageError(f"--out {out} holds a config.toml that dptrain did not write (a file of "
                         "yours?), where the run writes its resolved configuration; move it, "
                         "or choose another --out")
    if resume == "auto":
        return
    found = holds_run(out)
    if not found:
        return
    if resume:
        origin = run_of(Path(resume))
        if origin is not None and origin.resolve() == out.resolve():
            later = later_checkpoints(Path(resume))
            if later:
                raise UsageError(
                    f"--resume {resume} goes back in its own run directory, which holds later "
                    f"checkpoints ({', '.join(p.name for p in later)}): continuing there would "
                    "mix two branches of the run (and a later --resume auto would take the "
                    "old one); pass a new --out to branch from it (this directory stays as "
                    "it is), or delete the later checkpoints to rewind the run")
            return
        raise UsageError(f"--out {out} already holds another run ({', '.join(found)}); "
                         f"resuming from {resume} writes into its own run directory or a new "
                         "one: drop --out, or choose a new --out")
    raise UsageError(f"--out {out} already holds a run ({', '.join(found)}); pass "
                     "--resume auto to continue it, or choose another --out")


def written_by_dptrain(config: Path) -> bool:
    """Whether ``config`` is a run's own ``config.toml`` (its header comment says so): one a
    run may rewrite. Any other file there is the user's."""
    try:
        with config.open("rb") as fh:
            head = fh.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    from dptrain.config import CONFIG_HEADER, SESSION_HEADER

    return any(line.startswith((CONFIG_HEADER, SESSION_HEADER))
               for line in head.splitlines()[:8])


_STEP = re.compile(r"step-(\d+)\.(pt|dcp)$")


def later_checkpoints(checkpoint: Path) -> list[Path]:
    """The numbered checkpoints beside ``checkpoint`` (``step-N.pt`` / ``.dcp``) of later
    steps, oldest first; none for ``last.pt`` (the newest) or an unnumbered name."""
    own = _STEP.match(checkpoint.name)
    if own is None or not checkpoint.parent.is_dir():
        return []
    later = [(int(m.group(1)), p) for p in checkpoint.parent.iterdir()
             if (m := _STEP.match(p.name)) and int(m.group(1)) > int(own.group(1))]
    return [p for _, p in sorted(later)]


def run_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint file lives in (``RUN/checkpoints/x.pt``), if any."""
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else None


class OutDirLock:
    """An exclusive lock on ``OUT/.dptrain.lock`` held by rank 0 for the whole run.

    Two runs pointed at the same directory would interleave metrics and checkpoints; the
    second one is refused instead. The kernel drops the lock when the holder dies, so an
    elastic restart or a later ``--resume auto`` can take it again.
    """

    def __init__(self, out: Path) -> None:
        import fcntl

        self.out = out
        # the directories this lock creates: removed again by release() if the run wrote
        # nothing (it failed its checks), so that a refused run leaves no empty --out behind
        self.created = [d for d in (out, *out.parents) if not d.exists()]
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
        lock = self.out / ".dptrain.lock"
        with contextlib.suppress(OSError):
            if [p.name for p in self.out.iterdir()] != [lock.name]:
                return  # the run wrote its outputs (or the directory held files before)
            lock.unlink()
            for d in self.created:  # innermost first; stops at the first one not empty
                d.rmdir()
