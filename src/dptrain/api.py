"""The Python API: ``dptrain.fit(...)`` runs the same loop, strategies and launcher as the CLI.

Example::

    import dptrain

    def make_model():                      # top level: worker processes import it by name
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))

    if __name__ == "__main__":             # needed: workers re-import this file
        summary = dptrain.fit(make_model, "mnist", nproc=2, epochs=1, lr=0.05)
        print(summary["test_accuracy"])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from dptrain.errors import UsageError


def _spec(obj: str | Callable[..., Any], what: str) -> str:
    """A registry name / ``module:factory`` string, or a top-level function turned into one."""
    if isinstance(obj, str):
        return obj
    if not callable(obj):
        raise UsageError(f"{what} must be a name, 'package.module:factory' or a function, got "
                         f"{type(obj).__name__}")
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or "." in qualname or "<" in qualname:
        raise UsageError(f"{what} factory {obj!r} must be a top-level function (worker "
                         "processes import it by name); move it out of any class or function")
    if inspect.isclass(obj) and not callable(obj):  # pragma: no cover - classes are callable
        raise UsageError(f"{what} factory {obj!r} is not callable")
    return f"{module}:{qualname}"


def fit(model: str | Callable[[], Any] = "linear", dataset: str | Callable[[], Any] = "mnist",
        **options: Any) -> dict[str, Any]:
    """Train a model data-parallel and return the run summary (as ``summary.json``).

    Args:
        model: ``linear``/``convnet``/``cnn``/..., ``"package.module:factory"``, or a
            top-level function returning an ``nn.Module``.
        dataset: ``mnist``/``fashion-mnist``/``synthetic``, a spec string, or a top-level
            function returning ``(train_x, train_y, test_x, test_y)`` tensors or
            ``(train_dataset, test_dataset)``.
        **options: any ``dptrain train`` setting by its field name, e.g. ``nproc=2``,
            ``epochs=3``, ``find_unused_parameters=True``, ``out="runs/x"``.

    Returns:
        Rank 0's summary dict (``test_accuracy``, ``train_samples_per_s``, ...).

    Raises:
        UsageError: for invalid settings (the CLI turns it into ``error: ...``).
    """
    from dptrain.cli import run_training
    from dptrain.config import TrainConfig, coerce

    values = coerce({**options, "model": _spec(model, "model"),
                     "dataset": _spec(dataset, "dataset")}, source="dptrain.fit")
    cfg = TrainConfig(**values).validate()
    summary = run_training(cfg)
    if summary is None:  # a non-zero rank under an external launcher
        return {}
    return summary
