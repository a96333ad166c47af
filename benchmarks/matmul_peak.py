"""This machine's fp32 and bf16 matmul rate at several sizes, as ``dptrain doctor`` measures it.

``dptrain.hardware.measure_matmul`` (uncached) for each dtype and size, interleaved over
``--repeats`` rounds so that a shared machine's drift hits every cell alike; the figure per
cell is the median over rounds of each round's median. Writes
``benchmarks/results/matmul_peak.json`` with the ISA flags, the machine and the command::

    python benchmarks/matmul_peak.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dptrain import hardware  # noqa: E402
from dptrain.bench import cpu_busy, machine_info  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="512,1024,2048")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=0.5, help="budget per cell and round")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "matmul_peak.json"))
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    cells: dict[str, list[dict]] = {}
    busy = cpu_busy(0.5)
    for _ in range(a.repeats):
        for dtype in ("fp32", "bf16"):
            for size in sizes:
                r = hardware.measure_matmul(dtype, size=size, seconds=a.seconds)
                cells.setdefault(f"{dtype} n<={size}", []).append(r)
    table = {k: {"flops_median": statistics.median(r["flops"] for r in v),
                 "size_used": [r["size"] for r in v], "rounds": v} for k, v in cells.items()}
    best = {d: max(t["flops_median"] for k, t in table.items() if k.startswith(d))
            for d in ("fp32", "bf16")}
    doc = {"machine": machine_info(), "cpu": hardware.cpu_info().to_dict(),
           "native_bf16": hardware.native_bf16(), "cpu_busy_before": busy,
           "best_median_flops": best, "bf16_over_fp32": best["bf16"] / best["fp32"],
           "cells": table,
           "note": "a shared 2-core machine: figures are noisy, compare the ratio measured in "
                   "the same command; size_used < n when the dtype is too slow for the budget"}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({"best_median_gflops": {k: v / 1e9 for k, v in best.items()},
                      "bf16_over_fp32": doc["bf16_over_fp32"]}))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
