"""The objective: losses for every output shape, target checks, exact metric sums."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dptrain.errors import UsageError
from dptrain.objective import Objective, split_output

g = torch.Generator().manual_seed(0)


def sums_of(obj: Objective, pred: torch.Tensor, y: torch.Tensor, shards: int = 1) -> dict:
    """Metrics of ``pred`` against ``y``, the sums collected over ``shards`` pieces (what an
    all-reduce over ``shards`` ranks adds up)."""
    total = None
    for p, t in zip(pred.tensor_split(shards), y.tensor_split(shards), strict=True):
        m = obj.metric_sums(torch.device("cpu"))
        m.update(p, t)
        total = m.totals if total is None else total + m.totals
    m = obj.metric_sums(torch.device("cpu"))
    m.totals = total
    return m.finish()


def test_split_output_takes_tensor_tuple_and_dict():
    t = torch.zeros(2, 3)
    assert split_output(t).predictions is t
    assert split_output((t, torch.ones(1))).predictions is t
    o = split_output({"logits": t, "loss": torch.tensor(1.5)})
    assert o.predictions is t and float(o.loss) == 1.5
    assert split_output({"predictions": t}).predictions is t
    with pytest.raises(UsageError, match="'logits'"):
        split_output({"hidden": t})
    with pytest.raises(UsageError, match="return a tensor"):
        split_output("nope")


def test_model_loss_is_used_as_is_and_tuple_outputs_use_the_first_element():
    obj = Objective("cross_entropy")
    y = torch.tensor([0, 2])
    logits = torch.randn(2, 3, generator=g)
    assert obj.loss({"loss": torch.tensor(7.0), "logits": logits}, y).item() == 7.0
    assert torch.equal(obj.loss((logits, 1), y), F.cross_entropy(logits, y))


def test_task_follows_the_loss_or_the_target_dtype():
    assert Objective("nll").task == "classification"
    assert Objective("bce").task == "multilabel"
    assert Objective("huber").task == "regression"
    custom = Objective("taskplugins:mse_sum")
    assert custom.task == "auto"
    custom.prepare_targets(torch.randn(4), "train")
    assert custom.task == "regression"
    custom = Objective("taskplugins:mse_sum")
    custom.prepare_targets(torch.tensor([1, 0]), "train")
    assert custom.task == "classification"


@pytest.mark.parametrize(("loss", "targets", "message"), [
    ("cross_entropy", torch.tensor([0.5, 1.2]), "needs integer class labels"),
    ("cross_entropy", torch.tensor([[0, 1]]), "one integer label per sample"),
    ("mse", torch.tensor([0.5, float("nan")]), "NaN/inf"),
    ("bce", torch.tensor([0.0, 2.0]), "must be 0 or 1"),
    ("mse", torch.tensor([1 + 2j]), "complex"),
])
def test_targets_that_do_not_fit_the_task_are_refused(loss, targets, message):
    with pytest.raises(UsageError, match=message):
        Objective(loss).prepare_targets(targets, "train")


def test_float_targets_stay_float_and_are_never_cast_to_classes():
    y = torch.tensor([0.25, 1.75], dtype=torch.float64)
    out = Objective("mse").prepare_targets(y, "train", torch.float32)
    assert out.dtype == torch.float32 and out.tolist() == [0.25, 1.75]
    assert Objective("bce").prepare_targets(torch.tensor([0, 1]), "t").dtype == torch.float32


def test_labels_outside_the_classes_are_refused_after_the_dry_run():
    obj = Objective("cross_entropy")
    y = torch.tensor([0, 1])
    with pytest.raises(UsageError, match=r"labels must be in \[0, 3\)"):
        obj.check_output(torch.zeros(2, 3), y, [y, torch.tensor([2, 3])])
    obj.check_output(torch.zeros(2, 3), y, [y, torch.tensor([2, 0])])
    assert obj.width == 3


def test_output_shape_must_match_regression_targets():
    obj = Objective("mse")
    with pytest.raises(UsageError, match="same number of values"):
        obj.check_output(torch.zeros(4, 2), torch.zeros(4), [])
    obj.check_output(torch.zeros(4, 1), torch.zeros(4), [])  # (N, 1) against (N,): fine
    assert obj.width == 1


def test_label_smoothing_only_with_cross_entropy():
    with pytest.raises(UsageError, match="label-smoothing"):
        Objective("mse", label_smoothing=0.1)


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_classification_metrics_are_exact_for_any_sharding(shards):
    obj = Objective("cross_entropy")
    obj.width = 10
    pred, y = torch.randn(101, 10, generator=g), torch.randint(0, 10, (101,), generator=g)
    m = sums_of(obj, pred, y, shards)
    assert m["samples"] == 101
    assert m["accuracy"] == (pred.argmax(1) == y).sum().item() / 101
    top5 = (pred.topk(5, 1).indices == y[:, None]).any(1).double().mean().item()
    assert m["top5_accuracy"] == pytest.approx(top5, abs=1e-12)
    assert m["loss"] == pytest.approx(F.cross_entropy(pred, y).item(), rel=1e-6)


@pytest.mark.parametrize("shards", [1, 3])
def test_multilabel_metrics_match_a_direct_computation(shards):
    obj = Objective("bce")
    obj.width = 4
    pred = torch.randn(50, 4, generator=g)
    y = (torch.rand(50, 4, generator=g) > 0.5).float()
    m = sums_of(obj, pred, y, shards)
    hit = pred > 0
    truth = y > 0.5
    assert m["accuracy"] == pytest.approx((hit == truth).double().mean().item(), abs=1e-12)
    tp = (hit & truth).sum(0).double()
    fp = (hit & ~truth).sum(0).double()
    fn = (~hit & truth).sum(0).double()
    assert m["f1_micro"] == pytest.approx((2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))
                                          .item(), abs=1e-12)
    assert m["f1_macro"] == pytest.approx((2 * tp / (2 * tp + fp + fn)).mean().item(),
                                          abs=1e-12)
    assert len(m["per_label_accuracy"]) == 4
    assert m["loss"] == pytest.approx(
        F.binary_cross_entropy_with_logits(pred, y).item(), rel=1e-6)


@pytest.mark.parametrize("shards", [1, 2, 5])
def test_regression_metrics_match_a_direct_computation(shards):
    obj = Objective("mse")
    obj.width = 1
    y = torch.randn(60, generator=g)
    pred = (y + 0.3 * torch.randn(60, generator=g)).view(60, 1)
    m = sums_of(obj, pred, y, shards)
    err = pred.view(-1).double() - y.double()
    assert m["mse"] == pytest.approx((err ** 2).mean().item(), rel=1e-9)
    assert m["mae"] == pytest.approx(err.abs().mean().item(), rel=1e-9)
    r2 = 1 - (err ** 2).sum() / ((y.double() - y.double().mean()) ** 2).sum()
    assert m["r2"] == pytest.approx(r2.item(), rel=1e-9)
    assert m["loss"] == pytest.approx(m["mse"], rel=1e-6)


def test_regression_r2_averages_outputs_and_is_nan_for_constant_targets():
    obj = Objective("l1")
    obj.width = 2
    y = torch.stack([torch.arange(6.0), torch.zeros(6)], 1)
    m = sums_of(obj, y.clone(), y)
    assert m["mse"] == 0 and m["mae"] == 0
    assert math.isnan(m["r2"])  # the second output has no variance: R² undefined
    obj2 = Objective("l1")
    obj2.width = 1
    assert sums_of(obj2, y[:, :1].clone(), y[:, 0])["r2"] == 1.0


def test_custom_loss_is_called_with_the_raw_outputs():
    obj = Objective("taskplugins:mse_sum")
    y = torch.tensor([1.0, 2.0])
    out = torch.tensor([[1.0], [4.0]])
    assert obj.loss(out, y).item() == 2.0  # ((0)^2 + (2)^2) / 2
    obj.prepare_targets(y, "train")
    obj.width = 1
    assert sums_of(obj, out, y)["loss"] == pytest.approx(2.0)


def test_unknown_loss_and_task():
    with pytest.raises(UsageError, match="unknown --loss"):
        Objective("hinge")
    with pytest.raises(UsageError, match="--task"):
        Objective("mse", "ranking")


@pytest.mark.parametrize(("loss", "task", "fits"), [
    ("bce", "classification", "cross_entropy or nll"),
    ("mse", "classification", "cross_entropy or nll"),
    ("cross_entropy", "regression", "mse, l1 or huber"),
    ("nll", "multilabel", "bce"),
])
def test_a_builtin_loss_against_the_other_side_of_classification_is_refused(loss, task, fits):
    """Class labels against logits need cross_entropy/nll, and those read float targets as
    class probabilities: such a pairing failed mid-run with a reshape error (bce +
    classification) or would train on a misread target."""
    with pytest.raises(UsageError, match=f"--loss {loss} is a .* loss, but --task is {task}; "
                                         f"for {task} use --loss {fits}"):
        Objective(loss, task)


@pytest.mark.parametrize(("loss", "task"), [
    ("cross_entropy", "classification"), ("bce", "multilabel"), ("bce", "regression"),
    ("mse", "multilabel"), ("huber", "auto")])
def test_pairings_that_fit_are_kept(loss, task):
    assert Objective(loss, task).task == (task if task != "auto" else "regression")
