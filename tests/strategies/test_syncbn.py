"""syncbn.convert on CPU, without a process group: the converted model is the same model
(state copied, outputs equal); across real ranks, tests/integration/test_features.py::
test_sync_bn_matches_one_process_and_plain_bn_is_reported_per_process."""

from __future__ import annotations

import torch
from torch import nn

from dptrain.strategies import syncbn


def test_convert_replaces_every_batchnorm_and_keeps_its_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4),
                          nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 26 * 26)))
    x = torch.randn(8, 1, 28, 28)
    model(x)  # running statistics that the copy must carry over
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    expected = model(x)
    converted = syncbn.convert(model, torch.device("cpu"))
    kinds = [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [syncbn.CrossRankBatchNorm] * 2
    assert all(torch.equal(ref[k], v) for k, v in converted.state_dict().items())
    assert not converted[1].training
    assert torch.equal(converted(x), expected)


def test_without_a_group_it_trains_like_batchnorm():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(3)
    cross = syncbn.convert(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))[0]
    x = torch.randn(5, 3, 4, 4)
    assert torch.allclose(cross(x), bn(x), atol=1e-6)
    assert torch.allclose(cross.running_var, bn.running_var)
    assert int(cross.num_batches_tracked) == 1
