"""Process-group plumbing. The ONLY module that reads the launcher's environment.

Who started us decides where rank, world size and the rendezvous address come from:

* torchrun / ``dptrain --nproc`` (torch elastic): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``;
* the legacy ``python -m torch.distributed.launch``: the same variables plus a
  ``--local-rank``/``--local_rank`` argument;
* ``srun`` (SLURM): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODELIST``
  (first host = master), port from ``MASTER_PORT`` or derived from ``SLURM_JOB_ID``.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from dptrain.errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    source: str = "none"  # none | torchrun | legacy | slurm

    @property
    def distributed(self) -> bool:
        return self.source != "none"


def _int(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {key}={value!r} is not an integer; "
                         "unset it or fix the launcher") from None


def _check(env: DistEnv) -> DistEnv:
    where = f"(from the {env.source} environment)"
    fix = ("fix the launcher's variables, or unset RANK, WORLD_SIZE and LOCAL_RANK to run "
           "without a launcher")
    if env.world_size < 1:
        raise UsageError(f"world size {env.world_size} {where} must be at least 1; {fix}")
    if not 0 <= env.rank < env.world_size:
        raise UsageError(f"rank {env.rank} {where} is outside world size {env.world_size}: "
                         f"RANK must be in [0, WORLD_SIZE); {fix}")
    if env.local_world_size < 1:
        raise UsageError(f"local world size {env.local_world_size} {where} must be at least 1; "
                         f"{fix}")
    if not 0 <= env.local_rank < env.local_world_size:
        raise UsageError(f"local rank {env.local_rank} {where} is outside local world size "
                         f"{env.local_world_size}: LOCAL_RANK must be in [0, LOCAL_WORLD_SIZE); "
                         f"{fix}")
    if env.local_world_size > env.world_size:
        raise UsageError(f"local world size {env.local_world_size} {where} exceeds world size "
                         f"{env.world_size}; {fix}")
    return env


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM hostlist syntax -> host names: ``node[01-03,7],gpu5`` -> node01 node02 node03 ...."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(prefix + str(i).zfill(len(lo)))
    return hosts


def detect(env: Mapping[str, str] | None = None, legacy_local_rank: int | None = None) -> DistEnv:
    """Read the launcher's environment; :class:`DistEnv` with ``source="none"`` if alone."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env or legacy_local_rank is not None:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
        if missing:
            given = ("--local-rank is given" if legacy_local_rank is not None else
                     f"{'RANK' if 'RANK' in env else 'WORLD_SIZE'} is set")
            raise UsageError(f"{given}, {' and '.join(missing)} not set: launch with "
                             "torchrun, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT "
                             "together (or none of them)")
        world = _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else (legacy_local_rank or 0)
        if legacy_local_rank is not None and "LOCAL_RANK" in env and legacy_local_rank != local_rank:
            raise UsageError(f"--local-rank {legacy_local_rank} disagrees with LOCAL_RANK="
                             f"{local_rank}; pass one of them")
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        return _check(DistEnv(
            rank=_int(env, "RANK"), world_size=world, local_rank=local_rank,
            local_world_size=local_world, master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            source="legacy" if legacy_local_rank is not None else "torchrun"))
    # srun sets SLURM_STEP_NUM_TASKS for the tasks of a job step; an sbatch script itself (the
    # "batch" step) has SLURM_NTASKS but is ONE process, so it must not count as distributed.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        if world > 1:
            nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_NODELIST", "")))
            ntasks_local = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE",
                                                                         str(world)))
            local_world = int(re.match(r"\d+", ntasks_local).group(0)) if ntasks_local else world
            job = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
            port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + job % 20000
            return _check(DistEnv(
                rank=_int(env, "SLURM_PROCID"), world_size=world,
                local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                local_world_size=local_world,
                master_addr=env.get("MASTER_ADDR", nodes[0] if nodes else "127.0.0.1"),
                master_port=port, source="slurm"))
    return DistEnv()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and (device.type != "cuda" or not tdist.is_nccl_available()):
        raise UsageError("--backend nccl needs CUDA GPUs and an NCCL build of PyTorch; "
                         "use --backend gloo (or auto) on CPU")
    return backend


def init_process_group(env: DistEnv, backend: str, device: torch.device,
                       timeout_s: float) -> None:
    """Join the job's process group (rendezvous through MASTER_ADDR:MASTER_PORT)."""
    if tdist.is_initialized():
        return
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # lets NCCL bind eagerly and report errors early
    timeout = datetime.timedelta(seconds=timeout_s)
    common = {"backend": backend, "rank": env.rank, "world_size": env.world_size,
              "timeout": timeout, **kwargs}
    if env.source in ("torchrun", "legacy") and \
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        # Join the elastic agent's store, under a prefix per restart attempt. Plain env://
        # reuses the static rendezvous' store across restarts *without* a prefix, so restarted
        # workers read the dead attempt's addresses and hang in gloo's connectFullMesh.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        client = tdist.TCPStore(env.master_addr, env.master_port, env.world_size,
                                is_master=False, timeout=timeout)
        tdist.init_process_group(store=tdist.PrefixStore(f"/dptrain/attempt_{attempt}", client),
                                 **common)
    elif env.source in ("torchrun", "legacy"):
        tdist.init_process_group(init_method="env://", **common)
    elif env.source == "local" and env.world_size == 1:
        # one process (--strategy ddp without --nproc): an in-memory store, no listening port
        tdist.init_process_group(store=tdist.HashStore(), **common)
    else:  # srun, or one local process: rank 0 hosts the store; os.environ stays untouched
        tdist.init_process_group(init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                 **common)


def destroy_process_group() -> None:
    """Leave the process group -- unless this rank of a multi-process job is crashing (called
    from a ``finally`` while an exception other than a UsageError propagates, e.g. a failed or
    timed-out collective): destroying a gloo group with such a collective pending can deadlock
    in its destructor (its worker thread waits for the GIL that the joining thread holds),
    leaving the rank hanging forever instead of exiting; the crashing worker exits anyway.
    A UsageError is raised between collectives (no work pending) and a one-process group has
    no peer: both are destroyed as usual, so the process exits quietly."""
    if not tdist.is_initialized():
        return
    failing = sys.exc_info()[1]
    if failing is None or isinstance(failing, UsageError) or tdist.get_world_size() == 1:
        tdist.destroy_process_group()
