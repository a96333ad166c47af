"""Start local workers through PyTorch's own elastic launcher (what ``torchrun`` runs).

No home-made process manager: :func:`launch` hands a picklable function to
``torch.distributed.launcher.api.elastic_launch``, which spawns ``nproc`` workers, sets their
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` environment, watches them, kills the rest
when one fails and restarts them up to ``max_restarts`` times.

A worker's failure comes back as :class:`WorkerFailure` carrying each failed rank's traceback;
a :class:`~dptrain.errors.UsageError` raised inside a worker comes back as a UsageError, so the
command still ends with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from dptrain import dist
from dptrain.errors import UsageError

_NOISY_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing",
                  "torch.distributed.launcher")


class WorkerFailure(Exception):
    """One or more workers failed; ``str()`` is a report with each rank's traceback."""

    def __init__(self, report: str, exit_code: int = 1) -> None:
        super().__init__(report)
        self.exit_code = exit_code


def _failure_text(failure: Any) -> str:
    message = failure.message
    if isinstance(message, dict):
        info = message.get("extraInfo", {})
        return info.get("py_callstack") or message.get("message", "")
    return str(message or "")


def _usage_error_text(failure: Any) -> str | None:
    message = failure.message
    if isinstance(message, dict):
        text = message.get("message", "")
        for prefix in ("UsageError: ", "dptrain.errors.UsageError: "):
            if text.startswith(prefix):
                return text[len(prefix):]
    return None


def launch(fn: Callable[..., Any], args: tuple[Any, ...], *, nproc: int, nnodes: int = 1,
           node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int = 0,
           max_restarts: int = 0, rdzv_timeout_s: int = 300) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` local workers; return ``{global_rank: result}``."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = master_port or dist.free_port(master_addr if nnodes == 1 else "0.0.0.0")
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=f"dptrain-{uuid.uuid4().hex[:8]}" if nnodes == 1 else f"dptrain-{port}",
        # torchrun's default: a static rendezvous hosted by node 0 at MASTER_ADDR:MASTER_PORT
        rdzv_backend="static",
        rdzv_endpoint=f"{master_addr}:{port}",
        rdzv_configs={"rank": node_rank, "timeout": rdzv_timeout_s},
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:  # we print failures ourselves, once, with the rank
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return elastic_launch(config, fn)(*args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        for _, failure in failures:
            text = _usage_error_text(failure)
            if text is not None:
                raise UsageError(text) from None
        parts = []
        for rank, failure in failures:
            parts.append(f"worker rank {rank} (local rank {failure.local_rank}, pid "
                         f"{failure.pid}) failed with exit code {failure.exitcode}:\n"
                         f"{_failure_text(failure).rstrip()}")
        raise WorkerFailure("\n".join(parts)) from None
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
