"""dptrain: data-parallel training with PyTorch that you can trust and measure.

``dptrain.fit(...)`` is the Python API (see :mod:`dptrain.api`), ``dptrain.Session`` the
own-loop API (see :mod:`dptrain.session`), ``dptrain.load_model(path)`` a checkpoint's
model for inference (see :mod:`dptrain.predict`); ``dptrain`` the CLI.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["FitResult", "Session", "__version__", "fit", "load_model"]


def __getattr__(name: str) -> Any:  # lazy: `import dptrain` stays cheap (no torch import)
    if name in ("fit", "FitResult"):
        from dptrain import api

        return getattr(api, name)
    if name == "load_model":
        from dptrain.predict import load_model

        return load_model
    if name == "Session":
        from dptrain.session import Session

        return Session
    raise AttributeError(f"module 'dptrain' has no attribute {name!r}")
