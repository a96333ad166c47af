"""What ``--cpu-heap tuned`` (dptrain.heap) buys: page faults and time of a training step.

1. ``step``: fresh processes, ``system`` and ``tuned`` alternating round by round, each
   training the recipe's net (fastnet, channels_last, bf16 autocast where the CPU runs it
   natively, else fp32; SGD with momentum) at batch 128 on all cores: minor page faults and
   kernel (system) CPU time per step, median step time over the timed steps after a warm-up.
2. ``recipe``: ``dptrain train --recipe mnist-fast --cpu-heap MODE``, modes alternating seed
   by seed: training time, evaluation time (metrics.jsonl: the last step's record to the
   evaluation's) and the process's wall time.

    python benchmarks/heap.py --data-root /tmp/mnistdata --rounds 5 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dptrain.bench import machine_info, write_result

HERE = Path(__file__).resolve().parent
MODES = ("system", "tuned")

_STEP = r"""
import json, resource, statistics, sys, time
import torch, torch.nn.functional as F
from dptrain import hardware, heap
from dptrain.models import fastnet
said = heap.configure(sys.argv[1])
bf16 = hardware.native_bf16()
torch.manual_seed(0)
m = fastnet().to(memory_format=torch.channels_last)
x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (128,))
opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(m(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
for _ in range(20):
    step()
r0 = resource.getrusage(resource.RUSAGE_SELF)
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
r1 = resource.getrusage(resource.RUSAGE_SELF)
n = len(times)
print(json.dumps({"said": said, "bf16": bf16, "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / n,
                  "sys_ms_per_step": (r1.ru_stime - r0.ru_stime) * 1e3 / n,
                  "median_step_ms": statistics.median(times) * 1e3}))
"""


def step(rounds: int, steps: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            out = subprocess.run([sys.executable, "-c", _STEP, mode, str(steps)],
                                 capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout))
            print(f"  step {mode:6s} round {r}: {runs[mode][-1]}", flush=True)
    med = {m: {k: statistics.median(x[k] for x in v)
               for k in ("faults_per_step", "sys_ms_per_step", "median_step_ms")}
           for m, v in runs.items()}
    return {"batch": 128, "steps": steps, "rounds": rounds, "median": med,
            "step_speedup": med["system"]["median_step_ms"] / med["tuned"]["median_step_ms"],
            "runs": runs}


def recipe(root: str, seeds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="dptrain-heap-") as tmp:
        for seed in range(seeds):
            for mode in (MODES if seed % 2 == 0 else MODES[::-1]):
                out = Path(tmp) / f"{mode}-{seed}"
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "dptrain", "train", "--recipe",
                                "mnist-fast", "--cpu-heap", mode, "--seed", str(seed),
                                "--data-root", root, "--quiet", "--out", str(out)],
                               check=True, capture_output=True)
                wall = time.perf_counter() - t0
                summary = json.loads((out / "summary.json").read_text())
                lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                last_step = [x for x in lines if "loss" in x and "test_loss" not in x][-1]
                evaluated = [x for x in lines if "test_accuracy" in x][-1]
                runs[mode].append({
                    "seed": seed, "wall_s": wall, "train_time_s": summary["train_time_s"],
                    "eval_s": evaluated["time"] - last_step["time"],
                    "test_accuracy": summary["test_accuracy"], "cpu_heap": summary["cpu_heap"]})
                print(f"  recipe {mode:6s} seed {seed}: {runs[mode][-1]}", flush=True)
    med = {m: {k: statistics.median(x[k] for x in v) for k in ("wall_s", "train_time_s", "eval_s")}
           for m, v in runs.items()}
    return {"seeds": seeds, "median": med, "runs": runs,
            "ratio_tuned_over_system": {k: med["tuned"][k] / med["system"][k]
                                        for k in ("wall_s", "train_time_s", "eval_s")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "heap.json"))
    a = p.parse_args()
    result = {"benchmark": "heap", "machine": machine_info(), "step": step(a.rounds, a.steps),
              "recipe": recipe(a.data_root, a.seeds)}
    print(json.dumps({k: result[k]["median"] for k in ("step", "recipe")}, indent=1))
    print("wrote", write_result(result, a.out))


if __name__ == "__main__":
    main()
