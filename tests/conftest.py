"""Shared fixtures. Tests mirror src/: unit tests need no process group; tests/integration/
runs real gloo groups on 127.0.0.1 and real launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as tdist

from dptrain import cli

ROOT = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture(autouse=True)
def _no_leaks():
    """Fail a test that leaks launcher variables or an initialised process group."""
    before = {k: os.environ.get(k) for k in DIST_VARS}
    yield
    leaked = [k for k in DIST_VARS if os.environ.get(k) != before[k]]
    for k in leaked:
        if before[k] is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = before[k]
    initialised = tdist.is_available() and tdist.is_initialized()
    if initialised:
        tdist.destroy_process_group()
    assert not leaked, f"test leaked environment variables {leaked}"
    assert not initialised, "test leaked an initialised process group"


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without launcher variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in DIST_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests" / "plugins"),
                                         env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def launcher_workers(pid: int) -> list[int]:
    """The live worker processes of the dptrain launcher ``pid``: its spawned children, or the
    children of its fork server (dptrain's own commands fork their workers from it); neither
    the resource tracker nor the fork server itself. Tolerant of processes that exit while
    /proc is read (restarts)."""

    def children(p: int) -> list[int]:
        found: list[int] = []
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            return found
        for task in tasks:
            try:
                found += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the thread ended while we looked
                continue
        return found

    def read(p: int, name: str) -> bytes:
        try:
            return Path(f"/proc/{p}/{name}").read_bytes()
        except OSError:  # the process exited while we looked
            return b""

    def live(p: int) -> bool:
        stat = read(p, "stat")
        return bool(stat) and stat[stat.rindex(b")") + 2:][:1] not in b"ZX"

    out = []
    for child in children(pid):
        cmdline = read(child, "cmdline")
        if b"spawn_main" in cmdline and live(child):
            out.append(child)
        elif b"forkserver" in cmdline:
            out += [w for w in children(child) if live(w)]
    return sorted(out)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
            cwd: Path | None = None, module: str = "dptrain") -> subprocess.CompletedProcess:
    """``python -m dptrain ARGS`` in a fresh process; output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env or clean_env(), timeout=timeout, cwd=cwd)


def train_inproc(out: Path, *args: str) -> dict:
    """``dptrain train`` in this process (fast: no interpreter start); returns summary.json."""
    code = cli.main(["train", "--out", str(out), "--quiet", *args])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    """Flags for a small, quick synthetic run."""
    return ["--dataset", "synthetic", "--data-root", str(tmp_path / "data")]


sys.path.insert(0, str(ROOT / "tests" / "plugins"))  # user plug-ins for the in-process tests
