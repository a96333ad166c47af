"""--val-fraction: a seeded hold-out of the training split for the per-epoch evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from dptrain.data.datasets import Splits, synthetic
from dptrain.errors import UsageError
from tests.conftest import run_cli, train_inproc


def _splits(x: object, y: torch.Tensor | None) -> Splits:
    return Splits("t", x, y, x, y)


def test_hold_out_is_seeded_disjoint_and_complete():
    x, y = torch.arange(100).float().view(100, 1), torch.arange(100)
    a = _splits(x, y).hold_out(0.25, seed=3)
    assert a.val_y.numel() == 25 and a.train_y.numel() == 75
    assert sorted(a.val_y.tolist() + a.train_y.tolist()) == list(range(100))
    assert torch.equal(a.val_x.view(-1).long(), a.val_y)  # inputs and targets stay paired
    assert a.val_y.tolist() == sorted(a.val_y.tolist())  # original order kept
    assert torch.equal(_splits(x, y).hold_out(0.25, seed=3).val_y, a.val_y)  # same seed
    assert not torch.equal(_splits(x, y).hold_out(0.25, seed=4).val_y, a.val_y)
    assert _splits(x, y).hold_out(0.0, seed=3).val_x is None  # 0: nothing changes
    with pytest.raises(UsageError, match="--val-fraction 0.001 of 100"):
        _splits(x, y).hold_out(0.001, seed=3)


def test_hold_out_of_structures_and_datasets_picks_the_same_samples():
    x, y = torch.arange(50).float().view(50, 1), torch.arange(50)
    tensors = _splits(x, y).hold_out(0.2, seed=7)
    tree = _splits({"a": x, "b": (x * 2, x * 3)}, y).hold_out(0.2, seed=7)
    assert torch.equal(tree.val_x["a"], tensors.val_x)
    assert torch.equal(tree.val_x["b"][1], tensors.val_x * 3)
    ds = torch.utils.data.TensorDataset(x, y)
    sub = _splits(ds, None).hold_out(0.2, seed=7)
    assert isinstance(sub.val_x, torch.utils.data.Subset) and sub.is_dataset
    assert list(sub.val_x.indices) == tensors.val_y.tolist()
    assert list(sub.train_x.indices) == tensors.train_y.tolist()


def test_val_metrics_per_epoch_and_test_once(tmp_path, tiny):
    out = tmp_path / "v"
    s = train_inproc(out, *tiny, "--epochs", "2", "--val-fraction", "0.1",
                     "--batch-size", "128")
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [e for e in events if "val_accuracy" in e]
    tests = [e for e in events if "test_accuracy" in e]
    assert [e["epoch"] for e in vals] == [0, 1] and len(tests) == 1
    assert all(e["val_samples"] == 600 for e in vals)
    assert s["steps"] == 2 * (5400 // 128)  # trained on the remaining 90 %
    assert s["test_samples"] == 1000 and s["test_accuracy"] == tests[0]["test_accuracy"]
    assert s["val_metrics"]["accuracy"] == vals[-1]["val_accuracy"]
    assert s["val_metrics"]["samples"] == 600 and s["val_fraction"] == 0.1
    assert s["normalization"]["mean"] == 0.1307 and s["normalization"]["std"] == 0.3081
    # the held-out samples are exactly those the split says (same seed, same 600)
    held = synthetic().hold_out(0.1, seed=0)
    assert held.val_y.numel() == 600


def test_val_fraction_zero_is_todays_run(tmp_path, tiny):
    a = train_inproc(tmp_path / "a", *tiny, "--max-steps", "10")
    b = train_inproc(tmp_path / "b", *tiny, "--max-steps", "10", "--val-fraction", "0")
    assert a["test_accuracy"] == b["test_accuracy"] and "val_metrics" not in b
    events = (tmp_path / "b" / "metrics.jsonl").read_text()
    assert "val_" not in events


def test_val_split_is_the_same_for_two_processes(tmp_path, tiny):
    one = train_inproc(tmp_path / "one", *tiny, "--max-steps", "8", "--batch-size", "64",
                       "--val-fraction", "0.2")
    two = run_cli("train", *tiny, "--max-steps", "8", "--batch-size", "32", "--nproc", "2",
                  "--val-fraction", "0.2", "--out", str(tmp_path / "two"), "--quiet")
    assert two.returncode == 0, two.stderr
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["val_metrics"]["samples"] == one["val_metrics"]["samples"] == 1200
    assert s["val_metrics"]["accuracy"] == pytest.approx(one["val_metrics"]["accuracy"],
                                                         abs=2 / 1200)
    assert s["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=2 / 1000)


def test_bad_val_fraction_is_one_error_line(tiny):
    r = run_cli("train", *tiny, "--val-fraction", "1.5")
    assert r.returncode == 2 and r.stderr.startswith("error: --val-fraction must be in [0, 1)")
    assert "Traceback" not in r.stderr
