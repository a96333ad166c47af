"""Datasets as whole-split tensors: MNIST, Fashion-MNIST, a seeded synthetic set, plug-ins.

A :class:`Splits` holds the train and test splits as tensors (uint8 images for the built-in
sets) that the loader moves to the training device once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from dptrain.errors import UsageError

# (mean, std) of the training pixels in [0, 1]; the loader normalises with them per batch.
NORMALISATION = {
    "mnist": (0.1307, 0.3081),
    "fashion-mnist": (0.2860, 0.3530),
    "synthetic": (0.1307, 0.3081),
}
RAW_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

SYNTHETIC_TRAIN = 6_000
SYNTHETIC_TEST = 1_000


@dataclass
class Splits:
    """Train and test tensors. ``mean``/``std`` set means "uint8 pixels, normalise per batch"."""

    name: str
    train_x: torch.Tensor | torch.utils.data.Dataset
    train_y: torch.Tensor | None
    test_x: torch.Tensor | torch.utils.data.Dataset
    test_y: torch.Tensor | None
    mean: float | None = None
    std: float | None = None

    @property
    def is_dataset(self) -> bool:
        return not isinstance(self.train_x, torch.Tensor)

    def to(self, device: torch.device) -> Splits:
        if self.is_dataset:  # batches are moved as the DataLoader produces them
            return self
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Splits(self.name, move(self.train_x), move(self.train_y), move(self.test_x),
                      move(self.test_y), self.mean, self.std)


def synthetic(n_train: int = SYNTHETIC_TRAIN, n_test: int = SYNTHETIC_TEST, seed: int = 1234,
              noise: float = 70.0) -> Splits:
    """An MNIST-shaped, learnable, seeded dataset for tests: class prototypes plus noise.

    Always the same data (its own seed, independent of the training seed). A linear model
    reaches well above 90 % on it within one epoch; it is not separable by a single pixel.
    """
    rng = np.random.default_rng(seed)
    # smooth prototypes: random blobs, so that convolutions have structure to find
    protos = np.zeros((10, 28, 28), dtype=np.float64)
    yy, xx = np.mgrid[0:28, 0:28]
    for c in range(10):
        for _ in range(4):
            cy, cx = rng.uniform(6, 22, size=2)
            s = rng.uniform(2.0, 4.5)
            protos[c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    protos = 255.0 * protos / protos.max(axis=(1, 2), keepdims=True)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = rng.integers(0, 10, size=n)
        images = protos[labels] * rng.uniform(0.6, 1.0, size=(n, 1, 1))
        images = images + rng.normal(0.0, noise, size=images.shape)
        images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    tx, ty = make(n_train)
    vx, vy = make(n_test)
    mean, std = NORMALISATION["synthetic"]
    return Splits("synthetic", tx, ty, vx, vy, mean, std)


def idx_dataset(name: str, root: Path, *, log: Callable[[str], None] = print) -> Splits:
    """MNIST or Fashion-MNIST from IDX files under ``root``, fetched on first use."""
    from dptrain.data.fetch import ensure_dataset
    from dptrain.data.idx import load_mnist_split

    ensure_dataset(name, root, log=log)
    tx, ty = load_mnist_split(root, "train", name=RAW_DIRS[name])
    vx, vy = load_mnist_split(root, "test", name=RAW_DIRS[name])
    to = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt)  # noqa: E731
    mean, std = NORMALISATION[name]
    return Splits(name, to(tx, torch.uint8), to(ty, torch.int64), to(vx, torch.uint8),
                  to(vy, torch.int64), mean, std)


def plugin_dataset(spec: str) -> Splits:
    """``package.module:factory`` returning ``(train_x, train_y, test_x, test_y)`` tensors,
    or ``(train_dataset, test_dataset)``: map-style Datasets yielding ``(x, label)``.

    Tensors are moved to the device whole; Datasets go through a sharded DataLoader. uint8
    images are normalised per batch like MNIST; float images are used as given.
    """
    from dptrain.models import load_factory

    result = load_factory(spec, "dataset")()
    if isinstance(result, dict):
        keys = ("train_x", "train_y", "test_x", "test_y")
        if not all(k in result for k in keys):
            raise UsageError(f"--dataset {spec!r}: the dict must have keys {', '.join(keys)}")
        result = tuple(result[k] for k in keys)
    if (isinstance(result, tuple | list) and len(result) == 2
            and all(isinstance(d, torch.utils.data.Dataset) for d in result)):
        train, test = result
        for ds, split in ((train, "train"), (test, "test")):
            if len(ds) == 0:
                raise UsageError(f"--dataset {spec!r}: the {split} Dataset is empty")
        first = train[0][0]
        uint8 = isinstance(first, torch.Tensor) and first.dtype == torch.uint8
        mean, std = NORMALISATION["mnist"] if uint8 else (None, None)
        return Splits(spec, train, None, test, None, mean, std)
    if not (isinstance(result, tuple | list) and len(result) == 4
            and all(isinstance(t, torch.Tensor) for t in result)):
        raise UsageError(f"--dataset {spec!r}: the factory must return four tensors "
                         "(train_x, train_y, test_x, test_y)")
    tx, ty, vx, vy = result
    for x, y, split in ((tx, ty, "train"), (vx, vy, "test")):
        if len(x) != len(y):
            raise UsageError(f"--dataset {spec!r}: {split} has {len(x)} inputs but {len(y)} "
                             "labels")
        if len(x) == 0:
            raise UsageError(f"--dataset {spec!r}: the {split} split is empty")
    if tx.dtype == torch.uint8:
        mean, std = NORMALISATION["mnist"]
    else:
        mean = std = None
    return Splits(spec, tx, ty.long(), vx, vy.long(), mean, std)


def load_splits(name: str, root: str | Path, *, log: Callable[[str], None] = print) -> Splits:
    """Any dataset by name (or plug-in spec), on the CPU."""
    if ":" in name:
        return plugin_dataset(name)
    if name == "synthetic":
        return synthetic()
    if name in RAW_DIRS:
        return idx_dataset(name, Path(root), log=log)
    raise UsageError(f"unknown --dataset {name!r}: use mnist, fashion-mnist, synthetic or "
                     "package.module:factory")
