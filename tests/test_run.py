"""Single-process training end to end: accuracy, determinism, outputs, reproducibility."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from dptrain import cli
from tests.conftest import run_cli, train_inproc

SUMMARY_KEYS = {"test_accuracy", "test_samples", "train_samples_per_s", "wall_time_s", "steps",
                "epochs", "world_size", "strategy", "backend", "device", "torch_version"}


def params(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_linear_learns_synthetic_and_writes_the_contracted_files(tmp_path, tiny):
    s = train_inproc(tmp_path / "a", *tiny, "--model", "linear", "--epochs", "1")
    assert s.keys() >= SUMMARY_KEYS
    assert s["test_accuracy"] >= 0.9
    assert s["test_samples"] == 1000  # the whole synthetic test split, once
    assert s["steps"] == 6000 // 64 and s["world_size"] == 1 and s["strategy"] == "single"
    assert s["train_samples_per_s"] > 0
    out = tmp_path / "a"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r and "epoch" in r for r in lines)
    assert lines[-1]["test_accuracy"] == s["test_accuracy"]
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert set(ckpt["model"]) == {"1.weight", "1.bias"}  # unwrapped: no "module." prefix
    assert ckpt["position"]["step"] == s["steps"]
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["model"] == "linear" and cfg["out"] == str(out)


def test_same_seed_gives_bitwise_identical_parameters(tmp_path, tiny):
    args = [*tiny, "--model", "cnn", "--max-steps", "15", "--seed", "5"]
    train_inproc(tmp_path / "a", *args)
    train_inproc(tmp_path / "b", *args)
    train_inproc(tmp_path / "c", *tiny, "--model", "cnn", "--max-steps", "15", "--seed", "6")
    a, b, c = params(tmp_path / "a"), params(tmp_path / "b"), params(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_config_file_reproduces_the_run(tmp_path, tiny):
    train_inproc(tmp_path / "a", *tiny, "--model", "convnet", "--max-steps", "12",
                 "--optimizer", "adamw", "--lr", "0.003", "--schedule", "onecycle")
    text = (tmp_path / "a" / "config.toml").read_text()
    (tmp_path / "re.toml").write_text(text.replace(str(tmp_path / "a"), str(tmp_path / "b")))
    assert cli.main(["train", "--config", str(tmp_path / "re.toml")]) == 0
    a, b = params(tmp_path / "a"), params(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_steps_and_optimizers(tmp_path, tiny):
    for opt, lr in (("sgd", "0.05"), ("adam", "0.002"), ("adamw", "0.002"), ("adadelta", "1.0")):
        s = train_inproc(tmp_path / opt, *tiny, "--max-steps", "40", "--optimizer", opt,
                         "--lr", lr, "--schedule", "step")
        assert s["steps"] == 40
        assert s["test_accuracy"] > 0.5, opt


def test_print_config_prints_toml_and_exits(tmp_path, capsys):
    assert cli.main(["train", "--print-config", "--model", "cnn", "--out", str(tmp_path / "x")]) == 0
    cfg = tomllib.loads(capsys.readouterr().out)
    assert cfg["model"] == "cnn"
    assert not (tmp_path / "x").exists()


def test_cli_errors_are_one_line_exit_2(tmp_path):
    cases = [
        ["train", "--batch-size", "0"],
        ["train", "--model", "nope"],
        ["train", "--strategy", "dp", "--device", "cpu"],
        ["train", "--precision", "16", "--device", "cpu", "--dataset", "synthetic"],
        ["train", "--backend", "nccl", "--device", "cpu", "--dataset", "synthetic"],
        ["train", "--config", str(tmp_path / "missing.toml")],
        ["train", "--frobnicate"],
    ]
    for argv in cases:
        r = run_cli(*argv, "--out", str(tmp_path / "o"))
        assert r.returncode == 2, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_new_run_refuses_an_existing_run_directory(tmp_path, tiny):
    train_inproc(tmp_path / "a", *tiny, "--max-steps", "3")
    before = (tmp_path / "a" / "summary.json").read_bytes()
    r = run_cli("train", *tiny, "--max-steps", "3", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (tmp_path / "a" / "summary.json").read_bytes() == before


def test_tensorboard_event_files(tmp_path, tiny):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_inproc(tmp_path / "tb", *tiny, "--max-steps", "20", "--log-every", "5",
                 "--tensorboard")
    acc = EventAccumulator(str(tmp_path / "tb" / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == [5, 10, 15, 20]
    assert acc.Scalars("test_accuracy")[-1].value > 0.5
