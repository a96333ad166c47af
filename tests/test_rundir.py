"""Who may write into a run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from dptrain.errors import UsageError
from dptrain.rundir import check_out_dir, run_of


def make_run(path: Path) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    (path / "summary.json").write_text("{}")
    (path / "checkpoints" / "last.pt").write_bytes(b"x")
    return path / "checkpoints" / "last.pt"


def test_new_and_empty_directories_are_free(tmp_path):
    check_out_dir(tmp_path / "new", "")
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", "")
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "metrics.jsonl").write_text("")
    check_out_dir(tmp_path / "failed", "")


def test_a_config_toml_dptrain_did_not_write_is_never_overwritten(tmp_path):
    """A user's notes in OUT/config.toml (even the --config file being read) were replaced by
    the resolved configuration; a run's own config.toml is rewritten as before."""
    from dptrain.config import TrainConfig, to_toml

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("# my experiment notes\nlr = 0.05\n")
    for resume in ("", "auto"):
        with pytest.raises(UsageError, match="holds a config.toml that dptrain did not write"):
            check_out_dir(mine, resume)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.toml").write_text(to_toml(TrainConfig()))
    check_out_dir(ours, "")
    (ours / "config.toml").write_text("# replayable = false: objects.\n# `dptrain train "
                                      "--config` ...\n" + to_toml(TrainConfig()))
    check_out_dir(ours, "auto")


def test_going_back_to_an_earlier_checkpoint_in_its_own_run_is_refused(tmp_path):
    """--resume RUN/checkpoints/step-10 into RUN beside step-20 and step-30 kept the old
    branch's later checkpoints, rotated the resumed one away, and the next --resume auto
    continued the old branch. A new --out branches; the newest, or last.pt, continues."""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for name in ("step-00000010.pt", "step-00000020.pt", "step-00000030.dcp", "last.pt"):
        (ckpts / name).write_bytes(b"x")
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(UsageError, match=r"holds later checkpoints \(step-00000020.pt, "
                                         r"step-00000030.dcp\): continuing there would mix"):
        check_out_dir(tmp_path / "run", str(ckpts / "step-00000010.pt"))
    for newest in ("step-00000030.dcp", "last.pt"):
        check_out_dir(tmp_path / "run", str(ckpts / newest))
    check_out_dir(tmp_path / "branch", str(ckpts / "step-00000010.pt"))


def test_an_existing_run_needs_resume_auto(tmp_path):
    make_run(tmp_path / "a")
    with pytest.raises(UsageError, match="already holds a run"):
        check_out_dir(tmp_path / "a", "")
    check_out_dir(tmp_path / "a", "auto")


def test_resume_path_writes_into_its_own_run_or_a_new_one_never_a_third(tmp_path):
    ckpt = make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    assert run_of(ckpt) == tmp_path / "a"
    check_out_dir(tmp_path / "a", str(ckpt))
    check_out_dir(tmp_path / "fresh", str(ckpt))
    with pytest.raises(UsageError, match="already holds another run"):
        check_out_dir(tmp_path / "b", str(ckpt))


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        check_out_dir(tmp_path / "f", "")


def test_out_may_not_be_a_runs_checkpoints_or_hold_a_file_where_a_directory_goes(tmp_path):
    from dptrain.rundir import check_out_dir

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    with pytest.raises(UsageError, match="is the checkpoints directory of the run"):
        check_out_dir(run / "checkpoints", "")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "checkpoints").write_text("a user's file")
    with pytest.raises(UsageError, match="holds a file named checkpoints"):
        check_out_dir(odd, "")


def test_default_out_takes_the_next_name_in_the_same_second(tmp_path, monkeypatch):
    import datetime as dt

    from dptrain import rundir

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN206 - one second, for every call
            return cls(2026, 12, 3, 12, 43, 36)

    monkeypatch.setattr(rundir, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    first = Path(rundir.default_out())
    first.mkdir(parents=True)
    second = Path(rundir.default_out())
    assert (first.name, second.name) == ("20261203-124336", "20261203-124336-2")
