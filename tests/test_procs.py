"""Leftover files named by their creator (pid namespace + pid): only a dead creator's, in our
namespace and with our prefix, are swept."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import time
from pathlib import Path

from dptrain import procs
from dptrain.procs import pid_alive, pid_namespace, stamped_path, sweep_dead


def test_only_files_of_dead_creators_in_our_namespace_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ns = pid_namespace()
    names = {
        "dead": f"dptrain-x-{ns}-{dead}-ab12",
        "dead_tmp": f"dptrain-x-{ns}-{dead}-ab12.tmp",
        "mine": os.path.basename(stamped_path(str(tmp_path), "dptrain-x-")),
        "other_ns": f"dptrain-x-{ns}9-{dead}-ab12",
        "other_prefix": f"dptrain-y-{ns}-{dead}-ab12",
    }
    for name in names.values():
        (tmp_path / name).write_text("x")
    assert sweep_dead(str(tmp_path), "dptrain-x-") == [str(tmp_path / names["dead"])]
    assert sweep_dead(str(tmp_path), "dptrain-x-", suffix=".tmp") == [
        str(tmp_path / names["dead_tmp"])]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("mine", "other_ns", "other_prefix"))
    assert names["mine"].startswith(f"dptrain-x-{ns}-{os.getpid()}-")
    assert sweep_dead(str(tmp_path / "missing"), "dptrain-x-") == []


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def test_pid_alive_a_zombie_and_a_gone_pid_are_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{child.pid}/stat")
    deadline = time.monotonic() + 30
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # exited, not yet reaped
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert pid_alive(os.getppid()) and not pid_alive(child.pid)
    child.wait()
    assert not pid_alive(child.pid) and not pid_alive(_dead_pid())


def test_pid_alive_without_proc_asks_the_kernel(monkeypatch):
    """Where there is no /proc (macOS) a missing /proc/<pid>/stat says nothing of the pid."""
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(procs.os.path, "isdir", lambda path: path != "/proc/self")
    assert pid_alive(os.getppid())
    assert not pid_alive(_dead_pid())
