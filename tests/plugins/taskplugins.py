"""Plug-ins beyond image classification, as a user would write them: regression, multi-label,
one-logit BCE, models returning tuples or dicts (HuggingFace style), multi-input and dict
batches, float64 data."""

from __future__ import annotations

import os

import torch
from torch import nn

FEATURES = 8


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- regression
def regression_data(dtype: torch.dtype = torch.float32):
    """y = x . w + 0.1 noise: real-valued targets that a cast to int would destroy."""
    g = _gen(1)
    w = torch.randn(FEATURES, generator=g)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, FEATURES, generator=g)
        return x.to(dtype), (x @ w + 0.1 * torch.randn(n, generator=g)).to(dtype)

    tx, ty = make(int(os.environ.get("TASKPLUGINS_N", "768")))
    vx, vy = make(256)
    return tx, ty, vx, vy


def regression_data64():
    return regression_data(torch.float64)


def regressor() -> nn.Module:
    """One output per sample, shaped (N, 1) against (N,) targets."""
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))


def nan_targets():
    tx, ty, vx, vy = regression_data()
    ty[5] = float("nan")
    return tx, ty, vx, vy


# ---------------------------------------------------------------------------- multi-label
LABELS = 4


def multilabel_data():
    """Multi-hot float targets: label j is on when feature j + feature j+4 > 0."""
    g = _gen(2)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, FEATURES, generator=g)
        y = ((x[:, :LABELS] + x[:, LABELS:]) > 0).float()
        return x, y

    tx, ty = make(768)
    vx, vy = make(256)
    return tx, ty, vx, vy


def multilabel_model() -> nn.Module:
    return nn.Linear(FEATURES, LABELS)


def binary_data():
    tx, ty, vx, vy = multilabel_data()
    return tx, ty[:, 0], vx, vy[:, 0]


def binary_model() -> nn.Module:
    """One logit per sample, for --loss bce."""
    return nn.Linear(FEATURES, 1)


# ---------------------------------------------------------------------------- classification
def class_data():
    """Integer labels 0..2 from the sign pattern of two features."""
    g = _gen(3)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, FEATURES, generator=g)
        return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    tx, ty = make(768)
    vx, vy = make(256)
    return tx, ty, vx, vy


def bad_test_labels():
    tx, ty, vx, vy = class_data()
    vy[3] = 7  # outside the model's 3 classes, in the test split only
    return tx, ty, vx, vy


class DictOut(nn.Module):
    """Returns {"logits": ...}, as HuggingFace models do."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.body(x)}


def dict_model() -> nn.Module:
    return DictOut()


class TupleOut(DictOut):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        h = self.body(x)
        return h, h.detach().abs().mean()


def tuple_model() -> nn.Module:
    return TupleOut()


def linear3() -> nn.Module:
    return nn.Linear(FEATURES, 3)


# ---------------------------------------------------------------------------- batch structures
def two_input_data():
    """Inputs as a tuple (a, b): the model is called model(a, b)."""
    tx, ty, vx, vy = class_data()
    return (tx[:, :4], tx[:, 4:]), ty, (vx[:, :4], vx[:, 4:]), vy


class TwoInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(a) + self.b(b)))


def two_input_model() -> nn.Module:
    return TwoInput()


def dict_batch_data():
    """Inputs as a dict: the model is called model(features=..., mask=...)."""
    tx, ty, vx, vy = class_data()
    return ({"features": tx, "mask": torch.ones(len(tx), FEATURES)}, ty,
            {"features": vx, "mask": torch.ones(len(vx), FEATURES)}, vy)


class HFStyle(nn.Module):
    """model(**batch) -> {"loss", "logits"} when labels are given: it computes its own loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.body(features * mask if mask is not None else features)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def hf_model() -> nn.Module:
    return HFStyle()


class DictSamples(torch.utils.data.Dataset):
    """Map-style, one dict per sample ({"features", "labels"}): collated into a dict batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "labels": self.y[i]}


def dict_dataset():
    tx, ty, vx, vy = class_data()
    return DictSamples(tx, ty), DictSamples(vx, vy)


def hf_tensors():
    """Tensor plug-in whose inputs dict carries the labels, HuggingFace style (no *_y)."""
    tx, ty, vx, vy = class_data()
    return {"features": tx, "labels": ty}, None, {"features": vx, "labels": vy}, None


def mse_sum(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A custom loss: fn(outputs, targets) -> scalar (mean squared error, written out)."""
    return ((outputs.reshape(targets.shape) - targets) ** 2).mean()


def frozen_model() -> nn.Module:
    m = nn.Linear(FEATURES, 3)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def wrong_width_model() -> nn.Module:
    return nn.Linear(5, 3)  # the data has 8 features


def raising_model() -> nn.Module:
    """A model factory with a bug of its own (dptrain reports where, in one line)."""
    raise ValueError("hidden size must be even")


def raising_data():
    raise RuntimeError("the data files are not where this factory looks")


def one_argument_loss(outputs: torch.Tensor) -> torch.Tensor:
    """A loss with the wrong signature: dptrain calls loss(outputs, targets)."""
    return outputs.mean()


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Not reduced: one value per sample, not the batch's scalar loss."""
    return ((outputs.reshape(targets.shape) - targets) ** 2)
