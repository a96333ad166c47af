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
