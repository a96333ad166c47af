"""launch(..., fast_exit=True): a worker whose function returned skips the interpreter
teardown, yet its result arrives, its atexit handlers run and its output is flushed; a result
torch cannot send still fails the worker (no false success). A worker that fails to start
(before its own code runs) is silent when its launcher is stopping or gone, and says why
otherwise."""

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


def _fail_to_start(unpickle: str) -> subprocess.CompletedProcess:
    """A worker forked from a fork server with dptrain's preload (SIGINT blocked, as
    prestart_workers starts it) runs ``unpickle`` while it unpickles its arguments, then fails:
    before any of its own code runs, as when its launcher removed a semaphore it needs."""
    code = textwrap.dedent(f"""
        import multiprocessing, signal
        from multiprocessing import resource_tracker

        class FailsToUnpickle:
            def __reduce__(self):
                return exec, ({unpickle + chr(10) + "1 / 0"!r},)

        if __name__ == "__main__":
            resource_tracker.ensure_running()  # as launch._sigint_blocked: it would unblock
            signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGINT}})
            multiprocessing.set_forkserver_preload(["dptrain._forkserver"])
            worker = multiprocessing.get_context("forkserver").Process(
                target=print, args=(FailsToUnpickle(),))
            worker.start()
            worker.join()
            print("worker exit", worker.exitcode)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT,
                          env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin"})


def test_a_worker_that_fails_to_start_while_its_launcher_stops_is_silent():
    # the terminal's Ctrl-C reached the worker too (pending: SIGINT is blocked until it runs)
    proc = _fail_to_start("import os, signal; os.kill(os.getpid(), signal.SIGINT)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "worker exit 1\n" and proc.stderr == ""


def test_a_worker_that_fails_to_start_after_its_launcher_died_is_silent():
    proc = _fail_to_start(
        "import os, signal, time, dptrain._forkserver as server; "
        "os.kill(server._LAUNCHER, signal.SIGKILL)\n"
        "deadline = time.monotonic() + 5\n"
        "while not server._launcher_stopping() and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)")
    assert proc.returncode == -9 and proc.stdout == "" and proc.stderr == "", proc.stderr


def test_a_worker_that_fails_to_start_otherwise_prints_why():  # the control
    proc = _fail_to_start("pass")
    assert proc.returncode == 0 and proc.stdout == "worker exit 1\n", proc.stderr
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().endswith(
        "ZeroDivisionError: division by zero")


def test_the_fork_server_and_its_workers_are_reaped_with_the_launcher():
    """Their CPU time counts among the launcher's children's (getrusage), as spawned workers'
    does (benchmarks that measure what else loads the machine read it there), and no orphan
    server is left."""
    inner = textwrap.dedent("""
        import resource
        from dptrain.launch import launch
        from tests.integration.workers import busy_worker
        workers = launch(busy_worker, (0.5,), nproc=2, fast_exit=True)
        me = resource.getrusage(resource.RUSAGE_SELF)
        print(sum(workers.values()) + me.ru_utime + me.ru_stime)
    """)
    outer = textwrap.dedent(f"""
        import resource, subprocess, sys
        run = subprocess.run([sys.executable, "-c", {inner!r}], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(run.stdout.split()[-1], kids.ru_utime + kids.ru_stime)
    """)
    proc = subprocess.run([sys.executable, "-c", outer], capture_output=True, text=True,
                          timeout=180, cwd=ROOT,
                          env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    workers_and_launcher, children = map(float, proc.stdout.split())
    assert workers_and_launcher > 1.0  # the two workers' 0.5 s each, at least
    assert children >= workers_and_launcher
