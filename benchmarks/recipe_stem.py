"""fastnet's first block: a 3x3 convolution at 28x28 + 2x2 pool, or one 4x4 stride-2 conv.

Training-step time at batch 128 of ``fastnet`` and ``fastnet-strided`` (channels_last, all
cores, one process, the recipe's SGD with Nesterov momentum, the tuned C heap) in fp32 and,
where the CPU runs it natively, bf16 autocast: the models alternate in rounds of ``--steps``
steps after a warm-up; the figure is each one's median step. Accuracy at the recipe's length
is ``benchmarks/recipe_length.py --model fastnet-strided``.

    python benchmarks/recipe_stem.py --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import recipe_parts  # noqa: E402

MODELS = ("fastnet", "fastnet-strided")


def step_times(precision: str, rounds: int, steps: int) -> dict[str, Any]:
    times = recipe_parts.interleaved_step_times(MODELS, rounds, steps, warmup=3,
                                                bf16=precision == "bf16", lr=0.05,
                                                momentum=0.9, nesterov=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"median_step_s": med, "step_ratio": med["fastnet-strided"] / med["fastnet"],
            "step_s": times}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(HERE / "results" / "recipe_stem.json"))
    args = p.parse_args()
    import torch

    from dptrain import hardware, heap
    from dptrain.bench import machine_info, write_result

    heap.configure("tuned")
    precisions = ["32"] + (["bf16"] if hardware.native_bf16() else [])
    result: dict[str, Any] = {"benchmark": "recipe_stem", "machine": machine_info(sys.argv),
                              "batch": 128, "threads": torch.get_num_threads(),
                              "rounds": args.rounds, "steps_per_round": args.steps,
                              "cpu_heap": heap.describe(), "by_precision": {}}
    for precision in precisions:
        r = step_times(precision, args.rounds, args.steps)
        result["by_precision"][precision] = r
        med = r["median_step_s"]
        print(f"{precision}: fastnet {1e3 * med['fastnet']:.2f} ms, fastnet-strided "
              f"{1e3 * med['fastnet-strided']:.2f} ms per step ({r['step_ratio']:.3f}x)",
              flush=True)
    print(f"wrote {write_result(result, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
