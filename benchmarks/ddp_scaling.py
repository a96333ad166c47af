"""DDP scaling on CPU: one process vs two DDP processes vs two independent processes.

The convnet, batch 64 per process, ONE intra-op thread per process, the same number of
optimizer steps (``--max-steps``) in every run, each run a fresh ``dptrain train``:

* ``single``:  1 process (``--strategy single --nproc 1 --threads 1``);
* ``ddp2``:    2 DDP processes (``--strategy ddp --nproc 2 --threads 1``), gradients through
  shared memory (the default on one node, ``--cpu-allreduce auto``);
* ``ddp2_gloo``: the same with ``--cpu-allreduce gloo``: gradients over gloo's TCP all-reduce,
  what PyTorch's DDP does on CPU by itself;
* ``ceiling``: 2 independent single processes started together, no communication: the sum of
  their samples/s is what 2 processes can do on this machine with perfect communication.

The figure of each run is ``train_samples_per_s`` from ``summary.json`` (global, warm-up step
excluded, evaluation excluded). The three are run in rotating order, ``--repeats`` times::

    python benchmarks/ddp_scaling.py --repeats 3 --max-steps 300 --data-root /tmp/mnistdata
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from dptrain.bench import add_measurement_flags, machine_info, mean_std, run_quietly

HERE = Path(__file__).resolve().parent
CONFIGS = ("single", "ddp2", "ceiling", "ddp2_gloo")


def train_cmd(args: argparse.Namespace, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dptrain", "train",
        "--dataset", args.dataset, "--data-root", args.data_root,
        "--model", args.model, "--batch-size", str(args.batch_size),
        "--max-steps", str(args.max_steps), "--epochs", "1000", "--lr", "0.01",
        "--threads", "1", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


def _finish(proc: subprocess.Popen, out: Path) -> dict[str, Any]:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"error: dptrain train failed ({proc.returncode}):\n{stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    window = _train_window(out)
    return {
        "samples_per_s": summary["train_samples_per_s"],
        "train_time_s": summary.get("train_time_s"),
        "steps": summary["steps"],
        "world_size": summary["world_size"],
        "allreduce": summary.get("allreduce"),
        "test_accuracy": summary["test_accuracy"],
        "window": window,
    }


def _train_window(out: Path) -> list[float] | None:
    """Wall-clock times of the first and last logged training step (from metrics.jsonl)."""
    times = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and "time" in record:
            times.append(record["time"])
    return [times[0], times[-1]] if len(times) >= 2 else None


def run_config(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    stamp = time.monotonic_ns()
    if name == "single":
        out = workdir / f"single-{stamp}"
        proc = subprocess.Popen(
            train_cmd(args, out, "--strategy", "single", "--nproc", "1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        return _finish(proc, out)
    if name in ("ddp2", "ddp2_gloo"):
        out = workdir / f"{name}-{stamp}"
        path = "gloo" if name == "ddp2_gloo" else "auto"
        proc = subprocess.Popen(
            train_cmd(args, out, "--strategy", "ddp", "--nproc", "2", "--cpu-allreduce", path),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        return _finish(proc, out)
    # ceiling: two independent processes, started together
    outs = [workdir / f"ceiling{i}-{stamp}" for i in range(2)]
    procs = [
        subprocess.Popen(
            train_cmd(args, out, "--strategy", "single", "--nproc", "1", "--seed", str(i)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i, out in enumerate(outs)
    ]  # fmt: skip
    parts = [_finish(p, o) for p, o in zip(procs, outs, strict=True)]
    windows = [p["window"] for p in parts]
    overlap = None
    if all(windows):
        (a0, a1), (b0, b1) = windows
        overlap = max(0.0, min(a1, b1) - max(a0, b0)) / max(a1 - a0, b1 - b0)
    return {
        "samples_per_s": sum(p["samples_per_s"] for p in parts),
        "parts": parts,
        # fraction of the longer training window during which both processes were training
        "overlap": overlap,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration")
    parser.add_argument("--max-steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--model", default="convnet")
    add_measurement_flags(parser)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ddp_scaling.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.max_steps < 2:
        parser.error("--repeats must be at least 1 and --max-steps at least 2")

    info = machine_info()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    discarded: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dptrain-bench-") as tmp:
        for r in range(args.repeats):
            k = r % len(CONFIGS)
            order = CONFIGS[k:] + CONFIGS[:k]  # rotate: noise falls on all alike
            for name in order:
                res, set_aside = run_quietly(
                    partial(run_config, name, args, Path(tmp)),
                    wait_quiet_s=args.wait_quiet,
                    retries=args.retries,
                )
                res["repeat"] = r
                runs[name].append(res)
                discarded.extend({"config": name, "repeat": r, **x} for x in set_aside)
                extra = ""
                if res.get("overlap") is not None:
                    extra = f"  overlap {res['overlap']:.2f}"
                print(
                    f"  repeat {r + 1}/{args.repeats} {name:8s} "
                    f"{res['samples_per_s']:>9,.0f} samples/s{extra}  "
                    f"(others: {_pct(res['cpu_busy_before'])} before, "
                    f"{_pct(res['other_load_during'])} during; {len(set_aside)} set aside)",
                    flush=True,
                )
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = list(os.getloadavg())

    stats = {k: mean_std([x["samples_per_s"] for x in v]) for k, v in runs.items()}
    speedup = stats["ddp2"]["mean"] / stats["single"]["mean"]
    of_ceiling = stats["ddp2"]["mean"] / stats["ceiling"]["mean"]
    ceiling_speedup = stats["ceiling"]["mean"] / stats["single"]["mean"]
    gloo_speedup = stats["ddp2_gloo"]["mean"] / stats["single"]["mean"]
    result = {
        "benchmark": "ddp_scaling",
        "config": {
            "model": args.model,
            "dataset": args.dataset,
            "batch_size_per_process": args.batch_size,
            "threads_per_process": 1,
            "max_steps": args.max_steps,
            "repeats": args.repeats,
            "backend": "gloo",
            "allreduce": {name: sorted({x.get("allreduce") for x in runs[name]})
                          for name in ("ddp2", "ddp2_gloo")},
        },
        "machine": info,
        "samples_per_s": stats,
        "speedup_2proc_vs_1proc": speedup,
        "ddp2_fraction_of_ceiling": of_ceiling,
        "ceiling_speedup_vs_1proc": ceiling_speedup,
        "gloo_speedup_2proc_vs_1proc": gloo_speedup,
        "target_speedup": 1.7,
        "runs": runs,
        "set_aside_disturbed_runs": discarded,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\n{args.model}, batch {args.batch_size}/process, 1 thread/process, "
        f"{args.max_steps} steps, {args.repeats} repeat(s) on {info['cpu_model']} "
        f"({info['cores']} cores)"
    )
    print(f"{'configuration':<36}{'samples/s (mean ± std)':>26}")
    labels = {
        "single": "1 process",
        "ddp2": "2 DDP processes (shared memory)",
        "ceiling": "2 independent processes (ceiling)",
        "ddp2_gloo": "2 DDP processes (gloo TCP)",
    }
    for name in CONFIGS:
        s = stats[name]
        print(f"{labels[name]:<36}{s['mean']:>14,.0f} ± {s['std']:<9,.0f}")
    print(
        f"2-proc DDP / 1-proc: {speedup:.2f}x   DDP / ceiling: {of_ceiling:.2f}   "
        f"ceiling / 1-proc: {ceiling_speedup:.2f}x   target: 2-proc >= 1.7x 1-proc\n"
        f"with gloo's TCP all-reduce instead: {gloo_speedup:.2f}x"
    )
    busy = [x["other_load_during"] or 0 for v in runs.values() for x in v]
    busy = [b for b in busy if b > 0.1]
    if busy:
        print(
            f"warning: {len(busy)} kept run(s) shared the machine with other processes "
            f"(up to {max(busy):.0%} CPU in use): their figures are depressed"
        )
    print(f"written {args.out}")
    return 0


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    raise SystemExit(main())
