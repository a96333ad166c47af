"""Functions run inside launched workers (importable by spawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dptrain import dist
from dptrain.config import TrainConfig
from dptrain.data.datasets import load_splits
from dptrain.data.loader import Normalizer
from dptrain.evaluation import evaluate
from dptrain.models import build_model
from dptrain.objective import Objective
from dptrain.plan import make_plan
from dptrain.precision import Precision
from dptrain.strategies import build


def eval_worker(model_name: str, dataset: str = "synthetic", loss: str = "cross_entropy"
                ) -> dict[str, Any]:
    """Evaluate a seeded, untrained-but-fixed model on a test split, sharded over the ranks."""
    env = dist.detect()
    strategy = build(make_plan(TrainConfig(strategy="ddp", device="cpu"), env), env)
    strategy.setup()
    try:
        return evaluate_fixed(model_name, dataset, loss, strategy)
    finally:
        strategy.teardown()


def evaluate_fixed(model_name: str, dataset: str, loss: str, strategy: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(model_name)
    splits = load_splits(dataset, "unused")
    objective = Objective(loss)
    test_y = objective.prepare_targets(splits.test_y, "test")
    xb = splits.test_x[:2] if splits.mean is None else Normalizer(splits.mean, splits.std)(
        splits.test_x[:2])
    objective.check_output(model(xb), test_y[:2], [test_y])
    return evaluate(model, splits.test_x, test_y, strategy, objective,
                    Precision("32", torch.device("cpu")), 100,
                    Normalizer(splits.mean, splits.std))


def exiting_worker(marker_dir: str, picklable: bool = True) -> Any:
    """For the fast-exit test: an atexit handler and unflushed output in each worker."""
    import atexit
    import os
    import sys

    rank = int(os.environ["RANK"])
    atexit.register(lambda: Path(f"{marker_dir}/atexit-{rank}").write_text("ran"))
    import types  # a module the interpreter's teardown frees, if there is one

    probe = sys.modules["teardown_probe"] = types.ModuleType("teardown_probe")
    probe.probe = _Probe(f"{marker_dir}/teardown-{rank}")
    sys.stdout.write(f"<unflushed {rank}>")  # no newline: still in the buffer at exit
    return {"rank": rank} if picklable else (lambda: rank)


class _Probe:
    def __init__(self, path: str) -> None:
        import os

        self.path, self.os = path, os  # no global lookups at teardown: they may be gone

    def __del__(self) -> None:
        os = self.os
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o644))


def env_worker(names: list[str]) -> dict[str, Any]:
    """For the fork-server test: the worker's view of some variables, and its parent."""
    import os

    parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    return {"env": {n: os.environ.get(n) for n in names},
            "forked_from_server": b"multiprocessing.forkserver" in parent}


def busy_worker(cpu_s: float) -> float:
    """Spin for ``cpu_s`` seconds of CPU; return the CPU seconds this process used."""
    import resource
    import time

    start = time.process_time()
    while time.process_time() - start < cpu_s:
        pass
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def scalar_sum_worker(cpu_allreduce: str) -> dict[str, Any]:
    """DDP's ``all_reduce_sum`` (the loop's sync point, the evaluation's totals) on a wrapped
    model: the sums, and how many of them went through gloo's all-reduce."""
    import os

    import torch.distributed as tdist

    env = dist.detect()
    cfg = TrainConfig(strategy="ddp", device="cpu", cpu_allreduce=cpu_allreduce)
    strategy = build(make_plan(cfg, env), env)
    strategy.setup()
    try:
        strategy.wrap(build_model("linear"))  # connects the shared segment where it can
        calls = []
        gloo_all_reduce = tdist.all_reduce
        tdist.all_reduce = lambda *a, **k: calls.append(1) or gloo_all_reduce(*a, **k)
        rank = int(os.environ["RANK"])
        stats = torch.tensor([1.5 * (rank + 1), 1.0, 0.0, float(rank == 1)])
        totals = torch.arange(6, dtype=torch.float64).view(2, 3) * (rank + 1)
        strided = totals.t()  # not contiguous: reduced through a copy
        counts = torch.tensor([rank + 1, 7], dtype=torch.int64)
        out = [strategy.all_reduce_sum(t).tolist() for t in (stats, strided, counts)]
        tdist.all_reduce = gloo_all_reduce
        return {"sums": out, "gloo_calls": len(calls), "path": strategy.allreduce_path}
    finally:
        strategy.teardown()


def one_process_ddp_worker() -> dict[str, Any]:
    """One DDP step and one ``all_reduce_sum`` in a one-process job: how many gloo
    all-reduces they made (none are needed), and whether the gradients equal a plain
    model's (bitwise: the sum over one rank is the gradient itself)."""
    import copy

    import torch.distributed as tdist

    env = dist.detect()
    cfg = TrainConfig(strategy="ddp", device="cpu")
    strategy = build(make_plan(cfg, env), env)
    strategy.setup()
    try:
        torch.manual_seed(0)
        plain = build_model("linear")
        wrapped = strategy.wrap(copy.deepcopy(plain))
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        calls = []
        gloo_all_reduce = tdist.all_reduce
        tdist.all_reduce = lambda *a, **k: calls.append(1) or gloo_all_reduce(*a, **k)
        try:
            torch.nn.functional.cross_entropy(wrapped(x), y).backward()
            total = strategy.all_reduce_sum(torch.tensor([2.5, 1.0])).tolist()
        finally:
            tdist.all_reduce = gloo_all_reduce
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        same = all(torch.equal(a.grad, b.grad) for a, b in
                   zip(plain.parameters(), strategy.unwrap(wrapped).parameters(), strict=True))
        return {"gloo_calls": len(calls), "sum": total, "grads_equal": same}
    finally:
        strategy.teardown()
