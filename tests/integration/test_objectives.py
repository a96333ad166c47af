"""Any loss, batch and output under real gloo DDP: N processes x batch B equal one process x
batch N*B (parameters within 1e-5 after 30 steps, metrics equal), for regression (MSE) on a
plug-in dataset, a multi-label BCE model, a dict-returning model with a dict batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dptrain.verify import compare, run_pair
from tests.conftest import run_cli

BASE = {"data_root": "unused", "batch_size": 8, "lr": 0.05, "momentum": 0.9, "seed": 3,
        "threads": 1}


def params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize(("model", "dataset", "loss", "keys"), [
    ("taskplugins:regressor", "taskplugins:regression_data", "mse", ("mse", "mae", "r2")),
    ("taskplugins:multilabel_model", "taskplugins:multilabel_data", "bce",
     ("accuracy", "f1_micro", "f1_macro")),
    # dict samples -> a collated dict batch -> model(**batch), returning {"loss", "logits"}
    ("taskplugins:hf_model", "taskplugins:dict_dataset", "cross_entropy", ("accuracy",)),
])
def test_two_processes_equal_one_with_the_global_batch(tmp_path, model, dataset, loss, keys):
    values = {**BASE, "model": model, "dataset": dataset, "loss": loss}
    s1, s2 = run_pair(values, 2, 30, tmp_path)
    assert s1["steps"] == s2["steps"] == 30 and s2["world_size"] == 2
    assert s1["global_batch"] == s2["global_batch"] == 16
    diff, where = compare(params(tmp_path / "one"), params(tmp_path / "ddp2"))
    assert diff < 1e-5, where
    m1, m2 = s1["test_metrics"], s2["test_metrics"]
    assert m1["samples"] == m2["samples"] == 256
    for key in (*keys, "loss"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    assert s2["task"] == s1["task"]


def test_regression_is_never_cast_to_classes(tmp_path):
    """The defect this replaces: float targets cast to int, 'accuracy 1.0, loss 0.0', exit 0."""
    r = run_cli("train", "--dataset", "taskplugins:regression_data", "--model",
                "taskplugins:regressor", "--max-steps", "3", "--out", str(tmp_path / "r"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--loss mse" in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r" / "summary.json").exists()
