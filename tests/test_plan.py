"""The resolved plan: every rule about strategies, devices, processes and sizes, checked once
against injected hardware (no GPU or process group needed)."""

from __future__ import annotations

import pickle

import pytest

from dptrain.config import TrainConfig
from dptrain.dist import DistEnv
from dptrain.errors import UsageError
from dptrain.plan import Hardware, make_plan

CPU2 = Hardware(cuda=False, gpus=0, cores=2)
GPU4 = Hardware(cuda=True, gpus=4, cores=32)
ALONE = DistEnv()
TORCHRUN = DistEnv(rank=1, world_size=4, local_rank=1, local_world_size=2, source="torchrun")


def plan(hw: Hardware = CPU2, env: DistEnv = ALONE, **values):
    return make_plan(TrainConfig(**values).validate(), env, hw)


def test_defaults_run_single_in_process_with_every_core():
    p = plan()
    assert (p.strategy, p.launch, p.nproc, p.world_size, p.device, p.backend, p.threads) == (
        "single", "inprocess", 1, 1, "cpu", "none", 2)


def test_auto_is_ddp_with_several_processes_and_sizes_are_named_by_scope():
    p = plan(nproc="2", batch_size=16, accum=3)
    assert (p.strategy, p.launch, p.backend, p.threads) == ("ddp", "workers", "gloo", 1)
    assert p.batch_per_process == 16 and p.samples_per_step == 16 * 2 * 3
    assert plan(nproc="auto").nproc == 2
    assert plan(GPU4, nproc="auto").nproc == 4
    assert plan(GPU4, nproc="auto").backend == "nccl"


def test_an_external_launcher_decides_the_processes():
    p = plan(env=TORCHRUN)
    assert (p.launch, p.strategy, p.nproc, p.nnodes, p.world_size) == ("external", "ddp", 2, 2,
                                                                          4)
    with pytest.raises(UsageError, match="ONE process"):
        plan(env=TORCHRUN, strategy="single")


@pytest.mark.parametrize(("hw", "values", "message"), [
    (CPU2, {"device": "cuda"}, "no CUDA GPU is visible"),
    (CPU2, {"strategy": "dp"}, "dp needs CUDA GPUs"),
    (GPU4, {"strategy": "dp", "device": "cpu"}, "dp needs CUDA GPUs"),
    (GPU4, {"strategy": "dp", "nproc": "2"}, "ONE process"),
    (CPU2, {"strategy": "single", "nproc": "2"}, "ONE process"),
    (CPU2, {"strategy": "single", "nnodes": 2, "master_port": 29500}, "ONE process"),
    (CPU2, {"backend": "nccl"}, "--backend nccl needs CUDA"),
    (CPU2, {"precision": "16"}, "--precision 16"),
    (CPU2, {"nproc": "999999"}, "more than this node can run"),
    (GPU4, {"nproc": "5"}, "4 GPU"),
    (CPU2, {"sync_bn": True}, "--sync-bn"),
    (CPU2, {"out": "x" * 300}, "255"),
])
def test_each_rule_lives_in_the_plan(hw, values, message):
    with pytest.raises(UsageError, match=message):
        plan(hw, **values)


def test_threads_divide_the_cores_and_an_explicit_value_wins():
    assert plan(Hardware(cores=8), nproc="4").threads == 2
    assert plan(Hardware(cores=8), nproc="4", threads=3).threads == 3
    assert plan(Hardware(cores=1), nproc="2").threads == 1  # never 0


def test_one_process_ddp_gets_a_private_environment():
    p = plan(strategy="ddp")
    assert p.launch == "inprocess" and p.world_size == 1
    assert p.worker_env(ALONE).source == "local"
    assert p.worker_env(TORCHRUN) is TORCHRUN
    assert plan().worker_env(ALONE) is ALONE


def test_the_plan_travels_to_workers_whole():
    p = plan(nproc="2", model="convnet", lr=0.5).with_out("runs/x")
    back = pickle.loads(pickle.dumps(p))
    assert back == p and back.cfg.lr == 0.5 and back.cfg.out == "runs/x"


def test_builtin_datasets_are_fetched_once_before_the_workers():
    assert plan(dataset="mnist").fetch
    assert not plan(dataset="synthetic").fetch


def test_threads_per_local_process_one_value_each():
    p = plan(nproc="2", threads="2,1")
    assert (p.threads, p.rank_threads) == (2, (2, 1))
    assert [p.threads_for(r) for r in (0, 1)] == [2, 1]
    assert plan(nproc="2", threads=3).threads_for(1) == 3  # an int, as Python callers pass it
    with pytest.raises(UsageError, match="gives 3 values for 2 local"):
        plan(nproc="2", threads="1,1,1")
    for bad in ("two", "2,0", "-1", "1,,2", "2000"):
        with pytest.raises(UsageError, match="--threads"):
            plan(nproc="2", threads=bad)


@pytest.mark.parametrize(("values", "message"), [
    ({"strategy": "pipeline", "nproc": "3", "stages": 2}, "--stages 2 does not divide the 3"),
    ({"strategy": "pipeline", "nproc": "1"}, "at least 2 stages"),
    ({"strategy": "pipeline", "nproc": "2", "batch_size": 10, "microbatches": 4},
     "--microbatches 4 does not divide --batch-size 10"),
    ({"strategy": "pipeline", "nproc": "2", "batch_size": 6}, "--microbatches 4 does not"),
    ({"strategy": "pipeline", "nproc": "2", "sync_bn": True}, "--sync-bn cannot apply"),
    ({"strategy": "ddp", "nproc": "2", "stages": 2}, "are for --strategy pipeline"),
    ({"strategy": "hogwild", "nproc": "2", "nnodes": 2, "master_port": 29500},
     "cannot span 2 nodes"),
    ({"strategy": "hogwild", "nproc": "2", "sync_bn": True}, "--sync-bn cannot apply"),
    ({"strategy": "localsgd", "nproc": "2", "sync_bn": True}, "local SGD avoids"),
    ({"strategy": "zero", "nproc": "2", "balance": "auto"}, "does not apply to --strategy zero"),
    ({"strategy": "ddp", "nproc": "1", "balance": "auto"}, "at least 2 processes"),
])
def test_pipeline_hogwild_localsgd_and_balance_flags_that_do_not_fit_are_refused(values,
                                                                                  message):
    with pytest.raises(UsageError, match=message):
        plan(Hardware(cores=4), **values)


def test_hogwild_is_refused_on_gpus_and_the_new_strategies_run_in_a_group():
    with pytest.raises(UsageError, match="add --device cpu"):
        plan(GPU4, strategy="hogwild", nproc="2")
    assert plan(GPU4, strategy="hogwild", nproc="2", device="cpu").device == "cpu"
    p = plan(Hardware(cores=4), strategy="pipeline", nproc="4", stages=2, batch_size=8)
    assert (p.world_size, p.backend, p.launch) == (4, "gloo", "workers")
    assert plan(strategy="localsgd", nproc="2").strategy == "localsgd"


@pytest.mark.parametrize(("values", "message"), [
    ({"pipeline_schedule": "1f1b", "microbatches": 2, "stages": 3, "nproc": "3",
      "batch_size": 6}, "1f1b needs at least as many micro-batches"),
    ({"compile": True}, "--compile cannot apply to --strategy pipeline"),
])
def test_pipeline_settings_its_schedule_cannot_run_are_refused_before_any_worker(values,
                                                                                message):
    with pytest.raises(UsageError, match=message):
        plan(Hardware(cores=4), **{"strategy": "pipeline", "nproc": "2", **values})
    with pytest.raises(UsageError, match="--precision 16 cannot apply"):
        plan(GPU4, strategy="pipeline", nproc="2", precision="16")


def test_localsgd_flags_that_need_another_comm_hook_are_refused_before_any_worker():
    for values, says in (({"comm_hook": "fp16"}, "--comm-hook fp16 cannot apply"),
                         ({"find_unused_parameters": True}, "--find-unused-parameters")):
        with pytest.raises(UsageError, match=says):
            plan(strategy="localsgd", nproc="2", **values)
    with pytest.raises(UsageError, match="--precision 16 cannot apply to --strategy localsgd"):
        plan(GPU4, strategy="localsgd", nproc="2", precision="16")
