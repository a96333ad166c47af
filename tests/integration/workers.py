"""Functions run inside launched workers (importable by spawn)."""

from __future__ import annotations

from typing import Any

import torch

from dptrain import dist
from dptrain.config import TrainConfig
from dptrain.data.datasets import load_splits
from dptrain.data.loader import Normalizer
from dptrain.evaluation import evaluate
from dptrain.models import build_model
from dptrain.objective import Objective
from dptrain.plan import make_plan
from dptrain.precision import Precision
from dptrain.strategies import build


def eval_worker(model_name: str, dataset: str = "synthetic", loss: str = "cross_entropy"
                ) -> dict[str, Any]:
    """Evaluate a seeded, untrained-but-fixed model on a test split, sharded over the ranks."""
    env = dist.detect()
    strategy = build(make_plan(TrainConfig(strategy="ddp", device="cpu"), env), env)
    strategy.setup()
    try:
        return evaluate_fixed(model_name, dataset, loss, strategy)
    finally:
        strategy.teardown()


def evaluate_fixed(model_name: str, dataset: str, loss: str, strategy: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(model_name)
    splits = load_splits(dataset, "unused")
    objective = Objective(loss)
    test_y = objective.prepare_targets(splits.test_y, "test")
    xb = splits.test_x[:2] if splits.mean is None else Normalizer(splits.mean, splits.std)(
        splits.test_x[:2])
    objective.check_output(model(xb), test_y[:2], [test_y])
    return evaluate(model, splits.test_x, test_y, strategy, objective,
                    Precision("32", torch.device("cpu")), 100,
                    Normalizer(splits.mean, splits.std))
