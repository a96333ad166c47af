"""Benchmarks, the honest baselines they are measured against, and what every result carries.

:func:`machine_info` describes the machine and software a result was measured on, and
:func:`mean_std` summarises repeats; the scripts under ``benchmarks/`` save both beside every
figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
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


def _proc_stat() -> tuple[int, int]:
    """(total, idle) CPU jiffies since boot, all CPUs together."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]  # idle + iowait; guest time is in user


class OtherLoad:
    """How busy *other* processes kept the machine while our child processes ran.

    Busy CPU time from ``/proc/stat`` minus the CPU time of this process and its waited-for
    children (``getrusage``), as a fraction of all cores over the interval. Linux only;
    ``None`` elsewhere. Use around ``subprocess.run``/``Popen.wait``.
    """

    def __enter__(self) -> OtherLoad:
        self.fraction: float | None = None
        try:
            self._stat = _proc_stat()
        except (OSError, ValueError, IndexError):
            self._stat = None
        self._own = _own_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stat is None:
            return
        try:
            total1, idle1 = _proc_stat()
        except (OSError, ValueError, IndexError):
            return
        hz = os.sysconf("SC_CLK_TCK")
        total = (total1 - self._stat[0]) / hz
        busy = total - (idle1 - self._stat[1]) / hz
        own = _own_cpu_s() - self._own
        if total > 0:
            self.fraction = min(1.0, max(0.0, (busy - own) / total))


def _own_cpu_s() -> float:
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_busy(interval_s: float = 0.5) -> float | None:
    """Fraction of all CPU time spent busy over ``interval_s`` (Linux ``/proc/stat``).

    Taken just before a timed run, it says whether something else was using the machine:
    on a small machine one busy core can halve a multi-threaded figure.
    """

    try:
        total0, idle0 = _proc_stat()
        time.sleep(interval_s)
        total1, idle1 = _proc_stat()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return (total - (idle1 - idle0)) / total if total > 0 else None


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15) -> float | None:
    """Wait (up to ``max_wait_s``) until the machine is at most ``threshold`` busy.

    Returns the last busy fraction measured, to be saved beside the figure it precedes.
    """
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy()
    while busy is not None and busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(1.0)
    return busy


def run_quietly(
    fn: Callable[[], dict[str, Any]],
    *,
    wait_quiet_s: float,
    retries: int,
    threshold: float = 0.1,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one timed measurement ``fn`` on a machine that other processes leave alone.

    Waits for the CPUs to be idle first; if other processes still took more than
    ``threshold`` of the machine while ``fn`` ran, the result is set aside and ``fn`` run
    again, at most ``retries`` more times. Each result records ``cpu_busy_before`` and
    ``other_load_during``. Returns the kept result and the set-aside ones (report both).
    """
    discarded: list[dict[str, Any]] = []
    for attempt in range(retries + 1):
        busy = wait_for_quiet(wait_quiet_s, threshold)
        with OtherLoad() as other:
            result = fn()
        result.update(cpu_busy_before=busy, other_load_during=other.fraction)
        if (other.fraction or 0.0) <= threshold or attempt == retries:
            return result, discarded
        discarded.append(result)
    raise AssertionError("unreachable")


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
        "dptrain_version": _dptrain_version(),
        "git_commit": _git_commit(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = list(os.getloadavg())
    return info


def _dptrain_version() -> str:
    from dptrain import __version__

    return __version__


def _git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with local changes), or None outside a git checkout."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


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


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    """Write a benchmark's result JSON (indented, newline-terminated) to ``out``, creating its
    directory; the path written."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def add_measurement_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every script in benchmarks/ shares: data location and noise handling."""
    from dptrain.config import default_data_root

    parser.add_argument("--data-root", default=default_data_root(),
                        help="dataset root (default: $DPTRAIN_DATA, else ./data)")
    parser.add_argument("--dataset", default="mnist", help="mnist (synthetic: a smoke test)")
    parser.add_argument("--wait-quiet", type=float, default=60.0,
                        help="before each run, wait up to this many seconds for the CPUs to be "
                             "idle")
    parser.add_argument("--retries", type=int, default=3,
                        help="re-run a measurement that other processes disturbed (>10%% CPU) "
                             "this often")
