"""flops: exact forward FLOP counts, input structures, and MFU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dptrain import flops
from dptrain.models import build_model


def test_linear_784_10_exact():
    # one addmm: 2 x 784 x 10 per sample; the bias add is not counted
    assert flops.model_flops_per_sample(nn.Linear(784, 10), torch.zeros(8, 784)) == 15680
    assert flops.model_flops_per_sample(build_model("linear"), torch.zeros(3, 1, 28, 28)) == 15680


def test_small_conv_exact():
    conv = nn.Conv2d(1, 4, 3, padding=1)
    # 4 x 28 x 28 outputs, each 1 x 3 x 3 multiply-adds
    assert flops.model_flops_per_sample(conv, torch.zeros(2, 1, 28, 28)) == 2 * 4 * 784 * 9
    strided = nn.Conv2d(3, 8, 5, stride=2, bias=False)  # 32x32 -> 14x14
    assert flops.model_flops_per_sample(strided, torch.zeros(1, 3, 32, 32)) == (
        2 * 8 * 14 * 14 * 3 * 25)


def test_convnet_of_the_tutorial_exact():
    conv1 = 2 * 16 * 28 * 28 * 1 * 25
    conv2 = 2 * 32 * 14 * 14 * 16 * 25
    fc = 2 * 1568 * 10
    assert flops.model_flops_per_sample(build_model("convnet"), torch.zeros(4, 1, 28, 28)) == (
        conv1 + conv2 + fc)


def test_model_state_is_left_alone():
    model = build_model("convnet")
    model.train()
    bn = model[0][1]
    before = bn.running_mean.clone(), int(bn.num_batches_tracked)
    flops.model_flops_per_sample(model, torch.randn(4, 1, 28, 28))
    assert model.training is True
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]
    model.eval()
    flops.model_flops_per_sample(model, torch.randn(4, 1, 28, 28))
    assert model.training is False


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(10, 4), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


class TakesATuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 4)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.a(pair[0]) * pair[1].sum()


def test_tuple_dict_and_single_inputs():
    x, y = torch.zeros(5, 10), torch.zeros(5, 6)
    want = 2 * 10 * 4 + 2 * 6 * 4
    m = TwoInputs()
    assert flops.model_flops_per_sample(m, (x, y)) == want  # tuple -> model(*x)
    assert flops.model_flops_per_sample(m, [x, y]) == want
    assert flops.model_flops_per_sample(m, {"x": x, "y": y}) == want  # dict -> model(**x)
    assert flops.model_flops_per_sample(TakesATuple(), (x, y), call="single") == 2 * 10 * 4
    with pytest.raises(ValueError, match="call must be"):
        flops.model_flops_per_sample(m, (x, y), call="bogus")  # type: ignore[arg-type]


def test_batch_size_inference_and_override():
    assert flops.batch_size_of({"a": [torch.zeros(7, 2)]}) == 7
    with pytest.raises(ValueError, match="batch size"):
        flops.batch_size_of({"a": 3})
    with pytest.raises(ValueError, match="batch size"):
        flops.batch_size_of(torch.tensor(1.0))
    # a model whose input has no batch dimension: say how many samples it is
    assert flops.model_flops_per_sample(nn.Linear(4, 2), torch.zeros(6, 4), batch_size=3) == 32
    with pytest.raises(ValueError, match="at least 1"):
        flops.model_flops_per_sample(nn.Linear(4, 2), torch.zeros(6, 4), batch_size=0)


def test_mfu_values():
    train = flops.train_flops_per_sample(15680)
    assert train == 3 * 15680
    assert flops.achieved_flops(train, 1000.0) == 47_040_000
    assert flops.mfu(train, 1000.0, 47_040_000 * 4) == pytest.approx(0.25)
    assert flops.mfu(0, 0, 1.0) == 0.0
    for bad in ((1.0, 1.0, 0.0), (1.0, -1.0, 1.0), (float("nan"), 1.0, 1.0),
                (1.0, float("inf"), 1.0)):
        with pytest.raises(ValueError):
            flops.mfu(*bad)


def test_models_flops_per_sample_delegates():
    from dptrain.models import flops_per_sample

    for name in ("linear", "convnet", "cnn", "fastnet", "fastnet-strided"):
        model = build_model(name)
        assert flops_per_sample(model) == flops.model_flops_per_sample(
            model, torch.zeros(1, 1, 28, 28))


def test_summary_fields(monkeypatch):
    from dptrain import hardware

    asked = []
    monkeypatch.setattr(hardware, "matmul_peak", lambda name, device: asked.append(name) or 1e10)
    f = flops.summary_fields(nn.Linear(784, 10), torch.zeros(4, 784), samples_per_s=2000.0,
                             world_size=2, precision="bf16")
    assert asked == ["bf16"]
    assert f["model_flops_per_sample"] == 15680 and f["train_flops_per_sample"] == 47040
    assert f["peak_flops"] == 1e10 and f["peak_precision"] == "bf16"
    assert f["mfu"] == pytest.approx(47040 * 1000 / 1e10)  # per device: 2000 / 2 processes
    assert flops.summary_fields(nn.Linear(784, 10), torch.zeros(4, 784), samples_per_s=None,
                                world_size=1, precision="32")["mfu"] is None
    assert asked[-1] == "fp32"


def test_summary_fields_remeasures_a_peak_that_training_beat(monkeypatch):
    # a peak cached while the machine was busy (training at 4.7e10 FLOP/s "beats" it): the
    # summary measures again rather than report an MFU above 1
    from dptrain import hardware

    asked = []

    def peak(name, device, refresh=False):
        asked.append(refresh)
        return 1e11 if refresh else 1e10

    monkeypatch.setattr(hardware, "matmul_peak", peak)
    f = flops.summary_fields(nn.Linear(784, 10), torch.zeros(4, 784), samples_per_s=1e6,
                             world_size=1, precision="32")
    assert asked == [False, True]
    assert f["peak_flops"] == 1e11 and f["mfu"] == pytest.approx(47040 * 1e6 / 1e11)
