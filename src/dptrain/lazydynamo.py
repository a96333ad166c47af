"""Keep ``torch._dynamo`` unimported in a process that compiles nothing.

Importing ``torch._dynamo`` (with sympy) takes 1.6-2.3 s on this project's 2-core VM: a
third or more of the 5 s that ``--recipe mnist-fast`` may take end to end. Plain eager
training paid it for nothing: ``Optimizer.__init__`` calls ``add_param_group`` and the FLOP
counter calls its dispatch mode's ``__torch_dispatch__``, and PyTorch wraps both in
``torch._disable_dynamo``, whose first call imports ``torch._dynamo`` only to build a "do not
trace this" wrapper, then caches it in the function's ``__dynamo_disable`` attribute.

Until ``torch._dynamo`` is imported no frame can be compiled, so that wrapper has nothing to
do. :func:`defer` puts, in the same attribute, a function that calls the method directly
while ``torch._dynamo`` is not imported, and builds and calls PyTorch's own disabled wrapper
from the first call after it is (``--compile``, a user's ``torch.compile``). The behaviour is
PyTorch's in every case; only the import is deferred, or avoided.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch


def _disabled_functions(cls: type) -> list[tuple[Callable, bool]]:
    """The functions behind ``cls``'s own ``torch._disable_dynamo``-wrapped methods, each with
    the wrapper's ``recursive`` flag."""
    probe = torch._disable_dynamo(lambda: None)  # every such wrapper shares this code object
    found = []
    for attr in vars(cls).values():
        if (getattr(attr, "__code__", None) is probe.__code__
                and callable(getattr(attr, "__wrapped__", None))):
            cells = dict(zip(attr.__code__.co_freevars, attr.__closure__ or (), strict=False))
            recursive = cells["recursive"].cell_contents if "recursive" in cells else True
            found.append((attr.__wrapped__, bool(recursive)))
    return found


def defer(*classes: type) -> None:
    """Defer the ``torch._dynamo`` import of each class's dynamo-disabled methods (module
    docstring). Idempotent; a method PyTorch has already wrapped is left as it is."""
    for cls in classes:
        for fn, recursive in _disabled_functions(cls):
            if getattr(fn, "__dynamo_disable", None) is None:
                fn.__dynamo_disable = _lazily_disabled(fn, recursive)


def deferred(fn: Callable) -> bool:
    """Whether ``fn`` (the function behind a wrapped method) is deferred by :func:`defer`."""
    return getattr(getattr(fn, "__dynamo_disable", None), "dptrain_lazy", False)


def _lazily_disabled(fn: Callable, recursive: bool) -> Callable:
    disabled: list[Callable] = []

    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            import torch._dynamo

            disabled.append(torch._dynamo.disable(fn, recursive, wrapping=False))
        return disabled[0](*args, **kwargs)

    call.dptrain_lazy = True
    return call
