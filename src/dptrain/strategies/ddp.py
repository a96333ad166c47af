"""``DistributedDataParallel``: one process per device, gradients all-reduced in buckets."""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from dptrain import dist, lazydynamo
from dptrain.errors import UsageError
from dptrain.strategies import shm, syncbn
from dptrain.strategies.base import Strategy


@dataclass
class DDPOptions:
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    static_graph: bool = False
    find_unused_parameters: bool = False
    comm_hook: str = "none"  # none | fp16 | bf16
    cpu_allreduce: str = "auto"  # auto | shm | gloo: how CPU gradients cross local processes
    count_comm: bool = False  # count all-reduce calls and bytes (tests, bench)
    sync_bn: bool = False  # BatchNorm statistics over the global batch
    reshard_after_forward: bool = True  # fsdp
    precision: str = "32"  # fsdp: its mixed-precision policy
    stages: int = 2  # pipeline: stages (processes) per replica
    microbatches: int = 4  # pipeline: micro-batches per batch
    pipeline_schedule: str = "1f1b"  # pipeline: gpipe | 1f1b
    split_points: str = ""  # pipeline: module names where stages 2..S begin
    sync_every: int = 8  # localsgd: average parameters every H steps
    localsgd_warmup_steps: int = 0  # localsgd: synchronous steps first


class CommCounter:
    """Comm-hook state: how many bucket all-reduces ran and how many bytes they carried."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner  # the wrapped hook's own state
        self.calls = 0
        self.bytes = 0


def _counting(hook):  # noqa: ANN001, ANN202 - torch's hook signature
    # no annotations: DDP checks them literally, and this module's are postponed strings
    def counted(state, bucket):  # noqa: ANN001, ANN202
        state.calls += 1
        state.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        return hook(state.inner, bucket)

    return counted


# BatchNorm statistics: rank 0's are the ones kept (sync_buffers aligns the others before
# evaluation and checkpoints). Training uses batch statistics, so skipping DDP's per-forward
# buffer broadcast changes no result and saves a collective per step. Newer PyTorch spells it
# forward_sync_buffers (and warns about the old name); older only has broadcast_buffers.
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DDP).parameters
                           else {"broadcast_buffers": False})

def local_hook(_state, bucket):  # noqa: ANN001, ANN201 - DDP checks annotations literally
    """DDP comm hook of a one-process job: the sum over one rank is the bucket itself (the
    backend's all-reduce would only copy it; gloo takes ~70 us per bucket here)."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


HOOKS = {
    "none": default_hooks.allreduce_hook,
    "fp16": default_hooks.fp16_compress_hook,
    "bf16": default_hooks.bf16_compress_hook,
}


class DistributedDataParallel(Strategy):
    name = "ddp"

    def __init__(self, env: dist.DistEnv, device: torch.device, *, backend: str,
                 timeout_s: float, options: DDPOptions | None = None) -> None:
        super().__init__(env, device)
        self.backend = backend
        self.timeout_s = timeout_s
        self.options = options or DDPOptions()
        self.comm: CommCounter | None = None
        self.shm: shm.ShmAllReduce | None = None
        self.allreduce_path = backend

    def setup(self) -> None:
        dist.init_process_group(self.env, self.backend, self.device, self.timeout_s)

    def teardown(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        # Let gloo's worker threads free their finished collectives now: each needs the GIL
        # to drop the tensors it held. The group's destructor joins those threads, and it runs
        # -- GIL held -- wherever its last reference dies (DDP's reducer, a ZeRO optimizer,
        # maybe a user's model after Session.close()); a thread still waiting for the GIL
        # then deadlocks the process at exit. Sleeping releases the GIL for them.
        time.sleep(0.05)
        dist.destroy_process_group()

    def _shm_blocker(self) -> str | None:
        """Why the shared-memory all-reduce cannot carry this job's gradients (None: it can)."""
        if self.backend != "gloo":  # connect_shm only asks on CPU
            return "it is for CPU tensors over gloo"
        if self.options.comm_hook != "none":
            return f"--comm-hook {self.options.comm_hook} compresses through gloo"
        if self.env.local_world_size != self.world_size:
            return "the ranks are on several nodes"
        return shm.supported()

    def connect_shm(self) -> None:
        """Set up the shared-memory all-reduce on every rank, or on none (a collective)."""
        wanted = self.options.cpu_allreduce
        if wanted == "shm" and self.device.type != "cpu":
            raise UsageError(f"--cpu-allreduce shm is for CPU training; on {self.device.type} "
                             "DDP uses the backend's all-reduce (drop the flag)")
        if wanted == "gloo" or self.device.type != "cpu" or self.world_size == 1:
            return
        self.shm, self.allreduce_path = shm.connect(
            self.rank, self.world_size, self.timeout_s, self._shm_blocker(),
            required=wanted == "shm", broadcast=self.broadcast_object,
            gather=self.all_gather_object)

    def wrap(self, model: nn.Module) -> nn.Module:
        o = self.options
        if o.sync_bn:
            model = syncbn.convert(model, self.device)
        with lazydynamo.ddp_init():  # no 2.3 s torch._dynamo import per worker
            ddp = DDP(
                model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                bucket_cap_mb=o.bucket_cap_mb,
                gradient_as_bucket_view=o.gradient_as_bucket_view,
                static_graph=o.static_graph,
                find_unused_parameters=o.find_unused_parameters,
                **_NO_FORWARD_BUFFER_SYNC,
            )
        self.connect_shm()
        hook, state = self.comm_hook()
        if o.count_comm:
            self.comm = CommCounter(state)
            ddp.register_comm_hook(self.comm, _counting(hook))
        elif hook is not default_hooks.allreduce_hook:
            ddp.register_comm_hook(state, hook)
        return ddp

    def comm_hook(self) -> tuple[Any, Any]:
        """The gradient buckets' comm hook and its state, registered once by :meth:`wrap`
        (DDP takes one hook only; torch's plain all-reduce is left unregistered)."""
        if self.shm is not None:
            return shm.allreduce_hook, self.shm
        if self.world_size == 1 and self.options.comm_hook == "none":
            return local_hook, None  # (a compressing hook still rounds: it stays, as asked)
        return HOOKS[self.options.comm_hook], None

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DDP) else model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        with model.no_sync():
            yield

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        # The loop's sync point and the evaluation's totals are a few numbers. Where the
        # gradients go through shared memory, so do these: gloo takes ~1-2 ms for any
        # all-reduce of more than one element here (shm.py), the shared segment ~30 us.
        # Every rank takes the same path (self.shm is set on all ranks or on none).
        if self.world_size == 1:  # a sum over one rank (gloo: ~20-70 us for nothing)
            return tensor
        if self.shm is not None and tensor.device.type == "cpu":
            with torch.no_grad():  # as gloo: a sum outside autograd (Session.all_reduce(loss))
                flat = tensor.detach()
                if flat.is_contiguous():
                    self.shm.all_reduce_(flat)
                else:
                    flat.copy_(self.shm.all_reduce_(flat.contiguous()))
            return tensor
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        tdist.barrier()

    def sync_buffers(self, model: nn.Module) -> None:
        # Buffers are not broadcast before each forward (forward_sync_buffers=False: training
        # uses batch statistics), so every rank's running statistics follow its own batches:
        # align them to rank 0's before evaluation and checkpoints.
        for buf in model.buffers():
            tdist.broadcast(buf, src=0)

    def bn_statistics(self) -> str:
        if self.options.sync_bn:
            return "synchronized (SyncBatchNorm)"
        return super().bn_statistics()

    def describe(self) -> dict[str, Any]:
        o = self.options
        return {**super().describe(), "bucket_cap_mb": o.bucket_cap_mb,
                "gradient_as_bucket_view": o.gradient_as_bucket_view,
                "static_graph": o.static_graph,
                "find_unused_parameters": o.find_unused_parameters, "comm_hook": o.comm_hook,
                "allreduce": self.allreduce_path}
