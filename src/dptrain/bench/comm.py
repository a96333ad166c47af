"""All-reduce sweep: how long one all-reduce of ``S`` bytes takes among ``N`` processes.

``dptrain bench comm`` launches ``N`` fresh processes (gloo on CPU, nccl on CUDA), all-reduces
one float32 tensor per message size ``--iters`` times after a short warm-up and reports, with the
definitions of nccl-tests (``doc/PERFORMANCE.md``):

* ``time``: seconds per all-reduce -- each of ``--iters`` all-reduces is timed on its own
  (after a barrier), the slowest rank's time counts, and the median over the iterations is
  reported (one descheduled iteration on a shared machine does not move it; the mean is saved
  too);
* ``algbw = bytes / time``;
* ``busbw = algbw * 2 (n - 1) / n`` -- what each link of a ring carries, comparable to the
  link's own bandwidth whatever ``n`` is.

The main ``dptrain bench`` runs the same sweep to fit its all-reduce cost model
(:mod:`dptrain.bench.predict`).
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Any

from dptrain.errors import UsageError

DEFAULT_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M"
QUICK_SIZES = "4K,32K,256K,1M,4M"
MAX_SIZE = 4 * 1024**3  # bytes; nccl-tests' own sweeps stop well below (each rank holds two)
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
          "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """``"4K"``, ``"64MiB"``, ``"1024"`` -> bytes (binary units): a whole number of float32s,
    at most :data:`MAX_SIZE`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise UsageError(f"--sizes: cannot read {text!r} as a message size; use e.g. "
                         "4K,64K,1M,64M (K/M/G = KiB/MiB/GiB)")
    exact = float(m.group(1)) * _UNITS[unit]
    nbytes = int(exact)
    if nbytes < 4:
        raise UsageError(f"--sizes: {text!r} is below one float32 (4 bytes); use 4 or more")
    if nbytes != exact or nbytes % 4:
        raise UsageError(f"--sizes: {text!r} is {exact:g} bytes, not a whole number of "
                         f"float32s (4 bytes each); use e.g. {max(4, nbytes // 4 * 4)}")
    if nbytes > MAX_SIZE:
        raise UsageError(f"--sizes: {text!r} is over {fmt_bytes(MAX_SIZE)}, the largest "
                         "message the sweep measures (each process holds it, plus a copy)")
    return nbytes


def parse_sizes(text: str) -> list[int]:
    """A comma-separated list of sizes -> sorted, distinct byte counts."""
    from dptrain.errors import comma_list

    parts = comma_list("--sizes", text, "4K,64K,1M")
    sizes = [parse_size(p) for p in parts]
    if len(set(sizes)) < len(sizes):
        raise UsageError(f"--sizes {text!r} gives one size more than once (e.g. 4K and 4096); "
                         "give each once")
    return sorted(sizes)


def fmt_bytes(nbytes: float) -> str:
    """Bytes in binary units: ``4096`` -> ``"4 KiB"``."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{nbytes:.0f} B"


def algbw(nbytes: float, seconds: float) -> float:
    """Algorithm bandwidth in bytes/s: message size over time (nccl-tests)."""
    return nbytes / seconds


def busbw(nbytes: float, seconds: float, n: int) -> float:
    """Bus bandwidth in bytes/s: ``algbw * 2 (n - 1) / n`` for all-reduce (nccl-tests)."""
    return algbw(nbytes, seconds) * 2 * (n - 1) / n


def comm_worker(sizes: list[int], iters: int, warmup: int, device: str,
                timeout_s: float = 300.0, cpu_allreduce: str = "auto") -> dict[str, Any]:
    """One rank of the sweep (module-level: the elastic launcher spawns it).

    It times the all-reduce that DDP's gradients take with the same settings: NCCL on CUDA; on
    CPU the shared-memory path between processes of one node (``cpu_allreduce`` auto/shm),
    gloo otherwise. Returns, on every rank, the backend, that path and per size the slowest
    rank's seconds.
    """
    import torch
    import torch.distributed as tdist

    from dptrain import dist, strategies
    from dptrain.config import TrainConfig
    from dptrain.plan import make_plan

    env = dist.detect()
    torch.set_num_threads(1)  # the reduction is not what we time; leave cores to peers
    plan = make_plan(TrainConfig(strategy="ddp", device=device, timeout_s=timeout_s,
                                 cpu_allreduce=cpu_allreduce), env)
    strategy = strategies.build(plan, env)
    dev = strategy.device
    backend = strategy.backend
    strategy.setup()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    try:
        strategy.connect_shm()
        all_reduce = strategy.shm.all_reduce_ if strategy.shm is not None else tdist.all_reduce
        # line the ranks up before each timed call with the path itself: leaving a gloo barrier
        # can be ~1 ms apart, more than a whole shared-memory all-reduce
        token = torch.zeros(1)
        barrier = ((lambda: strategy.shm.all_reduce_(token)) if strategy.shm is not None
                   else tdist.barrier)
        warm = torch.zeros(max(sizes) // 4, dtype=torch.float32, device=dev)
        for _ in range(max(warmup, 1)):  # connections and buffers set up before any timing
            all_reduce(warm)
        del warm
        points = []
        for nbytes in sizes:
            buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=dev)
            for _ in range(warmup):
                all_reduce(buf)
            times = torch.zeros(iters, dtype=torch.float64)
            for i in range(iters):
                sync()
                barrier()
                start = time.perf_counter()
                all_reduce(buf)
                sync()
                times[i] = time.perf_counter() - start
            # the slowest rank sets the pace of each all-reduce
            times = times.to(dev)
            tdist.all_reduce(times, op=tdist.ReduceOp.MAX)
            per_iter = times.cpu().tolist()
            points.append({"bytes": nbytes, "time_s": statistics.median(per_iter),
                           "mean_time_s": statistics.fmean(per_iter), "times_s": per_iter})
            del buf
        return {"backend": backend, "allreduce": strategy.allreduce_path,
                "device": str(dev.type), "points": points}
    finally:
        strategy.teardown()


def feasible(n: int, device: str) -> str | None:
    """``None`` if a sweep over ``n`` processes can run here, else the reason it cannot."""
    import torch

    if n < 2:
        return "an all-reduce needs at least 2 processes"
    if device != "cpu" and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if n > gpus:
            return f"nccl needs one GPU per process: {n} processes, {gpus} GPU(s) visible"
    elif device == "cuda":
        return "--device cuda but no CUDA GPU is visible"
    return None


def run_sweep(n: int, sizes: list[int], *, iters: int, warmup: int = 3,
              device: str = "auto") -> dict[str, Any]:
    """Launch ``n`` fresh processes and sweep; one record per size with time, algbw, busbw."""
    from dptrain.launch import launch

    started = time.perf_counter()
    result = launch(comm_worker, (sizes, iters, warmup, device), nproc=n, fast_exit=True)[0]
    for p in result["points"]:
        p["n"] = n
        p["algbw_Bps"] = algbw(p["bytes"], p["time_s"])
        p["busbw_Bps"] = busbw(p["bytes"], p["time_s"], n)
    result.update(n=n, iters=iters, warmup=warmup, wall_s=time.perf_counter() - started)
    return result


def sweep_table(sweeps: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: processes, size, time, algbw, busbw."""
    rows = ["| processes | size | time (µs) | algbw (GB/s) | busbw (GB/s) |",
            "| ---: | ---: | ---: | ---: | ---: |"]
    for sweep in sweeps:
        for p in sweep["points"]:
            rows.append(f"| {p['n']} | {fmt_bytes(p['bytes'])} | {p['time_s'] * 1e6:,.1f} | "
                        f"{p['algbw_Bps'] / 1e9:.3f} | {p['busbw_Bps'] / 1e9:.3f} |")
    return rows
