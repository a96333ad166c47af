"""Where the round-2 ``--recipe mnist-fast`` speed-up comes from, each part measured alone.

1. ``order``: fastnet's block order. Training-step time at batch 128 (channels_last, all
   cores, one process) of ``fastnet-v1`` (conv -> BN -> ReLU -> pool) and ``fastnet``
   (conv -> pool -> BN -> ReLU), interleaved in rounds after a warm-up; median per model.
2. ``accuracy``: test accuracy of each order after one full epoch of the recipe (``dptrain
   train --recipe mnist-fast --epochs 1 --model M --seed S``), seeds alternating.
3. ``startup``: fresh interpreters timing ``import torch``, then ``import torch._dynamo`` (what
   building an optimizer or counting FLOPs used to import), the interpreter teardown after
   torch (process end minus the last line), and one MD5 verification of the MNIST files
   (what the pre-flight and the loader each did).

    python benchmarks/recipe_parts.py --data-root /tmp/mnistdata --rounds 7 --seeds 3
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

HERE = Path(__file__).resolve().parent
MODELS = ("fastnet-v1", "fastnet")


def interleaved_step_times(models: tuple[str, ...], rounds: int, steps: int, warmup: int,
                           bf16: bool = False, **sgd: Any) -> dict[str, list[float]]:
    """Training-step times at batch 128 (channels_last, one fixed batch, SGD with ``sgd``,
    bf16 autocast if ``bf16``) of each model, in bursts of ``warmup + steps`` steps, the models'
    order reversed every other round; the first ``warmup`` steps of a burst are not kept."""
    import contextlib

    import torch

    from dptrain.models import build_model

    torch.manual_seed(0)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    nets = {m: build_model(m).to(memory_format=torch.channels_last) for m in models}
    opts = {m: torch.optim.SGD(n.parameters(), **sgd) for m, n in nets.items()}
    times: dict[str, list[float]] = {m: [] for m in models}
    for r in range(rounds):
        for m in (models if r % 2 == 0 else models[::-1]):
            for i in range(steps + warmup):
                t0 = time.perf_counter()
                with (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                      else contextlib.nullcontext()):
                    loss = torch.nn.functional.cross_entropy(nets[m](x), y)
                opts[m].zero_grad()
                loss.backward()
                opts[m].step()
                if i >= warmup:
                    times[m].append(time.perf_counter() - t0)
    return times


def step_times(rounds: int, steps: int = 10) -> dict[str, Any]:
    import torch

    times = interleaved_step_times(MODELS, rounds, steps, warmup=2, lr=0.01, momentum=0.9)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"batch": 128, "threads": torch.get_num_threads(), "rounds": rounds,
            "steps_per_round": steps, "median_step_s": med,
            "speedup": med["fastnet-v1"] / med["fastnet"], "step_s": times}


def accuracy(root: str, seeds: int) -> dict[str, Any]:
    runs: dict[str, list[float]] = {m: [] for m in MODELS}
    with tempfile.TemporaryDirectory(prefix="dptrain-parts-") as tmp:
        for seed in range(seeds):
            for m in (MODELS if seed % 2 == 0 else MODELS[::-1]):
                out = Path(tmp) / f"{m}-{seed}"
                subprocess.run([sys.executable, "-m", "dptrain", "train", "--recipe",
                                "mnist-fast", "--epochs", "1", "--model", m, "--seed",
                                str(seed), "--data-root", root, "--quiet", "--out", str(out)],
                               check=True, capture_output=True)
                acc = json.loads((out / "summary.json").read_text())["test_accuracy"]
                runs[m].append(acc)
                print(f"  accuracy {m:10s} seed {seed}: {acc:.4f}", flush=True)
    return {"epochs": 1, "test_accuracy": runs,
            "mean": {m: statistics.mean(v) for m, v in runs.items()}}


_STARTUP = r"""
import time, sys
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import torch._dynamo
t2 = time.perf_counter()
from pathlib import Path
from dptrain.data import fetch
t3 = time.perf_counter()
fetch._missing_local("mnist", Path(sys.argv[1]), fetch._raw_dir("mnist", Path(sys.argv[1])))
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t4 - t3, time.time(), flush=True)
"""


def startup(root: str, repeats: int) -> dict[str, Any]:
    rows = []
    for _ in range(repeats):
        proc = subprocess.Popen([sys.executable, "-c", _STARTUP, root], stdout=subprocess.PIPE,
                                text=True)
        line = proc.stdout.readline()
        proc.wait()
        end = time.time()
        torch_s, dynamo_s, verify_s, printed = map(float, line.split())
        rows.append({"import_torch_s": torch_s, "import_dynamo_s": dynamo_s,
                     "verify_mnist_s": verify_s, "teardown_s": end - printed})
    return {"runs": rows, "median": {k: statistics.median(r[k] for r in rows) for k in rows[0]}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="./data")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--startup-repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "recipe_parts.json"))
    args = p.parse_args()
    from dptrain.bench import machine_info, write_result

    result: dict[str, Any] = {"benchmark": "recipe_parts", "machine": machine_info(sys.argv)}
    result["order"] = step_times(args.rounds)
    o = result["order"]["median_step_s"]
    print(f"step at batch 128: fastnet-v1 {1e3 * o['fastnet-v1']:.1f} ms, fastnet "
          f"{1e3 * o['fastnet']:.1f} ms: {result['order']['speedup']:.2f}x", flush=True)
    result["startup"] = startup(args.data_root, args.startup_repeats)
    print("start-up medians: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                          result["startup"]["median"].items()), flush=True)
    if args.seeds:
        result["accuracy"] = accuracy(args.data_root, args.seeds)
        print("one-epoch accuracy means: " + ", ".join(
            f"{m} {v:.4f}" for m, v in result["accuracy"]["mean"].items()), flush=True)
    print(f"wrote {write_result(result, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
