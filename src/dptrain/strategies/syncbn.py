"""Synchronised BatchNorm for every backend.

``torch.nn.SyncBatchNorm`` only runs on GPUs (DDP refuses it on CPU modules), so for gloo/CPU
this module provides :class:`CrossRankBatchNorm`: batch statistics are computed over the
*global* batch with differentiable all-reduces, exactly as one process would compute them over
the concatenated batch (two passes: mean, then the centred sum of squares).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as tdist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# The autograd-aware all_reduce is what we need (its gradient is the all-reduced gradient);
# its replacement in _functional_collectives has no autograd on every backend yet.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce")


class CrossRankBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span all ranks (any backend, any device)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and tdist.is_initialized() and tdist.get_world_size() > 1):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        sums = dist_fn.all_reduce(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = dist_fn.all_reduce((centred * centred).sum(dims)) / n  # biased, as BN normalises
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm: torch's SyncBatchNorm on CUDA, CrossRankBatchNorm elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        new = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats).to(device)
        with torch.no_grad():
            if module.affine:
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
            if module.track_running_stats:
                new.running_mean.copy_(module.running_mean)
                new.running_var.copy_(module.running_var)
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert(child, device))
    return module
