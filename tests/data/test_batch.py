"""Batch structures: mapped, indexed, moved and fed to the model as a user would expect."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from dptrain.data import batch as B
from dptrain.data.datasets import split_sample
from dptrain.errors import UsageError


def test_tree_map_keeps_container_types():
    Pair = namedtuple("Pair", "a b")
    tree = {"x": torch.ones(2), "y": [torch.zeros(2), (torch.ones(2), 3)], "p": Pair(
        torch.ones(2), torch.zeros(2))}
    out = B.tree_map(lambda t: t * 2, tree)
    assert isinstance(out["y"], list) and isinstance(out["y"][1], tuple)
    assert isinstance(out["p"], Pair) and out["p"].a.tolist() == [2, 2]
    assert out["y"][1][1] == 3  # non-tensor leaves are left alone
    assert len(B.leaves(tree)) == 5


def test_index_and_slice_take_the_same_samples_from_every_leaf():
    x = {"a": torch.arange(10), "b": (torch.arange(10) * 10, torch.arange(20).view(10, 2))}
    sub = B.index(x, torch.tensor([3, 1]))
    assert sub["a"].tolist() == [3, 1] and sub["b"][0].tolist() == [30, 10]
    assert sub["b"][1].tolist() == [[6, 7], [2, 3]]
    assert B.slice_(x, 2, 4)["b"][0].tolist() == [20, 30]
    assert B.num_samples(x) == 10


def test_disagreeing_sample_counts_are_refused():
    with pytest.raises(UsageError, match="different numbers of samples"):
        B.num_samples((torch.zeros(3), torch.zeros(4)))
    with pytest.raises(UsageError, match="no tensor"):
        B.num_samples({"a": 1})


def test_the_model_is_called_by_the_shape_of_the_inputs():
    class M(nn.Module):
        def forward(self, a, b=None):
            return a if b is None else a + b

    m, one, two = M(), torch.ones(1), torch.full((1,), 2.0)
    assert B.call_model(m, one).item() == 1
    assert B.call_model(m, (one, two)).item() == 3
    assert B.call_model(m, {"a": one, "b": two}).item() == 3


def test_cast_floats_leaves_integers_alone():
    x = (torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.int64))
    out = B.cast_floats(x, torch.float32)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.int64
    assert B.float_dtypes(x) == {torch.float64}


def test_dataset_samples_split_into_inputs_and_targets():
    assert split_sample((1, 2)) == (1, 2)
    assert split_sample((1, 2, 3)) == ((1, 2), 3)
    d = {"x": 1, "labels": 5}
    assert split_sample(d) == (d, 5)
    assert split_sample({"x": 1}) == ({"x": 1}, None)
