"""Imported only by multiprocessing's fork server (dptrain.launch.WORKER_PRELOAD): the server
ends without Python's interpreter teardown.

The server outlives the launcher by its teardown (~1 s with torch imported) and, holding the
launcher's stdout and stderr for the workers it forks, keeps a pipe reading the launcher's
output open that long. At its exit (the launcher is gone) an ``atexit`` handler ends it at
once; the workers it forked inherit the handler but are other processes: it does nothing there.
"""

from __future__ import annotations

import atexit
import os

_SERVER = os.getpid()


def _end() -> None:
    if os.getpid() == _SERVER:
        os._exit(0)


atexit.register(_end)
