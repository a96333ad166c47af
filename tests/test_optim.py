"""The optimizer's direct step: bitwise the same as ``optimizer.step()``, minus its wrapper."""

from __future__ import annotations

import math

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


# ---------------------------------------------------------------- the knobs people expect
def test_sgd_momentum_defaults_to_zero_like_torch():
    cfg = TrainConfig()
    assert cfg.momentum == 0.0
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"))
    assert opt.param_groups[0]["momentum"] == 0.0


def test_cosine_schedule_warms_up_then_follows_half_a_cosine():
    from dptrain.optim import lr_at

    cfg = TrainConfig(schedule="cosine", warmup_steps=10)
    lrs = [lr_at(cfg, 1.0, s, 50, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5)  # half-way through the cosine
    assert lrs[109] == pytest.approx((1 + math.cos(math.pi * 99 / 100)) / 2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_no_decay_groups_exempt_biases_and_norm_layers():
    from dptrain.optim import param_groups

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2),
                                torch.nn.LayerNorm(2))
    decay, rest = param_groups(model, 5e-4, True)
    assert decay["weight_decay"] == 5e-4 and rest["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(rest["params"]) == 6  # 2 biases, BN weight+bias, LayerNorm weight+bias
    assert param_groups(model, 5e-4, False) == list(model.parameters())
    # and the update: a bias gets no decay at all, a weight does
    opt = build_optimizer(TrainConfig(lr=1.0, weight_decay=0.5), [decay, rest],
                          torch.device("cpu"))
    before_w, before_b = model[3].weight.detach().clone(), model[3].bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model[3].weight, before_w * (1 - 5e-4))  # the group's decay
    assert torch.equal(model[3].bias, before_b)


def test_grad_clip_bounds_the_global_norm_of_the_update():
    from dptrain.dist import DistEnv
    from dptrain.objective import Objective
    from dptrain.precision import Precision
    from dptrain.strategies.single import SingleDevice

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    s = SingleDevice(DistEnv(), torch.device("cpu"))
    opt = s.build_optimizer(TrainConfig(lr=1.0, grad_clip=0.25), model)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 6) * 50, torch.randint(0, 3, (16,))
    s.forward_backward(model, [(x, y)], Objective("cross_entropy"), Precision("32", s.device))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm > 0.25  # the clip bites
    s.optimizer_step(opt, Precision("32", s.device))
    step = torch.linalg.vector_norm(torch.stack([(p - b).norm() for p, b in
                                                 zip(model.parameters(), before, strict=True)]))
    assert step.item() == pytest.approx(0.25, rel=1e-5)  # lr 1, plain SGD: update = gradient
