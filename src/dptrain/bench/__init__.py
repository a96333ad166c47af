"""Benchmarks, the honest baselines they are measured against, and what every result carries.

:func:`machine_info` describes the machine and software a result was measured on, and
:func:`mean_std` summarises repeats; the scripts under ``benchmarks/`` save both beside every
figure.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_info(argv: list[str] | None = None) -> dict[str, Any]:
    """Platform, CPU, cores, load, GPU, library versions, date and command line."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "torch_version": str(torch.__version__),
        "torch_threads_default": torch.get_num_threads(),
        "python_version": platform.python_version(),
        "numpy_version": _version("numpy"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *(sys.argv if argv is None else argv)]),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = list(os.getloadavg())
    return info


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed: the result just says so
        return None


def mean_std(values: list[float]) -> dict[str, float | int | list[float]]:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": list(values),
    }
