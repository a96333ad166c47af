"""Tutorial-style training loops, kept as honest baselines for dptrain's own loop.

These are written the way the PyTorch tutorials and the classic ``examples/mnist`` script write
them: a per-sample :class:`~torch.utils.data.Dataset` (``ToTensor`` + ``Normalize`` on every
image), a ``DataLoader`` with ``shuffle=True`` and no workers, and a plain optimizer loop. They
are deliberately *not* optimised -- but neither are they handicapped: the per-sample transform
uses torchvision when it imports, and otherwise :mod:`dptrain.bench.tutorial_transforms`, a
step-for-step port of torchvision's ``ToTensor`` + ``Normalize`` whose cost is measured against
the real thing (``benchmarks/tutorial_fidelity.py``).

Run one from the command line (prints a JSON object)::

    python -m dptrain.bench.baseline linear --data-root /tmp/mnistdata --threads 2
    python -m dptrain.bench.baseline classic --epochs 3 --target-acc 0.99
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dptrain.bench.tutorial_transforms import tutorial_transform
from dptrain.config import default_data_root
from dptrain.data.datasets import Splits, load_splits

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class TutorialMNIST(Dataset):
    """Per-sample MNIST the way ``torchvision.datasets.MNIST`` serves it to a tutorial.

    Each ``__getitem__`` converts one uint8 image to a normalised ``(1, 28, 28)`` float tensor
    and returns the label as a Python ``int``, exactly like torchvision's dataset does.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.data = images
        self.targets = labels
        self.transform, self.transform_source = tutorial_transform(mean, std)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, target = self.data[index], int(self.targets[index])
        return self.transform(img.numpy()), target


def _datasets(splits: Splits) -> tuple[TutorialMNIST, TutorialMNIST]:
    mean = MNIST_MEAN if splits.mean is None else splits.mean
    std = MNIST_STD if splits.std is None else splits.std
    return (
        TutorialMNIST(splits.train_x, splits.train_y, mean, std),
        TutorialMNIST(splits.test_x, splits.test_y, mean, std),
    )


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Plain batched evaluation over a tutorial ``DataLoader``."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for data, target in loader:
            correct += int((model(data).argmax(1) == target).sum())
            total += len(target)
    model.train()
    return correct / total


def run_tutorial_linear(
    splits: Splits,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 0.01,
    max_steps: int | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The DP/DDP tutorial's loop: ``Linear(784, 10)``, SGD, per-sample ``DataLoader``.

    The clock starts after the first optimizer step (warm-up) and covers everything after it:
    fetching and transforming samples, collating, forward, backward and step. Evaluation is
    not timed.

    Returns:
        ``samples_per_s``, ``steps`` (all optimizer steps), ``timed_steps``, ``timed_samples``,
        ``seconds`` (timed), ``final_loss`` and ``test_accuracy``.
    """
    torch.manual_seed(seed)
    train_set, test_set = _datasets(splits)
    with _threads(threads):
        train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=0)
        test_loader = DataLoader(test_set, batch_size=1000, shuffle=False, num_workers=0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        steps = timed_samples = 0
        start: float | None = None
        loss = torch.tensor(math.nan)
        model.train()
        done = False
        for _ in range(epochs):
            for data, target in train_loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(data), target)
                loss.backward()
                optimizer.step()
                steps += 1
                if start is None:  # the first step is warm-up: start the clock after it
                    start = time.perf_counter()
                else:
                    timed_samples += len(target)
                if max_steps is not None and steps >= max_steps:
                    done = True
                    break
            if done:
                break
        seconds = time.perf_counter() - start if start is not None else 0.0
        accuracy = _accuracy(model, test_loader)
        used_threads = torch.get_num_threads()
    return {
        "samples_per_s": timed_samples / seconds if seconds > 0 else None,
        "steps": steps,
        "timed_steps": max(0, steps - 1),
        "timed_samples": timed_samples,
        "seconds": seconds,
        "final_loss": float(loss.detach()),
        "test_accuracy": accuracy,
        "threads": used_threads,
    }


class ClassicNet(nn.Module):
    """The network of PyTorch's ``examples/mnist/main.py``, written as it is there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def run_classic_example(
    splits: Splits,
    *,
    epochs: int = 14,
    target_acc: float = 0.99,
    batch_size: int = 64,
    test_batch_size: int = 1000,
    lr: float = 1.0,
    gamma: float = 0.7,
    seed: int = 1,
    threads: int | None = None,
    max_steps: int | None = None,
    stop_at_target: bool = False,
) -> dict[str, Any]:
    """The classic PyTorch MNIST example recipe, timed to a target test accuracy.

    conv32-conv64-fc128 with dropout, Adadelta (lr 1.0), StepLR (gamma 0.7 per epoch), batch
    64 from a per-sample ``DataLoader``, evaluation after every epoch with test batch 1000. The
    wall clock runs from the start (datasets built, model created) through training and every
    evaluation; ``time_to_target_s`` is its reading after the first evaluation that reaches
    ``target_acc`` (``None`` if none does).

    Args:
        max_steps: cap on optimizer steps per epoch (for tests); ``None`` = full epochs.
        stop_at_target: stop after the epoch that first reaches ``target_acc``.
    """
    with _threads(threads):
        started = time.perf_counter()
        torch.manual_seed(seed)
        train_set, test_set = _datasets(splits)
        train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
        test_loader = DataLoader(test_set, batch_size=test_batch_size)
        model = ClassicNet()
        optimizer = torch.optim.Adadelta(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=gamma)
        accuracies: list[float] = []
        epoch_end_s: list[float] = []
        time_to_target: float | None = None
        epochs_to_target: int | None = None
        steps = 0
        for epoch in range(1, epochs + 1):
            model.train()
            for i, (data, target) in enumerate(train_loader):
                optimizer.zero_grad()
                loss = F.nll_loss(model(data), target)
                loss.backward()
                optimizer.step()
                steps += 1
                if max_steps is not None and i + 1 >= max_steps:
                    break
            accuracy = _accuracy(model, test_loader)
            scheduler.step()
            now = time.perf_counter() - started
            accuracies.append(accuracy)
            epoch_end_s.append(now)
            if time_to_target is None and accuracy >= target_acc:
                time_to_target, epochs_to_target = now, epoch
                if stop_at_target:
                    break
    return {
        "accuracies": accuracies,
        "epoch_end_s": epoch_end_s,
        "time_to_target_s": time_to_target,
        "epochs_to_target": epochs_to_target,
        "target_acc": target_acc,
        "steps": steps,
        "wall_time_s": time.perf_counter() - started,
        "final_accuracy": accuracies[-1] if accuracies else None,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m dptrain.bench.baseline {linear,classic}``: run one baseline, print JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m dptrain.bench.baseline",
        description="Tutorial-style MNIST baselines; prints one JSON object.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("which", choices=["linear", "classic"])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-root", default=None, help="default: $DPTRAIN_DATA or ./data")
    parser.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    parser.add_argument("--epochs", type=int, default=None, help="linear: 1, classic: 14")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="linear: 0.01, classic: 1.0")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--target-acc", type=float, default=0.99)
    parser.add_argument("--stop-at-target", action="store_true")
    args = parser.parse_args(argv)
    root = args.data_root or default_data_root()
    splits = load_splits(args.dataset, root, log=lambda _msg: None)
    threads = args.threads or None
    if args.which == "linear":
        result = run_tutorial_linear(
            splits,
            epochs=args.epochs or 1,
            batch_size=args.batch_size,
            lr=0.01 if args.lr is None else args.lr,
            max_steps=args.max_steps,
            threads=threads,
        )
    else:
        result = run_classic_example(
            splits,
            epochs=args.epochs or 14,
            target_acc=args.target_acc,
            batch_size=args.batch_size,
            lr=1.0 if args.lr is None else args.lr,
            threads=threads,
            max_steps=args.max_steps,
            stop_at_target=args.stop_at_target,
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
