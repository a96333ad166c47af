"""``dptrain plot``: reading metrics.jsonl, errors for bad input, and the PNG it writes."""

from __future__ import annotations

import argparse
import builtins
import json
import struct
from pathlib import Path

import pytest

from dptrain import plot
from dptrain.cli import Parser
from dptrain.errors import UsageError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, records: list[dict], summary: dict | None = None) -> Path:
    """A run directory as ``dptrain train`` leaves it: metrics.jsonl (+ summary.json)."""
    run_dir.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def training_records(steps: int = 40, epochs: int = 2, scale: float = 1.0) -> list[dict]:
    """Train steps with loss/lr/throughput and one evaluation per epoch."""
    per_epoch = steps // epochs
    out: list[dict] = []
    for step in range(1, steps + 1):
        epoch = (step - 1) // per_epoch
        out.append(
            {
                "step": step,
                "epoch": epoch,
                "time": 1.0 + step,
                "loss": scale * 2.3 / step,
                "lr": 0.1,
                "samples_per_s": 1000.0,
            }
        )
        if step % per_epoch == 0:
            out.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "test_accuracy": 0.8 + 0.05 * epoch,
                    "test_loss": 0.5 / (epoch + 1),
                    "test_samples": 10000,
                }
            )
    return out


def namespace(
    *run_dirs: Path, out: Path | None = None, metric: str | None = None
) -> argparse.Namespace:
    return argparse.Namespace(
        run_dirs=[str(d) for d in run_dirs], out=str(out) if out else None, metric=metric
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])  # IHDR width, height


# ---------------------------------------------------------------------------- reading
def test_series_sorted_and_last_record_per_step_wins(tmp_path):
    # a resumed run replays steps 3-4 after its checkpoint: the replay is what counts
    records = [
        {"step": 1, "epoch": 0, "loss": 4.0},
        {"step": 2, "epoch": 0, "loss": 3.0},
        {"step": 3, "epoch": 0, "loss": 9.0},
        {"step": 4, "epoch": 0, "loss": 9.0},
        {"step": 3, "epoch": 0, "loss": 2.0},
        {"step": 4, "epoch": 0, "loss": 1.0},
        {"step": 4, "epoch": 0, "test_accuracy": 0.5},
    ]
    run = write_run(tmp_path / "r", records)
    got = plot.read_metrics(run)
    assert len(got) == 7
    assert plot.series(got, "loss") == ([1, 2, 3, 4], [4.0, 3.0, 2.0, 1.0])
    assert plot.series(got, "test_accuracy") == ([4], [0.5])
    assert plot.metric_names(got) == {"loss", "test_accuracy"}


def test_labels_use_summary_and_disambiguate_same_names(tmp_path):
    a = write_run(tmp_path / "a" / "run", training_records(), {"strategy": "ddp", "world_size": 4})
    b = write_run(tmp_path / "b" / "run", training_records())
    runs, drawn = plot.load_runs([a, b], list(plot.DEFAULT_METRICS), explicit=False)
    assert drawn == ["loss", "test_accuracy"]
    assert runs[0].label == f"{a} (ddp x 4)"
    assert runs[1].label == str(b)
    assert plot.run_label(a) == "run (ddp x 4)"
    steps, acc = runs[0].series["test_accuracy"]
    assert steps == [20, 40] and acc == pytest.approx([0.8, 0.85])


def test_default_metric_missing_everywhere_is_dropped_but_explicit_one_is_an_error(tmp_path):
    run = write_run(
        tmp_path / "noeval", [{"step": s, "epoch": 0, "loss": 1.0 / s} for s in range(1, 5)]
    )
    _, drawn = plot.load_runs([run], list(plot.DEFAULT_METRICS), explicit=False)
    assert drawn == ["loss"]
    with pytest.raises(UsageError, match=r"no run logged acc; metrics present: loss"):
        plot.load_runs([run], ["loss", "acc"], explicit=True)
    with pytest.raises(UsageError, match="names no metric"):
        plot.parse_metrics(" , ")
    assert plot.parse_metrics("loss, lr,loss") == (["loss", "lr"], True)


# ---------------------------------------------------------------------------- errors (no matplotlib)
def test_missing_run_dir(tmp_path):
    with pytest.raises(UsageError, match=r"run directory .*nope does not exist"):
        plot.cmd_plot(namespace(tmp_path / "nope"))


def test_dir_without_metrics(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"metrics\.jsonl not found"):
        plot.cmd_plot(namespace(tmp_path / "empty"))


def test_malformed_line_reports_file_and_line_number(tmp_path):
    run = write_run(tmp_path / "r", training_records(4, 1))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "epoch": 0, "loss": 0.3\n')  # a whole line, but not JSON
        f.write('{"step": 6, "epoch": 0, "loss": 0.2}\n')
    n_lines = len((run / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(UsageError, match=rf"metrics\.jsonl:{n_lines - 1}: not valid JSON"):
        plot.cmd_plot(namespace(run))
    assert not (run / "curves.png").exists()


def test_record_cut_off_mid_write_is_skipped_with_a_warning(tmp_path, capsys):
    run = write_run(tmp_path / "r", training_records(4, 1))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "epoch": 0, "loss": 0.3')  # cut off mid-write: no end of line
    before = (run / "metrics.jsonl").read_bytes()
    warnings: list[str] = []
    records = plot.read_metrics(run, warn=warnings.append)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4]
    n_lines = len(before.decode().splitlines())
    assert warnings == [f"{run / 'metrics.jsonl'}:{n_lines}: skipped a record cut off mid-write "
                        "(no end of line)"]
    plot.cmd_plot(namespace(run))
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "error:" not in err
    assert png_size(run / "curves.png")[0] > 0
    assert (run / "metrics.jsonl").read_bytes() == before  # never repaired behind the user's back


def test_resume_appended_onto_a_cut_off_record(tmp_path):
    run = write_run(tmp_path / "r", training_records(4, 1))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "epoch": 0, "lo')  # cut off; then a resume appends
        f.write('{"step": 5, "epoch": 0, "loss": 0.25}\n{"step": 6, "epoch": 0, "loss": 0.2}\n')
    warnings: list[str] = []
    steps, values = plot.series(plot.read_metrics(run, warn=warnings.append), "loss")
    assert steps == [1, 2, 3, 4, 5, 6] and values[-2:] == [0.25, 0.2]
    assert len(warnings) == 1 and "a resumed run appended after it" in warnings[0]


@pytest.mark.parametrize("content, message", [
    ('{"step": 1, "loss": 1}\n{"step": 2, "lo\n{"step": 3, "loss": 1}\n',
     r"metrics\.jsonl:2: not valid JSON"),  # cut off, but the line ended: damage, not a cut
    ('{"step": 1, "loss": 1}\n{"step": 2, "x": {"a": 1}\n{"step": 3, "loss": 1}\n',
     r"metrics\.jsonl:2: not valid JSON"),
    ('{"step": 1, "loss": 1}\ngarbage', r"metrics\.jsonl:2: not valid JSON"),
    ('{"step": 1, "lo', r"holds only a record cut off mid-write"),
])
def test_garbage_is_still_refused(tmp_path, content, message):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    with pytest.raises(UsageError, match=message):
        plot.read_metrics(run, warn=lambda m: None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"metrics\.jsonl is empty"),
        ('{"step": 1, "loss": 1}\n\n{"step": 2, "loss": 1}\n', r"metrics\.jsonl:2: empty line"),
        ('{"step": 1}\n[1, 2]\n', r"metrics\.jsonl:2: expected a JSON object, got list"),
        ('{"epoch": 0, "loss": 1.0}\n', r"metrics\.jsonl:1: no integer 'step'"),
        ('{"step": "3", "loss": 1.0}\n', r"metrics\.jsonl:1: no integer 'step'"),
    ],
)
def test_bad_metrics_files(tmp_path, content, message):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    with pytest.raises(UsageError, match=message):
        plot.read_metrics(run)


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    run = write_run(tmp_path / "r", training_records())
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UsageError) as err:
        plot.cmd_plot(namespace(run))
    assert str(err.value) == "plot needs matplotlib: pip install 'dptrain[plot]'"
    assert not (run / "curves.png").exists()


# ---------------------------------------------------------------------------- drawing
def test_two_runs_write_one_png_with_two_subplots(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    single = write_run(
        tmp_path / "single", training_records(), {"strategy": "single", "world_size": 1}
    )
    ddp = write_run(
        tmp_path / "ddp2", training_records(scale=1.1), {"strategy": "ddp", "world_size": 2}
    )
    monkeypatch.chdir(tmp_path)
    assert plot.cmd_plot(namespace(single, ddp)) == 0
    out = tmp_path / "curves.png"  # several runs: ./curves.png
    assert capsys.readouterr().out.strip() == "wrote curves.png"
    assert out.stat().st_size > 5000
    # 120 dpi x (5.5 in per subplot, 4.2 in): two subplots side by side
    assert png_size(out) == (1320, 504)


def test_one_run_defaults_into_run_dir_and_metric_flag(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "r", training_records())
    assert plot.cmd_plot(namespace(run)) == 0
    assert png_size(run / "curves.png") == (1320, 504)
    out = tmp_path / "sub" / "three.png"
    assert plot.cmd_plot(namespace(run, out=out, metric="loss,lr,samples_per_s")) == 0
    assert png_size(out) == (1980, 504)
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out}"


def test_out_is_a_directory(tmp_path):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "r", training_records())
    with pytest.raises(UsageError, match="is a directory"):
        plot.cmd_plot(namespace(run, out=tmp_path))


def test_parser_registration():
    parser = Parser(prog="dptrain")
    plot.add_parser(parser.add_subparsers(dest="command", parser_class=Parser))
    args = parser.parse_args(["plot", "a", "b", "--metric", "loss"])
    assert (args.run_dirs, args.out, args.metric, args.func) == (
        ["a", "b"],
        None,
        "loss",
        plot.cmd_plot,
    )
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["plot"])  # at least one RUN_DIR
    assert exit_.value.code == 2


def test_out_without_suffix_is_a_png_named_as_written_and_non_images_are_refused(tmp_path,
                                                                                 capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "r", training_records())
    assert plot.cmd_plot(namespace(run, out=tmp_path / "afile")) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'afile.png'}"
    assert png_size(tmp_path / "afile.png") == (1320, 504) and not (tmp_path / "afile").exists()
    summary = run / "summary.json"
    summary.write_text("{}\n")
    for target in (summary, tmp_path / "new" / "x.pt"):  # a run's file given by mistake
        with pytest.raises(UsageError, match="is not an image format"):
            plot.cmd_plot(namespace(run, out=target))
    assert summary.read_text() == "{}\n" and not (tmp_path / "new").exists()
