"""One process, one device: the reference every other strategy must match."""

from __future__ import annotations

from dptrain.strategies.base import Strategy


class SingleDevice(Strategy):
    name = "single"
