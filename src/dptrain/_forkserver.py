"""Imported by multiprocessing's fork server (dptrain.launch.WORKER_PRELOAD): the server ends
without Python's interpreter teardown, and a worker whose launcher is stopping fails to start
quietly; the objects the server's imports made are frozen for the garbage collector.

The server outlives the launcher by its teardown (~1 s with torch imported) and, holding the
launcher's stdout and stderr for the workers it forks, keeps a pipe reading the launcher's
output open that long. At its exit (the launcher is gone) an ``atexit`` handler ends it at
once. The workers it forks inherit the handler but are other processes: it does nothing there;
nor is it registered when anything but the server imports this module.

A Ctrl-C can land while the launcher waits for a new worker's pid: the worker exists, but the
launcher, not knowing it, stops without it and removes the semaphores the worker has yet to
unpickle. The worker's failure to start (before any of its own code runs; an error from there
on is reported by the worker itself) is then no news: it ends with status 1, silent, when a
SIGINT is pending there (the terminal's Ctrl-C reaches the whole process group, and the worker
blocks SIGINT until it runs) or its launcher is gone. Any other failure to start is printed as
multiprocessing prints it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys


def _in_fork_server() -> bool:
    """Is this import running under ``multiprocessing.forkserver.main`` (the server's preload)?"""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "main" and code.co_filename.endswith(
                os.path.join("multiprocessing", "forkserver.py")):
            return True
        frame = frame.f_back
    return False


_SERVER = os.getpid()
_LAUNCHER = os.getppid()  # in the server: the process that started it
_HOOK = sys.excepthook


def _end() -> None:
    if os.getpid() == _SERVER:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(0)


def _launcher_stopping() -> bool:
    """In a worker forked from the server: is its launcher stopping (a Ctrl-C pending here)
    or gone?"""
    from dptrain.procs import pid_alive  # a killed launcher can stay a zombie: dead

    return signal.SIGINT in signal.sigpending() or not pid_alive(_LAUNCHER)


def _quiet_if_launcher_stopping(kind, value, tb) -> None:
    """``sys.excepthook`` in the server and so in a worker until it runs (``restore_hook``):
    what multiprocessing's fork server calls when a worker fails to start."""
    if os.getpid() != _SERVER and _launcher_stopping():
        return
    _HOOK(kind, value, tb)


def restore_hook() -> None:
    """In a worker, once its own code runs: the excepthook it had before the fork server's."""
    if sys.excepthook is _quiet_if_launcher_stopping:
        sys.excepthook = _HOOK


if _in_fork_server():
    import gc

    atexit.register(_end)
    sys.excepthook = _quiet_if_launcher_stopping
    # the last of the server's preloads: what torch and dptrain's modules made is frozen, so
    # that a forked worker's collections never walk it (a full one cost 0.05-0.1 s each)
    gc.freeze()
