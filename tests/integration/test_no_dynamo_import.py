"""A DDP, ZeRO or local-SGD worker never imports torch._dynamo (2.3 s of every worker's start
on this project's VM): dptrain.lazydynamo around DDP's constructor and forward, and the local
optimizer's update through dptrain.optim.direct_step under ZeRO and local SGD. Each case is a
fresh interpreter started as torchrun starts a worker (1 rank, a real gloo process group)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dptrain.dist import free_port

SRC = str(Path(__file__).resolve().parents[2] / "src")

CODE = textwrap.dedent("""
    import json, sys
    from dptrain.cli import main
    rc = main(["train", "--dataset", "synthetic", "--model", "convnet", "--max-steps", "3",
               "--batch-size", "16", "--quiet", "--strategy", sys.argv[2], "--out", sys.argv[1]])
    steps = json.load(open(sys.argv[1] + "/summary.json"))["steps"]
    print(rc, steps, "torch._dynamo" in sys.modules)
""")


@pytest.mark.parametrize("strategy", ["ddp", "zero", "localsgd"])
def test_a_worker_trains_without_importing_dynamo(strategy, tmp_path):
    env = {"PYTHONPATH": SRC, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / "run"), strategy],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-3:] == ["0", "3", "False"]
