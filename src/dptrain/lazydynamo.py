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

``DistributedDataParallel`` paid it twice per worker: ``__init__`` asks
``torch._dynamo.utils.get_optimize_ddp_mode()`` whether a compiled-DDP mode was configured, and
every forward enters the dynamo-disabled ``_inside_ddp_forward``. :func:`ddp_init` answers the
first question with dynamo's own default while dynamo is not imported (nobody can have set
``torch._dynamo.config.optimize_ddp`` then); :func:`defer` covers the second.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator

import torch

# torch._dynamo.config.optimize_ddp's default (True) as get_optimize_ddp_mode() names it;
# tests/test_lazydynamo.py checks it against the installed torch
DEFAULT_OPTIMIZE_DDP_MODE = "ddp_optimizer"


def _disabled_functions(cls: type) -> list[tuple[Callable, bool]]:
    """The functions behind ``cls``'s own ``torch._disable_dynamo``-wrapped methods, each with
    the wrapper's ``recursive`` flag."""
    probe = torch._disable_dynamo(lambda: None)  # every such wrapper shares this code object
    found = []
    for attr in vars(cls).values():
        for _ in range(3):  # the wrapper itself, or under a decorator (@contextmanager)
            if attr is None or getattr(attr, "__code__", None) is probe.__code__:
                break
            attr = getattr(attr, "__wrapped__", None)
        if attr is not None and callable(getattr(attr, "__wrapped__", None)):
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


def _default_optimize_ddp_mode() -> str:
    return DEFAULT_OPTIMIZE_DDP_MODE


@contextlib.contextmanager
def ddp_init() -> Iterator[None]:
    """Around ``DistributedDataParallel(...)``: while ``torch._dynamo`` is not imported,
    ``torch._dynamo.utils.get_optimize_ddp_mode()`` (all ``__init__`` asks of it) answers
    dynamo's default without importing it; the deferred ``_inside_ddp_forward`` (see
    :func:`defer`) keeps the forward from importing it too. Once dynamo is imported, or should
    anything inside import it meanwhile, PyTorch's own module answers."""
    from torch.nn.parallel import DistributedDataParallel

    defer(DistributedDataParallel)
    if "torch._dynamo" in sys.modules or "_dynamo" in vars(torch):
        yield
        return
    stand_in = types.ModuleType("torch._dynamo", "dptrain's stand-in: dynamo is not imported")
    stand_in.utils = types.SimpleNamespace(get_optimize_ddp_mode=_default_optimize_ddp_mode)
    torch._dynamo = stand_in
    try:
        yield
    finally:
        if vars(torch).get("_dynamo") is stand_in:
            del torch._dynamo
