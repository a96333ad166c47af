"""dptrain: data-parallel training with PyTorch that you can trust and measure."""

from __future__ import annotations

__version__ = "0.1.0"
