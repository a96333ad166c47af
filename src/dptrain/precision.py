"""Numeric precision as one object: autocast, the fp16 GradScaler, and the scaler's state.

``32``: nothing (no autocast or scaler calls on the hot path). ``bf16``: autocast to bfloat16
(the parameters and the optimizer stay fp32). ``16``: autocast to float16 with a
``GradScaler`` (CUDA only), whose state is checkpointed with the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from dptrain.errors import UsageError

CHOICES = ("32", "bf16", "16")


class Precision:
    """Owns what a precision setting changes in the step and in the checkpoint."""

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in CHOICES:
            raise UsageError(f"--precision {name!r} is not one of {', '.join(CHOICES)}")
        if name == "16" and device.type != "cuda":
            raise UsageError("--precision 16 (fp16 with GradScaler) needs CUDA; on CPU use "
                             "--precision bf16 or 32")
        self.name = name
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(name)
        self.scaler = (torch.amp.GradScaler(device.type) if name == "16" else None)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's context: autocast to the low precision, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def step(self, optimizer: torch.optim.Optimizer, step: Callable[[], None]) -> None:
        """Run the optimizer's update (``step``: its fast path) through the scaler if any."""
        if self.scaler is None:
            step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients in true units before clipping (fp16 only)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
