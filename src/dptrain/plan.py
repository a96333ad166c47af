"""One resolved plan per run: configuration + launcher environment + visible hardware.

:func:`make_plan` checks every setting against the machine *once* (Lightning's connector) and
names every size by its scope, so that train, verify and bench never re-derive them:

* which strategy, in how many processes (local x nodes), on which device and backend;
* how training is started: in this process, as a worker of an external launcher (torchrun,
  srun), or by launching local workers;
* threads per process, the run directory, the data root and whether to fetch first;
* the batch: per process per micro-batch, accumulation, samples per optimizer step (global).

Workers receive the :class:`Plan` itself (pickled by the launcher), not a re-parsed dict.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dptrain.config import TrainConfig
from dptrain.dist import DistEnv
from dptrain.errors import UsageError

ONE_PROCESS = ("single", "dp")  # strategies that run in exactly one process
GROUPED = ("ddp", "zero", "fsdp", "pipeline", "hogwild", "localsgd")  # a process per device,
# in a process group
MAX_PROCS_PER_CORE = 8  # --nproc beyond this many per CPU core is refused (it would thrash)


@dataclass(frozen=True)
class Hardware:
    """What this machine offers (injectable, so that the rules are unit-testable)."""

    cuda: bool = False
    gpus: int = 0
    cores: int = 1

    @classmethod
    def detect(cls) -> Hardware:
        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, gpus=torch.cuda.device_count() if cuda else 0,
                   cores=usable_cores())


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def auto_nproc(device: str, hw: Hardware | None = None) -> int:
    """``--nproc auto``: one process per GPU where CUDA is used (``device`` not ``cpu``),
    else one per usable CPU core."""
    hw = hw or Hardware.detect()
    return hw.gpus if hw.cuda and device != "cpu" else hw.cores


@dataclass(frozen=True)
class Plan:
    """A validated run: everything a worker needs besides its rank."""

    cfg: TrainConfig
    strategy: str  # single | dp | ddp
    device: str  # cpu | cuda
    backend: str  # gloo | nccl | none
    launch: str  # inprocess | workers | external
    nproc: int  # processes on this node
    nnodes: int
    world_size: int  # processes that feed data (1 for single and dp)
    threads: int  # intra-op threads per process (local rank 0's where --threads is a list)
    fetch: bool = False  # a built-in dataset to fetch once before the workers start
    hardware: Hardware = field(default_factory=Hardware)
    rank_threads: tuple[int, ...] = ()  # --threads 2,1: one count per local rank

    def threads_for(self, local_rank: int) -> int:
        """Intra-op threads of the process with this local rank."""
        if self.rank_threads:
            return self.rank_threads[local_rank % len(self.rank_threads)]
        return self.threads

    @property
    def batch_per_process(self) -> int:
        """Samples per process per micro-batch (``--batch-size``)."""
        return self.cfg.batch_size

    @property
    def samples_per_step(self) -> int:
        """Samples per optimizer step over all processes and micro-batches."""
        return self.cfg.batch_size * self.world_size * self.cfg.accum

    def worker_env(self, env: DistEnv) -> DistEnv:
        """This process's place in the job: a one-process DDP/ZeRO/FSDP run gets a private
        one (an in-memory store, no port)."""
        if env.distributed or self.strategy not in GROUPED:
            return env
        return DistEnv(source="local")

    def with_out(self, out: str) -> Plan:
        import dataclasses

        return dataclasses.replace(self, cfg=self.cfg.replace(out=out))


def make_plan(cfg: TrainConfig, env: DistEnv, hw: Hardware | None = None) -> Plan:
    """Resolve and check ``cfg`` against the launcher ``env`` and the hardware ``hw``."""
    hw = hw or Hardware.detect()
    if cfg.device == "cuda" and not hw.cuda:
        raise UsageError("--device cuda requested but no CUDA GPU is visible; use --device cpu "
                         "(or auto)")
    on_gpu = hw.cuda and cfg.device != "cpu"
    device = "cuda" if on_gpu else "cpu"
    launch, nproc, nnodes = _launch(cfg, env, hw, on_gpu)
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "ddp" if env.distributed or nproc * nnodes > 1 else "single"
    if strategy == "dp" and not on_gpu:
        raise UsageError("--strategy dp needs CUDA GPUs (nn.DataParallel is GPU-only); on CPU "
                         "use --strategy ddp --nproc N")
    if strategy in ONE_PROCESS and nproc * nnodes > 1:
        how = (f"launched as {nproc * nnodes} processes" if launch == "external" else
               "--nproc/--nnodes ask for several")
        raise UsageError(f"--strategy {strategy} runs in ONE process ({how}): drop --nproc/"
                         "--nnodes and the launcher, or use --strategy ddp")
    backend = _backend(cfg, strategy, on_gpu)
    if cfg.precision == "16" and not on_gpu:
        raise UsageError("--precision 16 (fp16 with GradScaler) needs CUDA; on CPU use "
                         "--precision bf16 or 32")
    if cfg.sync_bn and strategy in ONE_PROCESS:
        raise UsageError(f"--sync-bn synchronises BatchNorm across DDP processes; --strategy "
                         f"{strategy} has one process: drop --sync-bn")
    if cfg.sync_bn and strategy == "fsdp":
        raise UsageError("--sync-bn cannot apply to --strategy fsdp (BatchNorm statistics "
                         "stay per rank); drop --sync-bn, or use --strategy ddp or zero")
    _check_strategy_flags(cfg, strategy, nproc, nnodes, on_gpu)
    _check_unused_flags(cfg, strategy)
    if cfg.comm_hook == "bf16" and not on_gpu:
        raise UsageError("--comm-hook bf16 needs CUDA with NCCL (torch's bf16 hook); on CPU "
                         "use --comm-hook fp16 or none")
    counts = cfg.thread_counts()
    if len(counts) > 1 and len(counts) != nproc:
        raise UsageError(f"--threads {cfg.threads} gives {len(counts)} values for {nproc} local "
                         f"process(es); give one value, or one per process")
    _check_out(cfg.out)
    from dptrain import loggers

    loggers.check_available(loggers.parse(cfg.logger, cfg.tensorboard))  # before --out exists
    world = 1 if strategy in ONE_PROCESS else nproc * nnodes
    threads = counts[0] if counts else max(1, hw.cores // max(1, nproc))
    from dptrain.data.datasets import RAW_DIRS

    return Plan(cfg=cfg, strategy=strategy, device=device, backend=backend, launch=launch,
                nproc=nproc, nnodes=nnodes, world_size=world, threads=threads,
                fetch=cfg.dataset in RAW_DIRS, hardware=hw,
                rank_threads=tuple(counts) if len(counts) > 1 else ())


# settings each strategy family reads; another strategy would ignore them silently
FLAG_OWNERS = {
    "comm_hook": ("none", ("ddp", "zero")), "cpu_allreduce": ("auto", ("ddp", "zero")),
    "find_unused_parameters": (False, ("ddp", "zero")),
    "static_graph": (False, ("ddp", "zero", "localsgd")),
    "gradient_as_bucket_view": (False, ("ddp", "zero", "localsgd")),
    "bucket_cap_mb": (25.0, ("ddp", "zero", "localsgd")),
    "reshard_after_forward": (True, ("fsdp",)),
    "sync_every": (8, ("localsgd",)), "localsgd_warmup_steps": (0, ("localsgd",)),
}


def _check_unused_flags(cfg: TrainConfig, strategy: str) -> None:
    """A setting the chosen strategy does not read (DDP's hooks under fsdp, local SGD's
    period under ddp, ...) is an error, not a flag that silently changes nothing."""
    for name, (default, owners) in FLAG_OWNERS.items():
        if getattr(cfg, name) != default and strategy not in owners:
            flag = f"--{name.replace('_', '-')}"
            if isinstance(default, bool):
                flag = flag if not default else f"--no-{name.replace('_', '-')}"
            raise UsageError(f"{flag} is a setting of --strategy {' / '.join(owners)}; "
                             f"--strategy {strategy} does not use it: drop it")


def _check_strategy_flags(cfg: TrainConfig, strategy: str, nproc: int, nnodes: int,
                          on_gpu: bool) -> None:
    """The flags of the pipeline, hogwild, localsgd and balanced strategies fit the job."""
    world = nproc * nnodes
    if strategy != "pipeline" and (cfg.stages or cfg.microbatches or cfg.split_points):
        raise UsageError(f"--stages/--microbatches/--split-points are for --strategy pipeline, "
                         f"not {strategy}: drop them, or use --strategy pipeline")
    if strategy == "pipeline":
        stages = cfg.stages or world
        if stages < 2:
            raise UsageError(f"--strategy pipeline needs at least 2 stages (processes); got "
                             f"{stages}: use --nproc 2 or more")
        if world % stages:
            raise UsageError(f"--stages {stages} does not divide the {world} processes; use a "
                             f"--nproc that is a multiple of the stages (stages x data-parallel "
                             f"replicas)")
        micro = cfg.microbatches or 2 * stages
        if cfg.batch_size % micro:
            raise UsageError(f"--microbatches {micro} does not divide --batch-size "
                             f"{cfg.batch_size}; use a batch size that is a multiple of it, or "
                             "another --microbatches")
        if cfg.sync_bn:
            raise UsageError("--sync-bn cannot apply to --strategy pipeline (each stage holds "
                             "other layers); drop --sync-bn")
        if cfg.pipeline_schedule == "1f1b" and micro < stages:
            raise UsageError(f"--pipeline-schedule 1f1b needs at least as many micro-batches as "
                             f"stages: --microbatches {micro} < --stages {stages}; raise "
                             "--microbatches, or use gpipe")
        if cfg.precision == "16" and on_gpu:
            raise UsageError("--precision 16 cannot apply to --strategy pipeline (GradScaler "
                             "would skip steps stage by stage); use --precision bf16 or 32")
        if cfg.compile:
            raise UsageError("--compile cannot apply to --strategy pipeline (the schedule "
                             "calls each stage itself); drop --compile")
    if strategy == "hogwild":
        if nnodes > 1:
            raise UsageError(f"--strategy hogwild shares parameters in one machine's memory; it "
                             f"cannot span {nnodes} nodes: use --nnodes 1, or --strategy "
                             "localsgd across nodes")
        if on_gpu:
            raise UsageError("--strategy hogwild runs on CPU here (its processes update "
                             "parameters in shared host memory): add --device cpu")
        if cfg.sync_bn:
            raise UsageError("--sync-bn cannot apply to --strategy hogwild (no synchronous "
                             "step); drop --sync-bn")
    if strategy == "localsgd":
        if cfg.sync_bn:
            raise UsageError("--sync-bn would synchronise every step, which local SGD avoids; "
                             "drop --sync-bn, or use --strategy ddp")
        from dptrain.strategies.localsgd import refuse

        refuse(cfg)  # DDP's one comm hook is local SGD's; fp16's per-rank skipped steps
    if cfg.balance == "auto" and strategy != "ddp":
        raise UsageError(f"--balance auto balances --strategy ddp; it does not apply to "
                         f"--strategy {strategy}: drop it, or use --strategy ddp")
    if cfg.balance == "auto" and world < 2:
        raise UsageError("--balance auto needs at least 2 processes to balance; use --nproc 2 "
                         "or more, or drop it")


def _launch(cfg: TrainConfig, env: DistEnv, hw: Hardware, on_gpu: bool
            ) -> tuple[str, int, int]:
    """(how the workers start, processes on this node, nodes)."""
    if env.distributed:  # torchrun / srun / the legacy launcher started this process
        nodes = max(1, env.world_size // max(1, env.local_world_size))
        return "external", env.local_world_size, nodes
    if cfg.nproc == "auto":
        nproc = auto_nproc(cfg.device, hw)
    else:
        nproc = int(cfg.nproc)
        limit = hw.gpus if on_gpu else hw.cores * MAX_PROCS_PER_CORE
        if nproc > limit and cfg.strategy not in ONE_PROCESS:
            what = (f"{hw.gpus} GPU(s)" if on_gpu else
                    f"{hw.cores} CPU core(s) (at most {MAX_PROCS_PER_CORE} processes per core)")
            raise UsageError(f"--nproc {nproc} is more than this node can run: {what}; use "
                             f"--nproc {max(1, min(limit, hw.gpus if on_gpu else hw.cores))} "
                             "or auto")
    launch = "inprocess" if nproc == 1 and cfg.nnodes == 1 else "workers"
    return launch, nproc, cfg.nnodes


def _backend(cfg: TrainConfig, strategy: str, on_gpu: bool) -> str:
    if cfg.backend == "nccl":
        import torch.distributed as tdist

        if not on_gpu or not tdist.is_nccl_available():
            raise UsageError("--backend nccl needs CUDA GPUs and an NCCL build of PyTorch; "
                             "use --backend gloo (or auto) on CPU")
    if strategy in ONE_PROCESS:
        return "none"
    if cfg.backend == "nccl":
        return "nccl"
    if cfg.backend == "gloo":
        return "gloo"
    return "nccl" if on_gpu else "gloo"


def _check_out(out: str) -> None:
    """A run directory whose name the file system cannot hold is refused before any work."""
    if not out:
        return
    for part in Path(out).parts:
        if len(part.encode()) > 255:
            raise UsageError(f"--out has a path component of {len(part.encode())} bytes; file "
                             "names are limited to 255: choose a shorter --out")
    if len(os.fsencode(out)) > 4000:
        raise UsageError("--out is longer than the file system allows (4096 bytes); choose a "
                         "shorter path")


def prepare_data(plan: Plan, log=print) -> None:  # noqa: ANN001 - a print-like callable
    """Fetch a built-in dataset once on this node, before any worker starts."""
    if plan.fetch:
        from dptrain.data.fetch import ensure_dataset

        ensure_dataset(plan.cfg.dataset, Path(plan.cfg.data_root), log=log)
