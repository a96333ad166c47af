"""DDP scaling on CPU: one process vs two DDP processes vs two independent processes.

The convnet, batch 64 per process, ONE intra-op thread per process, the same number of
optimizer steps (``--max-steps``) in every run, each run a fresh ``dptrain train``:

* ``ddp1``:    1 DDP process (``--strategy ddp --nproc 1 --threads 1``): DDP's own per-step
  work (reducer, autograd hooks, launcher) without a peer; the base of the prediction;
* ``single``:  1 process (``--strategy single --nproc 1 --threads 1``);
* ``ddp2``:    2 DDP processes (``--strategy ddp --nproc 2 --threads 1``), gradients through
  shared memory (the default on one node, ``--cpu-allreduce auto``);
* ``ddp2_gloo``: the same with ``--cpu-allreduce gloo``: gradients over gloo's TCP all-reduce,
  what PyTorch's DDP does on CPU by itself;
* ``ceiling``: 2 independent single processes started together, no communication: the sum of
  their samples/s is what 2 processes can do on this machine with perfect communication.
  Started together, one often trains while the other still imports and loads, so the script
  also reports ``ceiling_concurrent``: their samples/s over the window in which both were
  training (cut on their ``metrics.jsonl`` records, one per step in all runs: ``LOG_EVERY``).

The figure of each run is ``train_samples_per_s`` from ``summary.json`` (global, warm-up step
excluded, evaluation excluded).

Rounds (``--repeats``): each round runs the five configurations back to back, in the order
above on even rounds and reversed on odd ones (ABBA: ``ddp2`` always sits between ``single``
and ``ceiling``, and a drift of the machine falls on both sides alike). The headline figures
are per-round ratios (2-DDP / ceiling, 2-DDP / 1-process, for both all-reduce paths) and their
median, min and max over the rounds -- single pairs on a shared 2-core VM swing a lot, the
median of paired ratios much less.

Prediction: each round also predicts the 2-process DDP samples/s with dptrain's own predictor
(:mod:`dptrain.bench.predict`: ``contention_factor`` + ``scaling_table``) from what was
measured WITHOUT running 2-process DDP training:

* the 1-process DDP run (``ddp1``; ``dptrain bench`` too bases its predictions on DDP at one
  process): its step time ``batch / samples_per_s`` (data gather, forward, backward, DDP's
  hooks and optimizer: ``dptrain train`` does not split them; with one gradient bucket the
  split does not change the prediction). The prediction from the plain ``single`` run instead
  is saved beside it (``from_single``): it misses DDP's per-step work;
* the ceiling run: how two processes contend for the cores, the contention factor
  ``k(2) = (2 batch / ceiling samples_per_s) / (batch / single samples_per_s)``, with the
  ceiling's common-window rate (``ceiling_concurrent``; the whole-run sum if that window is
  under 1 s); and, from the same window, the two processes' per-step times: DDP waits for the
  slower process at every step, so the step is ``straggler_factor`` = E[max of 2 step times] /
  E[step time] longer (each step's times taken as independent; the prediction without this
  factor is saved beside it, ``without_straggler``);
* an all-reduce sweep among 2 fresh processes with ``dptrain.bench.comm.comm_worker`` (what
  ``dptrain bench`` runs: one all-reduce of each size timed after a barrier, slowest rank,
  median of ``--comm-iters``) over the shared-memory path and over gloo, fitted with
  ``fit_cost_model`` (alpha + bytes / beta); the model's gradient (one DDP bucket) costs
  ``fit.time(grad_bytes, 2)``.

Per round: predicted vs measured 2-DDP samples/s, the signed error in percent, and the median
error over the rounds::

    python benchmarks/ddp_scaling.py --repeats 7 --max-steps 300 --data-root /tmp/mnistdata
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from dptrain.bench import add_measurement_flags, machine_info, mean_std, run_quietly, write_result
from dptrain.bench import predict as P

HERE = Path(__file__).resolve().parent
CONFIGS = ("ddp1", "single", "ddp2", "ceiling", "ddp2_gloo")
COMM_PATHS = {"ddp2": "auto", "ddp2_gloo": "gloo"}  # the --cpu-allreduce of each DDP config
BUCKET_CAP_MB = 25.0  # dptrain train's default --bucket-cap-mb
TARGET_OF_CEILING = 0.95
TARGET_ERROR_PCT = 10.0
TARGET_SPEEDUP = 1.7
LOG_EVERY = 1  # steps between metrics.jsonl records: per-step times, and the ceiling's window
RATIOS = {  # name -> (numerator, denominator)
    "ddp2_over_ceiling": ("ddp2", "ceiling"),
    "ddp2_over_single": ("ddp2", "single"),
    "ddp2_gloo_over_ceiling": ("ddp2_gloo", "ceiling"),
    "ddp2_gloo_over_single": ("ddp2_gloo", "single"),
    "ceiling_over_single": ("ceiling", "single"),
    # against the ceiling's common window (both processes training): see concurrent_rate
    "ddp2_over_ceiling_concurrent": ("ddp2", "ceiling_concurrent"),
    "ceiling_concurrent_over_single": ("ceiling_concurrent", "single"),
}


# ------------------------------------------------------------------ pure helpers (unit-tested)
def round_order(r: int, configs: Sequence[str] = CONFIGS) -> list[str]:
    """The configurations of round ``r``: as given on even rounds, reversed on odd ones."""
    return list(configs) if r % 2 == 0 else list(reversed(configs))


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the values (in round order) of a per-round figure."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals), "values": vals}


def round_ratios(sps: dict[str, float]) -> dict[str, float]:
    """The per-round ratios of :data:`RATIOS` from one round's samples/s per configuration."""
    return {name: sps[a] / sps[b] for name, (a, b) in RATIOS.items() if a in sps and b in sps}


def predict_ddp2(*, base_sps: float, single_sps: float, ceiling_sps: float, batch: int,
                 grad_bytes: int, fit: P.Fit, bucket_cap_mb: float = BUCKET_CAP_MB,
                 step_times: Sequence[float] | None = None) -> dict[str, Any]:
    """dptrain's prediction of 2-process DDP samples/s (nothing from a 2-process DDP run).

    ``base_sps``: the 1-process run the step time comes from (``dptrain bench`` bases its
    predictions on 1-process DDP, which carries DDP's own per-step work); ``single_sps`` and
    ``ceiling_sps``: one plain process alone and two together, for the contention factor;
    ``fit``: the all-reduce cost; ``step_times``: the ceiling's per-step times (both
    processes), for :func:`dptrain.bench.predict.straggler_factor` (1 without them).
    """
    step1 = batch / base_sps  # one process: all of its step (data included)
    step_single = batch / single_sps
    step_ceiling = 2 * batch / ceiling_sps  # per process, two processes without communication
    measured_k = {2: step_ceiling / step_single}
    straggler = P.straggler_factor(step_times, 2) if step_times else 1.0

    def predicted(factor: float) -> dict[str, float]:
        return P.scaling_table(
            compute_s=step1, data_s=0.0, batch=batch, grad_bytes=grad_bytes,
            bucket_cap_mb=bucket_cap_mb, cost=fit.time,
            contention=lambda n: P.contention_factor(n, measured_k, cpu=True),
            straggler=lambda n: factor, ns=(2,))[0]

    row, plain = predicted(straggler), predicted(1.0)
    return {"predicted_samples_per_s": row["samples_per_s"], "predicted_step_s": row["step_s"],
            "without_straggler": {"predicted_samples_per_s": plain["samples_per_s"],
                                  "predicted_step_s": plain["step_s"]},
            "straggler_factor": straggler,
            "step_1proc_s": step1, "step_single_s": step_single,
            "step_ceiling_per_proc_s": step_ceiling,
            "contention_factor": measured_k[2], "comm_exposed_s": row["comm_exposed_s"],
            "allreduce_s": fit.time(grad_bytes, 2), "buckets": row["buckets"],
            "grad_bytes": grad_bytes, "fit": fit.to_dict()}


def concurrent_rate(logs: Sequence[Sequence[Sequence[float]]], batch: int,
                    min_window_s: float = 1.0) -> dict[str, Any] | None:
    """Samples/s of independent processes over the window in which ALL of them were training.

    ``logs``: per process, ``[time, step]`` records in time order. Each process's steps in the
    common window ``[latest first record, earliest last record]`` are interpolated linearly
    between its records; its rate is those steps x ``batch`` / the window. Starting together,
    one process often trains while the other is still importing and loading (which takes a
    core too), so the whole-run sum mixes in time when they did not contend as in DDP.
    ``None`` if the common window is shorter than ``min_window_s``.
    """
    if any(len(log) < 2 for log in logs):
        return None
    start = max(log[0][0] for log in logs)
    end = min(log[-1][0] for log in logs)
    if end - start < min_window_s:
        return None

    def step_at(log: Sequence[Sequence[float]], t: float) -> float:
        for (t0, s0), (t1, s1) in zip(log, log[1:], strict=False):
            if t0 <= t <= t1:
                return s0 + (s1 - s0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
        raise AssertionError("t outside the log")

    rates = [batch * (step_at(log, end) - step_at(log, start)) / (end - start) for log in logs]
    return {"samples_per_s": sum(rates), "per_process": rates, "window_s": end - start,
            "start": start, "end": end}


def step_times(log: Sequence[Sequence[float]], start: float = -math.inf,
               end: float = math.inf) -> list[float]:
    """Seconds per step between consecutive ``[time, step]`` records within ``[start, end]``
    (a record covering several steps counts as that many steps of its mean time)."""
    times = []
    for (t0, s0), (t1, s1) in zip(log, log[1:], strict=False):
        if start <= t0 and t1 <= end and s1 > s0:
            times.extend([(t1 - t0) / (s1 - s0)] * int(s1 - s0))
    return times


def ceiling_step_times(run: dict[str, Any]) -> list[float]:
    """Both ceiling processes' per-step times, over the window in which both trained (the
    whole runs where there is none)."""
    both = run.get("concurrent") or {}
    start, end = both.get("start", -math.inf), both.get("end", math.inf)
    return [t for part in run["parts"] for t in step_times(part["log"], start, end)]


def time_stats(times: Sequence[float]) -> dict[str, Any] | None:
    """Mean, median, 90th percentile and coefficient of variation of per-step times."""
    if len(times) < 2:
        return None
    mean = statistics.fmean(times)
    return {"mean_s": mean, "median_s": statistics.median(times),
            "p90_s": statistics.quantiles(times, n=10)[-1],
            "cv": statistics.stdev(times) / mean, "steps": len(times)}


def ceiling_for_prediction(run: dict[str, Any]) -> tuple[float, str]:
    """The ceiling samples/s the prediction uses: the common-window rate where there is one."""
    both = run.get("concurrent")
    if both:
        return both["samples_per_s"], "concurrent window"
    return run["samples_per_s"], "whole runs (no common window of 1 s)"


def check(value: float | None, ok: bool) -> str:
    return "n/a" if value is None else ("met" if ok else "NOT met")


# ------------------------------------------------------------------------------ measurements
def train_cmd(args: argparse.Namespace, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dptrain", "train",
        "--dataset", args.dataset, "--data-root", args.data_root,
        "--model", args.model, "--batch-size", str(args.batch_size),
        "--max-steps", str(args.max_steps), "--epochs", "1000", "--lr", "0.01",
        "--threads", "1", "--log-every", str(LOG_EVERY), "--quiet", "--out", str(out),
        *extra,
    ]  # fmt: skip


def _finish(proc: subprocess.Popen, out: Path) -> dict[str, Any]:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"error: dptrain train failed ({proc.returncode}):\n{stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    log = _train_log(out)
    return {
        "samples_per_s": summary["train_samples_per_s"],
        "train_time_s": summary.get("train_time_s"),
        "steps": summary["steps"],
        "world_size": summary["world_size"],
        "allreduce": summary.get("allreduce"),
        "grad_bytes": summary.get("grad_bytes"),
        "test_accuracy": summary["test_accuracy"],
        "window": [log[0][0], log[-1][0]] if len(log) >= 2 else None,
        "step_times": time_stats(step_times(log)),
        "log": log,
    }


def _train_log(out: Path) -> list[list[float]]:
    """``[time, step]`` of every logged training step (from metrics.jsonl)."""
    log = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and "time" in record:
            log.append([record["time"], record["step"]])
    return log


def run_config(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    stamp = time.monotonic_ns()
    one_process = {"single": ("--strategy", "single", "--nproc", "1"),
                   "ddp1": ("--strategy", "ddp", "--nproc", "1")}
    if name in one_process or name in COMM_PATHS:
        flags = one_process.get(name) or ("--strategy", "ddp", "--nproc", "2",
                                          "--cpu-allreduce", COMM_PATHS[name])
        out = workdir / f"{name}-{stamp}"
        proc = subprocess.Popen(train_cmd(args, out, *flags), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
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
    both = concurrent_rate([p["log"] for p in parts], args.batch_size)
    return {
        "samples_per_s": sum(p["samples_per_s"] for p in parts),
        "parts": parts,
        # fraction of the longer training window during which both processes were training
        "overlap": overlap,
        # samples/s of the two together over the window in which both were training
        "concurrent": both,
    }


# The all-reduce sweep of `dptrain bench` (dptrain.bench.comm.run_sweep), in a fresh launcher
# process, with the CPU all-reduce path chosen (run_sweep itself always takes "auto").
_SWEEP = """
import json, sys
from dptrain.bench.comm import algbw, busbw, comm_worker
from dptrain.launch import launch
sizes, iters, warmup, path = json.loads(sys.argv[1])
res = launch(comm_worker, (sizes, iters, warmup, "cpu", 300.0, path), nproc=2)[0]
for p in res["points"]:
    p.update(n=2, algbw_Bps=algbw(p["bytes"], p["time_s"]),
             busbw_Bps=busbw(p["bytes"], p["time_s"], 2))
print(json.dumps(res))
"""


def comm_sizes(grad_bytes: int) -> list[int]:
    """Message sizes of the sweep: the gradient's own size and a few around it."""
    return sorted({4096, 32768, -(-grad_bytes // 4) * 4, 262144, 1048576})


def run_comm(path: str, sizes: list[int], args: argparse.Namespace) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _SWEEP, json.dumps([sizes, args.comm_iters, 3, path])],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"error: all-reduce sweep ({path}) failed:\n{proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    fit = P.fit_cost_model([(p["n"], p["bytes"], p["time_s"]) for p in res["points"]])
    for p in res["points"]:
        p.pop("times_s", None)  # keep the JSON readable: median and mean stay
    res["fit"] = fit.to_dict()
    res["samples_per_s"] = 0.0  # not a throughput; keeps the printing uniform
    return res


def grad_bytes_of(model: str) -> int:
    from dptrain.models import build_model

    return sum(p.numel() * p.element_size() for p in build_model(model).parameters()
               if p.requires_grad)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=7,
                        help="rounds; each runs every configuration once (alternating order)")
    parser.add_argument("--max-steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--comm-iters", type=int, default=20,
                        help="all-reduces timed per message size in each round's sweep")
    add_measurement_flags(parser)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ddp_scaling.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.max_steps < 2 or args.comm_iters < 1:
        parser.error("--repeats and --comm-iters must be at least 1 and --max-steps at least 2")

    info = machine_info()
    grad_bytes = grad_bytes_of(args.model)
    sizes = comm_sizes(grad_bytes)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    comm: dict[str, list[dict[str, Any]]] = {name: [] for name in COMM_PATHS}
    rounds: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dptrain-bench-") as tmp:
        for r in range(args.repeats):
            # the sweeps first (they predict this round's DDP), then the trainings, ABBA
            steps = [f"comm:{n}" for n in COMM_PATHS] + round_order(r)
            here: dict[str, dict[str, Any]] = {}
            for step in steps:
                if step.startswith("comm:"):
                    cfg = step.split(":", 1)[1]
                    fn = partial(run_comm, COMM_PATHS[cfg], sizes, args)
                else:
                    fn = partial(run_config, step, args, Path(tmp))
                res, set_aside = run_quietly(fn, wait_quiet_s=args.wait_quiet,
                                             retries=args.retries)
                res["repeat"] = r
                here[step] = res
                if step.startswith("comm:"):
                    comm[step.split(":", 1)[1]].append(res)
                else:
                    runs[step].append(res)
                discarded.extend({"config": step, "repeat": r, **x} for x in set_aside)
                if step.startswith("comm:"):
                    fit = res["fit"]
                    what = (f"all-reduce {res['allreduce']}: "
                            f"{P.Fit(**fit).time(grad_bytes, 2) * 1e6:,.0f} µs per "
                            f"{grad_bytes:,} B gradient (fit rms {fit['rel_rms']:.0%})")
                else:
                    what = f"{res['samples_per_s']:>9,.0f} samples/s"
                    if res.get("overlap") is not None:
                        what += f"  overlap {res['overlap']:.2f}"
                    if res.get("concurrent"):
                        what += (f"  both training: {res['concurrent']['samples_per_s']:,.0f}"
                                 f" over {res['concurrent']['window_s']:.1f} s")
                print(
                    f"  round {r + 1}/{args.repeats} {step:14s} {what}  "
                    f"(others: {_pct(res['cpu_busy_before'])} before, "
                    f"{_pct(res['other_load_during'])} during; {len(set_aside)} set aside)",
                    flush=True,
                )
            sps = {name: here[name]["samples_per_s"] for name in CONFIGS}
            if here["ceiling"].get("concurrent"):
                sps["ceiling_concurrent"] = here["ceiling"]["concurrent"]["samples_per_s"]
            rnd: dict[str, Any] = {"round": r, "order": steps, "samples_per_s": sps,
                                   "ratios": round_ratios(sps), "prediction": {}}
            ceiling_sps, ceiling_source = ceiling_for_prediction(here["ceiling"])
            ceiling_times = ceiling_step_times(here["ceiling"])
            rnd["ceiling_step_times"] = time_stats(ceiling_times)
            for cfg in COMM_PATHS:
                fit = P.Fit(**here[f"comm:{cfg}"]["fit"])
                common = dict(single_sps=sps["single"], ceiling_sps=ceiling_sps,
                              batch=args.batch_size, grad_bytes=grad_bytes, fit=fit,
                              step_times=ceiling_times)
                pred = predict_ddp2(base_sps=sps["ddp1"], **common)
                pred["base"] = "ddp1"
                # the same from the plain 1-process run: misses DDP's own per-step work
                alt = predict_ddp2(base_sps=sps["single"], **common)
                pred["from_single"] = {
                    "predicted_samples_per_s": alt["predicted_samples_per_s"],
                    "error_pct": P.prediction_error(alt["predicted_samples_per_s"], sps[cfg])}
                pred["ceiling_samples_per_s"] = ceiling_sps
                pred["ceiling_source"] = ceiling_source
                pred["allreduce_path"] = here[f"comm:{cfg}"]["allreduce"]
                pred["measured_samples_per_s"] = sps[cfg]
                pred["error_pct"] = P.prediction_error(pred["predicted_samples_per_s"], sps[cfg])
                pred["without_straggler"]["error_pct"] = P.prediction_error(
                    pred["without_straggler"]["predicted_samples_per_s"], sps[cfg])
                rnd["prediction"][cfg] = pred
            rounds.append(rnd)
            print(
                f"  round {r + 1}: DDP/ceiling {rnd['ratios']['ddp2_over_ceiling']:.3f}  "
                f"DDP/1-proc {rnd['ratios']['ddp2_over_single']:.2f}x  "
                f"predicted {rnd['prediction']['ddp2']['predicted_samples_per_s']:,.0f} "
                f"({rnd['prediction']['ddp2']['error_pct']:+.1f} %; straggler factor "
                f"{rnd['prediction']['ddp2']['straggler_factor']:.3f}, without it "
                f"{rnd['prediction']['ddp2']['without_straggler']['error_pct']:+.1f} %)",
                flush=True)
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = list(os.getloadavg())

    stats = {k: mean_std([x["samples_per_s"] for x in v]) for k, v in runs.items()}
    for k, v in runs.items():
        stats[k]["median"] = statistics.median(x["samples_per_s"] for x in v)
    ratios = {name: spread([rnd["ratios"][name] for rnd in rounds if name in rnd["ratios"]])
              for name in RATIOS}
    errors = {cfg: spread([rnd["prediction"][cfg]["error_pct"] for rnd in rounds])
              for cfg in COMM_PATHS}
    errors_single = {cfg: spread([rnd["prediction"][cfg]["from_single"]["error_pct"]
                                  for rnd in rounds]) for cfg in COMM_PATHS}
    errors_plain = {cfg: spread([rnd["prediction"][cfg]["without_straggler"]["error_pct"]
                                 for rnd in rounds]) for cfg in COMM_PATHS}
    stragglers = spread([rnd["prediction"]["ddp2"]["straggler_factor"] for rnd in rounds])
    of_ceiling = ratios["ddp2_over_ceiling"]["median"]
    speedup = ratios["ddp2_over_single"]["median"]
    err = errors["ddp2"]["median"]
    targets = {
        "ddp2_over_ceiling_median_at_least": TARGET_OF_CEILING,
        "ddp2_over_ceiling_met": of_ceiling >= TARGET_OF_CEILING,
        "speedup_2proc_vs_1proc_median_at_least": TARGET_SPEEDUP,
        "speedup_met": speedup >= TARGET_SPEEDUP,
        "prediction_abs_median_error_pct_at_most": TARGET_ERROR_PCT,
        "prediction_met": abs(err) <= TARGET_ERROR_PCT,
    }
    result = {
        "benchmark": "ddp_scaling",
        "config": {
            "model": args.model,
            "dataset": args.dataset,
            "batch_size_per_process": args.batch_size,
            "threads_per_process": 1,
            "max_steps": args.max_steps,
            "rounds": args.repeats,
            "order": "each round: the all-reduce sweeps (shm, gloo), then ddp1, single, ddp2, "
                     "ceiling, ddp2_gloo on even rounds and the reverse on odd rounds",
            "backend": "gloo",
            "bucket_cap_mb": BUCKET_CAP_MB,
            "grad_bytes": grad_bytes,
            "comm_sizes": sizes,
            "comm_iters": args.comm_iters,
            "allreduce": {name: sorted({str(x.get("allreduce")) for x in runs[name]})
                          for name in COMM_PATHS},
        },
        "machine": info,
        "headline": {
            "statistic": "median (min, max) over rounds of per-round ratios",
            "ddp2_over_ceiling": ratios["ddp2_over_ceiling"],
            "ddp2_over_single": ratios["ddp2_over_single"],
            "ddp2_gloo_over_ceiling": ratios["ddp2_gloo_over_ceiling"],
            "ddp2_gloo_over_single": ratios["ddp2_gloo_over_single"],
            "ceiling_over_single": ratios["ceiling_over_single"],
            "ddp2_over_ceiling_concurrent": ratios["ddp2_over_ceiling_concurrent"],
            "ceiling_concurrent_over_single": ratios["ceiling_concurrent_over_single"],
            "prediction_error_pct": errors,
            "prediction_error_pct_from_single_instead_of_ddp1": errors_single,
            "prediction_error_pct_without_straggler": errors_plain,
            "straggler_factor": stragglers,
            "targets": targets,
        },
        "prediction_inputs": (
            "per round, with dptrain.bench.predict (contention_factor, scaling_table, "
            "fit_cost_model); no 2-process DDP training run is used: (1) the 1-process DDP "
            "run's (ddp1: --strategy ddp --nproc 1, as dptrain bench bases its predictions "
            "on ddp at 1 process) step time batch / samples_per_s (data, forward, backward, "
            "DDP's reducer and hooks, optimizer together; data_s = 0); (2) the contention "
            "factor k(2) = ceiling per-process step / plain 1-process (single) step, the "
            "ceiling's per-process step time being 2 batch / "
            "samples_per_s, with samples_per_s taken over the window in which both "
            "independent processes were training (ceiling.concurrent; the whole-run sum where "
            "that window is under 1 s), giving the contention factor k(2) = ceiling step / "
            "1-process step; (3) the all-reduce cost of the gradient (one DDP bucket of grad_bytes) "
            "from an alpha-beta fit to an all-reduce sweep between 2 fresh processes "
            "(dptrain.bench.comm.comm_worker, as dptrain bench measures it: barrier, slowest "
            "rank, median of comm_iters), over shared memory for ddp2 and gloo for "
            "ddp2_gloo; (4) the straggler factor s(2) = E[max of 2] / mean of the ceiling's "
            "per-step times in that window (both processes pooled, taken as independent: "
            "dptrain.bench.predict.straggler_factor). Predicted step = s(2) x k(2) x ddp1 "
            "step + exposed all-reduce (all of it: one bucket); predicted samples/s = 2 batch "
            "/ step; without_straggler: s(2) = 1. Error = 100 (predicted - measured) / "
            "measured."),
        "prediction_assumptions": P.describe_assumptions(),
        "rounds": rounds,
        "samples_per_s": stats,
        "runs": runs,
        "comm_sweeps": comm,
        "set_aside_disturbed_runs": discarded,
    }
    write_result(result, args.out)

    print(
        f"\n{args.model}, batch {args.batch_size}/process, 1 thread/process, "
        f"{args.max_steps} steps, {args.repeats} round(s) on {info['cpu_model']} "
        f"({info['cores']} cores)"
    )
    labels = {
        "ddp1": "1 DDP process",
        "single": "1 process",
        "ddp2": "2 DDP processes (shared memory)",
        "ceiling": "2 independent processes (ceiling)",
        "ddp2_gloo": "2 DDP processes (gloo TCP)",
    }
    print(f"{'configuration':<36}{'samples/s median':>18}{'mean ± std':>22}")
    for name in CONFIGS:
        s = stats[name]
        print(f"{labels[name]:<36}{s['median']:>18,.0f}{s['mean']:>12,.0f} ± {s['std']:<7,.0f}")
    print("per-round ratios, median (min-max):")
    for name in RATIOS:
        s = ratios[name]
        if s["n"]:
            print(f"  {name:<31}{s['median']:>7.3f}  ({s['min']:.3f}-{s['max']:.3f}, "
                  f"{s['n']} rounds)")
    for cfg in COMM_PATHS:
        s = errors[cfg]
        a = errors_single[cfg]
        print(f"  prediction error {cfg:<9} median {s['median']:+6.1f} %  "
              f"({s['min']:+.1f} to {s['max']:+.1f} %); without the straggler factor "
              f"{errors_plain[cfg]['median']:+.1f} %; based on the plain process instead "
              f"of 1-process DDP: {a['median']:+.1f} %")
    print(f"  straggler factor s(2) median {stragglers['median']:.3f} "
          f"({stragglers['min']:.3f}-{stragglers['max']:.3f})")
    print(f"targets: DDP/ceiling >= {TARGET_OF_CEILING}: "
          f"{check(of_ceiling, targets['ddp2_over_ceiling_met'])}; "
          f"DDP/1-proc >= {TARGET_SPEEDUP}x: {check(speedup, targets['speedup_met'])}; "
          f"|median prediction error| <= {TARGET_ERROR_PCT:g} %: "
          f"{check(err, targets['prediction_met'])}")
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
