"""The optimizer's direct step: bitwise the same as ``optimizer.step()``, minus its wrapper."""

from __future__ import annotations

import pytest
import torch

from dptrain.config import TrainConfig
from dptrain.optim import build_optimizer, direct_step

CONFIGS = [
    {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0},
    {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
    {"optimizer": "adam", "weight_decay": 1e-4},
    {"optimizer": "adamw", "weight_decay": 1e-2},
    {"optimizer": "adadelta", "lr": 1.0},
]


def _train(values: dict, direct: bool) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = build_optimizer(TrainConfig(**{"lr": 0.05, **values}), model.parameters(),
                          torch.device("cpu"))
    step = direct_step(opt) if direct else opt.step
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        x, y = torch.randn(32, 20, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


@pytest.mark.parametrize("values", CONFIGS, ids=lambda v: v["optimizer"])
def test_direct_step_is_bitwise_the_wrapped_step(values: dict) -> None:
    wrapped, state_w = _train(values, direct=False)
    direct, state_d = _train(values, direct=True)
    assert all(torch.equal(a, b) for a, b in zip(wrapped, direct, strict=True))
    assert not torch.equal(wrapped[0], _train({**values, "lr": 0.01}, direct=True)[0][0])
    for key, entry in state_w["state"].items():
        for name, value in entry.items():
            other = state_d["state"][key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_direct_step_keeps_the_wrapped_step_when_hooks_are_registered() -> None:
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([param], lr=0.1)
    calls = []
    handle = opt.register_step_post_hook(lambda *_: calls.append(1))
    step = direct_step(opt)
    param.grad = torch.ones(2)
    step()
    assert calls == [1] and torch.allclose(param, torch.full((2,), 0.9))
    handle.remove()
    step()
    assert calls == [1] and torch.allclose(param, torch.full((2,), 0.8))
    handle = opt.register_step_pre_hook(lambda *_: calls.append(2))  # registered after
    step()
    assert calls == [1, 2]
    handle.remove()
    differentiable = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1,
                                     differentiable=True)
    assert direct_step(differentiable) == differentiable.step
    scheduled = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    torch.optim.lr_scheduler.StepLR(scheduled, step_size=1)  # patches step on the instance
    if "step" in vars(scheduled):
        assert direct_step(scheduled) == scheduled.step
    differentiable = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1,
                                     differentiable=True)
    assert direct_step(differentiable) == differentiable.step
