"""The tutorial-style baselines: same preprocessing as dptrain, sane numbers, learns."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from dptrain.bench.baseline import (
    ClassicNet,
    TutorialMNIST,
    run_classic_example,
    run_tutorial_linear,
)
from dptrain.data.datasets import load_splits
from dptrain.data.loader import Normalizer


@pytest.fixture(scope="module")
def splits():
    return load_splits("synthetic", ".")


def test_per_sample_transform_matches_dptrain_normalizer(splits) -> None:
    dataset = TutorialMNIST(splits.train_x, splits.train_y, 0.1307, 0.3081)
    idx = torch.arange(0, len(dataset), 37)
    expected = Normalizer(0.1307, 0.3081)(splits.train_x[idx])
    got = torch.stack([dataset[int(i)][0] for i in idx])
    assert got.shape == expected.shape == (len(idx), 1, 28, 28)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    labels = [dataset[int(i)][1] for i in idx]
    assert all(isinstance(y, int) for y in labels)
    assert labels == splits.train_y[idx].tolist()


def test_per_sample_transform_values(splits) -> None:
    # pixel 0 -> -mean/std, pixel 255 -> (1 - mean)/std
    images = torch.tensor([[[0] * 28] * 28, [[255] * 28] * 28], dtype=torch.uint8)
    dataset = TutorialMNIST(images, torch.tensor([3, 7]), 0.5, 0.25)
    assert torch.allclose(dataset[0][0], torch.full((1, 28, 28), -2.0))
    assert torch.allclose(dataset[1][0], torch.full((1, 28, 28), 2.0))
    assert len(dataset) == 2
    with pytest.raises(ValueError):
        TutorialMNIST(images, torch.tensor([1]))


def test_tutorial_linear_with_max_steps(splits) -> None:
    threads = torch.get_num_threads()
    result = run_tutorial_linear(splits, max_steps=40, threads=1)
    assert torch.get_num_threads() == threads  # restored
    assert result["steps"] == 40
    assert result["timed_steps"] == 39
    assert result["timed_samples"] == 39 * 64
    assert result["seconds"] > 0
    assert result["samples_per_s"] == pytest.approx(result["timed_samples"] / result["seconds"])
    assert result["threads"] == 1
    assert math.isfinite(result["final_loss"])
    assert 0.3 < result["test_accuracy"] <= 1.0  # chance is 0.1


def test_tutorial_linear_is_seeded(splits) -> None:
    a = run_tutorial_linear(splits, max_steps=5, threads=1)
    b = run_tutorial_linear(splits, max_steps=5, threads=1)
    assert a["final_loss"] == b["final_loss"]
    assert a["test_accuracy"] == b["test_accuracy"]


def test_classic_net_shapes_and_log_probs() -> None:
    out = ClassicNet()(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)


def test_classic_example_records_time_to_target(splits) -> None:
    small = type(splits)(
        splits.name,
        splits.train_x[:640],
        splits.train_y[:640],
        splits.test_x[:200],
        splits.test_y[:200],
        splits.mean,
        splits.std,
    )
    reached = run_classic_example(small, epochs=2, target_acc=0.0, max_steps=3, threads=1)
    assert reached["steps"] == 6
    assert len(reached["accuracies"]) == 2
    assert reached["epochs_to_target"] == 1
    assert reached["time_to_target_s"] == reached["epoch_end_s"][0]
    assert 0 < reached["epoch_end_s"][0] < reached["epoch_end_s"][1] <= reached["wall_time_s"]

    stopped = run_classic_example(
        small, epochs=3, target_acc=0.0, max_steps=2, threads=1, stop_at_target=True
    )
    assert len(stopped["accuracies"]) == 1

    missed = run_classic_example(small, epochs=1, target_acc=1.01, max_steps=2, threads=1)
    assert missed["time_to_target_s"] is None
    assert missed["epochs_to_target"] is None
    assert all(0.0 <= a <= 1.0 for a in missed["accuracies"])


def test_test_loader_counts_every_sample(splits) -> None:
    dataset = TutorialMNIST(splits.test_x, splits.test_y)
    seen = sum(len(y) for _, y in DataLoader(dataset, batch_size=300))
    assert seen == len(splits.test_x)


def test_mean_std_and_machine_info() -> None:
    from dptrain.bench import machine_info, mean_std

    s = mean_std([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)
    assert mean_std([5.0])["std"] == 0.0
    info = machine_info(["bench.py", "--repeats", "1"])
    assert info["cores"] >= 1
    assert info["torch_version"] == str(torch.__version__)
    assert info["command"].endswith("bench.py --repeats 1")
    assert info["cpu_model"]


def test_tutorial_port_matches_dptrain_normalizer_from_pil_and_numpy(splits) -> None:
    from dptrain.bench.tutorial_transforms import Compose, Normalize, ToTensor, to_image

    pipeline = Compose([ToTensor(), Normalize((0.1307,), (0.3081,))])
    images = splits.train_x[:5]
    expected = Normalizer(0.1307, 0.3081)(images)
    for i, img in enumerate(images.numpy()):
        torch.testing.assert_close(pipeline(to_image(img)), expected[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(pipeline(img), expected[i], rtol=0, atol=1e-6)
    with pytest.raises(TypeError):
        pipeline([[0, 1]])
    with pytest.raises(ValueError, match="std evaluated to zero"):
        Normalize((0.5,), (0.0,))(torch.zeros(1, 2, 2))
