"""The loop without a process group: steps, learning rate, resume mid-epoch, and progress
from any valid position (it can never spin)."""

from __future__ import annotations

import math

import torch
from torch import nn

from dptrain.checkpoint import Position
from dptrain.config import TrainConfig
from dptrain.data.loader import Normalizer, ShardedLoader
from dptrain.dist import DistEnv
from dptrain.loop import StopRequest, Trainer, TrainStep
from dptrain.metrics import Reporter
from dptrain.objective import Objective
from dptrain.precision import Precision
from dptrain.strategies.single import SingleDevice

CPU = torch.device("cpu")
N = 96


def make(cfg: TrainConfig, total: int, events: list | None = None):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    s = SingleDevice(DistEnv(), CPU)
    opt = s.build_optimizer(cfg, model)
    lrs: list[float] = []

    def lr_at(step: int) -> float:
        lrs.append(step)
        return 0.1 / (1 + step)

    step = TrainStep(s, model, opt, Objective("cross_entropy"), Precision("32", CPU), lr_at)
    loader = ShardedLoader(x, y, batch_size=cfg.batch_size, rank=0, world=1, accum=cfg.accum,
                           seed=cfg.seed, normalize=Normalizer(None, None))
    events = [] if events is None else events
    trainer = Trainer(cfg, s, Reporter(None, active=False), step, loader, total,
                      on_checkpoint=lambda p: events.append(("ckpt", p.step)),
                      on_epoch_end=lambda p: events.append(("epoch", p.epoch, p.step)),
                      stop=StopRequest())
    return trainer, model, opt, lrs


def test_runs_the_planned_steps_with_the_schedule_and_epoch_ends():
    cfg = TrainConfig(batch_size=16, log_every=4, ckpt_every=5, momentum=0.0)
    events: list = []
    trainer, _, opt, lrs = make(cfg, total=14, events=events)
    pos = Position()
    result = trainer.run(pos)
    assert (pos.step, pos.epoch, pos.step_in_epoch) == (14, 2, 2)  # 6 steps per epoch
    assert list(dict.fromkeys(lrs)) == list(range(14))  # every step, in order (logs re-ask)
    assert opt.param_groups[0]["lr"] == 0.1 / 14
    assert ("epoch", 0, 6) in events and ("epoch", 1, 12) in events
    assert [e for e in events if e[0] == "ckpt"] == [("ckpt", 5), ("ckpt", 10)]
    assert math.isfinite(result.last_loss) and not result.stopped_by_signal


def test_resume_mid_epoch_equals_the_uninterrupted_run():
    cfg = TrainConfig(batch_size=8, accum=2, log_every=3)
    full, model_full, _, _ = make(cfg, total=13)
    full.run(Position())
    first, model, opt, _ = make(cfg, total=13)
    pos = Position()
    first.total_steps = 5
    first.run(pos)
    second, model2, opt2, _ = make(cfg, total=13)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    second.run(pos)
    assert pos.step == 13
    for a, b in zip(model_full.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_position_at_the_end_of_an_epoch_moves_on():
    """The loop cannot make no progress: from the last step of an epoch it starts the next."""
    cfg = TrainConfig(batch_size=16, log_every=50)
    trainer, _, _, _ = make(cfg, total=9)
    pos = Position(step=6, epoch=0, step_in_epoch=6)
    trainer.run(pos)
    assert (pos.step, pos.epoch, pos.step_in_epoch) == (9, 1, 3)


def test_a_stop_request_checkpoints_and_ends_the_run():
    cfg = TrainConfig(batch_size=16, log_every=2)
    events: list = []
    trainer, _, _, _ = make(cfg, total=12, events=events)
    trainer.stop.requested = True
    pos = Position()
    result = trainer.run(pos)
    assert result.stopped_by_signal and pos.step == 2
    assert events == [("ckpt", 2)]
