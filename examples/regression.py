"""Regression with your own data and loss, under DDP with 2 processes.

Real-valued targets stay real-valued: ``--loss mse`` (or l1/huber) picks the regression
metrics -- MSE, MAE and R², computed from per-sample sums over every rank, so they equal a
one-process evaluation. The data is float64 (as numpy/pandas often give it); dptrain converts
it once to the model's float32 and says so.

Run:  python examples/regression.py [OUT_DIR]
   or dptrain train --dataset examples.regression:make_data --model examples.regression:make_model \
        --loss mse --nproc 2 --epochs 5 --lr 0.05      (with the repository root on PYTHONPATH)
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import dptrain


def make_data():
    """y = sin(x0) + x1 * x2 + noise, 8 features: (train_x, train_y, test_x, test_y)."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 8, generator=g, dtype=torch.float64)
        y = torch.sin(x[:, 0]) + x[:, 1] * x[:, 2] + 0.05 * torch.randn(n, generator=g,
                                                                       dtype=torch.float64)
        return x, y

    tx, ty = split(8192)
    vx, vy = split(2048)
    return tx, ty, vx, vy


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 1))


if __name__ == "__main__":  # needed: the worker processes re-import this file
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/example-regression"
    summary = dptrain.fit(make_model, make_data, loss="mse", nproc=2, epochs=5, lr=0.05,
                          batch_size=64, optimizer="adam", out=out, quiet=True)
    m = summary["test_metrics"]
    print(f"test MSE {m['mse']:.4f}  MAE {m['mae']:.4f}  R² {m['r2']:.4f} "
          f"({m['samples']} samples, {summary['world_size']} processes)")
