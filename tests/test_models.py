from __future__ import annotations

from pathlib import Path

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


def sized_mlp(hidden: int = 32, depth: int = 1, scale: float = 1.0, bias: bool = True,
              act: str = "relu") -> torch.nn.Module:
    """A plug-in factory with keyword arguments (used as tests.test_models:sized_mlp)."""
    layers: list[torch.nn.Module] = [torch.nn.Flatten()]
    width = 28 * 28
    for _ in range(depth):
        layers += [torch.nn.Linear(width, hidden, bias=bias),
                   torch.nn.ReLU() if act == "relu" else torch.nn.Tanh()]
        width = hidden
    layers.append(torch.nn.Linear(width, 10))
    model = torch.nn.Sequential(*layers)
    model.scale = scale
    return model


def test_model_args_are_parsed_and_passed_to_the_factory():
    from dptrain.models import parse_model_args

    assert parse_model_args("hidden=128,depth=2,scale=0.5,bias=false,act=tanh") == {
        "hidden": 128, "depth": 2, "scale": 0.5, "bias": False, "act": "tanh"}
    assert parse_model_args("") == {}
    m = build_model("tests.test_models:sized_mlp", "hidden=16,depth=2,scale=2.5,bias=False,"
                    "act=tanh")
    assert [tuple(p.shape) for p in m.parameters()] == [(16, 784), (16, 16), (10, 16), (10,)]
    assert isinstance(m[2], torch.nn.Tanh) and m.scale == 2.5
    assert n_params(build_model("tests.test_models:sized_mlp", {"hidden": 8})) == (
        784 * 8 + 8 + 8 * 10 + 10)


def test_unknown_model_args_name_the_signature():
    with pytest.raises(UsageError, match=r"--model-arg width: .*sized_mlp\(hidden=32, depth=1, scale=1.0, bias=True, act=.relu.\)$"):
        build_model("tests.test_models:sized_mlp", "width=3")
    with pytest.raises(UsageError, match=r"linear\(\)"):
        build_model("linear", "hidden=3")
    with pytest.raises(UsageError, match="KEY=VALUE"):
        build_model("tests.test_models:sized_mlp", "hidden")


def test_model_arg_flags_append_and_replay(tmp_path, tiny):
    from tests.conftest import run_cli, train_inproc

    out = tmp_path / "run"
    s = train_inproc(out, *tiny, "--model", "tests.test_models:sized_mlp", "--model-arg",
                     "hidden=24", "--model-arg", "depth=2", "--max-steps", "3")
    assert s["steps"] == 3
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["model"]["1.weight"].shape == (24, 784)
    assert ckpt["model"]["3.weight"].shape == (24, 24)
    assert ckpt["config"]["model_args"] == "hidden=24,depth=2"
    assert 'model_args = "hidden=24,depth=2"' in (out / "config.toml").read_text()
    again = tmp_path / "again"
    s2 = train_inproc(again, "--config", str(out / "config.toml"))
    mine = torch.load(again / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(mine[k], ckpt["model"][k]) for k in ckpt["model"])
    assert s2["test_accuracy"] == s["test_accuracy"]
    bad = run_cli("train", *tiny, "--model", "tests.test_models:sized_mlp", "--model-arg",
                  "widht=3", "--out", str(tmp_path / "bad"), cwd=Path(__file__).parent.parent)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: --model-arg widht:") and "sized_mlp(hidden" in bad.stderr
    commas = run_cli("train", *tiny, "--model-arg", "a=1,b=2")
    assert commas.returncode == 2 and commas.stderr.startswith("error: --model-arg 'a=1,b=2'")


def test_an_earlier_fastnet_checkpoint_is_named_and_loads_as_fastnet_v1():
    from dptrain import checkpoint
    from dptrain.config import TrainConfig
    from dptrain.errors import UsageError

    old = build_model("fastnet-v1").state_dict()  # conv-BN-ReLU-pool: BN at index 1
    with pytest.raises(UsageError, match="holds fastnet-v1 .* use --model fastnet-v1"):
        checkpoint._check_tensors(old, "last.pt", build_model("fastnet"),
                                  TrainConfig(model="fastnet"))
    checkpoint._check_tensors(old, "last.pt", build_model("fastnet-v1"),
                              TrainConfig(model="fastnet-v1"))  # fits
    x = torch.randn(4, 1, 28, 28)
    assert build_model("fastnet-v1")(x).shape == build_model("fastnet")(x).shape == (4, 10)


@pytest.mark.parametrize(("written", "resumed"), [
    ("fastnet", "fastnet-strided"), ("fastnet-strided", "fastnet"),
    ("fastnet-strided", "fastnet-v1"), ("fastnet-v1", "fastnet-strided")])
def test_each_fastnet_layout_names_itself_when_resumed_as_another(written, resumed):
    """The three layouts' checkpoints do not fit each other (keys, or with the same keys the
    first convolution's shape); the error names the one to use."""
    from dptrain import checkpoint
    from dptrain.config import TrainConfig
    from dptrain.errors import UsageError
    from dptrain.models import fastnet_layout

    saved = build_model(written).state_dict()
    assert fastnet_layout(saved) == written
    with pytest.raises(UsageError, match=f"holds {written} .*use --model {written} for it"):
        checkpoint._check_tensors(saved, "last.pt", build_model(resumed),
                                  TrainConfig(model=resumed))


def test_fastnet_strided_has_a_4x4_stride_2_stem_and_the_same_tail():
    from dptrain.models import fastnet_layout, flops_per_sample, layout_hint

    strided, pooled = build_model("fastnet-strided"), build_model("fastnet")
    stem = strided[0][0]
    assert (stem.kernel_size, stem.stride, stem.padding) == ((4, 4), (2, 2), (1, 1))
    x = torch.randn(4, 1, 28, 28)
    assert strided[0](x).shape == pooled[0](x).shape == (4, 16, 14, 14)
    assert strided(x).shape == (4, 10)
    tail = {k: v.shape for k, v in strided.state_dict().items() if not k.startswith("0.")}
    assert tail == {k: v.shape for k, v in pooled.state_dict().items() if not k.startswith("0.")}
    # the stem's multiply-adds: 16 x 16 x 14 x 14 instead of 16 x 9 x 28 x 28
    assert flops_per_sample(pooled) - flops_per_sample(strided) == 2 * (16 * 9 * 784
                                                                        - 16 * 16 * 196)
    assert fastnet_layout({"fc.weight": torch.zeros(1)}) is None
    assert layout_hint("linear", pooled.state_dict()) == ""
    assert layout_hint("fastnet", pooled.state_dict()) == ""


def small_conv() -> torch.nn.Module:
    """A user's convolutional model (a plug-in): auto leaves it contiguous."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 10))


@pytest.mark.parametrize(("setting", "name", "device", "expected", "why"), [
    ("auto", "convnet", "cpu", torch.channels_last, "auto: a built-in conv model on the CPU"),
    ("auto", "fastnet-strided", "cpu", torch.channels_last, "auto: a built-in conv model"),
    ("auto", "linear", "cpu", torch.contiguous_format, "auto: no 2-d convolution"),
    ("auto", "tests.test_models:small_conv", "cpu", torch.contiguous_format,
     "auto: your own model"),
    ("auto", "convnet", "cuda", torch.contiguous_format, "auto: on cuda"),
    ("on", "tests.test_models:small_conv", "cpu", torch.channels_last, "--channels-last on"),
    ("off", "convnet", "cpu", torch.contiguous_format, "--channels-last off"),
    ("auto", "convnet", "fsdp", torch.contiguous_format, "auto: --strategy fsdp"),
    ("auto", "convnet", "localsgd", torch.contiguous_format, "auto: --strategy localsgd"),
])
def test_channels_last_auto_is_for_builtin_conv_models_on_the_cpu(setting, name, device,
                                                                  expected, why):
    from dptrain.models import memory_format

    strategy = device if device in ("fsdp", "localsgd") else "single"
    device = "cpu" if strategy != "single" else device
    fmt, text = memory_format(setting, name, build_model(name), torch.device(device), strategy)
    assert fmt is expected
    assert why in text and text.startswith("channels_last" if expected is torch.channels_last
                                           else "contiguous")


def test_channels_last_auto_trains_convnet_as_contiguous_does_up_to_rounding(tmp_path, tiny):
    """The default (auto: channels_last for convnet on the CPU) and --channels-last off give
    the same model after 3 steps up to float reassociation (a different convolution kernel
    sums in another order: ~1e-6 here, against parameters of ~1e-1)."""
    from tests.conftest import train_inproc

    runs = {}
    for setting in ("auto", "off"):
        out = tmp_path / setting
        s = train_inproc(out, *tiny, "--model", "convnet", "--max-steps", "3",
                         "--channels-last", setting, "--threads", "1")
        runs[setting] = (s, torch.load(out / "checkpoints" / "last.pt",
                                       weights_only=True)["model"])
    (auto, p_auto), (off, p_off) = runs["auto"], runs["off"]
    assert auto["memory_format"] == "channels_last (auto: a built-in conv model on the CPU)"
    assert off["memory_format"] == "contiguous (--channels-last off)"
    assert p_auto["0.0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert p_off["0.0.weight"].is_contiguous()
    changed = max((p_off[k].float() - build_init(k)).abs().max().item() for k in p_off
                  if k.endswith("weight"))
    assert changed > 1e-3  # the 3 steps moved the weights, so the comparison means something
    for k in p_off:
        assert torch.allclose(p_auto[k], p_off[k], rtol=1e-4, atol=1e-5), k


def build_init(key: str) -> torch.Tensor:
    torch.manual_seed(0)  # the seed dptrain train builds the model with (--seed 0)
    return build_model("convnet").state_dict()[key].float()


def test_resumed_optimizer_state_takes_its_parameters_layout():
    """A momentum buffer saved contiguous, loaded for a channels_last parameter (an old
    checkpoint under --channels-last auto): re-laid like the parameter, same values."""
    from dptrain.strategies.base import match_layouts

    w = torch.nn.Parameter(torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    saved = torch.randn(4, 3, 5, 5)  # contiguous
    opt.state[w]["momentum_buffer"] = saved.clone()
    match_layouts(opt)
    buf = opt.state[w]["momentum_buffer"]
    assert buf.stride() == w.stride() and torch.equal(buf, saved)


def test_model_args_keep_their_text_for_parameters_annotated_str():
    from dptrain.models import parse_model_args

    def factory(name: str, n: int = 1, tag: str = "") -> None:  # annotations are "str" here
        return None

    assert parse_model_args("name=1.10,n=007,tag=007", factory) == {"name": "1.10", "n": 7,
                                                                    "tag": "007"}
    assert parse_model_args("name=1.10") == {"name": 1.1}  # no factory: read as a number
