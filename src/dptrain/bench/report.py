"""``report.md``: the bench's results in tables a reader can check against ``results.json``."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from dptrain.bench.comm import fmt_bytes, sweep_table
from dptrain.bench.plan import Config

MIB = 1024 * 1024


def _pm(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 0) -> str:
    if not stat:
        return "–"
    return f"{stat['mean'] * scale:,.{digits}f} ± {stat['std'] * scale:,.{digits}f}"


def _ms(c: Config, key: str) -> str:
    return _pm(c.summary.get(key), 1e3, 2)


def _memory(c: Config) -> str:
    mem = c.summary.get("memory") or []
    if not mem:
        return "–"
    parts = [f"{m.get('device', 'cpu')}:{(m.get('peak_bytes') or m.get('bytes') or 0) / MIB:,.0f}"
             for m in mem]
    return " / ".join(parts) + " MiB"


def throughput_rows(configs: list[Config]) -> list[str]:
    """The throughput table: one row per configuration, skipped and failed ones included."""
    rows = ["| configuration | status | global batch | samples/s | step (ms) | compute (ms) | "
            "exposed comm (ms) | data (ms) | efficiency | all-reduce per step | peak memory "
            "per device | final loss |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |"]
    for c in configs:
        if c.status != "ok":
            rows.append(f"| {c.name} | {c.status}: {c.reason or 'not run'} |" + " – |" * 10)
            continue
        s = c.summary
        if c.role == "baseline":
            rows.append(f"| {c.name} | ok | {c.batch_size} | {_pm(s['samples_per_s'])} |"
                        + " – |" * 6 + f" {_memory(c)} | {_pm(s['final_loss'], 1, 4)} |")
            continue
        eff = s.get("efficiency")
        eff_text = f"{eff['mean']:.2f} ± {eff['std']:.2f}" if eff else "–"
        calls = s["allreduce_calls_per_step"]
        comm = (f"{fmt_bytes(s['allreduce_bytes_per_step'])} in {calls:g} call(s)" if calls
                else "none")
        rows.append(f"| {c.name} | ok | {s['global_batch']} | {_pm(s['samples_per_s'])} | "
                    f"{_ms(c, 'step_s')} | {_ms(c, 'compute_s')} | {_ms(c, 'comm_s')} | "
                    f"{_ms(c, 'data_s')} | {eff_text} | {comm} | {_memory(c)} | "
                    f"{_pm(s['final_loss'], 1, 4)} |")
    return rows


def layout_note(configs: list[Config]) -> list[str]:
    """Which memory format each configuration trained in (`dptrain train`'s choice for it)."""
    by_format: dict[str, list[str]] = {}
    for c in configs:
        fmt = c.summary.get("memory_format") if c.status == "ok" else None
        if fmt:
            by_format.setdefault(fmt, []).append(c.name)
    if not by_format:
        return []
    if len(by_format) == 1:
        return [f"Parameters and inputs: {next(iter(by_format))}, as `dptrain train` would "
                "train them.", ""]
    parts = "; ".join(f"{fmt} for {', '.join(names)}" for fmt, names in by_format.items())
    return [f"Parameters and inputs, as `dptrain train` would train them: {parts}.", ""]


def _balance(c: Config) -> str:
    peaks = [m["peak_bytes"] for m in c.summary.get("memory", []) if m.get("peak_bytes")]
    if not peaks:
        return "not measured"
    kind = "GPU max allocated" if c.summary["memory"][0]["kind"].startswith("cuda") else \
        "peak RSS per process"
    values = " / ".join(f"{p / MIB:,.0f}" for p in peaks)
    return f"{kind}: {values} MiB (max/min {max(peaks) / min(peaks):.2f})"


def _path(record: dict[str, Any]) -> str:
    """The all-reduce a sweep or a run's summary used: ``shm``, or the backend's."""
    return record.get("allreduce") or record["backend"]


def dp_vs_ddp(configs: list[Config]) -> list[str]:
    """The tutorials' DP-vs-DDP table, cells measured where this machine could measure them."""
    rows = ["| parallel mode | communication | memory balance | code needed | use case |",
            "| --- | --- | --- | --- | --- |"]
    static = {
        "dp": ("DataParallel: 1 process, 1 thread per GPU",
               "`model = nn.DataParallel(model)` (1 line)",
               "quick prototyping on one multi-GPU machine; GIL-bound, GPU 0 is a hot spot"),
        "ddp": ("DistributedDataParallel: 1 process per device, any number of nodes",
                "process group + launcher + per-rank data shard + `DDP(model)`; in dptrain "
                "`dptrain train --nproc N`",
                "the default for data parallelism: multi-GPU, multi-node, and CPU"),
    }
    for strategy in ("dp", "ddp"):
        mode, code, use = static[strategy]
        grid = [c for c in configs if c.strategy == strategy and c.role == "main"]
        ran = [c for c in grid if c.status == "ok"]
        widest = max(ran, key=lambda c: c.nproc) if ran else None
        if widest is None:
            why = "; ".join(sorted({f"{c.status}: {c.reason}" for c in grid})) or "not requested"
            comm = balance = why
        elif strategy == "dp":
            comm = (f"scatter inputs, replicate the model, gather outputs on GPU 0 every step; "
                    f"{widest.summary['samples_per_s']['mean']:,.0f} samples/s on "
                    f"{widest.nproc} GPUs")
            balance = _balance(widest)
        else:
            s = widest.summary
            comm = (f"bucketed all-reduce ({_path(s)}) overlapped with backward: "
                    f"{fmt_bytes(s['allreduce_bytes_per_step'])} in "
                    f"{s['allreduce_calls_per_step']:g} bucket(s) per step, exposed "
                    f"{_ms(widest, 'comm_s')} ms at n={widest.nproc}")
            balance = _balance(widest)
        rows.append(f"| {mode} | {comm} | {balance} | {code} | {use} |")
    return rows


def baseline_rows(configs: list[Config]) -> list[str]:
    tutorial = next((c for c in configs if c.role == "baseline"), None)
    if tutorial is None:
        return ["Baseline row not run (`--baseline-steps 0`)."]
    ours = next((c for c in configs if c.role == "baseline-dptrain"), None) or next(
        (c for c in configs if c.role == "main" and c.strategy == "single" and c.nproc == 1
         and c.model == "linear" and c.batch_size == 64), None)
    rows = ["| training loop (Linear(784, 10), batch 64, 1 process) | samples/s | vs tutorial |",
            "| --- | ---: | ---: |"]
    base = tutorial.summary.get("samples_per_s")
    rows.append(f"| tutorial: per-sample `Dataset` + `DataLoader` | "
                f"{_pm(base) if base else f'{tutorial.status}: {tutorial.reason}'} | 1.00 |")
    if ours is not None:
        mine = ours.summary.get("samples_per_s")
        ratio = f"{mine['mean'] / base['mean']:.2f}×" if mine and base else "–"
        rows.append(f"| dptrain: device-resident tensors, index-sharded batches | "
                    f"{_pm(mine) if mine else f'{ours.status}: {ours.reason}'} | {ratio} |")
    return rows


def compute_sources(pred: dict[str, Any]) -> list[str]:
    """Which compute time each prediction column uses, one bullet per link."""
    lines = ["Compute time per step behind each column:", ""]
    for name, link in pred["links"].items():
        comp = link.get("compute")
        if not comp:
            continue
        lines.append(f"- **{name}**: {comp['compute_s'] * 1e3:.4g} ms compute + "
                     f"{comp['data_s'] * 1e3:.3g} ms data — {comp['source']}")
    if pred.get("target") is None:
        lines += ["", "The stated links use *this machine's* compute time: a GPU computes a "
                  "step far faster, so there communication weighs much more than these rows "
                  "show. Pass `--target h100` (or a100, h200, v100, cpu-this; `NAME:bf16` for "
                  "a precision) or `--target-compute-ms MS` for a prediction of other "
                  "hardware."]
    return lines


def prediction_rows(pred: dict[str, Any]) -> list[str]:
    if "skipped" in pred:
        return [f"Prediction skipped: {pred['skipped']}."]
    links = pred["links"]
    names = list(links)
    head = "| N | " + " | ".join(names) + " |"
    rows = [*compute_sources(pred), "",
            "Each cell: predicted global samples/s, and efficiency in parentheses.", "", head,
            "| ---: |" + " ---: |" * len(names)]
    for i, row in enumerate(links[names[0]]["rows"]):
        cells = [f"{links[n]['rows'][i]['samples_per_s']:,.0f} "
                 f"({links[n]['rows'][i]['efficiency']:.2f})" for n in names]
        rows.append(f"| {row['n']} | " + " | ".join(cells) + " |")
    measured = links.get("measured link (this machine)")
    strag = pred.get("straggler")
    if measured and strag:
        grown = [f"N = {r['n']}: ×{r['straggler']:.3f}" for r in measured["rows"]
                 if r.get("straggler", 1.0) > 1.0]
        if grown:
            rows += ["", f"Measured link beyond N = {strag['measured_n']}: each step waits for "
                     f"the slowest process, from {strag['step_times']} per-step compute times "
                     f"of {strag['from']} (" + ", ".join(grown) + ")."]
    return rows


def validation_rows(pred: dict[str, Any]) -> list[str]:
    val = pred.get("validation") or []
    if not val:
        return ["No multi-process configuration ran: nothing to validate the prediction "
                "against."]
    rows = ["| configuration | predicted step (ms) | measured step, mean (ms) | error | "
            "measured step, median (ms) | error | predicted without contention (ms) | its "
            "error | exposed comm: measured / predicted (ms) |", "| --- |" + " ---: |" * 8]
    for v in val:
        if "skipped" in v:
            rows.append(f"| {v['config']} | skipped: {v['skipped']} |" + " – |" * 7)
            continue
        rows.append(f"| {v['config']} | {v['predicted_step_s'] * 1e3:.2f} | "
                    f"{v['measured_step_s'] * 1e3:.2f} | {v['error_pct']:+.1f} % | "
                    f"{v['measured_median_step_s'] * 1e3:.2f} | "
                    f"{v['median_error_pct']:+.1f} % | {v['no_contention_step_s'] * 1e3:.2f} | "
                    f"{v['no_contention_error_pct']:+.1f} % | {v['measured_comm_s'] * 1e3:.2f}"
                    f" / {v['predicted_comm_s'] * 1e3:.2f} |")
    return rows


def _gflops(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e9:,.2f}"


def roofline_rows(roof: dict[str, Any] | None) -> list[str]:
    """The roofline table: achieved training FLOP/s against the measured matmul peak."""
    if not roof:
        return ["Roofline not measured (`--no-roofline`)."]
    if "skipped" in roof:
        return [f"Roofline skipped: {roof['skipped']}."]
    rows = [f"Model `{roof['model']}`: {roof['forward_flops_per_sample']:,} forward FLOPs per "
            f"sample (matmuls and convolutions, torch's FlopCounterMode), training = 3x = "
            f"{roof['train_flops_per_sample']:,}; batch {roof['batch']}, "
            f"{roof['threads']} thread(s).", "",
            "| precision | matmul peak (GFLOP/s) | training step alone: samples/s | achieved "
            "(GFLOP/s) | MFU | bench run | samples/s | achieved (GFLOP/s) | MFU |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in roof["rows"]:
        note = f" ({r['micro_note']})" if r.get("micro_note") else ""
        run = r["run"] or ("– (the bench trains in fp32)" if r["precision"] != "fp32" else "–")
        run_sps = "–" if r["run_samples_per_s"] is None else f"{r['run_samples_per_s']:,.0f}"
        run_mfu = "–" if r["run_mfu"] is None else f"{r['run_mfu']:.1%}"
        rows.append(f"| {r['precision']} | {_gflops(r['peak_flops'])} | "
                    f"{r['micro_samples_per_s']:,.0f}{note} | "
                    f"{_gflops(r['micro_achieved_flops'])} | {r['micro_mfu']:.1%} | {run} | "
                    f"{run_sps} | {_gflops(r['run_achieved_flops'])} | {run_mfu} |")
    rows += ["", "*Matmul peak*: median rate of square matmuls (up to 2048²) at this thread "
             "count, measured by `dptrain.hardware` (cached in ~/.cache/dptrain). *Training "
             "step alone*: forward + backward + SGD on one prepared random batch (bf16 under "
             "CPU autocast), median step, in the bench's parent process. *Bench run*: the "
             "1-process configuration's throughput above (data loading included). MFU = "
             "training FLOPs × samples/s / peak of that precision. On a CPU without native "
             "bf16 (no AMX-BF16 / AVX512-BF16) bf16 is emulated and both its peak and its "
             "step are far below fp32's."]
    return rows


def _load_warning(loads: list[float]) -> list[str]:
    """A shared machine makes figures unreliable: say so where the reader looks first."""
    if not loads or max(loads) < 0.2:
        return []
    return [f"**Warning: this machine was shared.** Other processes kept up to {max(loads):.0%} "
            "of the CPU busy during the runs (per-run figures in results.json, `other_load`). "
            "Processes with several intra-op threads suffer most (one descheduled thread stalls "
            "every parallel operation), so throughput, efficiency and the breakdown are "
            "distorted; rerun on a quiet machine, or with `--settle 60`, before trusting "
            "them.", ""]


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3f}"


def pipeline_rows(configs: list[Config]) -> list[str]:
    """Pipeline configurations: the bubble, measured per stage against (S-1)/(M+S-1), and
    the model state each stage holds (nothing when no pipeline ran)."""
    runs = [c for c in configs if c.strategy == "pipeline" and c.status == "ok" and c.summary]
    if not runs:
        return []
    rows = ["## Pipeline: bubble and memory per stage", "",
            "The bubble is the share of a step a stage spends idle: 1 - (its forward and "
            "backward compute) / (the step), measured per stage (median over steps), against "
            "GPipe's theory (S-1)/(M+S-1) for S stages and M micro-batches.", "",
            "| configuration | schedule | stages x micro-batches | bubble theory | bubble "
            "measured per stage | model state per stage (MiB) |",
            "| --- | --- | --- | ---: | --- | --- |"]
    for c in runs:
        d = c.summary.get("describe") or {}
        per_stage = d.get("bubble_measured_per_stage") or []
        measured = " / ".join("–" if b is None else f"{b:.2f}" for b in per_stage) or "–"
        mem = c.summary.get("state_memory") or []
        state = " / ".join(_mib(m["param_bytes"] + m["grad_bytes"] + m["optim_bytes"])
                           for m in mem[:d.get("stages", len(mem))]) or "–"
        theory = d.get("bubble_theoretical")
        rows.append(f"| {c.name} | {d.get('pipeline_schedule', '–')} | {d.get('stages')} x "
                    f"{d.get('microbatches')} | "
                    f"{'–' if theory is None else f'{theory:.2f}'} | {measured} | {state} |")
    return [*rows, ""]


def memory_rows(configs: list[Config], model: str, device_gib: tuple[float, ...] = (16, 24, 80)
                ) -> list[str]:
    """Per-rank model-state memory: measured (the tensors each rank holds) against the
    prediction from the model's shapes, the bytes each collective carried per step, and the
    prediction for N = 1..64 with the world size from which each strategy fits a device."""
    from dptrain import memory
    from dptrain.models import build_model

    shapes = memory.shapes(build_model(model))
    states = 1  # the bench trains SGD with momentum 0.9: one fp32 momentum per parameter
    rows = ["Measured: the tensors each rank holds (a shard counts as its part). Collectives: "
            "the bytes rank 0 hands to each collective per step (its input; shm = dptrain's "
            "shared-memory all-reduce).", "",
            "| configuration | rank | params (MiB) | grads (MiB) | optimizer (MiB) | predicted "
            "total (MiB) | error | collectives per step (MiB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in configs:
        mem = c.summary.get("state_memory") if c.status == "ok" and c.summary else None
        if (not mem or c.strategy in ("dp", "pipeline") or c.role == "baseline"
                or not all("param_bytes" in m for m in mem)):
            continue
        strategy = "ddp" if c.strategy == "single" else c.strategy
        mine = shapes if c.model == model else memory.shapes(build_model(c.model))
        predicted = memory.predict(mine, strategy, len(mem), states=states)
        coll = c.summary.get("collective_bytes_per_step") or {}
        comm = ", ".join(f"{k} {_mib(v)}" for k, v in coll.items() if v) or "none"
        if c.summary.get("allreduce_bytes_per_step") and not coll.get("all_reduce"):
            comm = f"all_reduce (shm) {_mib(c.summary['allreduce_bytes_per_step'])}" + (
                f", {comm}" if comm != "none" else "")
        for r, (got, want) in enumerate(zip(mem, predicted, strict=True)):
            total = got["param_bytes"] + got["grad_bytes"] + got["optim_bytes"]
            err = abs(total - want["total"]) / want["total"] if want["total"] else 0.0
            rows.append(f"| {c.name} | {r} | {_mib(got['param_bytes'])} | "
                        f"{_mib(got['grad_bytes'])} | {_mib(got['optim_bytes'])} | "
                        f"{_mib(want['total'])} | {err:.1%} | {comm if r == 0 else ''} |")
    table = memory.table(shapes, states=states)
    rows += ["", "Predicted largest rank's model state (MiB) for N processes:", "",
             "| N | ddp (replicated) | zero (optimizer sharded) | fsdp (all sharded) |",
             "| --- | --- | --- | --- |"]
    rows += [f"| {t['n']} | {_mib(t['ddp'])} | {_mib(t['zero'])} | {_mib(t['fsdp'])} |"
             for t in table]
    rows.append("")
    for gib in device_gib:
        fits = {st: memory.fits_from(shapes, int(gib * 2**30), states=states, strategy=st)
                for st in ("ddp", "zero", "fsdp")}
        rows.append(f"- a {gib:g} GiB device holds this model's state "
                    + ", ".join(f"with {st} from N = {n}" if n else f"with {st} at no N <= 64"
                                for st, n in fits.items())
                    + " (parameters, gradients, optimizer state; activations come on top).")
    return rows


def write_report(out: Path, results: dict[str, Any], configs: list[Config]) -> str:
    """Write ``out/report.md`` and return its text."""
    m, o, comm, pred = (results["machine"], results["options"], results["comm"],
                        results["prediction"])
    loads = [r.get("other_load") for c in configs for r in c.repeats
             if r.get("other_load") is not None]
    gpus = ", ".join(m.get("gpu_names") or []) or "none"
    lines = [
        "# dptrain bench", "",
        f"`{m['command']}` — {m['date']}, {results['wall_time_s']:.0f} s in all.", "",
        f"Machine: {m['cpu_model']}, {m['cores']} usable cores, GPUs: {gpus}; torch "
        f"{m['torch_version']}, Python {m['python_version']}, numpy {m.get('numpy_version')}. "
        f"Load average at start {m.get('loadavg_at_start')}; other processes kept "
        + (f"{statistics.fmean(loads):.0%} of the CPU busy on average during the runs."
           if loads else "an unknown share of the CPU busy."), "",
        f"Model `{o['model']}`, dataset `{o['dataset']}`, batch {o['batch_size']} per process "
        f"(per GPU for dp), {o['warmup']} warm-up + {o['steps']} timed steps, "
        f"{o['repeats']} repeat(s) per configuration, each a fresh launch; threads per process: "
        f"{o['threads'] or 'CPU cores / processes'}; seed {o['seed']}.", "",
        *_load_warning(loads),
        "## Throughput", "",
        *throughput_rows(configs), "", *layout_note(configs),
        "Mean ± std over repeats. *step* is the training step as trained (all timed steps as "
        "a whole, device-synchronised at both ends; samples/s comes from it). The breakdown "
        "comes from per-step timings after it (medians): *data* = batch gather + normalise "
        "alone; *compute* = a step on prepared batches under `no_sync` (no communication); "
        "*exposed comm* = a step with gradient sync − compute (≥ 0), sync and no-sync steps "
        "alternating so that drift on a shared machine hits both alike (for dp it is not "
        "separable: DataParallel's scatter/replicate/gather run inside every step and count "
        "as compute). Efficiency = samples/s(N) / (N × samples/s of the same strategy at N = 1). "
        "All-reduces are counted through a DDP comm hook wrapped around the one that run "
        "uses (on one CPU node dptrain's shared-memory all-reduce, else the backend's, as DDP's "
        "built-in hook calls it). "
        "Memory: CUDA max allocated per GPU, or on CPU each process's peak RSS (interpreter, "
        "torch and the dataset included). Same seed ⇒ the same initial model and data order: "
        "configurations with the same global batch should show the same loss (BatchNorm "
        "statistics are per process, so a model with BatchNorm differs slightly).", "",
        "## Roofline: achieved FLOP/s against this machine's peak", "",
        *roofline_rows(results.get("roofline")), "",
        "## DP vs DDP, measured", "", *dp_vs_ddp(configs), "",
        "## Memory per rank: measured and predicted", "", *memory_rows(configs, o["model"]),
        "", *pipeline_rows(configs),
        "## What the device-resident pipeline buys", "", *baseline_rows(configs), "",
        f"## All-reduce sweep ({', '.join(sorted({_path(s) for s in comm['sweeps']}))})",
        "",
    ]
    if any(_path(s) == "shm" for s in comm["sweeps"]):
        lines += ["shm: dptrain's shared-memory all-reduce, the path DDP's gradients take between "
                  "the CPU processes of one node (`--cpu-allreduce`); gloo's TCP all-reduce is "
                  "what they take between nodes.", ""]
    if comm["sweeps"]:
        lines += [*sweep_table(comm["sweeps"]), "",
                  "busbw = algbw · 2(n−1)/n (nccl-tests); time is the median over iterations "
                  "of the slowest rank's time."]
    for s in comm["skipped"]:
        lines.append(f"- n={s['n']}: skipped: {s['reason']}")
    fit = comm.get("fit")
    lines += ["", "## Scaling prediction", ""]
    if fit:
        beta = f"{fit['beta_Bps'] / 1e9:.3f} GB/s" if fit["beta_Bps"] else "∞"
        lines.append(f"Fitted all-reduce cost on this machine: α = {fit['alpha_s'] * 1e6:.1f} µs "
                     f"per ring step, β = {beta}; the fit is within {fit['rel_rms']:.0%} (rms "
                     f"relative error) of its {fit['points']} measurements.")
    else:
        lines.append(f"No cost-model fit for this machine ({comm.get('fit_note')}); the "
                     "stated links are still predicted.")
    if "skipped" not in pred:
        lines += ["", f"Based on `{pred['based_on']}`: compute {pred['compute_1_s'] * 1e3:.2f} ms"
                  f" + data {pred['data_1_s'] * 1e3:.2f} ms per step, gradients "
                  f"{fmt_bytes(pred['grad_bytes'])} in {pred['buckets']} bucket(s) of ≤ "
                  f"{pred['bucket_cap_mb']:g} MiB. Assumptions:", "",
                  *[f"- {a}" for a in pred["assumptions"]]]
    lines += ["", *prediction_rows(pred), "", "### Prediction against measurement", "",
              *validation_rows(pred), "",
              "Error = (predicted − measured) / measured. *Predicted* = data + compute + the "
              "model's exposed all-reduce, with the compute and data time measured at that N "
              "(on a small CPU machine N processes share the cores, so compute per process "
              "grows with N; compute is the slowest rank's per step, since every all-reduce "
              "waits for it). *Measured, mean* is the training step of the throughput table "
              "(every step, spikes included); *measured, median* is the median step with "
              "gradient sync plus data: the model is built from medians, so the second error "
              "is the model's own, the first adds the machine's noise. *Without contention* "
              "uses the 1-process figures, as the stated-link predictions do. The measured "
              "exposed communication is a small difference of two noisy times; it also holds "
              "waiting for a slower rank.", "",
              "## Plots", ""]
    plots = results.get("plots")
    if isinstance(plots, dict) and plots.get("files"):
        lines += [f"![{Path(f).stem}]({f})" for f in plots["files"]]
    else:
        reason = plots.get("skipped") if isinstance(plots, dict) else "not requested (--no-plots)"
        lines.append(f"Plots skipped: {reason}.")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text
