"""--help shows each default once, and the defaults the command really uses."""

from __future__ import annotations

import pytest

from dptrain import cli


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        cli.build_parser().parse_args([*argv, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_verify_help_shows_what_verify_runs(capsys):
    text = _help(capsys, "verify")
    assert "--dataset DATASET dataset name, or package.module:factory (default: synthetic)" in text
    assert "(default: 16)" in text and "local worker processes: N or auto (= GPUs, else CPU " \
        "cores) (default: 2)" in text
    assert "--strategy {ddp,zero,fsdp,pipeline,localsgd}" in text


def test_train_help_prints_each_default_once(capsys):
    text = _help(capsys, "train")
    assert "dataset root (default: $DPTRAIN_DATA, else ./data)" in text
    assert "run directory (default: runs/<timestamp>)" in text
    assert text.count("$DPTRAIN_DATA") == 1
    assert "--loss LOSS" in text and "--task {auto,classification,multilabel,regression}" in text


@pytest.mark.parametrize("argv", [["train", "--ou", "x"], ["train", "--max-st", "3"],
                                  ["bench", "comm", "--size", "4K"], ["verify", "--nproc", "2",
                                                                "--step", "3"]])
def test_flags_are_taken_spelled_out_only(capsys, argv):
    """argparse's prefix matching took ``--ou`` for ``--out``: a typo, or a flag that a later
    version shadows, silently became another setting."""
    with pytest.raises(SystemExit) as done:
        cli.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.startswith("error: unrecognized arguments: ") and argv[-2] in err
