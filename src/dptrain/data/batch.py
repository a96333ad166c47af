"""Batches as structures: tensors, tuples, lists and dicts nested any way.

A *batch* is ``(inputs, targets)``: ``inputs`` any structure of tensors (all with the same
leading sample dimension), ``targets`` a tensor or ``None`` (a model that computes its own loss,
HuggingFace style, takes its labels inside ``inputs``). The model is called by the shape of
``inputs``: a tensor as ``model(x)``, a tuple or list as ``model(*x)``, a dict as
``model(**x)``. These helpers map over the structure the way Accelerate's ``send_to_device``
does, so the loader, the strategies and evaluation never look inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from dptrain.errors import UsageError

Structure = Any  # a tensor, or a tuple/list/dict of structures


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Structure) -> Structure:
    """Apply ``fn`` to every tensor of ``tree``; containers keep their type, other leaves stay."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return type(tree)((k, tree_map(fn, v)) for k, v in tree.items())
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple
        return type(tree)(*(tree_map(fn, v) for v in tree))
    if isinstance(tree, tuple | list):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def leaves(tree: Structure) -> list[torch.Tensor]:
    """The tensors of ``tree``, in a fixed order."""
    out: list[torch.Tensor] = []
    tree_map(out.append, tree)
    return out


def to_device(tree: Structure, device: torch.device, non_blocking: bool = True) -> Structure:
    """Move every tensor of ``tree`` to ``device``."""
    return tree_map(lambda t: t.to(device, non_blocking=non_blocking), tree)


def num_samples(tree: Structure, what: str = "inputs") -> int:
    """The common leading dimension of every tensor in ``tree`` (a :class:`UsageError` if the
    tensors disagree or there are none)."""
    sizes = {len(t) if t.dim() else -1 for t in leaves(tree)}
    if not sizes:
        raise UsageError(f"the {what} hold no tensor; a batch needs at least one")
    if -1 in sizes or len(sizes) > 1:
        raise UsageError(f"the {what}' tensors have different numbers of samples "
                         f"({sorted(sizes)}); every tensor needs the sample dimension first")
    return sizes.pop()


def index(tree: Structure, idx: torch.Tensor) -> Structure:
    """Samples ``idx`` of every tensor (one ``index_select`` per leaf)."""
    return tree_map(lambda t: t.index_select(0, idx), tree)


def slice_(tree: Structure, lo: int, hi: int) -> Structure:
    return tree_map(lambda t: t[lo:hi], tree)


def call_model(model: torch.nn.Module, inputs: Structure) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` by the shape of ``inputs``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def cast_floats(tree: Structure, dtype: torch.dtype) -> Structure:
    """Floating-point tensors -> ``dtype``; integer tensors (labels, token ids) are left alone."""
    return tree_map(lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t,
                    tree)


def float_dtypes(tree: Structure) -> set[torch.dtype]:
    return {t.dtype for t in leaves(tree) if t.is_floating_point()}
