"""Fault injection with real processes: kill -9 at random steps, SIGTERM to the launcher, a hung
worker, a busy port, a full disk, a read-only output directory, two runs on one --out.

Every fault ends the way the README promises: training resumes bit for bit, or the command
ends with exit status 2 and one ``error:`` line, with nothing the user had damaged and no
process left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dptrain.checkpoint import load
from tests.conftest import clean_env, launcher_workers, run_cli
from tests.integration.test_features import _wait_for, bitwise_equal, params

STEPS = 80
# One configuration for the reference, the kill -9 run and the SIGTERM run, so that all three
# must end with the same parameters: cnn has dropout, so every rank's RNG stream must resume.
ELASTIC = ["train", "--dataset", "synthetic", "--threads", "1", "--nproc", "2", "--model", "cnn",
           "--batch-size", "16", "--max-steps", str(STEPS), "--ckpt-every", "5",
           "--log-every", "1", "--quiet"]


def _popen(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dptrain", *args], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (distinguishes a reused pid), None if gone/zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in "ZX" else int(fields[19])


def _tree(pid: int) -> dict[int, int]:
    """Every live descendant of ``pid`` (workers, resource tracker) -> its start time."""
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                for child in (task / "children").read_text().split():
                    start = _start_time(int(child))
                    if start is not None:
                        found[int(child)] = start
                        todo.append(int(child))
    return found


def _workers(pid: int) -> list[int]:
    """The launcher's live worker processes (spawned, or forked from its fork server)."""
    return launcher_workers(pid)


def _still_running(tree: dict[int, int]) -> list[int]:
    return [p for p, start in tree.items() if _start_time(p) == start]


def _assert_no_orphans(tree: dict[int, int], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while _still_running(tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _still_running(tree), f"processes left behind: {_still_running(tree)}"


def _last_step(metrics: Path, since: float) -> int:
    """Highest training step logged at or after ``since`` (epoch seconds); -1 if none."""
    best = -1
    with contextlib.suppress(FileNotFoundError):
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line being written
                continue
            if "loss" in rec and rec["time"] >= since:
                best = max(best, rec["step"])
    return best


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted run of ELASTIC: the parameters every interrupted run must reach."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = run_cli(*ELASTIC, "--out", str(out), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return params(out)


# ------------------------------------------------------------------------ kill -9, SIGTERM
@pytest.mark.parametrize("kills", [3, pytest.param(10, marks=pytest.mark.extended)])
def test_kill_9_repeatedly_at_random_steps_then_bitwise_identical(tmp_path, reference, kills):
    """make test kills 3 times (the mechanism: each restart resumes bitwise); make test-all
    kills 10 times, the robustness issue's figure (~90 s)."""
    rng = random.Random(20240607)
    # increasing target steps, at least 4 apart, over the whole run
    base = sorted(rng.sample(range(2, 45), kills))
    targets = [b + 3 * i for i, b in enumerate(base)]
    out = tmp_path / "killed"
    proc = _popen(*ELASTIC, "--max-restarts", str(kills), "--out", str(out))
    seen: set[int] = set()  # every worker pid of earlier attempts
    killed_at: list[int] = []
    try:
        for target in targets:
            goal = max(target, killed_at[-1] + 3 if killed_at else 0)
            t0 = time.monotonic()
            attempt_seen_at = None
            while True:  # a new attempt (no pid seen before) that has trained past the goal
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.monotonic() - t0 < 90, f"no live attempt reached step {goal}"
                workers = _workers(proc.pid)
                if len(workers) == 2 and not seen & set(workers):
                    attempt_seen_at = attempt_seen_at or time.time()
                    step = _last_step(out / "metrics.jsonl", since=attempt_seen_at)
                    if step >= goal:
                        break
                time.sleep(0.02)
            victim = rng.choice(workers)
            assert _start_time(victim) is not None  # alive, of the current attempt
            os.kill(victim, signal.SIGKILL)
            killed_at.append(step)
            seen |= set(workers)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert len(set(killed_at)) == kills and killed_at == sorted(killed_at), killed_at
    summary = json.loads((out / "summary.json").read_text())
    assert summary["restarts"] == kills and summary["steps"] == STEPS
    assert summary["resumed_from"] is not None
    assert bitwise_equal(reference, params(out))


def test_sigterm_to_the_launcher_stops_cleanly_checkpoints_and_resumes_bitwise(
        tmp_path, reference):
    out = tmp_path / "pre"
    proc = _popen(*ELASTIC, "--out", str(out))
    try:
        t0 = time.time()
        while _last_step(out / "metrics.jsonl", t0) < 20:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        tree = _tree(proc.pid)
        assert len(_workers(proc.pid)) == 2
        proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert time.monotonic() - stopped_at < 15  # no 30 s wait for the agent's SIGKILL
    assert proc.returncode == 143, err[-3000:]
    # the workers' warning (on stderr, as warnings are), then the launcher's one line
    warned = [ln for ln in err.strip().splitlines() if ln.startswith("[rank 0] warning: stop "
                                                                      "requested (signal)")]
    lines = [ln for ln in err.strip().splitlines() if ln not in warned]
    assert len(warned) <= 1 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("stopped by SIGTERM"), err[-3000:]
    assert "--resume auto" in lines[0] and str(out) in lines[0]
    _assert_no_orphans(tree)
    ckpt = load(out / "checkpoints" / "last.pt")  # written by the workers on their way out
    assert 20 <= ckpt["position"]["step"] < STEPS
    assert f"step-{ckpt['position']['step']:08d}.pt" in lines[0]  # the message names it
    again = run_cli(*ELASTIC, "--resume", "auto", "--out", str(out), timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["resumed_from"].endswith(f"step-{ckpt['position']['step']:08d}.pt")
    assert bitwise_equal(reference, params(out))


def _listening(pids) -> dict[int, list[str]]:
    """pid -> the local addresses of its listening TCP sockets (from /proc, no tools needed)."""
    listen: dict[str, str] = {}  # socket inode -> address
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A":  # LISTEN
                listen[cols[9]] = cols[1].split(":")[0]
    found: dict[int, list[str]] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and link[8:-1] in listen:
                        found.setdefault(pid, []).append(listen[link[8:-1]])
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_a_single_node_run_listens_on_loopback_only_and_dies_with_its_launcher(tmp_path):
    out = tmp_path / "orphans"
    proc = _popen("train", "--dataset", "synthetic", "--threads", "1", "--nproc", "2",
                  "--model", "cnn", "--batch-size", "16", "--max-steps", "1000",
                  "--log-every", "1", "--quiet", "--out", str(out))
    try:
        t0 = time.time()
        while _last_step(out / "metrics.jsonl", t0) < 3:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        tree = _tree(proc.pid)
        workers = _workers(proc.pid)
        assert len(workers) == 2
        # the rendezvous store (hosted by the launcher) and gloo's connections (workers)
        sockets = _listening([proc.pid, *tree])
        assert proc.pid in sockets and set(workers) <= sockets.keys(), sockets
        assert all(a in LOOPBACK for addrs in sockets.values() for a in addrs), sockets
        proc.kill()  # no handler, no shutdown: the workers must notice on their own
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _assert_no_orphans(tree, within=15)
    steps = _last_step(out / "metrics.jsonl", 0)
    time.sleep(1)
    assert _last_step(out / "metrics.jsonl", 0) == steps < 1000  # nobody trains on


# ------------------------------------------------------------------------ a hung worker
def test_a_hung_worker_is_named_and_the_job_ends_within_30_s(tmp_path):
    proc = _popen("train", "--dataset", "synthetic", "--threads", "1", "--nproc", "2",
                  "--model", "faultplugins:hang_on_rank1", "--max-steps", "50",
                  "--timeout-s", "5", "--quiet", "--out", str(tmp_path / "hang"))
    started = time.monotonic()
    tree: dict[int, int] = {}
    while proc.poll() is None and time.monotonic() - started < 90:
        tree.update(_tree(proc.pid))  # collect every process it started, while they live
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate()
    elapsed = time.monotonic() - started
    assert elapsed < 35, f"the hung job took {elapsed:.0f} s to end"
    assert proc.returncode == 1, err[-3000:]
    first = err.splitlines()[0]
    assert first.startswith("error: rank 0 timed out"), err[-3000:]
    assert "waiting for rank 1, which hung" in first and "--timeout-s" in first
    # rank 0's traceback follows: gloo's timeout, or the shared-memory all-reduce's
    assert "worker rank 0" in err
    assert "Timed out" in err or "shared-memory all-reduce timed out after 5 s" in err
    assert len([p for p in tree if p != proc.pid]) >= 3  # two workers + resource tracker seen
    _assert_no_orphans(tree)


# ------------------------------------------------------------------------ a busy port
def test_a_busy_master_port_is_refused_before_any_worker_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("train", "--dataset", "synthetic", "--nproc", "2", "--max-steps", "3",
                    "--master-port", str(port), "--out", str(tmp_path / "run"), timeout=60)
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert f"--master-port {port} is already in use" in line
    assert "pick another --master-port" in line and "leave it at 0" in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ disk full
def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (instead of killing the process)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    args = ["train", "--dataset", "synthetic", "--threads", "1", "--model", "linear",
            "--ckpt-every", "5", "--log-every", "5", "--quiet", "--out", str(tmp_path / "run")]
    first = run_cli(*args, "--max-steps", "10", timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    before = _hashes(ckpts)
    assert {"step-00000010.pt", "last.pt"} <= before.keys()
    size = (ckpts / "last.pt").stat().st_size
    # continue the run with a file-size limit below one checkpoint, above everything else
    limit = size // 2
    assert limit > 16_000
    r = subprocess.run([sys.executable, "-m", "dptrain", *args, "--max-steps", "20",
                        "--resume", "auto"], capture_output=True, text=True, env=clean_env(),
                       timeout=120, preexec_fn=_file_size_limit(limit))
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_error_line(r.stderr)
    assert "cannot write checkpoint" in line and "step-00000015.pt" in line
    assert "File too large" in line and "ulimit -f" in line
    assert "earlier checkpoints are intact" in line
    assert _hashes(ckpts) == before  # nothing replaced, nothing half-written left behind
    state = load(ckpts / "last.pt")
    assert state["position"]["step"] == 10
    assert all(torch.isfinite(t).all() for t in state["model"].values())


# ------------------------------------------------------------------------ read-only --out
@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write into, not even root: immutable (chattr +i) where the
    filesystem supports it; as a non-root user, chmod 555 is enough."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "notes.txt").write_text("the user's file\n")
    if os.geteuid() != 0:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(ro)], capture_output=True
                                        ).returncode != 0:
        pytest.skip("running as root and this filesystem has no immutable flag (chattr +i): "
                    "no way to make a directory read-only for root here")
    try:
        yield ro
    finally:
        subprocess.run([chattr, "-i", str(ro)], check=True)


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_a_read_only_output_directory_is_an_error(read_only_dir, nproc):
    before = _hashes(read_only_dir)
    for out in (read_only_dir / "run", read_only_dir):  # a new run dir in it; the dir itself
        r = run_cli("train", "--dataset", "synthetic", "--nproc", nproc, "--max-steps", "3",
                    "--quiet", "--out", str(out), timeout=120)
        assert r.returncode == 2, r.stderr[-3000:]
        line = _one_error_line(r.stderr)
        assert str(out) in line and "choose a writable directory" in line
    assert _hashes(read_only_dir) == before
    assert sorted(p.name for p in read_only_dir.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------ one --out, two runs
def test_a_second_run_on_the_same_out_is_refused_and_the_first_is_not_mixed(tmp_path):
    out, gate = tmp_path / "shared", tmp_path / "gate"
    gate.touch()  # the first run trains (holding --out) until the gate is removed
    first = subprocess.Popen(
        [sys.executable, "-m", "dptrain", "train", "--dataset", "synthetic", "--threads", "1",
         "--model", "faultplugins:gated", "--batch-size", "32", "--max-steps", "100",
         "--log-every", "10", "--seed", "1", "--quiet", "--out", str(out)],
        env=clean_env(DPTRAIN_TEST_GATE=str(gate)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    others: list[subprocess.Popen] = []
    try:
        _wait_for(out / "metrics.jsonl", first)
        config_before = (out / "config.toml").read_bytes()
        # all at once, while the first one trains: a resume passes the "already holds a run"
        # check, so the lock must stop it, in one process and through the launcher (there
        # rank 0 of 2 holds it); so must a plain new run
        common = ["train", "--dataset", "synthetic", "--max-steps", "100", "--seed", "2",
                  "--quiet", "--out", str(out)]
        others = [_popen(*common, "--resume", "auto"),
                  _popen(*common, "--resume", "auto", "--nproc", "2"),
                  _popen(*common)]
        errors = [p.communicate(timeout=120)[1] for p in others]
        assert first.poll() is None
        gate.unlink()
        _, err = first.communicate(timeout=120)
    finally:
        gate.unlink(missing_ok=True)
        for p in (first, *others):
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, e in zip(others, errors):
        assert p.returncode == 2, e[-3000:]
    lines = [_one_error_line(e) for e in errors]
    assert f"in use by another running dptrain (pid {first.pid})" in lines[0]
    assert f"in use by another running dptrain (pid {first.pid})" in lines[1]
    # a plain new run: refused by the lock (the first run has not logged a step yet, so its
    # metrics.jsonl is still empty) or by the directory check
    assert (f"in use by another running dptrain (pid {first.pid})" in lines[2]
            or ("already holds a run" in lines[2] and "--resume auto" in lines[2]))
    assert first.returncode == 0, err[-3000:]
    assert (out / "config.toml").read_bytes() == config_before
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(10, 101, 10))  # one run's lines, in order, no repeats
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 1 and summary["steps"] == 100
