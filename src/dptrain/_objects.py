"""Python objects given to ``dptrain.fit`` (model instances, partials, closures, data), reachable
by a ``module:name`` spec so that the unchanged run path can build them.

``dptrain.fit(model=net)`` registers ``net`` here under a generated name such as
``dptrain._objects:model_3f9a2c1e``; :func:`dptrain.models.load_factory` imports this module and
asks for that attribute, which :func:`__getattr__` answers from the registry. A spawned worker
imports this module afresh, with an empty registry: the objects travel to it pickled inside the
launch arguments, and :func:`worker_entry` registers them before the run starts.

A spec naming an object that is not registered in this process (a ``config.toml`` written by
``dptrain.fit`` and replayed with ``dptrain train --config``) is a
:class:`~dptrain.errors.UsageError` that says why it cannot be replayed.
"""

from __future__ import annotations

import contextlib
import copy
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from dptrain.errors import UsageError

MODULE = "dptrain._objects"
_NAME = re.compile(r"^(model|dataset|loss)_[0-9a-f]{8}$")
_registry: dict[str, Callable[[], Any]] = {}


class Instance:
    """A factory for an ``nn.Module`` given as an instance: each call returns a deep copy, so
    training never changes the caller's object (the trained one is ``FitResult.model``)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return copy.deepcopy(self.obj)


class Value:
    """A factory for data given as such (tensors or Datasets): returned as is (the run never
    changes its data in place)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj


def new_name(what: str) -> str:
    """A fresh attribute name for a ``what`` (model, dataset, loss) object."""
    return f"{what}_{uuid.uuid4().hex[:8]}"


def spec(name: str) -> str:
    return f"{MODULE}:{name}"


def readable(message: str, described: dict[str, str]) -> str:
    """An error message with each registered object's ``--what dptrain._objects:name`` (or
    its spec alone) replaced by what the caller passed, e.g. ``model (an nn.Module instance
    (Linear))``."""
    for name, desc in described.items():
        what, full = name.split("_")[0], spec(name)
        for form in (f"--{what} {full!r}", f"--{what} {full}", repr(full), full):
            message = message.replace(form, f"{what} ({desc})")
    return message


def is_object_spec(value: str) -> bool:
    """Does ``value`` name an object of this registry (not replayable from a file)?"""
    module, _, name = value.partition(":")
    return module == MODULE and bool(_NAME.match(name))


@contextlib.contextmanager
def registered(objects: dict[str, Callable[[], Any]]) -> Iterator[None]:
    """``objects`` reachable by their names while the block runs (then forgotten again)."""
    _registry.update(objects)
    try:
        yield
    finally:
        for name in objects:
            _registry.pop(name, None)


def worker_entry(objects: dict[str, Callable[[], Any]], plan: Any, started_at: float
                 ) -> dict[str, Any]:
    """What a launched ``dptrain.fit`` worker runs: register the objects that came pickled in
    the launch arguments, then the CLI's own worker (:func:`dptrain.cli.worker_entry`)."""
    from dptrain.cli import worker_entry as train_worker

    with registered(objects):
        return train_worker(plan, started_at)


def __getattr__(name: str) -> Any:  # PEP 562: models.load_factory's getattr lands here
    if name in _registry:
        return _registry[name]
    if _NAME.match(name):
        what = name.split("_")[0]
        raise UsageError(
            f"--{what} {spec(name)}: this {what} was a Python object given to dptrain.fit(...) "
            "in another process (an instance, a partial, a closure or data); it cannot be "
            "rebuilt from a file. Call dptrain.fit again with the object, or pass an importable "
            f"--{what} package.module:factory to replay the run from the command line")
    raise AttributeError(f"module {MODULE!r} has no attribute {name!r}")
