"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), for fsdp and zero.

A strategy opts in by having ``sharded_state_dict`` (and may add ``load_sharded``); every
other strategy keeps the consolidated ``step-NNNNNNNN.pt`` files of ``checkpoint.py``.

Layout, under ``OUT/checkpoints/``::

    step-00000120.dcp/            one numbered checkpoint (the newest --keep-ckpts are kept)
        __0_0.distcp, __1_0.distcp   each rank's own shard: its part of every DTensor (fsdp),
                                     its partition's optimizer state (zero), and its share of
                                     the replicated tensors (DCP's planner gives each
                                     replicated tensor to one rank, balancing the bytes)
        .metadata                    DCP's index (written by rank 0 after every rank's write)
        dptrain.pt                   rank 0: position, config, rng, world size, strategy,
                                     scaler, optimizer hyperparameters, normalisation
    last.pt                       the consolidated plain model (weights_only, no ``module.``)
                                  plus the same metadata and ``sharded``: the directory that
                                  holds the rest of the training state

The payload's keys are the model's own names: ``model.<fqn>`` and
``optim.<fqn>.<state key>`` (the optimizer state keyed by parameter name, whatever the
strategy), so a directory written by N fsdp or zero ranks loads under any strategy at any
world size that keeps the global batch: a ``load_sharded`` strategy (fsdp) asks DCP for its
own shards only (DCP reshards); the others get full tensors read without collectives and
converted to the format a plain optimizer writes (positions in the parameter groups), which
their ``load_state_dict`` takes as it takes a consolidated ``.pt``.

Visibility: every rank writes into ``.step-NNNNNNNN.dcp.tmpPID`` (rank 0's pid, broadcast),
DCP fsyncs each file and gathers every rank's result before rank 0 writes ``.metadata``;
then rank 0 writes ``dptrain.pt``, renames the directory to its real name (atomic on one
file system) and only then replaces ``last.pt``. A kill at any point before the rename leaves
a temporary that ``find_resume`` never looks at and ``Checkpointer.sweep`` removes once its
writer is dead; the previous checkpoint stays the newest.

Loading is as safe as ``torch.load(weights_only=True)``: DCP reads each tensor that way, but
unpickles ``.metadata`` with a plain ``pickle.load`` -- here it is read by an unpickler that
allows only DCP's own metadata classes. A directory is checked before anything is written:
both index files present and readable, every shard file the index names present and long
enough, the model's names, shapes and dtypes (``check_model``) -- a misfit is a
:class:`UsageError` naming the directory.
"""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dptrain.errors import UsageError

if TYPE_CHECKING:
    from dptrain.precision import Precision
    from dptrain.strategies import Strategy

SUFFIX = ".dcp"
META = "dptrain.pt"
CRCS = "shard_crc32"  # META's record of each shard file's CRC-32 (DCP's files carry none)
FORMAT = "dptrain-dcp-1"
_INDEX = ".metadata"
_META_CLASSES = {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                 "TensorProperties", "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                 "_MEM_FORMAT_ENCODING"}
_ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
            ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class ShardedState(dict):
    """A sharded checkpoint in the making. Its items are the small part rank 0 writes
    (callers add to them as to a plain state: ``state["normalization"] = ...``); the DCP
    payload (this rank's shards) and the full plain model (for ``last.pt``) ride along."""

    def __init__(self, meta: dict[str, Any], tensors: dict[str, Any],
                 plain_model: dict[str, torch.Tensor], strategy: Strategy) -> None:
        super().__init__(meta)
        self.tensors, self.plain_model, self.strategy = tensors, plain_model, strategy


def capture(strategy: Strategy, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            precision: Precision, extra: dict[str, Any]) -> ShardedState:
    """The sharded state of a strategy with ``sharded_state_dict`` (a collective)."""
    plain = strategy.plain(model).state_dict()  # before the strategy touches its buffers
    part = strategy.sharded_state_dict(model, optimizer, precision)
    tensors = part.pop("tensors")
    part["rng"]["data_seed"] = extra.pop("data_seed")
    return ShardedState({**part, **extra, "strategy": strategy.name}, tensors, plain, strategy)


# ------------------------------------------------------------------ saving
def save(state: ShardedState, directory: Path, step: int, *, is_main: bool) -> Path | None:
    """Every rank writes its shard into a temporary directory; rank 0 then writes the
    metadata, renames the directory into place and replaces ``last.pt``. Returns the
    checkpoint's path on rank 0, ``None`` elsewhere."""
    from dptrain.checkpoint import FORMAT as LAST_FORMAT
    from dptrain.checkpoint import atomic_save, write_fix

    final = directory / f"step-{step:08d}{SUFFIX}"
    tmp = Path(state.strategy.broadcast_object(
        str(directory / f".{final.name}.tmp{os.getpid()}") if is_main else None))
    try:
        _write_shards(state.tensors, tmp, is_main)
        if not is_main:
            return None
        atomic_save({"format": FORMAT, **state, CRCS: shard_checksums(tmp)}, tmp / META)
        _swap_in(tmp, final)
        atomic_save({"format": LAST_FORMAT, **state, "model": state.plain_model,
                     "sharded": final.name}, directory / "last.pt")
    except OSError as exc:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"cannot write checkpoint {final}: {exc.strerror or exc}; "
                         f"{write_fix(exc)} (earlier checkpoints are intact)") from None
    return final


def _write_shards(tensors: dict[str, Any], tmp: Path, is_main: bool) -> None:
    """``torch.distributed.checkpoint.save`` (a collective): each rank its own file, fsync'd;
    a failed write on any rank comes out on every rank as the ``OSError`` behind it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if is_main:
        tmp.parent.mkdir(parents=True, exist_ok=True)
    writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True,
                                  thread_count=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # without a process group: "in a single process"
            dcp.save(tensors, storage_writer=writer)
    except CheckpointException as exc:
        failures = list(getattr(exc, "failures", {}).values())
        cause = next((f for f in failures if isinstance(f, OSError)), None)
        if cause is None and failures:  # the failure is wrapped: dig out its OSError
            cause = next((c for f in failures for c in _causes(f) if isinstance(c, OSError)),
                         None)
        raise cause or OSError(str(exc).splitlines()[0]) from None


def _causes(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the finished directory to its real name; one already there (a step saved
    again after an earlier resume) is moved aside first and removed after."""
    from dptrain.checkpoint import _fsync_dir

    _fsync_dir(tmp)
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.old.tmp{os.getpid()}")  # swept if left
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# ------------------------------------------------------------------ reading
class _Unpickler(pickle.Unpickler):
    """DCP's ``.metadata`` holds dataclasses of its own; nothing else may be built."""

    def find_class(self, module: str, name: str) -> Any:
        if ((module == "torch.distributed.checkpoint.metadata" and name in _META_CLASSES)
                or (module, name) in _ALLOWED
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsupported global {module}.{name}")


def read_index(path: Path) -> Any:
    """DCP's metadata of the directory ``path``, unpickled safely, its shard files checked."""
    try:
        with (path / _INDEX).open("rb") as fh:
            index = _Unpickler(fh).load()
    except FileNotFoundError:
        raise _incomplete(path, f"no {_INDEX}: the save did not finish") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError,
            TypeError, OSError) as exc:
        raise _incomplete(path, f"{_INDEX} is unreadable ({exc})") from None
    if not hasattr(index, "state_dict_metadata") or not isinstance(
            getattr(index, "storage_data", None), dict):
        raise _incomplete(path, f"{_INDEX} is not DCP metadata")
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = path / name
        if Path(name).name != name or not shard.is_file() or shard.stat().st_size < end:
            raise _incomplete(path, f"shard {name} is missing or truncated")
    return index


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def shard_checksums(directory: Path) -> dict[str, int]:
    """The CRC-32 of each shard file in ``directory`` (once every rank has written its own:
    ``dcp.save`` returns after all have). Rank 0 reads them back once, from the page cache
    as a rule; a resume checks them (:func:`read`), as ``torch.load`` does not."""
    return {p.name: _crc32(p) for p in sorted(directory.glob("*.distcp"))}


def _incomplete(path: Path, why: str) -> UsageError:
    return UsageError(f"checkpoint {path} is incomplete or inconsistent ({why}); resume from "
                      "an earlier checkpoint or start a fresh run")


def read(path: Path) -> dict[str, Any]:
    """A DCP directory's state without its tensors' data: the metadata, ``model`` as meta
    tensors of the saved names, shapes and dtypes (for ``check_model``), ``sharded``."""
    if not (path / META).is_file():
        raise _incomplete(path, f"no {META}: the save did not finish")
    try:
        meta = torch.load(path / META, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is the same refusal
        raise _incomplete(path, f"{META} is unreadable ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"checkpoint {path} is not a dptrain checkpoint (no '{FORMAT}' "
                         "format marker); pass a directory written by dptrain train")
    missing = [k for k in ("position", "rng", "world_size", "config", "param_groups")
               if k not in meta]
    if missing:
        raise _incomplete(path, f"{META} has no {', '.join(map(repr, missing))}")
    model = {}
    for key, md in read_index(path).state_dict_metadata.items():
        if key.startswith("model.") and hasattr(md, "size"):
            model[key[len("model."):]] = torch.empty(md.size, dtype=md.properties.dtype,
                                                     device="meta")
    if not model:
        raise _incomplete(path, "no model tensors")
    recorded = meta.pop(CRCS, None)  # checkpoints before 2026-12-03 have none
    for name, crc in sorted(recorded.items()) if isinstance(recorded, dict) else ():
        shard = path / str(name)
        if Path(str(name)).name != name or not shard.is_file():
            raise _incomplete(path, f"shard {name} is missing or truncated")
        if _crc32(shard) != crc:
            raise _incomplete(path, f"shard {name} fails its CRC-32 check: it changed after "
                              "it was written (disk or copy damage)")
    return {**meta, "model": model, "sharded": str(path)}


@functools.cache
def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader with :func:`read_index` in place of its ``pickle.load``."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            index = read_index(Path(self.path))
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    return SafeReader


def load_into(tensors: dict[str, Any], path: Path, *, collective: bool) -> None:
    """DCP's load into preallocated ``tensors`` (DTensors read only their own shards)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(tensors, storage_reader=_reader_class()(path), no_dist=not collective)


def saved_tensors(path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor the directory holds: flat key -> (global shape, dtype)."""
    return {k: (md.size, md.properties.dtype)
            for k, md in read_index(path).state_dict_metadata.items() if hasattr(md, "size")}


def optim_keys(path: Path, names: list[str]) -> dict[str, dict[str, tuple]]:
    """The saved optimizer state per parameter name: {fqn: {state key: (shape, dtype)}}."""
    out: dict[str, dict[str, tuple]] = {}
    for key, spec in saved_tensors(path).items():
        if key.startswith("optim."):
            fqn, _, item = key[len("optim."):].rpartition(".")
            if fqn not in names:
                raise UsageError(f"its optimizer state names a parameter {fqn!r} the model "
                                 "does not have")
            out.setdefault(fqn, {})[item] = spec
    return out


def materialize(state: dict[str, Any]) -> dict[str, Any]:
    """Full tensors from a DCP directory, read by this process alone (no collective), in
    the consolidated format every strategy's ``load_state_dict`` takes."""
    path = Path(state["sharded"])
    flat = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in
            saved_tensors(path).items()}
    load_into(flat, path, collective=False)
    model = {k[len("model."):]: t for k, t in flat.items() if k.startswith("model.")}
    named: dict[str, dict[str, Any]] = {}
    for fqn, items in optim_keys(path, list(model)).items():
        named[fqn] = {item: flat[f"optim.{fqn}.{item}"] for item in items}
    for fqn, items in (state.get("optim_scalars") or {}).items():
        named.setdefault(fqn, {}).update(items)
    osd = by_index({"state": named, "param_groups": state["param_groups"]})
    return {"model": model, "optimizer": osd, "scaler": state.get("scaler"),
            "rng": state["rng"], "world_size": state["world_size"],
            "position": state["position"], "config": state.get("config", {})}


def by_index(osd: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed full optimizer state -> torch's own format (positions in the groups)."""
    state, groups, index = {}, [], 0
    for group in osd["param_groups"]:
        ids = []
        for name in group["params"]:
            if name in osd["state"]:
                state[index] = osd["state"][name]
            ids.append(index)
            index += 1
        groups.append({**group, "params": ids})
    return {"state": state, "param_groups": groups}


def named_groups(groups: list[dict[str, Any]], names: dict[int, str]) -> list[dict[str, Any]]:
    """Parameter groups with their parameters by name (``names``: id(param) -> name)."""
    return [{**{k: v for k, v in g.items() if k != "params"},
             "params": [names[id(p)] for p in g["params"]]} for g in groups]


def split_state(state: dict[Any, dict[str, Any]], names: dict[Any, str]
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """Per-parameter optimizer state -> (its tensors, its other values), by parameter name."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for key, items in state.items():
        for item, value in items.items():
            side = tensors if isinstance(value, torch.Tensor) else scalars
            side.setdefault(names[key], {})[item] = value
    return tensors, scalars


def restore(state: dict[str, Any], strategy: Strategy, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, precision: Precision) -> None:
    """Load a DCP checkpoint: a strategy with ``load_sharded`` reads its shards itself;
    every other one gets the full state and its own ``load_state_dict``."""
    load_sharded = getattr(strategy, "load_sharded", None)
    if load_sharded is not None:
        load_sharded(state, model, optimizer, precision)
    else:
        strategy.load_state_dict(materialize(state), model, optimizer, precision)
