"""What synchronous training costs on this machine, communication aside.

Two processes train the DDP tutorial's convnet (batch 64, one intra-op thread each, a fixed
synthetic batch: no data loading) side by side, four ways, rotating the order every round:

* ``none``: independent, no process group (the no-communication ceiling);
* ``sync``: a gloo all-reduce of one float after every backward (synchronisation only: each
  step waits for the slower process);
* ``sync_shm``: the same through dptrain's shared-memory segment (synchronisation with a
  ~30 us channel instead of gloo's ~1-2 ms one);
* ``ddp_gloo``: PyTorch's DistributedDataParallel with gloo's all-reduce of the gradients;
* ``ddp_shm``: the same with dptrain's shared-memory all-reduce hook (what ``dptrain train
  --strategy ddp`` uses on one CPU node).

In every mode both processes warm up, then start their clocks together (a file barrier: mode
``none`` has no process group; results before 2026-12-03 started ``none``'s two processes
without one, so their timed windows could overlap less than the others'). The figure per
mode is the global samples/s (sum over the two processes of 64 / step time);
the headline is the median over rounds of each mode's ratio to ``none`` in the same round.
If ``ddp_shm`` matches ``sync_shm``, what separates DDP from the ceiling is waiting for the
slower process at every step (per-step jitter, or one process slower throughout), not the
all-reduce; ``sync`` against ``sync_shm`` is what gloo's channel adds to one small collective
per step (what dptrain's DDP paid at every log sync point before 8424186). Every worker runs
with dptrain's tuned C heap (``--cpu-heap tuned``, as ``dptrain train``; ``--cpu-heap system``
for glibc's defaults).

Per step, every worker also records its compute time (the step less the all-reduce) and, in
``sync``, the all-reduce's time (the wait for the other process, mostly). From ``none``'s
per-step compute times of the two processes, ``E[max(A, B)]`` (each process's own
distribution, steps independent) is what a synchronised step would be if waiting for the
slower process were all it cost; the script compares it with ``sync``'s and ``sync_shm``'s
measured steps, and their compute with ``none``'s (does computing in lock-step slow the
compute itself?).

    python benchmarks/sync_cost.py --rounds 5 [--cpu-bind auto]

``--cpu-bind auto`` pins each worker to its own core (``dptrain.affinity``, what ``dptrain
train`` does by default), in every mode alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODES = ("none", "sync", "sync_shm", "ddp_gloo", "ddp_shm")
WARMUP = 30


def start_together(directory: str, rank: int, world: int = 2, timeout_s: float = 120.0) -> None:
    """A barrier without a process group (mode ``none`` has none): each rank leaves a file,
    then waits for all of them, so that independent processes time the same window."""
    Path(directory, f"ready-{rank}").touch()
    deadline = time.monotonic() + timeout_s
    while not all(Path(directory, f"ready-{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise SystemExit(f"rank {rank}: the other rank did not start in {timeout_s:g} s")
        time.sleep(1e-4)


def worker(rank: int, mode: str, port: int, steps: int) -> None:
    import torch
    import torch.distributed as dist

    from dptrain import heap
    from dptrain.models import build_model
    from dptrain.strategies import shm

    if os.environ.get("SYNC_COST_CPU_BIND", "none") != "none":  # --cpu-bind: as dptrain train
        from dptrain import affinity

        affinity.bind(os.environ["SYNC_COST_CPU_BIND"], rank, [1, 1], "cpu")
    torch.set_num_threads(1)
    heap.configure(os.environ.get("SYNC_COST_CPU_HEAP", "tuned"))
    if mode != "none":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2)
    torch.manual_seed(0)
    model = build_model("convnet")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if mode.startswith("ddp"):
        model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25.0,
                                                          broadcast_buffers=False)
    if mode in ("ddp_shm", "sync_shm"):
        def broadcast(obj: Any) -> Any:
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        def gather(obj: Any) -> list[Any]:
            out: list[Any] = [None, None]
            dist.all_gather_object(out, obj)
            return out

        state, _ = shm.connect(rank, 2, 60.0, None, required=True, broadcast=broadcast,
                               gather=gather)
        if mode == "ddp_shm":
            model.register_comm_hook(state, shm.allreduce_hook)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    one = torch.zeros(1)
    compute_ms, wait_ms = [], []
    for i in range(WARMUP + steps):
        if i == WARMUP:  # both ranks warm: start the clock together, in every mode
            start_together(os.environ["SYNC_COST_BARRIER_DIR"], rank)
            t0 = time.perf_counter()
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        waited = 0.0
        if mode in ("sync", "sync_shm"):
            w0 = time.perf_counter()
            dist.all_reduce(one) if mode == "sync" else state.all_reduce_(one)
            waited = time.perf_counter() - w0
        opt.step()
        if i >= WARMUP:
            compute_ms.append(1e3 * (time.perf_counter() - start - waited))
            wait_ms.append(1e3 * waited)
    ms = 1e3 * (time.perf_counter() - t0) / steps
    print(json.dumps({"rank": rank, "mode": mode, "step_ms": ms, "compute_ms": compute_ms,
                      "wait_ms": wait_ms}), flush=True)
    # no destroy_process_group: tearing down gloo under DDP once hung both ranks here
    os._exit(0)


def run_mode(mode: str, steps: int) -> dict[str, Any]:
    from dptrain.dist import free_port

    port = free_port()
    barrier = tempfile.mkdtemp(prefix="sync-cost-")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"),
           "SYNC_COST_BARRIER_DIR": barrier}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), mode, str(port),
                               str(steps)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in range(2)]
    ranks = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise SystemExit(f"{mode}: a worker failed ({p.returncode}):\n{err[-2000:]}")
            ranks.append(json.loads(out.strip().splitlines()[-1]))
    finally:  # a failed or hung rank: its peer is waiting in a collective, end both
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(barrier, ignore_errors=True)
    ranks.sort(key=lambda r: r["rank"])
    step_ms = [r["step_ms"] for r in ranks]
    return {"mode": mode, "step_ms": step_ms, "samples_per_s": sum(64e3 / t for t in step_ms),
            "compute_ms_mean": [statistics.fmean(r["compute_ms"]) for r in ranks],
            "wait_ms_mean": [statistics.fmean(r["wait_ms"]) for r in ranks],
            "compute_ms": [r["compute_ms"] for r in ranks]}


def expected_slower(a: list[float], b: list[float]) -> float:
    """E[max(A, B)] with A, B drawn independently from the samples ``a`` and ``b``."""
    import numpy as np

    return float(np.maximum.outer(np.asarray(a), np.asarray(b)).mean())


def lockstep(runs: dict[str, dict[str, Any]], mode: str) -> dict[str, float]:
    """A synchronised mode's step against waiting-for-the-slower alone (from ``none``), and
    its compute against ``none``'s."""
    none, sync = runs["none"], runs[mode]
    slower = expected_slower(*none["compute_ms"])
    sync_step = statistics.fmean(sync["step_ms"])
    none_compute = statistics.fmean(none["compute_ms_mean"])
    sync_compute = statistics.fmean(sync["compute_ms_mean"])
    return {"none_compute_ms": none_compute, "expected_slower_ms": slower,
            "sync_step_ms": sync_step, "sync_compute_ms": sync_compute,
            "sync_wait_ms": statistics.fmean(sync["wait_ms_mean"]),
            "sync_step_over_expected_slower": sync_step / slower,
            "sync_compute_over_none_compute": sync_compute / none_compute}


SYNCED = ("sync", "sync_shm")  # the modes lockstep() splits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--wait-quiet", type=float, default=60.0)
    p.add_argument("--cpu-bind", choices=("none", "auto"), default="none",
                   help="pin the two workers to one core each, as dptrain train --cpu-bind "
                        "auto does (every mode alike)")
    p.add_argument("--cpu-heap", choices=("tuned", "system"), default="tuned",
                   help="the workers' C heap, as dptrain train --cpu-heap")
    p.add_argument("--out", default=str(HERE / "results" / "sync_cost.json"))
    args = p.parse_args(argv)
    os.environ["SYNC_COST_CPU_BIND"] = args.cpu_bind  # the workers inherit it
    os.environ["SYNC_COST_CPU_HEAP"] = args.cpu_heap
    from dptrain.bench import machine_info, wait_for_quiet, write_result

    rounds = []
    for r in range(args.rounds):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        busy = wait_for_quiet(args.wait_quiet)
        runs = {m: run_mode(m, args.steps) for m in order}
        base = runs["none"]["samples_per_s"]
        ratios = {m: runs[m]["samples_per_s"] / base for m in MODES}
        split = {m: lockstep(runs, m) for m in SYNCED}
        for run in runs.values():
            run.pop("compute_ms")  # the raw per-step lists: summarised in split
        rounds.append({"order": list(order), "cpu_busy_before": busy, "runs": runs,
                       "ratio_to_none": ratios, "lockstep": split})
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(
            f"{m} {runs[m]['samples_per_s']:,.0f} ({ratios[m]:.3f})" for m in MODES)
              + "".join(f"  {m} step / E[slower] {split[m]['sync_step_over_expected_slower']:.3f}"
                      f", compute / none's {split[m]['sync_compute_over_none_compute']:.3f}"
                      for m in SYNCED), flush=True)
    headline = {m: {"median": statistics.median(x["ratio_to_none"][m] for x in rounds),
                    "min": min(x["ratio_to_none"][m] for x in rounds),
                    "max": max(x["ratio_to_none"][m] for x in rounds)} for m in MODES}
    result = {"benchmark": "sync_cost", "machine": machine_info(sys.argv),
              "config": {"model": "convnet", "batch_per_process": 64, "threads_per_process": 1,
                         "steps": args.steps, "warmup_steps": WARMUP, "rounds": args.rounds,
                         "data": "one fixed synthetic batch per process",
                         "cpu_bind": args.cpu_bind, "cpu_heap": args.cpu_heap},
              "rounds": rounds, "ratio_to_none_median": headline,
              "lockstep_median": {m: {k: statistics.median(x["lockstep"][m][k] for x in rounds)
                                      for k in rounds[0]["lockstep"][m]} for m in SYNCED}}
    for m in MODES[1:]:
        h = headline[m]
        print(f"{m:9s} / none: median {h['median']:.3f} ({h['min']:.3f}-{h['max']:.3f})")
    for m, split in result["lockstep_median"].items():
        for k, v in split.items():
            print(f"  {m} {k}: median {v:.3f}")
    print(f"wrote {write_result(result, args.out)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        raise SystemExit(0)
    raise SystemExit(main())
