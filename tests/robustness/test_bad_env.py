"""Bad launcher environments, `dptrain slurm` input, a damaged metrics file, loopback down and
Ctrl-C (issue 17, items 4, 5, 7, 9): each ends with exit status 2 (130 for Ctrl-C) and exactly
one stderr line, no traceback, nothing the user had changed.

Most cases run ``cli.main`` in this process (fast); those that need a real environment or real
signals run ``python -m dptrain`` in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from dptrain import cli
from tests.conftest import DIST_VARS, clean_env, launcher_workers, run_cli

SYN = ["--dataset", "synthetic", "--max-steps", "2", "--quiet"]
TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}
SRUN = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0",
        "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_JOB_ID": "9"}


def one_error_line(code: int, stderr: str, *fragments: str, status: int = 2) -> str:
    assert code == status, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def _main(argv: list[str], env: dict[str, str], monkeypatch, capfd) -> tuple[int, str, str]:
    for key in [*DIST_VARS, "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"]:
        monkeypatch.delenv(key, raising=False)
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    code = cli.main(argv)
    captured = capfd.readouterr()
    return code, captured.err, captured.out


# ---------------------------------------------------------------------------- launcher env
ENV_CASES = {
    "rank-without-master": ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
                            ("MASTER_ADDR and MASTER_PORT are not", "launch with torchrun")),
    "rank-without-master-port": ({**TORCHRUN, "MASTER_PORT": None},
                                 ("MASTER_PORT is not", "a free port")),
    "master-port-out-of-range": ({**TORCHRUN, "MASTER_PORT": "70000"},
                                 ("MASTER_PORT='70000' is not a TCP port (1..65535)",)),
    "master-port-zero": ({**TORCHRUN, "MASTER_PORT": "0"}, ("MASTER_PORT='0' is not a TCP port",)),
    "master-port-not-an-integer": ({**TORCHRUN, "MASTER_PORT": "http"},
                                   ("MASTER_PORT='http' is not an integer",)),
    "master-addr-unresolvable": ({**TORCHRUN, "MASTER_ADDR": "no-such-host.invalid"},
                                 ("MASTER_ADDR 'no-such-host.invalid' cannot be resolved",
                                  "set it to the host name or IP address of rank 0's node")),
    "restart-count-not-an-integer": ({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "x"},
                                     ("TORCHELASTIC_RESTART_COUNT='x' is not a non-negative",)),
    "restart-count-negative": ({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "-1"},
                               ("TORCHELASTIC_RESTART_COUNT='-1'",)),
    "gloo-ifname-unknown": ({"GLOO_SOCKET_IFNAME": "nosuch0"},
                            ("GLOO_SOCKET_IFNAME='nosuch0': no network interface 'nosuch0'",
                             "set GLOO_SOCKET_IFNAME to one of them or unset it")),
    "nccl-ifname-unknown": ({**TORCHRUN, "NCCL_SOCKET_IFNAME": "ib"},
                            ("NCCL_SOCKET_IFNAME='ib': no network interface 'ib'",)),
    "slurm-nodelist-unclosed": ({**SRUN, "SLURM_STEP_NODELIST": "node[01-"},
                                ("SLURM_STEP_NODELIST='node[01-' is not a SLURM host list",
                                 "unbalanced brackets")),
    "slurm-nodelist-letters": ({**SRUN, "SLURM_STEP_NODELIST": "node[a-b]"},
                               ("SLURM_STEP_NODELIST='node[a-b]'", "range 'a-b' is not N or LO-HI")),
    "slurm-tasks-per-node": ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "x"},
                             ("SLURM_STEP_TASKS_PER_NODE='x' is not a SLURM task count list",)),
    "slurm-master-port": ({**SRUN, "MASTER_PORT": "99999"},
                          ("MASTER_PORT='99999' is not a TCP port",)),
    "slurm-first-host-unresolvable": ({**SRUN, "SLURM_STEP_NODELIST": "nosuchnode[1-2]"},
                                      ("the first host of SLURM_STEP_NODELIST 'nosuchnode1' "
                                       "cannot be resolved",)),
}


@pytest.mark.parametrize("name", list(ENV_CASES))
def test_bad_launcher_environment_is_one_error_line(name, tmp_path, monkeypatch, capfd):
    env, fragments = ENV_CASES[name]
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    code, err, _ = _main(["train", *SYN, "--data-root", str(tmp_path / "d"), "--out", str(out)],
                      {k: v for k, v in env.items() if v is not None}, monkeypatch, capfd)
    one_error_line(code, err, *fragments)
    assert time.monotonic() - start < 15  # not after a rendezvous timeout
    assert not out.exists() and not (tmp_path / "d").exists()


def test_bad_environment_in_a_real_process(tmp_path):
    """The same through ``python -m dptrain`` (nothing in this process masks a traceback)."""
    env = clean_env(**{**TORCHRUN, "MASTER_ADDR": "no-such-host.invalid"})
    start = time.monotonic()
    r = run_cli("train", *SYN, "--out", str(tmp_path / "out"), env=env, timeout=60, cwd=tmp_path)
    one_error_line(r.returncode, r.stderr, "MASTER_ADDR 'no-such-host.invalid' cannot be resolved")
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- loopback down
def _netns() -> str:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (a fresh network namespace has loopback down)")
    name = f"dptrain-lo-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    return name


def test_train_nproc_2_with_loopback_down_fails_at_once(tmp_path):
    ns = _netns()
    try:
        probe = subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", "lo"],
                               capture_output=True, text=True, timeout=30)
        assert "state DOWN" in probe.stdout, probe.stdout
        start = time.monotonic()
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "dptrain", "train",
                            "--nproc", "2", *SYN, "--data-root", str(tmp_path / "d"),
                            "--out", str(tmp_path / "out")],
                           capture_output=True, text=True, env=clean_env(), timeout=120,
                           cwd=tmp_path)
        elapsed = time.monotonic() - start
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    one_error_line(r.returncode, r.stderr, "cannot open a TCP connection to 127.0.0.1",
                   "Network is unreachable", "loopback network interface is probably down",
                   "ip link set lo up")
    assert "Bad file descriptor" not in r.stderr
    assert elapsed < 25  # was: the rendezvous timeout (300 s by default), then a traceback
    assert not (tmp_path / "out").exists()


def test_loopback_ok_inside_a_namespace_with_loopback_down():
    ns = _netns()
    try:
        code = ("from dptrain.dist import loopback_ok; import sys; why = loopback_ok(); "
                "print(why); sys.exit(0 if why else 1)")
        down = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                              capture_output=True, text=True, env=clean_env(), timeout=60)
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True,
                       timeout=30)
        up = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                            capture_output=True, text=True, env=clean_env(), timeout=60)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    assert down.returncode == 0 and "Network is unreachable" in down.stdout, down.stderr
    assert up.returncode == 1 and up.stdout.strip() == "None", up.stderr


# ---------------------------------------------------------------------------- dptrain slurm
def test_slurm_output_is_a_directory(tmp_path, monkeypatch, capfd):
    (tmp_path / "jobs").mkdir()
    code, err, _ = _main(["slurm", "-o", str(tmp_path / "jobs")], {}, monkeypatch, capfd)
    one_error_line(code, err, f"-o {tmp_path / 'jobs'} is a directory",
                   f"-o {tmp_path / 'jobs' / 'job.sbatch'}")
    assert list((tmp_path / "jobs").iterdir()) == []


def test_slurm_output_in_a_missing_directory(tmp_path, monkeypatch, capfd):
    code, err, _ = _main(["slurm", "-o", str(tmp_path / "no" / "job.sh")], {}, monkeypatch, capfd)
    one_error_line(code, err, f"directory {tmp_path / 'no'} does not exist")
    assert not (tmp_path / "no").exists()


def test_slurm_never_overwrites_a_file_it_did_not_write(tmp_path, monkeypatch, capfd):
    mine = tmp_path / "job.sh"
    mine.write_text("#!/bin/bash\necho my own script\n")
    code, err, _ = _main(["slurm", "-o", str(mine)], {}, monkeypatch, capfd)
    one_error_line(code, err, "already exists and is not a script `dptrain slurm` wrote")
    assert mine.read_text() == "#!/bin/bash\necho my own script\n"
    # its own script is regenerated in place
    ours = tmp_path / "ours.sh"
    assert _main(["slurm", "-o", str(ours)], {}, monkeypatch, capfd)[0] == 0
    assert _main(["slurm", "--nodes", "2", "-o", str(ours)], {}, monkeypatch, capfd)[0] == 0
    assert "#SBATCH --nodes=2" in ours.read_text() and os.access(ours, os.X_OK)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.sh", "ours.sh"]  # no temporaries


@pytest.mark.parametrize("argv, fragments", [
    (["--", "--lr", "-5"], ("--lr must be positive", "after --, in the arguments for "
                                                      "`dptrain train`")),
    (["--", "--lr", "abc"], ("argument --lr: invalid float value: 'abc'", "after --")),
    (["--", "--no-such-flag"], ("unrecognized arguments: --no-such-flag", "after --")),
    (["--", "--model", "nosuchmodel"], ("after --",)),
    (["--", "--nproc", "2"], ("--nproc (after --", "use `dptrain slurm --procs-per-node`")),
    (["--", "--print-config"], ("--print-config (after --",)),
    (["--time", "abc"], ("--time 'abc' is not a SLURM time limit", "HH:MM:SS")),
    (["--time", "1:75:00"], ("--time '1:75:00' has a field out of range",)),
    (["--time", "2-30"], ("--time '2-30' has a field out of range",)),
    (["--job-name", "two words"], ("--job-name 'two words' must be one word",)),
])
def test_slurm_bad_input(argv, fragments, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "job.sh"
    code, err, _ = _main(["slurm", "-o", str(script), *argv], {}, monkeypatch, capfd)
    one_error_line(code, err, *fragments)
    assert list(tmp_path.iterdir()) == []  # no script, no run directory


@pytest.mark.parametrize("time_limit", ["30", "30:00", "01:30:00", "2-00", "2-12:30",
                                        "2-12:30:15", "UNLIMITED"])
def test_slurm_good_time_formats(time_limit, monkeypatch, capfd):
    code, _, out = _main(["slurm", "--time", time_limit], {}, monkeypatch, capfd)
    assert code == 0
    assert f"#SBATCH --time={time_limit}\n" in out


def _srun_line(script: str) -> tuple[str, str]:
    omp = next(ln for ln in script.splitlines() if ln.startswith("export OMP_NUM_THREADS="))
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    return omp, srun


def test_slurm_threads_after_double_dash_once_and_for_openmp_too(monkeypatch, capfd):
    code, _, out = _main(["slurm", "--cpus-per-task", "2", "--", "--threads", "4", "--model",
                          "linear"], {}, monkeypatch, capfd)
    assert code == 0
    omp, srun = _srun_line(out)
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0
    assert omp == "export OMP_NUM_THREADS=4"
    assert srun.split().count("--threads") == 1 and srun.endswith("train --threads 4 --model "
                                                                  "linear")
    # without it: the CPUs per task, for both
    code, _, out = _main(["slurm", "--cpus-per-task", "3", "--", "--model", "linear"], {},
                         monkeypatch, capfd)
    omp, srun = _srun_line(out)
    assert omp == "export OMP_NUM_THREADS=3" and srun.split().count("--threads") == 1
    assert "--threads 3 --model linear" in srun


def test_slurm_threads_from_a_config_file_are_not_overridden(tmp_path, monkeypatch, capfd):
    config = tmp_path / "c.toml"
    config.write_text("threads = 5\n")
    code, err, out = _main(["slurm", "--cpus-per-task", "2", "--", "--config", str(config)],
                           {}, monkeypatch, capfd)
    assert code == 0, err
    omp, srun = _srun_line(out)
    assert omp == "export OMP_NUM_THREADS=5" and "--threads" not in srun


# ---------------------------------------------------------------------------- plot
def test_plot_refuses_a_damaged_metrics_file_with_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    content = '{"step": 1, "loss": 1.0}\nnot json at all\n{"step": 2, "loss": 0.5}\n'
    (run / "metrics.jsonl").write_text(content)
    r = run_cli("plot", str(run), timeout=60, cwd=tmp_path)
    one_error_line(r.returncode, r.stderr, "metrics.jsonl:2: not valid JSON")
    assert (run / "metrics.jsonl").read_text() == content
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


# ---------------------------------------------------------------------------- Ctrl-C
def _group_gone(pgid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("moment", ["workers-starting", "training"])
def test_ctrl_c_during_train_nproc_2_is_one_line_and_130(moment, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C: as the workers start (where
    their KeyboardInterrupt tracebacks used to leak) or while they train."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dptrain", "train", "--nproc", "2", "--dataset", "synthetic",
         "--data-root", str(tmp_path / "d"), "--epochs", "1000", "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
        cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            workers = launcher_workers(proc.pid)
            if moment == "workers-starting" and len(workers) >= 2:
                break
            if moment == "training" and (out / "config.toml").exists():
                time.sleep(0.5)
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "stopped by SIGINT" in lines[0] or lines[0] == "error: interrupted", stderr
    assert _group_gone(proc.pid, 15), "a worker outlived the launcher"
