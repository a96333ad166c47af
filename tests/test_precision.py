"""Precision as one object: autocast, the fp16 scaler and its state."""

from __future__ import annotations

import pytest
import torch

from dptrain.errors import UsageError
from dptrain.precision import Precision

CPU = torch.device("cpu")


def test_fp32_changes_nothing():
    p = Precision("32", CPU)
    x = torch.randn(4, 4)
    with p.autocast():
        assert (x @ x).dtype == torch.float32
    loss = torch.tensor(2.0)
    assert p.scale(loss) is loss
    assert p.state_dict() == {}


def test_bf16_autocasts_matmuls_and_keeps_the_optimizer_in_fp32():
    p = Precision("bf16", CPU)
    lin = torch.nn.Linear(4, 4)
    with p.autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    assert lin.weight.dtype == torch.float32
    calls = []
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    p.step(opt, lambda: calls.append(1))
    assert calls == [1]


def test_fp16_needs_cuda():
    with pytest.raises(UsageError, match="needs CUDA"):
        Precision("16", CPU)
    with pytest.raises(UsageError, match="not one of"):
        Precision("8", CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_scaler_state_round_trips():  # pragma: no cover - GPU only
    p = Precision("16", torch.device("cuda"))
    state = p.state_dict()
    assert "scale" in state
    q = Precision("16", torch.device("cuda"))
    q.load_state_dict(state)
    assert q.state_dict()["scale"] == state["scale"]
