"""cli.exit_now: the dptrain command skips the interpreter teardown but keeps what a normal
exit does that matters (atexit handlers, flushed output, the exit status)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})


def test_exit_now_runs_atexit_flushes_and_keeps_the_status(tmp_path):
    marker = tmp_path / "atexit-ran"
    proc = _run(f"""
        import atexit, sys, torch
        from dptrain.cli import exit_now
        atexit.register(lambda: open({str(marker)!r}, "w").write("yes"))
        sys.stdout.write("unflushed output")  # no newline: still in the buffer
        exit_now(3)
        print("never reached")
    """)
    assert proc.returncode == 3
    assert proc.stdout == "unflushed output"
    assert marker.read_text() == "yes"


def test_a_running_non_daemon_thread_gets_a_normal_exit(tmp_path):
    done = tmp_path / "thread-finished"
    proc = _run(f"""
        import threading, time, torch
        from dptrain.cli import exit_now
        def work():
            time.sleep(0.5)
            open({str(done)!r}, "w").write("done")
        threading.Thread(target=work).start()
        exit_now(0)
    """)
    assert proc.returncode == 0, proc.stderr
    assert done.read_text() == "done"  # os._exit would have cut the thread short


def test_python_m_dptrain_exit_statuses(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "dptrain", "train", "--lr", "-1", "--out",
                          str(tmp_path / "r")], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and bad.stderr.startswith("error: --lr must be positive")
    assert not (tmp_path / "r").exists()


def test_under_a_profiler_the_exit_is_normal_and_the_profile_is_written(tmp_path):
    prof = tmp_path / "p.out"
    proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "dptrain",
                           "train", "--lr", "-1", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert proc.stderr.startswith("error: --lr must be positive")  # (cProfile drops the status)
    assert prof.stat().st_size > 0  # cProfile writes after the module returns


def test_dptrain_run_keeps_the_teardown_for_the_user_s_open_files(tmp_path):
    # a user's script that never closes its file: the normal teardown flushes it
    out = tmp_path / "out.txt"
    script = tmp_path / "user.py"
    script.write_text(f"import torch\nf = open({str(out)!r}, 'w')\nf.write('result line\\n')\n")
    proc = subprocess.run([sys.executable, "-m", "dptrain", "run", str(script)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "result line\n"


def test_the_fork_server_starts_early_only_for_commands_that_launch_workers(monkeypatch):
    from dptrain import cli, launch

    calls: list[int] = []
    monkeypatch.setattr(launch, "prestart_workers", lambda: calls.append(1))
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    cases = {("train", "--nproc", "2"): 1, ("train", "--nproc=auto"): 1, ("bench",): 1,
             ("verify", "--nproc", "3"): 1, ("train",): 0, ("train", "--nproc", "1"): 0,
             ("train", "--nproc", "2", "--help"): 0, ("predict", "--nproc", "2"): 0, (): 0}
    seen = {}
    for argv, _ in cases.items():
        calls.clear()
        cli._prestart_workers(list(argv))
        seen[argv] = len(calls)
    assert seen == cases
    monkeypatch.setenv("RANK", "0")  # under torchrun this process is a worker itself
    calls.clear()
    cli._prestart_workers(["train", "--nproc", "2"])
    assert calls == []


def test_the_fork_server_s_imports_never_touch_cuda():
    # a CUDA driver initialised in the fork server would break CUDA in every forked worker
    proc = _run("""
        import torch
        calls = []
        torch.cuda.is_available = lambda: calls.append("is_available") or False
        torch.cuda.device_count = lambda: calls.append("device_count") or 0
        torch.cuda._lazy_init = lambda: calls.append("_lazy_init")
        from dptrain.launch import WORKER_PRELOAD
        for name in WORKER_PRELOAD:
            __import__(name)
        print(len(WORKER_PRELOAD), calls)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "7 []"


def test_the_command_freezes_its_start_up_imports_and_collects_garbage_while_it_runs(tmp_path):
    """console() pauses the collector for the start-up's imports (two full collections of
    torch's objects, with nothing to free), then freezes them and turns it back on before
    the command runs; the library entry main() leaves the collector alone."""
    import json

    probe = tmp_path / "gc.json"
    args = ["train", "--dataset", "synthetic", "--model", "myplugins:gc_probe", "--max-steps",
            "1", "--no-eval-every-epoch", "--quiet"]
    env = {"PYTHONPATH": f"{SRC}:{Path(__file__).parent / 'plugins'}", "PATH": "/usr/bin:/bin",
           "GC_PROBE": str(probe)}
    cmd = subprocess.run([sys.executable, "-m", "dptrain", *args, "--out", str(tmp_path / "a")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert cmd.returncode == 0, cmd.stderr
    seen = json.loads(probe.read_text())
    assert seen["enabled"] is True and seen["frozen"] > 10_000  # torch's objects, frozen
    lib = subprocess.run([sys.executable, "-c", "import sys; from dptrain.cli import main; "
                          "sys.exit(main(sys.argv[1:]))", *args, "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert lib.returncode == 0, lib.stderr
    assert json.loads(probe.read_text()) == {"enabled": True, "frozen": 0}
