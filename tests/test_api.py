"""Your own model and data: plug-ins on PYTHONPATH, the dptrain.fit API, the example."""

from __future__ import annotations

import functools
import json
import os
import pty
import select
import subprocess
import sys

import pytest
import torch

import dptrain
from dptrain import cli
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


def test_fit_in_process_returns_the_summary_and_the_trained_model(tmp_path):
    s = dptrain.fit("linear", "synthetic", max_steps=30, out=str(tmp_path / "f"), quiet=True)
    assert s["steps"] == 30 and s["test_accuracy"] > 0.5 and s["replayable"] is True
    assert isinstance(s, dict) and s.model is not None  # FitResult: still the summary dict
    saved = params(tmp_path / "f")
    assert all(torch.equal(v, saved[k]) for k, v in s.model.state_dict().items())
    with pytest.raises(UsageError, match="unknown key 'lrate'"):
        dptrain.fit("linear", "synthetic", lrate=0.1)


def mlp(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def test_fit_takes_an_instance_and_says_config_toml_cannot_replay_it(tmp_path, capsys):
    net = mlp(8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    r = dptrain.fit(net, "synthetic", max_steps=20, out=str(tmp_path / "i"), quiet=True)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # not changed
    saved = params(tmp_path / "i")
    assert all(torch.equal(v, saved[k]) for k, v in r.model.state_dict().items())
    assert not any(torch.equal(v, before[k]) for k, v in r.model.state_dict().items())
    assert r.replayable is False and "nn.Module instance (Sequential)" in r[
        "not_replayable_because"]
    assert "warning: this run cannot be replayed" in capsys.readouterr().err
    assert (tmp_path / "i" / "config.toml").read_text().startswith("# replayable = false: ")
    assert json.loads((tmp_path / "i" / "summary.json").read_text())["replayable"] is False
    # the CLI says why instead of training something else
    assert cli.main(["train", "--config", str(tmp_path / "i" / "config.toml"), "--out",
                     str(tmp_path / "replay")]) == 2
    assert "was a Python object given to dptrain.fit" in capsys.readouterr().err


def test_fit_sends_a_partial_to_two_workers_and_refuses_what_cannot_be_pickled(tmp_path):
    r = dptrain.fit(functools.partial(mlp, hidden=16), "synthetic", nproc=2, max_steps=10,
                    threads=1, out=str(tmp_path / "p"), quiet=True)
    assert r["world_size"] == 2 and r["steps"] == 10 and r.model[1].out_features == 16
    saved = params(tmp_path / "p")
    assert all(torch.equal(v, saved[k]) for k, v in r.model.state_dict().items())
    with pytest.raises(UsageError, match="cannot be pickled.*define it at the top level"):
        dptrain.fit(lambda: mlp(4), "synthetic", nproc=2, out=str(tmp_path / "l"))
    assert not (tmp_path / "l").exists()  # refused before anything started


def test_fit_from_stdin_without_a_main_guard_forks_two_workers(tmp_path):
    code = (
        "import torch, dptrain\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.f = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))\n"
        "    def forward(self, x):\n"
        "        return self.f(x)\n"
        f"r = dptrain.fit(Net(), 'synthetic', nproc=2, max_steps=10, threads=1, quiet=True, "
        f"out={str(tmp_path / 's')!r})\n"
        "print('world', r['world_size'], type(r.model).__name__, r['test_samples'])\n")
    p = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True,
                       env=clean_env(), timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world 2 Net 1000" in p.stdout
    assert "Traceback" not in p.stderr


def test_fork_is_refused_with_advice_where_it_is_unsafe():
    import types

    from dptrain.api import start_method

    stdin = types.ModuleType("__main__")
    stdin.__file__ = "<stdin>"
    with pytest.raises(UsageError, match=r"runs from <stdin>.*CUDA.*if __name__"):
        start_method(types.SimpleNamespace(device="cuda", nproc=2), {}, {}, main=stdin)
    assert start_method(types.SimpleNamespace(device="cpu", nproc=2), {}, {},
                        main=stdin) == "fork"


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


def test_fit_errors_name_the_callers_objects_not_internal_specs(tmp_path):
    with pytest.raises(UsageError) as err:
        dptrain.fit(torch.nn.Linear(5, 3), dataset="synthetic", max_steps=2, quiet=True,
                    out=str(tmp_path / "r"))
    message = str(err.value)
    assert message.startswith("model (an nn.Module instance (Linear)) cannot take the batches")
    assert "_objects" not in message


def test_fit_resumes_a_run_of_a_model_instance(tmp_path):
    """Objects get a fresh internal name per fit call; resume="auto" compared those names
    and refused ("resume with the same settings") a call that was the same."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    out = str(tmp_path / "r")
    dptrain.fit(net, "synthetic", max_steps=3, threads=1, quiet=True, out=out, ckpt_every=1)
    again = dptrain.fit(net, "synthetic", max_steps=6, threads=1, quiet=True, out=out,
                        resume="auto")
    assert again["steps"] == 6 and again["resumed_from"].endswith("step-00000003.pt")
    with pytest.raises(UsageError, match="does not fit"):  # another model is still refused
        other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32),
                                    torch.nn.ReLU(), torch.nn.Linear(32, 10))
        dptrain.fit(other, "synthetic", max_steps=9, threads=1, quiet=True, out=out,
                    resume="auto")


def test_fit_takes_paths_as_paths(tmp_path):
    r = dptrain.fit("linear", "synthetic", max_steps=2, threads=1, quiet=True,
                    out=tmp_path / "p", data_root=tmp_path / "data")
    assert r["out"] == str(tmp_path / "p") and (tmp_path / "p" / "summary.json").is_file()
