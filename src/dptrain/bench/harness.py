"""What runs inside each benchmark process, and how one configuration's ranks are combined.

:func:`bench_worker` measures one configuration in one process of a fresh launch, using
dptrain's own pieces (strategy, model, device-resident sharded loader). Three phases:

1. **train**: ``warmup`` steps, then ``steps`` timed steps of :class:`dptrain.loop.TrainStep`,
   the step training runs -- batch gather + normalise, the strategy's forward/backward with
   gradient all-reduce, the strategy's optimizer step (SGD, momentum 0.9). The
   clock is device-synchronised at both ends. Gives samples/s, the loss curve and, through
   DDP's comm hook, all-reduce calls and bytes.
2. **data**: the loader alone (gather + normalise), batches timed one by one -> ``data_s``
   (median).
3. **sync / no-sync**: steps with gradient all-reduce and as many steps under
   ``strategy.no_sync(model)`` (the same work without communication), alternating step by step
   so that a shared machine's drift hits both alike, on batches already prepared ->
   ``compute_s`` = median no-sync step, exposed communication ``comm_s`` = median sync step -
   ``compute_s``, clamped at 0. The replicas diverge in this phase (their updates are no longer
   averaged), which is why it comes after the training phase.

Phases 2 and 3 time ``min(steps, diag_steps)`` steps each (50; 20 with ``--quick``). Medians of per-step times keep one descheduled step from deciding the breakdown; the
throughput (phase 1) is total samples over total time.

:func:`baseline_worker` runs the tutorial-style loop of :mod:`dptrain.bench.baseline`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dptrain.data.loader import Batch

DIAGNOSTIC_STEPS = 50  # per-step timings for the breakdown: medians need no more


def _quiet(_msg: str) -> None:
    """Workers print nothing: the parent reports progress."""


def rss_bytes() -> tuple[int | None, int | None]:
    """(current, peak) resident set size of this process (``/proc/self/status``).

    Falls back to ``getrusage`` (peak only) where ``/proc`` is missing.
    """
    try:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields.get("VmRSS"), fields.get("VmHWM")
    except (OSError, ValueError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return None, peak if sys.platform == "darwin" else peak * 1024


def _sync(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
# torch.distributed functions -> the collective they are; (output, input) ones count the input
_FUNCTIONS = {"all_reduce": "all_reduce", "broadcast": "broadcast",
              "all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
              "reduce_scatter_tensor": "reduce_scatter",
              "reduce_scatter_single": "reduce_scatter"}
_OUTPUT_FIRST = ("all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
                 "reduce_scatter_single")


class CollectiveCounter:
    """Counts the bytes each ``torch.distributed`` collective is handed while active (the
    functions are wrapped at module level, where DDP's default hook, ZeroRedundancyOptimizer
    and FSDP2 look them up). The shared-memory all-reduce does not go through them: DDP's comm
    hook counts that path (``allreduce_bytes``)."""

    def __init__(self) -> None:
        import torch.distributed as tdist

        self.tdist = tdist
        self.bytes = dict.fromkeys(COLLECTIVES, 0)
        self.calls = dict.fromkeys(COLLECTIVES, 0)
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CollectiveCounter:
        for name in _FUNCTIONS:
            real = getattr(self.tdist, name, None)
            if real is not None:
                self._saved[name] = real
                setattr(self.tdist, name, self._counting(name, real))
        return self

    def _counting(self, name: str, real: Any) -> Any:
        kind = _FUNCTIONS[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            if name in _OUTPUT_FIRST:
                t = args[1] if len(args) > 1 else kwargs.get("input",
                                                             kwargs.get("input_tensor"))
            else:
                t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, torch.Tensor):
                self.bytes[kind] += t.numel() * t.element_size()
            self.calls[kind] += 1
            return real(*args, **kwargs)

        return counted

    def __exit__(self, *exc: object) -> None:
        for name, real in self._saved.items():
            setattr(self.tdist, name, real)


def _batches(loader: Any) -> Iterator[list[Batch]]:
    """Endless stream of this rank's steps (one micro-batch each), epoch after epoch."""
    for epoch in itertools.count():
        yield from loader.epoch(epoch)


def bench_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One process of one configuration; returns this rank's measurements.

    Args:
        spec: ``strategy``, ``model``, ``dataset``, ``data_root``, ``batch_size``, ``steps``,
            ``warmup``, ``threads`` (0 = cores / local processes), ``seed``, ``lr``,
            ``device``, ``bucket_cap_mb`` and, for ``dp``, ``gpus``.
    """
    from dptrain import dist, strategies
    from dptrain.config import TrainConfig
    from dptrain.plan import make_plan

    env = dist.detect()
    pipeline = {"microbatches": pipeline_microbatches(spec["batch_size"])} if (
        spec["strategy"] == "pipeline") else {}
    if spec["strategy"] in ("ddp", "zero"):  # DDP's bucket size; the others have none
        pipeline["bucket_cap_mb"] = spec["bucket_cap_mb"]
    cfg = TrainConfig(strategy=spec["strategy"], model=spec["model"], dataset=spec["dataset"],
                      data_root=spec["data_root"], batch_size=spec["batch_size"],
                      device=spec["device"],
                      seed=spec["seed"], quiet=True, threads=spec["threads"],
                      optimizer="sgd", lr=spec["lr"], momentum=0.9, **pipeline).validate()
    plan = make_plan(cfg, env)
    threads = plan.threads
    torch.set_num_threads(threads)
    strategy = strategies.build(plan, env, count_comm=True)
    strategy.setup()
    try:
        result = _measure(spec, cfg, strategy)
    finally:
        strategy.teardown()
    result.update(rank=env.rank, world_size=env.world_size, threads=threads,
                  backend=strategy.backend, device=str(strategy.device))
    return result


def pipeline_microbatches(batch: int) -> int:
    """The bench's pipeline micro-batches: 4 where they divide the batch, else fewer."""
    return next(m for m in (4, 2, 1) if batch % m == 0)


def _measure(spec: dict[str, Any], cfg: Any, strategy: Any) -> dict[str, Any]:
    from dptrain.data.datasets import load_splits
    from dptrain.data.loader import Normalizer, ShardedLoader
    from dptrain.loop import TrainStep
    from dptrain.models import build_model, memory_format
    from dptrain.objective import Objective
    from dptrain.precision import Precision

    device = strategy.device
    devices = [device]
    feed = cfg.batch_size
    if strategy.name == "dp":  # one process drives `gpus` GPUs, each gets --batch-size samples
        strategy.device_ids = list(range(spec["gpus"]))
        devices = [torch.device("cuda", i) for i in strategy.device_ids]
        feed = cfg.batch_size * spec["gpus"]
    splits = load_splits(cfg.dataset, cfg.data_root, log=_quiet).to(device)
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    rss_before, _ = rss_bytes()

    torch.manual_seed(cfg.seed)  # the same initial parameters for every configuration
    model = build_model(cfg.model)
    # the layout `dptrain train` would train this model in (--channels-last auto: channels_last
    # for a built-in conv model on the CPU), parameters and inputs alike
    fmt, fmt_why = memory_format(cfg.channels_last, cfg.model, model, device, strategy.name)
    model = model.to(device, memory_format=fmt)
    normalize = Normalizer(splits.mean, splits.std, fmt)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                     if p.requires_grad)
    loader = ShardedLoader(splits.train_x, splits.train_y, batch_size=feed,
                           rank=strategy.data_rank, world=strategy.data_world, accum=1,
                           seed=cfg.seed, normalize=normalize)
    if loader.steps_per_epoch == 0:
        from dptrain.errors import UsageError

        raise UsageError(f"--batch-size {cfg.batch_size} x {strategy.world_size} processes is "
                         f"larger than the training split ({len(splits.train_x)}); lower it")
    wrapped = strategy.wrap(model)
    optimizer = strategy.build_optimizer(cfg, wrapped)
    train_step = TrainStep(strategy, wrapped, optimizer, Objective(cfg.loss),
                           Precision(cfg.precision, device))
    batches = _batches(loader)

    def step(micro: list[Batch]) -> torch.Tensor:
        losses = train_step(micro, 0)  # a pipeline's middle stages have none
        return losses[0] if losses else torch.tensor(float("nan"))

    steps, warmup = spec["steps"], spec["warmup"]
    wrapped.train()
    # --- 1. training, timed as a whole
    for _ in range(warmup):
        step(next(batches))
    comm = strategy.comm
    calls0, bytes0 = (comm.calls, comm.bytes) if comm is not None else (0, 0)
    _sync(devices)
    with CollectiveCounter() as collectives:
        start = time.perf_counter()
        losses = [step(next(batches)) for _ in range(steps)]
        _sync(devices)
        train_s = time.perf_counter() - start
    calls = (comm.calls - calls0) if comm is not None else 0
    nbytes = (comm.bytes - bytes0) if comm is not None else 0
    loss_curve = torch.stack(losses).float().cpu().tolist()

    # --- 2. the data pipeline alone, step by step; keep a few batches for phase 3
    pool: list[list[Batch]] = []
    data_times = []
    diag = min(steps, spec.get("diag_steps", DIAGNOSTIC_STEPS))
    for _ in range(diag):
        _sync(devices)
        start = time.perf_counter()
        batch = next(batches)
        _sync(devices)
        data_times.append(time.perf_counter() - start)
        if len(pool) < 8:
            pool.append(batch)

    # --- 3. steps with and without gradient sync, interleaved so that drift hits both alike
    sync_times, nosync_times = [], []
    for i in range(min(warmup, 3) * 2 + 2 * diag):
        micro = pool[i % len(pool)]
        ctx = strategy.no_sync(wrapped) if i % 2 else contextlib.nullcontext()
        _sync(devices)
        start = time.perf_counter()
        with ctx:
            step(micro)
        _sync(devices)
        if i >= min(warmup, 3) * 2:
            (nosync_times if i % 2 else sync_times).append(time.perf_counter() - start)

    _, rss_peak = rss_bytes()
    memory = []
    for d in devices:
        if d.type == "cuda":
            memory.append({"device": str(d), "kind": "cuda_max_allocated",
                           "bytes": torch.cuda.max_memory_allocated(d)})
        else:
            memory.append({"device": "cpu", "kind": "peak_rss", "bytes": rss_peak,
                           "rss_before_model_bytes": rss_before})
    data_s = statistics.median(data_times)
    compute_s = statistics.median(nosync_times)
    sync_step_s = statistics.median(sync_times)
    return {
        "train_s": train_s, "steps": steps, "warmup": warmup, "feed_batch": feed,
        "step_s": train_s / steps, "data_s": data_s, "compute_s": compute_s,
        "sync_step_s": sync_step_s,
        # DataParallel's scatter/replicate/gather happen inside every step, no_sync or not:
        # its communication cannot be separated from compute this way
        "comm_s": None if strategy.name == "dp" else max(0.0, sync_step_s - compute_s),
        "data_times_s": data_times, "sync_times_s": sync_times,
        "nosync_times_s": nosync_times,
        "allreduce_calls": calls, "allreduce_bytes": nbytes, "grad_bytes": grad_bytes,
        "collective_bytes": collectives.bytes, "collective_calls": collectives.calls,
        "state_memory": strategy.memory(wrapped, optimizer),
        "loss_curve": loss_curve, "memory": memory, "data_world": strategy.data_world,
        "describe": strategy.describe(),  # a collective for some strategies: every rank
        "memory_format": fmt_why,
    }


def combine_ranks(ranks: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One repeat of one configuration from its ranks' results.

    Global samples/s uses the slowest rank's time (the ranks wait for each other anyway);
    times per step are the mean over ranks; the loss is the mean of the ranks' losses, i.e.
    the loss over the global batch (every rank has the same batch size).
    """
    rs = [ranks[r] for r in sorted(ranks)]
    world = len(rs)
    train_s = max(r["train_s"] for r in rs)
    steps = rs[0]["steps"]
    global_batch = rs[0]["feed_batch"] * rs[0].get("data_world", world)
    # the ranks that compute a loss (a pipeline's last stages; every rank otherwise)
    curves = [r["loss_curve"] for r in rs if not all(math.isnan(v) for v in r["loss_curve"])]
    loss_curve = [statistics.fmean(v) for v in zip(*curves, strict=True)]
    mean = lambda key: statistics.fmean(r[key] for r in rs)  # noqa: E731
    # the no-sync steps of all ranks start together (each follows a sync step), and the next
    # all-reduce waits for the slowest: per step, the slowest rank's compute is what counts
    slowest = [max(v) for v in zip(*(r["nosync_times_s"] for r in rs), strict=True)]
    return {
        "samples_per_s": steps * global_batch / train_s,
        "step_s": train_s / steps,
        "data_s": mean("data_s"),
        "compute_s": mean("compute_s"),
        "compute_slowest_s": statistics.median(slowest),
        "sync_step_s": mean("sync_step_s"),
        "comm_s": None if rs[0]["comm_s"] is None else mean("comm_s"),
        "global_batch": global_batch,
        "allreduce_calls_per_step": rs[0]["allreduce_calls"] / steps,
        "allreduce_bytes_per_step": rs[0]["allreduce_bytes"] / steps,
        # rank 0's bytes handed to each torch.distributed collective, per step
        "collective_bytes_per_step": {k: v / steps
                                      for k, v in rs[0].get("collective_bytes", {}).items()},
        "state_memory": [dict(r.get("state_memory", {}), rank=r["rank"]) for r in rs],
        "grad_bytes": rs[0]["grad_bytes"],
        "final_loss": loss_curve[-1],
        "loss_curve": loss_curve,
        "memory": [dict(m, rank=r["rank"]) for r in rs for m in r["memory"]],
        "threads": rs[0]["threads"],
        "backend": rs[0]["backend"],
        "describe": rs[0].get("describe", {}),
        "memory_format": rs[0].get("memory_format"),
        "devices": [r["device"] for r in rs],
        "ranks": rs,
    }


def baseline_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The tutorial-style loop (per-sample ``DataLoader``, ``Linear(784, 10)``) in this process."""

    from dptrain.bench.baseline import run_tutorial_linear
    from dptrain.data.datasets import load_splits
    from dptrain.plan import usable_cores

    threads = spec["threads"] or usable_cores()
    torch.set_num_threads(threads)
    splits = load_splits(spec["dataset"], spec["data_root"], log=_quiet)
    batch = spec["batch_size"]
    epochs = math.ceil((spec["steps"] + 1) * batch / len(splits.train_x)) + 1
    result = run_tutorial_linear(splits, epochs=epochs, batch_size=batch, lr=spec["lr"],
                                 max_steps=spec["steps"] + 1, threads=threads)
    _, peak = rss_bytes()
    result["memory"] = [{"device": "cpu", "kind": "peak_rss", "bytes": peak, "rank": 0}]
    result.setdefault("threads", threads)
    return result
