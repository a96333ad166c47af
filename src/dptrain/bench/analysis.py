"""From raw repeats to the figures the report shows: summaries, efficiency, predictions."""

from __future__ import annotations

import math
from typing import Any

from dptrain.bench import mean_std
from dptrain.bench import predict as P
from dptrain.bench.plan import Config

TIMES = ("samples_per_s", "step_s", "compute_s", "compute_slowest_s", "sync_step_s", "comm_s",
         "data_s", "final_loss")


def summarise(config: Config) -> None:
    """Fill ``config.summary`` with mean ± std over repeats (nothing for skipped ones)."""
    reps = config.repeats
    if not reps:
        return
    if config.role == "baseline":
        config.summary = {"samples_per_s": mean_std([r["samples_per_s"] for r in reps]),
                          "final_loss": mean_std([r["final_loss"] for r in reps]),
                          "memory": reps[0].get("memory", [])}
        return
    summary: dict[str, Any] = {k: None if any(r[k] is None for r in reps) else
                               mean_std([r[k] for r in reps]) for k in TIMES}
    for key in ("global_batch", "grad_bytes", "allreduce_calls_per_step",
                "allreduce_bytes_per_step", "threads", "backend", "devices"):
        summary[key] = reps[0][key]
    for key in ("collective_bytes_per_step", "state_memory", "describe",
                "memory_format"):  # as in repeat 1
        summary[key] = reps[0].get(key)
    peaks: dict[tuple[int, str], int] = {}
    for r in reps:
        for m in r["memory"]:
            key = (m["rank"], m["device"])
            peaks[key] = max(peaks.get(key, 0), m["bytes"] or 0)
    summary["memory"] = [{"rank": rank, "device": dev, "peak_bytes": b,
                          "kind": reps[0]["memory"][0]["kind"]}
                         for (rank, dev), b in sorted(peaks.items())]
    config.summary = summary


def add_efficiency(configs: list[Config]) -> None:
    """Scaling efficiency against the same strategy with one process (or GPU)."""
    ones = {c.strategy: c for c in configs
            if c.role == "main" and c.nproc == 1 and c.status == "ok"}
    for c in configs:
        if c.role != "main" or c.status != "ok":
            continue
        base = ones.get(c.strategy)
        if base is None:
            c.summary["efficiency"] = None
            continue
        m1, s1 = base.summary["samples_per_s"]["mean"], base.summary["samples_per_s"]["std"]
        mn, sn = c.summary["samples_per_s"]["mean"], c.summary["samples_per_s"]["std"]
        eff = P.efficiency(mn, c.nproc, m1)
        rel = math.hypot(sn / mn, s1 / m1) if c is not base else 0.0
        c.summary["efficiency"] = {"mean": eff, "std": eff * rel,
                                   "relative_to": base.name}


def _mean(config: Config, key: str) -> float:
    return config.summary[key]["mean"]


def step_times(config: Config) -> list[float]:
    """Every rank's per-step compute times without gradient sync, over all repeats."""
    return [t for rep in config.repeats for rank in rep.get("ranks", [])
            for t in rank.get("nosync_times_s", [])]


def straggler(n: int, measured_n: int, times: list[float]) -> float:
    """The step's growth beyond ``measured_n`` processes from waiting for the slowest of
    ``n`` instead, from the per-step ``times`` measured at ``measured_n`` (1 up to it: the
    slowest rank's compute there is measured, and the contention factor beyond it carries
    that)."""
    if n <= measured_n or len(times) < 2:
        return 1.0
    return P.straggler_factor(times, n) / P.straggler_factor(times, measured_n)


def beyond_measured(n: int, factors: dict[int, float], cpu: bool) -> float:
    """The measured link's contention factor: :func:`dptrain.bench.predict.contention_factor`;
    off CPU (no contention model) the factor measured at the largest N, which is its slowest
    rank's compute, also holds beyond it (times :func:`straggler`)."""
    if cpu or not factors or n < max(factors) or n in factors:
        return P.contention_factor(n, factors, cpu)
    return factors[max(factors)]


def predictions(configs: list[Config], fit: P.Fit | None, *, cpu: bool,
                bucket_cap_mb: float, fit_note: str | None = None,
                target: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scaling predictions (measured link and stated links) and their validation.

    ``target`` (``{"compute_s", "source", ...}``, from :func:`target_for`) replaces this
    machine's compute time in the stated links' rows, with data time 0; the measured link
    always uses this machine's figures. Every link's entry says which compute time it used
    (``compute``).
    """
    ok = {(c.strategy, c.nproc): c for c in configs if c.role == "main" and c.status == "ok"}
    base = ok.get(("ddp", 1)) or ok.get(("single", 1))
    if base is None:
        return {"skipped": "no 1-process configuration ran: nothing to base predictions on"}
    compute1, data1 = _mean(base, "compute_s"), _mean(base, "data_s")
    batch = base.summary["global_batch"]
    grad_bytes = base.summary["grad_bytes"]
    common = dict(compute_s=compute1, data_s=data1, batch=batch, grad_bytes=grad_bytes,
                  bucket_cap_mb=bucket_cap_mb)
    out: dict[str, Any] = {
        "based_on": base.name, "compute_1_s": compute1, "data_1_s": data1,
        "grad_bytes": grad_bytes, "batch_per_process": batch, "bucket_cap_mb": bucket_cap_mb,
        "buckets": len(P.bucket_sizes(grad_bytes, bucket_cap_mb)),
        "backward_fraction": P.BACKWARD_FRACTION,
        "assumptions": P.describe_assumptions(target_source=target["source"] if target
                                              else None),
        "links": {}, "validation": [], "target": target,
    }
    here_source = (f"measured on this machine: {base.name}'s compute {compute1 * 1e3:.3g} ms + "
                   f"data {data1 * 1e3:.3g} ms per step")
    stated = dict(common)
    stated_compute = {"compute_s": compute1, "data_s": data1, "source": here_source}
    if target is not None:
        stated.update(compute_s=float(target["compute_s"]), data_s=0.0)
        stated_compute = {"compute_s": float(target["compute_s"]), "data_s": 0.0,
                          "source": target["source"]}
    ddp = {n: c for (s, n), c in ok.items() if s == "ddp"}
    factors = {n: _mean(c, "compute_slowest_s") / compute1 for n, c in ddp.items()}
    data_factors = {n: _mean(c, "data_s") / data1 if data1 > 0 else 1.0
                    for n, c in ddp.items()}
    widest = max(ddp) if ddp else 1
    times = step_times(ddp.get(widest, base))
    out["straggler"] = {"from": ddp.get(widest, base).name, "measured_n": widest,
                        "step_times": len(times)}
    if fit is not None:
        table = P.scaling_table(
            **common, cost=fit.time,
            contention=lambda n: beyond_measured(n, factors, cpu),
            data_contention=lambda n: P.contention_factor(n, data_factors, cpu),
            straggler=lambda n: straggler(n, widest, times))
        out["links"]["measured link (this machine)"] = {
            "alpha_s": fit.alpha_s, "beta_Bps": fit.beta_Bps, "contention": True,
            "compute": {"compute_s": compute1, "data_s": data1,
                        "source": here_source + ", per-process compute and data at N as "
                        "measured (contention beyond)"},
            "rows": table}
    else:
        out["measured_link_skipped"] = fit_note or "no all-reduce sweep to fit"
    for link in P.STATED_LINKS:
        out["links"][link.name] = {"alpha_s": link.alpha_s, "beta_Bps": link.beta_Bps,
                                   "contention": False, "compute": stated_compute,
                                   "rows": P.scaling_table(**stated, cost=P.link_cost(link))}
    for n, c in sorted(ddp.items()):
        if n < 2:
            continue
        row: dict[str, Any] = {"config": c.name, "n": n,
                               "measured_step_s": _mean(c, "step_s"),
                               "measured_median_step_s": (_mean(c, "sync_step_s")
                                                          + _mean(c, "data_s")),
                               "measured_samples_per_s": _mean(c, "samples_per_s"),
                               "measured_comm_s": _mean(c, "comm_s")}
        if fit is None:
            row["skipped"] = out["measured_link_skipped"]
        else:
            here = P.predict_step(compute_s=_mean(c, "compute_slowest_s"),
                                  data_s=_mean(c, "data_s"),
                                  global_batch_per_proc=batch, n=n, grad_bytes=grad_bytes,
                                  bucket_cap_mb=bucket_cap_mb, cost=fit.time)
            ideal = P.predict_step(compute_s=compute1, data_s=data1,
                                   global_batch_per_proc=batch, n=n, grad_bytes=grad_bytes,
                                   bucket_cap_mb=bucket_cap_mb, cost=fit.time)
            row.update(
                predicted_step_s=here["step_s"], predicted_comm_s=here["comm_exposed_s"],
                predicted_samples_per_s=here["samples_per_s"],
                error_pct=P.prediction_error(here["step_s"], row["measured_step_s"]),
                median_error_pct=P.prediction_error(here["step_s"],
                                                    row["measured_median_step_s"]),
                no_contention_step_s=ideal["step_s"],
                no_contention_error_pct=P.prediction_error(ideal["step_s"],
                                                           row["measured_step_s"]))
        out["validation"].append(row)
    dp = [c for (s, n), c in ok.items() if s == "dp" and n > 1]
    for c in dp:
        out["validation"].append({"config": c.name, "n": c.nproc, "skipped":
                                  "DataParallel (scatter/replicate/gather through GPU 0) is not "
                                  "the ring all-reduce this model describes"})
    return out


def comm_points(sweeps: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    return [(p["n"], p["bytes"], p["time_s"]) for s in sweeps for p in s["points"]]


# ---------------------------------------------------------------------------- FLOPs, roofline
ROOFLINE_PRECISIONS = ("fp32", "bf16")
MNIST_SHAPE = (1, 28, 28)


def forward_flops(model_name: str) -> tuple[int | None, str | None]:
    """(forward FLOPs per sample, None), or (None, why not) for a model that cannot be counted
    on a 1x28x28 input (a plug-in for another input shape)."""
    import torch

    from dptrain.flops import model_flops_per_sample
    from dptrain.models import build_model

    try:
        return model_flops_per_sample(build_model(model_name), torch.zeros(2, *MNIST_SHAPE)), None
    except Exception as exc:  # any plug-in model may fail on our example input
        return None, f"cannot count the FLOPs of {model_name!r} on a 1x28x28 input ({exc})"


def target_for(o: dict[str, Any], forward_flops_per_sample: int | None) -> dict[str, Any] | None:
    """The stated links' compute time from ``--target``/``--target-compute-ms``, or None.

    Raises:
        ValueError: a target needs the model's FLOPs and they are unknown.
    """
    from dptrain.flops import train_flops_per_sample

    if o.get("target_compute_ms") is not None:
        ms = float(o["target_compute_ms"])
        return {"target": None, "compute_s": ms / 1e3, "bound": "given",
                "source": f"--target-compute-ms {ms:g} (given): {ms:g} ms per step"}
    if not o.get("target"):
        return None
    if forward_flops_per_sample is None:
        raise ValueError("--target needs the model's FLOPs, which could not be counted; give "
                         "--target-compute-ms instead")
    name, precision = P.parse_target(o["target"])
    profile = P.TARGETS[name]
    precision = precision or profile.default_precision
    if name == "cpu-this":
        import dataclasses

        peak = _with_threads(_bench_threads(o), lambda: _peak(precision))
        profile = dataclasses.replace(profile, peak={precision: peak})
    found = P.target_compute(profile, precision,
                             train_flops_per_sample=train_flops_per_sample(
                                 forward_flops_per_sample),
                             batch=o["batch_size"], mfu=o.get("target_mfu"))
    found["forward_flops_per_sample"] = forward_flops_per_sample
    return found


def _bench_threads(o: dict[str, Any]) -> int:
    from dptrain.bench import usable_cores

    return o.get("threads") or usable_cores()


def _with_threads(threads: int, fn: Any) -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _peak(precision: str) -> float:
    from dptrain import hardware

    return hardware.matmul_peak("fp32" if precision == "tf32" else precision)


def micro_step_s(model_name: str, batch: int, precision: str, *, seconds: float = 1.0,
                 max_steps: int = 30) -> dict[str, Any]:
    """Median seconds of a training step (forward, backward, SGD) on a prepared random batch.

    bf16 runs under CPU autocast as ``--precision bf16`` does. Steps are timed after one
    warm-up step, until ``seconds`` are spent (at least 3, at most ``max_steps``); a first
    timed step already longer than ``seconds`` (bf16 without native support) is the only one.
    The model and batch take the memory format ``dptrain train`` gives them by default
    (``--channels-last auto``), as the bench's runs do.
    """
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    from dptrain.models import build_model, memory_format

    torch.manual_seed(0)
    model = build_model(model_name)
    fmt, _ = memory_format("auto", model_name, model, torch.device("cpu"))
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, *MNIST_SHAPE), torch.randint(0, 10, (batch,))
    x = x.contiguous(memory_format=fmt)
    autocast = precision == "bf16"

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    step()  # warm-up: first-call allocation and kernel selection
    probe = step()
    if probe > seconds:
        return {"step_s": probe, "steps": 1, "note": "one step only: slower than the budget"}
    times: list[float] = [probe]
    deadline = time.perf_counter() + seconds
    while len(times) < max_steps and (len(times) < 3 or time.perf_counter() < deadline):
        times.append(step())
    return {"step_s": statistics.median(times), "steps": len(times), "note": None}


def roofline(configs: list[Config], o: dict[str, Any], forward_flops_per_sample: int | None,
             *, seconds: float = 1.0) -> dict[str, Any]:
    """Achieved training FLOP/s against this machine's measured matmul peak, fp32 and bf16.

    Per precision: the matmul peak (:func:`dptrain.hardware.matmul_peak`) at the 1-process
    thread count; a compute-only training step timed here (:func:`micro_step_s`); and, for
    fp32 (the precision the bench trains in), the bench's own 1-process run. Training FLOPs
    are 3x the forward count (:mod:`dptrain.flops`).
    """
    from dptrain.flops import achieved_flops, mfu, train_flops_per_sample

    if forward_flops_per_sample is None:
        return {"skipped": "the model's FLOPs could not be counted"}
    train = train_flops_per_sample(forward_flops_per_sample)
    threads = _bench_threads(o)
    ok = {(c.strategy, c.nproc): c for c in configs if c.role == "main" and c.status == "ok"}
    base = ok.get(("single", 1)) or ok.get(("ddp", 1))
    out: dict[str, Any] = {"model": o["model"], "batch": o["batch_size"], "threads": threads,
                           "forward_flops_per_sample": forward_flops_per_sample,
                           "train_flops_per_sample": train, "rows": []}
    for precision in ROOFLINE_PRECISIONS:
        peak = _with_threads(threads, lambda p=precision: _peak(p))
        micro = _with_threads(threads, lambda p=precision: micro_step_s(
            o["model"], o["batch_size"], p, seconds=seconds))
        micro_sps = o["batch_size"] / micro["step_s"]
        row: dict[str, Any] = {
            "precision": precision, "peak_flops": peak, "micro_step_s": micro["step_s"],
            "micro_steps": micro["steps"], "micro_note": micro["note"],
            "micro_samples_per_s": micro_sps,
            "micro_achieved_flops": achieved_flops(train, micro_sps),
            "micro_mfu": mfu(train, micro_sps, peak),
            "run": None, "run_samples_per_s": None, "run_achieved_flops": None, "run_mfu": None}
        if precision == "fp32" and base is not None:
            sps = base.summary["samples_per_s"]["mean"]
            row.update(run=base.name, run_samples_per_s=sps,
                       run_achieved_flops=achieved_flops(train, sps),
                       run_mfu=mfu(train, sps, peak))
        out["rows"].append(row)
    return out
