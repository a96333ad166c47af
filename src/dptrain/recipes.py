"""Named, tuned presets (``--recipe NAME``). Explicit flags and ``--config`` override them.

A preset may leave a value to the hardware: ``mnist-fast`` trains in bf16 where the CPU runs
it natively (AMX-BF16 or AVX512-BF16: a matmul ~3x faster than fp32 on a 2-core Xeon) and in
fp32 elsewhere, where bf16 is emulated and 100x slower (:func:`dptrain.hardware.native_bf16`).
The choice is written into the run's ``config.toml`` like every other value, so replaying a
run replays its precision.
"""

from __future__ import annotations

from typing import Any

from dptrain.errors import UsageError

AUTO = "auto"  # a recipe value decided by :func:`resolve_auto` on this machine

RECIPES: dict[str, dict[str, Any]] = {
    # >= 99 % MNIST test accuracy in the least wall time on CPU (benchmarks/speed.py)
    "mnist-fast": {
        "dataset": "mnist",
        # fastnet with a 4x4 stride-2 first convolution: a step 0.77x (bf16) / 0.82x (fp32)
        # of fastnet's (results/recipe_stem.json)
        "model": "fastnet-strided",
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "schedule": "onecycle",
        "batch_size": 128,
        # 375 steps of 128. Over seeds 0-9 (results/recipe_length_strided.json): bf16 mean
        # 99.06 %, min 98.96 %; fp32 99.10 %, min 98.99 %. At 0.75 of an epoch the means
        # were 99.05 / 99.04 % (min 98.95 / 98.94 %): too close. fastnet itself held 0.75
        # (results/recipe_length.json) but trains 351 steps in more time than this 375.
        "epochs": 0.8,
        "label_smoothing": 0.1,
        "channels_last": "on",  # 2.3x faster convolutions on CPU (oneDNN), same accuracy
        "precision": AUTO,  # bf16 where the CPU runs it natively, else 32 (precision_choice)
        "log_every": 100,
    },
}


def precision_choice() -> tuple[str, str]:
    """The precision a hardware-aware recipe trains in here, and why.

    ``bf16`` when the CPU runs bf16 natively and a visible GPU (if any) supports bf16 too;
    otherwise ``32``. On a GPU a model this small is bound by kernel launches, not arithmetic,
    so bf16 neither helps nor hurts much there; on a CPU without native bf16 it would be two
    orders of magnitude slower.
    """
    from dptrain import hardware

    info = hardware.cpu_info()
    if not hardware.native_bf16():
        return "32", (f"fp32: bf16 is emulated on {info.model}, far slower "
                      f"({hardware.why_not_native_bf16() or 'not native'})")
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "32", "fp32: the visible GPU does not support bf16"
    native = "AMX-BF16" if "amx_bf16" in info.flags else "AVX512-BF16"
    return "bf16", f"bf16: {info.model} runs it natively ({native})"


def resolve_auto(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every :data:`AUTO` entry decided for this machine."""
    out = dict(values)
    if out.get("precision") == AUTO:
        out["precision"] = precision_choice()[0]
    leftover = [k for k, v in out.items() if v == AUTO]
    if leftover:  # a recipe author's mistake, caught by the tests
        raise ValueError(f"recipe values {leftover} are 'auto' but nothing decides them")
    return out


def recipe_values(name: str) -> dict[str, Any]:
    """The preset ``name`` as config values, hardware-dependent ones decided here."""
    try:
        values = RECIPES[name]
    except KeyError:
        raise UsageError(f"unknown --recipe {name!r}: use one of {', '.join(RECIPES)}") from None
    return resolve_auto(values)
