"""A live one-node SLURM cluster (Debian slurm-wlm + munge) runs `dptrain slurm`'s script.

tests/infra/slurm_up.sh installs and starts the daemons; skipped, with the reason, where that
is impossible (not root, no apt, packages unavailable).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, clean_env, run_cli

INFRA = ROOT / "tests" / "infra"
ARGS = ["--dataset", "synthetic", "--model", "linear", "--max-steps", "20", "--seed", "9",
        "--batch-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the SLURM test starts slurmctld/slurmd and needs root")
    up = subprocess.run(["bash", str(INFRA / "slurm_up.sh")], capture_output=True, text=True,
                        timeout=600)
    if up.returncode != 0:
        pytest.skip(f"cannot start a one-node SLURM cluster: {up.stderr.strip()[-300:]}")
    assert shutil.which("sbatch")
    yield
    subprocess.run(["bash", str(INFRA / "slurm_down.sh")], capture_output=True, timeout=120)


def test_generated_sbatch_script_runs_ddp_under_srun(cluster, tmp_path):
    script = tmp_path / "job.sbatch"
    gen = run_cli("slurm", "--nodes", "1", "--procs-per-node", "2", "--time", "00:05:00",
                  "--python", sys.executable, "-o", str(script), "--", *ARGS,
                  "--out", str(tmp_path / "slurm"))
    assert gen.returncode == 0, gen.stderr
    text = script.read_text()
    assert "#SBATCH --nodes=1" in text and "#SBATCH --ntasks-per-node=2" in text
    job = subprocess.run(["sbatch", "--wait", str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=clean_env())
    logs = "".join(p.read_text() for p in tmp_path.glob("dptrain-*.out"))
    assert job.returncode == 0, job.stderr + logs[-3000:]
    summary = json.loads((tmp_path / "slurm" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp"
    assert "test accuracy" in logs
    local = run_cli("train", "--nproc", "2", *ARGS, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-2000:]
    a = torch.load(tmp_path / "slurm" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "local" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


REQUEUE_ARGS = ["--dataset", "synthetic", "--model", "linear", "--seed", "9", "--batch-size",
                "16", "--epochs", "5", "--log-every", "10", "--ckpt-every", "40"]


def _job(job_id: str) -> dict[str, str]:
    """``scontrol show job -o``'s fields (empty once SLURM has forgotten the job)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                           text=True, timeout=30)
    return dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)


def _stepds_here(job_id: str) -> int:
    """How many live ``slurmstepd`` of the job run on this machine (the cluster's one node)."""
    count = 0
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        count += cmd.startswith(f"slurmstepd: [{job_id}.".encode()) and state != "Z"
    return count


def _lines(path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))
    except FileNotFoundError:
        return 0


def _until(cond, timeout: float, what: str, job_id: str, tmp_path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            logs = "".join(p.read_text() for p in tmp_path.glob("dptrain-*.out"))
            pytest.fail(f"timed out after {timeout} s waiting for {what}; job {_job(job_id)}; "
                        f"log: {logs[-3000:]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_requeue_job_checkpoints_on_usr1_requeues_and_finishes_bitwise(cluster, tmp_path):
    """`dptrain slurm --requeue`: USR1 (what --signal=B:USR1@LEAD sends ahead of the time
    limit) -> every rank checkpoints, the job requeues itself, the requeued start resumes and
    ends with the parameters of an uninterrupted job, bit for bit."""
    def script(name: str):
        path = tmp_path / f"{name}.sbatch"
        gen = run_cli("slurm", "--requeue", "--procs-per-node", "2", "--time", "00:10:00",
                      "--job-name", name, "--python", sys.executable, "-o", str(path), "--",
                      *REQUEUE_ARGS, "--out", str(tmp_path / name))
        assert gen.returncode == 0, gen.stderr
        return path

    ref = subprocess.run(["sbatch", "--wait", str(script("ref"))], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=clean_env())
    assert ref.returncode == 0, ref.stderr
    sub = subprocess.run(["sbatch", "--parsable", str(script("pre"))], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env=clean_env())
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    out = tmp_path / "pre"
    try:
        _until(lambda: _lines(out / "metrics.jsonl") >= 3, 120, "training to start", job,
               tmp_path)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)

        def finished() -> bool:
            info = _job(job)
            if (info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime"
                    and not _stepds_here(job)):
                # SLURM holds a requeued job 2 min before it may start again; here it starts
                # once the first start's steps are gone (a stepd outlives srun by ~2 s, and a
                # start before then is refused, "Job credential revoked", and the job ends)
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                               capture_output=True, timeout=30)
            return info.get("JobState") == "COMPLETED"

        _until(finished, 300, "the requeued job to finish", job, tmp_path)
        assert _job(job).get("Restarts") == "1"
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    log = (tmp_path / f"dptrain-{job}.out").read_text()  # both starts (--open-mode=append)
    assert "USR1 received" in log and f"requeueing job {job}" in log
    assert "resumed from" in log
    summary = json.loads((out / "summary.json").read_text())
    expected = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["stopped_by_signal"] is False and summary["resumed_from"]
    assert summary["steps"] == expected["steps"] and summary["world_size"] == 2
    a = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
