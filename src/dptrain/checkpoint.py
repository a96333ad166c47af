"""Checkpoints: atomic, written by one rank, loaded safely, with a fallback when corrupt.

Layout under ``OUT/checkpoints/``: ``step-00000120.pt`` (the newest ``--keep-ckpts`` are kept)
and ``last.pt`` (a hard link to the newest one). Every file is written to a temporary name,
fsync'd, then renamed over the target, so a crash or a full disk never leaves a half-written
file under a real name. Loading always uses ``torch.load(weights_only=True)``: a checkpoint can
hold tensors and plain containers, never code.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from dptrain.errors import UsageError

FORMAT = "dptrain-checkpoint-1"
_WRITE_FIXES = {
    errno.ENOSPC: "free disk space, or pass another --out",
    errno.EDQUOT: "free space within your disk quota, or pass another --out",
    errno.EFBIG: "raise the file size limit (ulimit -f), or pass another --out",
    errno.EACCES: "make the directory writable, or pass another --out",
    errno.EPERM: "make the directory writable, or pass another --out",
    errno.EROFS: "the filesystem is read-only: pass another --out",
}
_NUMBERED = re.compile(r"^step-(\d{8})\.pt$")


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
    """Load and sanity-check one checkpoint; any problem is a :class:`UsageError`."""
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist (or is not a file); check --resume")
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise UsageError(f"checkpoint {path} is corrupt or truncated (not a torch.save zip "
                         "archive); resume from an earlier checkpoint or start a fresh run")
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
    return state


class Checkpointer:
    """Saves on the main process only (call :meth:`save` on every rank), finds the newest."""

    def __init__(self, directory: Path, *, is_main: bool, keep: int = 3) -> None:
        self.dir = directory
        self.is_main = is_main
        self.keep = keep

    def numbered(self) -> list[Path]:
        """Numbered checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _NUMBERED.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, state: dict[str, Any], step: int) -> Path | None:
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
            fix = _WRITE_FIXES.get(exc.errno, "free disk space or fix the permissions")
            raise UsageError(f"cannot write checkpoint {path}: {exc.strerror or exc}; {fix} "
                             "(earlier checkpoints are intact)") from None
        for old in self.numbered()[self.keep:]:
            old.unlink(missing_ok=True)
        return path

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
                return last, load(last, device)
            except UsageError as exc:
                warn(str(exc))
        return None
