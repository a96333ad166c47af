"""``dptrain doctor``: each check on its own, the report, --json and the exit status."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket

import pytest
import torch
import torch.distributed as tdist

from dptrain import doctor
from dptrain.cli import Parser
from dptrain.doctor import Check

NAMES = [
    "versions",
    "extras",
    "cuda",
    "backends",
    "cpu",
    "isa",
    "matmul_peak",
    "cpu_heap",
    "shared_memory",
    "loopback_port",
    "default_port",
    "network",
    "hostname",
    "launcher_env",
    "slurm",
    "data",
]


@pytest.fixture
def no_launcher_env(monkeypatch):
    """A shell without launcher variables, as on a developer machine."""
    for key in list(os.environ):
        if key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE") or key.startswith(
            "SLURM_"
        ):
            monkeypatch.delenv(key)


def test_all_checks_run_with_valid_statuses(no_launcher_env):
    results = doctor.run_checks()
    assert [c.name for c in results] == NAMES
    for c in results:
        assert c.status in ("ok", "warn", "fail"), c
        assert c.detail and "\n" not in c.detail and "\n" not in c.advice
        if c.status != "ok":
            assert c.advice, f"{c.name} is {c.status} without advice"
    assert doctor.exit_code(results) == 0  # this machine can train
    text = doctor.format_text(results)
    assert text.splitlines()[0].startswith("[ok] versions: dptrain ")
    assert text.splitlines()[-1].startswith("training can run here")


def test_json_report_and_exit_code(no_launcher_env, capsys):
    assert doctor.cmd_doctor(argparse.Namespace(json=True)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["exit_code"] == 0
    assert list(report["checks"]) == NAMES
    assert report["checks"]["versions"]["facts"]["torch"] == torch.__version__
    cpu = report["checks"]["cpu"]["facts"]
    assert cpu["cpu_count"] == os.cpu_count()
    assert cpu["usable_cores"] == len(os.sched_getaffinity(0))
    assert cpu["torch_threads"] == torch.get_num_threads()
    assert report["checks"]["backends"]["facts"]["gloo"] is True
    assert sum(report["counts"].values()) == len(NAMES)


def test_text_report_exit_code(no_launcher_env, capsys):
    assert doctor.cmd_doctor(argparse.Namespace(json=False)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(("[ok] ", "[warn] ", "[fail] ")) for line in lines) == len(NAMES)


def test_loopback_port_is_free_here():
    c = doctor.check_loopback_port()
    assert c.status == "ok" and 0 < c.facts["port"] < 65536 and c.facts["ok"] is True
    assert doctor._loopback_tcp("127.0.0.1") is None  # the local copy of the check agrees


class _NoConnect(socket.socket):
    """A socket whose connect fails as it does with the loopback interface down."""

    def connect(self, address):
        raise OSError(101, "Network is unreachable")


def test_loopback_down_means_training_cannot_run(monkeypatch, no_launcher_env):
    monkeypatch.setattr(socket, "socket", _NoConnect)
    why = doctor._loopback_tcp("127.0.0.1")
    assert why == "cannot open a TCP connection to 127.0.0.1 on this machine (Network is " \
        "unreachable)"
    c = doctor.check_loopback_port()
    assert c.status == "fail" and "Network is unreachable" in c.detail
    assert "ip link set lo up" in c.advice and c.facts["ok"] is False
    results = doctor.run_checks((doctor.check_versions, doctor.check_loopback_port))
    assert doctor.exit_code(results) == 1
    last = doctor.format_text(results).splitlines()[-1]
    assert not last.startswith("training can run") and "training cannot run here" in last


def test_loopback_uses_dist_check_when_present(monkeypatch):
    from dptrain import dist

    monkeypatch.setattr(dist, "loopback_ok", lambda host: f"{host}: refused", raising=False)
    c = doctor.check_loopback_port()
    assert (c.status, c.detail) == ("fail", "127.0.0.1: refused")
    monkeypatch.setattr(doctor, "_torch", lambda: None)  # torch broken: the local check runs
    assert doctor.check_loopback_port().status == "ok"


XEON = "model name\t: Intel Xeon 8488C\nflags\t: avx2 fma avx512f avx512_bf16 amx_tile amx_bf16\n"
EPYC = "model name\t: AMD EPYC\nflags\t: avx avx2 fma\n"


def _cpu(monkeypatch, text):
    from dptrain import hardware

    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: hardware.parse_cpuinfo(text))
    monkeypatch.setattr(hardware, "_info", None)


def test_isa_names_the_features_that_matter(monkeypatch):
    _cpu(monkeypatch, XEON)
    c = doctor.check_isa()
    assert c.status == "ok" and c.advice == ""
    assert c.detail.startswith("Intel Xeon 8488C: AVX2, AVX-512, AVX512-BF16, AMX-BF16; ATen ")
    assert c.detail.endswith("bf16 runs natively (oneDNN)")
    assert c.facts["native_bf16"] is True and "amx_bf16" in c.facts["flags"]
    _cpu(monkeypatch, EPYC)
    c = doctor.check_isa()
    assert c.detail.startswith("AMD EPYC: AVX2, no AVX-512, no AVX512-BF16, no AMX; ")
    assert c.facts["native_bf16"] is False and "--precision 32" in c.advice
    monkeypatch.setattr(doctor.platform, "machine", lambda: "x86_64")
    _cpu(monkeypatch, "model name\t: old\nflags\t: sse2\n")
    assert doctor.check_isa().status == "warn"


def test_matmul_peak_is_measured(monkeypatch):
    from dptrain import hardware

    rates = {"fp32": 2e11, "bf16": 7e11}
    monkeypatch.setattr(hardware, "measure_matmul", lambda name, **kw: {
        "flops": rates[name], "size": 2048})
    monkeypatch.setattr(hardware, "native_bf16", lambda: True)
    c = doctor.check_matmul_peak()
    assert c.status == "ok" and c.advice == ""
    assert "fp32 200.0 GFLOP/s (n=2048), bf16 700.0 GFLOP/s (n=2048) = 3.5x fp32" in c.detail
    assert c.facts["cpu"]["bf16"]["flops"] == 7e11
    rates["bf16"] = 1e11  # native bf16 slower than fp32: something disables AMX
    c = doctor.check_matmul_peak()
    assert c.status == "warn" and "ONEDNN_MAX_CPU_ISA" in c.advice
    monkeypatch.setattr(hardware, "native_bf16", lambda: False)
    rates["bf16"] = 1e9  # emulated, as on an AVX2-only CPU
    c = doctor.check_matmul_peak()
    assert c.status == "ok" and "keep --precision 32" in c.advice and "0.005x fp32" in c.detail


def test_matmul_peak_for_real():
    c = doctor.check_matmul_peak(seconds=0.05)
    assert c.facts["cpu"]["fp32"]["flops"] > 1e8 and c.facts["cpu"]["bf16"]["flops"] > 1e6


def test_busy_default_port_warns():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        c = doctor.check_default_port(port)
    assert (c.status, c.facts) == ("warn", {"port": port, "free": False})
    assert "--master-port" in c.advice


def test_launcher_env_problem_is_a_failure(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    c = doctor.check_launcher_env()
    assert c.status == "fail"
    assert "rank 5" in c.detail and "outside world size 2" in c.detail
    assert doctor.exit_code(doctor.run_checks((doctor.check_launcher_env,))) == 1


def test_launcher_env_torchrun_and_alone():
    c = doctor.check_launcher_env(
        {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    )
    assert c.status == "ok" and "torchrun: rank 1 of 2" in c.detail
    assert c.facts["master_port"] == 1234
    assert doctor.check_launcher_env({}).facts["source"] == "none"


def test_gloo_missing_fails(monkeypatch):
    monkeypatch.setattr(tdist, "is_gloo_available", lambda: False)
    c = doctor.check_backends()
    assert c.status == "fail" and c.facts["gloo"] is False


def test_torch_import_failure_fails(monkeypatch):
    real = importlib.import_module

    def broken(name, *args):
        if name == "torch":
            raise OSError("libtorch_cpu.so: cannot open shared object file")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    monkeypatch.setattr(doctor, "_torch", lambda: None)
    results = doctor.run_checks((doctor.check_versions, doctor.check_cuda, doctor.check_cpu))
    assert [c.status for c in results] == ["fail", "fail", "ok"]
    assert "cannot import torch (OSError" in results[0].detail
    assert results[2].facts["torch_threads"] is None
    assert doctor.exit_code(results) == 1


def test_parse_ip_addr():
    text = (
        "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n"
        "3: eth0@if12    inet 10.1.2.3/24 brd 10.1.2.255 scope global eth0\\ ...\n"
        "garbage\n"
    )
    assert doctor.parse_ip_addr(text) == [("lo", "127.0.0.1"), ("eth0", "10.1.2.3")]


def test_network_checks_socket_ifname(monkeypatch):
    found = [("lo", "127.0.0.1"), ("ens5", "10.0.0.7")]
    monkeypatch.setattr(doctor, "interfaces", lambda: (found, "ip"))
    c = doctor.check_network({})
    assert c.status == "ok" and "GLOO_SOCKET_IFNAME=ens5" in c.advice
    assert doctor.check_network({"GLOO_SOCKET_IFNAME": "ens5"}).advice == ""
    bad = doctor.check_network({"GLOO_SOCKET_IFNAME": "eth0"})
    assert bad.status == "fail" and "no interface eth0" in bad.detail and "ens5" in bad.advice
    assert doctor.check_network({"NCCL_SOCKET_IFNAME": "ib"}).status == "warn"
    assert doctor.check_network({"NCCL_SOCKET_IFNAME": "en"}).status == "ok"  # a prefix
    assert doctor.check_network({"NCCL_SOCKET_IFNAME": "^docker"}).status == "ok"
    monkeypatch.setattr(doctor, "interfaces", lambda: ([("lo", "127.0.0.1")], "ip"))
    assert doctor.check_network({}).status == "warn"


def test_hostname_resolving_to_loopback_warns(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "127.0.1.1")
    c = doctor.check_hostname()
    assert c.status == "warn" and "127.0.1.1" in c.detail and "--master-addr" in c.advice
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "10.0.0.7")
    assert doctor.check_hostname().status == "ok"

    def unknown(host):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "gethostbyname", unknown)
    assert doctor.check_hostname().status == "warn"


def test_data_presence(tmp_path):
    env = {"DPTRAIN_DATA": str(tmp_path)}
    c = doctor.check_data(env)
    assert c.status == "warn" and "dptrain data fetch mnist" in c.advice
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"")
    (raw / "train-labels-idx1-ubyte").write_bytes(b"")
    c = doctor.check_data(env)
    assert c.status == "warn" and "2 of 4" in c.detail
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"")
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    c = doctor.check_data(env)
    assert c.status == "ok" and len(c.facts["present"]) == 4
    afile = tmp_path / "afile"
    afile.write_text("x")
    c = doctor.check_data({"DPTRAIN_DATA": str(afile)})
    assert c.status == "fail" and "($DPTRAIN_DATA) is not a directory" in c.detail
    assert "fetch" not in c.advice and "point DPTRAIN_DATA" in c.advice


def test_slurm_detection(monkeypatch):
    monkeypatch.setattr(doctor.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    assert "not inside a job" in doctor.check_slurm({}).detail
    c = doctor.check_slurm({"SLURM_JOB_ID": "77"})
    assert c.facts["job_id"] == "77" and "start ranks with srun" in c.detail
    c = doctor.check_slurm({"SLURM_JOB_ID": "77", "SLURM_STEP_NUM_TASKS": "4"})
    assert c.facts["step"] is True and "step of 4 task(s)" in c.detail


def test_crashing_check_becomes_a_warning():
    def check_boom() -> Check:
        raise RuntimeError("boom")

    (c,) = doctor.run_checks((check_boom,))
    assert (c.name, c.status) == ("boom", "warn") and "RuntimeError: boom" in c.detail


def test_check_rejects_unknown_status():
    with pytest.raises(ValueError, match="status must be one of"):
        Check("x", "bad", "detail")  # type: ignore[arg-type]


def test_parser_registration():
    parser = Parser(prog="dptrain")
    doctor.add_parser(parser.add_subparsers(dest="command", parser_class=Parser))
    args = parser.parse_args(["doctor", "--json"])
    assert args.json is True and args.func is doctor.cmd_doctor
    assert parser.parse_args(["doctor"]).json is False


def test_cuda_gpus_listed(monkeypatch):
    from types import SimpleNamespace

    props = SimpleNamespace(name="NVIDIA H100", total_memory=80 * 2**30, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    c = doctor.check_cuda()
    assert c.status == "ok"
    assert c.detail == (
        "CUDA 12.8, 2 GPU(s): 0: NVIDIA H100 (80.0 GiB, sm_90); 1: NVIDIA H100 (80.0 GiB, sm_90)"
    )
    assert c.facts["gpus"][1] == {
        "index": 1,
        "name": "NVIDIA H100",
        "memory_gib": 80.0,
        "capability": "9.0",
    }
    monkeypatch.setattr(tdist, "is_nccl_available", lambda: False)
    assert doctor.check_backends().status == "warn"  # GPUs but no NCCL: slow gloo fallback


def test_gpu_invisible_to_torch_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doctor.shutil, "which", lambda tool: "/usr/bin/nvidia-smi")
    c = doctor.check_cuda()
    assert c.status == "warn" and "torch sees no GPU" in c.detail


def test_cpu_heap_names_glibc_and_the_malloc_variables_tuned_overrides(monkeypatch):
    from dptrain import heap

    monkeypatch.setattr(heap, "glibc_version", lambda: "2.36")
    c = doctor.check_cpu_heap({"PATH": "/bin"})
    assert c.status == "ok" and "glibc 2.36" in c.detail and "--cpu-heap tuned" in c.detail
    assert c.facts == {"glibc": "2.36", "environment": []}
    c = doctor.check_cpu_heap({"MALLOC_TRIM_THRESHOLD_": "1", "GLIBC_TUNABLES": "x"})
    assert c.status == "warn" and "MALLOC_TRIM_THRESHOLD_" in c.detail
    assert "--cpu-heap system" in c.advice
    assert c.facts["environment"] == ["GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_"]
    monkeypatch.setattr(heap, "glibc_version", lambda: "")
    c = doctor.check_cpu_heap({"MALLOC_ARENA_MAX": "2"})
    assert c.status == "ok" and "not glibc" in c.detail and c.facts["glibc"] is None


def test_unusable_shared_memory_fails_the_check_and_refuses_a_launch(monkeypatch):
    """A read-only /dev/shm (containers): every local multi-process run died in a 75-line
    multiprocessing traceback while doctor said all was well."""
    import multiprocessing

    from dptrain import launch
    from dptrain.errors import UsageError

    assert doctor.check_shared_memory().status == "ok"

    class ReadOnly:
        def Lock(self):  # noqa: N802 - multiprocessing's name
            raise OSError(30, "Read-only file system")

    monkeypatch.setattr(multiprocessing, "get_context", lambda _kind: ReadOnly())
    c = doctor.check_shared_memory()
    assert c.status == "fail" and "Read-only file system" in c.detail
    assert "--shm-size" in c.advice
    with pytest.raises(UsageError, match="shared memory is not usable .*mount a writable"):
        launch.launch(print, (), nproc=2)
