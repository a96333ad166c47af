"""Reliability, round 2: never spin, never overwrite a run, metrics whole or not at all,
nothing left behind. Real subprocesses, as a user would meet each case."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import clean_env, run_cli

PLUG = ["--dataset", "taskplugins:regression_data", "--model", "taskplugins:regressor",
        "--loss", "mse", "--threads", "1", "--quiet"]


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".dptrain.lock"}


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    return lines[0]


def test_a_resume_whose_position_no_longer_fits_the_data_fails_at_once(tmp_path):
    """Severe 1: the dataset shrank between runs (640 -> 320 samples). The old loop spun
    forever here (no collective, SIGTERM ignored); now the position is checked first."""
    out = tmp_path / "run"
    first = run_cli("train", *PLUG, "--batch-size", "64", "--epochs", "2", "--max-steps", "8",
                    "--ckpt-every", "8", "--out", str(out),
                    env=clean_env(TASKPLUGINS_N="640"), timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    before = hashes(out)
    t0 = time.monotonic()
    again = subprocess.Popen(
        [sys.executable, "-m", "dptrain", "train", *PLUG, "--batch-size", "64", "--epochs", "2",
         "--resume", "auto", "--out", str(out)], env=clean_env(TASKPLUGINS_N="320"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = again.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # pragma: no cover - the defect itself
        again.kill()
        pytest.fail("the resume spun instead of failing")
    assert again.returncode == 2
    line = one_error_line(stderr)
    assert "step 8 of epoch 0" in line and "5 steps per epoch" in line
    assert "dataset or batch changed" in line
    assert time.monotonic() - t0 < 60
    assert hashes(out) == before  # nothing the run had was changed


def test_resume_path_into_another_existing_run_is_refused_and_leaves_it_intact(tmp_path):
    """Severe 2: --resume A/checkpoints/last.pt --out B (B an existing run) used to
    overwrite B's summary, config and checkpoints and append to its metrics."""
    a, b = tmp_path / "a", tmp_path / "b"
    for out, seed in ((a, "1"), (b, "2")):
        r = run_cli("train", *PLUG, "--max-steps", "4", "--seed", seed, "--out", str(out))
        assert r.returncode == 0, r.stderr[-2000:]
    before = hashes(b)
    r = run_cli("train", *PLUG, "--max-steps", "6", "--seed", "1", "--resume",
                str(a / "checkpoints" / "last.pt"), "--out", str(b))
    assert r.returncode == 2
    assert "already holds another run" in one_error_line(r.stderr)
    assert hashes(b) == before
    # its own run directory, and a new one, are fine
    same = run_cli("train", *PLUG, "--max-steps", "6", "--seed", "1", "--resume",
                   str(a / "checkpoints" / "last.pt"), "--out", str(a))
    assert same.returncode == 0, same.stderr[-2000:]
    fresh = run_cli("train", *PLUG, "--max-steps", "6", "--seed", "1", "--resume",
                    str(a / "checkpoints" / "step-00000004.pt"), "--out", str(tmp_path / "c"))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["steps"] == 6


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_while_writing_metrics_leaves_whole_lines_and_one_error(tmp_path):
    """Item 7: the file-size limit stands in for a full disk. Checkpoints (~1 KB) fit, the
    metrics file grows past the limit mid-run."""
    out = tmp_path / "run"
    args = ["train", *PLUG, "--batch-size", "8", "--epochs", "40", "--log-every", "1",
            "--ckpt-every", "50", "--out", str(out)]
    r = subprocess.run([sys.executable, "-m", "dptrain", *args], capture_output=True,
                       text=True, env=clean_env(), timeout=180,
                       preexec_fn=_limit_file_size(12_000))
    assert r.returncode == 2, r.stderr[-2000:]
    line = one_error_line(r.stderr)
    assert "metrics.jsonl" in line and "File too large" in line
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    records = [json.loads(ln) for ln in text.splitlines()]  # every line parses
    assert len(records) > 20
    # and the run continues from its newest checkpoint, appending onto whole lines
    r2 = run_cli("train", *args[1:], "--max-steps", "120", "--resume", "auto", timeout=180)
    assert r2.returncode == 0, r2.stderr[-2000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(ln) for ln in lines)
    assert run_cli("plot", str(out), "--out", str(tmp_path / "p.png")).returncode == 0


def test_stale_checkpoint_temporaries_are_swept_on_start(tmp_path):
    """Item 8: a writer killed mid-save leaves ``.step-N.pt.tmpPID``; the next run removes
    those whose process is gone (and nothing else)."""
    out = tmp_path / "run"
    r = run_cli("train", *PLUG, "--max-steps", "4", "--ckpt-every", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    ckpts = out / "checkpoints"
    stale = ckpts / f".step-00000006.pt.tmp{dead}"
    stale.write_bytes(b"PK partial")
    alive = ckpts / f".step-00000006.pt.tmp{os.getpid()}"  # a live writer's: kept
    alive.write_bytes(b"PK partial")
    r = run_cli("train", *PLUG, "--max-steps", "6", "--ckpt-every", "2", "--resume", "auto",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert not stale.exists() and alive.exists()
    alive.unlink()
