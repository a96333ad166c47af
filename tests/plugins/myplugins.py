"""Plug-ins defined outside the package, as a user would write them (on PYTHONPATH)."""

from __future__ import annotations

import torch
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def not_a_module() -> int:
    return 3


class WithUnused(nn.Module):
    """A model whose ``extra`` head gets no gradient: DDP needs find_unused_parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.extra = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def with_unused() -> nn.Module:
    return WithUnused()


def blobs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float features (already normalised), 10 classes, learnable."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 1, 28, 28, generator=g)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        return centers[y] + 0.8 * torch.randn(n, 1, 28, 28, generator=g), y

    tx, ty = make(2000)
    vx, vy = make(500)
    return tx, ty, vx, vy


class Exploding(nn.Module):
    """Linear model whose forward raises on rank 1 at its 5th call: an injected worker crash."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os

        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == 5:
            raise RuntimeError("injected failure in rank 1")
        return self.body(x)


def exploding() -> nn.Module:
    return Exploding()


class BlobDataset(torch.utils.data.Dataset):
    """Map-style: the tensors of :func:`blobs`, served one sample at a time."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def blob_datasets() -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    tx, ty, vx, vy = blobs()
    return BlobDataset(tx, ty), BlobDataset(vx, vy)


def counted_data():
    """A tensor dataset that records every build (one file per call, named by pid) in
    $DPTRAIN_TEST_BUILDS: built once per node, there is exactly one."""
    import os
    from pathlib import Path

    builds = Path(os.environ["DPTRAIN_TEST_BUILDS"])
    builds.mkdir(parents=True, exist_ok=True)
    (builds / f"build-{os.getpid()}").write_text("built")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(600, 784, generator=gen)
    w = torch.randn(784, 10, generator=gen)
    y = (x @ w).argmax(1)
    return x[:500].reshape(500, 1, 28, 28), y[:500], x[500:].reshape(100, 1, 28, 28), y[500:]


def gc_probe() -> nn.Module:
    """mlp, and the garbage collector's state where the model is built to $GC_PROBE."""
    import gc
    import json
    import os

    with open(os.environ["GC_PROBE"], "w") as f:
        json.dump({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}, f)
    return mlp()


def affinity_probe() -> nn.Module:
    """mlp, and this process's CPU affinity where the model is built to $AFFINITY_PROBE.RANK."""
    import json
    import os

    with open(f"{os.environ['AFFINITY_PROBE']}.{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(sorted(os.sched_getaffinity(0)), f)
    return mlp()
