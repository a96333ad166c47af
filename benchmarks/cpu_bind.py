"""Does ``--cpu-bind auto`` pay? Pinned and unpinned workers interleaved in the same rounds.

The workers of ``benchmarks/sync_cost.py`` (the DDP tutorial's convnet, batch 64, one thread
per process, a fixed synthetic batch), two modes -- ``none`` (independent, the
no-communication ceiling) and ``ddp_shm`` (DDP with dptrain's shared-memory all-reduce) --
each with the workers left to the OS and pinned one core each (``dptrain.affinity``), the four
runs in an order that rotates every round. Per round: DDP / ceiling for each binding, and
each binding's samples/s against the unpinned run of the same mode.

    python benchmarks/cpu_bind.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sync_cost  # noqa: E402

RUNS = (("none", "none"), ("ddp_shm", "none"), ("none", "auto"), ("ddp_shm", "auto"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--wait-quiet", type=float, default=60.0)
    p.add_argument("--out", default=str(HERE / "results" / "cpu_bind.json"))
    args = p.parse_args()
    from dptrain.bench import machine_info, wait_for_quiet, write_result

    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = RUNS[r % len(RUNS):] + RUNS[:r % len(RUNS)]
        busy = wait_for_quiet(args.wait_quiet)
        sps: dict[str, float] = {}
        for mode, bind in order:
            os.environ["SYNC_COST_CPU_BIND"] = bind  # the workers read it
            run = sync_cost.run_mode(mode, args.steps)
            sps[f"{mode}/{bind}"] = run["samples_per_s"]
        ratios = {
            "ddp_over_ceiling_unpinned": sps["ddp_shm/none"] / sps["none/none"],
            "ddp_over_ceiling_pinned": sps["ddp_shm/auto"] / sps["none/auto"],
            "ddp_pinned_over_unpinned": sps["ddp_shm/auto"] / sps["ddp_shm/none"],
            "ceiling_pinned_over_unpinned": sps["none/auto"] / sps["none/none"],
            "ddp_pinned_over_ceiling_unpinned": sps["ddp_shm/auto"] / sps["none/none"]}
        rounds.append({"order": [f"{m}/{b}" for m, b in order], "cpu_busy_before": busy,
                       "samples_per_s": sps, "ratios": ratios})
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {v:.3f}"
                                                           for k, v in ratios.items()),
              flush=True)
    keys = list(rounds[0]["ratios"])
    headline = {k: {"median": statistics.median(x["ratios"][k] for x in rounds),
                    "min": min(x["ratios"][k] for x in rounds),
                    "max": max(x["ratios"][k] for x in rounds),
                    "rounds_above_1": sum(x["ratios"][k] > 1 for x in rounds)} for k in keys}
    result = {"benchmark": "cpu_bind", "machine": machine_info(sys.argv),
              "config": {"model": "convnet", "batch_per_process": 64, "threads_per_process": 1,
                         "steps": args.steps, "warmup_steps": sync_cost.WARMUP,
                         "rounds": args.rounds, "runs": [f"{m}/{b}" for m, b in RUNS]},
              "rounds": rounds, "headline": headline}
    for k, h in headline.items():
        print(f"{k}: median {h['median']:.3f} ({h['min']:.3f}-{h['max']:.3f}), "
              f"{h['rounds_above_1']} of {args.rounds} rounds above 1")
    print(f"wrote {write_result(result, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
