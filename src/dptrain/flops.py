"""Model FLOPs and model FLOP utilisation (MFU).

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode`: the operators that do
the arithmetic (matmuls, convolutions, attention; a multiply-add counts as 2 FLOPs) while the
model runs forward once. Elementwise work (bias, BatchNorm, ReLU, pooling, the loss) is not
counted: it is memory-bound and small beside the matmuls -- the usual convention for MFU
(PaLM, nanoGPT).

Training costs about **3x** the forward FLOPs: the backward pass computes the gradients of the
inputs and of the weights, each as costly as the forward (:data:`TRAIN_FACTOR`). The first
layer needs no input gradient, so 3x slightly overstates a 1-layer model; the convention is
kept so that MFU figures compare with the published ones.

``MFU = training FLOPs per sample x samples/s / peak FLOP/s``, with the peak measured for the
precision the run used (:func:`dptrain.hardware.matmul_peak`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

TRAIN_FACTOR = 3  # forward + backward (input gradients + weight gradients)
Call = Literal["auto", "single", "positional", "keyword"]


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, list | tuple):
        for item in x:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def batch_size_of(example: Any) -> int:
    """The leading dimension of the first tensor in ``example`` (nested tuples/lists/dicts).

    Raises:
        ValueError: no tensor in ``example``, or a 0-d one.
    """
    t = _first_tensor(example)
    if t is None or t.dim() == 0:
        raise ValueError("cannot tell the batch size: the example input holds no tensor with a "
                         "batch dimension; pass batch_size=")
    return int(t.shape[0])


def call_model(model: nn.Module, x: Any, call: Call = "auto") -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)``.

    ``auto``: a dict (any mapping) is passed as keywords, a tuple or list as positional
    arguments, anything else as the one argument. ``single`` always passes ``x`` as it is (a
    model that takes one tuple), ``positional`` unpacks a sequence, ``keyword`` a mapping.
    """
    if call == "auto":
        call = ("keyword" if isinstance(x, Mapping) else
                "positional" if isinstance(x, list | tuple) else "single")
    if call == "keyword":
        return model(**x)
    if call == "positional":
        return model(*x)
    if call == "single":
        return model(x)
    raise ValueError(f"call must be auto, single, positional or keyword, got {call!r}")


def forward_flops(model: nn.Module, example: Any, call: Call = "auto") -> int:
    """FLOPs of one forward pass of ``model`` on the whole ``example`` batch.

    Runs in eval mode under ``torch.no_grad()`` so that nothing about the model changes
    (BatchNorm's running statistics stay as they were); the training mode is restored.
    """
    from torch.utils import flop_counter

    from dptrain import lazydynamo

    mode = getattr(flop_counter, "_FlopCounterMode", None)  # its dispatch mode (torch 2.13)
    if isinstance(mode, type):
        lazydynamo.defer(mode)  # counting needs no torch._dynamo
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(model, example, call)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def model_flops_per_sample(model: nn.Module, example_batch_input: Any, *, call: Call = "auto",
                           batch_size: int | None = None) -> int:
    """Forward FLOPs for one sample (multiply-add = 2); training costs :data:`TRAIN_FACTOR` x.

    Args:
        model: Any module, on the device ``example_batch_input`` is on.
        example_batch_input: What the model is called with: a tensor, a tuple/list, a dict,
            nested as the model needs (see :func:`call_model`). A small batch is enough: the
            count is divided by its batch size.
        call: How to pass ``example_batch_input`` (:func:`call_model`).
        batch_size: Samples in the example; default the leading dimension of its first tensor.

    Example: ``model_flops_per_sample(nn.Linear(784, 10), torch.zeros(8, 784)) == 15680``.
    """
    n = batch_size if batch_size is not None else batch_size_of(example_batch_input)
    if n < 1:
        raise ValueError(f"batch_size must be at least 1, got {n}")
    total = forward_flops(model, example_batch_input, call)
    return -(-total // n)  # ceil: a count per sample is never rounded to 0


def train_flops_per_sample(forward_flops_per_sample: int) -> int:
    """Training FLOPs per sample: forward + backward = :data:`TRAIN_FACTOR` x forward."""
    return TRAIN_FACTOR * forward_flops_per_sample


def mfu(flops_per_sample_train: float, samples_per_s: float, peak_flops: float) -> float:
    """Model FLOP utilisation: achieved training FLOP/s over the peak (0..1, can exceed 1 only
    if the peak was under-measured).

    Args:
        flops_per_sample_train: Training FLOPs per sample (3x the forward count).
        samples_per_s: Throughput of the device (or process) the peak belongs to.
        peak_flops: Peak FLOP/s of that device for the precision used.

    Raises:
        ValueError: a negative or non-finite figure, or a peak that is not positive.
    """
    values = (flops_per_sample_train, samples_per_s, peak_flops)
    if not all(isinstance(v, int | float) and v == v and abs(v) != float("inf")
               for v in values):
        raise ValueError(f"mfu needs finite numbers, got {values}")
    if flops_per_sample_train < 0 or samples_per_s < 0:
        raise ValueError("FLOPs per sample and samples/s must not be negative")
    if not peak_flops > 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops}")
    return flops_per_sample_train * samples_per_s / peak_flops


def achieved_flops(flops_per_sample_train: float, samples_per_s: float) -> float:
    """Training FLOP/s achieved: FLOPs per sample x samples/s."""
    return flops_per_sample_train * samples_per_s


def summary_fields(model: nn.Module, example_batch_input: Any, *, samples_per_s: float | None,
                   world_size: int, precision: str, device: torch.device | str = "cpu",
                   call: Call = "auto") -> dict[str, Any]:
    """What ``summary.json`` reports about FLOPs: per-sample counts, the peak used and MFU.

    Call it on rank 0 after training (the peak is measured there, ~1 s the first time on a
    machine, then cached: :func:`dptrain.hardware.matmul_peak`), with the *unwrapped* model.

    Args:
        model: The trained model (not the DDP/DP wrapper).
        example_batch_input: One input batch as the model takes it (:func:`call_model`).
        samples_per_s: Global training throughput (``train_samples_per_s``); None = unknown.
        world_size: Processes (devices) that throughput was shared by.
        precision: ``--precision`` (``32``, ``bf16``, ``16``): picks the peak.
        device: The training device (a CUDA device measures the GPU's peak).
        call: How to call the model (:func:`call_model`).

    Returns:
        ``model_flops_per_sample`` (forward), ``train_flops_per_sample`` (3x), ``peak_flops``
        (per device, measured for ``precision``), ``peak_precision``, ``peak_threads``, and
        ``mfu`` = train FLOPs x samples/s per device / peak (None when unknown). A run that
        achieves more than the cached peak re-measures it first (the cache keeps the higher).
    """
    from dptrain import hardware

    forward = model_flops_per_sample(model, example_batch_input, call=call)
    train = train_flops_per_sample(forward)
    dev = torch.device(device)
    name = {"32": "fp32", "bf16": "bf16", "16": "fp16"}.get(str(precision), str(precision))
    if dev.type == "cpu" and name == "fp16":
        name = "fp32"  # fp16 autocast is CUDA-only in dptrain
    peak = hardware.matmul_peak(name, device=dev)
    per_device = samples_per_s / world_size if samples_per_s and world_size > 0 else None
    if per_device is not None and train * per_device > peak:
        # training beat the cached peak: that figure was measured on a busy machine; measure
        # again now (the cache keeps the higher figure)
        peak = hardware.matmul_peak(name, device=dev, refresh=True)
    return {"model_flops_per_sample": forward, "train_flops_per_sample": train,
            "peak_flops": peak, "peak_precision": name,
            "peak_threads": torch.get_num_threads() if dev.type == "cpu" else None,
            "mfu": mfu(train, per_device, peak) if per_device is not None else None}
