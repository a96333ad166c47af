"""Inference from a checkpoint: ``dptrain.load_model(path)`` and ``dptrain predict``.

A checkpoint holds the unwrapped weights and the run's configuration (model, its factory
arguments, dataset); the normalisation the model was trained with is recorded with it
(``normalization``: mean/std of uint8 pixels, or null for data used as given). Older
checkpoints without the record get the built-in datasets' known values (a plug-in's data is
loaded once to tell). :class:`InferenceModel` applies it, so raw dataset inputs give the run's
own results: ``dptrain predict`` reproduces the run's test accuracy exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dptrain.errors import UsageError

__all__ = ["InferenceModel", "add_parser", "load_model", "normalization_of"]


class InferenceModel(nn.Module):
    """The trained model behind the normalisation of its training data.

    ``forward`` takes inputs as the dataset gives them (uint8 images for MNIST-like data) and
    returns the model's outputs; ``.model`` is the plain model, ``.normalization`` the record,
    ``.config`` the run's configuration (a dict)."""

    def __init__(self, model: nn.Module, normalization: dict[str, Any],
                 config: dict[str, Any]) -> None:
        super().__init__()
        from dptrain.data.loader import Normalizer

        self.model = model
        self.normalization = dict(normalization)
        self.config = dict(config)
        self.normalize = Normalizer(normalization.get("mean"), normalization.get("std"))

    def forward(self, x: Any) -> Any:
        from dptrain.data.batch import call_model

        if (self.normalization.get("mean") is not None and isinstance(x, torch.Tensor)
                and x.is_floating_point()):
            # floats in [0, 1] (torchvision's ToTensor) or already normalised would be
            # normalised again: a near-constant image, silently wrong predictions
            raise UsageError(f"this model takes the dataset's uint8 pixels (0..255) and "
                             f"normalises them itself ({self.normalization.get('input')}); got "
                             f"{x.dtype}: pass uint8 images, or call .model(...) on inputs "
                             "you normalised yourself")
        return call_model(self.model, self.normalize(x))


def normalization_of(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's normalisation record; for checkpoints without one, the dataset's."""
    for found in (state.get("normalization"), (state.get("data") or {}).get("normalization")):
        if isinstance(found, dict):
            return found
    from dptrain.data.datasets import NORMALISATION, load_splits

    name = config.get("dataset", "mnist")
    if name in NORMALISATION:
        mean, std = NORMALISATION[name]
        return {"mean": mean, "std": std, "input": "uint8 pixels, x / 255", "dataset": name}
    return load_splits(name, config.get("data_root", "./data"), log=lambda _m: None
                       ).normalization()


def _open(path: str | Path) -> tuple[dict[str, Any], Any]:
    from dptrain import checkpoint as ck
    from dptrain.config import TrainConfig

    p = Path(path)
    if p.is_dir() and (p / "checkpoints" / "last.pt").is_file():  # a run directory
        p = p / "checkpoints" / "last.pt"
    if p.is_dir():
        raise UsageError(f"checkpoint {p} is a directory (a sharded DCP checkpoint, or not a "
                         "run directory); pass RUN_DIR or RUN_DIR/checkpoints/last.pt")
    if not p.is_file():
        raise UsageError(f"checkpoint {p} does not exist (or is not a file); pass RUN_DIR or "
                         "RUN_DIR/checkpoints/last.pt")
    state = ck.load(p)
    if not isinstance(state.get("config"), dict) or "model" not in state:
        raise UsageError(f"{p} is not a dptrain checkpoint (no model or config in it)")
    try:
        cfg = TrainConfig.from_dict(state["config"], source=f"checkpoint {p}")
    except TypeError as exc:
        raise UsageError(f"checkpoint {p}: its configuration does not fit this dptrain "
                         f"({exc})") from None
    return state, cfg


def load_model(path: str | Path, device: torch.device | str = "cpu") -> InferenceModel:
    """The model of a dptrain checkpoint, in eval mode, behind its training normalisation.

    Built from the checkpoint's configuration (``model``, ``model_args``; a plug-in factory
    must be importable), weights loaded strictly, moved to ``device``."""
    from dptrain.models import build_model

    device = _device(device)
    state, cfg = _open(path)
    if cfg.dataset == "session":  # dptrain.Session: the script's own model class and data
        raise UsageError(f"checkpoint {path} was written by a dptrain.Session script with its "
                         f"own model ({cfg.model}), which dptrain cannot build; build it in "
                         "your code and load the weights: model.load_state_dict(torch.load("
                         "PATH, weights_only=True)['model'])")
    model = build_model(cfg.model, cfg.model_args)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        from dptrain.models import layout_hint

        raise UsageError(f"checkpoint {path} does not fit --model {cfg.model} ({first})"
                         f"{layout_hint(cfg.model, state['model'])}") from None
    wrapped = InferenceModel(model, normalization_of(state, state["config"]), state["config"])
    return wrapped.to(device).eval()


def _device(device: torch.device | str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"device {device!r} is not a torch device ({exc}); use cpu or "
                         "cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r}: no CUDA device is visible; use cpu")
    return dev


class _OneProcess:
    """The few strategy members :func:`dptrain.evaluation.evaluate` asks of, for one process."""

    rank, world_size = 0, 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def all_reduce_sum(self, _t: torch.Tensor) -> None:
        return None


def predict(ckpt: str | Path, *, dataset: str = "", data_root: str = "",
            batch_size: int = 0, device: str = "cpu", out: str | Path | None = None,
            log: Any = print) -> dict[str, Any]:
    """Evaluate the checkpoint's model on the test split of its dataset (or ``dataset``),
    with its normalisation, exactly as the run's final evaluation; ``out``: also write the
    per-sample predictions (JSON). Returns ``{"metrics": ..., ...}``."""
    from dptrain.data import batch as B
    from dptrain.data.datasets import load_splits
    from dptrain.data.loader import eval_batches
    from dptrain.evaluation import evaluate
    from dptrain.objective import Objective, split_output
    from dptrain.precision import Precision
    from dptrain.run import _BatchPreparer

    if batch_size < 0 or isinstance(batch_size, bool):
        raise UsageError(f"--batch-size {batch_size}: must be a positive number of samples")
    if out is not None:
        _check_out(Path(out))
    dev = _device(device)
    model = load_model(ckpt, dev)
    cfg = model.config
    name = dataset or cfg.get("dataset", "mnist")
    splits = load_splits(name, data_root or cfg.get("data_root", "./data"), log=log)
    objective = Objective(cfg.get("loss", "cross_entropy"), cfg.get("task", "auto"),
                          label_smoothing=cfg.get("label_smoothing", 0.0))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if splits.is_dataset:
        prepare = _BatchPreparer(objective, dtype, lambda _d: None)
        x, y = splits.test_x, None
    else:
        prepare = None
        x = B.cast_floats(splits.test_x, dtype)
        y = objective.prepare_targets(splits.test_y, "test", dtype)
    x, y = B.to_device(x, dev), B.to_device(y, dev)
    batch = batch_size or int(cfg.get("eval_batch_size", 1000))
    first = next(iter(eval_batches(x, y, 0, min(batch, 8), min(batch, 8), dev, prepare)))
    with torch.no_grad():
        objective.check_output(model(first[0]), first[1], [] if y is None else [y])
    precision = Precision(cfg.get("precision", "32"), dev)
    metrics = evaluate(model.model, x, y, _OneProcess(dev), objective, precision, batch,
                       model.normalize, prepare)
    result = {"checkpoint": str(ckpt), "dataset": name, "split": "test",
              "normalization": model.normalization, "metrics": metrics}
    if out is not None:
        n = len(x) if splits.is_dataset else B.num_samples(x)
        preds: list[Any] = []
        with torch.no_grad(), precision.autocast():
            for xb, _ in eval_batches(x, y, 0, n, batch, dev, prepare):
                p = split_output(model(xb)).predictions
                if p is None:
                    continue
                p = p.float()
                preds.extend((p.argmax(1) if objective.task == "classification" else p).tolist())
        _write_new(Path(out), (json.dumps({**result, "predictions": preds}) + "\n").encode())
    return result


def _check_out(out: Path) -> None:
    """``--out`` names a new file in an existing directory: predict never replaces a file
    (a run's ``last.pt`` or ``summary.json`` given by mistake would be lost)."""
    if out.exists() or out.is_symlink():
        raise UsageError(f"--out {out}: already exists; predict writes a new file only "
                         "(remove it or choose another name)")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")


def _write_new(out: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``out`` (exclusive create: a file that appeared
    meanwhile is not replaced); a failed write removes the partial file."""
    try:
        fh = open(out, "xb")  # noqa: SIM115 (the write's own errors are told apart below)
    except FileExistsError:
        raise UsageError(f"--out {out}: appeared while predicting; not replaced") from None
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    try:
        with fh:
            fh.write(data)
    except OSError as exc:
        out.unlink(missing_ok=True)
        raise UsageError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None


def cmd_predict(args: argparse.Namespace) -> int:
    from dptrain.metrics import format_metrics

    result = predict(args.ckpt, dataset=args.dataset, data_root=args.data_root,
                     batch_size=args.batch_size, device=args.device, out=args.out,
                     log=lambda m: print(m, file=sys.stderr))
    m = result["metrics"]
    print(f"test {format_metrics(m) or 'n/a'} ({m.get('samples')} samples) | "
          f"{result['dataset']} | {args.ckpt}" + (f" | predictions in {args.out}"
                                                  if args.out else ""))
    return 0


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: must be at least 1")
    return n


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``dptrain predict`` on the top-level subparsers."""
    p = sub.add_parser(
        "predict", help="evaluate a checkpoint (with its normalisation) or write predictions",
        description="Load a checkpoint's model (its config and weights), apply the "
        "normalisation it was trained with, and print the metrics on the test split of its "
        "dataset (or --dataset); --out FILE also writes the per-sample predictions as JSON.")
    p.add_argument("--ckpt", required=True, metavar="PATH",
                   help="a run directory, or its checkpoint file (RUN_DIR/checkpoints/last.pt)")
    p.add_argument("--dataset", default="", metavar="DATASET",
                   help="dataset name or package.module:factory (default: the checkpoint's)")
    p.add_argument("--data-root", default="", metavar="DIR",
                   help="dataset root (default: the checkpoint's)")
    p.add_argument("--batch-size", type=_positive, default=0, metavar="N",
                   help="evaluation batch (default: the run's --eval-batch-size)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="device (default: cpu)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the predictions as JSON to this new file; an existing file is "
                   "never replaced (default: only print the metrics)")
    p.set_defaults(func=cmd_predict)
