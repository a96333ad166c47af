"""The Python API: ``dptrain.fit(...)`` runs the same plan, strategies, loop and launcher as the
CLI, and returns the summary together with the trained model.

Example::

    import dptrain, torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    result = dptrain.fit(net, "synthetic", nproc=2, epochs=1, lr=0.05)
    result["test_accuracy"], result.model      # the summary (a dict) and rank 0's trained model

``model`` (and ``dataset``, ``loss``) may be a name, a ``package.module:factory`` spec, a
function, a ``functools.partial``, any callable, or the object itself (an ``nn.Module``
instance; for the dataset the tensors or Datasets). Objects that are not importable by name are
pickled into the worker processes (a clear error when they cannot be). Where the workers could
not import the caller's code -- a notebook, ``python -`` (stdin), ``python -c``, a script that
calls ``fit`` without an ``if __name__ == "__main__":`` guard -- the workers are forked from
this process instead (CPU only; on CUDA a forked worker cannot use the GPU, so that is an
``error:`` that says what to do).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import json
import os
import pickle
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dptrain import _objects
from dptrain.errors import UsageError

__all__ = ["FitResult", "fit"]


class FitResult(dict):
    """What :func:`fit` returns: the run summary (a ``dict``, as ``summary.json``, so code that
    used the summary keeps working) and the trained model.

    Attributes:
        model: rank 0's trained model, unwrapped, on the CPU (``None`` on the other ranks of an
            external launcher, and when the run wrote no checkpoint).
    """

    def __init__(self, summary: dict[str, Any], model: Any = None) -> None:
        super().__init__(summary)
        self.model = model

    @property
    def summary(self) -> dict[str, Any]:
        """The summary as a plain dict."""
        return dict(self)

    @property
    def replayable(self) -> bool:
        """Whether ``dptrain train --config OUT/config.toml`` can replay the run."""
        return bool(self.get("replayable", True))

    def __repr__(self) -> str:
        model = type(self.model).__name__ if self.model is not None else None
        return (f"FitResult(test_accuracy={self.get('test_accuracy')!r}, steps="
                f"{self.get('steps')!r}, out={self.get('out')!r}, model={model})")


# ---------------------------------------------------------------------------- objects -> specs
def _importable(obj: Any) -> str | None:
    """``module:name`` for a top-level function or class that a new process imports by name
    (not from ``__main__``, which a replay would not have); else ``None``."""
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return None
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or module == "__main__" or "." in qualname or "<" in qualname:
        return None
    try:
        import importlib

        if getattr(importlib.import_module(module), qualname, None) is obj:
            return f"{module}:{qualname}"
    except Exception:  # noqa: BLE001 - any import failure: not importable by name
        return None
    return None


def _describe(obj: Any) -> str:
    if isinstance(obj, functools.partial):
        return f"functools.partial({getattr(obj.func, '__qualname__', repr(obj.func))}, ...)"
    qualname = getattr(obj, "__qualname__", None)
    if qualname is not None and callable(obj):
        module = getattr(obj, "__module__", "?")
        return f"{qualname} (defined in {module})"
    return f"a {type(obj).__module__}.{type(obj).__qualname__} object"


def _spec(obj: Any, what: str, objects: dict[str, Any], described: dict[str, str]) -> str:
    """A name / spec string as given, an importable function as ``module:name``, anything
    else registered in :mod:`dptrain._objects` under a generated name (described: it is not
    replayable)."""
    import torch

    if isinstance(obj, str):
        return obj
    name = _importable(obj)
    if name is not None:
        return name
    if what == "model" and isinstance(obj, torch.nn.Module):
        factory: Any = _objects.Instance(obj)
        desc = f"an nn.Module instance ({type(obj).__qualname__})"
    elif what == "dataset" and isinstance(obj, tuple | list | dict | torch.utils.data.Dataset):
        factory, desc = _objects.Value(obj), f"data given directly ({type(obj).__name__})"
    elif callable(obj):
        factory, desc = obj, _describe(obj)
    else:
        raise UsageError(f"{what} must be a name, 'package.module:factory', a function"
                         f"{', an nn.Module' if what == 'model' else ''}"
                         f"{', tensors or Datasets' if what == 'dataset' else ''}, got "
                         f"{type(obj).__name__}")
    key = _objects.new_name(what)
    objects[key] = factory
    described[key] = desc
    return _objects.spec(key)


# ---------------------------------------------------------------------------- how to start
def _main_guard_problem(main: Any) -> str | None:
    """Why spawned workers, which re-import ``__main__``, would not work (``None``: they do)."""
    path = getattr(main, "__file__", None)
    if path is None:
        return None  # REPL, -c, notebook: nothing is re-imported (objects from it: see below)
    if not os.path.isfile(path):
        return f"runs from {path} (not a file the workers can import)"
    frame = inspect.currentframe()
    outer = None
    while frame is not None:  # the outermost frame running __main__'s module code
        if frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>":
            outer = frame
        frame = frame.f_back
    if outer is None:
        return None
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    line = outer.f_lineno
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test) and \
                node.lineno <= line <= (node.end_lineno or node.lineno):
            return None
    return (f"is called at the top level of {path} without an `if __name__ == \"__main__\":` "
            "guard (spawned workers re-import the file and would run it again)")


def _is_main_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return bool(names and consts)


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


class _Probe(pickle.Pickler):
    """Pickles into nothing, noting the functions and classes it takes from ``__main__``."""

    def __init__(self) -> None:
        super().__init__(_Discard(), protocol=pickle.HIGHEST_PROTOCOL)
        self.from_main: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and \
                getattr(obj, "__module__", None) == "__main__":
            self.from_main.append(obj.__qualname__)
        return NotImplemented


def _pickle_check(objects: dict[str, Any], described: dict[str, str]) -> list[str]:
    """Every object pickles (else a UsageError naming it); returns the ``__main__`` names they
    refer to."""
    from_main: list[str] = []
    for key, obj in objects.items():
        probe = _Probe()
        try:
            probe.dump(obj)
        except Exception as exc:  # noqa: BLE001 - pickle raises many types
            what = key.split("_")[0]
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise UsageError(
                f"{what} {described[key]} cannot be pickled ({type(exc).__name__}: {first}); with "
                "nproc > 1 it is sent to the worker processes by pickling: define it at the "
                "top level of a module (not a lambda, nested function or local class), or "
                "pass nproc=1") from None
        from_main += probe.from_main
    return from_main


def _fork_possible() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def start_method(plan: Any, objects: dict[str, Any], described: dict[str, str],
                 main: Any = None) -> str:
    """``spawn`` (as the CLI) when the workers can import what they need, else ``fork`` where
    that is safe (CPU, CUDA not initialised here), else a :class:`UsageError` saying what to
    do. ``main``: the ``__main__`` module (injectable for tests)."""
    import torch

    main = sys.modules.get("__main__") if main is None else main
    problem = _main_guard_problem(main)
    if problem is None:
        from_main = _pickle_check(objects, described)
        if from_main and getattr(main, "__file__", None) is None:
            problem = (f"uses {', '.join(sorted(set(from_main)))} from an interactive session "
                       "(a notebook, the REPL or python -c), which worker processes cannot "
                       "import")
    if problem is None:
        return "spawn"
    if plan.device == "cpu" and _fork_possible() and not torch.cuda.is_initialized():
        return "fork"
    raise UsageError(
        f"dptrain.fit(nproc={plan.nproc}) {problem}, and forking the workers instead is not "
        f"safe here ({'CUDA' if plan.device == 'cuda' else 'no fork on this platform'}): put "
        "the model and data factories in a .py file, call dptrain.fit under "
        "`if __name__ == \"__main__\":` and run that file (or `dptrain train --model "
        "module:factory --nproc N`), or pass nproc=1")


@contextlib.contextmanager
def _fork_workers() -> Iterator[None]:
    """``launch.launch`` with the ``fork`` start method: its launcher config is built with
    ``start_method="fork"`` while the block runs (``launch.launch`` spawns otherwise)."""
    from torch.distributed.launcher import api

    original = api.LaunchConfig

    def forked(*args: Any, **kwargs: Any) -> Any:
        kwargs["start_method"] = "fork"
        return original(*args, **kwargs)

    api.LaunchConfig = forked
    try:
        yield
    finally:
        api.LaunchConfig = original


def _launch_workers(cfg: Any, plan: Any, objects: dict[str, Any], described: dict[str, str],
                    started_at: float) -> dict[str, Any] | None:
    """``cli.run_training``'s local-workers branch, with the objects in the launch arguments
    and the start method chosen by :func:`start_method`."""
    from dptrain import launch
    from dptrain.plan import prepare_data
    from dptrain.rundir import check_out_dir, default_out

    method = start_method(plan, objects, described)
    prepare_data(plan)
    plan = plan.with_out(cfg.out or default_out())
    if cfg.node_rank == 0:
        check_out_dir(Path(plan.cfg.out), cfg.resume)
    forking = _fork_workers() if method == "fork" else contextlib.nullcontext()
    try:
        with forking:
            results = launch.launch(
                _objects.worker_entry, (objects, plan, started_at), nproc=plan.nproc,
                nnodes=plan.nnodes, node_rank=cfg.node_rank, master_addr=cfg.master_addr,
                master_port=cfg.master_port, max_restarts=cfg.max_restarts,
                rdzv_timeout_s=int(cfg.timeout_s))
    except launch.Interrupted as exc:
        exc.out = plan.cfg.out
        raise
    return results.get(0)


# ---------------------------------------------------------------------------- after the run
def _trained_model(model: Any, spec: str, objects: dict[str, Any], out: str) -> Any:
    """A fresh copy of the model with the final checkpoint's parameters, on the CPU."""
    import copy

    import torch

    from dptrain import checkpoint as ck
    from dptrain.models import build_model

    path = Path(out) / "checkpoints" / "last.pt"
    if not path.is_file():
        return None
    state = ck.load(path)
    if isinstance(model, torch.nn.Module):
        fresh = copy.deepcopy(model).cpu()
    else:
        with _objects.registered(objects):
            fresh = build_model(spec, state.get("config", {}).get("model_args", "")).cpu()
    fresh.load_state_dict(state["model"])
    return fresh


def _record_not_replayable(out: str, notes: list[str], summary: dict[str, Any]) -> None:
    """Say in ``config.toml`` and ``summary.json`` why the CLI cannot replay this run."""
    from dptrain.metrics import write_json_atomic, write_text_atomic

    reason = "; ".join(notes)
    summary["replayable"] = False
    summary["not_replayable_because"] = reason
    config = Path(out) / "config.toml"
    if config.is_file():
        header = ("# replayable = false: " + reason + ".\n# `dptrain train --config` on this "
                  "file stops with an error naming it; to make a run replayable, pass "
                  "importable package.module:factory specs to dptrain.fit.\n")
        write_text_atomic(config, header + config.read_text())
    path = Path(out) / "summary.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        saved.update(replayable=False, not_replayable_because=reason)
        write_json_atomic(path, saved)


# ---------------------------------------------------------------------------- fit
def fit(model: Any = "linear", dataset: Any = "mnist", **options: Any) -> FitResult:
    """Train a model data-parallel; return the summary and the trained model.

    Args:
        model: ``linear``/``convnet``/``cnn``/..., ``"package.module:factory"``, a function or
            any callable returning an ``nn.Module`` (``functools.partial`` included), or an
            ``nn.Module`` instance (copied: your object is not changed; the trained one is
            ``result.model``).
        dataset: ``mnist``/``fashion-mnist``/``synthetic``, a spec string, a callable returning
            ``(train_x, train_y, test_x, test_y)`` or ``(train_dataset, test_dataset)``, or
            that tuple itself.
        **options: any ``dptrain train`` setting by its field name, e.g. ``nproc=2``,
            ``epochs=3``, ``find_unused_parameters=True``, ``out="runs/x"``; ``loss`` may also
            be a callable ``fn(outputs, targets) -> scalar``.

    Returns:
        A :class:`FitResult`: rank 0's summary (a dict: ``test_accuracy``,
        ``train_samples_per_s``, ...) with ``.model``, the trained model (unwrapped, on the
        CPU). Other ranks of an external launcher get an empty summary and no model.

    Raises:
        UsageError: for invalid settings, objects that cannot reach the workers, or a start
            that cannot work (the CLI turns it into ``error: ...``).
    """
    started_at = time.time()
    objects: dict[str, Any] = {}
    described: dict[str, str] = {}
    values = {k: os.fspath(v) if isinstance(v, os.PathLike) else v  # out=Path("runs/x")
              for k, v in options.items()}
    values["model"] = _spec(model, "model", objects, described)
    values["dataset"] = _spec(dataset, "dataset", objects, described)
    if "loss" in values and not isinstance(values["loss"], str):
        values["loss"] = _spec(values["loss"], "loss", objects, described)
    notes = [f"{key.split('_')[0]} is {desc}, a Python object that only exists in the calling "
             "process" for key, desc in described.items()]
    try:
        return _fit(values, model, objects, described, notes, started_at)
    except UsageError as exc:  # name the caller's objects, not their internal specs
        raise UsageError(_objects.readable(str(exc), described)) from None


def _fit(values: dict[str, Any], model: Any, objects: dict[str, Any],
         described: dict[str, str], notes: list[str], started_at: float) -> FitResult:
    from dptrain import dist
    from dptrain.cli import run_training
    from dptrain.config import TrainConfig, coerce
    from dptrain.plan import make_plan

    cfg = TrainConfig(**coerce(values, source="dptrain.fit")).validate()
    env = dist.detect()
    plan = make_plan(cfg, env)
    if notes:
        print(f"warning: this run cannot be replayed from its config.toml ({'; '.join(notes)}); "
              "pass importable package.module:factory specs to make it replayable",
              file=sys.stderr)
    if plan.launch == "workers":
        summary = _launch_workers(cfg, plan, objects, described, started_at)
    else:
        with _objects.registered(objects):
            summary = run_training(cfg, started_at=started_at)
    if summary is None:  # a non-zero rank under an external launcher
        return FitResult({})
    if notes:
        _record_not_replayable(summary["out"], notes, summary)
    else:
        summary["replayable"] = True
    return FitResult(summary, _trained_model(model, values["model"], objects, summary["out"]))
