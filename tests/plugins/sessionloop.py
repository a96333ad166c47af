"""The own-loop scripts of the Session tests share this: 10 steps of the linear model on the
synthetic set, with the user's own SGD (lr 0.05, momentum 0.9) built over the plain model and
handed to ``Session.setup`` -- which the strategy adopts as its own kind of optimizer."""

from __future__ import annotations

import torch

from dptrain.data.datasets import synthetic
from dptrain.models import build_model


def ten_steps(s) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:  # noqa: ANN001
    """(wrapped model, the optimizer ``setup`` returned, the plain model's parameters flat)."""
    torch.manual_seed(3)
    model = build_model("linear")
    wrapped, opt = s.setup(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    data = synthetic()
    loader = s.loader(data.train_x, data.train_y, batch_size=32, normalize=(data.mean, data.std))
    for step, micro in enumerate(loader.epoch(0)):
        for x, y in s.accumulate(wrapped, micro):
            s.backward(torch.nn.functional.cross_entropy(wrapped(x), y))
        s.step(opt)
        if step == 9:
            break
    flat = torch.cat([p.detach().flatten() for p in s.unwrap(wrapped).parameters()])
    return wrapped, opt, flat
