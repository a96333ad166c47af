"""Functions run inside launched workers (importable by spawn)."""

from __future__ import annotations

import torch

from dptrain import dist
from dptrain.config import TrainConfig
from dptrain.data.datasets import synthetic
from dptrain.data.loader import Normalizer
from dptrain.loop import evaluate
from dptrain.models import build_model
from dptrain.strategies import build


def eval_worker(model_name: str) -> tuple[float, float, int]:
    """Evaluate a seeded, untrained-but-fixed model on the synthetic test split."""
    env = dist.detect()
    strategy = build(TrainConfig(strategy="ddp", device="cpu"), env)
    strategy.setup()
    try:
        torch.manual_seed(0)
        model = build_model(model_name)
        splits = synthetic()
        return evaluate(model, splits.test_x, splits.test_y, strategy,
                        Normalizer(splits.mean, splits.std), 64, torch.autocast("cpu",
                                                                                 enabled=False))
    finally:
        strategy.teardown()
