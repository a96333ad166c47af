"""The strategy interface's defaults (SingleDevice): the step, the optimizer step, the state.
No process group: these are the parts every data-parallel strategy inherits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dptrain.config import TrainConfig
from dptrain.dist import DistEnv
from dptrain.errors import UsageError
from dptrain.objective import Objective
from dptrain.precision import Precision
from dptrain.strategies.single import SingleDevice

CPU = torch.device("cpu")


def setup(seed: int = 0):
    torch.manual_seed(seed)
    s = SingleDevice(DistEnv(), CPU)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = s.build_optimizer(TrainConfig(lr=0.1, momentum=0.9), model)
    return s, model, opt


def data(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                              generator=g)


def test_accumulated_micro_batches_give_the_big_batch_gradient():
    x, y = data()
    obj, prec = Objective("cross_entropy"), Precision("32", CPU)
    s, model, _ = setup()
    big = s.forward_backward(model, [(x, y)], obj, prec)
    g_big = [p.grad.clone() for p in model.parameters()]
    s2, model2, _ = setup()
    micro = [(x[i:i + 3], y[i:i + 3]) for i in range(0, 12, 3)]
    losses = s2.forward_backward(model2, micro, obj, prec)
    assert len(losses) == 4 and not losses[0].requires_grad
    assert torch.stack(losses).mean().item() == pytest.approx(big[0].item(), rel=1e-12)
    for a, b in zip(g_big, (p.grad for p in model2.parameters()), strict=True):
        assert torch.allclose(a, b, atol=1e-14)


def test_optimizer_step_is_torch_sgd_and_drops_the_gradients():
    x, y = data()
    obj, prec = Objective("cross_entropy"), Precision("32", CPU)
    s, model, opt = setup()
    ref_model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ref_model.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        s.forward_backward(model, [(x, y)], obj, prec)
        s.optimizer_step(opt, prec)
        nn.functional.cross_entropy(ref_model(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)  # fused vs for-loop kernel rounding


def test_state_round_trip_restores_model_optimizer_and_rng():
    x, y = data()
    obj, prec = Objective("cross_entropy"), Precision("32", CPU)
    s, model, opt = setup()
    s.forward_backward(model, [(x, y)], obj, prec)
    s.optimizer_step(opt, prec)
    torch.manual_seed(42)
    state = s.state_dict(model, opt, prec)
    expected = torch.rand(3)
    assert state["world_size"] == 1 and len(state["rng"]["cpu"]) == 1
    s2, model2, opt2 = setup(seed=5)
    s2.load_state_dict(state, model2, opt2, prec)
    assert torch.equal(torch.rand(3), expected)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(
        opt.state_dict()["state"][0]["momentum_buffer"])


def test_a_state_for_another_model_is_a_usage_error():
    s, model, opt = setup()
    state = s.state_dict(model, opt, Precision("32", CPU))
    state["model"] = {"weight": torch.zeros(2)}
    with pytest.raises(UsageError, match="model does not fit"):
        s.load_state_dict(state, model, opt, Precision("32", CPU))


def test_main_only_returns_or_raises_on_every_rank():
    s = SingleDevice(DistEnv(), CPU)
    assert s.main_only(lambda: 7) == 7

    def refuse():
        raise UsageError("no")

    with pytest.raises(UsageError, match="no"):
        s.main_only(refuse)
    assert s.bn_statistics() == "single process"


def test_plain_unwraps_a_compiled_module():
    s, model, _ = setup()

    class Compiled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert s.plain(Compiled(model)) is model
