"""``dptrain doctor``: can this machine train, alone and with others?

Each check is a small function returning a :class:`Check`; :data:`CHECKS` lists them in the
order they print. A check reads the machine and never changes it (a loopback connection is
opened and closed at once, the matmul peak is measured for about a second and not cached,
nothing is written). Status ``fail`` means training cannot run here as things stand (torch
does not import, no Gloo backend, TCP on loopback does not work, the launcher environment is
inconsistent) and makes ``dptrain doctor`` exit 1; ``warn`` is something to fix before a
multi-process or multi-node run. The ``isa`` and ``matmul_peak`` checks say what the CPU can
do (AVX2, AVX-512, AVX512-BF16, AMX; fp32 and bf16 FLOP/s), which decides the precision to
train in.

torch is imported inside the checks, never at module level, so that a broken torch is reported
as a failed check instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dptrain import __version__

Status = Literal["ok", "warn", "fail"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail")
DEFAULT_PORT = 29500  # torchrun's default rendezvous port
EXTRAS = {  # module -> the dptrain extra that installs it
    "matplotlib": "plot",
    "tqdm": "progress",
    "tensorboard": "tensorboard",
    "torchvision": "vision",
}
MNIST_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
RESOLVE_TIMEOUT_S = 3.0
PEAK_SECONDS = 0.4  # per dtype: the matmul peak check takes about a second


@dataclass(frozen=True)
class Check:
    """The outcome of one check.

    Attributes:
        name: Short identifier (also the key in ``--json`` output).
        status: ``ok``, ``warn`` or ``fail``.
        detail: What was found, one line.
        advice: What to do about it, one line (may be empty when all is well).
        facts: Machine-readable values behind ``detail`` (for ``--json``).
    """

    name: str
    status: Status
    detail: str
    advice: str = ""
    facts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def _torch() -> Any:
    """The torch module, or None when it does not import (reported by :func:`check_versions`)."""
    try:
        import torch
    except Exception:  # a broken install raises more than ImportError (OSError, RuntimeError)
        return None
    return torch


def _no_torch(name: str) -> Check:
    return Check(
        name,
        "fail",
        "not checked: torch does not import",
        "fix the torch install first (see the versions check)",
    )


# ---------------------------------------------------------------------------- software
def check_versions() -> Check:
    """dptrain, Python, torch and numpy versions; fails when torch or numpy do not import."""
    facts: dict[str, Any] = {
        "dptrain": __version__,
        "python": platform.python_version(),
        "executable": sys.executable,
    }
    broken = []
    for module in ("torch", "numpy"):
        try:
            facts[module] = importlib.import_module(module).__version__
        except Exception as exc:  # any import failure is the finding
            facts[module] = None
            broken.append(f"{module} ({type(exc).__name__}: {exc})")
    detail = (
        f"dptrain {__version__}, torch {facts['torch'] or '-'}, numpy "
        f"{facts['numpy'] or '-'}, Python {facts['python']}"
    )
    if broken:
        return Check(
            "versions",
            "fail",
            f"{detail}; cannot import {'; '.join(broken)}",
            "reinstall: pip install -e . (torch==2.13.0 is the tested CPU wheel)",
            facts,
        )
    return Check("versions", "ok", detail, facts=facts)


def _installed(module: str) -> str | None:
    """Version of an installed module without importing it (tensorboard/torchvision are slow)."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def check_extras() -> Check:
    """Which optional extras are installed; missing ones are fine, so this never warns."""
    found = {m: _installed(m) for m in EXTRAS}
    present = [f"{m} {v}" for m, v in found.items() if v]
    missing = [m for m, v in found.items() if not v]
    detail = ", ".join(present) or "none installed"
    if missing:
        extras = ",".join(EXTRAS[m] for m in missing)
        detail += f"; not installed: {', '.join(missing)} (pip install 'dptrain[{extras}]')"
    return Check("extras", "ok", detail, facts=found)


# ---------------------------------------------------------------------------- devices
def check_cuda() -> Check:
    """CUDA availability and each GPU's name, memory and compute capability."""
    torch = _torch()
    if torch is None:
        return _no_torch("cuda")
    import warnings

    with warnings.catch_warnings():  # a driver mismatch warns here; we report it ourselves
        warnings.simplefilter("ignore")
        available = torch.cuda.is_available()
    facts: dict[str, Any] = {"available": available, "cuda_version": torch.version.cuda, "gpus": []}
    if not available:
        if shutil.which("nvidia-smi"):
            build = (
                f"torch built for CUDA {torch.version.cuda}"
                if torch.version.cuda
                else "torch is a CPU-only build"
            )
            return Check(
                "cuda",
                "warn",
                f"nvidia-smi exists but torch sees no GPU ({build})",
                "install a CUDA build of torch that matches the driver (nvidia-smi "
                "shows its CUDA version), or check CUDA_VISIBLE_DEVICES",
                facts,
            )
        return Check("cuda", "ok", "no CUDA GPU: training runs on the CPU", facts=facts)
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(
            {
                "index": i,
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
            }
        )
    facts["gpus"] = gpus
    listed = "; ".join(
        f"{g['index']}: {g['name']} ({g['memory_gib']} GiB, sm_{g['capability'].replace('.', '')})"
        for g in gpus
    )
    return Check(
        "cuda", "ok", f"CUDA {torch.version.cuda}, {len(gpus)} GPU(s): {listed}", facts=facts
    )


def check_backends() -> Check:
    """Process-group backends: Gloo is required (CPU DDP), NCCL wanted when there are GPUs."""
    torch = _torch()
    if torch is None:
        return _no_torch("backends")
    import torch.distributed as tdist

    if not tdist.is_available():
        return Check(
            "backends",
            "fail",
            "torch.distributed is not available in this build",
            "install the official torch wheel (pip install torch==2.13.0)",
            {"distributed": False, "gloo": False, "nccl": False},
        )
    gloo, nccl = tdist.is_gloo_available(), tdist.is_nccl_available()
    facts = {"distributed": True, "gloo": gloo, "nccl": nccl}
    detail = f"gloo {'yes' if gloo else 'NO'}, nccl {'yes' if nccl else 'no'}"
    if not gloo:
        return Check(
            "backends",
            "fail",
            detail,
            "this torch build lacks Gloo, which CPU DDP "
            "needs: install the official wheel (pip install torch==2.13.0)",
            facts,
        )
    if torch.cuda.is_available() and not nccl:
        return Check(
            "backends",
            "warn",
            detail,
            "GPU runs fall back to gloo (slow): use a torch build with NCCL",
            facts,
        )
    if not nccl:
        detail += " (not needed on CPU)"
    return Check("backends", "ok", detail, facts=facts)


def check_cpu() -> Check:
    """CPU cores (all, and usable by this process) and torch's intra-op threads."""
    total = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    facts: dict[str, Any] = {
        "cpu_count": total,
        "usable_cores": usable,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    torch = _torch()
    threads = torch.get_num_threads() if torch is not None else None
    facts["torch_threads"] = threads
    detail = f"{total} CPU cores, {usable} usable by this process"
    if threads is not None:
        detail += f", torch uses {threads} thread(s)"
    if facts["OMP_NUM_THREADS"]:
        detail += f" (OMP_NUM_THREADS={facts['OMP_NUM_THREADS']})"
    if threads is not None and threads > usable:
        return Check(
            "cpu",
            "warn",
            detail,
            f"torch oversubscribes the {usable} usable cores: "
            f"unset OMP_NUM_THREADS or pass --threads",
            facts,
        )
    return Check("cpu", "ok", detail, facts=facts)


def check_isa() -> Check:
    """The ISA features that decide CPU training speed: AVX2, AVX-512, AVX512-BF16, AMX."""
    if _torch() is None:
        return _no_torch("isa")
    from dptrain import hardware

    info = hardware.cpu_info(refresh=True)
    have = set(info.flags)
    facts: dict[str, Any] = {**info.to_dict(), "machine": platform.machine()}

    def yes(flag: str, name: str) -> str:
        return name if flag in have else f"no {name}"

    amx = "AMX-BF16" if "amx_bf16" in have else "no AMX"
    features = ", ".join([yes("avx2", "AVX2"), yes("avx512f", "AVX-512"),
                          yes("avx512_bf16", "AVX512-BF16"), amx])
    why = hardware.why_not_native_bf16(have)
    bf16 = ("bf16 runs natively (oneDNN)" if info.native_bf16
            else f"bf16 is NOT native ({why or 'not supported'}): it is emulated, far slower "
                 "than fp32")
    detail = (f"{info.model}: {features}; ATen kernels {info.capability}; {bf16}")
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    if x86 and "avx2" not in have:
        return Check("isa", "warn", detail,
                     "no AVX2: CPU training runs several times slower than on a current x86 "
                     "CPU; use a newer machine for real work", facts)
    advice = "" if info.native_bf16 else "train in fp32 here (--precision 32; --recipe " \
        "mnist-fast chooses it by itself)"
    return Check("isa", "ok", detail, advice, facts)


def check_cpu_heap(env: Mapping[str, str] | None = None) -> Check:
    """The C heap training runs on (``--cpu-heap``): glibc's, kept between steps by default."""
    from dptrain import heap

    env = os.environ if env is None else env
    version = heap.glibc_version()
    malloc_vars = sorted(k for k in env if k.startswith(("MALLOC_", "GLIBC_TUNABLES")))
    facts: dict[str, Any] = {"glibc": version or None, "environment": malloc_vars}
    if not version:
        return Check("cpu_heap", "ok", "not glibc: --cpu-heap has nothing to set here "
                     "(the C library's own malloc)", "", facts)
    detail = (f"glibc {version}: training keeps the heap between steps (--cpu-heap tuned: "
              "no page faults per step; --cpu-heap system = glibc's defaults)")
    if malloc_vars:
        return Check("cpu_heap", "warn", detail + f"; set here: {', '.join(malloc_vars)}",
                     "--cpu-heap tuned sets the trim threshold, top pad and mmap threshold over "
                     "what these say; pass --cpu-heap system to keep them", facts)
    return Check("cpu_heap", "ok", detail, "", facts)


def _gflops(r: dict[str, Any]) -> str:
    return f"{r['flops'] / 1e9:,.1f} GFLOP/s (n={r['size']})"


def check_matmul_peak(seconds: float = PEAK_SECONDS) -> Check:
    """Measured fp32 and bf16 matmul peak of this CPU at torch's thread count (GPU 0 too)."""
    if _torch() is None:
        return _no_torch("matmul_peak")
    from dptrain import hardware

    torch = _torch()
    cpu = {name: hardware.measure_matmul(name, seconds=seconds) for name in ("fp32", "bf16")}
    facts: dict[str, Any] = {"cpu": cpu, "threads": torch.get_num_threads(),
                             "native_bf16": hardware.native_bf16()}
    ratio = cpu["bf16"]["flops"] / cpu["fp32"]["flops"]
    detail = (f"CPU ({torch.get_num_threads()} thread(s)): fp32 {_gflops(cpu['fp32'])}, "
              f"bf16 {_gflops(cpu['bf16'])} = {ratio:.2g}x fp32")
    if torch.cuda.is_available():
        gpu = {name: hardware.measure_matmul(name, seconds=seconds / 2, device="cuda")
               for name in ("fp32", "bf16")}
        facts["cuda0"] = gpu
        detail += (f"; GPU 0: fp32 {gpu['fp32']['flops'] / 1e12:,.1f} TFLOP/s, bf16 "
                   f"{gpu['bf16']['flops'] / 1e12:,.1f} TFLOP/s")
    if hardware.native_bf16() and ratio < 1.0:
        return Check("matmul_peak", "warn", detail,
                     "this CPU has native bf16 but bf16 matmuls are no faster than fp32: check "
                     "that ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA do not disable AMX/AVX512-BF16, "
                     "and that other processes left the cores alone", facts)
    advice = "" if ratio >= 1.0 else "bf16 is slower than fp32 here: keep --precision 32"
    return Check("matmul_peak", "ok", detail, advice, facts)


# ---------------------------------------------------------------------------- network
def _loopback_tcp(host: str, timeout_s: float = 2.0) -> str | None:
    """Bind, listen, connect, accept and pass one byte each way on ``host``; the reason it
    fails, or None.

    The same check as ``dptrain.dist.loopback_ok`` (used when it exists), kept here so that
    doctor still checks the network when torch, which ``dist`` imports, is broken.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind((host, 0))
            server.listen(1)
            server.settimeout(timeout_s)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
                client.settimeout(timeout_s)
                client.connect(server.getsockname()[:2])
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(timeout_s)
                    client.sendall(b"?")
                    if conn.recv(1) != b"?":
                        return f"a TCP connection on {host} lost the byte sent through it"
                    conn.sendall(b"!")
                    if client.recv(1) != b"!":
                        return f"a TCP connection on {host} lost the byte sent through it"
    except OSError as exc:
        what = exc.strerror or str(exc) or type(exc).__name__
        return f"cannot open a TCP connection to {host} on this machine ({what})"
    return None


def loopback_reason(host: str = "127.0.0.1") -> str | None:
    """Why TCP on loopback fails (None when it works): ``dist.loopback_ok`` if available."""
    check: Callable[[str], str | None] = _loopback_tcp
    if _torch() is not None:
        try:
            from dptrain import dist

            check = getattr(dist, "loopback_ok", _loopback_tcp)
        except Exception:  # dist unimportable: the local copy of the check still works
            pass
    return check(host)


def check_shared_memory() -> Check:
    """Whether a POSIX semaphore (a segment in /dev/shm) can be made: every local
    multi-process run needs one."""
    from dptrain.launch import shm_problem

    why = shm_problem()
    if why is not None:
        return Check("shared_memory", "fail", why,
                     "local multi-process training needs a writable /dev/shm: mount one "
                     "(docker: --shm-size 1g or --ipc=host); one process still works",
                     {"ok": False, "reason": why})
    return Check("shared_memory", "ok", "POSIX shared memory works (a semaphore was made)",
                 facts={"ok": True})


def check_loopback_port(host: str = "127.0.0.1") -> Check:
    """Whether TCP works on loopback: a port binds, a client connects, bytes go through.

    Every local multi-process run rendezvouses and (gloo) communicates through it, so a down
    ``lo`` interface means training cannot run here.
    """
    why = loopback_reason(host)
    if why is not None:
        return Check(
            "loopback_port",
            "fail",
            why,
            "local training rendezvouses over loopback TCP: bring the interface up "
            "(`ip link set lo up`) or check that no sandbox forbids binding and connecting",
            {"host": host, "ok": False, "reason": why},
        )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    except OSError as exc:  # worked a moment ago; report it all the same
        return Check(
            "loopback_port",
            "fail",
            f"cannot bind a TCP port on {host}: {exc}",
            "local multi-process training needs loopback TCP: check that the 'lo' "
            "interface is up and no sandbox forbids binding",
            {"host": host, "ok": False, "reason": str(exc)},
        )
    return Check(
        "loopback_port",
        "ok",
        f"TCP works on {host}: a free port binds (got {port}), connects and carries data",
        facts={"host": host, "port": port, "ok": True},
    )


def check_default_port(port: int = DEFAULT_PORT) -> Check:
    """Whether torchrun's default rendezvous port is free on this host."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # as the rendezvous store does: a socket in TIME_WAIT is no obstacle on Linux
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", port))
    except OSError as exc:
        return Check(
            "default_port",
            "warn",
            f"port {port} is busy ({exc.strerror or exc})",
            "another job holds it: single-node dptrain picks a free port by itself; "
            "for torchrun or multi-node pass --master-port with another port",
            {"port": port, "free": False},
        )
    return Check(
        "default_port",
        "ok",
        f"port {port} (torchrun's default) is free",
        facts={"port": port, "free": True},
    )


def parse_ip_addr(text: str) -> list[tuple[str, str]]:
    """``ip -o -4 addr`` output -> ``[(interface, address), ...]`` (address without prefix).

    Example line: ``2: eth0    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0\\ ...``.
    """
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "inet":
            name = parts[1].split("@", 1)[0]  # veth names may carry "@ifN"
            found.append((name, parts[3].split("/", 1)[0]))
    return found


def interfaces() -> tuple[list[tuple[str, str]], str]:
    """IPv4 interfaces and how they were found: ``ip -o -4 addr``, else names only."""
    ip = shutil.which("ip")
    if ip:
        try:
            out = subprocess.run(
                [ip, "-o", "-4", "addr"], capture_output=True, text=True, timeout=5, check=True
            ).stdout
            return parse_ip_addr(out), "ip"
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return [(name, "") for _, name in socket.if_nameindex()], "if_nameindex"
    except OSError:
        return [], "none"


def _loopback(address: str) -> bool:
    return address.startswith("127.")


def check_network(env: Mapping[str, str] | None = None) -> Check:
    """IPv4 interfaces, and whether ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` name real
    ones (a wrong name makes every multi-process run fail at start-up)."""
    env = os.environ if env is None else env
    found, how = interfaces()
    names = {n for n, _ in found}
    facts: dict[str, Any] = {
        "interfaces": [{"name": n, "ipv4": a} for n, a in found],
        "source": how,
    }
    listed = ", ".join(f"{n} {a}".strip() for n, a in found) or "none found"
    if how == "if_nameindex":
        listed += " (addresses unknown: `ip` not installed)"
    external = [n for n, a in found if n != "lo" and not _loopback(a)]
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        value = env.get(var)
        facts[var] = value
        if not value or not names:
            continue
        if var == "GLOO_SOCKET_IFNAME":  # exact names, comma-separated
            bad = [n for n in value.split(",") if n and n not in names]
        else:  # NCCL: prefixes; "^" excludes, "=" means exact
            wanted = [] if value.startswith("^") else value.lstrip("=").split(",")
            exact = value.startswith("=")
            bad = [
                w
                for w in wanted
                if w and not any(n == w if exact else n.startswith(w) for n in names)
            ]
        if bad:
            status = "fail" if var == "GLOO_SOCKET_IFNAME" else "warn"
            return Check(
                "network",
                status,
                f"{var}={value} but no interface {', '.join(bad)} here; interfaces: {listed}",
                f"set {var} to one of: {', '.join(sorted(names))} (or unset it)",
                facts,
            )
    if not external:
        return Check(
            "network",
            "warn",
            f"only loopback: {listed}",
            "fine on one node; multi-node needs an interface the nodes share",
            facts,
        )
    pick = env.get("GLOO_SOCKET_IFNAME") or external[0]
    advice = (
        ""
        if env.get("GLOO_SOCKET_IFNAME")
        else (
            f"multi-node: export GLOO_SOCKET_IFNAME={pick} (NCCL_SOCKET_IFNAME={pick} on GPUs), "
            "naming the interface the nodes reach each other on"
        )
    )
    return Check("network", "ok", f"IPv4 interfaces: {listed}", advice, facts)


def _resolve(host: str, timeout: float) -> str:
    """``socket.gethostbyname`` with a time limit (a dead DNS server can stall it for long)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["address"] = socket.gethostbyname(host)
        except OSError as exc:
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if "address" in result:
        return result["address"]
    raise OSError(str(result.get("error", f"no answer within {timeout:g} s")))


def check_hostname(timeout: float = RESOLVE_TIMEOUT_S) -> Check:
    """Whether this host's name resolves to an address other nodes could reach."""
    host = socket.gethostname()
    try:
        address = _resolve(host, timeout)
    except OSError as exc:
        return Check(
            "hostname",
            "warn",
            f"hostname {host!r} does not resolve ({exc})",
            "fine on one node; for multi-node add it to /etc/hosts or DNS and pass "
            "--master-addr as an IP address",
            {"hostname": host, "address": None},
        )
    facts = {"hostname": host, "address": address}
    if _loopback(address):
        return Check(
            "hostname",
            "warn",
            f"hostname {host!r} resolves to {address} (loopback)",
            "fine on one node; for multi-node pass --master-addr as a routable IP and "
            "set GLOO_SOCKET_IFNAME, or map the hostname to that IP",
            facts,
        )
    return Check("hostname", "ok", f"hostname {host!r} resolves to {address}", facts=facts)


# ---------------------------------------------------------------------------- launchers
def check_launcher_env(env: Mapping[str, str] | None = None) -> Check:
    """What ``dptrain train`` would read from torchrun/srun variables (via ``dist.detect``)."""
    if _torch() is None:
        return _no_torch("launcher_env")
    from dptrain import dist
    from dptrain.errors import UsageError

    try:
        found = dist.detect(env)
    except UsageError as exc:
        return Check(
            "launcher_env",
            "fail",
            f"inconsistent launcher environment: {exc}",
            "unset stale RANK/WORLD_SIZE/LOCAL_RANK variables in this shell, or fix the launcher",
            {"source": "invalid", "error": str(exc)},
        )
    facts = {
        "source": found.source,
        "rank": found.rank,
        "world_size": found.world_size,
        "local_rank": found.local_rank,
        "local_world_size": found.local_world_size,
        "master_addr": found.master_addr,
        "master_port": found.master_port,
    }
    if not found.distributed:
        return Check(
            "launcher_env",
            "ok",
            "no launcher variables: one process (dptrain train --nproc N starts local workers)",
            facts=facts,
        )
    return Check(
        "launcher_env",
        "ok",
        f"launched by {found.source}: rank {found.rank} of "
        f"{found.world_size} (local {found.local_rank} of {found.local_world_size}), "
        f"master {found.master_addr}:{found.master_port}",
        facts=facts,
    )


def check_slurm(env: Mapping[str, str] | None = None) -> Check:
    """SLURM tools on PATH and whether we run inside an allocation or a job step."""
    env = os.environ if env is None else env
    tools = {t: shutil.which(t) for t in ("sbatch", "srun")}
    job = env.get("SLURM_JOB_ID")
    facts: dict[str, Any] = {**tools, "job_id": job, "step": "SLURM_STEP_NUM_TASKS" in env}
    have = [t for t, path in tools.items() if path]
    detail = f"SLURM tools: {', '.join(have)}" if have else "SLURM not installed"
    if job is None:
        return Check("slurm", "ok", detail + "; not inside a job", facts=facts)
    detail += f"; inside job {job}"
    if "SLURM_STEP_NUM_TASKS" not in env:
        return Check(
            "slurm",
            "ok",
            detail + " (batch script: start ranks with srun; `dptrain slurm` writes such a script)",
            facts=facts,
        )
    return Check(
        "slurm", "ok", detail + f", step of {env['SLURM_STEP_NUM_TASKS']} task(s)", facts=facts
    )


# ---------------------------------------------------------------------------- data
def data_root(env: Mapping[str, str] | None = None) -> Path:
    """Where ``dptrain train`` looks for data: ``$DPTRAIN_DATA``, else ``./data`` (absolute)."""
    env = os.environ if env is None else env
    return Path(env.get("DPTRAIN_DATA") or "./data").expanduser().absolute()


def check_data(env: Mapping[str, str] | None = None) -> Check:
    """Whether the four MNIST IDX files are present (gzipped or not); contents not verified."""
    root = data_root(env)
    raw = root / "MNIST" / "raw"
    files = {p.name.removesuffix(".gz") for p in raw.glob("*idx*")} if raw.is_dir() else set()
    present = [s for s in MNIST_STEMS if s in files]
    facts = {"root": str(root), "raw_dir": str(raw), "present": present}
    fetch = f"dptrain data fetch mnist --root {root}"
    if root.exists() and not root.is_dir():
        source = "$DPTRAIN_DATA" if (env if env is not None else os.environ).get(
            "DPTRAIN_DATA") else "the default data root"
        return Check("data", "fail", f"the data root {root} ({source}) is not a directory",
                     "point DPTRAIN_DATA (or --data-root) at a directory; `dptrain train` "
                     "refuses this one", facts)
    if len(present) == len(MNIST_STEMS):
        return Check("data", "ok", f"MNIST IDX files present in {raw}", facts=facts)
    if present:
        return Check(
            "data",
            "warn",
            f"MNIST incomplete in {raw}: {len(present)} of {len(MNIST_STEMS)} IDX files",
            f"run `{fetch}` to complete it",
            facts,
        )
    return Check(
        "data",
        "warn",
        f"MNIST not found under {root}",
        f"`dptrain train` fetches it on first use, or run `{fetch}` now (offline-capable)",
        facts,
    )


CHECKS: tuple[Callable[[], Check], ...] = (
    check_versions,
    check_extras,
    check_cuda,
    check_backends,
    check_cpu,
    check_isa,
    check_matmul_peak,
    check_cpu_heap,
    check_shared_memory,
    check_loopback_port,
    check_default_port,
    check_network,
    check_hostname,
    check_launcher_env,
    check_slurm,
    check_data,
)


def run_checks(checks: tuple[Callable[[], Check], ...] = CHECKS) -> list[Check]:
    """Run every check; one that crashes becomes a ``warn`` rather than ending the report."""
    results = []
    for check in checks:
        try:
            results.append(check())
        except Exception as exc:  # a doctor must survive a strange machine
            name = check.__name__.removeprefix("check_")
            results.append(
                Check(
                    name,
                    "warn",
                    f"could not check: {type(exc).__name__}: {exc}",
                    "please report this as a dptrain bug",
                )
            )
    return results


def exit_code(results: list[Check]) -> int:
    """1 when any check failed (training cannot run here), else 0."""
    return 1 if any(c.status == "fail" for c in results) else 0


def to_json(results: list[Check]) -> dict[str, Any]:
    """The machine-readable report: ``{"ok", "exit_code", "counts", "checks": {name: ...}}``."""
    return {
        "ok": exit_code(results) == 0,
        "exit_code": exit_code(results),
        "counts": {s: sum(c.status == s for c in results) for s in STATUSES},
        "checks": {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in results},
    }


def format_text(results: list[Check]) -> str:
    """One ``[status] name: detail`` line per check, advice indented below it."""
    lines = []
    for c in results:
        lines.append(f"[{c.status}] {c.name}: {c.detail}")
        if c.advice:
            lines.append(f"    -> {c.advice}")
    fails = sum(c.status == "fail" for c in results)
    warns = sum(c.status == "warn" for c in results)
    if fails:
        lines.append(
            f"{fails} failed, {warns} warning(s): training cannot run here until the "
            "failures are fixed"
        )
    else:
        lines.append(
            f"training can run here ({warns} warning(s)); prove DDP end to end with "
            "`dptrain verify`"
        )
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``dptrain doctor`` on the top-level subparsers."""
    p = sub.add_parser(
        "doctor",
        help="check this machine for training (versions, devices, network, data)",
        description="Check versions, GPUs, backends, CPU, ports, network, launcher "
        "environment, SLURM and data. Exit 1 when training cannot run here.",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print a machine-readable JSON report instead (default: off)",
    )
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Handler of ``dptrain doctor``: run the checks, print them, exit 1 on any failure."""
    results = run_checks()
    if args.json:
        print(json.dumps(to_json(results), indent=2))
    else:
        print(format_text(results))
    return exit_code(results)
