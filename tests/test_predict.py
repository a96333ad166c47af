"""Inference from a checkpoint: load_model and `dptrain predict` apply the normalisation."""

from __future__ import annotations

import json

import torch

import dptrain
from dptrain.data.datasets import synthetic
from tests.conftest import run_cli, train_inproc


def test_predict_reproduces_the_runs_test_accuracy(tmp_path, tiny):
    out = tmp_path / "run"
    s = train_inproc(out, *tiny, "--model", "linear", "--max-steps", "40", "--seed", "2")
    ckpt = out / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    assert s["normalization"] == {"mean": 0.1307, "std": 0.3081, "dataset": "synthetic",
                                  "input": "uint8 pixels, x / 255"}
    model = dptrain.load_model(ckpt)
    assert not model.training and model.normalization["mean"] == 0.1307
    data = synthetic()
    with torch.no_grad():
        logits = model(data.test_x)  # raw uint8 images in: the wrapper normalises
        raw = model.model(data.test_x.float().unsqueeze(1))  # without the normalisation
    acc = (logits.argmax(1) == data.test_y).double().mean().item()
    assert acc == s["test_accuracy"]  # exactly the run's own test accuracy
    assert (raw.argmax(1) == data.test_y).double().mean().item() != acc
    assert set(state["model"]) == {"1.weight", "1.bias"}

    pred = tmp_path / "pred.json"
    r = run_cli("predict", "--ckpt", str(ckpt), "--data-root", tiny[-1], "--out", str(pred))
    assert r.returncode == 0, r.stderr
    assert f"accuracy {s['test_accuracy']:.4f}" in r.stdout
    got = json.loads(pred.read_text())
    assert got["metrics"]["accuracy"] == s["test_accuracy"]
    assert got["metrics"]["samples"] == s["test_samples"] == 1000
    assert got["predictions"] == logits.argmax(1).tolist()


def test_predict_on_a_dataset_plugin_with_a_val_split(tmp_path):
    from dptrain.predict import predict

    out = tmp_path / "ds"
    s = train_inproc(out, "--dataset", "myplugins:blob_datasets", "--model", "myplugins:mlp",
                     "--max-steps", "5", "--batch-size", "16", "--val-fraction", "0.25",
                     "--workers", "2")
    assert s["val_metrics"]["samples"] > 0
    result = predict(out / "checkpoints" / "last.pt", log=lambda _m: None)
    assert result["metrics"]["accuracy"] == s["test_accuracy"]
    assert result["metrics"]["samples"] == s["test_samples"]
    assert result["normalization"] == s["normalization"]


def test_predict_errors_are_one_line(tmp_path):
    r = run_cli("predict", "--ckpt", str(tmp_path / "missing.pt"))
    assert r.returncode == 2 and r.stderr.startswith("error: checkpoint ")
    assert "Traceback" not in r.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    r = run_cli("predict", "--ckpt", str(junk))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_predict_never_replaces_a_file_and_refuses_bad_batch_sizes(tmp_path, tiny):
    out = tmp_path / "run"
    train_inproc(out, *tiny, "--model", "linear", "--max-steps", "5")
    ckpt = out / "checkpoints" / "last.pt"
    before = {p: p.read_bytes() for p in (ckpt, out / "summary.json")}
    for target in before:  # the run's own files given as --out by mistake
        r = run_cli("predict", "--ckpt", str(ckpt), "--data-root", tiny[-1], "--out",
                    str(target))
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: --out ") and "already exists" in r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert torch.load(ckpt, weights_only=True)["model"]  # still a loadable checkpoint
    r = run_cli("predict", "--ckpt", str(ckpt), "--out", str(tmp_path / "nodir" / "p.json"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    for bad in ("-5", "0", "x"):
        r = run_cli("predict", "--ckpt", str(ckpt), "--data-root", tiny[-1],
                    "--batch-size", bad)
        assert r.returncode == 2 and "--batch-size" in r.stderr and "nan" not in r.stdout


def test_load_model_refuses_float_pixels_and_takes_a_run_directory(tmp_path, tiny):
    """Floats in [0, 1] (torchvision's ToTensor) would be normalised a second time: 0.89 ->
    0.11 accuracy, silently. A run directory names its last.pt; a bad device is a UsageError."""
    import pytest

    from dptrain.errors import UsageError

    out = tmp_path / "run"
    train_inproc(out, *tiny, "--model", "linear", "--max-steps", "5")
    model = dptrain.load_model(out)  # the run directory
    x = synthetic().test_x[:4]
    assert model(x).shape == (4, 10)
    with pytest.raises(UsageError, match="takes the dataset's uint8 pixels .* got torch.float32"):
        model(x.float() / 255)
    for bad, needle in (("gpu", "is not a torch device"), ("cuda:0", "no CUDA device")):
        if bad.startswith("cuda") and torch.cuda.is_available():
            continue
        with pytest.raises(UsageError, match=needle):
            dptrain.load_model(out, device=bad)
    with pytest.raises(UsageError, match="is a directory"):
        dptrain.load_model(out / "checkpoints")
