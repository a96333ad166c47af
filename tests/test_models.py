from __future__ import annotations

import pytest
import torch

from dptrain.errors import UsageError
from dptrain.models import build_model, flops_per_sample, has_batchnorm


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_models_match_the_contract():
    lin, conv, cnn = build_model("linear"), build_model("convnet"), build_model("cnn")
    assert n_params(lin) == 784 * 10 + 10
    # 2 x (Conv5x5 + BN) 16/32 channels + Linear(1568, 10)
    assert n_params(conv) == (16 * 25 + 16 + 32) + (32 * 16 * 25 + 32 + 64) + 1568 * 10 + 10
    # conv32, conv64, fc128 (9216 -> 128), fc 10
    assert n_params(cnn) == (32 * 9 + 32) + (64 * 32 * 9 + 64) + (9216 * 128 + 128) + 1290
    assert has_batchnorm(conv) and not has_batchnorm(cnn) and not has_batchnorm(lin)
    x = torch.zeros(5, 1, 28, 28)
    for m in (lin, conv, cnn, build_model("fastnet")):
        assert m(x).shape == (5, 10)


def test_flops_linear():
    assert flops_per_sample(build_model("linear")) == 2 * 784 * 10


def test_unknown_and_bad_plugin_models():
    with pytest.raises(UsageError, match="unknown --model"):
        build_model("resnet")
    with pytest.raises(UsageError, match="cannot import"):
        build_model("no_such_module_xyz:make")
    with pytest.raises(UsageError, match="no callable"):
        build_model("math:nope")
    with pytest.raises(UsageError, match="not an nn.Module"):
        build_model("myplugins:not_a_module")
    assert build_model("myplugins:mlp")(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
