"""Imported by multiprocessing's fork server (dptrain.launch.WORKER_PRELOAD): the server ends
without Python's interpreter teardown.

The server outlives the launcher by its teardown (~1 s with torch imported) and, holding the
launcher's stdout and stderr for the workers it forks, keeps a pipe reading the launcher's
output open that long. At its exit (the launcher is gone) an ``atexit`` handler ends it at
once. The workers it forks inherit the handler but are other processes: it does nothing there;
nor is it registered when anything but the server imports this module.
"""

from __future__ import annotations

import atexit
import contextlib
import os
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


def _end() -> None:
    if os.getpid() == _SERVER:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(0)


if _in_fork_server():
    atexit.register(_end)
