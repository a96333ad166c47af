"""Cutting a model into pipeline stages (no process group): by parameter count, by names
(--split-points, the model's pipeline_split_points, the built-in models'), and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dptrain.errors import UsageError
from dptrain.models import build_model
from dptrain.strategies.pipeline import StageClock, StageModule, split_model


def mlp() -> nn.Sequential:  # tests/plugins myplugins:mlp
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def widths(*sizes: int) -> nn.Sequential:
    """Linear layers holding exactly ``size`` parameters each (weight n x 1, no bias)."""
    layers: list[nn.Module] = []
    for n in sizes:
        layers += [nn.Linear(1, n, bias=False), nn.ReLU()]
    return nn.Sequential(*layers)


def test_parameter_count_keeps_parameter_free_layers_with_the_layer_before():
    split = split_model(mlp(), 2)
    assert split.stages == (("0", "1", "2"), ("3",)) and split.points == ["3"]
    assert split.how == "parameter count"


@pytest.mark.parametrize(("sizes", "stages", "want"), [
    ((10, 10, 10, 10), 2, ["4"]),  # 20 | 20
    ((30, 10, 10, 10), 2, ["2"]),  # 30 | 30
    ((5, 5, 5, 40), 2, ["6"]),  # 15 | 40: the big layer alone
    ((1, 2, 3, 4, 5, 6), 3, ["6", "10"]),  # 1+2+3 | 4+5 | 6: the largest stage 9
])
def test_parameter_count_minimises_the_largest_stage(sizes, stages, want):
    model = widths(*sizes)
    split = split_model(model, stages)
    assert len(split.stages) == stages
    per_stage = [sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
                 for names in split.stages]
    assert sum(per_stage) == sum(sizes)
    assert all(per_stage)  # every stage holds parameters
    # no other contiguous cut of the layers has a smaller largest stage
    import itertools

    best = min(max(sum(sizes[a:b]) for a, b in zip((0, *c), (*c, len(sizes)), strict=True))
               for c in itertools.combinations(range(1, len(sizes)), stages - 1))
    assert max(per_stage) == best
    assert split.points == want  # layer i is child 2i (its ReLU 2i+1)


def test_split_points_by_name_and_every_stage_is_a_run_of_children():
    model = widths(4, 4, 4)
    split = split_model(model, 3, "2, 4")
    assert split.stages == (("0", "1"), ("2", "3"), ("4", "5")) and split.how == "--split-points"
    stage = StageModule([model.get_submodule(n) for n in split.stages[1]])
    x = torch.randn(3, 1)
    assert torch.equal(stage(x), model[3](model[2](x)))
    assert {id(p) for p in stage.parameters()} == {id(model[2].weight)}  # shared, not copied


def test_the_models_own_split_points_list_or_per_stage_count():
    model = widths(4, 4, 4)
    model.pipeline_split_points = ["4"]
    assert split_model(model, 2).stages == (("0", "1", "2", "3"), ("4", "5"))
    assert split_model(model, 2).how == "the model's pipeline_split_points"
    assert split_model(model, 2, "2").points == ["2"]  # --split-points wins
    model.pipeline_split_points = {3: ["2", "4"]}
    assert split_model(model, 3).points == ["2", "4"]
    assert split_model(model, 2).how == "parameter count"  # no entry for 2 stages


@pytest.mark.parametrize(("name", "stages", "points"), [
    ("convnet", 2, ["1"]), ("convnet", 3, ["1", "2"]), ("cnn", 2, ["6"]), ("cnn", 3, ["2", "6"]),
    ("fastnet", 2, ["2"]), ("fastnet", 3, ["1", "2"]), ("fastnet-strided", 2, ["2"]),
    ("fastnet-strided", 3, ["1", "2"])])
def test_built_in_models_have_split_points_that_pass_one_tensor_on(name, stages, points):
    model = build_model(name).eval()
    split = split_model(model, stages)
    assert split.points == points and split.how == "the model's pipeline_split_points"
    x = torch.randn(2, 1, 28, 28)
    h = x
    with torch.no_grad():
        for names in split.stages:
            h = StageModule([model.get_submodule(n) for n in names])(h)
            assert isinstance(h, torch.Tensor)
        assert torch.equal(h, model(x))


@pytest.mark.parametrize(("model", "stages", "points", "words"), [
    (nn.Linear(3, 3), 2, "", ["nn.Sequential", "Linear"]),
    (build_model("linear"), 2, "", ["1 top-level layer(s) with trainable parameters (1)",
                                    "cannot be cut into 2 stages", "another --strategy"]),
    (mlp(), 3, "", ["2 top-level layer(s)", "into 3 stages", "use --stages 2"]),
    (mlp(), 2, "1,3", ["names 2 module(s)", "2 stages need 1"]),
    (mlp(), 2, "fc", ["'fc' is not a top-level module", "0, 1, 2, 3"]),
    (mlp(), 2, "0", ["none of them its first module (0)"]),
    (widths(2, 2, 2), 3, "4,2", ["in the model's order"]),
    (mlp(), 2, "2", None),  # ReLU may begin stage 2: allowed
    (nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.ReLU(), nn.Linear(4, 4),
                   nn.Linear(4, 4)), 3,
     "2,4", ["stage 2 (2, 3) would hold no trainable parameters"]),
])
def test_models_that_cannot_be_cut_so_are_refused_saying_why(model, stages, points, words):
    if words is None:
        assert split_model(model, stages, points).points == [points]
        return
    with pytest.raises(UsageError) as err:
        split_model(model, stages, points)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_a_models_split_points_of_the_wrong_kind_or_count_are_refused():
    model = widths(2, 2, 2)
    model.pipeline_split_points = "2"
    with pytest.raises(UsageError, match="must be a list of module names"):
        split_model(model, 2)
    model.pipeline_split_points = ["2", "4"]
    with pytest.raises(UsageError, match="the model's pipeline_split_points names 2"):
        split_model(model, 2)


def test_stage_clock_bubble_is_the_median_idle_fraction_after_the_first_step():
    clock = StageClock(lambda: None)
    clock.steps = [(0.1, 10.0), (1.0, 4.0), (3.0, 4.0), (2.0, 4.0)]  # first step: warm-up
    assert clock.bubble() == pytest.approx(0.5)
    assert StageClock(lambda: None).bubble() is None
    clock = StageClock(lambda: None)
    clock.begin()
    clock.timed(lambda: sum(range(10_000)))
    clock.end()
    (compute, step), = clock.steps
    assert 0 < compute <= step
