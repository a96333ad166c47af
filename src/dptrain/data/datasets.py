"""Datasets as whole-split tensors: MNIST, Fashion-MNIST, a seeded synthetic set, plug-ins.

A :class:`Splits` holds the train and test splits as tensors (uint8 images for the built-in
sets) that the loader moves to the training device once.
"""

from __future__ import annotations

import dataclasses
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
    train_x: object  # a tensor, a structure of tensors, or a Dataset
    train_y: torch.Tensor | None
    test_x: object
    test_y: torch.Tensor | None
    mean: float | None = None
    std: float | None = None
    val_x: object = None  # a seeded hold-out of the training split (--val-fraction), or None
    val_y: torch.Tensor | None = None

    @property
    def has_val(self) -> bool:
        return self.val_x is not None

    def normalization(self) -> dict[str, object]:
        """What inference needs to feed the model as training did: uint8 pixels scaled by
        ``(x / 255 - mean) / std`` (and a channel dimension added to (N, H, W) images), or the
        data used as given (``mean``/``std`` null)."""
        if self.mean is None:
            return {"mean": None, "std": None, "input": "as given", "dataset": self.name}
        return {"mean": self.mean, "std": self.std, "input": "uint8 pixels, x / 255",
                "dataset": self.name}

    def hold_out(self, fraction: float, seed: int) -> Splits:
        """Move a seeded ``fraction`` of the training split into ``val_x``/``val_y``.

        The held-out samples are the first ``floor(fraction * n)`` of a permutation drawn from
        the seed alone (not the epoch: the same on every rank, every epoch and every restart);
        both parts keep the original sample order. Tensors and structures of tensors are
        indexed, a Dataset becomes two ``torch.utils.data.Subset``."""
        if fraction <= 0:
            return self
        n = len(self.train_x) if self.is_dataset else _num_samples(self.train_x)
        n_val = int(fraction * n)
        if n_val < 1 or n_val >= n:
            raise UsageError(f"--val-fraction {fraction:g} of {n} training samples holds out "
                             f"{n_val}; choose a fraction that leaves at least one sample on "
                             "each side")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 1_000_001)  # no epoch's seed
        perm = torch.randperm(n, generator=gen)
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        if self.is_dataset:
            return self.replace(
                train_x=torch.utils.data.Subset(self.train_x, train_idx.tolist()),
                val_x=torch.utils.data.Subset(self.train_x, val_idx.tolist()), val_y=None)
        from dptrain.data.batch import index

        def take(tree: object, idx: torch.Tensor) -> object:
            return index(tree, idx.to(_device_of(tree)))

        y = self.train_y
        return self.replace(
            train_x=take(self.train_x, train_idx), val_x=take(self.train_x, val_idx),
            train_y=None if y is None else y.index_select(0, train_idx.to(y.device)),
            val_y=None if y is None else y.index_select(0, val_idx.to(y.device)))

    @property
    def is_dataset(self) -> bool:
        return isinstance(self.train_x, torch.utils.data.Dataset)

    def to(self, device: torch.device) -> Splits:
        if self.is_dataset:  # batches are moved as the DataLoader produces them
            return self
        from dptrain.data.batch import to_device

        return Splits(self.name, to_device(self.train_x, device), to_device(self.train_y, device),
                      to_device(self.test_x, device), to_device(self.test_y, device), self.mean,
                      self.std, to_device(self.val_x, device), to_device(self.val_y, device))

    def replace(self, **changes: object) -> Splits:
        return dataclasses.replace(self, **changes)


def _num_samples(tree: object) -> int:
    from dptrain.data.batch import num_samples

    return num_samples(tree)


def _device_of(tree: object) -> torch.device:
    from dptrain.data.batch import leaves

    found = leaves(tree)
    return found[0].device if found else torch.device("cpu")


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
    """``package.module:factory`` returning ``(train_x, train_y, test_x, test_y)`` (or a dict
    with those keys), or ``(train_dataset, test_dataset)``: map-style Datasets.

    ``*_x`` may be a tensor or a tuple/list/dict of tensors (a multi-input model, a dict batch);
    ``*_y`` a tensor, or ``None`` for a model that computes its own loss. A Dataset's samples
    are ``(x, y)`` (more elements: the last is the target, the rest the inputs) or a dict
    (passed as ``model(**batch)``, targets from its ``labels`` key). Tensors are moved to the
    device whole; Datasets go through a sharded DataLoader. uint8 images are normalised per
    batch like MNIST; everything else is used as given, targets keep their dtype.
    """
    from dptrain.data import batch as B
    from dptrain.models import call_plugin, load_factory

    result = call_plugin(spec, "dataset", load_factory(spec, "dataset"))
    if isinstance(result, dict):
        keys = ("train_x", "train_y", "test_x", "test_y")
        if not all(k in result for k in keys):
            raise UsageError(f"--dataset {spec!r}: the dict must have keys {', '.join(keys)}")
        result = tuple(result[k] for k in keys)
    if (isinstance(result, tuple | list) and len(result) == 2
            and all(isinstance(d, torch.utils.data.Dataset) for d in result)):
        train, test = result
        for ds, split in ((train, "train"), (test, "test")):
            try:
                n = len(ds)
            except TypeError:
                raise UsageError(f"--dataset {spec!r}: the {split} Dataset has no len(); "
                                 "dptrain needs map-style Datasets") from None
            if n == 0:
                raise UsageError(f"--dataset {spec!r}: the {split} Dataset is empty")
        first = split_sample(train[0])[0]
        uint8 = isinstance(first, torch.Tensor) and first.dtype == torch.uint8
        mean, std = NORMALISATION["mnist"] if uint8 else (None, None)
        return Splits(spec, train, None, test, None, mean, std)
    if not (isinstance(result, tuple | list) and len(result) == 4):
        raise UsageError(f"--dataset {spec!r}: the factory must return four items "
                         "(train_x, train_y, test_x, test_y) or two Datasets")
    tx, ty, vx, vy = result
    # HuggingFace style: the inputs dict carries the labels (for the model's own loss)
    ty = tx.get("labels") if ty is None and isinstance(tx, dict) else ty
    vy = vx.get("labels") if vy is None and isinstance(vx, dict) else vy
    for x, y, split in ((tx, ty, "train"), (vx, vy, "test")):
        if not B.leaves(x):
            raise UsageError(f"--dataset {spec!r}: {split}_x must be a tensor or a "
                             f"tuple/list/dict of tensors, got {type(x).__name__}")
        if y is not None and not isinstance(y, torch.Tensor):
            raise UsageError(f"--dataset {spec!r}: {split}_y must be a tensor (or None), got "
                             f"{type(y).__name__}")
        n = B.num_samples(x, f"{split} inputs")
        if y is not None and len(y) != n:
            raise UsageError(f"--dataset {spec!r}: {split} has {n} inputs but {len(y)} "
                             "labels")
        if n == 0:
            raise UsageError(f"--dataset {spec!r}: the {split} split is empty")
    uint8 = isinstance(tx, torch.Tensor) and tx.dtype == torch.uint8
    mean, std = NORMALISATION["mnist"] if uint8 else (None, None)
    return Splits(spec, tx, ty, vx, vy, mean, std)


def split_sample(sample: object) -> tuple[object, object]:
    """A Dataset sample (or collated batch) -> ``(inputs, targets)``; see :func:`plugin_dataset`."""
    if isinstance(sample, dict):
        return sample, sample.get("labels")
    if isinstance(sample, tuple | list):
        if len(sample) == 2:
            return sample[0], sample[1]
        if len(sample) > 2:
            return tuple(sample[:-1]), sample[-1]
    return sample, None


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
