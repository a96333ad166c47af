"""What this CPU can do: the ISA features that decide CPU training speed, and a measured peak.

Why it matters (measured): on a 2-core Intel Xeon with AMX-BF16 a 2048x2048 matmul runs at
222 GFLOP/s in fp32 and 707 GFLOP/s in bf16; on a 2-core AMD EPYC with AVX2 only, fp32 runs
at ~100 GFLOP/s and bf16 at ~0.3-1.3 GFLOP/s -- oneDNN has no bf16 kernel there and falls back
to a reference path 100-300x slower than fp32. So bf16 pays only where the ISA runs it natively
(:func:`native_bf16`), and a peak must be measured, not looked up (:func:`matmul_peak`).

Features come from the ``flags`` line of ``/proc/cpuinfo`` (Linux; none elsewhere) and from
``torch.backends.cpu.get_cpu_capability()`` (the vector ISA ATen dispatches its own kernels
to; ``ATEN_CPU_CAPABILITY`` can lower it).

:func:`matmul_peak` is cached per process and, unless ``cache=False``, in a small JSON file
(``$XDG_CACHE_HOME/dptrain/matmul_peak.json``, else ``~/.cache/dptrain/``; the directory can be
set with ``$DPTRAIN_CACHE_DIR``) keyed by CPU model, torch version, thread count, dtype and
size, so that runs do not pay ~1 s each time. A missing, unreadable or malformed cache file is
ignored, and a cache that cannot be written is not an error. A peak is the *best* rate the
machine reaches, and other processes only ever slow a measurement down: a re-measurement
(``refresh=True``) keeps the higher of the cached and the new figure.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# /proc/cpuinfo flag -> the name doctor prints, in the order that matters for training speed
FLAG_NAMES: dict[str, str] = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512F",
    "avx512_vnni": "AVX512-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "avx512_fp16": "AVX512-FP16",
    "amx_tile": "AMX-TILE",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}
# oneDNN runs bf16 matmuls and convolutions natively with AVX512-BF16 (avx512_core_bf16) or
# AMX-BF16 (avx512_core_amx); without either it converts and runs a reference path.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) under which it still runs bf16 natively
ONEDNN_BF16_CAPS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX",
                    "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT")
DEFAULT_SIZE = 2048
DEFAULT_SECONDS = 0.5
_PROBE = 256
_MIN_REPEATS = 3
_MAX_REPEATS = 25
CACHE_NAME = "matmul_peak.json"
CACHE_SCHEMA = 2  # 2: a peak is the best product (1 held medians, some taken on a busy machine)


@dataclass(frozen=True)
class CpuInfo:
    """The CPU features behind dptrain's choices.

    Attributes:
        model: The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere).
        flags: The ISA flags of :data:`FLAG_NAMES` that this CPU has (``/proc/cpuinfo`` names).
        capability: ``torch.backends.cpu.get_cpu_capability()``, e.g. ``AVX2``, ``AVX512``.
        native_bf16: Whether bf16 matmuls/convolutions run natively (AMX-BF16 or AVX512-BF16).
    """

    model: str
    flags: tuple[str, ...]
    capability: str
    native_bf16: bool

    @property
    def names(self) -> list[str]:
        """The features present, as printed (``AVX2``, ``AVX-512F``, ``AMX-BF16``...)."""
        return [FLAG_NAMES[f] for f in FLAG_NAMES if f in self.flags]

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), flags=list(self.flags), names=self.names)


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """``/proc/cpuinfo`` text -> (model name, all flags of the first processor).

    x86 lists ``flags``; aarch64 lists ``Features`` (kept too, though none of them is in
    :data:`FLAG_NAMES`).
    """
    model, flags = "", set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def _read_cpuinfo() -> tuple[str, set[str]]:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return "", set()


def onednn_isa_cap() -> str:
    """The ISA cap set for oneDNN (``ONEDNN_MAX_CPU_ISA``, or the older ``DNNL_MAX_CPU_ISA``),
    upper-case; "" when none is set."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
            or "").strip().upper()


def _bf16_flags(flags: set[str] | tuple[str, ...]) -> bool:
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def _onednn_below_bf16() -> bool:
    cap = onednn_isa_cap()
    return bool(cap) and cap not in ONEDNN_BF16_CAPS


def why_not_native_bf16(flags: set[str] | tuple[str, ...] | None = None) -> str | None:
    """Why bf16 is emulated on this CPU (``flags``: its cpuinfo flags, this machine's by
    default), for doctor and the recipes alike; ``None`` where it runs natively."""
    flags = cpu_info().flags if flags is None else flags
    if not _bf16_flags(flags):
        return "no AMX-BF16 or AVX512-BF16"
    if _onednn_below_bf16():
        return f"ONEDNN_MAX_CPU_ISA={onednn_isa_cap()} keeps oneDNN from the bf16 instructions"
    return None


def torch_capability() -> str:
    """The vector ISA ATen's own CPU kernels use (``DEFAULT`` when torch cannot say)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older/odd builds: a capability is information, not a requirement
        return "DEFAULT"


_info: CpuInfo | None = None


def cpu_info(refresh: bool = False) -> CpuInfo:
    """This machine's :class:`CpuInfo` (read once per process)."""
    global _info
    if _info is None or refresh:
        model, flags = _read_cpuinfo()
        present = tuple(f for f in FLAG_NAMES if f in flags)
        native = _bf16_flags(flags) and not _onednn_below_bf16()
        _info = CpuInfo(model or platform.processor() or platform.machine(), present,
                        torch_capability(), native)
    return _info


def native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls and convolutions natively (AMX-BF16 or AVX512-BF16).

    Where it does not, bf16 autocast on the CPU is much *slower* than fp32 (see the module
    docstring), so recipes fall back to fp32. A ``ONEDNN_MAX_CPU_ISA`` below
    ``AVX512_CORE_BF16`` (``AVX2``, say) keeps oneDNN from the bf16 instructions: not native.
    """
    return cpu_info().native_bf16


# ---------------------------------------------------------------------------- matmul peak
def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"32": torch.float32, "fp32": torch.float32, "float32": torch.float32,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "16": torch.float16, "fp16": torch.float16, "float16": torch.float16}
    try:
        return names[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use fp32, bf16 or fp16") from None


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"bf16"`` -> ``"bf16"`` (``fp32``, ``bf16``, ``fp16``)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[_dtype(dtype)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_matmul(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    torch.mm(a, b)
    _sync(device)
    return time.perf_counter() - t0


def _best_rate(a: torch.Tensor, b: torch.Tensor, device: torch.device, tries: int = 3) -> float:
    """The best rate of a few products: a sleeping thread pool or a page fault can make one
    small product 50x slower, and sizing must not follow such an outlier."""
    n = a.shape[0]
    best = _time_matmul(a, b, device)
    for _ in range(tries - 1):
        if best > 0.05:  # slow for sure: more tries would only cost time
            break
        best = min(best, _time_matmul(a, b, device))
    return 2 * n**3 / max(best, 1e-9)


def measure_matmul(dtype: torch.dtype | str = torch.float32, *, size: int = DEFAULT_SIZE,
                   seconds: float = DEFAULT_SECONDS,
                   device: torch.device | str = "cpu") -> dict[str, Any]:
    """Measure square-matmul FLOP/s (``2 n^3`` per product), uncached.

    Starting from 256x256, the side doubles (up to ``size``) while the next product, at the
    rate just measured, fits ``seconds / 4``: a slow path (bf16 without native support runs
    ~300x slower than fp32) still ends in about ``seconds``, and a fast one reaches sizes big
    enough to show the peak. At the chosen size, after a warm-up product, products are timed
    one by one (device-synchronised) until ``seconds`` are spent (3 to 25 of them); the figure
    is the best rate. A peak is what the machine *can* do, and on a shared machine other
    processes only ever slow a product down: a median taken while a neighbour ran once put
    this VM's fp32 "peak" at 14.6 GFLOP/s (products ranged 8-93), and runs then reported an
    MFU of 2.6.

    Returns:
        ``{"flops": best FLOP/s, "median": median FLOP/s, "size": n, "repeats": k,
        "spread": [min, max] FLOP/s, "dtype", "device", "threads"}``.
    """
    dt = _dtype(dtype)
    dev = torch.device(device)
    if size < 1 or not seconds > 0:
        raise ValueError(f"size must be >= 1 and seconds > 0, got size={size}, "
                         f"seconds={seconds}")
    gen = torch.Generator().manual_seed(0)

    def pair(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(n, n, generator=gen).to(device=dev, dtype=dt)
        b = torch.randn(n, n, generator=gen).to(device=dev, dtype=dt)
        return a, b

    with torch.no_grad():
        n = min(size, _PROBE)
        a, b = pair(n)
        torch.mm(a, b)  # first call: library initialisation, kernel selection
        rate = _best_rate(a, b, dev)
        # grow while the next size's product fits the budget (small sizes can take slow
        # paths, so each size's own rate decides, not an extrapolation from the probe)
        while 2 * n <= size and 2 * (2 * n) ** 3 / rate <= seconds / 4:
            n *= 2
            a, b = pair(n)
            rate = _best_rate(a, b, dev)  # also the warm-up at n
        rates: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(rates) < _MAX_REPEATS and (len(rates) < _MIN_REPEATS
                                             or time.perf_counter() < deadline):
            rates.append(2 * n**3 / max(_time_matmul(a, b, dev), 1e-12))
    return {"flops": max(rates), "median": statistics.median(rates), "size": n,
            "repeats": len(rates),
            "spread": [min(rates), max(rates)], "dtype": dtype_name(dt), "device": str(dev),
            "threads": torch.get_num_threads()}


def cache_dir() -> Path:
    """``$DPTRAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/dptrain``, else ``~/.cache/dptrain``."""
    if os.environ.get("DPTRAIN_CACHE_DIR"):
        return Path(os.environ["DPTRAIN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dptrain"


def _device_model(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_info().model


def cache_key(dtype: torch.dtype | str, size: int, device: torch.device | str = "cpu") -> str:
    """The cache file's key: device model, torch version, threads, dtype and size."""
    dev = torch.device(device)
    return "|".join([_device_model(dev), f"torch {torch.__version__}",
                     f"{torch.get_num_threads()} threads", dtype_name(dtype), f"n{size}",
                     dev.type])


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache file's entries; ``{}`` when it is missing, unreadable or not ours."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(doc, dict) or doc.get("schema") != CACHE_SCHEMA:
        return {}
    entries = doc.get("entries")
    return entries if isinstance(entries, dict) else {}


def _cached_flops(entry: Any) -> float | None:
    if not isinstance(entry, dict):
        return None
    flops = entry.get("flops")
    if isinstance(flops, int | float) and not isinstance(flops, bool) and 0 < flops < 1e18:
        return float(flops)
    return None


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``key`` to the cache file atomically; any failure leaves the cache as it was."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path)
        entries[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".matmul_peak.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"schema": CACHE_SCHEMA, "entries": entries}, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # a read-only home is no reason to fail a run


_memo: dict[str, float] = {}
_lock = threading.Lock()


def matmul_peak(dtype: torch.dtype | str = torch.float32, *, size: int = DEFAULT_SIZE,
                seconds: float = DEFAULT_SECONDS, device: torch.device | str = "cpu",
                cache: bool = True, refresh: bool = False) -> float:
    """Measured peak matmul rate of this machine in FLOP/s, at the current thread count.

    See :func:`measure_matmul` for the measurement. The figure is memoised per process and,
    with ``cache=True``, kept in the cache file (module docstring). ``refresh=True`` measures
    again and keeps the higher of the old and the new figure.

    Args:
        dtype: ``torch.float32``/``torch.bfloat16``/``torch.float16`` or ``"fp32"``, ``"bf16"``,
            ``"fp16"`` (also the ``--precision`` values ``"32"``, ``"16"``).
        size: Largest matrix side to try (smaller when the rate is low).
        seconds: Time budget of one measurement.
        device: ``cpu`` or a CUDA device.
        cache: Read and write the cache file.
        refresh: Measure even when a figure is memoised or cached.
    """
    key = cache_key(dtype, size, device)
    path = cache_dir() / CACHE_NAME
    with _lock:
        old = _memo.get(key)
        if old is None and cache:
            old = _cached_flops(_read_cache(path).get(key))
        if old is not None and not refresh:
            _memo[key] = old
            return old
        found = measure_matmul(dtype, size=size, seconds=seconds, device=device)
        best = max(found["flops"], old or 0.0)
        _memo[key] = best
        if cache:
            _write_cache(path, key, {"flops": best, "measured": found,
                                     "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return best


def peak_for_precision(precision: str, device: torch.device | str = "cpu", **kw: Any) -> float:
    """The matmul peak for a ``--precision`` value: ``32`` -> fp32, ``bf16``, ``16`` -> fp16."""
    return matmul_peak({"32": "fp32", "bf16": "bf16", "16": "fp16"}.get(precision, precision),
                       device=device, **kw)


def clear_memo() -> None:
    """Forget the per-process figures (tests; after changing the thread count nothing else is
    needed: the key holds it)."""
    with _lock:
        _memo.clear()
