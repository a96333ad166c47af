"""Bench planning, skip reasons, flag parsing and errors -- no processes started."""

from __future__ import annotations

import argparse

import pytest

from dptrain.bench import command
from dptrain.bench.comm import fmt_bytes, parse_size, parse_sizes
from dptrain.bench.plan import plan_configs, rotated, skip_reason
from dptrain.cli import Parser
from dptrain.errors import UsageError


def parse(*argv: str) -> argparse.Namespace:
    parser = Parser(prog="dptrain")
    command.add_parser(parser.add_subparsers(dest="command", parser_class=Parser))
    return parser.parse_args(["bench", *argv])


def test_skip_reasons_on_cpu() -> None:
    dp = skip_reason("dp", 1, on_gpu=False, gpus=0)
    assert dp and "CUDA" in dp
    single = skip_reason("single", 2, on_gpu=False, gpus=0)
    assert single and "one process" in single
    assert skip_reason("ddp", 2, on_gpu=False, gpus=0) is None
    assert skip_reason("ddp", 8, on_gpu=False, gpus=0) is None  # oversubscribed, but runs
    assert skip_reason("single", 1, on_gpu=False, gpus=0) is None


def test_skip_reasons_on_one_gpu() -> None:
    assert skip_reason("dp", 1, on_gpu=True, gpus=1) is None
    assert "2 GPUs" in skip_reason("dp", 2, on_gpu=True, gpus=1)
    assert "1 GPU(s) visible" in skip_reason("ddp", 2, on_gpu=True, gpus=1)


def test_plan_keeps_skipped_configurations() -> None:
    configs = plan_configs(["single", "dp", "ddp"], [1, 2], model="convnet", batch_size=64,
                           steps=10, baseline_steps=50, on_gpu=False, gpus=0)
    names = [c.name for c in configs]
    assert names[:6] == ["single n=1", "single n=2", "dp n=1", "dp n=2", "ddp n=1", "ddp n=2"]
    status = {c.name: c.status for c in configs}
    assert status["dp n=1"] == status["dp n=2"] == status["single n=2"] == "skipped"
    assert all(c.reason for c in configs if c.status == "skipped")
    roles = [c.role for c in configs]
    assert roles.count("baseline") == 1 and roles.count("baseline-dptrain") == 1
    extra = next(c for c in configs if c.role == "baseline-dptrain")
    assert (extra.strategy, extra.model, extra.batch_size, extra.steps) == ("single", "linear",
                                                                          64, 50)
    dicts = [c.to_dict() for c in configs]
    assert dicts[2]["status"] == "skipped" and "CUDA" in dicts[2]["reason"]


def test_plan_reuses_linear_single_and_drops_baseline() -> None:
    configs = plan_configs(["single", "ddp"], [1], model="linear", batch_size=64, steps=10,
                           baseline_steps=50, on_gpu=False, gpus=0)
    assert [c.role for c in configs] == ["main", "main", "baseline"]
    configs = plan_configs(["ddp"], [1], model="linear", batch_size=64, steps=10,
                           baseline_steps=0, on_gpu=False, gpus=0)
    assert [c.role for c in configs] == ["main"]


def test_rotated() -> None:
    assert rotated([1, 2, 3], 0) == [1, 2, 3]
    assert rotated([1, 2, 3], 4) == [2, 3, 1]
    assert rotated([], 3) == []


def test_sizes() -> None:
    assert parse_size("4K") == 4096 and parse_size("64MiB") == 64 * 2**20
    assert parse_size("1000") == 1000 and parse_size("1.5K") == 1536
    assert parse_sizes("1M,4K,64") == [64, 4096, 2**20]
    assert parse_size("4G") == 4 * 2**30  # the largest
    assert fmt_bytes(4096) == "4 KiB" and fmt_bytes(1536) == "1.5 KiB"
    assert fmt_bytes(64 * 2**20) == "64 MiB" and fmt_bytes(10) == "10 B"
    for bad, needle in (("4X", "cannot read"), ("", "is empty"), ("2", "below one float32"),
                        ("K", "cannot read"), ("5", "not a whole number of float32s"),
                        ("0.3K", "307.2 bytes"), ("4K,,1M", "empty item"), ("1M,", "empty item"),
                        ("4K,4k", "more than once"), ("4K,4096", "more than once"),
                        ("4.5G", "over 4 GiB")):
        with pytest.raises(UsageError, match=needle):
            parse_sizes(bad)


def test_options_defaults_quick_and_overrides() -> None:
    o = command.options(parse("--quick", "--steps", "7", "--data-root", "/d"))
    assert o["steps"] == 7 and o["repeats"] == 2 and o["warmup"] == 3  # flag beats --quick
    assert o["strategies"] == ["single", "dp", "ddp", "zero", "fsdp"] and o["nprocs"] == [1, 2]
    assert o["model"] == "convnet" and o["batch_size"] == 64 and o["data_root"] == "/d"
    assert max(o["sizes"]) < max(command.options(parse())["sizes"])  # smaller sweep
    full = command.options(parse("--nproc", "2,1", "--strategies", "ddp, zero"))
    assert full["nprocs"] == [1, 2] and full["strategies"] == ["ddp", "zero"]
    for flag, bad, needle in (("--nproc", "2,1,2", "names 2 more than once"),
                              ("--nproc", "1,", "empty item"),
                              ("--strategies", "ddp,ddp", "names ddp more than once"),
                              ("--strategies", ",", "is empty")):
        with pytest.raises(UsageError, match=needle):
            command.options(parse(flag, bad))
    assert full["repeats"] == 3 and full["what"] == "run"
    assert parse("comm").what == "comm"


@pytest.mark.parametrize("argv,match", [
    (("--nproc", "0"), "--nproc"),
    (("--nproc", "two"), "--nproc"),
    (("--strategies", "ddp,horovod"), "--strategies"),
    (("--steps", "0"), "--steps"),
    (("--repeats", "0"), "--repeats"),
    (("--warmup", "-1"), "--warmup"),
    (("--model", "resnet"), "--model"),
    (("--dataset", "cifar"), "--dataset"),
    (("--sizes", "lots"), "--sizes"),
    (("--device", "tpu"), "--device"),
    (("--lr", "0"), "--lr"),
])
def test_bad_flags_are_usage_errors(argv: tuple[str, ...], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        command.options(parse(*argv))


def test_comm_needs_two_processes() -> None:
    with pytest.raises(UsageError, match="N >= 2"):
        command.cmd_bench(parse("comm", "--nproc", "1"))


def test_existing_results_are_not_overwritten(tmp_path) -> None:
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(UsageError, match="already holds"):
        command.cmd_bench(parse("--dataset", "synthetic", "--out", str(tmp_path)))
    assert (tmp_path / "results.json").read_text() == "{}"


def test_main_reports_usage_error_in_one_line(capsys) -> None:
    assert command.main(["--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --steps") and err.count("\n") == 1


def test_help_lists_every_flag_with_default(capsys) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    text = capsys.readouterr().out
    for flag in ("--strategies", "--nproc", "--model", "--batch-size", "--steps", "--warmup",
                 "--repeats", "--dataset", "--data-root", "--threads", "--out", "--quick",
                 "--sizes", "--iters", "--baseline-steps"):
        assert flag in text
    assert "default: single,dp,ddp,zero,fsdp" in " ".join(text.split()) and "--quick: 30" in text


def test_registered_in_the_main_cli(monkeypatch, capsys) -> None:
    from dptrain import cli

    if "dptrain.bench.command" not in cli.SUBCOMMAND_MODULES:
        monkeypatch.setattr(cli, "SUBCOMMAND_MODULES",
                            (*cli.SUBCOMMAND_MODULES, "dptrain.bench.command"))
    assert cli.main(["bench", "--repeats", "0"]) == 2
    assert capsys.readouterr().err == "error: --repeats must be at least 1, got 0\n"
    assert cli.main(["bench", "comm", "--nproc", "1"]) == 2
    assert "N >= 2" in capsys.readouterr().err


def test_failure_summary_names_the_exception() -> None:
    report = ("worker rank 0 (local rank 0, pid 1) failed with exit code 1:\n"
              "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
              "RuntimeError: Expected to have finished reduction | in the prior iteration\n"
              "Parameter indices which did not receive grad: 2 3\n")
    assert command.failure_summary(report) == ("RuntimeError: Expected to have finished "
                                               "reduction / in the prior iteration")
    assert command.failure_summary("killed\n") == "killed"
    assert len(command.failure_summary("ValueError: " + "x" * 500)) == 300
