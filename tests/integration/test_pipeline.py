"""--strategy pipeline on real gloo groups: S stages x M micro-batches (x D replicas, x accum K)
equal one process with the global batch; resume across pipeline and single; verify and fit;
the summary's bubble figures; bad flags refused with one error line."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from dptrain import cli
from dptrain.verify import compare, run_pair
from tests.conftest import clean_env, run_cli
from tests.integration.test_features import params

BASE = {"dataset": "synthetic", "data_root": "unused", "model": "myplugins:mlp", "lr": 0.05,
        "momentum": 0.9, "seed": 5, "threads": 1}
MLP_PARAMS = 784 * 32 + 32 + 32 * 10 + 10  # myplugins:mlp
STAGE_PARAMS = [(784 * 32 + 32) * 4, (32 * 10 + 10) * 4]  # its two stages, in bytes
COMMON = ["--dataset", "synthetic", "--model", "myplugins:mlp", "--lr", "0.05", "--momentum",
          "0.9", "--seed", "5", "--threads", "1", "--quiet"]


def check_summary(s: dict, stages: int, micro: int, schedule: str, replicas: int = 1) -> None:
    assert s["strategy"] == "pipeline" and s["world_size"] == stages * replicas
    assert (s["stages"], s["microbatches"], s["pipeline_schedule"]) == (stages, micro, schedule)
    assert s["data_parallel_replicas"] == replicas
    assert s["bubble_theoretical"] == (stages - 1) / (micro + stages - 1)
    per_stage = s["bubble_measured_per_stage"]
    assert len(per_stage) == stages and all(0 <= b < 1 for b in per_stage)
    assert s["bubble_measured"] == pytest.approx(sum(per_stage) / stages)
    assert all(0 < c < t for c, t in zip(s["stage_compute_s"], s["stage_step_s"], strict=True))
    assert len(s["memory_per_rank"]) == stages * replicas


def test_gpipe_two_stages_equal_one_process(tmp_path):
    s1, sn = run_pair({**BASE, "batch_size": 16, "microbatches": 4,
                       "pipeline_schedule": "gpipe"}, 2, 30, tmp_path, "pipeline")
    diff, where = compare(params(tmp_path / "one"), params(tmp_path / "pipeline2"))
    assert diff < 1e-5, where
    check_summary(sn, 2, 4, "gpipe")
    assert sn["split_points"] == ["3"] and sn["split_by"] == "parameter count"
    assert sn["stage_layers"] == [["0", "1", "2"], ["3"]]
    assert sn["global_batch"] == s1["global_batch"] == 16 and sn["test_samples"] == 1000
    assert sn["test_accuracy"] == pytest.approx(s1["test_accuracy"], abs=2e-3)
    # each rank holds (and its optimizer keeps momenta for) its own stage only
    ranks = sn["memory_per_rank"]
    assert [r["param_bytes"] for r in ranks] == STAGE_PARAMS
    assert [r["optim_bytes"] for r in ranks] == STAGE_PARAMS
    assert sum(STAGE_PARAMS) == MLP_PARAMS * 4
    assert sn["model_flops_per_sample"] == s1["model_flops_per_sample"] > 0


def test_verify_pipeline_1f1b_exits_0_and_equals_one_process(tmp_path, capsys):
    code = cli.main(["verify", "--strategy", "pipeline", "--pipeline-schedule", "1f1b",
                     "--model", "myplugins:mlp", "--threads", "1", "--keep", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-2000:]
    assert "PASS" in stdout and "pipeline x 2 processes" in stdout
    diff, _ = compare(params(tmp_path / "one"), params(tmp_path / "pipeline2"))
    assert diff < 1e-5
    s = json.loads((tmp_path / "pipeline2" / "summary.json").read_text())
    check_summary(s, 2, 4, "1f1b")  # verify's defaults: batch 16, 2 x 2 micro-batches
    assert s["steps"] == 30


PLUGIN = '''
from torch import nn


def mlp3():
    """Three layers with parameters; the model names where stages 2 and 3 begin."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 16),
                          nn.ReLU(), nn.Linear(16, 10))
    model.pipeline_split_points = {3: ["3", "5"]}
    return model
'''


@pytest.mark.extended
def test_three_stages_named_by_the_model_equal_one_process(tmp_path, monkeypatch):
    (tmp_path / "pp_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned workers inherit sys.path
    s1, sn = run_pair({**BASE, "model": "pp_plugin:mlp3", "batch_size": 12, "microbatches": 3,
                       "pipeline_schedule": "1f1b"}, 3, 10, tmp_path, "pipeline")
    diff, where = compare(params(tmp_path / "one"), params(tmp_path / "pipeline3"))
    assert diff < 1e-5, where
    check_summary(sn, 3, 3, "1f1b")
    assert sn["split_by"] == "the model's pipeline_split_points"
    assert sn["stage_layers"] == [["0", "1", "2"], ["3", "4"], ["5"]]


def test_two_stages_by_two_replicas_equal_one_process(tmp_path):
    """4 processes: a 2 x 2 mesh, each stage's gradients averaged over its 2 replicas."""
    s1, sn = run_pair({**BASE, "batch_size": 8, "stages": 2, "microbatches": 2,
                       "pipeline_schedule": "1f1b"}, 4, 8, tmp_path, "pipeline")
    diff, where = compare(params(tmp_path / "one"), params(tmp_path / "pipeline4"))
    assert diff < 1e-5, where
    assert sn["global_batch"] == s1["global_batch"] == 16
    check_summary(sn, 2, 2, "1f1b", replicas=2)
    assert [r["param_bytes"] for r in sn["memory_per_rank"]] == STAGE_PARAMS * 2


@pytest.mark.extended
def test_accumulation_and_grad_clip_equal_one_process(tmp_path):
    """--accum 2: each loader micro-batch pipelined into 2 pieces; --grad-clip: the norm over
    both stages' gradients (0.05 bites on this model: see test_sharded)."""
    s1, sn = run_pair({**BASE, "batch_size": 8, "accum": 2, "microbatches": 2, "grad_clip": 0.05,
                       "pipeline_schedule": "gpipe"}, 2, 10, tmp_path, "pipeline")
    diff, where = compare(params(tmp_path / "one"), params(tmp_path / "pipeline2"))
    assert diff < 1e-5, where
    assert sn["global_batch"] == s1["global_batch"] == 16 and sn["accum"] == 2


@pytest.mark.extended
def test_resume_from_pipeline_to_single_and_back_matches_the_uninterrupted_run(tmp_path):
    """Global batch 16: one process 0-16 uninterrupted == pipeline 0-8, then a single
    process resuming its checkpoint 8-12, then the pipeline again 12-16 (each leg resumes
    the other's consolidated model and globally indexed optimizer state)."""
    assert cli.main(["train", *COMMON, "--batch-size", "16", "--max-steps", "16", "--out",
                     str(tmp_path / "ref")]) == 0
    out = tmp_path / "moved"
    legs = [("pipeline", ["--nproc", "2", "--pipeline-schedule", "1f1b"], 8),
            ("single", ["--resume", "auto"], 12),
            ("pipeline", ["--nproc", "2", "--pipeline-schedule", "gpipe", "--resume", "auto"],
             16)]
    for strategy, extra, steps in legs:
        assert cli.main(["train", *COMMON, "--strategy", strategy, *extra, "--batch-size",
                         "16", "--max-steps", str(steps), "--ckpt-every", "4", "--out",
                         str(out)]) == 0
        s = json.loads((out / "summary.json").read_text())
        assert (s["strategy"], s["steps"], s["global_batch"]) == (strategy, steps, 16)
    diff, where = compare(params(tmp_path / "ref"), params(out))
    assert diff < 1e-5, where
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert sorted(last["model"]) == ["1.bias", "1.weight", "3.bias", "3.weight"]
    assert last["world_size"] == 1 and len(last["rng"]["cpu"]) == 1
    assert len(last["rng"]["pipeline"]["cpu"]) == 2  # every rank's stream, for this layout
    momenta = last["optimizer"]["state"]
    assert sorted(momenta) == [0, 1, 2, 3]  # globally indexed, as a plain optimizer writes
    assert momenta[0]["momentum_buffer"].shape == (32, 784)


def test_fit_trains_a_pipeline_in_bf16_and_returns_the_whole_model(tmp_path):
    import dptrain

    r = dptrain.fit("myplugins:mlp", "synthetic", strategy="pipeline", nproc=2, threads="1",
                    batch_size=16, max_steps=30, lr=0.05, momentum=0.9, precision="bf16",
                    out=str(tmp_path / "fit"), quiet=True)
    assert r["strategy"] == "pipeline" and r["stages"] == 2 and r["steps"] == 30
    assert r["precision"] == "bf16" and r["test_accuracy"] > 0.8
    saved = params(tmp_path / "fit")
    assert all(t.dtype == torch.float32 for t in saved.values())  # fp32 weights, bf16 compute
    assert sorted(r.model.state_dict()) == sorted(saved)
    assert compare(r.model.state_dict(), saved)[0] == 0.0


@pytest.mark.parametrize(("args", "words"), [
    (["--nproc", "3", "--stages", "2"], "--stages 2 does not divide the 3 processes"),
    (["--nproc", "2", "--microbatches", "3", "--batch-size", "16"],
     "--microbatches 3 does not divide --batch-size 16"),
    (["--nproc", "2", "--microbatches", "1", "--pipeline-schedule", "1f1b"],
     "1f1b needs at least as many micro-batches as stages"),
    (["--nproc", "2", "--model", "linear"], "cannot be cut into 2 stages"),
])
def test_bad_pipeline_flags_end_with_one_error_line(tmp_path, args, words):
    out = tmp_path / "run"
    r = run_cli("train", *COMMON, "--strategy", "pipeline", "--max-steps", "2",
                "--batch-size", "16", *args, "--out", str(out), env=clean_env(),
                timeout=200)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert "Traceback" not in r.stderr
    assert not (out / "config.toml").exists()  # refused before the run directory is written


def test_channels_last_is_refused_up_front(tmp_path):
    """gloo's point-to-point sends take contiguous tensors only: ``--channels-last on`` is an
    ``error:`` before anything is written, not a traceback from inside torch's schedule."""
    out = tmp_path / "run"
    r = run_cli("train", "--dataset", "synthetic", "--model", "convnet", "--strategy",
                "pipeline", "--nproc", "2", "--batch-size", "8", "--max-steps", "2", "--quiet",
                "--threads", "1", "--channels-last", "on", "--out", str(out))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --strategy pipeline sends")
    assert "'1.0.weight' is not contiguous" in lines[0]
    assert [p.name for p in out.rglob("*")] in ([], [".dptrain.lock"])  # nothing written


def test_keep_global_batch_picks_a_batch_the_micro_batches_divide(tmp_path, capfd):
    """A ddp checkpoint at global batch 32 resumed by a 2-stage pipeline (one replica): batch
    16 x accum 2 fits --microbatches 4; --microbatches 6 divides no batch that keeps 32, which
    is one error line before the run changes (it was a gloo abort: uneven micro-batches)."""
    out = tmp_path / "r"
    assert cli.main(["train", *COMMON, "--strategy", "ddp", "--nproc", "2", "--batch-size",
                     "16", "--max-steps", "5", "--ckpt-every", "5", "--out", str(out)]) == 0
    config = (out / "config.toml").read_bytes()
    resume = ["train", *COMMON, "--strategy", "pipeline", "--nproc", "2", "--batch-size", "12",
              "--pipeline-schedule", "gpipe", "--max-steps", "10", "--resume", "auto",
              "--keep-global-batch", "--out", str(out)]
    capfd.readouterr()
    assert cli.main([*resume, "--microbatches", "6"]) == 2
    err = capfd.readouterr().err
    assert "cannot split into batches that --microbatches 6 divides" in err, err
    assert "Traceback" not in err and (out / "config.toml").read_bytes() == config
    assert cli.main([*resume, "--microbatches", "4"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (s["steps"], s["global_batch"]) == (10, 32)
    assert s["resumed_from"].endswith("step-00000005.pt")
    assert "batch_size = 16" in (out / "config.toml").read_text()
