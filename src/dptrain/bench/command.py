"""``dptrain bench``: measured throughput, step-time breakdown, memory and scaling predictions.

Every configuration runs in fresh processes started by PyTorch's elastic launcher
(:func:`dptrain.launch.launch`); configurations that cannot run here are reported as skipped,
with the reason. Writes ``results.json``, ``report.md`` and PNG plots into ``--out``::

    dptrain bench --quick --out bench-quick                 # < 3 min on 2 CPU cores
    dptrain bench --strategies ddp --nproc 1,2,4 --model cnn --steps 100 --out bench-cnn
    dptrain bench comm --sizes 4K,1M,64M --nproc 2          # all-reduce sweep only
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dptrain.config import default_data_root
from dptrain.errors import UsageError, comma_list

if TYPE_CHECKING:
    from dptrain.bench.plan import Config

DEFAULTS: dict[str, Any] = {
    "strategies": "single,dp,ddp,zero,fsdp", "nproc": "1,2", "model": "convnet", "batch_size": 64,
    "steps": 50, "warmup": 5, "repeats": 3, "dataset": "mnist", "threads": 0, "seed": 0,
    "lr": 0.01, "device": "auto", "bucket_cap_mb": 25.0, "sizes": None, "iters": 20,
    "baseline_steps": 300,
}
# upper bounds: a value past them is a typo, and would fail in every worker instead of here
MAXIMA: dict[str, int] = {"batch_size": 1 << 20, "steps": 10_000_000, "warmup": 1_000_000,
                          "repeats": 1000, "threads": 1024, "seed": 2**63 - 1,
                          "iters": 1_000_000, "baseline_steps": 10_000_000}
TARGET_NAMES = ("h100", "h200", "a100", "v100", "cpu-this")
QUICK: dict[str, Any] = {"steps": 30, "warmup": 3, "repeats": 2, "iters": 10,
                         "baseline_steps": 200}

DESCRIPTION = """\
Measure data-parallel training: every configuration (strategy x processes) runs in fresh
processes started by PyTorch's elastic launcher, with warm-up excluded, device-synchronised
timing and repeats; configurations that cannot run here are reported as skipped, with the
reason. Writes results.json, report.md and PNG plots into --out.

examples:
  dptrain bench --quick --out bench-quick                 # a few minutes on 2 CPU cores
  dptrain bench --strategies ddp --nproc 1,2,4 --model cnn --steps 100 --out bench-cnn
  dptrain bench comm --sizes 4K,1M,64M --nproc 2          # all-reduce sweep only
"""

FLAGS: tuple[tuple[str, type, str], ...] = (
    ("strategies", str, "comma-separated strategies: single, dp, ddp, zero, fsdp, pipeline"),
    ("nproc", str, "comma-separated process counts (GPUs for dp); 'auto' = GPUs or cores"),
    ("model", str, "model name, or package.module:factory"),
    ("batch_size", int, "samples per process (per GPU for dp) per step"),
    ("steps", int, "timed optimizer steps per repeat"),
    ("warmup", int, "untimed warm-up steps before them"),
    ("repeats", int, "fresh launches per configuration (mean ± std over them)"),
    ("dataset", str, "mnist, fashion-mnist, synthetic or package.module:factory"),
    ("threads", int, "intra-op threads per process; 0 = CPU cores / processes"),
    ("seed", int, "seed: the same initial model and data order for every configuration"),
    ("lr", float, "SGD learning rate (momentum 0.9)"),
    ("device", str, "auto, cpu or cuda"),
    ("bucket_cap_mb", float, "DDP gradient bucket size in MiB"),
    ("sizes", str, "all-reduce message sizes (comm sweep), e.g. 4K,64K,1M,64M"),
    ("iters", int, "all-reduces timed per message size"),
    ("baseline_steps", int, "steps of the tutorial-loop baseline row; 0 = no baseline row"),
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``dptrain bench`` (and ``dptrain bench comm``) on the CLI's subparsers."""
    from dptrain.bench.comm import DEFAULT_SIZES, QUICK_SIZES

    p = sub.add_parser(
        "bench", help="measure throughput, scaling and communication; predict scaling",
        description=DESCRIPTION,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=30, width=100))
    p.add_argument("what", nargs="?", choices=("run", "comm"), default="run",
                   help="run: the full benchmark (default); comm: the all-reduce sweep only")
    for name, kind, text in FLAGS:
        default = DEFAULTS[name] if name != "sizes" else DEFAULT_SIZES
        quick = QUICK.get(name, QUICK_SIZES if name == "sizes" else None)
        shown = f"default: {default}" + (f"; --quick: {quick}" if quick is not None else "")
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       metavar=name.upper(), help=f"{text} ({shown})")
    p.add_argument("--target", default=None, metavar="NAME[:PRECISION]",
                   help="predict the stated links (PCIe, NVLink, Ethernet) with this device's "
                        "compute time, from the model's FLOPs and the device's peak x MFU: "
                        f"{', '.join(TARGET_NAMES)}; precision fp32, tf32, bf16 or fp16 "
                        "(default: none = this machine's measured compute)")
    p.add_argument("--target-mfu", type=float, default=None, metavar="MFU",
                   help="model FLOP utilisation assumed on --target, 0 < MFU <= 1 (default: "
                        "the profile's, 0.35 on GPUs)")
    p.add_argument("--target-compute-ms", type=float, default=None, metavar="MS",
                   help="predict the stated links with this compute time per step instead "
                        "(default: none)")
    p.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the fp32/bf16 matmul peak and a training step in each, for "
                        "the roofline table (a few seconds) (default: yes)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="dataset root (default: $DPTRAIN_DATA, else ./data)")
    p.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                   help="before each launch wait up to SECONDS for other processes to leave "
                        "the CPU (at most 15%% busy) (default: 0)")
    p.add_argument("--compare", default=None, metavar="STRATEGIES",
                   help="instead: train each of these strategies (ddp, zero, fsdp, localsgd, "
                        "hogwild) to --target-accuracy with the largest --nproc and report time, "
                        "steps and bytes communicated, and when relaxed synchronisation pays "
                        "(alpha-beta model for 25/100 GbE) (default: none)")
    p.add_argument("--target-accuracy", type=float, default=0.98, metavar="ACC",
                   help="--compare: the test accuracy each strategy trains to (default: 0.98)")
    p.add_argument("--max-epochs", type=int, default=5, metavar="N",
                   help="--compare: give up after N epochs (default: 5)")
    p.add_argument("--eval-every", type=int, default=20, metavar="STEPS",
                   help="--compare: evaluate every STEPS optimizer steps (default: 20)")
    p.add_argument("--sync-every", type=int, default=8, metavar="H",
                   help="--compare: localsgd averages the parameters every H steps "
                        "(default: 8)")
    p.add_argument("--quick", action="store_true",
                   help="small configuration: finishes in a few minutes on 2 CPU cores")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write PNG plots (needs matplotlib) (default: yes)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: runs/bench-<timestamp>; for comm: none)")
    p.set_defaults(func=cmd_bench)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """Flags > --quick > defaults, parsed and checked; raises :class:`UsageError`."""
    from dptrain.bench.comm import DEFAULT_SIZES, QUICK_SIZES, parse_sizes
    from dptrain.config import DATASETS, MODELS

    o = dict(DEFAULTS, sizes=QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.quick:
        o.update(QUICK)
    o.update({name: getattr(args, name) for name, _, _ in FLAGS
              if getattr(args, name, None) is not None})
    o["data_root"] = args.data_root or default_data_root()
    for name, low in (("batch_size", 1), ("steps", 1), ("warmup", 0), ("repeats", 1),
                      ("threads", 0), ("seed", 0), ("iters", 1), ("baseline_steps", 0)):
        if o[name] < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, got {o[name]}")
        if o[name] > MAXIMA[name]:
            raise UsageError(f"--{name.replace('_', '-')} must be at most {MAXIMA[name]:,}, got "
                             f"{o[name]:,}")
    for name, high in (("lr", 1e6), ("bucket_cap_mb", 1e6)):
        if not (math.isfinite(o[name]) and 0 < o[name] <= high):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number up to "
                             f"{high:g}, got {o[name]}")
    if o["device"] not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {o['device']!r} is not one of auto, cpu, cuda")
    if ":" not in o["model"] and o["model"] not in MODELS:
        raise UsageError(f"unknown --model {o['model']!r}: use one of {', '.join(MODELS)} or "
                         "package.module:factory")
    if ":" not in o["dataset"] and o["dataset"] not in DATASETS:
        raise UsageError(f"unknown --dataset {o['dataset']!r}: use one of "
                         f"{', '.join(DATASETS)} or package.module:factory")
    o["strategies"] = _strategies(o["strategies"])
    o["nprocs"] = _nprocs(o.pop("nproc"), o["device"])
    o["sizes"] = parse_sizes(o["sizes"])
    if not (math.isfinite(args.settle) and 0 <= args.settle <= 3600):
        raise UsageError(f"--settle must be 0 to 3600 seconds, got {args.settle}")
    o["quick"], o["plots"], o["what"] = args.quick, args.plots, args.what
    o["settle"] = args.settle
    o.update(_target_options(args))
    o.update(_compare_options(args, o))
    return o


def _compare_options(args: argparse.Namespace, o: dict[str, Any]) -> dict[str, Any]:
    """--compare and its settings, checked (empty when --compare is not given)."""
    text = getattr(args, "compare", None)
    if text is None:
        return {"compare": None}
    from dptrain.bench.compare import parse

    names = parse(text)
    n = max(o["nprocs"])
    if n < 2:
        raise UsageError(f"--compare needs at least 2 processes (--nproc {n}): the strategies "
                         "differ in how processes synchronise")
    acc, epochs, every, h = (args.target_accuracy, args.max_epochs, args.eval_every,
                             args.sync_every)
    if not (math.isfinite(acc) and 0 < acc <= 1):
        raise UsageError(f"--target-accuracy must be in (0, 1] (0.98 for 98 %), got {acc}")
    for flag_name, value, high in (("max-epochs", epochs, 10_000), ("eval-every", every, 10**7),
                                   ("sync-every", h, 10**6)):
        if not 1 <= value <= high:
            raise UsageError(f"--{flag_name} must be 1 to {high}, got {value}")
    return {"compare": names, "compare_nproc": n, "target_accuracy": acc,
            "max_epochs": epochs, "eval_every": every, "sync_every": h}


def _target_options(args: argparse.Namespace) -> dict[str, Any]:
    """--target, --target-mfu, --target-compute-ms and --roofline, checked."""
    from dptrain.bench.predict import parse_target

    target = getattr(args, "target", None)
    mfu = getattr(args, "target_mfu", None)
    ms = getattr(args, "target_compute_ms", None)
    if target is not None:
        try:
            parse_target(target)
        except ValueError as exc:
            raise UsageError(f"--target {target!r}: {exc}") from None
    if target is not None and ms is not None:
        raise UsageError("--target and --target-compute-ms both set the stated links' compute "
                         "time: give one of them")
    if mfu is not None:
        if target is None:
            raise UsageError("--target-mfu needs --target NAME (the device it applies to)")
        if not (math.isfinite(mfu) and 0 < mfu <= 1):
            raise UsageError(f"--target-mfu must be in (0, 1], got {mfu}")
    if ms is not None and not (math.isfinite(ms) and 0 < ms <= 1e7):
        raise UsageError(f"--target-compute-ms must be a positive number of milliseconds, "
                         f"got {ms}")
    return {"target": target, "target_mfu": mfu, "target_compute_ms": ms,
            "roofline": getattr(args, "roofline", True)}


def _strategies(text: str) -> list[str]:
    from dptrain.bench.plan import STRATEGIES

    names = comma_list("--strategies", text, "single,ddp")
    bad = [s for s in names if s not in STRATEGIES]
    if bad:
        raise UsageError(f"--strategies {text!r}: use a comma-separated list of "
                         f"{', '.join(STRATEGIES)}")
    return names


def nproc_limit(device: str) -> tuple[int, str]:
    """The most processes a bench may ask for here, and what that limit is."""
    from dptrain.bench import usable_cores

    cores = usable_cores()
    limit, what = 4 * cores, f"4 x this machine's {cores} usable core(s)"
    if device != "cpu":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus > limit:
            limit, what = gpus, f"this machine's {gpus} GPU(s)"
    return limit, what


def _nprocs(text: str, device: str) -> list[int]:
    from dptrain.plan import auto_nproc

    out: list[int] = []
    for part in comma_list("--nproc", text, "1,2"):
        if part == "auto":
            out.append(auto_nproc(device))
            continue
        try:
            n = int(part)
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"--nproc {text!r}: use positive integers (or auto), e.g. 1,2,4")
        out.append(n)
    limit, what = nproc_limit(device)
    if max(out) > limit:
        raise UsageError(f"--nproc {text!r}: at most {limit} processes here ({what}); "
                         "scaling beyond the machine is what the prediction table shows")
    return sorted(set(out))


def cmd_bench(args: argparse.Namespace) -> int:
    """Entry point of ``dptrain bench``."""
    o = options(args)
    if o["compare"]:
        from dptrain.bench.compare import run_compare

        return run_compare(o, Path(args.out or Path("runs") / datetime.now().strftime(
            "compare-%Y%m%d-%H%M%S")))
    if o["what"] == "comm":
        return run_comm(o, args.out)
    return run_bench(o, Path(args.out or Path("runs") / datetime.now().strftime(
        "bench-%Y%m%d-%H%M%S")))


def failure_summary(report: str) -> str:
    """The line of a worker's traceback that names the exception (one line, for the table)."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    named = [line for line in lines
             if re.match(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b:?", line)]
    text = (named or lines or ["no traceback"])[-1].replace("|", "/")
    return text if len(text) <= 300 else text[:297] + "..."


def _check_out(out: Path) -> None:
    """A bench writes into a new or empty directory only: its report and plots have common
    names (report.md, *.png) that must not replace a user's files or an earlier bench's."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; choose another --out")
    if not out.exists():
        return
    if (out / "results.json").exists():
        raise UsageError(f"--out {out} already holds a bench result (results.json); choose "
                         "another --out or remove it")
    from dptrain.rundir import holds_run

    if holds_run(out):
        raise UsageError(f"--out {out} holds a training run ({', '.join(holds_run(out))}); "
                         "choose another --out for the bench")
    held = sorted(p.name for p in out.iterdir())
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise UsageError(f"--out {out} is not empty ({shown}); a bench writes into a new or "
                         "empty directory: choose another --out")


def _sweeps(o: dict[str, Any], ns: list[int]) -> tuple[list[dict[str, Any]], list[dict]]:
    from dptrain.bench.comm import feasible, run_sweep
    from dptrain.launch import WorkerFailure

    sweeps, skipped = [], []
    for n in ns:
        why = feasible(n, o["device"])
        if why:
            skipped.append({"n": n, "reason": why})
            print(f"comm sweep n={n}: skipped ({why})", flush=True)
            continue
        try:
            sweep = run_sweep(n, o["sizes"], iters=o["iters"], device=o["device"])
        except WorkerFailure as exc:
            why = "failed: " + failure_summary(str(exc))
            skipped.append({"n": n, "reason": why})
            print(f"comm sweep n={n}: {why}", flush=True)
            continue
        sweeps.append(sweep)
        best = max(p["busbw_Bps"] for p in sweep["points"])
        print(f"comm sweep n={n} ({sweep['backend']}): {len(sweep['points'])} sizes, best "
              f"busbw {best / 1e9:.2f} GB/s ({sweep['wall_s']:.1f} s)", flush=True)
    return sweeps, skipped


def run_comm(o: dict[str, Any], out: str | None) -> int:
    """``dptrain bench comm``: the sweep alone; prints the table, optionally saves it."""
    from dptrain.bench import machine_info
    from dptrain.bench.comm import sweep_table

    ns = [n for n in o["nprocs"] if n >= 2]
    if not ns:
        raise UsageError("dptrain bench comm needs --nproc N with N >= 2 (an all-reduce among "
                         "one process measures nothing)")
    if out:
        _check_out(Path(out))
    sweeps, skipped = _sweeps(o, ns)
    print("\n".join(sweep_table(sweeps)))
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        doc = {"machine": machine_info(), "sweeps": sweeps, "skipped": skipped}
        (path / "comm.json").write_text(json.dumps(doc, indent=1))
        if o["plots"]:
            from dptrain.bench.plots import plot_comm

            plot_comm(path, sweeps, None)
        print(f"wrote {path / 'comm.json'}")
    return 0 if sweeps else 1


def _run_config(c: Config, o: dict[str, Any]) -> dict[str, Any]:
    """One repeat of one configuration in fresh processes; its combined result."""
    from dptrain.bench.harness import baseline_worker, bench_worker, combine_ranks
    from dptrain.launch import launch

    spec = {"strategy": c.strategy, "model": c.model, "dataset": o["dataset"],
            "data_root": o["data_root"], "batch_size": c.batch_size, "steps": c.steps,
            "warmup": o["warmup"], "threads": o["threads"], "seed": o["seed"], "lr": o["lr"],
            "device": o["device"], "bucket_cap_mb": o["bucket_cap_mb"], "gpus": c.nproc,
            "diag_steps": 20 if o["quick"] else 50}
    if c.role == "baseline":
        return launch(baseline_worker, (spec,), nproc=1, fast_exit=True)[0]
    procs = 1 if c.strategy == "dp" else c.nproc
    return combine_ranks(launch(bench_worker, (spec,), nproc=procs, fast_exit=True))


def run_bench(o: dict[str, Any], out: Path) -> int:
    """The full benchmark; writes results.json, report.md and plots into ``out``."""
    import torch

    from dptrain.bench import OtherLoad, cpu_busy, machine_info, wait_for_quiet
    from dptrain.bench import predict as P
    from dptrain.bench.analysis import (
        add_efficiency,
        comm_points,
        forward_flops,
        predictions,
        roofline,
        summarise,
        target_for,
    )
    from dptrain.bench.plan import plan_configs, rotated
    from dptrain.bench.report import throughput_rows, write_report
    from dptrain.launch import WorkerFailure

    started = time.perf_counter()
    _check_out(out)
    on_gpu = o["device"] != "cpu" and torch.cuda.is_available()
    if o["device"] == "cuda" and not on_gpu:
        raise UsageError("--device cuda but no CUDA GPU is visible; use --device cpu (or auto)")
    forward, flops_note = forward_flops(o["model"])
    try:
        target = target_for(o, forward)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if target is not None:
        print(f"stated links predicted with {target['source']}", flush=True)
    _prepare_inputs(o)
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if on_gpu else 0
    configs = plan_configs(o["strategies"], o["nprocs"], model=o["model"],
                           batch_size=o["batch_size"], steps=o["steps"],
                           baseline_steps=o["baseline_steps"], on_gpu=on_gpu, gpus=gpus)
    for c in configs:
        if c.skip:
            print(f"{c.name}: skipped ({c.skip})", flush=True)
    ns = sorted({c.nproc for c in configs if c.strategy == "ddp" and not c.skip and c.nproc > 1})
    sweeps, sweep_skips = _sweeps(o, ns)
    runnable = [c for c in configs if not c.skip]
    total, done = len(runnable) * o["repeats"], 0
    for r in range(o["repeats"]):
        for c in rotated(runnable, r):
            done += 1
            if c.failure:
                continue
            busy = wait_for_quiet(o["settle"]) if o["settle"] else cpu_busy(0.2)
            t0 = time.perf_counter()
            try:
                with OtherLoad() as load:
                    result = _run_config(c, o)
            except WorkerFailure as exc:
                c.failure = "worker failed: " + failure_summary(str(exc))
                print(f"[{done}/{total}] {c.name}: FAILED ({c.failure})", flush=True)
                continue
            result.update(repeat=r, wall_s=time.perf_counter() - t0, other_load=load.fraction,
                          cpu_busy_before=busy)
            c.repeats.append(result)
            print(f"[{done}/{total}] {c.name} repeat {r + 1}/{o['repeats']}: "
                  f"{result['samples_per_s']:,.0f} samples/s ({result['wall_s']:.1f} s)",
                  flush=True)
    for c in configs:
        summarise(c)
    add_efficiency(configs)
    fit, fit_note = None, None
    try:
        fit = P.fit_cost_model(comm_points(sweeps))
    except ValueError as exc:
        fit_note = f"no cost-model fit: {exc}"
    pred = predictions(configs, fit, cpu=not on_gpu, bucket_cap_mb=o["bucket_cap_mb"],
                       fit_note=fit_note, target=target)
    roof = None
    if o["roofline"]:
        roof = roofline(configs, o, forward, seconds=0.5 if o["quick"] else 1.0)
    results = {
        "schema": "dptrain-bench/1",
        "options": {k: v for k, v in o.items() if k != "what"},
        "machine": dict(machine_info(), gpus=gpus,
                        gpu_names=[torch.cuda.get_device_name(i) for i in range(gpus)]),
        "configurations": [c.to_dict() for c in configs],
        "comm": {"sweeps": sweeps, "skipped": sweep_skips,
                 "fit": fit.to_dict() if fit else None, "fit_note": fit_note},
        "prediction": pred,
        "flops": {"forward_flops_per_sample": forward,
                  "train_flops_per_sample": None if forward is None else 3 * forward,
                  "note": flops_note or "training = 3 x forward (dptrain.flops)"},
        "roofline": roof,
    }
    plots = None
    if o["plots"]:
        from dptrain.bench.plots import write_plots

        plots = write_plots(out, configs, sweeps, fit, pred)
    results["plots"] = plots
    results["wall_time_s"] = time.perf_counter() - started
    results = _finite(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    write_report(out, results, configs)
    print("\n" + "\n".join(throughput_rows(configs)))
    print(f"\nbench done in {results['wall_time_s']:.0f} s: {out / 'report.md'}, "
          f"{out / 'results.json'}", flush=True)
    main_rows = [c for c in configs if c.role == "main"]
    if not any(c.status == "ok" for c in main_rows):
        failed = sum(c.status == "failed" for c in main_rows)
        print(f"bench: no configuration ran ({failed} failed, {len(main_rows) - failed} "
              f"skipped or not run): nothing was measured; the reasons are in "
              f"{out / 'report.md'}", file=sys.stderr, flush=True)
        return 1
    return 0


def _prepare_inputs(o: dict[str, Any]) -> None:
    """Fetch MNIST-like data once here, not concurrently in every worker; a plug-in model or
    dataset is checked here once (it builds, loads, and one batch fits), so that bad input
    is one ``error:`` line before anything is written, not a failure in every worker."""
    from dptrain.data.datasets import RAW_DIRS

    if o["dataset"] in RAW_DIRS:
        from dptrain.data.fetch import ensure_dataset

        ensure_dataset(o["dataset"], Path(o["data_root"]), log=print)
    if ":" in o["model"] or ":" in o["dataset"]:
        from dptrain.config import TrainConfig
        from dptrain.run import check_inputs

        check_inputs(TrainConfig(model=o["model"], dataset=o["dataset"],
                                 data_root=o["data_root"], batch_size=o["batch_size"]))


def _finite(value: Any) -> Any:
    """inf/nan -> None, so that results.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """Run ``dptrain bench`` without the main CLI (until it registers this module)."""
    from dptrain.cli import Parser

    parser = Parser(prog="dptrain")
    add_parser(parser.add_subparsers(dest="command", parser_class=Parser))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
