"""Process-group plumbing. The ONLY module that reads the launcher's environment.

Who started us decides where rank, world size and the rendezvous address come from:

* torchrun / ``dptrain --nproc`` (torch elastic): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``;
* the legacy ``python -m torch.distributed.launch``: the same variables plus a
  ``--local-rank``/``--local_rank`` argument;
* ``srun`` (SLURM): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODELIST``
  (first host = master), port from ``MASTER_PORT`` or derived from ``SLURM_JOB_ID``.

All of it is checked here, before torch reads any of it (:func:`detect`): a missing, malformed
or inconsistent value is a :class:`~dptrain.errors.UsageError` naming the variable, instead of
a hang or a traceback after the rendezvous timeout. :func:`restart_count` reads
``TORCHELASTIC_RESTART_COUNT`` for the rest of dptrain, and :func:`loopback_ok` tells whether
local processes can reach each other over TCP at all.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace

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


def _nodelist_error(nodelist: str, var: str, why: str) -> UsageError:
    return UsageError(f"{var}={nodelist!r} is not a SLURM host list ({why}); expected e.g. "
                      "'node[01-04,07],login2': fix or unset it (srun sets it itself)")


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def expand_nodelist(nodelist: str, var: str = "SLURM_NODELIST") -> list[str]:
    """SLURM hostlist syntax -> host names: ``node[01-03,7],gpu5`` -> node01 node02 node03 ....

    Several bracket groups in one name expand as SLURM does (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1
    r2n2). Anything else (unbalanced brackets, empty names, ranges that are not ``N`` or
    ``LO-HI`` with LO <= HI) is a :class:`UsageError` naming ``var``."""
    if not nodelist.strip():
        raise _nodelist_error(nodelist, var, "it is empty")
    if nodelist.count("[") != nodelist.count("]"):
        raise _nodelist_error(nodelist, var, "unbalanced brackets")
    hosts: list[str] = []
    for item in _split_top(nodelist):
        if not item or item.strip() != item:
            raise _nodelist_error(nodelist, var, "an empty host name")
        pieces = re.split(r"(\[[^\[\]]*\])", item)  # text, [ranges], text, ...
        if any(("[" in p or "]" in p) and not re.fullmatch(r"\[[^\[\]]*\]", p) for p in pieces):
            raise _nodelist_error(nodelist, var, "misplaced brackets")
        names = [""]
        for piece in pieces:
            if not piece.startswith("["):
                names = [n + piece for n in names]
                continue
            values: list[str] = []
            for part in piece[1:-1].split(","):
                m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
                if m is None:
                    raise _nodelist_error(nodelist, var, f"range {part!r} is not N or LO-HI")
                lo, hi = m.group(1), m.group(2)
                if hi is None:
                    values.append(lo)
                    continue
                if int(hi) < int(lo):
                    raise _nodelist_error(nodelist, var, f"range {part!r} runs backwards")
                if int(hi) - int(lo) >= 1_000_000:
                    raise _nodelist_error(nodelist, var, f"range {part!r} is too large")
                values.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
            names = [n + v for n in names for v in values]
        hosts.extend(names)
    return hosts


def tasks_per_node(spec: str, var: str = "SLURM_STEP_TASKS_PER_NODE") -> list[int]:
    """SLURM's compressed task counts -> one count per node: ``4(x2),3`` -> [4, 4, 3]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
            raise UsageError(f"{var}={spec!r} is not a SLURM task count list (expected e.g. "
                             "'4(x2),3'); fix or unset it (srun sets it itself)")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
        if len(counts) > 1_000_000:
            raise UsageError(f"{var}={spec!r} names more than a million nodes; fix or unset it")
    return counts


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How often torch elastic restarted the workers (``TORCHELASTIC_RESTART_COUNT``, 0 when
    unset); anything but a non-negative integer is a :class:`UsageError`."""
    env = os.environ if env is None else env
    value = env.get("TORCHELASTIC_RESTART_COUNT")
    if value is None:
        return 0
    try:
        count = int(value.strip())
    except ValueError:
        count = -1
    if count < 0:
        raise UsageError(f"environment variable TORCHELASTIC_RESTART_COUNT={value!r} is not a "
                         "non-negative integer (torch elastic sets it to the restart attempt); "
                         "unset it or fix the launcher")
    return count


def _port(env: Mapping[str, str], key: str = "MASTER_PORT") -> int:
    port = _int(env, key)
    if not 1 <= port <= 65535:
        raise UsageError(f"environment variable {key}={env[key]!r} is not a TCP port (1..65535); "
                         "set it to a free port, e.g. 29500, or fix the launcher")
    return port


def _interfaces() -> set[str] | None:
    try:
        return {name for _, name in socket.if_nameindex()}
    except OSError:  # no way to list them here: do not guess
        return None


def check_socket_ifnames(env: Mapping[str, str] | None = None) -> None:
    """``GLOO_SOCKET_IFNAME`` (comma-separated exact names) and ``NCCL_SOCKET_IFNAME`` (prefixes;
    ``=NAME`` exact, ``^...`` exclusions) must name an interface of this machine."""
    env = os.environ if env is None else env
    names = None
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        value = env.get(key)
        if value is None:
            continue
        if names is None:
            names = _interfaces()
            if names is None:
                return
        have = ", ".join(sorted(names)) or "none"
        wanted = [w.strip() for w in value.split(",")]
        if key == "NCCL_SOCKET_IFNAME" and value.startswith("^"):
            continue  # exclusions: NCCL picks from what is left
        if not value.strip() or not all(wanted):
            raise UsageError(f"environment variable {key}={value!r} names no interface; set it "
                             f"to one of this machine's interfaces ({have}) or unset it")
        if key == "GLOO_SOCKET_IFNAME":
            bad = [w for w in wanted if w not in names]
        elif value.startswith("="):
            bad = [w for w in value[1:].split(",") if w.strip() not in names]
        else:  # NCCL: prefixes; one match is enough
            bad = [] if any(n.startswith(w) for w in wanted for n in names) else wanted
        if bad:
            raise UsageError(f"environment variable {key}={value!r}: no network interface "
                             f"{bad[0]!r} on this machine (it has {have}); set {key} to one of "
                             "them or unset it")


RESOLVE_TIMEOUT_S = 5.0


def resolve_error(host: str, timeout_s: float = RESOLVE_TIMEOUT_S) -> str | None:
    """Why ``host`` does not resolve (one ``getaddrinfo``, at most ``timeout_s``), or ``None``.
    A resolver that takes longer than that is not counted as a failure."""
    import threading

    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            outcome.append(None)
        except (OSError, UnicodeError) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=lookup, daemon=True, name="dptrain-resolve")
    thread.start()
    thread.join(timeout_s)
    if not outcome or outcome[0] is None:
        return None
    exc = outcome[0]
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def check_master_addr(addr: str, where: str = "MASTER_ADDR") -> None:
    """An address the rendezvous can use: not empty, resolvable."""
    if not addr.strip():
        raise UsageError(f"{where} is empty; set it to the host name or address of rank 0's "
                         "node")
    why = resolve_error(addr)
    if why is not None:
        raise UsageError(f"{where} {addr!r} cannot be resolved ({why}); set it to the host name "
                         "or IP address of rank 0's node (e.g. 127.0.0.1 on one machine)")


def _is_loopback(addr: str) -> bool:
    import ipaddress

    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def loopback_ok(host: str = "127.0.0.1", timeout_s: float = 2.0) -> str | None:
    """Can this machine talk TCP to itself on ``host``? ``None`` if so, else the reason.

    Binds a listening socket on an ephemeral port, connects to it and accepts: with the
    loopback interface down, the connect fails at once (``Network is unreachable``)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, socket.SOCK_STREAM) as server:
            server.bind(sockaddr)
            server.listen(1)
            server.settimeout(timeout_s)
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.settimeout(timeout_s)
                client.connect(server.getsockname()[:2])
                conn, _ = server.accept()
                conn.close()
    except OSError as exc:
        what = exc.strerror or str(exc) or type(exc).__name__
        return f"cannot open a TCP connection to {host} on this machine ({what})"
    return None


def check_loopback(host: str = "127.0.0.1") -> None:
    """:func:`loopback_ok` as a :class:`UsageError` that says what to do."""
    why = loopback_ok(host)
    if why is not None:
        raise UsageError(f"{why}: the loopback network interface is probably down, and "
                         "processes on this machine rendezvous through it; bring it up "
                         "(`ip link set lo up`) or run one process (drop --nproc)")


def detect(env: Mapping[str, str] | None = None, legacy_local_rank: int | None = None, *,
           network: bool = True) -> DistEnv:
    """Read the launcher's environment; :class:`DistEnv` with ``source="none"`` if alone.

    Everything is validated before torch reads it: counts, ranks, ``MASTER_ADDR``/``MASTER_PORT``
    (required under torchrun), SLURM host lists and task counts, ``TORCHELASTIC_RESTART_COUNT``
    and the socket interface variables. ``network``: also check that the master address
    resolves (one ``getaddrinfo``) and that interface names exist on this machine."""
    env = os.environ if env is None else env
    restart_count(env)
    if network:
        check_socket_ifnames(env)
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
        found = _check(DistEnv(
            rank=_int(env, "RANK"), world_size=world, local_rank=local_rank,
            local_world_size=local_world,
            source="legacy" if legacy_local_rank is not None else "torchrun"))
        # torchrun and torch.distributed.launch always set both: a missing one means the
        # variables were set by hand (or are stale), and a guessed default would hang
        absent = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if absent:
            raise UsageError(f"RANK and WORLD_SIZE are set but {' and '.join(absent)} "
                             f"{'is' if len(absent) == 1 else 'are'} not: launch with torchrun "
                             "(it sets all of them), set MASTER_ADDR and MASTER_PORT to rank 0's "
                             "host and a free port, or unset RANK and WORLD_SIZE to run without "
                             "a launcher")
        found = replace(found, master_addr=env["MASTER_ADDR"], master_port=_port(env))
        if network:
            check_master_addr(found.master_addr)
        return found
    # srun sets SLURM_STEP_NUM_TASKS for the tasks of a job step; an sbatch script itself (the
    # "batch" step) has SLURM_NTASKS but is ONE process, so it must not count as distributed.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        if world > 1:
            var = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                                    "SLURM_NODELIST") if k in env), None)
            nodes = expand_nodelist(env[var], var) if var else []
            cvar = next((k for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
                         if k in env), None)
            counts = tasks_per_node(env[cvar], cvar) if cvar else [world]
            node_id = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
            local_world = counts[node_id] if 0 <= node_id < len(counts) else counts[0]
            local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
            if local_rank >= local_world:  # SLURM_NODEID counts the job's nodes, not the step's
                local_world = max(counts)
            job = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
            port = _port(env) if "MASTER_PORT" in env else 20000 + job % 20000
            if "MASTER_ADDR" in env:
                addr, where = env["MASTER_ADDR"], "MASTER_ADDR"
            elif nodes:
                addr, where = nodes[0], f"the first host of {var}"
            else:
                raise UsageError("srun started this task but neither SLURM_STEP_NODELIST nor "
                                 "MASTER_ADDR is set: set MASTER_ADDR to rank 0's host, or run "
                                 "under srun, which sets the node list")
            found = _check(DistEnv(
                rank=_int(env, "SLURM_PROCID"), world_size=world,
                local_rank=local_rank, local_world_size=local_world, master_addr=addr, master_port=port,
                source="slurm"))
            if network:
                check_master_addr(addr, where)
            return found
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
    if env.world_size > 1 and _is_loopback(env.master_addr):
        check_loopback(env.master_addr if env.master_addr != "localhost" else "127.0.0.1")
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
        attempt = restart_count()
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

