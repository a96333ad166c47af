"""PNG plots of a bench. matplotlib is optional: without it, plots are skipped with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dptrain.bench.plan import Config

MIB = 1024 * 1024


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_plots(out: Path, configs: list[Config], sweeps: list[dict[str, Any]], fit: Any,
                pred: dict[str, Any]) -> dict[str, Any]:
    """Write every plot; ``{"files": [...]}`` or ``{"skipped": reason}``."""
    try:
        plt = _pyplot()
    except ImportError:
        return {"skipped": "matplotlib is not installed (pip install matplotlib)"}
    files = []
    for fn in (_throughput, _efficiency, _breakdown, _memory, _losses):
        name = fn(plt, out, configs, pred)
        if name:
            files.append(name)
    name = plot_comm(out, sweeps, fit)
    if name:
        files.append(name)
    return {"files": files}


def _save(plt: Any, fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _throughput(plt: Any, out: Path, configs: list[Config], pred: dict[str, Any]) -> str:
    groups = [("configurations", [c for c in configs if c.role == "main"]),
              ("baseline pair", [c for c in configs if c.role != "main"])]
    groups = [(title, cs) for title, cs in groups if cs]
    fig, axes = plt.subplots(1, len(groups), figsize=(9, 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [max(2, len(cs)) for _, cs in groups]})
    for ax, (title, cs) in zip(axes[0], groups, strict=True):
        ok = [c.status == "ok" for c in cs]
        means = [c.summary["samples_per_s"]["mean"] if k else 0.0 for c, k in zip(cs, ok,
                                                                                   strict=True)]
        stds = [c.summary["samples_per_s"]["std"] if k else 0.0 for c, k in zip(cs, ok,
                                                                                 strict=True)]
        colors = ["white" if not k else "tab:gray" if c.role == "baseline" else "tab:blue"
                  for c, k in zip(cs, ok, strict=True)]
        pos = list(range(len(cs)))
        ax.bar(pos, means, yerr=stds, capsize=4, color=colors, edgecolor="black")
        top = max(m + s for m, s in zip(means, stds, strict=True)) or 1.0
        for i, c in enumerate(cs):
            label = f"{means[i]:,.0f}" if ok[i] else c.status
            ax.text(i, means[i] + stds[i] + top * 0.02, label, ha="center", va="bottom",
                    fontsize=8)
        ax.set_xticks(pos, [c.name.replace(" (", "\n(") for c in cs], fontsize=7)
        ax.set_ylim(0, top * 1.12)
        ax.set_title(title, fontsize=10)
    axes[0][0].set_ylabel("global samples/s (mean ± std)")
    fig.suptitle("Throughput per configuration")
    return _save(plt, fig, out, "throughput.png")


def _efficiency(plt: Any, out: Path, configs: list[Config], pred: dict[str, Any]) -> str | None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ys = [1.1]
    for name, link in pred.get("links", {}).items():
        ns = [r["n"] for r in link["rows"]]
        eff = [r["efficiency"] for r in link["rows"]]
        ys += eff
        ax.plot(ns, eff, marker=".", linestyle="-" if link.get("contention") else "--",
                label=f"predicted: {name}")
    for strategy, marker in (("ddp", "o"), ("dp", "s"), ("single", "^")):
        pts = [(c.nproc, c.summary["efficiency"]) for c in configs
               if c.role == "main" and c.strategy == strategy and c.status == "ok"
               and c.summary.get("efficiency")]
        if pts:
            ys += [p[1]["mean"] + p[1]["std"] for p in pts]
            ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                        yerr=[p[1]["std"] for p in pts], fmt=marker, color="black",
                        markersize=8, capsize=4, label=f"measured: {strategy}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, max(ys) * 1.05)  # never hide a point
    ax.set_xlabel("processes N")
    ax.set_ylabel("scaling efficiency")
    ax.set_title("Efficiency vs N: measured and predicted")
    ax.legend(fontsize=7)
    return _save(plt, fig, out, "efficiency.png")


def _breakdown(plt: Any, out: Path, configs: list[Config], pred: dict[str, Any]) -> str | None:
    ok = [c for c in configs if c.status == "ok" and c.role != "baseline"]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    pos = list(range(len(ok)))
    bottom = [0.0] * len(ok)
    for key, label, color in (("compute_s", "compute", "tab:blue"),
                              ("comm_s", "exposed comm", "tab:red"),
                              ("data_s", "data", "tab:green")):
        vals = [(c.summary[key] or {"mean": 0.0})["mean"] * 1e3 for c in ok]  # dp: no comm
        ax.bar(pos, vals, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.scatter(pos, [c.summary["step_s"]["mean"] * 1e3 for c in ok], color="black",
               marker="_", s=400, label="measured step", zorder=3)
    ax.set_xticks(pos, [c.name.replace(" (", "\n(") for c in ok], fontsize=7)
    ax.set_ylabel("ms per step (per process)")
    ax.set_title("Step-time breakdown")
    ax.legend(fontsize=8)
    return _save(plt, fig, out, "breakdown.png")


def _memory(plt: Any, out: Path, configs: list[Config], pred: dict[str, Any]) -> str | None:
    ok = [c for c in configs if c.status == "ok" and c.summary.get("memory")]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x, labels = 0.0, []
    ticks = []
    for c in ok:
        mem = c.summary["memory"]
        width = 0.8 / len(mem)
        for i, m in enumerate(mem):
            peak = (m.get("peak_bytes") or m.get("bytes") or 0) / MIB
            ax.bar(x - 0.4 + width * (i + 0.5), peak, width=width * 0.9,
                   color=f"C{i}", label=f"rank {m.get('rank', 0)} / {m['device']}")
        ticks.append(x)
        labels.append(c.name.replace(" (", "\n("))
        x += 1
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_xticks(ticks, labels, fontsize=7)
    kind = ok[0].summary["memory"][0].get("kind", "peak_rss")
    ax.set_ylabel("MiB (" + ("CUDA max allocated" if kind.startswith("cuda") else
                             "peak RSS per process") + ")")
    ax.set_title("Peak memory per device")
    return _save(plt, fig, out, "memory.png")


def _losses(plt: Any, out: Path, configs: list[Config], pred: dict[str, Any]) -> str | None:
    ok = [c for c in configs if c.status == "ok" and c.role == "main"]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ("-", "--", ":", "-.")
    for i, c in enumerate(ok):  # distinct line styles: identical curves stay visible
        curve = c.repeats[0]["loss_curve"]
        ax.plot(range(1, len(curve) + 1), curve, linestyle=styles[i % len(styles)],
                linewidth=2.5 - 0.4 * (i % len(styles)),
                label=f"{c.name} (global batch {c.summary['global_batch']})")
    ax.set_xlabel("timed step (after warm-up)")
    ax.set_ylabel("training loss (global batch)")
    ax.set_title("Loss curves, first repeat (same seed)")
    ax.legend(fontsize=8)
    return _save(plt, fig, out, "loss.png")


def plot_comm(out: Path, sweeps: list[dict[str, Any]], fit: Any) -> str | None:
    """busbw against message size per N, and the fitted model's curve."""
    if not sweeps:
        return None
    try:
        plt = _pyplot()
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in sweeps:
        sizes = [p["bytes"] for p in s["points"]]
        ax.plot(sizes, [p["busbw_Bps"] / 1e9 for p in s["points"]], marker="o",
                label=f"measured, n={s['n']} ({s['backend']})")
        if fit is not None:
            model = [b * 2 * (s["n"] - 1) / s["n"] / fit.time(b, s["n"]) / 1e9 for b in sizes]
            ax.plot(sizes, model, linestyle="--", label=f"fit α={fit.alpha_s * 1e6:.0f} µs, "
                    f"β={fit.beta_Bps / 1e9:.2f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title("All-reduce sweep: busbw = algbw · 2(n−1)/n")
    ax.legend(fontsize=8)
    return _save(plt, fig, out, "comm_busbw.png")
