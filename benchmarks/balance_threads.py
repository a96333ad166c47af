"""``--balance off`` vs ``auto`` on 2 CPU processes with unequal threads (``--threads 2,1``).

Each run is a fresh ``dptrain train --nproc 2 --threads 2,1 --batch-size B`` (global
micro-batch ``G = 2B``), the two configurations alternating, ``--repeats`` times each. The
figure of a run is its *steady* step time: the training time of the log windows after the
first (``--log-every`` steps each, from ``metrics.jsonl``: ``window steps x G / samples_per_s``)
divided by their steps -- so the warm-up, the balancing strategy's four measured steps and
evaluation are outside the clock, the same way for both configurations.

The optimum comes from what the ``auto`` runs measured: each rank's local compute speed
``s_r`` (samples/s of forward+backward under ``no_sync``, at equal shares, reported in
``summary.json`` as ``balance_speeds``). Equal shares cost ``max_r B / s_r`` of compute per
micro-batch; the best any split can do is ``G / sum_r s_r`` (every rank busy all the time).
The rest of a step (all-reduce, optimizer, loop) is not changed by balancing, so the
predicted optimum step time is the measured ``off`` step time minus the compute that the
balancing can save: ``off - (max_r B/s_r - G/sum s_r)``. Reported: medians over the
repeats, every run, the machine and its load (``uptime`` before and after)::

    python benchmarks/balance_threads.py --repeats 5 --max-steps 200 --data-root /tmp/mnistdata
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from dptrain.bench import add_measurement_flags, machine_info, mean_std, run_quietly

HERE = Path(__file__).resolve().parent
CONFIGS = ("off", "auto")


def run_config(balance: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{balance}-{time.monotonic_ns()}"
    cmd = [
        sys.executable, "-m", "dptrain", "train",
        "--dataset", args.dataset, "--data-root", args.data_root, "--model", args.model,
        "--nproc", "2", "--threads", args.threads, "--balance", balance,
        "--batch-size", str(args.batch_size), "--max-steps", str(args.max_steps),
        "--epochs", "1000", "--lr", "0.01", "--log-every", str(args.log_every),
        "--quiet", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: dptrain train failed ({proc.returncode}):\n"
                         f"{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "step_time_s": steady_step_time(out / "metrics.jsonl", summary["global_batch"],
                                        args.log_every),
        "train_samples_per_s": summary["train_samples_per_s"],
        "balance_speeds": summary.get("balance_speeds"),
        "balance_shares": summary.get("balance_shares"),
        "allreduce": summary.get("allreduce"),
        "test_accuracy": summary["test_accuracy"],
    }


def steady_step_time(metrics: Path, global_batch: int, log_every: int) -> float:
    """Seconds per optimizer step over the log windows after the first one."""
    windows = [json.loads(line) for line in metrics.read_text().splitlines()]
    windows = [w for w in windows if "loss" in w and w.get("samples_per_s")]
    later = [w for w in windows[1:] if w["step"] % log_every == 0]
    if not later:
        raise SystemExit("error: too few steps for a steady window; raise --max-steps")
    seconds = sum(log_every * global_batch / w["samples_per_s"] for w in later)
    return seconds / (log_every * len(later))


def optimum(run: dict[str, Any], batch: int) -> dict[str, float]:
    """Compute seconds per step, equal shares vs the best split, from measured speeds."""
    speeds = run["balance_speeds"]
    equal = max(batch / s for s in speeds)
    best = len(speeds) * batch / sum(speeds)
    return {"compute_equal_s": equal, "compute_best_s": best, "saving_s": equal - best}


def lscpu() -> dict[str, str]:
    """``lscpu``'s fields (model, sockets, cores, threads, caches, flags left out)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in fields.items() if k.strip() != "Flags"}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())


def measure(args: argparse.Namespace) -> tuple[dict[str, list[dict[str, Any]]], list]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    discarded: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dptrain-bench-") as tmp:
        for r in range(args.repeats):
            order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]  # alternate: noise falls alike
            for name in order:
                res, set_aside = run_quietly(partial(run_config, name, args, Path(tmp)),
                                             wait_quiet_s=args.wait_quiet, retries=args.retries)
                res["repeat"] = r
                runs[name].append(res)
                discarded.extend({"config": name, "repeat": r, **x} for x in set_aside)
                shares = f"  shares {res['balance_shares']}" if res["balance_shares"] else ""
                print(f"  repeat {r + 1}/{args.repeats} {name:4s} "
                      f"{res['step_time_s'] * 1e3:8.2f} ms/step{shares}", flush=True)
    return runs, discarded


def summarise(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace
              ) -> dict[str, Any]:
    off = statistics.median(x["step_time_s"] for x in runs["off"])
    auto = statistics.median(x["step_time_s"] for x in runs["auto"])
    saving = statistics.median(optimum(x, args.batch_size)["saving_s"] for x in runs["auto"])
    best = statistics.median(optimum(x, args.batch_size)["compute_best_s"]
                             for x in runs["auto"])
    return {
        "step_time_off_s": off,
        "step_time_auto_s": auto,
        "speedup_auto_vs_off": off / auto,
        "compute_equal_shares_s": statistics.median(
            optimum(x, args.batch_size)["compute_equal_s"] for x in runs["auto"]),
        "compute_best_split_s": best,
        "step_time_optimum_s": off - saving,
        "auto_fraction_of_possible_saving": (off - auto) / saving if saving > 0 else None,
        "step_time_s": {k: mean_std([x["step_time_s"] for x in v]) for k, v in runs.items()},
        "median_speeds_samples_per_s": [statistics.median(x["balance_speeds"][r]
                                                          for x in runs["auto"])
                                        for r in range(2)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each configuration")
    parser.add_argument("--max-steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--log-every", type=int, default=10, help="steps per timed window")
    parser.add_argument("--batch-size", type=int, default=64, help="per process (equal shares)")
    parser.add_argument("--threads", default="2,1", help="intra-op threads of rank 0, rank 1")
    parser.add_argument("--model", default="convnet")
    add_measurement_flags(parser)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "balance_threads.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.max_steps < 2 * args.log_every:
        parser.error("--repeats must be at least 1 and --max-steps at least 2 x --log-every")
    info = machine_info()
    info["uptime_at_start"] = uptime()
    info["lscpu"] = lscpu()
    runs, discarded = measure(args)
    info["uptime_at_end"] = uptime()
    result = {"benchmark": "balance_threads",
              "config": {"model": args.model, "dataset": args.dataset, "nproc": 2,
                         "threads": args.threads, "batch_size_per_process": args.batch_size,
                         "max_steps": args.max_steps, "log_every": args.log_every,
                         "repeats": args.repeats},
              "machine": info, **summarise(runs, args), "runs": runs,
              "set_aside_disturbed_runs": discarded}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.model}, 2 processes x threads {args.threads}, batch {args.batch_size}"
          f"/process, {args.repeats} repeats (medians), on {info['cpu_model']} "
          f"({info['cores']} cores); {info['uptime_at_end']}")
    print(f"  step time off  {result['step_time_off_s'] * 1e3:8.2f} ms")
    print(f"  step time auto {result['step_time_auto_s'] * 1e3:8.2f} ms "
          f"(x{result['speedup_auto_vs_off']:.2f})")
    print(f"  optimum        {result['step_time_optimum_s'] * 1e3:8.2f} ms (measured speeds "
          f"{[round(v) for v in result['median_speeds_samples_per_s']]} samples/s; compute "
          f"{result['compute_equal_shares_s'] * 1e3:.2f} ms equal -> "
          f"{result['compute_best_split_s'] * 1e3:.2f} ms best split)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
