"""Which configurations a bench runs, and why some of them cannot run here.

A configuration that cannot run on this machine is kept, marked with the reason, and shows up
as *skipped* in ``results.json`` and the report -- it is never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("single", "dp", "ddp", "zero", "fsdp", "pipeline")


@dataclass
class Config:
    """One benchmark configuration and what became of it.

    ``nproc`` is the number of processes for ``single``/``ddp`` and the number of GPUs that the
    one ``dp`` process drives. ``role`` is ``main`` for the requested grid, ``baseline`` for the
    tutorial loop and ``baseline-dptrain`` for dptrain's matching linear run.
    """

    strategy: str
    nproc: int
    model: str
    batch_size: int
    steps: int
    role: str = "main"
    skip: str | None = None
    failure: str | None = None
    repeats: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.role == "baseline":
            return f"tutorial loop ({self.model}, b{self.batch_size})"
        label = f"{self.strategy} n={self.nproc}"
        if self.role == "baseline-dptrain":
            label += f" ({self.model}, b{self.batch_size})"
        return label

    @property
    def status(self) -> str:
        if self.skip:
            return "skipped"
        if self.failure:
            return "failed"
        return "ok" if self.repeats else "not run"

    @property
    def reason(self) -> str | None:
        return self.skip or self.failure

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "strategy": self.strategy, "nproc": self.nproc,
                "model": self.model, "batch_size": self.batch_size, "steps": self.steps,
                "role": self.role, "status": self.status, "reason": self.reason,
                "summary": self.summary, "repeats": self.repeats}


def skip_reason(strategy: str, n: int, *, on_gpu: bool, gpus: int) -> str | None:
    """Why ``strategy`` with ``n`` processes (GPUs for dp) cannot run here, or ``None``."""
    if strategy == "single" and n > 1:
        return ("single runs exactly one process on one device; use ddp for more than one "
                "process")
    if strategy == "dp" and not on_gpu:
        return ("nn.DataParallel needs CUDA GPUs and none is used here (CPU only); on CPU "
                "data parallelism is ddp over processes")
    if strategy == "dp" and n > gpus:
        return f"dp over {n} GPUs needs {n} GPUs; {gpus} visible"
    if strategy in ("zero", "fsdp") and n == 1:
        return f"{strategy} over one process shards nothing (it is single's memory and speed)"
    if strategy == "pipeline" and n == 1:
        return "pipeline needs at least 2 stages, one process each"
    if strategy in ("ddp", "zero", "fsdp", "pipeline") and on_gpu and n > gpus:
        return (f"{strategy} needs one GPU per process: {n} processes, {gpus} GPU(s) "
                "visible")
    return None


def plan_configs(strategies: list[str], nprocs: list[int], *, model: str, batch_size: int,
                 steps: int, baseline_steps: int, on_gpu: bool, gpus: int) -> list[Config]:
    """The grid ``strategies x nprocs`` (skips marked), then the baseline pair if asked for.

    The baseline pair is the tutorial loop and dptrain ``single`` with ``Linear(784, 10)`` at
    batch 64; when the grid's ``single n=1`` already is that model and batch, it is reused.
    """
    configs = [Config(s, n, model, batch_size, steps,
                      skip=skip_reason(s, n, on_gpu=on_gpu, gpus=gpus))
               for s in strategies for n in nprocs]
    if baseline_steps > 0:
        configs.append(Config("tutorial", 1, "linear", 64, baseline_steps, role="baseline"))
        reuse = model == "linear" and batch_size == 64 and "single" in strategies and 1 in nprocs
        if not reuse:
            configs.append(Config("single", 1, "linear", 64, baseline_steps,
                                  role="baseline-dptrain"))
    return configs


def rotated(items: list[Any], shift: int) -> list[Any]:
    """``items`` rotated left by ``shift``: each repeat starts with a different configuration,
    so slow drifts of a shared machine do not always hit the same one."""
    if not items:
        return []
    k = shift % len(items)
    return items[k:] + items[:k]
