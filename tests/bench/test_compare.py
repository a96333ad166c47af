"""``dptrain bench --compare``: runs to a target accuracy, and the alpha-beta answer to "when
does relaxed synchronisation pay?" (the arithmetic checked by hand; the runs in one process)."""

from __future__ import annotations

import json

import pytest

from dptrain import cli
from dptrain.bench.compare import parse, relaxed_sync
from dptrain.bench.predict import allreduce_time
from dptrain.errors import UsageError


def row(steps: int, step_s: float = 0.01, **extra):
    return {"reached": True, "steps_to_target": steps, "step_time_s": step_s, **extra}


def test_localsgd_pays_where_one_all_reduce_costs_more_than_the_break_even():
    # ddp: 100 steps; localsgd: 120 steps, averaging every 8 -> 15 syncs
    a = relaxed_sync({"ddp": row(100), "localsgd": row(120)}, param_bytes=4_000_000, n=2,
                     measured_s=0.002, sync_every=8)
    t_c = 0.01 - 0.002
    assert a["compute_s_per_step"] == pytest.approx(t_c)
    assert a["syncs_localsgd"] == 15
    assert a["breakeven_allreduce_s"] == pytest.approx(t_c * 20 / 85)
    here, gbe25, gbe100 = a["links"]
    assert here["ddp_s"] == pytest.approx(100 * 0.01)
    assert here["localsgd_s"] == pytest.approx(120 * t_c + 15 * 0.002)
    t25 = allreduce_time(4_000_000, 2, 50e-6, 3.1e9)
    assert gbe25["allreduce_s"] == pytest.approx(t25)
    assert gbe25["localsgd_pays"] is (120 * t_c + 15 * t25 < 100 * (t_c + t25))
    for link in a["links"]:  # pays exactly where the all-reduce exceeds the break-even
        assert link["localsgd_pays"] is (link["allreduce_s"] > a["breakeven_allreduce_s"])
    assert gbe100["allreduce_s"] < gbe25["allreduce_s"]


def test_no_answer_without_both_rows_reaching_the_target():
    a = relaxed_sync({"ddp": row(100), "localsgd": {**row(0), "reached": False}},
                     param_bytes=1, n=2, measured_s=None, sync_every=8)
    assert "needs ddp and localsgd" in a["note"]


def test_unknown_strategies_and_one_process_are_refused():
    with pytest.raises(UsageError, match="--compare 'ddp,dp'"):
        parse("ddp,dp")
    assert parse("ddp, localsgd") == ["ddp", "localsgd"]
    with pytest.raises(UsageError, match="names ddp more than once"):
        parse("ddp, localsgd,ddp")
    assert cli.main(["bench", "--compare", "ddp", "--nproc", "1"]) == 2


def test_time_to_target_after_a_resume_counts_the_earlier_processes(tmp_path):
    """A run preempted at step 10 and resumed reaches its target at step R: the time and
    samples to the target are the whole run's (each process's first step untimed), not only
    the resumed part's."""
    base = ["train", "--dataset", "synthetic", "--model", "linear", "--lr", "0.05",
            "--threads", "1", "--quiet", "--out", str(tmp_path / "t"), "--batch-size", "16"]
    assert cli.main([*base, "--max-steps", "10"]) == 0
    first = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert cli.main([*base, "--max-steps", "200", "--resume", "auto", "--eval-every", "5",
                     "--target-accuracy", "0.9"]) == 0
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    reached = s["target_reached"]
    assert reached["step"] == s["steps"] > 10
    assert reached["samples"] == (reached["step"] - 2) * 16  # steps 1 and 11 untimed
    assert (first["train_time_s"] < reached["train_time_s"]
            <= first["train_time_s"] + s["train_time_s"] + 1e-9)


def test_target_accuracy_stops_training_and_the_summary_says_when(tmp_path):
    code = cli.main(["train", "--dataset", "synthetic", "--model", "linear", "--epochs", "3",
                     "--eval-every", "10", "--target-accuracy", "0.9", "--lr", "0.05",
                     "--threads", "1", "--quiet", "--out", str(tmp_path / "t")])
    assert code == 0
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    reached = s["target_reached"]
    assert reached["step"] == s["steps"] and s["steps"] % 10 == 0 and s["steps"] < 93
    assert reached["accuracy"] >= 0.9 and reached["accuracy"] == s["test_accuracy"]
    assert 0 < reached["train_time_s"] <= s["train_time_s"] + 1e-9
    evals = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text()
             .splitlines() if "test_accuracy" in line]
    assert [e["step"] for e in evals] == list(range(10, s["steps"] + 1, 10))  # once per step
    assert all(e["test_accuracy"] < 0.9 for e in evals[:-1])
    # the losses of the steps since the last log line (every 50) were not dropped at the stop
    train = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text()
             .splitlines() if '"loss"' in line and "test_accuracy" not in line]
    assert train[-1]["step"] == s["steps"] and s["final_loss"] == train[-1]["loss"] > 0


def test_eval_every_without_a_target_trains_to_the_end(tmp_path):
    s = cli.main(["train", "--dataset", "synthetic", "--model", "linear", "--max-steps", "25",
                  "--eval-every", "10", "--threads", "1", "--quiet", "--out",
                  str(tmp_path / "e")])
    assert s == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["steps"] == 25 and "target_reached" not in summary
    steps = [json.loads(line)["step"] for line in (tmp_path / "e" / "metrics.jsonl")
             .read_text().splitlines() if "test_accuracy" in line]
    assert steps == [10, 20, 25]


def test_a_target_accuracy_for_a_regression_is_refused(tmp_path, capsys):
    code = cli.main(["train", "--dataset", "taskplugins:regression_data", "--model",
                     "taskplugins:regressor", "--loss", "mse", "--target-accuracy", "0.9",
                     "--max-steps", "2", "--quiet", "--out", str(tmp_path / "r")])
    assert code == 2 and "--target-accuracy needs a task with an accuracy" in (
        capsys.readouterr().err)
    assert not (tmp_path / "r" / "config.toml").exists()


def test_bench_compare_runs_ddp_to_the_target_and_writes_its_report(tmp_path):
    code = cli.main(["bench", "--compare", "ddp", "--dataset", "synthetic", "--model",
                     "linear", "--nproc", "2", "--target-accuracy", "0.9", "--eval-every",
                     "5", "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "c")])
    assert code == 0
    doc = json.loads((tmp_path / "c" / "compare.json").read_text())
    r = doc["rows"]["ddp"]
    assert r["reached"] and r["steps_to_target"] % 5 == 0
    grads = 7850 * 4  # linear: 784 x 10 + 10 parameters, fp32
    assert r["comm_bytes_per_rank"] == grads * r["steps_to_target"]
    assert "| ddp | yes | 1/1 |" in (tmp_path / "c" / "compare.md").read_text()


def test_only_exact_strategies_are_called_exact():
    from dptrain.bench.compare import exact

    assert exact("ddp", 8) and exact("localsgd", 1) and exact("zero", 8)
    assert not exact("localsgd", 8) and not exact("hogwild", 1)


def test_a_target_met_only_at_the_final_evaluation_is_reported(tmp_path, capsys):
    """30 steps, less than an epoch and no --eval-every: the final evaluation is the only
    one (target_reached was null although the accuracy was above the target)."""
    assert cli.main(["train", "--dataset", "synthetic", "--model", "linear", "--max-steps",
                     "30", "--lr", "0.05", "--target-accuracy", "0.3", "--threads", "1",
                     "--quiet", "--out", str(tmp_path / "t")]) == 0
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert s["target_reached"]["at"] == "the final evaluation"
    assert s["target_reached"]["step"] == s["steps"] == 30
    assert s["target_reached"]["accuracy"] == s["test_accuracy"] >= 0.3
    assert cli.main(["train", "--dataset", "synthetic", "--target-accuracy", "0.3",
                     "--no-eval-every-epoch", "--quiet", "--out", str(tmp_path / "u")]) == 2
    assert "add --eval-every N" in capsys.readouterr().err
