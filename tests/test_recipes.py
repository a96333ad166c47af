"""recipes: mnist-fast picks bf16 only where the CPU runs it natively; flags still win."""

from __future__ import annotations

import pytest
import torch

from dptrain import hardware, recipes
from dptrain.errors import UsageError


@pytest.fixture
def bf16(monkeypatch):
    def set_native(native: bool) -> None:
        monkeypatch.setattr(hardware, "native_bf16", lambda: native)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return set_native


def test_native_bf16_cpu_trains_in_bf16(bf16):
    bf16(True)
    assert recipes.recipe_values("mnist-fast")["precision"] == "bf16"
    precision, why = recipes.precision_choice()
    assert precision == "bf16" and "natively" in why


def test_no_native_bf16_keeps_fp32(bf16):
    bf16(False)
    values = recipes.recipe_values("mnist-fast")
    assert values["precision"] == "32"  # never slower than before: bf16 is emulated here
    assert "emulated" in recipes.precision_choice()[1]
    # the rest of the recipe is untouched
    assert values["model"] == "fastnet-strided" and values["batch_size"] == 128


def test_a_onednn_cap_below_bf16_keeps_fp32_and_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "_info", hardware.CpuInfo("Xeon", ("avx512_bf16",), "AVX512",
                                                            False))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    precision, why = recipes.precision_choice()
    assert precision == "32" and "ONEDNN_MAX_CPU_ISA=AVX2" in why


def test_gpu_without_bf16_keeps_fp32(bf16, monkeypatch):
    bf16(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert recipes.precision_choice()[0] == "32"


def test_this_machine_follows_its_cpu():
    want = "bf16" if hardware.native_bf16() and not torch.cuda.is_available() else None
    got = recipes.recipe_values("mnist-fast")["precision"]
    assert got in ("32", "bf16") and (want is None or got == want)


def test_recipe_table_is_not_modified(bf16):
    bf16(True)
    recipes.recipe_values("mnist-fast")["lr"] = 99
    assert recipes.RECIPES["mnist-fast"]["precision"] == recipes.AUTO
    assert recipes.RECIPES["mnist-fast"]["lr"] == 0.1


def test_unknown_recipe_and_undecided_auto():
    with pytest.raises(UsageError, match="unknown --recipe 'nope'"):
        recipes.recipe_values("nope")
    with pytest.raises(ValueError, match="nothing decides"):
        recipes.resolve_auto({"model": "auto"})


@pytest.mark.parametrize(("native", "flags", "want"), [
    (True, [], "bf16"), (False, [], "32"), (True, ["--precision", "32"], "32"),
    (False, ["--precision", "bf16"], "bf16")])
def test_resolved_config_precision(bf16, native, flags, want):
    """Through the CLI's precedence: recipe < flags."""
    from dptrain.cli import build_parser, resolve_config

    bf16(native)
    args = build_parser().parse_args(["train", "--recipe", "mnist-fast", *flags])
    assert resolve_config(args).precision == want



@pytest.mark.parametrize(("flags", "epochs", "steps"), [
    ([], 0.8, 375), (["--epochs", "2"], 2.0, 936), (["--batch-size", "64"], 0.8, 750),
    (["--epochs", "0.5", "--accum", "2"], 0.5, 117)])
def test_the_recipe_trains_a_share_of_an_epoch(flags, epochs, steps):
    """mnist-fast trains 0.8 of an epoch, whatever the batch; --epochs replaces the share."""
    from dptrain.cli import build_parser, resolve_config
    from dptrain.loop import epoch_steps

    cfg = resolve_config(build_parser().parse_args(["train", "--recipe", "mnist-fast", *flags]))
    assert cfg.epochs == epochs
    assert epoch_steps(cfg.epochs, 60_000 // (cfg.batch_size * cfg.accum)) == steps
