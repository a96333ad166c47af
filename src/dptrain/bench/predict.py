"""A cost model for data-parallel steps: ring all-reduce + DDP bucketing + overlap.

All-reduce (ring algorithm, latency + bytes / bandwidth)::

    t(S, n) = alpha * 2 (n - 1)  +  S * 2 (n - 1) / n / beta

``alpha`` is the latency of one ring step, ``beta`` the per-link bandwidth (what nccl-tests'
*busbw* tends to for large messages). :func:`fit_cost_model` fits both to a measured sweep.

One DDP step of a process (:func:`predict_step`)::

    step = data + compute + exposed_comm

Gradients of ``G`` bytes travel in buckets of at most ``bucket_cap_mb`` (the order: last layer
first). Assumptions, stated once here and in the report:

* backward is ``backward_fraction`` (default 2/3) of compute; the gradients of a bucket are
  ready when backward has produced that bucket's share of the bytes (bytes ~ backward time);
* buckets are all-reduced one after another as soon as they are ready, so the communication of
  all buckets but the last can hide under the rest of backward; what ends after backward is
  exposed -- with a single bucket, all of it is;
* compute does not slow down while communicating (no contention between the two).

Processes that all-reduce every step wait for the slowest at every step. Where per-step times
of processes running side by side are known (without communication), :func:`straggler_factor`
turns them into the expected slowest of ``n`` (each step's times independent across processes
and steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

BACKWARD_FRACTION = 2 / 3
PREDICT_N = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Link:
    """A network or bus for the what-if predictions: per-link bandwidth and per-step latency."""

    name: str
    beta_Bps: float
    alpha_s: float


STATED_LINKS = (
    Link("PCIe 4.0 x16 (16 GB/s, 10 µs)", 16e9, 10e-6),
    Link("NVLink (300 GB/s, 5 µs)", 300e9, 5e-6),
    Link("25 GbE (3.1 GB/s, 50 µs)", 3.1e9, 50e-6),
    Link("100 GbE (12.5 GB/s, 20 µs)", 12.5e9, 20e-6),
)


def ring_steps(n: int) -> int:
    """Steps of a ring all-reduce: ``n - 1`` reduce-scatter + ``n - 1`` all-gather."""
    return 2 * (n - 1)


def allreduce_time(nbytes: float, n: int, alpha_s: float, beta_Bps: float) -> float:
    """Seconds for one ring all-reduce of ``nbytes`` among ``n`` processes (0 for ``n = 1``)."""
    if n < 2:
        return 0.0
    return alpha_s * ring_steps(n) + nbytes * 2 * (n - 1) / n / beta_Bps


def efficiency(samples_per_s_n: float, n: int, samples_per_s_1: float) -> float:
    """Scaling efficiency: ``samples/s(n) / (n * samples/s(1))``."""
    return samples_per_s_n / (n * samples_per_s_1)


@dataclass(frozen=True)
class Fit:
    """A fitted all-reduce cost model and how well it matches its own data."""

    alpha_s: float
    beta_Bps: float
    rel_rms: float  # root-mean-square relative error over the fitted points
    points: int

    def time(self, nbytes: float, n: int) -> float:
        return allreduce_time(nbytes, n, self.alpha_s, self.beta_Bps)

    def to_dict(self) -> dict[str, float | int]:
        return {"alpha_s": self.alpha_s, "beta_Bps": self.beta_Bps, "rel_rms": self.rel_rms,
                "points": self.points}


def fit_cost_model(points: Sequence[tuple[int, float, float]]) -> Fit:
    """Fit ``alpha`` and ``beta`` to ``(n, bytes, seconds)`` measurements.

    Least squares on *relative* error (rows weighted by 1/t), so that 4 KiB messages count as
    much as 64 MiB ones: otherwise the large messages fix the line and ``alpha`` is noise. Both
    parameters are kept non-negative (``beta = inf`` if no bandwidth term is visible).

    Raises:
        ValueError: fewer than two points with ``n >= 2``.
    """
    rows = [(n, b, t) for n, b, t in points if n >= 2 and t > 0]
    if len(rows) < 2:
        raise ValueError("fitting alpha and beta needs at least two measurements with n >= 2")
    n = np.array([r[0] for r in rows], dtype=float)
    b = np.array([r[1] for r in rows], dtype=float)
    t = np.array([r[2] for r in rows], dtype=float)
    x1 = 2 * (n - 1)  # latency regressor
    x2 = b * 2 * (n - 1) / n  # bandwidth regressor: t = alpha x1 + gamma x2, gamma = 1/beta
    design = np.stack([x1 / t, x2 / t], axis=1)
    alpha, gamma = np.linalg.lstsq(design, np.ones_like(t), rcond=None)[0]
    if alpha < 0:  # refit with alpha = 0
        alpha = 0.0
        gamma = float(np.linalg.lstsq(design[:, 1:], np.ones_like(t), rcond=None)[0][0])
    if gamma <= 0:  # no visible bandwidth term: latency only
        gamma = 0.0
        alpha = float(np.linalg.lstsq(design[:, :1], np.ones_like(t), rcond=None)[0][0])
    pred = alpha * x1 + gamma * x2
    rel_rms = float(np.sqrt(np.mean(((pred - t) / t) ** 2)))
    beta = 1.0 / gamma if gamma > 0 else math.inf
    return Fit(float(alpha), beta, rel_rms, len(rows))


def bucket_sizes(grad_bytes: int, bucket_cap_mb: float,
                 first_bucket_bytes: int | None = None) -> list[int]:
    """DDP's gradient buckets, in the order they become ready (last layers first).

    dptrain passes ``bucket_cap_mb`` explicitly, and DDP then uses the same cap for its first
    bucket (the 1 MiB first bucket applies only to DDP's own default).
    """
    cap = max(1, int(bucket_cap_mb * 1024 * 1024))
    first = cap if first_bucket_bytes is None else first_bucket_bytes
    sizes: list[int] = []
    left = grad_bytes
    while left > 0:
        take = min(left, first if not sizes else cap)
        sizes.append(take)
        left -= take
    return sizes or [0]


def comm_schedule(compute_s: float, buckets: Sequence[int], n: int,
                  cost: Callable[[float, int], float],
                  backward_fraction: float = BACKWARD_FRACTION) -> tuple[float, float]:
    """(total, exposed) all-reduce seconds of one step under the overlap assumption."""
    if n < 2:
        return 0.0, 0.0
    backward = backward_fraction * compute_s
    total_bytes = sum(buckets) or 1
    ready = finish = total = 0.0
    done_bytes = 0
    for size in buckets:
        done_bytes += size
        ready = backward * done_bytes / total_bytes
        t = cost(size, n)
        finish = max(ready, finish) + t
        total += t
    return total, max(0.0, finish - backward)


def predict_step(*, compute_s: float, data_s: float, global_batch_per_proc: int, n: int,
                 grad_bytes: int, bucket_cap_mb: float, cost: Callable[[float, int], float],
                 backward_fraction: float = BACKWARD_FRACTION) -> dict[str, float]:
    """Predicted step time, global samples/s and communication of one configuration."""
    buckets = bucket_sizes(grad_bytes, bucket_cap_mb)
    total, exposed = comm_schedule(compute_s, buckets, n, cost, backward_fraction)
    step = data_s + compute_s + exposed
    return {"n": n, "step_s": step, "samples_per_s": n * global_batch_per_proc / step,
            "comm_total_s": total, "comm_exposed_s": exposed, "compute_s": compute_s,
            "data_s": data_s, "buckets": len(buckets)}


def expected_max(samples: Sequence[float], n: int) -> float:
    """E[max of ``n`` independent draws] from the empirical distribution of ``samples``.

    With the samples sorted, ``x_(k)`` is the largest of ``n`` draws with probability
    ``(k/m)^n - ((k-1)/m)^n``. ``n = 1`` gives the mean.

    Raises:
        ValueError: no samples, or ``n < 1``.
    """
    xs = np.sort(np.asarray(samples, dtype=float))
    if xs.size == 0 or n < 1:
        raise ValueError("expected_max needs at least one sample and n >= 1")
    m = len(xs)
    cdf = np.arange(m + 1, dtype=float) / m
    weights = cdf[1:] ** n - cdf[:-1] ** n
    return float(np.dot(weights, xs))


def straggler_factor(step_times: Sequence[float], n: int) -> float:
    """How much longer a step is when ``n`` processes wait for the slowest of them at every
    step: E[max of n step times] / E[step time], from per-step times measured with the
    processes side by side but not waiting for each other (1 for ``n = 1``)."""
    return expected_max(step_times, n) / expected_max(step_times, 1)


def contention_factor(n: int, measured: dict[int, float], cpu: bool) -> float:
    """How much slower one process's compute is with ``n`` processes on this machine.

    Measured values (per-process compute at ``n`` over compute at 1) are used as they are. On
    CPU, beyond the largest measured ``m`` the processes share the same cores: with the
    effective parallelism ``S = m / k(m)`` fitted there, ``k(n) = max(1, n / S)``. On GPUs
    (one device per process) there is no contention: ``k = 1``.
    """
    if n in measured:
        return measured[n]
    if not cpu or not measured:
        return 1.0
    m = max(measured)
    capacity = min(m, max(1.0, m / measured[m]))
    return max(1.0, n / capacity)


def scaling_table(*, compute_s: float, data_s: float, batch: int, grad_bytes: int,
                  bucket_cap_mb: float, cost: Callable[[float, int], float],
                  contention: Callable[[int], float] | None = None,
                  data_contention: Callable[[int], float] | None = None,
                  straggler: Callable[[int], float] | None = None,
                  ns: Sequence[int] = PREDICT_N) -> list[dict[str, float]]:
    """Predictions for each ``n``; efficiency relative to the model's own ``n = 1``.

    ``contention(n)`` and ``data_contention(n)`` scale the 1-process compute and data times
    (see :func:`contention_factor`); without them each process runs as fast as one alone.
    ``straggler(n)`` (see :func:`straggler_factor`) scales both once more: the step waits for
    the slowest process.
    """
    rows = []
    for n in ns:
        s = straggler(n) if straggler else 1.0
        k = (contention(n) if contention else 1.0) * s
        kd = (data_contention(n) if data_contention else 1.0) * s
        rows.append(predict_step(compute_s=compute_s * k, data_s=data_s * kd,
                                 global_batch_per_proc=batch, n=n, grad_bytes=grad_bytes,
                                 bucket_cap_mb=bucket_cap_mb, cost=cost))
        rows[-1]["straggler"] = s
    one = predict_step(compute_s=compute_s, data_s=data_s, global_batch_per_proc=batch, n=1,
                       grad_bytes=grad_bytes, bucket_cap_mb=bucket_cap_mb, cost=cost)
    for row in rows:
        row["efficiency"] = efficiency(row["samples_per_s"], int(row["n"]), one["samples_per_s"])
    return rows


def link_cost(link: Link) -> Callable[[float, int], float]:
    return lambda nbytes, n: allreduce_time(nbytes, n, link.alpha_s, link.beta_Bps)


def prediction_error(predicted: float, measured: float) -> float:
    """Signed relative error in percent: ``100 (predicted - measured) / measured``."""
    return 100.0 * (predicted - measured) / measured


def describe_assumptions(backward_fraction: float = BACKWARD_FRACTION,
                         target_source: str | None = None) -> list[str]:
    """The model's assumptions in words, for the report.

    ``target_source`` says where the stated links' compute time comes from when it is not
    this machine's (``--target`` / ``--target-compute-ms``).
    """
    stated = ("stated links: one device per process, each as fast as this machine's 1-process "
              "compute (no contention) -- on GPUs compute is far shorter, so communication "
              "weighs much more than these rows show: use --target or --target-compute-ms"
              if target_source is None else
              f"stated links: one device per process, compute per step from {target_source} "
              "(no contention); data time 0 (device-resident batches: the gather is small "
              "beside compute on a GPU, and is not modelled)")
    return [
        "all-reduce: ring algorithm, t = α·2(n−1) + S·2(n−1)/n / β (α per ring step, β per "
        "link); α, β fitted to the comm sweep by least squares on relative error",
        "the measured link's α, β (from N processes on this machine) are assumed to hold for "
        "every N",
        f"backward ≈ {backward_fraction:.2f} of compute; a bucket is ready when backward has "
        "produced its share of the gradient bytes; buckets are all-reduced one at a time as "
        "they become ready, so only the communication ending after backward is exposed",
        "DDP buckets: bucket_cap_mb per bucket, the first one included (dptrain passes the cap "
        "explicitly)",
        stated,
        "measured link: per-process compute and data time at N as measured here; beyond the "
        "largest measured N on CPU, processes share the cores with the effective parallelism "
        "S fitted at that N (compute and data time ×max(1, N/S): once the cores are full, "
        "more processes add no throughput)",
        "measured link, beyond the largest measured N (M): every step waits for the slowest "
        "process: ×E[max of N]/E[max of M] of the per-step compute times measured at M (all "
        "ranks, taken as independent) on top of M's slowest-rank compute (off CPU, where "
        "nothing else grows with N, that compute is kept beyond M); from a few dozen "
        "samples this cannot exceed the slowest step seen, so it understates the tail at "
        "large N",
    ]


# ---------------------------------------------------------------------------- target devices
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@dataclass(frozen=True)
class DeviceProfile:
    """A device the stated-link predictions can assume instead of this machine's compute.

    ``peak`` holds dense peak FLOP/s per precision (vendor datasheets, no sparsity); a
    precision the device lacks is absent. ``mfu`` is the assumed model FLOP utilisation: the
    share of the peak a training step reaches. ``floor_s`` is the least time a step can take
    whatever its FLOPs: on a GPU, a step of a small model is bound by kernel launches (forward,
    backward and optimizer are some tens of kernels of a few µs each), not by arithmetic.
    """

    name: str
    description: str
    peak: dict[str, float]
    mfu: float
    floor_s: float
    default_precision: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "description": self.description, "peak_flops": self.peak,
                "mfu": self.mfu, "floor_s": self.floor_s,
                "default_precision": self.default_precision}


GPU_MFU = 0.35  # large dense models on these GPUs train at 30-50 % MFU; small ones far lower
GPU_FLOOR_S = 200e-6  # ~40 kernel launches x ~5 µs per training step
TARGETS: dict[str, DeviceProfile] = {
    "h100": DeviceProfile("h100", "NVIDIA H100 SXM (datasheet, dense)",
                          {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12,
                           "fp16": 989.4e12}, GPU_MFU, GPU_FLOOR_S, "bf16"),
    "h200": DeviceProfile("h200", "NVIDIA H200 SXM (datasheet, dense; the H100's compute)",
                          {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12,
                           "fp16": 989.4e12}, GPU_MFU, GPU_FLOOR_S, "bf16"),
    "a100": DeviceProfile("a100", "NVIDIA A100 SXM (datasheet, dense)",
                          {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
                          GPU_MFU, GPU_FLOOR_S, "bf16"),
    "v100": DeviceProfile("v100", "NVIDIA V100 SXM2 (datasheet; no bf16)",
                          {"fp32": 15.7e12, "fp16": 125e12}, GPU_MFU, GPU_FLOOR_S, "fp16"),
    # filled in by measure: this machine's matmul peak (dptrain.hardware) at the bench's threads
    "cpu-this": DeviceProfile("cpu-this", "this machine's CPU (measured matmul peak)", {},
                              0.5, 0.0, "fp32"),
}


def parse_target(text: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:PRECISION`` -> (name, precision or None); raises ValueError."""
    name, colon, precision = text.strip().lower().partition(":")
    if colon and not precision:
        raise ValueError(f"no precision after ':' in {text!r}: give NAME or NAME:PRECISION "
                         f"({', '.join(PRECISIONS)})")
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}: use one of {', '.join(TARGETS)}")
    if precision and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} in {text!r}: use one of "
                         f"{', '.join(PRECISIONS)}")
    profile = TARGETS[name]
    if precision and profile.peak and precision not in profile.peak:
        raise ValueError(f"{profile.description} has no {precision}: use one of "
                         f"{', '.join(profile.peak)}")
    return name, precision or None


def target_compute(profile: DeviceProfile, precision: str, *, train_flops_per_sample: float,
                   batch: int, mfu: float | None = None) -> dict[str, object]:
    """Compute seconds of one training step of ``batch`` samples on ``profile``.

    ``max(batch x train FLOPs per sample / (peak x MFU), floor)``; the result names which of
    the two decided, and every figure behind it.
    """
    peak = profile.peak.get(precision)
    if peak is None or not peak > 0:
        raise ValueError(f"{profile.name} has no {precision} peak")
    use_mfu = profile.mfu if mfu is None else mfu
    if not 0 < use_mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {use_mfu}")
    flops_step = train_flops_per_sample * batch
    arithmetic = flops_step / (peak * use_mfu)
    compute = max(arithmetic, profile.floor_s)
    bound = "arithmetic" if arithmetic >= profile.floor_s else "launch floor"
    return {"target": profile.name, "description": profile.description,
            "precision": precision, "peak_flops": peak, "mfu": use_mfu,
            "floor_s": profile.floor_s, "train_flops_per_step": flops_step,
            "arithmetic_s": arithmetic, "compute_s": compute, "bound": bound,
            "source": (f"{profile.description}, {precision}: {flops_step / 1e9:,.3g} GFLOP "
                       f"per step / ({peak / 1e12:,.4g} TFLOP/s x MFU {use_mfu:g})"
                       + (f" = {arithmetic * 1e3:.4g} ms, below the {profile.floor_s * 1e3:g}"
                          " ms launch floor" if bound == "launch floor" else
                          f" = {arithmetic * 1e3:.4g} ms"))}
