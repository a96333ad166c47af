"""Environment detection: torchrun, the legacy launcher, SLURM, and inconsistent values."""

from __future__ import annotations

import pytest

from dptrain.dist import (
    DistEnv,
    detect,
    expand_nodelist,
    loopback_ok,
    restart_count,
    tasks_per_node,
)
from dptrain.errors import UsageError


def test_alone():
    assert detect({}) == DistEnv()
    assert not detect({}).distributed


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    d = detect(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (3, 4, 1, 2)
    assert (d.master_addr, d.master_port, d.source) == ("10.0.0.1", 29400, "torchrun")


def test_legacy_launcher_local_rank_argument():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    d = detect(env, legacy_local_rank=1)
    assert (d.rank, d.local_rank, d.source) == (1, 1, "legacy")
    with pytest.raises(UsageError, match="disagrees with LOCAL_RANK"):
        detect({**env, "LOCAL_RANK": "0"}, legacy_local_rank=1)


def test_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[07-08,10],cpu1",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "12345"}
    d = detect(env, network=False)  # gpu07 does not resolve here
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (5, 8, 1, 4)
    assert d.master_addr == "gpu07" and d.master_port == 20000 + 12345 and d.source == "slurm"
    assert detect({**env, "MASTER_PORT": "999"}, network=False).master_port == 999


def test_sbatch_script_itself_is_not_distributed():
    # the batch step has SLURM_NTASKS but no SLURM_STEP_NUM_TASKS: one process
    assert not detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"}).distributed


def test_nodelist_expansion():
    assert expand_nodelist("node[01-03,7],login") == ["node01", "node02", "node03", "node7",
                                                       "login"]
    assert expand_nodelist("a1") == ["a1"]


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "outside world size"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "must be at least 1"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "0"}, "WORLD_SIZE not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"},
     "local rank 3"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "4"}, "exceeds world size"),
])
def test_inconsistent_environment(env, needle):
    with pytest.raises(UsageError, match=needle):
        detect(env)


def test_nodelist_several_bracket_groups_and_suffixes():
    assert expand_nodelist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert expand_nodelist("node[1-2]-ib,x") == ["node1-ib", "node2-ib", "x"]


@pytest.mark.parametrize("nodelist, needle", [
    ("node[01-", "unbalanced brackets"),
    ("node[a-b]", "range 'a-b' is not N or LO-HI"),
    ("node[3-1]", "runs backwards"),
    ("node]1[", "misplaced brackets"),
    ("a,,b", "an empty host name"),
    ("", "it is empty"),
    ("node[1-2000000]", "too large"),
])
def test_malformed_nodelist_names_the_variable(nodelist, needle):
    with pytest.raises(UsageError, match=needle) as info:
        expand_nodelist(nodelist, "SLURM_STEP_NODELIST")
    assert f"SLURM_STEP_NODELIST={nodelist!r}" in str(info.value)


def test_tasks_per_node():
    assert tasks_per_node("4(x2),3") == [4, 4, 3]
    assert tasks_per_node("2") == [2]
    for bad in ("x", "", "4(x0)", "0", "4(2)", "4,,2"):
        with pytest.raises(UsageError, match="is not a SLURM task count list"):
            tasks_per_node(bad)


SLURM = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1",
         "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2",
         "SLURM_JOB_ID": "7"}
TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT are not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR is not"),
    ({**TORCHRUN, "MASTER_PORT": "0"}, r"MASTER_PORT='0' is not a TCP port \(1..65535\)"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT='70000' is not a TCP port"),
    ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
    ({**TORCHRUN, "MASTER_ADDR": "no-such-host.invalid"},
     "MASTER_ADDR 'no-such-host.invalid' cannot be resolved"),
    ({**TORCHRUN, "MASTER_ADDR": ""}, "MASTER_ADDR is empty"),
    ({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "x"},
     "TORCHELASTIC_RESTART_COUNT='x' is not a non-negative integer"),
    ({**TORCHRUN, "GLOO_SOCKET_IFNAME": "nosuch0"}, "no network interface 'nosuch0'"),
    ({**TORCHRUN, "NCCL_SOCKET_IFNAME": "nosuch"}, "no network interface 'nosuch'"),
    ({**TORCHRUN, "NCCL_SOCKET_IFNAME": "=l"}, "no network interface 'l'"),
    ({**SLURM, "SLURM_STEP_NODELIST": "node[01-"}, "SLURM_STEP_NODELIST='node\\[01-'"),
    ({**SLURM, "SLURM_STEP_NODELIST": "node[a-b]"}, "range 'a-b' is not N or LO-HI"),
    ({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "x"}, "SLURM_STEP_TASKS_PER_NODE='x'"),
    ({**SLURM, "MASTER_PORT": "65536"}, "MASTER_PORT='65536' is not a TCP port"),
    ({**SLURM, "SLURM_STEP_NODELIST": "no-such-host.invalid"},
     "the first host of SLURM_STEP_NODELIST 'no-such-host.invalid' cannot be resolved"),
])
def test_bad_launcher_environment(env, needle):
    with pytest.raises(UsageError, match=needle):
        detect(env)


def test_good_launcher_environment_passes_the_network_checks():
    assert detect({**TORCHRUN, "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "l",
                   "TORCHELASTIC_RESTART_COUNT": "3"}).master_port == 29500
    assert detect({**TORCHRUN, "NCCL_SOCKET_IFNAME": "^docker,lo"}).world_size == 2
    d = detect(SLURM)
    assert (d.rank, d.local_rank, d.local_world_size, d.master_addr) == (1, 1, 2, "localhost")
    # a bad interface does not matter to a process that is not distributed ... but it is
    # still wrong, and a --nproc run's workers would trip over it: checked for everyone
    with pytest.raises(UsageError, match="GLOO_SOCKET_IFNAME"):
        detect({"GLOO_SOCKET_IFNAME": "nosuch0"})
    assert detect({"GLOO_SOCKET_IFNAME": "nosuch0"}, network=False) == DistEnv()


def test_restart_count():
    assert restart_count({}) == 0
    assert restart_count({"TORCHELASTIC_RESTART_COUNT": "2"}) == 2
    for bad in ("x", "-1", "", "1.5"):
        with pytest.raises(UsageError, match="TORCHELASTIC_RESTART_COUNT"):
            restart_count({"TORCHELASTIC_RESTART_COUNT": bad})


def test_loopback_ok_here():
    assert loopback_ok() is None
    assert loopback_ok("192.0.2.1") is not None  # TEST-NET-1: not an address of this machine
