"""--cpu-bind auto under a real 2-process DDP run: each rank on its own core; none (the
default): the OS's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import clean_env

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
SRC = Path(__file__).resolve().parents[2] / "src"


def run(tmp_path: Path, name: str, *flags: str) -> tuple[dict, list[list[int]]]:
    probe = tmp_path / f"{name}-affinity"
    env = clean_env(PYTHONPATH=f"{SRC}:{PLUGINS}", AFFINITY_PROBE=str(probe))
    out = tmp_path / name
    r = subprocess.run([sys.executable, "-m", "dptrain", "train", "--nproc", "2", "--threads",
                        "1", "--dataset", "synthetic", "--model", "myplugins:affinity_probe",
                        "--max-steps", "2", "--no-eval-every-epoch", "--quiet", "--out",
                        str(out), *flags], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    masks = [json.loads(Path(f"{probe}.{rank}").read_text()) for rank in (0, 1)]
    return json.loads((out / "summary.json").read_text()), masks


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two usable cores")
def test_with_auto_each_rank_gets_its_own_core_and_by_default_the_os_decides(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    summary, masks = run(tmp_path, "auto", "--cpu-bind", "auto")
    assert masks == [[allowed[0]], [allowed[1]]]
    assert summary["cpu_bind"] == f"cores {allowed[0]}"  # rank 0's
    summary, masks = run(tmp_path, "default")
    assert masks == [allowed, allowed] and summary["cpu_bind"] == "none"
