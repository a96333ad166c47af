from __future__ import annotations

from pathlib import Path

import pytest

from dptrain.cli import build_parser, resolve_config
from dptrain.config import TrainConfig, load_toml, to_toml
from dptrain.errors import UsageError


def parse(*argv: str) -> TrainConfig:
    return resolve_config(build_parser().parse_args(["train", *argv]))


def test_defaults_are_valid():
    cfg = parse()
    assert cfg.model == "linear" and cfg.batch_size == 64 and cfg.strategy == "auto"


def test_toml_round_trip_reproduces_every_field(tmp_path: Path):
    cfg = parse("--model", "convnet", "--lr", "0.05", "--sync-bn", "--nproc", "3",
                "--precision", "bf16", "--out", str(tmp_path / "o"))
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    again = parse("--config", str(path))
    assert again == cfg


def test_precedence_recipe_then_file_then_flags(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('recipe = "mnist-fast"\nlr = 0.3\nepochs = 5\n')
    cfg = parse("--config", str(path), "--epochs", "7")
    assert cfg.model == "fastnet-strided"  # from the recipe
    assert cfg.lr == 0.3  # the file beats the recipe
    assert cfg.epochs == 7  # the flag beats the file


@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "0"], "--lr must be positive"),
    (["--nproc", "zero"], "--nproc must be a positive integer or auto"),
    (["--model", "resnet"], "unknown --model 'resnet'"),
    (["--dataset", "cifar"], "unknown --dataset 'cifar'"),
    (["--node-rank", "2", "--nnodes", "2", "--master-port", "5"], "--node-rank 2 must be below"),
    (["--nnodes", "2"], "multi-node runs need --master-port"),
    (["--recipe", "nope"], "unknown --recipe 'nope'"),
])
def test_bad_values_are_usage_errors(argv, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace("-", r"\-")):
        parse(*argv)


def test_config_file_errors(tmp_path: Path):
    with pytest.raises(UsageError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 1\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_toml(bad)
    bad.write_text("learning_rate = 1.0\n")
    with pytest.raises(UsageError, match="unknown key 'learning_rate'"):
        load_toml(bad)
    bad.write_text('epochs = "two"\n')
    with pytest.raises(UsageError, match="epochs must be float"):
        load_toml(bad)


def test_ints_accepted_for_floats_and_strings(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text("lr = 1\nnproc = 2\nprecision = 32\n")
    values = load_toml(path)
    assert values == {"lr": 1.0, "nproc": "2", "precision": "32"}


def test_channels_last_spellings(tmp_path: Path):
    """--channels-last [auto|on|off]: alone = on, --no-channels-last = off, the default auto;
    a config.toml of an earlier version (channels_last = true/false) and a bool from Python
    still mean on/off."""
    assert parse().channels_last == "auto"
    assert parse("--channels-last").channels_last == "on"
    assert parse("--channels-last", "off").channels_last == "off"
    assert parse("--no-channels-last").channels_last == "off"
    assert parse("--channels-last", "auto").channels_last == "auto"
    old = tmp_path / "old.toml"
    old.write_text("channels_last = true\n")
    assert parse("--config", str(old)).channels_last == "on"
    old.write_text("channels_last = false\n")
    assert parse("--config", str(old)).channels_last == "off"
    assert TrainConfig(channels_last=True).channels_last == "on"
    assert TrainConfig(channels_last=False).channels_last == "off"
    with pytest.raises(SystemExit) as exc:
        parse("--channels-last", "maybe")
    assert exc.value.code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('channels_last = "maybe"\n')
    with pytest.raises(UsageError, match="--channels-last 'maybe' is not one of auto, on, off"):
        parse("--config", str(bad))


def test_to_toml_escapes_control_characters_so_the_file_reads_back(tmp_path):
    """A newline or control character in a path was written raw: an invalid config.toml,
    and a traceback after the run directory was created."""
    import tomllib

    from tests.conftest import train_inproc

    odd = {"out": str(tmp_path / "nl\ndir"), "data_root": "a\x01b\x7fc\t\"q\"\\"}
    cfg = TrainConfig(dataset="synthetic", **odd)
    back = tomllib.loads(to_toml(cfg))
    assert {k: back[k] for k in odd} == odd
    s = train_inproc(Path(odd["out"]), "--dataset", "synthetic", "--max-steps", "2")
    assert s["steps"] == 2
    assert tomllib.loads((Path(odd["out"]) / "config.toml").read_text())["out"] == odd["out"]
