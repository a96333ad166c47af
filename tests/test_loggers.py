"""``--logger``: jsonl, csv, mlflow (the real package, read back with MlflowClient), tensorboard.

The end-to-end runs train in this process (``cli.main``), like ``dptrain train`` does."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import tomllib
from pathlib import Path

import pytest

from dptrain import cli, loggers
from dptrain.errors import UsageError
from dptrain.metrics import Reporter

TINY = ["--dataset", "synthetic", "--max-steps", "20", "--log-every", "5", "--seed", "3",
        "--quiet"]


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _csv(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (out / "metrics.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _mlflow_run(out: Path):  # noqa: ANN202 - mlflow types
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("dptrain")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "one run directory is one MLflow run"
    return client, runs[0]


@pytest.fixture
def mlflow_env(monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    # dptrain sets it for its own file store; monkeypatch removes it again afterwards
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mlflow_run_reads_back_params_metrics_summary_and_checkpoint(tmp_path, mlflow_env):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--data-root", str(tmp_path / "data"), "--out", str(out),
                     "--logger", "jsonl,mlflow,csv"]) == 0
    client, run = _mlflow_run(out)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    # params: the resolved configuration, every key with its value
    config = loggers.flatten(tomllib.loads((out / "config.toml").read_text()))
    assert run.data.params == {k: loggers._cell(v) for k, v in config.items()}
    assert run.data.params["max_steps"] == "20" and run.data.params["seed"] == "3"
    # metrics: every logged step and value of metrics.jsonl
    records = _jsonl(out)
    for key in ("loss", "lr", "test_accuracy", "test_loss"):
        expected = [(r["step"], r[key]) for r in records if key in r]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                              key))
        assert history == expected and expected, key
    assert [s for s, _ in sorted((m.step, m.value) for m in
                                 client.get_metric_history(run.info.run_id, "loss"))] == \
        [5, 10, 15, 20]
    # the summary: numbers as metrics, the rest as tags
    summary = json.loads((out / "summary.json").read_text())
    assert run.data.metrics["summary.test_accuracy"] == summary["test_accuracy"]
    assert run.data.metrics["summary.steps"] == 20
    assert run.data.tags["summary.strategy"] == summary["strategy"] == "single"
    # artifacts: the final checkpoint (the same bytes), config.toml, summary.json
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "config.toml", "summary.json"} <= names
    local = Path(client.download_artifacts(run.info.run_id, "checkpoints/last.pt",
                                           str(tmp_path / "dl")))
    assert _sha(local) == _sha(out / "checkpoints" / "last.pt")


def test_csv_reads_back_as_the_jsonl_values(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--data-root", str(tmp_path / "data"), "--out", str(out),
                     "--logger", "csv"]) == 0
    header, rows = _csv(out)
    records = _jsonl(out)  # jsonl is always written
    assert header[:3] == ["step", "epoch", "time"]
    assert set(header) == set().union(*records)  # the union of every record's keys
    assert len(rows) == len(records) == 5  # 4 training windows and the final evaluation
    for row, record in zip(rows, records, strict=True):
        for key in header:
            if key not in record:
                assert row[key] == "", key
            else:
                assert type(record[key])(row[key]) == record[key], key


def test_csv_header_grows_by_an_atomic_rewrite_and_resumes(tmp_path, monkeypatch):
    log = loggers.CsvLogger(tmp_path)
    log.log_metrics(1, {"step": 1, "epoch": 0, "time": 1.5, "loss": 0.25})
    log.log_metrics(2, {"step": 2, "epoch": 0, "time": 2.5, "loss": 0.125})
    before = (tmp_path / "metrics.csv").read_text()
    assert before == "step,epoch,time,loss\n1,0,1.5,0.25\n2,0,2.5,0.125\n"
    # a failed rewrite (a full disk) leaves the file as it was, and says so
    import dptrain.metrics as m

    def full(path: Path, text: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(m, "write_text_atomic", full)
    with pytest.raises(UsageError, match="No space left"):
        log.log_metrics(3, {"step": 3, "epoch": 0, "time": 3.5, "test_accuracy": 0.5})
    assert (tmp_path / "metrics.csv").read_text() == before
    monkeypatch.undo()
    log.log_metrics(3, {"step": 3, "epoch": 1, "time": 3.5, "test_accuracy": 0.5})
    log.close()
    assert (tmp_path / "metrics.csv").read_text() == (
        "step,epoch,time,loss,test_accuracy\n1,0,1.5,0.25,\n2,0,2.5,0.125,\n3,1,3.5,,0.5\n")
    # a resumed run (a second process) appends under the columns already there
    with (tmp_path / "metrics.csv").open("a") as fh:
        fh.write("4,1,4.5,0.1")  # a row cut off by a crash: dropped
    again = loggers.CsvLogger(tmp_path)
    again.log_metrics(4, {"step": 4, "epoch": 1, "time": 4.5, "loss": 0.0625})
    again.close()
    header, rows = _csv(tmp_path)
    assert header == ["step", "epoch", "time", "loss", "test_accuracy"]
    assert [(r["step"], r["loss"], r["test_accuracy"]) for r in rows] == [
        ("1", "0.25", ""), ("2", "0.125", ""), ("3", "", "0.5"), ("4", "0.0625", "")]


def test_missing_mlflow_is_one_error_line_and_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    out = tmp_path / "run"
    code = cli.main(["train", *TINY, "--data-root", str(tmp_path / "data"), "--out", str(out),
                     "--logger", "jsonl,mlflow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: --logger mlflow needs the mlflow package: "
                   "pip install 'dptrain[mlflow]'"]
    # nothing of a run: at most the claimed --out with its lock file
    assert not out.exists()  # refused by the plan, before --out is claimed


def test_missing_tensorboard_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UsageError, match=r"pip install 'dptrain\[tensorboard\]'"):
        Reporter(Path("unused"), active=False, tensorboard=True)


def test_bad_logger_value_is_a_config_error(tmp_path, capsys):
    code = cli.main(["train", *TINY, "--out", str(tmp_path / "run"), "--logger", "jsonl,wandb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --logger")
    assert "mlflow" in err[0] and not (tmp_path / "run").exists()


def test_parse_keeps_jsonl_and_the_tensorboard_alias():
    assert loggers.parse("mlflow,csv") == ["jsonl", "mlflow", "csv"]
    assert loggers.parse("jsonl, csv,csv") == ["jsonl", "csv"]
    assert loggers.parse("jsonl", tensorboard=True) == ["jsonl", "tensorboard"]
    assert loggers.parse("tensorboard", tensorboard=True) == ["jsonl", "tensorboard"]
    with pytest.raises(UsageError, match="not a logger"):
        loggers.parse("jsonl,wandb")


def test_reporter_writes_nothing_before_start(tmp_path):
    out = tmp_path / "run"
    rep = Reporter(out, active=True, loggers="jsonl,csv")
    rep.metrics(1, 0, loss=1.0)  # before start: dropped, nothing created
    rep.summary({"steps": 0})
    assert not out.exists()
    rep.start('seed = 1\nlr = 0.5\n')
    rep.metrics(2, 0, loss=0.5, name="x", nested={"a": 1})
    rep.close()
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "metrics.csv",
                                                     "metrics.jsonl"]
    [record] = _jsonl(out)
    _, [row] = _csv(out)
    assert (record["loss"], row["loss"], row["name"], json.loads(row["nested"])) == (
        0.5, "0.5", "x", {"a": 1})


def test_resume_continues_the_same_mlflow_run(tmp_path, mlflow_env):
    out, data = tmp_path / "run", str(tmp_path / "data")
    base = ["train", "--dataset", "synthetic", "--log-every", "5", "--seed", "3", "--quiet",
            "--data-root", data, "--out", str(out), "--logger", "mlflow"]
    assert cli.main([*base, "--max-steps", "10"]) == 0
    assert cli.main([*base, "--max-steps", "20", "--resume", "auto"]) == 0
    client, run = _mlflow_run(out)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                          "loss"))
    records = _jsonl(out)
    assert history == sorted((r["step"], r["loss"]) for r in records if "loss" in r)
    assert [s for s, _ in history] == [5, 10, 15, 20]
    assert run.info.status == "FINISHED"
    # params are immutable in MLflow: the value the resumed run changed is kept as a tag
    assert run.data.params["max_steps"] == "10" and run.data.tags["resumed.max_steps"] == "20"


def test_a_store_mlflow_cannot_open_is_one_error_line_before_any_file(tmp_path, mlflow_env,
                                                                       monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://host/path")
    out = tmp_path / "run"
    code = cli.main(["train", *TINY, "--data-root", str(tmp_path / "data"), "--out", str(out),
                     "--logger", "mlflow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --logger mlflow: cannot open the MLflow run at "
                             "nosuchscheme://host/path: ")
    assert not out.exists()  # refused before the run wrote anything: no empty --out left


def _killed_at_20_resumed_from_16_to_24(out: Path, loggers: str) -> list[str]:
    """A linear run logging every 2 steps, killed after step 20 with its last checkpoint at
    16, then resumed to 24. Returns the arguments common to both runs."""
    from tests.conftest import train_inproc

    base = ["--dataset", "synthetic", "--model", "linear", "--log-every", "2", "--ckpt-every",
            "8", "--logger", loggers]
    train_inproc(out, *base, "--max-steps", "20")
    for name in ("last.pt", "step-00000020.pt"):  # as if killed before its step-20 save
        (out / "checkpoints" / name).unlink()
    train_inproc(out, *base, "--max-steps", "24", "--resume", "auto")
    return base


def test_a_resume_drops_the_records_past_its_checkpoint_so_no_step_is_logged_twice(tmp_path):
    """Killed after step 20 with its last checkpoint at 16: the continuation logs 17-24, and
    metrics.jsonl / metrics.csv held 17-20 twice (plot took the last; other readers both).
    A start from scratch in the directory drops the dead run's records altogether."""
    import csv as csvlib

    from tests.conftest import train_inproc

    out = tmp_path / "k"
    base = _killed_at_20_resumed_from_16_to_24(out, "jsonl,csv")

    def loss_steps() -> tuple[list[int], list[int]]:
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        with (out / "metrics.csv").open(newline="") as fh:
            rows = [r for r in csvlib.DictReader(fh) if r["loss"]]
        return [r["step"] for r in lines if "loss" in r], [int(r["step"]) for r in rows]

    assert loss_steps() == (list(range(2, 25, 2)), list(range(2, 25, 2)))
    for p in (out / "checkpoints").iterdir():  # nothing to resume from: a fresh start
        p.unlink()
    train_inproc(out, *base, "--max-steps", "4", "--resume", "auto")
    assert loss_steps() == ([2, 4], [2, 4])


def test_a_resume_logs_each_step_once_to_tensorboard_and_mlflow(tmp_path, mlflow_env):
    """Killed after step 20 with its last checkpoint at 16: TensorBoard hides the dead
    process's events past 16 (purge_step) and MLflow, which cannot delete points, is not sent
    17-20 again; the values it holds are the continuation's (an exact resume). A start from
    scratch in the directory is a new MLflow run."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import train_inproc

    out = tmp_path / "k"
    base = _killed_at_20_resumed_from_16_to_24(out, "jsonl,tensorboard,mlflow")
    logged = {r["step"]: r["loss"] for r in _jsonl(out) if "loss" in r}
    assert sorted(logged) == list(range(2, 25, 2))

    def same(points: list[tuple[int, float]]) -> bool:  # TensorBoard keeps float32
        return ([s for s, _ in points] == sorted(logged)
                and [v for _, v in points] == pytest.approx([logged[s] for s in sorted(logged)]))

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert same([(e.step, e.value) for e in acc.Scalars("loss")])
    client, run = _mlflow_run(out)
    assert same(sorted((m.step, m.value)
                       for m in client.get_metric_history(run.info.run_id, "loss")))
    assert run.info.status == "FINISHED"

    for p in (out / "checkpoints").iterdir():  # nothing to resume from: a fresh start
        p.unlink()
    train_inproc(out, *base, "--max-steps", "4", "--resume", "auto")
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 4]
    exp = client.get_experiment_by_name("dptrain")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 2
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [2, 4]
