"""``dptrain verify``: prove that N processes train exactly like one process.

Runs the same configuration twice -- 1 process with batch ``N*B`` and ``N`` DDP processes with
batch ``B`` each -- and compares the final parameters (and the loss trajectory). Exit 0 when the
largest absolute parameter difference is within ``--tol``, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from dptrain.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from dptrain.cli import add_config_flags

    p = sub.add_parser(
        "verify", help="check that N-process training equals 1-process training",
        description="Train 1 process x batch N*B and N processes x batch B from the same seed "
                    "and compare the parameters. Exit 0 within --tol, 1 otherwise.")
    p.add_argument("--strategy", default="ddp", choices=EXACT,
                   help="the N-process strategy to check against one process (default: ddp)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default: 30)")
    p.add_argument("--tol", type=float, default=1e-5,
                   help="largest allowed |difference| of any parameter (default: 1e-5)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="keep both runs under DIR (default: a temporary directory)")
    p.set_defaults(func=cmd_verify)
    add_config_flags(p, only=VERIFY_FLAGS, defaults=VERIFY_DEFAULTS)


# the strategies whose N-process step equals the one-process step (hogwild is not exact)
EXACT = ("ddp", "zero", "fsdp", "pipeline", "localsgd")
VERIFY_FLAGS = ("model", "dataset", "data_root", "loss", "task", "batch_size", "nproc", "lr",
                "optimizer", "momentum", "accum", "sync_bn", "seed", "threads", "precision",
                "weight_decay", "stages", "microbatches", "pipeline_schedule", "split_points",
                "sync_every", "localsgd_warmup_steps", "balance")
# what verify runs when a flag is not given (shown by --help as the defaults they are)
VERIFY_DEFAULTS = {"nproc": "2", "dataset": "synthetic", "batch_size": 16, "lr": 0.01,
                   "momentum": 0.9}


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu",
                       weights_only=True)
    return state["model"]


def _losses(run_dir: Path) -> list[float]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out.append(rec["loss"])
    return out


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest absolute difference over all floating-point entries, and where it is."""
    worst, where = 0.0, ""
    for name, ta in a.items():
        tb = b[name]
        if not ta.is_floating_point():
            continue
        d = (ta.double() - tb.double()).abs().max().item() if ta.numel() else 0.0
        if d > worst:
            worst, where = d, name
    return worst, where


# not for the one-process run (--sync-bn: one process's BatchNorm already sees the whole batch)
STRATEGY_ONLY = ("stages", "microbatches", "pipeline_schedule", "split_points", "sync_every",
                 "localsgd_warmup_steps", "balance", "sync_bn")


def replicas(values: dict[str, Any], nproc: int, strategy: str) -> int:
    """Data-parallel replicas among ``nproc`` processes: a pipeline's stages share one."""
    if strategy != "pipeline":
        return nproc
    return max(1, nproc // (values.get("stages") or nproc))


def run_pair(values: dict[str, Any], nproc: int, steps: int, root: Path,
             strategy: str = "ddp") -> tuple[dict[str, Any], dict[str, Any]]:
    from dptrain.cli import run_training
    from dptrain.config import TrainConfig

    base = dict(values, max_steps=steps, epochs=10_000, log_every=1, eval_every_epoch=False,
                resume="", max_restarts=0, quiet=True, strategy="auto",
                # contiguous: channels_last picks oneDNN kernels by batch and thread count,
                # whose rounding alone would grow past the tolerance on BatchNorm convnets
                channels_last="off")
    from dptrain.plan import FLAG_OWNERS  # the N-process strategy's own settings, too

    single = {k: v for k, v in base.items() if k not in STRATEGY_ONLY and k not in FLAG_OWNERS}
    threads = str(values.get("threads", "0")).split(",")[0]
    one = TrainConfig(**{**single, "threads": threads, "nproc": "1", "strategy": "single",
                         "batch_size": values["batch_size"] * replicas(values, nproc, strategy),
                         "out": str(root / "one")}).validate()
    many = TrainConfig(**{**base, "nproc": str(nproc), "strategy": strategy,
                          "out": str(root / f"{strategy}{nproc}")}).validate()
    s1 = run_training(one)
    sn = run_training(many)
    return s1, sn


def _nproc(text: str, device: str) -> int:
    """``--nproc N`` or ``auto`` (the GPUs, else the usable CPU cores), 1 to 64."""
    if text == "auto":
        from dptrain.plan import auto_nproc

        nproc = auto_nproc(device)
    else:
        try:
            nproc = int(text)
        except ValueError:
            raise UsageError(f"--nproc must be a positive integer or auto, got {text!r}"
                             ) from None
    if nproc < 1 or nproc > 64:
        raise UsageError(f"--nproc must be between 1 and 64, got {nproc}")
    return nproc


def cmd_verify(args: argparse.Namespace) -> int:
    from dptrain.config import FIELDS
    from dptrain.models import build_model, has_batchnorm

    values = {**VERIFY_DEFAULTS, **{n: getattr(args, n) for n in FIELDS if hasattr(args, n)}}
    nproc = _nproc(str(values["nproc"]), str(values.get("device", "auto")))
    values["nproc"] = str(nproc)
    if not 1 <= args.steps <= 100_000:
        raise UsageError(f"--steps must be between 1 and 100000, got {args.steps}")
    if not (math.isfinite(args.tol) and args.tol > 0):
        raise UsageError(f"--tol must be a positive finite number, got {args.tol}")
    if args.strategy == "localsgd":
        values.setdefault("sync_every", 1)
        if int(values["sync_every"]) > 1 and int(values.get("localsgd_warmup_steps", 0)) < (
                args.steps):
            raise UsageError(f"--strategy localsgd --sync-every {values['sync_every']} averages "
                             "the models every few steps, which is not one-process training by "
                             "design; verify it with --sync-every 1 (the exact case)")
    if args.keep:
        from dptrain.rundir import holds_run

        keep = Path(args.keep)
        if keep.exists() and not keep.is_dir():
            raise UsageError(f"--keep {keep} exists and is not a directory; choose a directory")
        used = [d for d in ("one", f"{args.strategy}{nproc}")
                if (keep / d).exists() and holds_run(keep / d)]
        if used:
            raise UsageError(f"--keep {keep} already holds verify runs ({', '.join(used)}); "
                             "choose another --keep directory")
    model = build_model(values.get("model", "linear"), values.get("model_args", ""))
    if has_batchnorm(model) and not values.get("sync_bn"):
        print("note: the model has BatchNorm: without --sync-bn each process normalises with "
              "its own batch statistics, so results differ from one process by design")
    if any(isinstance(m, torch.nn.Dropout) for m in model.modules()):
        print("note: the model has dropout: each process draws its own masks, so results "
              "differ from one process by design")
    with tempfile.TemporaryDirectory(prefix="dptrain-verify-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        s1, sn = run_pair(values, nproc, args.steps, root, args.strategy)
        many = root / f"{args.strategy}{nproc}"
        diff, where = compare(_params(root / "one"), _params(many))
        l1, ln = _losses(root / "one"), _losses(many)
    loss_diff = max((abs(a - b) for a, b in zip(l1, ln)), default=0.0)
    ok = diff <= args.tol
    print(f"1 process x batch {s1['global_batch']} vs {args.strategy} x {nproc} processes x "
          f"batch "
          f"{values['batch_size']} ({sn['global_batch']} global), {args.steps} steps, "
          f"model {values.get('model', 'linear')}, dataset {values['dataset']}, loss "
          f"{values.get('loss', 'cross_entropy')}")
    print(f"largest parameter difference: {diff:.3e} ({where or '-'}); largest loss difference "
          f"over {len(l1)} steps: {loss_diff:.3e}; tolerance {args.tol:g}")
    print("PASS: N-process training equals 1-process training" if ok else
          "FAIL: the runs diverge beyond the tolerance")
    return 0 if ok else 1
