"""Plug-in models that inject faults into real worker processes (tests/robustness)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class HangOnRank1(nn.Module):
    """Linear model whose forward never returns on rank 1 from its 3rd call: a hung worker
    (it keeps sleeping through SIGTERM, as a worker stuck in a C call or a deadlock would)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls >= 3:
            while True:
                time.sleep(3600)
        return self.body(x)


def hang_on_rank1() -> nn.Module:
    return HangOnRank1()


class Gated(nn.Module):
    """Linear model whose training forward waits while the file named by $DPTRAIN_TEST_GATE
    exists: a run that stays in training, holding its --out, exactly as long as a test needs
    (the eval-mode dry run before training passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.gate = os.environ.get("DPTRAIN_TEST_GATE", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        while self.training and self.gate and os.path.exists(self.gate):
            time.sleep(0.01)
        return self.body(x)


def gated() -> nn.Module:
    return Gated()
