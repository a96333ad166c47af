"""What training minimises and what evaluation reports: the loss, the task, its metrics.

:class:`Objective` turns a model's output into a loss (``--loss``) and into metric *sums*
(``--task``). Every metric is a function of sums over samples -- correct counts, true/false
positives, squared errors -- so the ranks add their sums in one all-reduce and the result
equals a one-process evaluation for any world size (never an average of averages).

Model outputs may be a tensor, a tuple (first element = predictions) or a dict/``ModelOutput``
(``logits`` or ``predictions``, and ``loss``: a model that computes its own loss is used as is).
Targets keep their dtype: a target that does not fit the task is a :class:`UsageError` naming
the problem and the fix, never a silent cast (integer class labels are never made from floats).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dptrain.config import LOSSES, TASKS
from dptrain.errors import UsageError

TASK_OF_LOSS = {"cross_entropy": "classification", "nll": "classification",
                "bce": "multilabel", "mse": "regression", "l1": "regression",
                "huber": "regression"}


@dataclass
class Output:
    """A model's output, taken apart: predictions (logits, values) and its own loss if any."""

    predictions: torch.Tensor | None
    loss: torch.Tensor | None = None


def split_output(out: Any) -> Output:
    if isinstance(out, torch.Tensor):
        return Output(out)
    if isinstance(out, Mapping):
        pred = out.get("logits", out.get("predictions"))
        loss = out.get("loss")
        if pred is None and loss is None:
            raise UsageError(f"the model returned a dict with keys {sorted(out)}; return "
                             "'logits' (or 'predictions') and/or 'loss'")
        return Output(pred, loss)
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return Output(out[0])
    raise UsageError(f"the model returned {type(out).__name__}; return a tensor, a tuple whose "
                     "first element is the predictions, or a dict with 'logits'/'loss'")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, D)."""
    return t.reshape(len(t), -1)


class Objective:
    """Loss and metrics for one task. Call :meth:`prepare_targets` on the data, then
    :meth:`check_output` on one dry-run batch, before training."""

    def __init__(self, loss: str = "cross_entropy", task: str = "auto", *,
                 label_smoothing: float = 0.0) -> None:
        if task not in TASKS:
            raise UsageError(f"--task {task!r} is not one of {', '.join(TASKS)}")
        self.loss_name = loss
        self.custom: Callable[[Any, Any], torch.Tensor] | None = None
        if loss not in LOSSES:
            if ":" not in loss:
                raise UsageError(f"unknown --loss {loss!r}: use one of {', '.join(LOSSES)} or "
                                 "package.module:fn (fn(outputs, targets) -> scalar loss)")
            from dptrain.models import load_factory

            self.custom = load_factory(loss, "loss")
        own = TASK_OF_LOSS.get(loss)  # a built-in loss's task (None: a custom loss)
        if own is not None and task != "auto" and "classification" in (task, own) and task != own:
            # class labels (N,) against (N, C) logits need cross_entropy/nll, and those read
            # float targets as class probabilities: any other pairing fails mid-run, or worse
            fits = ("cross_entropy or nll" if task == "classification"
                    else "bce" if task == "multilabel" else "mse, l1 or huber")
            raise UsageError(f"--loss {loss} is a {own} loss, but --task is {task}; for "
                             f"{task} use --loss {fits}, or drop --task")
        self.task = task if task != "auto" else own or "auto"
        self.label_smoothing = label_smoothing
        if label_smoothing and loss != "cross_entropy":
            raise UsageError(f"--label-smoothing is for --loss cross_entropy, not {loss}; "
                             "drop it")
        self.width = 0  # classes / labels / outputs per sample, from the dry run
        self.target_dtype: torch.dtype | None = None

    # ------------------------------------------------------------------ targets
    def prepare_targets(self, targets: torch.Tensor | None, split: str,
                        float_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Check one split's targets against the task; returns them (BCE/regression targets
        as ``float_dtype``, the model's). Resolves ``--task auto`` for a custom loss."""
        if targets is None:
            return None
        if not isinstance(targets, torch.Tensor):
            raise UsageError(f"the {split} targets are {type(targets).__name__}, not a tensor")
        floating = targets.is_floating_point()
        if self.task == "auto":  # custom loss: the target dtype decides the metrics
            self.task = "regression" if floating else "classification"
        if targets.is_complex():
            raise UsageError(f"the {split} targets are complex ({targets.dtype}); use real "
                             "numbers")
        if floating and not bool(torch.isfinite(targets).all()):
            bad = int((~torch.isfinite(targets)).sum())
            raise UsageError(f"the {split} targets hold {bad} NaN/inf value(s); clean the "
                             "data (drop or impute those samples)")
        if self.task == "classification":
            if floating or targets.dtype == torch.bool:
                raise UsageError(
                    f"the {split} targets are {str(targets.dtype).removeprefix('torch.')}, but "
                    f"--loss {self.loss_name} (classification) needs integer class labels; for "
                    "real-valued targets pass --loss mse (or l1/huber), for multi-hot labels "
                    "--loss bce")
            if targets.dim() != 1:
                raise UsageError(f"the {split} class labels have shape {tuple(targets.shape)}; "
                                 "classification needs one integer label per sample (N,)")
            if self.custom is None:
                return targets.long()
            return targets
        if self.task == "multilabel":
            if len(targets) and not bool(((targets == 0) | (targets == 1)).all()):
                raise UsageError(f"the {split} targets of --loss {self.loss_name} (multi-label) "
                                 "must be 0 or 1; for real-valued targets pass --loss mse")
            return targets.to(float_dtype)
        if self.task == "regression" and not floating:
            if self.custom is None:
                return targets.to(float_dtype)
            return targets
        return targets.to(float_dtype) if self.custom is None else targets

    def check_output(self, out: Any, targets: torch.Tensor | None,
                     all_targets: list[torch.Tensor]) -> None:
        """After one dry-run batch: the output fits the targets; labels fit the classes."""
        o = split_output(out)
        if o.loss is None and self.custom is None and targets is None:
            raise UsageError("the data has no targets and the model returned no 'loss'; give "
                             "the dataset labels, or return {'loss': ...} from the model")
        if self.custom is not None:
            self._check_custom_loss(out, targets)
        if o.predictions is None:
            return
        pred = o.predictions
        if not pred.is_floating_point():
            raise UsageError(f"the model's predictions are {pred.dtype}; return float logits "
                             "or values")
        if self.task == "classification":
            if pred.dim() != 2:
                raise UsageError(f"classification needs logits of shape (N, classes), the model "
                                 f"returned {tuple(pred.shape)}; for one logit per sample use "
                                 "--loss bce")
            self.width = pred.shape[1]
            self.check_labels(all_targets)
        elif targets is not None:
            if pred.numel() != targets.numel():
                raise UsageError(f"the model's output has shape {tuple(pred.shape)} but the "
                                 f"targets {tuple(targets.shape)}; they need the same number "
                                 "of values per sample")
            self.width = _flat(targets).shape[1] if targets.dim() > 1 else 1

    def _check_custom_loss(self, out: Any, targets: torch.Tensor | None) -> None:
        """The custom loss called once on the dry-run batch: it runs, and gives a scalar."""
        from dptrain.models import call_plugin

        value = call_plugin(self.loss_name, "loss", self.custom, out, targets)
        if not (isinstance(value, torch.Tensor) and value.numel() == 1
                and value.is_floating_point()):
            got = (f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                   if isinstance(value, torch.Tensor) else type(value).__name__)
            raise UsageError(f"--loss {self.loss_name!r} returned {got}; it must return the "
                             "batch's loss as one float tensor (e.g. the mean over samples)")

    def check_labels(self, targets: list[torch.Tensor], split: str = "") -> None:
        """Class labels within [0, classes) (after :meth:`check_output` set the classes)."""
        for t in targets:
            if len(t) and (int(t.min()) < 0 or int(t.max()) >= self.width):
                raise UsageError(
                    f"{split + ' ' if split else ''}class labels range over [{int(t.min())}, "
                    f"{int(t.max())}], but the model has {self.width} outputs: labels must be "
                    f"in [0, {self.width}); fix the labels or the model's output size")

    # ------------------------------------------------------------------ loss
    def loss(self, out: Any, targets: torch.Tensor | None) -> torch.Tensor:
        """The scalar training loss (mean over the batch's samples) of one micro-batch."""
        if self.custom is not None:
            return self.custom(out, targets)
        o = split_output(out)
        if o.loss is not None:
            return o.loss
        return self._builtin(o.predictions, targets, self.label_smoothing)

    def _builtin(self, pred: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0,
                 reduction: str = "mean") -> torch.Tensor:
        name = self.loss_name
        if name == "cross_entropy":
            return F.cross_entropy(pred, y, label_smoothing=smoothing, reduction=reduction)
        if name == "nll":
            return F.nll_loss(pred, y, reduction=reduction)
        pred = pred.reshape(y.shape)
        if reduction == "sum" and y.dim() > 1:  # per-sample mean over outputs, summed
            return self._builtin(pred, y, reduction="none").reshape(len(y), -1).mean(1).sum()
        if name == "bce":
            return F.binary_cross_entropy_with_logits(pred, y, reduction=reduction)
        if name == "mse":
            return F.mse_loss(pred, y, reduction=reduction)
        if name == "l1":
            return F.l1_loss(pred, y, reduction=reduction)
        return F.huber_loss(pred, y, reduction=reduction)

    # ------------------------------------------------------------------ metrics
    def metric_sums(self, device: torch.device) -> MetricSums:
        return MetricSums(self, device)


class MetricSums:
    """Per-sample sums of one evaluation, on the device; :meth:`finish` after the all-reduce.

    Layout (float64): ``[samples, loss_sum]`` then, per task,
    classification ``[correct, correct_top5]``; multi-label per label
    ``[correct, tp, fp, fn]``; regression per output ``[sse, sae, sum_y, sum_y2]``.
    """

    def __init__(self, objective: Objective, device: torch.device) -> None:
        self.obj = objective
        width = max(1, objective.width)
        extra = {"classification": 2, "multilabel": 4 * width, "regression": 4 * width}
        self.totals = torch.zeros(2 + extra.get(objective.task, 0), dtype=torch.float64,
                                  device=device)

    def update(self, out: Any, targets: torch.Tensor | None) -> None:
        obj, t = self.obj, self.totals
        o = split_output(out)
        n = len(targets) if targets is not None else len(o.predictions)
        t[0] += n
        if obj.custom is not None:
            t[1] += obj.custom(out, targets).detach().double() * n
        elif o.loss is not None and (targets is None or o.predictions is None):
            t[1] += o.loss.detach().double() * n
        else:
            pred = o.predictions.float()
            y = targets if not targets.is_floating_point() else targets.float()
            t[1] += obj._builtin(pred, y, reduction="sum").double()
        if targets is None or o.predictions is None:
            return
        pred = o.predictions.detach().float()
        if obj.task == "classification":
            t[2] += (pred.argmax(1) == targets).sum()
            if pred.shape[1] > 5:
                top5 = pred.topk(5, dim=1).indices
                t[3] += (top5 == targets.view(-1, 1)).any(1).sum()
            return
        y = _flat(targets.double())
        p = pred.double().reshape(y.shape)
        if obj.task == "multilabel":
            hit, truth = p > 0, y > 0.5
            stats = torch.stack([(hit == truth).sum(0), (hit & truth).sum(0),
                                 (hit & ~truth).sum(0), (~hit & truth).sum(0)])
        else:
            err = p - y
            stats = torch.stack([(err * err).sum(0), err.abs().sum(0), y.sum(0),
                                 (y * y).sum(0)])
        t[2:] += stats.double().reshape(-1)

    def finish(self) -> dict[str, Any]:
        """The metrics from the (already all-reduced) sums."""
        v = self.totals.tolist()
        n = int(v[0])
        out: dict[str, Any] = {"samples": n, "loss": v[1] / n if n else math.nan}
        task = self.obj.task
        if task == "classification":
            out["accuracy"] = v[2] / n if n else math.nan
            if self.obj.width > 5:
                out["top5_accuracy"] = v[3] / n if n else math.nan
        elif task in ("multilabel", "regression"):
            w = max(1, self.obj.width)
            a, b, c, d = (v[2 + k * w:2 + (k + 1) * w] for k in range(4))
            if task == "multilabel":
                out.update(_multilabel(a, b, c, d, n))
            else:
                out.update(_regression(a, b, c, d, n))
        return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _multilabel(correct: list[float], tp: list[float], fp: list[float], fn: list[float],
                n: int) -> dict[str, Any]:
    per_f1 = [_ratio(2 * t, 2 * t + p + f) if (t + p + f) else 1.0
              for t, p, f in zip(tp, fp, fn, strict=True)]
    per_acc = [_ratio(c, n) for c in correct]
    return {"accuracy": _ratio(sum(correct), n * len(correct)),
            "per_label_accuracy": per_acc,
            "f1_micro": _ratio(2 * sum(tp), 2 * sum(tp) + sum(fp) + sum(fn)),
            "f1_macro": sum(per_f1) / len(per_f1), "per_label_f1": per_f1}


def _regression(sse: list[float], sae: list[float], sy: list[float], sy2: list[float],
                n: int) -> dict[str, Any]:
    w = len(sse)
    r2 = []
    for e, s, s2 in zip(sse, sy, sy2, strict=True):
        total = s2 - s * s / n if n else 0.0  # sum of squares about the mean
        r2.append(1.0 - e / total if total > 0 else math.nan)
    return {"mse": _ratio(sum(sse), n * w), "mae": _ratio(sum(sae), n * w),
            "r2": sum(r2) / len(r2)}
