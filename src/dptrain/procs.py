"""Processes by pid: whether one still runs, and the pid namespace a pid belongs to.

Used to tell stale leftovers (a shared-memory segment, a checkpoint or fetch temporary whose
writer was killed) from the files of a process that is still at work."""

from __future__ import annotations

import os


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
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return stat[stat.rindex(")") + 2] not in "ZX"
