"""``dptrain slurm --requeue``: the script's directives and arguments, its input checks, and the
script itself run by bash with stand-ins for ``srun``/``scontrol`` (no cluster needed): USR1
reaches the training, which checkpoints and stops; the job requeues itself; the next start
finishes bitwise like an uninterrupted run. The live-cluster version is in
tests/integration/test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dptrain import slurm
from dptrain.errors import UsageError
from tests.conftest import ROOT, clean_env

ARGS = ["--dataset", "synthetic", "--model", "linear", "--seed", "5", "--batch-size", "16",
        "--log-every", "10", "--ckpt-every", "40", "--epochs", "6"]


def test_requeue_script_directives_and_arguments():
    text = slurm.render(1, 2, time="00:30:00", requeue=True, signal_lead=90,
                        train_args=["--", "--dataset", "synthetic"])
    lines = text.splitlines()
    for directive in ("#SBATCH --signal=B:USR1@90", "#SBATCH --requeue",
                      "#SBATCH --open-mode=append", "#SBATCH --time=00:30:00"):
        assert directive in lines
    assert "#SBATCH --signal=TERM@60" not in lines
    [srun] = [ln for ln in lines if ln.startswith("srun ")]
    # a fixed --out: the job id survives a requeue; --resume auto continues from it
    assert srun.endswith('--dataset synthetic --resume auto --out runs/dptrain-"$SLURM_JOB_ID" &')
    assert "trap on_usr1 USR1" in lines and '    scontrol requeue "$SLURM_JOB_ID"' in lines
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # valid bash


def test_requeue_keeps_the_users_out_and_resume_auto():
    text = slurm.render(1, 1, requeue=True, train_args=["--out", "/scratch/r1", "--resume",
                                                       "auto"])
    [srun] = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    assert srun.count("--out") == 1 and srun.count("--resume") == 1
    assert "--out /scratch/r1 --resume auto &" in srun


def test_without_requeue_the_script_is_the_plain_one():
    text = slurm.render(1, 1, train_args=["--dataset", "synthetic"])
    assert "#SBATCH --signal=TERM@60" in text and "--requeue" not in text
    assert "trap" not in text and "--resume" not in text
    assert text.splitlines()[-1].startswith("srun --kill-on-bad-exit=1 ")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"train_args": ["--resume", "/x/step-1.pt"]}, "would restart from that checkpoint"),
    ({"signal_lead": 0}, "--signal-lead 0 must be at least 1"),
    ({"signal_lead": 600, "time": "10"}, r"less than the time limit \(10 = 600 s\)"),
    ({"signal_lead": 3600, "time": "1-00"}, None),
    ({"signal_lead": 120, "time": "UNLIMITED"}, None),
])
def test_requeue_input_checks(kwargs, message):
    if message is None:
        assert "#SBATCH --requeue" in slurm.render(1, 1, requeue=True, **kwargs)
        return
    with pytest.raises(UsageError, match=message):
        slurm.render(1, 1, requeue=True, **kwargs)


@pytest.mark.parametrize(("value", "seconds"), [("90", 5400), ("01:30", 90), ("1:02:03", 3723),
                                                ("2-01", 176400), ("1-00:01:05", 86465),
                                                ("unlimited", None)])
def test_time_seconds(value, seconds):
    assert slurm.time_seconds(value) == seconds


def test_cli_signal_lead_error_is_one_line(tmp_path):
    gen = subprocess.run([sys.executable, "-m", "dptrain", "slurm", "--requeue", "--time", "1",
                          "--signal-lead", "60"], capture_output=True, text=True,
                         env=clean_env())
    assert gen.returncode == 2 and gen.stdout == ""
    assert gen.stderr.count("\n") == 1 and gen.stderr.startswith("error: --signal-lead 60")


# ------------------------------------------------------------ the script, with stand-ins
SRUN_STUB = '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n'
SCONTROL_STUB = """#!/bin/bash
if [ "$1" = show ]; then echo 127.0.0.1; exit 0; fi
echo "$@" >> "$SCONTROL_LOG"
"""


def _stubs(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
                     SLURM_JOB_NODELIST="localhost", SCONTROL_LOG=str(tmp_path / "scontrol.log"))


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def _records(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
    except FileNotFoundError:
        return []


def _model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_the_next_start_finishes_bitwise(tmp_path):
    env = _stubs(tmp_path)
    out = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    slurm.write_script(script, slurm.render(1, 1, requeue=True, python=sys.executable,
                                            train_args=[*ARGS, "--out", str(out)]))
    job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: len(_records(out / "metrics.jsonl")) >= 3, 120, "training to start")
        job.send_signal(signal.SIGUSR1)  # what SLURM sends to the batch shell (B:USR1)
        log, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, log[-3000:]
    assert "USR1 received" in log and "requeueing job 4242" in log
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    first = json.loads((out / "summary.json").read_text())
    assert first["stopped_by_signal"] is True and first["steps"] >= 30
    # the requeued start: the same script, the same --out
    again = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # not requeued again
    final = json.loads((out / "summary.json").read_text())
    assert final["stopped_by_signal"] is False and final["steps"] > first["steps"]
    assert final["resumed_from"].endswith(f"step-{first['steps']:08d}.pt")
    # an uninterrupted run of the same configuration
    ref = tmp_path / "ref"
    plain = subprocess.run([sys.executable, "-m", "dptrain", "train", "--threads", "1", *ARGS,
                            "--out", str(ref)], capture_output=True, text=True, env=clean_env(),
                           timeout=300, cwd=ROOT)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert json.loads((ref / "summary.json").read_text())["steps"] == final["steps"]
    a, b = _model(out), _model(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("layout", "args", "needle"), [
    ({"nodes": 2}, ["--strategy", "single"], "runs in ONE process"),
    ({"procs": 2}, ["--strategy", "dp"], "needs CUDA GPUs"),
    ({"nodes": 2}, ["--strategy", "hogwild"], "cannot span 2 nodes"),
    ({}, ["--strategy", "pipeline", "--stages", "2"], "does not divide the 1 processes"),
    ({}, ["--balance", "auto"], "needs at least 2 processes"),
    ({"procs": 2}, ["--threads", "2,1,3"], "gives 3 values for 2 local process(es)"),
])
def test_a_layout_the_job_would_refuse_is_refused_when_the_script_is_made(layout, args,
                                                                          needle):
    """Checked against the job's shape (srun's environment, its GPUs and cores), not this
    login node's: the job itself would have failed on it after waiting in the queue."""
    with pytest.raises(UsageError, match="the job runs") as err:
        slurm.render(layout.get("nodes", 1), layout.get("procs", 1), train_args=args)
    assert needle in str(err.value)


def test_a_gpu_job_is_planned_with_its_gpus_and_sound_layouts_pass():
    script = slurm.render(1, 2, gpus=True, train_args=["--strategy", "ddp"])
    assert "--strategy ddp" in script
    with pytest.raises(UsageError, match="with a GPU each"):
        slurm.render(1, 2, gpus=True, train_args=["--strategy", "dp"])  # dp: one process
    assert "--strategy ddp" in slurm.render(2, 2, train_args=["--strategy", "ddp"])


def test_time_limits_the_job_cannot_use_and_requeue_with_a_configured_out(tmp_path):
    with pytest.raises(UsageError, match="gets SIGTERM 60 s before its limit"):
        slurm.render(1, 1, time="00:00:30")
    with pytest.raises(UsageError, match="is not a SLURM time limit"):
        slurm.render(1, 1, time="\uff11\uff10")  # full-width digits: sbatch refuses them
    assert slurm.time_seconds("0") is None  # sbatch: no limit
    assert "#SBATCH --time=0" in slurm.render(1, 1, time="0", requeue=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text('out = "runs/mine"\nmodel = "linear"\n')
    script = slurm.render(1, 1, requeue=True, train_args=["--config", str(cfg)])
    assert "--resume auto" in script and "SLURM_JOB_ID\" &" not in script
    assert "--out runs/dptrain-" in slurm.render(1, 1, requeue=True)


def test_layout_keys_in_a_config_file_are_refused_like_the_flags(tmp_path):
    cfg = tmp_path / "lay.toml"
    cfg.write_text("nproc = 4\n")
    with pytest.raises(UsageError, match=r"nproc = '4' \(from --config\) has no effect"):
        slurm.render(1, 1, train_args=["--config", str(cfg)])


def test_a_gpu_job_may_ask_for_nccl_from_a_login_node_without_it():
    """The job's Python has NCCL; the CPU-only torch where the script is made need not."""
    assert "--backend nccl" in slurm.render(1, 2, gpus=True, train_args=["--backend", "nccl"])
    with pytest.raises(UsageError, match="--backend nccl needs CUDA GPUs"):
        slurm.render(1, 2, train_args=["--backend", "nccl"])  # a job without GPUs
