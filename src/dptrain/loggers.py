"""Experiment loggers behind one small interface: ``--logger jsonl,csv,mlflow,tensorboard``.

The :class:`~dptrain.metrics.Reporter` (rank 0 only) drives every configured logger with the
same records; each logger is a few lines over its backend:

| name          | writes                                              | needs                    |
| ------------- | --------------------------------------------------- | ------------------------ |
| `jsonl`       | ``OUT/metrics.jsonl``, one whole line per record    | --                       |
| `csv`         | ``OUT/metrics.csv`` (Lightning's CSVLogger layout)  | --                       |
| `mlflow`      | ``OUT/mlruns`` (or ``$MLFLOW_TRACKING_URI``)        | ``dptrain[mlflow]``      |
| `tensorboard` | ``OUT/tb`` event files                              | ``dptrain[tensorboard]`` |

Every logger has ``log_params(config)`` (the resolved configuration as a flat dict),
``log_metrics(step, record)`` (the record ``metrics.jsonl`` gets: ``step``, ``epoch``,
``time`` and the values), ``log_summary(summary)``, ``log_artifact(path, folder)`` and
``close()``. Optional packages are imported only when their logger is asked for; a missing
one is a :class:`~dptrain.errors.UsageError` naming the extra to install, raised on every
rank before anything is written.

Resuming into the same ``--out`` continues what was there: ``metrics.jsonl`` and
``metrics.csv`` are appended to, and the MLflow run tagged with this ``--out`` is continued
(one run directory = one MLflow run), as Lightning's loggers do when given a run id.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import importlib.util
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from dptrain.errors import UsageError

NAMES = ("jsonl", "csv", "mlflow", "tensorboard")
# the module each optional backend imports, and the extra that installs it
_NEEDS = {"mlflow": ("mlflow", "mlflow"),
          "tensorboard": ("torch.utils.tensorboard", "tensorboard")}
_PROBE = {"mlflow": "mlflow", "tensorboard": "tensorboard"}  # found without importing


def parse(spec: str | list[str] | tuple[str, ...], tensorboard: bool = False) -> list[str]:
    """``"csv,mlflow"`` -> ``["jsonl", "csv", "mlflow"]`` (order kept, duplicates dropped).

    ``metrics.jsonl`` is always written: it is the run directory's record in the contract,
    and what ``dptrain plot`` and resumed runs read; ``--logger`` adds the others. The older
    ``--tensorboard`` flag adds ``tensorboard``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = ["jsonl"]
    for item in (x.strip() for x in items):
        if item and item not in names:
            if item not in NAMES:
                raise UsageError(f"--logger {item!r} is not a logger; use one or more of "
                                 f"{', '.join(NAMES)}, comma-separated")
            names.append(item)
    if tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def _missing(name: str) -> UsageError:
    return UsageError(f"--logger {name} needs the {_NEEDS[name][1]} package: "
                      f"pip install 'dptrain[{_NEEDS[name][1]}]'")


def check_available(names: list[str]) -> None:
    """Raise the missing-package error for an optional backend that cannot be found, without
    importing it (cheap enough for every rank, before any collective)."""
    for name in names:
        if name not in _PROBE:
            continue
        try:
            found = importlib.util.find_spec(_PROBE[name]) is not None
        except (ImportError, ValueError):  # a parent missing, or blocked in sys.modules
            found = False
        if not found:
            raise _missing(name)


def _import(name: str) -> Any:
    try:
        return importlib.import_module(_NEEDS[name][0])
    except ImportError:
        raise _missing(name) from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def scalars(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers (not booleans) among ``values``: what a metric store takes."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class Logger:
    """The interface; every method does nothing unless a backend overrides it."""

    name = ""

    def log_params(self, config: dict[str, Any]) -> None:
        pass

    def log_metrics(self, step: int, record: dict[str, Any]) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger(Logger):
    """``metrics.jsonl``: one JSON object per record (the contract's file)."""

    name = "jsonl"

    def __init__(self, out: Path) -> None:
        from dptrain.metrics import MetricsFile

        self.file = MetricsFile(out / "metrics.jsonl")

    def log_metrics(self, step: int, record: dict[str, Any]) -> None:
        self.file.append(json.dumps(record, allow_nan=True) + "\n")

    def close(self) -> None:
        self.file.close()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str | int | float | bool):
        return str(value)  # str(float) is repr: it reads back as the same float
    return json.dumps(value, allow_nan=True)


class CsvLogger(Logger):
    """``metrics.csv`` as Lightning's CSVLogger writes it: one row per record, a column per
    key, empty cells where a record has no value. When a record brings a new key, the file
    is rewritten with the union of the columns -- here atomically (a temporary file, then a
    rename), so a crash leaves either the old file or the new one. Rows are appended whole
    (as ``metrics.jsonl``'s lines are)."""

    name = "csv"
    FIRST = ("step", "epoch", "time")

    def __init__(self, out: Path) -> None:
        from dptrain.metrics import MetricsFile

        self.path = out / "metrics.csv"
        self.keys: list[str] = []
        self.file = MetricsFile(self.path)  # also cuts off a row a crash left half-written
        if os.fstat(self.file.fd).st_size:  # resumed: keep the columns already there
            with self.path.open(newline="") as fh:
                self.keys = next(csv.reader(fh), [])

    def _row(self, row: list[str]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(row)
        return buf.getvalue()

    def log_metrics(self, step: int, record: dict[str, Any]) -> None:
        new = [k for k in record if k not in self.keys]
        if new:
            self._rewrite([*self.keys, *new])
        self.file.append(self._row([_cell(record.get(k)) for k in self.keys]))

    def _rewrite(self, keys: list[str]) -> None:
        from dptrain.metrics import MetricsFile, write_text_atomic

        keys = [*(k for k in self.FIRST if k in keys), *(k for k in keys if k not in self.FIRST)]
        with self.path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        text = self._row(keys) + "".join(
            self._row([row.get(k) or "" for k in keys]) for row in rows)
        self.file.close()
        try:
            write_text_atomic(self.path, text)
        except OSError as exc:
            raise UsageError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        finally:
            self.file = MetricsFile(self.path)
        self.keys = keys

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger(Logger):
    """Event files under ``OUT/tb``: every finite number as a scalar. ``purge_after``: a run
    continuing from its step-``purge_after`` checkpoint; TensorBoard then hides the events an
    earlier process logged past that step (``SummaryWriter``'s ``purge_step``), which this
    run logs again."""

    name = "tensorboard"

    def __init__(self, out: Path, *, purge_after: int | None = None) -> None:
        purge = None if purge_after is None else purge_after + 1
        self.writer = _import("tensorboard").SummaryWriter(str(out / "tb"), purge_step=purge)

    def log_metrics(self, step: int, record: dict[str, Any]) -> None:
        values = {k: v for k, v in record.items() if k not in ("step", "epoch", "time")}
        for key, value in scalars(values).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class MlflowLogger(Logger):
    """One MLflow run per run directory, through ``MlflowClient`` (no global active run).

    The store is ``$MLFLOW_TRACKING_URI`` when set, else the local file store ``OUT/mlruns``
    (MLflow 3 refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE=true``, which is set for
    that store when the user has not set it). Params: the resolved configuration. Metrics:
    every record's numbers at its step (``epoch`` included). The summary: its numbers as
    ``summary.*`` metrics, everything else as ``summary.*`` tags. Artifacts: the final
    checkpoint, ``config.toml`` and ``summary.json``. The run ends FINISHED, KILLED (stopped
    by a signal, to be resumed) or FAILED (closed without a summary).

    A resume (``continue_from`` > 0) continues the directory's MLflow run. MLflow cannot
    delete a metric's points, so the steps an earlier process logged past the checkpoint are
    not logged again (an exact resume computes the same values; where the resume changed a
    setting they stay the earlier process's): every step is in the run once. A start from
    scratch in the directory (``continue_from`` 0) is a new MLflow run."""

    name = "mlflow"

    def __init__(self, out: Path, *, resumed: bool = False,
                 continue_from: int | None = None) -> None:
        self.mlflow = _import("mlflow")
        from mlflow.tracking import MlflowClient

        out = out.resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri, self.status = uri, "FAILED"
        try:
            self.client = MlflowClient(tracking_uri=uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "dptrain"
            experiment = self.client.get_experiment_by_name(name)
            exp_id = (experiment.experiment_id if experiment is not None
                      else self.client.create_experiment(name))
            run = self._previous(exp_id, out) if resumed and continue_from != 0 else None
            self.logged: dict[str, int] = {}  # key -> the last step the run already holds
            if run is None:
                run = self.client.create_run(exp_id, run_name=out.name,
                                             tags={"dptrain.out": str(out)})
            else:
                self.logged = self._last_steps(run)
                self.client.update_run(run.info.run_id, status="RUNNING")
            self.run_id = run.info.run_id
        except Exception as exc:  # noqa: BLE001 - a store's own errors (MlflowException,
            # a missing driver such as sqlalchemy, an unreachable server) are input errors here
            raise self._error("cannot open the MLflow run", exc) from None

    def _error(self, what: str, exc: Exception) -> UsageError:
        message = (str(getattr(exc, "message", exc)).strip().splitlines() or [type(exc).__name__])
        message = message[0].split(" See http")[0][:300]
        return UsageError(f"--logger mlflow: {what} at {self.uri}: {message}; fix "
                          "$MLFLOW_TRACKING_URI or drop mlflow from --logger")

    def _previous(self, exp_id: str, out: Path) -> Any:
        """The run an earlier process of this run directory opened (resume continues it)."""
        if "'" in str(out):
            return None
        found = self.client.search_runs([exp_id], f"tags.`dptrain.out` = '{out}'",
                                        order_by=["attributes.start_time DESC"], max_results=1)
        return found[0] if found else None

    def _last_steps(self, run: Any) -> dict[str, int]:
        """Per metric of ``run``, the highest step it holds."""
        return {key: max((m.step for m in self.client.get_metric_history(run.info.run_id, key)),
                         default=-1)
                for key in run.data.metrics}

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self.mlflow.exceptions.MlflowException as exc:
            raise self._error(f"cannot {what}", exc) from None

    def log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        had = self._call("read the run", self.client.get_run, self.run_id).data.params
        params, changed = [], []
        for key, value in flatten(config).items():
            text = _cell(value)[:6000]
            if key not in had:
                params.append(Param(key, text))
            elif had[key] != text:  # params are immutable: a resume that changed one
                changed.append(RunTag(f"resumed.{key}", text[:8000]))
        for i in range(0, max(len(params), 1), 100):  # log_batch takes 100 params at most
            self._call("log params", self.client.log_batch, self.run_id,
                       params=params[i:i + 100], tags=changed if i == 0 else [])

    def log_metrics(self, step: int, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        values = {k: v for k, v in record.items() if k not in ("step", "time")}
        stamp = int(record.get("time", time.time()) * 1000)
        metrics = [Metric(k, v, stamp, step) for k, v in scalars(values).items()
                   if step > self.logged.get(k, -1)]  # held already: an earlier process's
        if metrics:
            self._call("log metrics", self.client.log_batch, self.run_id, metrics=metrics)

    def log_summary(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        flat = flatten(summary)
        numbers = scalars(flat)
        stamp, step = int(time.time() * 1000), int(summary.get("steps") or 0)
        metrics = [Metric(f"summary.{k}", v, stamp, step) for k, v in numbers.items()]
        tags = [RunTag(f"summary.{k}", _cell(v)[:8000]) for k, v in flat.items()
                if k not in numbers]
        for i in range(0, max(len(metrics), len(tags)), 100):
            self._call("log the summary", self.client.log_batch, self.run_id,
                       metrics=metrics[i:i + 100], tags=tags[i:i + 100])
        self.status = "KILLED" if summary.get("stopped_by_signal") else "FINISHED"

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._call(f"store {path}", self.client.log_artifact, self.run_id, str(path), folder)

    def close(self) -> None:
        # closing: the data is already stored; a failure here must not mask the run's outcome
        with contextlib.suppress(self.mlflow.exceptions.MlflowException):
            self.client.set_terminated(self.run_id, self.status)


def _purge_after(out: Path, step: int) -> None:
    """Drop the records past ``step`` from ``metrics.jsonl`` and ``metrics.csv`` (each
    rewritten atomically): a run continuing from its step-``step`` checkpoint (0: from
    scratch) logs those steps again, and the file must not hold them twice, or hold a dead
    run's steps before a new one's."""
    from dptrain.metrics import write_text_atomic

    jsonl = out / "metrics.jsonl"
    if jsonl.is_file():
        kept = []
        for line in jsonl.read_text().splitlines(keepends=True):
            try:
                at = json.loads(line).get("step", 0)
            except (ValueError, AttributeError):
                continue  # a fragment a crash left (MetricsFile cuts it too)
            if isinstance(at, int | float) and at <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        write_text_atomic(jsonl, "".join(kept))
    table = out / "metrics.csv"
    if table.is_file():
        with table.open(newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            rows = list(reader)
        at = header.index("step") if "step" in header else None
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        if header:
            writer.writerow(header)
        for row in rows:
            try:
                if at is not None and float(row[at]) <= step:
                    writer.writerow(row)
            except (ValueError, IndexError):
                continue
        write_text_atomic(table, buf.getvalue())


def open_loggers(names: list[str], out: Path, *, resumed: bool,
                 purge_after: int | None = None) -> list[Logger]:
    """The loggers for ``names``, opened on ``out`` (which exists). A failure closes the ones
    already opened. ``purge_after``: the step this run continues from in a directory that
    holds an earlier run's records (0: from scratch); the records past it are dropped from the
    files (:func:`_purge_after`, once the stores that can refuse have opened), hidden in
    TensorBoard, and not logged again to MLflow."""
    opened: list[Logger] = []
    # the stores that can refuse (a server, a URI) before the run's own files
    order = sorted(names, key=lambda n: n in ("jsonl", "csv"))
    purge_files = purge_after is not None
    try:
        for name in order:
            if name in ("jsonl", "csv") and purge_files:
                _purge_after(out, purge_after)
                purge_files = False
            if name == "jsonl":
                opened.append(JsonlLogger(out))
            elif name == "csv":
                opened.append(CsvLogger(out))
            elif name == "tensorboard":
                opened.append(TensorBoardLogger(out, purge_after=purge_after))
            elif name == "mlflow":
                opened.append(MlflowLogger(out, resumed=resumed, continue_from=purge_after))
    except BaseException:
        for logger in opened:
            logger.close()
        raise
    return opened


def preload(names: list[str]) -> None:
    """Import the optional backends now (a missing one fails before anything is written)."""
    for name in names:
        if name in _NEEDS:
            _import(name)
