"""Time to 99 % MNIST test accuracy, and throughput against the machine's compute roofline.

Part 1 -- time to 99 %, end to end from the command's start (interpreter start, data load,
training, evaluation), each in a fresh process:

* dptrain: ``python -m dptrain train --recipe mnist-fast --seed S`` for every seed (the recipe
  trains 0.85 of an epoch, 398 steps of batch 128, and evaluates the whole test split at its
  end); the wall time runs to the process's exit, a little past the summary line;
* with ``--baseline-src DIR`` (the ``src`` of an earlier checkout, e.g. ``git worktree add
  /tmp/dptrain-before 0e6df64``), the same command from that code, alternating with this one
  seed by seed: before/after in one run on one machine state;
* the classic PyTorch MNIST example (conv32-conv64-fc128 + dropout, Adadelta lr 1.0, StepLR
  0.7, batch 64, per-sample DataLoader), evaluated after each epoch and stopped at the first
  epoch reaching 99 %: ``python -m dptrain.bench.baseline classic --stop-at-target``.

Part 2 -- throughput at batch 64 for ``linear``, ``convnet`` (its default layout: channels_last
on the CPU since ``--channels-last auto``) and ``convnet --no-channels-last`` in fp32, and
(where bf16 is native) ``linear`` and ``convnet`` in bf16 (one process, all cores), as a
fraction of the roofline: achieved FLOP/s = samples/s x 3 x forward FLOPs per sample (forward +
two backward matmuls), against the best matmul rate of the row's precision measured here
(``dptrain.hardware.measure_matmul``, the figure MFU uses). Each row runs in two variants
alternating round by round, median of each: ``--roofline-compare heap`` (``--cpu-heap tuned``
vs ``system``) or ``baseline`` (this code vs ``--baseline-src``'s, each with its own defaults:
before/after for the rows).

    python benchmarks/speed.py --data-root /tmp/mnistdata --seeds 5 \
        [--baseline-src /tmp/dptrain-before/src [--roofline-compare baseline]] [--skip-classic]
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
from pathlib import Path
from typing import Any

import torch

from dptrain.bench import machine_info, mean_std, usable_cores, write_result
from dptrain.models import build_model, flops_per_sample

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return elapsed, r


def recipe_run(root: str, seed: int, extra: list[str], work: Path, src: str | None = None,
               label: str = "mnist-fast") -> dict:
    """One fresh ``dptrain train --recipe mnist-fast`` process; ``src``: run that checkout's
    code instead of this one's."""
    out = work / f"recipe-{seed}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "dptrain", "train", "--recipe", "mnist-fast", "--seed",
           str(seed), "--data-root", root, "--quiet", "--out", str(out), *extra]
    if src:
        cmd = ["env", f"PYTHONPATH={src}", *cmd]
    wall, _ = timed(cmd)
    s = json.loads((out / "summary.json").read_text())
    print(f"  {label} seed {seed}: {s['test_accuracy']:.4f} in {wall:.1f} s "
          f"(world {s['world_size']}, {s['steps']} steps, precision {s['precision']})",
          flush=True)
    return {"seed": seed, "wall_s": wall, "test_accuracy": s["test_accuracy"],
            "train_time_s": s["train_time_s"], "samples_per_s": s["train_samples_per_s"],
            "world_size": s["world_size"], "steps": s["steps"], "precision": s["precision"],
            "summary_wall_s": s.get("wall_time_s")}


def recipe_runs(root: str, seeds: list[int], extra: list[str], work: Path) -> list[dict]:
    return [recipe_run(root, seed, extra, work) for seed in seeds]


def before_after(root: str, seeds: list[int], work: Path, src: str) -> dict[str, Any]:
    """This code and the checkout at ``src``, alternating seed by seed (the order swaps every
    seed, so that drift falls on both)."""
    after, before = [], []
    for seed in seeds:
        pair = [("after", None), ("before", src)]
        for label, where in (pair if seed % 2 == 0 else pair[::-1]):
            run = recipe_run(root, seed, [], work, where, label=f"{label:6s}")
            (after if label == "after" else before).append(run)
    ratios = [b["wall_s"] / a["wall_s"] for a, b in zip(after, before, strict=True)]
    print(f"  before/after wall time: median {statistics.median(ratios):.2f}x", flush=True)
    return {"baseline_src": src, "baseline_commit": _commit(src), "after": after,
            "before": before, "wall_ratio_before_over_after": ratios,
            "wall_ratio_median": statistics.median(ratios),
            "before_wall_s_median": statistics.median(r["wall_s"] for r in before),
            "after_wall_s_median": statistics.median(r["wall_s"] for r in after)}


def _commit(src: str) -> str | None:
    r = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def classic_run(root: str, max_epochs: int, threads: int) -> dict[str, Any]:
    wall, r = timed([sys.executable, "-m", "dptrain.bench.baseline", "classic", "--data-root",
                     root, "--epochs", str(max_epochs), "--stop-at-target", "--threads",
                     str(threads)])
    result = json.loads(r.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall  # end to end: process start .. the epoch that reached the target
    print(f"  classic example: accuracies {result['accuracies']} -> "
          f"{f'{wall:.1f} s' if result['time_to_target_s'] else 'target not reached'}",
          flush=True)
    return result


def peak_flops(threads: int, dtype: str = "fp32") -> dict[str, Any]:
    """The best matmul rate here, as ``dptrain.hardware`` measures it for MFU (uncached:
    measured now, in the machine state of this run)."""
    from dptrain import hardware

    torch.set_num_threads(threads)
    return hardware.measure_matmul(dtype, seconds=3.0)


def throughput(root: str, model: str, steps: int, threads: int, work: Path,
               extra: tuple[str, ...] = (), src: str | None = None) -> float:
    """samples/s of one fresh ``dptrain train`` at batch 64; ``src``: that checkout's code."""
    out = work / f"tp-{model}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "dptrain", "train", "--model", model, "--batch-size", "64",
           "--max-steps", str(steps), "--threads", str(threads), "--data-root", root,
           "--quiet", "--no-eval-every-epoch", "--out", str(out), *extra]
    timed(["env", f"PYTHONPATH={src}", *cmd] if src else cmd)
    return json.loads((out / "summary.json").read_text())["train_samples_per_s"]


ROOFLINE_ROWS = (  # name, model, steps, flags, precision (whose peak the row is held against)
    ("linear", "linear", 900, (), "fp32"),
    ("convnet", "convnet", 300, (), "fp32"),
    # the default is channels_last for convnet on the CPU (auto); contiguous for comparison
    # (--no-channels-last: both this code and older code that had a plain on/off flag)
    ("convnet --no-channels-last", "convnet", 300, ("--no-channels-last",), "fp32"),
    ("linear --precision bf16", "linear", 900, ("--precision", "bf16"), "bf16"),
    ("convnet --precision bf16", "convnet", 300, ("--precision", "bf16"), "bf16"),
)


def roofline(args: argparse.Namespace, threads: int, work: Path) -> dict[str, Any]:
    """Each row's samples/s in two variants alternating round by round, median of each:
    ``--roofline-compare heap`` (``--cpu-heap tuned`` vs ``system``) or ``baseline`` (this
    code vs ``--baseline-src``'s, each with its own defaults). bf16 rows only where bf16 is
    native."""
    from dptrain import hardware

    print("throughput vs roofline (batch 64, one process):", flush=True)
    precisions = ("fp32", "bf16") if hardware.native_bf16() else ("fp32",)
    measured = {p: peak_flops(threads, p) for p in precisions}
    if args.roofline_compare == "heap":
        variants = {"tuned": (("--cpu-heap", "tuned"), None),
                    "system": (("--cpu-heap", "system"), None)}
    else:
        variants = {"after": ((), None), "before": ((), args.baseline_src)}
    names = list(variants)
    rows = {}
    for name, model, steps, extra, precision in ROOFLINE_ROWS:
        if precision not in precisions:
            continue
        peak = measured[precision]["flops"]
        runs: dict[str, list[float]] = {v: [] for v in names}
        for r in range(args.roofline_rounds):
            for v in (names if r % 2 == 0 else names[::-1]):
                flags, src = variants[v]
                runs[v].append(throughput(args.data_root, model, steps, threads, work,
                                          (*extra, *flags), src))
        sps, other = (statistics.median(runs[v]) for v in names)
        fwd = flops_per_sample(build_model(model))
        achieved = sps * 3 * fwd
        rows[name] = {"samples_per_s": sps, "forward_flops_per_sample": fwd,
                      "precision": precision, "peak_flops": peak,
                      "achieved_flops": achieved, "fraction_of_peak": achieved / peak,
                      f"{names[1]}": {"samples_per_s": other,
                                      "fraction_of_peak": other * 3 * fwd / peak},
                      f"{names[0]}_over_{names[1]}": sps / other, "samples_per_s_runs": runs}
        print(f"  {name}: {sps:,.0f} samples/s = {achieved / 1e9:.1f} GFLOP/s, "
              f"{100 * achieved / peak:.1f} % of the {peak / 1e9:.0f} GFLOP/s {precision} matmul "
              f"peak ({names[1]}: {other:,.0f} samples/s, {100 * other * 3 * fwd / peak:.1f} %)",
              flush=True)
    out = {"peak_matmul_flops": measured["fp32"]["flops"], "peak_measurement": measured["fp32"],
           "peaks": measured, "threads": threads, "compare": args.roofline_compare,
           "variants": {v: {"flags": list(variants[v][0]), "src": variants[v][1]}
                        for v in names}, "models": rows}
    if args.roofline_compare == "baseline":
        out["baseline_commit"] = _commit(args.baseline_src)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="./data")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--classic-epochs", type=int, default=4,
                   help="give up on the classic example after this many epochs")
    p.add_argument("--skip-classic", action="store_true")
    p.add_argument("--baseline-src", default=None,
                   help="src/ of an earlier checkout to time alternately with this one")
    p.add_argument("--skip-ddp", action="store_true")
    p.add_argument("--skip-roofline", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="0 = all usable cores")
    p.add_argument("--roofline-rounds", type=int, default=3,
                   help="alternating rounds per roofline row (of the two --roofline-compare "
                        "variants)")
    p.add_argument("--roofline-compare", choices=("heap", "baseline"), default="heap",
                   help="heap: --cpu-heap tuned vs system; baseline: this code vs "
                        "--baseline-src's")
    p.add_argument("--out", default=str(HERE / "results" / "speed.json"))
    p.add_argument("--derive-only", action="store_true",
                   help="recompute the derived ratios of an existing --out file, run nothing")
    args = p.parse_args()
    if args.roofline_compare == "baseline" and not args.baseline_src:
        p.error("--roofline-compare baseline needs --baseline-src")
    if args.derive_only:
        write(json.loads(Path(args.out).read_text()), Path(args.out))
        return 0
    threads = args.threads or usable_cores()
    from dptrain import hardware
    from dptrain.recipes import precision_choice

    result: dict[str, Any] = {"benchmark": "speed", "machine": machine_info(sys.argv)}
    result["isa"] = {**hardware.cpu_info().to_dict(), "native_bf16": hardware.native_bf16(),
                     "recipe_precision": list(precision_choice()),
                     # ISA caps a run may be made under, to stand in for an older CPU
                     "environment": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA",
                                                                "DNNL_MAX_CPU_ISA",
                                                                "ATEN_CPU_CAPABILITY")
                                     if k in os.environ}}
    with tempfile.TemporaryDirectory(prefix="dptrain-speed-") as tmp:
        work = Path(tmp)
        print("time to 99 %:", flush=True)
        runs = recipe_runs(args.data_root, list(range(args.seeds)), [], work)
        accs = [r["test_accuracy"] for r in runs]
        result["recipe"] = {
            "runs": runs, "accuracy_mean": statistics.mean(accs), "accuracy_min": min(accs),
            "wall_s": mean_std([r["wall_s"] for r in runs]),
            "targets_met": {"every_seed_ge_0.989": min(accs) >= 0.989,
                            "mean_ge_0.990": statistics.mean(accs) >= 0.990},
        }
        if args.baseline_src:
            print("before/after (alternating):", flush=True)
            result["before_after"] = before_after(args.data_root, list(range(args.seeds)),
                                                  work, args.baseline_src)
        if not args.skip_ddp:
            ddp = recipe_runs(args.data_root, [0, 1], ["--nproc", "2", "--batch-size", "64"],
                              work)
            result["recipe_ddp2"] = {"runs": ddp, "wall_s": mean_std([r["wall_s"] for r in ddp])}
        if not args.skip_classic:
            result["classic"] = classic_run(args.data_root, args.classic_epochs, threads)
        if not args.skip_roofline:
            result["roofline"] = roofline(args, threads, work)
    write(result, Path(args.out))
    return 0


def derive(result: dict[str, Any]) -> None:
    """Time-to-99 % ratio from the raw runs. When the classic example did not reach 99 %
    within the epochs allowed, its time to 99 % is longer than its whole run: the ratio is then
    a lower bound, and says so."""
    classic = result.get("classic")
    if not classic:
        return
    ours = result["recipe"]["wall_s"]["mean"]
    reached = classic["time_to_target_s"] is not None
    result["speedup_time_to_99"] = {
        "ratio": classic["wall_s"] / ours,
        "kind": "measured" if reached else "lower bound (classic did not reach 99 % within "
                f"{len(classic['accuracies'])} epochs / {classic['wall_s']:.0f} s)",
    }
    print(f"mnist-fast reaches 99 % in {ours:.1f} s; the classic example "
          + (f"in {classic['wall_s']:.0f} s" if reached else
             f"not within {classic['wall_s']:.0f} s") + ": "
          + ("" if reached else ">= ") + f"{classic['wall_s'] / ours:.1f}x")


def write(result: dict[str, Any], out: Path) -> None:
    derive(result)
    print(f"wrote {write_result(result, out)}")


if __name__ == "__main__":
    raise SystemExit(main())
