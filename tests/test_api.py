"""Your own model and data: plug-ins on PYTHONPATH, the dptrain.fit API, the example."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys

import pytest
import torch

import dptrain
from dptrain.errors import UsageError
from dptrain.verify import compare
from tests.conftest import ROOT, clean_env, run_cli, train_inproc


def params(out):
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_plugin_model_and_map_style_dataset_under_ddp_equal_one_process(tmp_path):
    args = ["--model", "myplugins:mlp", "--dataset", "myplugins:blob_datasets", "--max-steps",
            "20", "--threads", "1", "--quiet", "--lr", "0.02"]
    two = run_cli("train", "--nproc", "2", "--batch-size", "16", *args, "--out",
                  str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli("train", "--batch-size", "32", *args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert compare(params(tmp_path / "one"), params(tmp_path / "two"))[0] <= 1e-5
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["test_samples"] == 500 and s["test_accuracy"] > 0.8


def test_plugin_tensor_dataset_in_process(tmp_path):
    s = train_inproc(tmp_path / "t", "--model", "myplugins:mlp", "--dataset", "myplugins:blobs",
                     "--epochs", "2", "--lr", "0.02")
    assert s["test_samples"] == 500 and s["test_accuracy"] > 0.9


def test_fit_api_and_the_example_with_unused_parameters(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "fit_api.py"),
                        str(tmp_path / "ex")], capture_output=True, text=True,
                       env=clean_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ex" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["find_unused_parameters"] is True
    assert s["test_samples"] == 1000 and s["test_accuracy"] > 0.85
    assert "test accuracy" in r.stdout


def test_unused_parameters_without_the_flag_fail_with_advice(tmp_path):
    r = run_cli("train", "--nproc", "2", "--model", "myplugins:with_unused", "--dataset",
                "synthetic", "--max-steps", "5", "--threads", "1", "--out", str(tmp_path / "u"))
    assert r.returncode not in (0, 2)
    assert "find_unused_parameters" in r.stderr


def test_fit_in_process_and_rejects_non_importable_factories(tmp_path):
    s = dptrain.fit("linear", "synthetic", max_steps=30, out=str(tmp_path / "f"), quiet=True)
    assert s["steps"] == 30 and s["test_accuracy"] > 0.5
    with pytest.raises(UsageError, match="top-level function"):
        dptrain.fit(lambda: torch.nn.Linear(784, 10), "synthetic")
    with pytest.raises(UsageError, match="unknown key 'lrate'"):
        dptrain.fit("linear", "synthetic", lrate=0.1)


def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path):
    pytest.importorskip("tqdm")
    args = [sys.executable, "-m", "dptrain", "train", "--dataset", "synthetic", "--epochs", "1",
            "--log-every", "10"]
    pid, fd = pty.fork()
    if pid == 0:  # child: stdout is the pseudo-terminal
        os.environ.update(clean_env())
        os.execv(sys.executable, [*args, "--out", str(tmp_path / "tty")])
    chunks = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks += data
    os.waitpid(pid, 0)
    text = chunks.decode(errors="replace")
    assert "\r" in text and "step/s" in text and "93/93" in text  # a redrawn tqdm bar
    piped = run_cli(*args[3:], "--out", str(tmp_path / "pipe"))
    assert piped.returncode == 0
    assert "\r" not in piped.stdout and "epoch 0 step 10/93 loss" in piped.stdout
