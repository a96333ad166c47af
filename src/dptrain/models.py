"""The models. They carry no parallelism: wrapping happens in ``strategies/``.

Every model maps a normalised ``(N, 1, 28, 28)`` float batch to ``(N, 10)`` logits.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dptrain.errors import UsageError


def linear() -> nn.Module:
    """``Linear(784, 10)``: the model of the DP/DDP tutorials (multinomial logistic regression)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


def convnet() -> nn.Module:
    """The DDP tutorial's ConvNet: 2 x (Conv5x5 + BN + ReLU + MaxPool), 16/32 channels, FC."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=5, stride=1, padding=2),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )

    return _with_split_points(
        nn.Sequential(block(1, 16), block(16, 32), nn.Flatten(), nn.Linear(7 * 7 * 32, 10)),
        {2: ("1",), 3: ("1", "2")})


def cnn() -> nn.Module:
    """The classic PyTorch MNIST example: conv32, conv64, maxpool, dropout .25, fc128, dropout .5."""
    return _with_split_points(nn.Sequential(
        nn.Conv2d(1, 32, 3, 1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(9216, 128),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(128, 10),
    ), {2: ("6",), 3: ("2", "6")})


def fastnet(pool_first: bool = True, strided_stem: bool = False) -> nn.Module:
    """The ``mnist-fast`` recipe's nets: small, BN everywhere, cheap on CPU, 99 %+ in one epoch.

    Each block pools straight after its convolution, then normalises and rectifies the
    pooled map: BatchNorm and ReLU (forward and backward) touch a quarter of the values
    they would after the pool. Conv -> BN -> ReLU -> pool spent half of its step in those
    element-wise passes; this order trains faster on CPU at the same or higher accuracy
    (``benchmarks/recipe_parts.py``). ``pool_first=False`` is the earlier layout
    (``--model fastnet-v1``, what checkpoints written before 2026-12-01 hold).

    ``strided_stem=True`` (``--model fastnet-strided``, the recipe's net since 2026-12-02):
    the first block is one 4x4 convolution of stride 2 (the receptive field and output grid of
    a 3x3 convolution and a 2x2 pool) instead of a 3x3 convolution at 28x28 and a pool. The
    full-resolution 16-channel map, its pool and the pool's backward were the most expensive
    part of the step (a third of it at batch 128, ``--profile``); without them a step takes
    0.77x the time in bf16 and 0.82x in fp32 (``benchmarks/recipe_stem.py``), at a little
    less accuracy per step (``benchmarks/recipe_length.py --model fastnet-strided``).
    """

    def block(cin: int, cout: int) -> nn.Sequential:
        conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        if pool_first:
            return nn.Sequential(conv, nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.ReLU())
        return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    stem = (nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1, bias=False),
                          nn.BatchNorm2d(16), nn.ReLU()) if strided_stem else block(1, 16))
    return _with_split_points(nn.Sequential(
        stem,  # 14x14
        block(16, 32),  # 7x7
        block(32, 64),  # 3x3
        nn.Flatten(),
        nn.Linear(64 * 9, 10),
    ), {2: ("2",), 3: ("1", "2")})


def _with_split_points(model: nn.Sequential, points: dict[int, tuple[str, ...]]
                       ) -> nn.Sequential:
    """Where ``--strategy pipeline`` starts stages 2..S, per stage count S: chosen by the
    layers' multiply-adds (balanced compute), at block boundaries (one tensor passes on).
    Other stage counts are cut by parameter count."""
    model.pipeline_split_points = points
    return model


REGISTRY: dict[str, Callable[[], nn.Module]] = {
    "linear": linear,
    "convnet": convnet,
    "cnn": cnn,
    "fastnet": fastnet,
    "fastnet-v1": lambda: fastnet(pool_first=False),
    "fastnet-strided": lambda: fastnet(strided_stem=True),
}


FASTNETS = {  # the built-in fastnet layouts, and what each one's checkpoint holds
    "fastnet-v1": "conv-BN-ReLU-pool blocks, dptrain before 2026-12-01",
    "fastnet": "conv-pool-BN-ReLU blocks, the recipe's net from 2026-12-01",
    "fastnet-strided": "a 4x4 stride-2 first convolution, the recipe's net from 2026-12-02",
}


def fastnet_layout(saved: Mapping[str, torch.Tensor]) -> str | None:
    """Which built-in fastnet layout a model state dict holds (None: none of them)."""
    stem = saved.get("0.0.weight")
    if stem is None or not hasattr(stem, "shape"):
        return None
    if "0.2.running_mean" in saved and tuple(stem.shape) == (16, 1, 3, 3):
        return "fastnet"
    if "0.1.running_mean" in saved:
        return {(16, 1, 3, 3): "fastnet-v1", (16, 1, 4, 4): "fastnet-strided"}.get(
            tuple(stem.shape))
    return None


def layout_hint(name: str, saved: Mapping[str, torch.Tensor]) -> str:
    """What to do when a checkpoint does not fit built-in model ``name``: "" unless ``name``
    is a fastnet and the checkpoint holds another fastnet layout."""
    held = fastnet_layout(saved) if name in FASTNETS else None
    if held is None or held == name:
        return ""
    return f"; it holds {held} ({FASTNETS[held]}): use --model {held} for it"


def load_factory(spec: str, what: str) -> Callable[..., object]:
    """Import ``package.module:factory``; failures are :class:`UsageError`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--{what} {spec!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(f"--{what} {spec!r}: cannot import {module_name} ({exc}); "
                         "is it on PYTHONPATH?") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise UsageError(f"--{what} {spec!r}: importing {module_name} failed: "
                         f"{describe_failure(exc)}; fix it there") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--{what} {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def describe_failure(exc: BaseException) -> str:
    """One line for an exception raised in a user's plug-in: type, message and where (the
    innermost frame outside dptrain and torch, else the innermost), for an ``error:`` line."""
    import traceback

    message = (str(exc).strip().splitlines() or [""])[0][:240]
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{type(exc).__name__}: {exc.msg} ({exc.filename}, line {exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    ours = (str(Path(__file__).parent), str(Path(torch.__file__).parent))
    theirs = [f for f in frames if not f.filename.startswith(ours)]
    if theirs:  # none: it failed in the call itself (e.g. the wrong number of arguments)
        f = theirs[-1]
        text += f" ({f.filename}, line {f.lineno}, in {f.name})"
    return text


def call_plugin(spec: str, what: str, fn: Callable[..., Any], *args: Any,
                **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` for the plug-in ``--what spec``: what it raises becomes one
    :class:`UsageError` line that says where, instead of a traceback through dptrain."""
    try:
        return fn(*args, **kwargs)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything the user's code raises
        raise UsageError(f"--{what} {spec!r} raised {describe_failure(exc)}; fix it "
                         "there") from None


def parse_model_args(text: str, factory: Callable[..., object] | None = None
                     ) -> dict[str, object]:
    """``"hidden=128,depth=2,act=relu"`` -> keyword arguments; values read as int, float,
    bool (true/false) or str, in that order -- except for a ``factory`` parameter annotated
    ``str``, which gets the text as written (``name=1.10`` stays ``"1.10"``)."""
    as_text = _str_parameters(factory) if factory is not None else set()
    out: dict[str, object] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise UsageError(f"--model-arg {item!r}: expected KEY=VALUE with KEY a Python "
                             "identifier (e.g. --model-arg hidden=128)")
        out[key] = raw.strip() if key in as_text else _parse_value(raw.strip())
    return out


def _str_parameters(factory: Callable[..., object]) -> set[str]:
    """The factory's parameters annotated ``str`` (also as the string ``"str"``)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.annotation in (str, "str")}


def _parse_value(raw: str) -> object:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _check_kwargs(spec: str, factory: Callable[..., object], kwargs: dict[str, object]) -> None:
    """Unknown keywords are refused with the factory's signature in the message."""
    import inspect

    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    named = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)}
    unknown = [k for k in kwargs if k not in named]
    if unknown:
        name = spec.partition(":")[2] or spec
        sig = sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty)
                                      for p in sig.parameters.values()],
                          return_annotation=inspect.Signature.empty)
        raise UsageError(f"--model-arg {unknown[0]}: {spec} takes no such argument; its "
                         f"signature is {name}{sig}")


def build_model(name: str, args: str | dict[str, object] = "") -> nn.Module:
    """A fresh model by registry name or ``package.module:factory``; ``args`` (a
    ``"k=v,k2=v2"`` string, as ``--model-arg`` stores it, or a dict) go to the factory."""
    if ":" in name:
        factory = load_factory(name, "model")
        kwargs = parse_model_args(args, factory) if isinstance(args, str) else dict(args)
        _check_kwargs(name, factory, kwargs)
        model = call_plugin(name, "model", factory, **kwargs)
        if not isinstance(model, nn.Module):
            raise UsageError(f"--model {name!r}: the factory returned {type(model).__name__}, "
                             "not an nn.Module")
        return model
    if name not in REGISTRY:
        raise UsageError(f"unknown --model {name!r}: use one of {', '.join(REGISTRY)}")
    kwargs = parse_model_args(args, REGISTRY[name]) if isinstance(args, str) else dict(args)
    _check_kwargs(name, REGISTRY[name], kwargs)
    return REGISTRY[name](**kwargs)


KEEP_CONTIGUOUS = ("fsdp", "localsgd", "pipeline", "hogwild")  # see memory_format


def memory_format(setting: str, name: str, model: nn.Module, device: torch.device,
                  strategy: str = "single") -> tuple[torch.memory_format, str]:
    """``--channels-last auto|on|off`` for this model on this device: the format its
    parameters and 4-d inputs take, and why (for the summary).

    ``auto`` picks channels_last for dptrain's own convolutional models on the CPU, where
    oneDNN's convolutions, pooling and batch norm run faster in it (convnet at batch 64:
    1.07x on an AVX2 EPYC, 1.3-1.5x on a Xeon with AMX, 1.7x on Zen 5; the speed benchmarks'
    results), and contiguous elsewhere: a user's own model may ``view`` its activations
    (which channels_last refuses), and on a GPU the gain depends on the precision. ``auto``
    stays contiguous under the strategies that flatten or re-home parameters: FSDP2 refuses
    non-contiguous parameters, local SGD's averaging makes them contiguous again, and the
    pipeline and hogwild paths were not measured in channels_last."""
    if setting == "on":
        return torch.channels_last, "channels_last (--channels-last on)"
    if setting == "off":
        return torch.contiguous_format, "contiguous (--channels-last off)"
    if strategy in KEEP_CONTIGUOUS:
        return torch.contiguous_format, (f"contiguous (auto: --strategy {strategy}; "
                                         "--channels-last on to change)")
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if ":" not in name and convolutional and device.type == "cpu":
        return torch.channels_last, "channels_last (auto: a built-in conv model on the CPU)"
    why = ("your own model" if ":" in name else "no 2-d convolution" if not convolutional
           else f"on {device.type}")
    return torch.contiguous_format, f"contiguous (auto: {why}; --channels-last on to change)"


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def flops_per_sample(model: nn.Module) -> int:
    """Forward FLOPs (multiply-add = 2) for one normalised 1x28x28 sample.

    Counted by :func:`dptrain.flops.model_flops_per_sample` (matmuls and convolutions; for any
    input structure call that directly). Training costs about 3x this (forward + two backward
    matmuls).
    """
    from dptrain.flops import model_flops_per_sample

    device = next(model.parameters()).device
    return model_flops_per_sample(model, torch.zeros(1, 1, 28, 28, device=device))
