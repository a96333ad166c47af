"""``dptrain bench --compare ddp,localsgd,hogwild``: time to a target accuracy, and when relaxed
synchronisation pays.

Each strategy trains the same model on the same data from the same seed, with the same
per-process batch and process count, evaluating every ``--eval-every`` steps until the test
accuracy reaches ``--target-accuracy`` (``dptrain train --target-accuracy``). For each it
reports the training time to the target (evaluation excluded), the optimizer steps, and the
bytes it communicated: ddp's gradient all-reduces as its comm hook counted them, localsgd's
warm-up all-reduces plus its parameter averages, hogwild none (it shares memory).

"When does relaxed synchronisation pay?" is answered with the alpha-beta model of a ring
all-reduce (``bench/predict.py``): on a link with latency alpha and bandwidth beta an
all-reduce of S bytes over n processes takes ``2(n-1) alpha + 2 S (n-1)/n / beta``. With the
compute time per step t_c (the ddp run's step time less the all-reduce time measured here for
its gradient bytes), each strategy's time to the target on that link is predicted as::

    ddp:       steps_ddp x (t_c + T(grad bytes))          (no overlap: an upper bound)
    localsgd:  steps_lsgd x t_c + syncs_lsgd x T(param bytes)

and local SGD pays where its prediction is the smaller: where one all-reduce costs more than
``t_c (steps_lsgd - steps_ddp) / (steps_ddp - syncs_lsgd)``. Hogwild has no such prediction:
it shares one machine's memory and cannot cross a link.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from dptrain.errors import UsageError, comma_list

COMPARABLE = ("ddp", "zero", "fsdp", "localsgd", "hogwild")
SYNC_EVERY_DEFAULT = 8


def parse(text: str) -> list[str]:
    names = comma_list("--compare", text, "ddp,localsgd")
    bad = [s for s in names if s not in COMPARABLE]
    if bad:
        raise UsageError(f"--compare {text!r}: use a comma-separated list of "
                         f"{', '.join(COMPARABLE)}")
    return names


def train_config(o: dict[str, Any], strategy: str, out: Path, seed: int) -> Any:
    """The training run of one strategy: everything equal but the strategy."""
    from dptrain.config import TrainConfig

    values = {"model": o["model"], "dataset": o["dataset"], "data_root": o["data_root"],
              "batch_size": o["batch_size"], "nproc": str(o["compare_nproc"]),
              "strategy": strategy, "lr": o["lr"], "momentum": 0.9, "seed": seed,
              "threads": str(o["threads"]), "epochs": o["max_epochs"],
              "eval_every": o["eval_every"], "target_accuracy": o["target_accuracy"],
              "device": o["device"], "quiet": True, "log_every": 1_000_000,
              "eval_every_epoch": True, "out": str(out)}
    if strategy == "localsgd":
        values["sync_every"] = o["sync_every"]
    return TrainConfig(**values).validate()


def comm_bytes(summary: dict[str, Any]) -> int:
    """Bytes this rank sent into collectives for training: gradient all-reduces (counted by
    the comm hook) plus parameter averages (local SGD)."""
    return sum(int(summary.get(key) or 0) for key in (
        "allreduce_bytes", "warmup_allreduce_bytes", "parameter_average_bytes"))


def exact(strategy: str, sync_every: int) -> bool:
    """Equal to one process with the global batch: not hogwild, not local SGD with H > 1."""
    return strategy != "hogwild" and not (strategy == "localsgd" and sync_every > 1)


def run_one(o: dict[str, Any], strategy: str, out: Path, repeat: int) -> dict[str, Any]:
    from dptrain.cli import run_training

    cfg = train_config(o, strategy, out / f"{strategy}-r{repeat}", o["seed"])
    t0 = time.perf_counter()
    s = run_training(cfg, count_comm=True)
    reached = s.get("target_reached")
    return {"strategy": strategy, "repeat": repeat, "reached": reached is not None,
            "time_to_target_s": reached["train_time_s"] if reached else None,
            "steps_to_target": reached["step"] if reached else None,
            "steps": s["steps"], "train_time_s": s["train_time_s"],
            "step_time_s": (s["train_time_s"] / s["timed_steps"]) if s["timed_steps"] else None,
            "final_accuracy": s["test_accuracy"], "comm_bytes_per_rank": comm_bytes(s),
            "param_averages": s.get("parameter_averages"),
            "warmup_steps": s.get("localsgd_warmup_steps"),
            "exact": exact(strategy, o["sync_every"]),
            "wall_s": time.perf_counter() - t0}


def median_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per strategy: the median over repeats (of the repeats that reached it)."""
    ok = [r for r in rows if r["reached"]]
    base = dict(rows[0], repeats=len(rows), reached_in=len(ok))
    for key in ("time_to_target_s", "steps_to_target", "comm_bytes_per_rank", "step_time_s",
                "final_accuracy"):
        values = [r[key] for r in (ok or rows) if r[key] is not None]
        base[key] = statistics.median(values) if values else None
    base["reached"] = bool(ok)
    return base


def measured_allreduce(o: dict[str, Any], nbytes: int) -> float | None:
    """Seconds of one all-reduce of ``nbytes`` among the compared processes, measured here."""
    from dptrain.bench.comm import feasible, run_sweep

    n = o["compare_nproc"]
    if n < 2 or feasible(n, o["device"]):
        return None
    sweep = run_sweep(n, [max(4, nbytes)], iters=o["iters"], device=o["device"])
    return sweep["points"][0]["time_s"]


def relaxed_sync(rows: dict[str, dict[str, Any]], *, param_bytes: int, n: int,
                 measured_s: float | None, sync_every: int) -> dict[str, Any]:
    """The alpha-beta answer: predicted time to the target on each stated link, ddp vs
    localsgd, and the all-reduce time above which local SGD pays."""
    from dptrain.bench.predict import STATED_LINKS, allreduce_time

    ddp, lsgd = rows.get("ddp"), rows.get("localsgd")
    if not (ddp and lsgd and ddp["reached"] and lsgd["reached"] and ddp["step_time_s"]):
        return {"note": "needs ddp and localsgd rows that both reached the target"}
    comm_here = measured_s or 0.0
    t_c = max(ddp["step_time_s"] - comm_here, 1e-9)
    s_d, s_l = ddp["steps_to_target"], lsgd["steps_to_target"]
    warm = lsgd.get("warmup_steps") or 0
    syncs = warm + max(0, s_l - warm) / sync_every
    links = [{"link": "this machine (measured)", "allreduce_s": comm_here}] if (
        measured_s is not None) else []
    links += [{"link": L.name, "allreduce_s": allreduce_time(param_bytes, n, L.alpha_s,
                                                             L.beta_Bps)}
              for L in STATED_LINKS if "GbE" in L.name]
    for link in links:
        t = link["allreduce_s"]
        link["ddp_s"] = s_d * (t_c + t)
        link["localsgd_s"] = s_l * t_c + syncs * t
        link["localsgd_pays"] = link["localsgd_s"] < link["ddp_s"]
    breakeven = (t_c * (s_l - s_d) / (s_d - syncs)) if s_d > syncs else None
    return {"compute_s_per_step": t_c, "allreduce_bytes": param_bytes, "n": n,
            "steps_ddp": s_d, "steps_localsgd": s_l, "syncs_localsgd": syncs,
            "breakeven_allreduce_s": max(breakeven, 0.0) if breakeven is not None else None,
            "links": links}


def run_compare(o: dict[str, Any], out: Path) -> int:
    """Run every strategy ``repeats`` times to the target; write compare.json/compare.md."""
    from dptrain.bench import machine_info
    from dptrain.bench.command import _check_out, _prepare_inputs
    from dptrain.models import build_model

    _check_out(out)
    _prepare_inputs(o)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(o["model"])
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows: dict[str, dict[str, Any]] = {}
    for name in o["compare"]:
        runs = []
        for r in range(o["repeats"]):
            row = run_one(o, name, out, r)
            runs.append(row)
            shown = (f"{row['time_to_target_s']:.2f} s, {row['steps_to_target']} steps"
                     if row["reached"] else f"not reached in {row['steps']} steps")
            print(f"{name} repeat {r + 1}/{o['repeats']}: {shown} "
                  f"(final {row['final_accuracy']:.4f})", flush=True)
        rows[name] = median_of(runs)
        rows[name]["runs"] = runs
    measured = measured_allreduce(o, param_bytes)
    answer = relaxed_sync(rows, param_bytes=param_bytes, n=o["compare_nproc"],
                          measured_s=measured, sync_every=o["sync_every"])
    doc = {"schema": "dptrain-bench-compare/1", "machine": machine_info(),
           "options": {k: v for k, v in o.items() if k not in ("what",)},
           "param_bytes": param_bytes, "rows": rows, "relaxed_sync": answer}
    (out / "compare.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "compare.md").write_text("\n".join(report(doc)) + "\n")
    print("\n".join(report(doc)))
    print(f"wrote {out / 'compare.json'} and {out / 'compare.md'}")
    return 0 if any(r["reached"] for r in rows.values()) else 1


def report(doc: dict[str, Any]) -> list[str]:
    o = doc["options"]
    lines = [f"# Time to {o['target_accuracy']:.2%} test accuracy: {', '.join(o['compare'])}",
             "",
             f"{o['model']} on {o['dataset']}, {o['compare_nproc']} processes x batch "
             f"{o['batch_size']}, lr {o['lr']:g} (momentum 0.9), evaluated every "
             f"{o['eval_every']} steps, at most {o['max_epochs']} epochs; localsgd averages "
             f"every {o['sync_every']} steps; median of {o['repeats']} run(s). Training time "
             "excludes evaluation.", "",
             "| strategy | exact | reached | time to target (s) | steps | bytes sent / rank | "
             "final accuracy |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for name, r in doc["rows"].items():
        t = f"{r['time_to_target_s']:.2f}" if r["time_to_target_s"] is not None else "-"
        lines.append(f"| {name} | {'yes' if r['exact'] else 'no'} | {r['reached_in']}/"
                     f"{r['repeats']} | {t} | {r['steps_to_target'] or '-'} | "
                     f"{r['comm_bytes_per_rank'] / 1e6:,.1f} MB | {r['final_accuracy']:.4f} |")
    a = doc["relaxed_sync"]
    lines += ["", "## When does relaxed synchronisation pay?", ""]
    if "links" not in a:
        return [*lines, a["note"]]
    lines += [f"Compute per step {a['compute_s_per_step'] * 1e3:.2f} ms (ddp's step less its "
              f"measured all-reduce); ddp needed {a['steps_ddp']} steps, localsgd "
              f"{a['steps_localsgd']} with {a['syncs_localsgd']:.0f} synchronisations of "
              f"{a['allreduce_bytes'] / 1e6:.2f} MB among {a['n']} processes.", "",
              "| link | one all-reduce (ms) | ddp to target (s) | localsgd to target (s) | "
              "pays |", "| --- | ---: | ---: | ---: | --- |"]
    for link in a["links"]:
        lines.append(f"| {link['link']} | {link['allreduce_s'] * 1e3:.3f} | "
                     f"{link['ddp_s']:.2f} | {link['localsgd_s']:.2f} | "
                     f"{'yes' if link['localsgd_pays'] else 'no'} |")
    b = a["breakeven_allreduce_s"]
    if b is None:
        verdict = "Local SGD synchronised as often as ddp here: it cannot pay."
    elif b == 0:
        verdict = ("Local SGD needed no more steps than ddp, so with fewer synchronisations "
                   "it pays at any all-reduce cost; how much is the table's difference.")
    else:
        verdict = (f"Local SGD pays once one all-reduce of the parameters costs more than "
                   f"{b * 1e3:.3f} ms per step.")
    return [*lines, "", verdict + " (Alpha-beta model; ddp's communication is not overlapped "
            "with its backward here: an upper bound on ddp's time.)"]
