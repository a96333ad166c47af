"""``nn.DataParallel``: one process, one thread per GPU, gradients reduced onto GPU 0.

The process feeds a batch of ``--batch-size`` samples per step; DataParallel scatters it over
the visible GPUs, replicates the model every forward and gathers outputs on GPU 0 -- which
is why GPU 0 holds more memory than the others (``dptrain bench`` measures it).
"""

from __future__ import annotations

import torch
from torch import nn

from dptrain.errors import UsageError
from dptrain.strategies.base import Strategy


class DataParallel(Strategy):
    name = "dp"

    def setup(self) -> None:
        if not torch.cuda.is_available():
            raise UsageError("--strategy dp needs CUDA GPUs (nn.DataParallel is GPU-only); "
                             "on CPU use --strategy ddp --nproc N")
        if self.env.world_size > 1:
            raise UsageError("--strategy dp runs in ONE process; do not launch it with "
                             "torchrun/srun/--nproc > 1 (use --strategy ddp for that)")
        self.device_ids = list(range(torch.cuda.device_count()))

    def wrap(self, model: nn.Module) -> nn.Module:
        return nn.DataParallel(model, device_ids=self.device_ids, output_device=0)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.DataParallel) else model

    def describe(self) -> dict:
        return {**super().describe(), "gpus": len(self.device_ids)}
