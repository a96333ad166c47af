"""Processes by pid: whether one still runs, and the pid namespace a pid belongs to.

Used to tell stale leftovers (a shared-memory segment, a checkpoint or fetch temporary whose
writer was killed) from the files of a process that is still at work."""

from __future__ import annotations

import contextlib
import os
import re
import uuid


def pid_namespace() -> str:
    """This process's pid namespace (its inode): a pid means something only within it."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def pid_alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, counts as dead)."""
    if pid == os.getpid():
        return True
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - one read
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and os.path.isdir("/proc/self"):
            return False
        # no /proc (macOS), or unreadable: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return stat[stat.rindex(")") + 2] not in "ZX"


def stamped_path(directory: str, prefix: str) -> str:
    """A fresh file name that names its creator: ``<prefix><pidns>-<pid>-<random hex>``, so
    that :func:`sweep_dead` can tell a dead writer's leftover from a live one's file."""
    return os.path.join(directory, f"{prefix}{pid_namespace()}-{os.getpid()}-"
                                   f"{uuid.uuid4().hex[:16]}")


def sweep_dead(directory: str, prefix: str, suffix: str = "") -> list[str]:
    """Remove the files :func:`stamped_path` named (optionally + ``suffix``) whose creator, in
    our pid namespace, is dead; only our names, never another namespace's. The paths removed."""
    name_re = re.compile(re.escape(prefix) + r"(\d+)-(\d+)-[0-9a-f]+(?:" + re.escape(suffix)
                         + ")?")
    ns, removed = pid_namespace(), []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = name_re.fullmatch(name)
        if m is None or m.group(1) != ns or pid_alive(int(m.group(2))):
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed
