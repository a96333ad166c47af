"""Environment detection: torchrun, the legacy launcher, SLURM, and inconsistent values."""

from __future__ import annotations

import pytest

from dptrain.dist import DistEnv, detect, expand_nodelist
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
    d = detect(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (5, 8, 1, 4)
    assert d.master_addr == "gpu07" and d.master_port == 20000 + 12345 and d.source == "slurm"
    assert detect({**env, "MASTER_PORT": "999"}).master_port == 999


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
