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


def predictions(configs: list[Config], fit: P.Fit | None, *, cpu: bool,
                bucket_cap_mb: float, fit_note: str | None = None) -> dict[str, Any]:
    """Scaling predictions (measured link and stated links) and their validation."""
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
        "backward_fraction": P.BACKWARD_FRACTION, "assumptions": P.describe_assumptions(),
        "links": {}, "validation": [],
    }
    ddp = {n: c for (s, n), c in ok.items() if s == "ddp"}
    factors = {n: _mean(c, "compute_slowest_s") / compute1 for n, c in ddp.items()}
    data_factors = {n: _mean(c, "data_s") / data1 if data1 > 0 else 1.0
                    for n, c in ddp.items()}
    if fit is not None:
        table = P.scaling_table(
            **common, cost=fit.time,
            contention=lambda n: P.contention_factor(n, factors, cpu),
            data_contention=lambda n: P.contention_factor(n, data_factors, cpu))
        out["links"]["measured link (this machine)"] = {
            "alpha_s": fit.alpha_s, "beta_Bps": fit.beta_Bps, "contention": True,
            "rows": table}
    else:
        out["measured_link_skipped"] = fit_note or "no all-reduce sweep to fit"
    for link in P.STATED_LINKS:
        out["links"][link.name] = {"alpha_s": link.alpha_s, "beta_Bps": link.beta_Bps,
                                   "contention": False,
                                   "rows": P.scaling_table(**common, cost=P.link_cost(link))}
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
