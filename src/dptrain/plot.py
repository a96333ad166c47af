"""``dptrain plot``: training curves of one or more runs in one figure.

Reads each run's ``metrics.jsonl`` and draws one subplot per metric (default: train ``loss`` and
``test_accuracy``) against the optimizer step, one line per run. The legend names each run by
its directory, plus strategy and world size from ``summary.json`` when the run wrote one.

matplotlib is an optional dependency (``pip install 'dptrain[plot]'``). It is imported only
after every input has been read and checked, so bad input is reported the same way with or
without it, and it is drawn with the Agg canvas directly: no pyplot, no display, no global
backend switch.

Examples::

    dptrain plot runs/ddp4                          # writes runs/ddp4/curves.png
    dptrain plot runs/single runs/ddp4 --out cmp.png
    dptrain plot runs/ddp4 --metric loss,lr,samples_per_s
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dptrain.errors import UsageError

DEFAULT_METRICS = ("loss", "test_accuracy")
TITLES = {
    "loss": "train loss",
    "test_accuracy": "test accuracy",
    "test_loss": "test loss",
    "lr": "learning rate",
    "samples_per_s": "throughput (samples/s)",
}
LINESTYLES = ("-", "--", ":", "-.")
LOG_SCALE = frozenset({"loss", "test_loss"})
# keys every record carries that are coordinates or bookkeeping, not metrics
NOT_METRICS = frozenset({"step", "epoch", "time"})
INSTALL_HINT = "plot needs matplotlib: pip install 'dptrain[plot]'"


@dataclass
class RunCurves:
    """The numeric series of one run, keyed by metric name.

    Attributes:
        run_dir: The run directory as given.
        label: Legend text.
        series: ``metric -> (steps, values)``, sorted by step.
    """

    run_dir: Path
    label: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``dptrain plot`` on the top-level subparsers."""
    p = sub.add_parser(
        "plot",
        help="plot loss and test accuracy curves of one or more runs",
        description="Draw training curves (one subplot per metric, x = optimizer step) of one "
        "or more run directories into one PNG. Needs matplotlib: "
        "pip install 'dptrain[plot]'.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (--out DIR)")
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE.png",
        help="image to write (default: RUN_DIR/curves.png for one run, else ./curves.png)",
    )
    p.add_argument(
        "--metric",
        default=None,
        metavar="NAMES",
        help=f"comma-separated metrics, one subplot each (default: {','.join(DEFAULT_METRICS)})",
    )
    p.set_defaults(func=cmd_plot)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _resumed_after_cut(line: str) -> dict[str, Any] | None:
    """``{"step": 5, "lo{"step": 6, ...}``: a record cut off mid-write, then a whole one that
    a resumed run appended. Returns the whole one, or ``None`` if the line is not that."""
    if not line.startswith("{"):
        return None
    decoder = json.JSONDecoder()
    start = line.find('{"', 1)
    while start > 0:
        try:
            record, end = decoder.raw_decode(line, start)
        except json.JSONDecodeError:
            record, end = None, -1
        if isinstance(record, dict) and "step" in record and end == len(line.rstrip()):
            return record
        start = line.find('{"', start + 1)
    return None


def read_metrics(run_dir: Path, warn: Callable[[str], Any] = _warn) -> list[dict[str, Any]]:
    """Read and check ``RUN_DIR/metrics.jsonl``.

    A record cut off mid-write (a run killed or out of disk while logging) is skipped with a
    warning: as the last line of the file (it has no end of line), or followed on its line by
    what a resumed run appended. Any other damage is an error; the file is never changed.

    Args:
        run_dir: A run directory written by ``dptrain train``.
        warn: Called with each warning (default: ``warning: ...`` on stderr).

    Returns:
        The records in file order.

    Raises:
        UsageError: The directory or file is missing, the file is empty, or a line is not a
            JSON object with an integer ``step`` (the message names the file and line).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(
            f"run directory {run_dir} does not exist; pass a directory written by "
            "`dptrain train --out DIR`"
        )
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(
            f"{path} not found: {run_dir} is not a dptrain run directory (or the "
            "run logged nothing yet)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path} ({exc}); check the file") from None
    records = []
    lines = text.splitlines()
    for lineno, line in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            raise UsageError(
                f"{where}: empty line; metrics.jsonl holds one JSON object per "
                "line: delete the line"
            )
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            last = lineno == len(lines) and not text.endswith("\n")
            if last and line.lstrip().startswith("{"):
                # the run was cut off mid-write (killed, disk full): the line never ended
                warn(f"{where}: skipped a record cut off mid-write (no end of line)")
                continue
            tail = _resumed_after_cut(line)
            if tail is not None:
                # a cut-off record, then the records a resume appended on the same line
                warn(f"{where}: skipped the start of a record cut off mid-write (a resumed "
                     "run appended after it)")
                record = tail
            else:
                raise UsageError(
                    f"{where}: not valid JSON ({exc.msg}); the file is damaged: delete or "
                    "fix that line"
                ) from None
        if not isinstance(record, dict):
            raise UsageError(
                f"{where}: expected a JSON object, got {type(record).__name__}; "
                "delete or fix that line"
            )
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise UsageError(f"{where}: no integer 'step' (got {step!r}); delete or fix that line")
        records.append(record)
    if not records and lines:
        raise UsageError(
            f"{path} holds only a record cut off mid-write: the run logged no complete "
            "metrics yet (train longer or lower --log-every)"
        )
    if not records:
        raise UsageError(
            f"{path} is empty: the run logged no metrics (train longer or lower --log-every)"
        )
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def series(records: list[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric, in step order.

    A resumed run appends to ``metrics.jsonl`` and replays the steps after its checkpoint, so
    a step can appear more than once: the last record for a step wins, as it is the history
    the final model actually has.

    Args:
        records: As returned by :func:`read_metrics`.
        metric: Key to extract; records without a numeric value for it are skipped.

    Returns:
        ``(steps, values)``, sorted by step.
    """
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(metric)
        if _is_number(value):
            by_step[record["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def metric_names(records: list[dict[str, Any]]) -> set[str]:
    """Every key with a numeric value in at least one record (``step``/``epoch``/``time``
    excluded)."""
    return {k for r in records for k, v in r.items() if k not in NOT_METRICS and _is_number(v)}


def run_label(run_dir: Path) -> str:
    """Legend text: the directory name, plus ``strategy x world_size`` from ``summary.json``.

    A missing or unreadable ``summary.json`` (an unfinished run) only shortens the label.
    """
    run_dir = Path(run_dir)
    name = run_dir.resolve().name or str(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return name
    if not isinstance(summary, dict):
        return name
    strategy, world = summary.get("strategy"), summary.get("world_size")
    if strategy and world:
        return f"{name} ({strategy} x {world})"
    if strategy:
        return f"{name} ({strategy})"
    return name


def parse_metrics(spec: str | None) -> tuple[list[str], bool]:
    """``"loss,test_accuracy"`` -> names; the flag says whether the user chose them."""
    if spec is None:
        return list(DEFAULT_METRICS), False
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise UsageError(f"--metric {spec!r} names no metric; e.g. --metric loss,test_accuracy")
    return list(dict.fromkeys(names)), True


def load_runs(
    run_dirs: list[Path], metrics: list[str], explicit: bool = True
) -> tuple[list[RunCurves], list[str]]:
    """Read every run and pick the metrics to draw.

    Args:
        run_dirs: Run directories.
        metrics: Requested metric names.
        explicit: Whether the user asked for ``metrics``; then a metric no run logged is an
            error. Otherwise (the defaults) it is dropped, e.g. a run without evaluation.

    Returns:
        The runs' curves and the metrics that have data, in the requested order.

    Raises:
        UsageError: Bad input (see :func:`read_metrics`) or nothing to draw.
    """
    runs, available = [], set()
    for run_dir in run_dirs:
        records = read_metrics(Path(run_dir))
        available |= metric_names(records)
        curves = RunCurves(Path(run_dir), run_label(Path(run_dir)))
        for metric in metrics:
            steps, values = series(records, metric)
            if steps:
                curves.series[metric] = (steps, values)
        runs.append(curves)
    _dedupe_labels(runs)
    drawn = [m for m in metrics if any(m in r.series for r in runs)]
    missing = [m for m in metrics if m not in drawn]
    known = ", ".join(sorted(available)) or "none"
    if missing and (explicit or not drawn):
        raise UsageError(f"no run logged {', '.join(missing)}; metrics present: {known}")
    return runs, drawn


def _dedupe_labels(runs: list[RunCurves]) -> None:
    """Two runs named alike (``a/run``, ``b/run``) get their paths as labels instead."""
    names = [r.run_dir.resolve().name for r in runs]
    for r in runs:
        if names.count(r.run_dir.resolve().name) > 1:
            r.label = r.label.replace(r.run_dir.resolve().name, str(r.run_dir), 1)


def _import_matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return Figure, FigureCanvasAgg


def draw(runs: list[RunCurves], metrics: list[str], out: Path) -> Path:
    """Draw one subplot per metric (x = step, one line per run) and save it to ``out``.

    Args:
        runs: From :func:`load_runs`.
        metrics: Metrics with data, one subplot each.
        out: Image path; the format follows its suffix (``.png``, ``.pdf``, ``.svg``, ...).

    Returns:
        The path written.

    Raises:
        UsageError: matplotlib is missing, or ``out`` cannot be written.
    """
    Figure, FigureCanvasAgg = _import_matplotlib()
    fig = Figure(figsize=(5.5 * len(metrics), 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: renders without a display or pyplot
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for i, run in enumerate(runs):
            if metric not in run.series:
                continue
            steps, values = run.series[metric]
            # evaluation happens once per epoch: few points, so mark them
            marker = "o" if len(steps) <= 30 else None
            ax.plot(
                steps,
                values,
                label=run.label,
                color=f"C{i}",
                # runs that should agree (1 process vs DDP) overlap exactly: dashes keep both seen
                linestyle=LINESTYLES[i % len(LINESTYLES)],
                marker=marker,
                markersize=4,
                linewidth=1.4,
            )
        ax.set_title(TITLES.get(metric, metric))
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        values = [v for r in runs for v in r.series.get(metric, ([], []))[1]]
        if metric in LOG_SCALE and all(v > 0 and math.isfinite(v) for v in values):
            # losses span decades early on; a log axis keeps the end of training readable
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name such as {out}/curves.png")
    if not out.suffix:  # as savefig does (it appends the default format): say the real name
        out = out.with_name(out.name + ".png")
    kinds = fig.canvas.get_supported_filetypes()
    if out.suffix[1:].lower() not in kinds:
        raise UsageError(f"--out {out}: {out.suffix} is not an image format matplotlib writes; "
                         "use a .png, .pdf or .svg name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as exc:
        raise UsageError(
            f"cannot write {out} ({exc.strerror or exc}); choose another --out"
        ) from None
    return out


def default_out(run_dirs: list[Path]) -> Path:
    """``RUN_DIR/curves.png`` for one run, else ``./curves.png``."""
    return Path(run_dirs[0]) / "curves.png" if len(run_dirs) == 1 else Path("curves.png")


def cmd_plot(args: argparse.Namespace) -> int:
    """Handler of ``dptrain plot``: read, check, draw, print the path written."""
    run_dirs = [Path(d) for d in args.run_dirs]
    metrics, explicit = parse_metrics(args.metric)
    runs, drawn = load_runs(run_dirs, metrics, explicit=explicit)
    for metric in metrics:
        if metric not in drawn:
            print(f"note: no run logged {metric}; plotting {', '.join(drawn)}")
    out = draw(runs, drawn, Path(args.out) if args.out else default_out(run_dirs))
    print(f"wrote {out}")
    return 0
