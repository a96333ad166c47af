"""dptrain's device-resident loop vs the tutorial's per-sample DataLoader loop, one epoch each.

Both train ``Linear(784, 10)`` on MNIST for one epoch at batch 64, SGD lr 0.01, with the same
number of intra-op threads, each in a fresh process:

* dptrain:  ``python -m dptrain train --model linear --epochs 1 --batch-size 64 --lr 0.01
  --threads T --quiet --out TMP``; the figure is ``train_samples_per_s`` from ``summary.json``.
* tutorial: ``python -m dptrain.bench.baseline linear --threads T`` (per-sample ``ToTensor`` +
  ``Normalize`` dataset, ``DataLoader(batch_size=64, shuffle=True, num_workers=0)``).

Both clocks start after the first optimizer step and exclude evaluation. The two are run
alternately, ``--repeats`` times each, so that the machine's noise falls on both alike::

    python benchmarks/loader_speed.py --repeats 3 --data-root /tmp/mnistdata
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

from dptrain.bench import add_measurement_flags, machine_info, mean_std, run_quietly, usable_cores
from dptrain.bench.tutorial_transforms import tutorial_transform

HERE = Path(__file__).resolve().parent


def run_dptrain(root: str, dataset: str, threads: int, workdir: Path) -> dict[str, Any]:
    out = workdir / f"dptrain-{time.monotonic_ns()}"
    cmd = [
        sys.executable, "-m", "dptrain", "train",
        "--dataset", dataset, "--data-root", root,
        "--model", "linear", "--epochs", "1", "--batch-size", "64", "--lr", "0.01",
        "--threads", str(threads), "--quiet", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: dptrain failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "samples_per_s": summary["train_samples_per_s"],
        "test_accuracy": summary["test_accuracy"],
        "train_time_s": summary.get("train_time_s"),
        "steps": summary["steps"],
        "wall_time_s": summary["wall_time_s"],
    }


def run_tutorial(root: str, dataset: str, threads: int) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "dptrain.bench.baseline", "linear",
        "--dataset", dataset, "--data-root", root,
        "--epochs", "1", "--batch-size", "64", "--lr", "0.01", "--threads", str(threads),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"error: tutorial baseline failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "samples_per_s": result["samples_per_s"],
        "test_accuracy": result["test_accuracy"],
        "train_time_s": result["seconds"],
        "steps": result["steps"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop")
    parser.add_argument(
        "--threads",
        type=int,
        default=usable_cores(),
        help="intra-op threads for both loops (default: all cores)",
    )
    add_measurement_flags(parser)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "loader_speed.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")

    info = machine_info()
    runs: dict[str, list[dict[str, Any]]] = {"dptrain": [], "tutorial": []}
    discarded: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dptrain-bench-") as tmp:
        for r in range(args.repeats):
            order = ("dptrain", "tutorial") if r % 2 == 0 else ("tutorial", "dptrain")
            for name in order:
                if name == "dptrain":
                    fn = partial(run_dptrain, args.data_root, args.dataset, args.threads, Path(tmp))
                else:
                    fn = partial(run_tutorial, args.data_root, args.dataset, args.threads)
                res, set_aside = run_quietly(fn, wait_quiet_s=args.wait_quiet, retries=args.retries)
                res["repeat"] = r
                runs[name].append(res)
                discarded.extend({"loop": name, "repeat": r, **x} for x in set_aside)
                print(
                    f"  repeat {r + 1}/{args.repeats} {name:8s} "
                    f"{res['samples_per_s']:>10,.0f} samples/s  acc {res['test_accuracy']:.4f}  "
                    f"(others: {_pct(res['cpu_busy_before'])} before, "
                    f"{_pct(res['other_load_during'])} during; {len(set_aside)} set aside)",
                    flush=True,
                )

    stats = {k: mean_std([x["samples_per_s"] for x in v]) for k, v in runs.items()}
    ratio = stats["dptrain"]["mean"] / stats["tutorial"]["mean"]
    paired = [
        d["samples_per_s"] / t["samples_per_s"]
        for d, t in zip(runs["dptrain"], runs["tutorial"], strict=True)
    ]
    result = {
        "benchmark": "loader_speed",
        "config": {
            "model": "linear",
            "dataset": args.dataset,
            "epochs": 1,
            "batch_size": 64,
            "lr": 0.01,
            "optimizer": "sgd",
            "threads": args.threads,
            "repeats": args.repeats,
            "tutorial_transform": _transform_kind(),
        },
        "machine": info,
        "samples_per_s": stats,
        "ratio_of_means": ratio,
        "paired_ratios": mean_std(paired),
        "target_ratio": {"issue": 15.0, "goal": 25.0},
        "runs": runs,
        "set_aside_disturbed_runs": discarded,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\nlinear, 1 epoch of {args.dataset}, batch 64, {args.threads} thread(s), "
        f"{args.repeats} repeat(s) on {info['cpu_model']} ({info['cores']} cores)"
    )
    print(f"{'loop':<10}{'samples/s (mean ± std)':>28}{'test acc':>10}")
    for name in ("dptrain", "tutorial"):
        s = stats[name]
        acc = sum(x["test_accuracy"] for x in runs[name]) / len(runs[name])
        print(f"{name:<10}{s['mean']:>16,.0f} ± {s['std']:<9,.0f}{acc:>10.4f}")
    print(
        f"ratio of means: {ratio:.1f}x  (paired: {result['paired_ratios']['mean']:.1f}x "
        f"± {result['paired_ratios']['std']:.1f})  target >= 15x (goal 25x)"
    )
    _warn_if_busy([x for v in runs.values() for x in v])
    print(f"written {args.out}")
    return 0


def _pct(busy: float | None) -> str:
    return "n/a" if busy is None else f"{busy:.0%}"


def _warn_if_busy(runs: list[dict[str, Any]], threshold: float = 0.15) -> None:
    busy = [max(x.get("cpu_busy_before") or 0, x.get("other_load_during") or 0) for x in runs]
    busy = [b for b in busy if b > threshold]
    if busy:
        print(
            f"warning: {len(busy)} run(s) started on a busy machine "
            f"(up to {max(busy):.0%} CPU in use): their figures are depressed"
        )


def _transform_kind() -> str:
    return tutorial_transform(0.1307, 0.3081)[1]


if __name__ == "__main__":
    raise SystemExit(main())
