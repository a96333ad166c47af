"""launch(..., fast_exit=True): a worker whose function returned skips the interpreter
teardown, yet its result arrives, its atexit handlers run and its output is flushed; a result
torch cannot send still fails the worker (no false success)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _launch(tmp_path: Path, picklable: bool, fast: bool = True) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        from dptrain.launch import launch, WorkerFailure
        from tests.integration.workers import exiting_worker
        try:
            print(sorted(launch(exiting_worker, ({str(tmp_path)!r}, {picklable}), nproc=2,
                                fast_exit={fast}).items()))
        except WorkerFailure as exc:
            print("WorkerFailure", exc.exit_code)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180, cwd=ROOT,
                          env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin"})


def test_results_arrive_atexit_handlers_run_and_output_is_flushed(tmp_path):
    proc = _launch(tmp_path, picklable=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("[(0, {'rank': 0}), (1, {'rank': 1})]\n")
    assert "<unflushed 0>" in proc.stdout and "<unflushed 1>" in proc.stdout
    assert [(tmp_path / f"atexit-{r}").read_text() for r in (0, 1)] == ["ran", "ran"]
    assert not list(tmp_path.glob("teardown-*"))  # the interpreter teardown was skipped


def test_without_fast_exit_the_teardown_runs(tmp_path):  # the control: the probe works
    proc = _launch(tmp_path, picklable=True, fast=False)
    assert proc.stdout.endswith("[(0, {'rank': 0}), (1, {'rank': 1})]\n"), proc.stderr
    assert sorted(p.name for p in tmp_path.glob("teardown-*")) == ["teardown-0", "teardown-1"]


def test_a_result_torch_cannot_send_still_fails_the_workers(tmp_path):
    proc = _launch(tmp_path, picklable=False)
    assert proc.stdout.endswith("WorkerFailure 1\n"), proc.stderr


def _env_launch(tmp_path: Path, **env: str) -> str:
    code = textwrap.dedent("""
        import os
        from dptrain.launch import launch, prestart_workers
        from tests.integration.workers import env_worker
        prestart_workers()  # the server starts with this environment...
        os.environ["DPTRAIN_T_LATE"] = "set after the server started"  # ...then it changes
        del os.environ["DPTRAIN_T_GONE"]
        names = ["DPTRAIN_T_EARLY", "DPTRAIN_T_LATE", "DPTRAIN_T_GONE", "GLOO_SOCKET_IFNAME"]
        print(sorted(launch(env_worker, (names,), nproc=2, fast_exit=True).items()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180, cwd=ROOT,
                          env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin",
                               "DPTRAIN_T_EARLY": "e", "DPTRAIN_T_GONE": "g", **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()[-1]


def test_workers_fork_from_the_server_with_the_launcher_s_environment_at_launch(tmp_path):
    view = {"env": {"DPTRAIN_T_EARLY": "e", "DPTRAIN_T_LATE": "set after the server started",
                    "DPTRAIN_T_GONE": None, "GLOO_SOCKET_IFNAME": "lo"},
            "forked_from_server": True}
    assert _env_launch(tmp_path) == str([(0, view), (1, view)])


def test_dptrain_no_fast_exit_spawns_the_workers(tmp_path):
    view = {"env": {"DPTRAIN_T_EARLY": "e", "DPTRAIN_T_LATE": "set after the server started",
                    "DPTRAIN_T_GONE": None, "GLOO_SOCKET_IFNAME": "lo"},
            "forked_from_server": False}
    assert _env_launch(tmp_path, DPTRAIN_NO_FAST_EXIT="1") == str([(0, view), (1, view)])
