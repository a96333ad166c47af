"""dptrain.Session in real 2-process gloo jobs on 127.0.0.1: examples/own_loop.py under
``dptrain run --nproc 2`` equals one process with the global batch; resume across runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, clean_env, run_cli

EXAMPLE = str(ROOT / "examples" / "own_loop.py")


def params(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]


def eval_samples(out: Path) -> list[int]:
    return [r["test_samples"] for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                            .splitlines()) if "test_samples" in r]


def own_loop(out: Path, *args: str, nproc: int = 1) -> str:
    launcher = ("run", "--nproc", str(nproc), EXAMPLE) if nproc > 1 else ()
    cmd = [*launcher, *(() if launcher else (EXAMPLE,)), "--out", str(out), *args]
    if launcher:
        r = run_cli(*cmd, env=clean_env(OMP_NUM_THREADS="1"), timeout=240)
    else:
        import subprocess

        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True,
                           env=clean_env(), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_own_loop_on_two_processes_equals_one_process_and_resumes(tmp_path):
    # 2 processes x batch 8 x accum 2 == 1 process x batch 32 (global batch 32), 24 steps
    one = own_loop(tmp_path / "one", "--batch-size", "32", "--max-steps", "24")
    two = own_loop(tmp_path / "two", "--batch-size", "8", "--accum", "2", "--max-steps", "24",
                   nproc=2)
    a, b = params(tmp_path / "one"), params(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert eval_samples(tmp_path / "one") == eval_samples(tmp_path / "two") == [1000]
    acc = [line for line in (one + two).splitlines() if line.startswith("test accuracy")]
    assert len(acc) == 2 and acc[0].split("|")[0] == acc[1].split("|")[0]  # same accuracy
    assert "ddp x 2" in acc[1] and "single x 1" in acc[0]
    state = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and state["position"]["step"] == 24
    # stop at step 12, then continue in a new 2-process run: the same parameters as straight
    own_loop(tmp_path / "re", "--batch-size", "8", "--accum", "2", "--max-steps", "12",
             nproc=2)
    out = own_loop(tmp_path / "re", "--batch-size", "8", "--accum", "2", "--max-steps", "24",
                   nproc=2)
    assert "resumed from" in out and "at step 12" in out
    c = params(tmp_path / "re")
    assert max((b[k] - c[k]).abs().max().item() for k in b) <= 1e-6


def test_a_session_error_in_a_worker_is_one_error_line(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("import dptrain\ns = dptrain.Session(strategy='single')\n")
    r = run_cli("run", "--nproc", "2", str(script), env=clean_env(), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: --strategy single runs in ONE process")
    assert "Traceback" not in r.stderr


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("process-group tests run on Linux")


ZERO_SCRIPT = """
import sys, torch, dptrain
from sessionloop import ten_steps

with dptrain.Session(strategy=sys.argv[1], seed=3) as s:
    wrapped, opt, flat = ten_steps(s)
    inner = getattr(opt, "optim", opt)
    held = sum(v.numel() for st in inner.state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim())
    both = s.all_reduce(torch.tensor([float(held)]), op="sum")  # one line, from rank 0
    if s.is_main:
        print("RESULT", type(opt).__name__, held, int(both.item()),
              repr(flat.double().sum().item()))
"""


def test_a_user_built_optimizer_under_zero_is_sharded_and_trains_like_ddp(tmp_path):
    script = tmp_path / "zero_loop.py"
    script.write_text(ZERO_SCRIPT)
    out = {}
    for strategy in ("zero", "ddp"):
        r = run_cli("run", "--nproc", "2", str(script), strategy,
                    env=clean_env(OMP_NUM_THREADS="1"), timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        out[strategy] = r.stdout
    _, kind, held, both, total = next(ln for ln in out["zero"].splitlines()
                                      if ln.startswith("RESULT")).split()
    assert kind == "ZeroRedundancyOptimizer"
    assert int(both) == 7850 and 0 < int(held) < 7850  # the momenta partitioned over ranks
    ddp_total = next(ln for ln in out["ddp"].splitlines() if ln.startswith("RESULT")).split()[4]
    assert abs(float(total) - float(ddp_total)) < 1e-4


def test_run_passes_on_the_scripts_own_exit_status(tmp_path):
    """Every worker ends with sys.exit(3): `dptrain run --nproc 2` exits 3 (it was 1)."""
    script = tmp_path / "ex3.py"
    script.write_text("import sys\nsys.exit(3)\n")
    assert run_cli("run", str(script), timeout=120).returncode == 3
    assert run_cli("run", "--nproc", "2", str(script), timeout=120).returncode == 3
