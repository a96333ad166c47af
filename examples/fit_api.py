"""dptrain's Python API with your own model and data, under DDP with 2 processes.

The model has a parameter that never gets a gradient (``unused``): plain DDP would stop with
"Expected to have finished reduction in the prior iteration"; ``find_unused_parameters=True``
makes DDP walk the autograd graph each step and mark such parameters ready.

Run:  python examples/fit_api.py [OUT_DIR]
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import Dataset

import dptrain


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
        self.unused = nn.Linear(64, 10)  # e.g. an auxiliary head switched off in this run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_model() -> nn.Module:
    return TwoHeads()


class Blobs(Dataset):
    """A map-style dataset: 10 noisy prototypes, one sample at a time (uint8 images)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.protos = torch.rand(10, 28, 28, generator=g) * 255
        g.manual_seed(seed)
        self.labels = torch.randint(0, 10, (n,), generator=g)
        self.noise = torch.randn(n, 28, 28, generator=g) * 250

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = (self.protos[self.labels[i]] + self.noise[i]).clamp(0, 255).to(torch.uint8)
        return img, int(self.labels[i])


def make_data() -> tuple[Dataset, Dataset]:
    return Blobs(4000, seed=1), Blobs(1000, seed=2)


if __name__ == "__main__":  # worker processes re-import this file: keep the launch behind it
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/fit-api"
    summary = dptrain.fit(make_model, make_data, nproc=2, epochs=2, batch_size=32, lr=0.02,
                          find_unused_parameters=True, out=out, threads=1)
    print(f"test accuracy {summary['test_accuracy']:.4f} on {summary['test_samples']} samples, "
          f"{summary['strategy']} x {summary['world_size']}")
