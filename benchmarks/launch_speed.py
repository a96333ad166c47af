"""What starting local workers costs, before and after, end to end (command start to exit).

Two commands, each a fresh ``python -m dptrain train`` process, alternating between an earlier
checkout (``--baseline-src``, e.g. ``git worktree add /tmp/dptrain-before 36b4f17``) and this
one, round by round (ABBA order):

* ``startup``: ``--strategy ddp --nproc 2 --max-steps 2`` (``linear``, batch 64 per process):
  what a 2-process run costs beyond its training -- the launcher, two workers, their imports,
  the rendezvous and process group, the data, one evaluation, the exits;
* ``make_run``: ``make run``'s command on 2 cores, ``--recipe mnist-fast --strategy ddp --nproc
  2 --batch-size 64`` (the recipe under DDP to >= 99 %); its test accuracy is saved too.

The figure per command and checkout is the median wall time over rounds; the headline is the
median of the per-round ratios (before / after). Three changes separate ``36b4f17`` from this
code: DDP, ZeRO and local-SGD workers no longer import ``torch._dynamo``; workers skip the
interpreter teardown; dptrain's own workers fork from a fork server that imports torch once,
started beside the launcher's own import.

    python benchmarks/launch_speed.py --data-root /tmp/mnistdata --rounds 5 \\
        --baseline-src /tmp/dptrain-before/src
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

from dptrain.bench import machine_info, wait_for_quiet, write_result

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
COMMANDS = {
    "startup": ["--strategy", "ddp", "--nproc", "2", "--max-steps", "2", "--model", "linear",
                "--batch-size", "64"],
    "make_run": ["--recipe", "mnist-fast", "--strategy", "ddp", "--nproc", "2",
                 "--batch-size", "64"],
}


def timed_run(src: str, args: list[str], data_root: str, out: Path) -> dict[str, Any]:
    """One fresh ``dptrain train`` from ``src``: wall time to exit, and its summary."""
    env = dict(os.environ, PYTHONPATH=src)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dptrain", "train", *args, "--data-root",
                           data_root, "--quiet", "--out", str(out)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: dptrain train failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "test_accuracy": summary.get("test_accuracy"),
            "steps": summary.get("steps"), "train_time_s": summary.get("train_time_s")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--baseline-src", required=True, help="the src of an earlier checkout")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--wait-quiet", type=float, default=30.0)
    parser.add_argument("--out", default=str(HERE / "results" / "launch_speed.json"))
    args = parser.parse_args(argv)
    sources = {"before": str(Path(args.baseline_src).resolve()), "after": str(SRC)}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c: {s: [] for s in sources}
                                                       for c in COMMANDS}
    with tempfile.TemporaryDirectory(prefix="dptrain-launch-") as tmp:
        for r in range(args.rounds):
            order = list(sources) if r % 2 == 0 else list(sources)[::-1]
            for name, cmd in COMMANDS.items():
                for which in order:
                    busy = wait_for_quiet(args.wait_quiet)
                    run = timed_run(sources[which], cmd, args.data_root,
                                    Path(tmp) / f"{name}-{which}-{r}")
                    run.update(round=r, cpu_busy_before=busy)
                    runs[name][which].append(run)
                    print(f"round {r + 1}/{args.rounds} {name} {which}: {run['wall_s']:.2f} s"
                          + (f", {run['test_accuracy']:.4f}" if name == "make_run" else ""),
                          flush=True)
    headline: dict[str, Any] = {}
    for name in COMMANDS:
        before = [x["wall_s"] for x in runs[name]["before"]]
        after = [x["wall_s"] for x in runs[name]["after"]]
        ratios = [b / a for b, a in zip(before, after, strict=True)]
        headline[name] = {"before_median_s": statistics.median(before),
                          "after_median_s": statistics.median(after),
                          "speedup_median": statistics.median(ratios),
                          "speedup_min": min(ratios), "speedup_max": max(ratios)}
        if name == "make_run":
            accs = [x["test_accuracy"] for x in runs[name]["after"]]
            headline[name].update(after_accuracy_min=min(accs),
                                  after_accuracy_mean=statistics.mean(accs))
        print(f"{name}: {headline[name]['before_median_s']:.2f} s -> "
              f"{headline[name]['after_median_s']:.2f} s, "
              f"{headline[name]['speedup_median']:.2f}x median", flush=True)
    result = {"benchmark": "launch_speed", "machine": machine_info(sys.argv),
              "config": {"commands": COMMANDS, "rounds": args.rounds, "sources": sources,
                         "statistic": "median over rounds; speedup: median of per-round "
                                      "before/after ratios"},
              "headline": headline, "runs": runs}
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
