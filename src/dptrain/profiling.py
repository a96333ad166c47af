"""``--profile N``: a ``torch.profiler`` trace of N optimizer steps, and the operators that cost.

Used by the training loop as::

    with StepProfiler(out / "profile", steps=cfg.profile, active=is_main, device=device,
                      log=reporter.print) as prof:
        for step in ...:
            train_step()
            prof.step()          # once per optimizer step

The first ``warmup`` step(s) (default 1) run under the profiler but are discarded (allocation,
kernel selection and the profiler's own start-up would otherwise dominate a short window); the
next ``steps`` are recorded. Then the profiler stops and writes, into ``out_dir``:

* ``trace.json`` -- a Chrome trace: open it in https://ui.perfetto.dev or ``chrome://tracing``
  (each step is a ``ProfilerStep#k`` span, operators nested below it);
* ``top_ops.txt`` -- the operators sorted by self time (CUDA time on a GPU), also passed to
  ``log``.

A run that ends before the window is full writes what it recorded when the ``with`` block
exits. Only the active process (rank 0) profiles; an inactive profiler, or ``steps=0``, never
imports ``torch.profiler`` and its ``step()`` is a no-op method call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

TRACE_NAME = "trace.json"
TABLE_NAME = "top_ops.txt"


def _noop(*_args: Any) -> None:
    """The step() of an inactive profiler."""


class StepProfiler:
    """Profile ``steps`` optimizer steps of the active process; see the module docstring.

    Args:
        out_dir: Directory for ``trace.json`` and ``top_ops.txt`` (created when written).
        steps: Optimizer steps to record (0 = do nothing).
        active: Whether this process profiles (rank 0); others do nothing at all.
        device: The training device: CUDA time is recorded and sorted by on a GPU.
        warmup: Steps profiled but discarded before the recorded ones.
        row_limit: Operators in the table.
        log: Receives the table and a one-line note of where the files are.

    Attributes:
        trace_path: ``out_dir / "trace.json"`` once written, else ``None``.
        table: The top-operators table once written, else ``None``.
        recorded: Steps recorded in the trace.
    """

    def __init__(self, out_dir: Path | str, steps: int, active: bool,
                 device: torch.device | str = "cpu", *, warmup: int = 1, row_limit: int = 25,
                 log: Callable[[str], None] = print) -> None:
        if steps < 0 or warmup < 0:
            raise ValueError(f"steps and warmup must be >= 0, got {steps}, {warmup}")
        self.out_dir = Path(out_dir)
        self.steps, self.warmup, self.row_limit = steps, warmup, row_limit
        self.device = torch.device(device)
        self.active = bool(active) and steps > 0
        self.log = log
        self.trace_path: Path | None = None
        self.table: str | None = None
        self.recorded = 0
        self._calls = 0
        self._prof: Any = None
        if not self.active:
            self.step = _noop  # type: ignore[method-assign]

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def __enter__(self) -> StepProfiler:
        if not self.active:
            return self
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._cuda else [])
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=self.warmup, active=self.steps, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,  # the table and the trace name each operator's input shapes
        )
        self._prof.__enter__()
        return self

    def step(self) -> None:
        """Mark the end of one optimizer step (a no-op when inactive or when done)."""
        if self._prof is None:
            return
        self._calls += 1
        if self._calls > self.warmup:
            self.recorded = self._calls - self.warmup
        self._prof.step()  # the last step of the window calls _write
        if self._calls >= self.warmup + self.steps:
            self._close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._prof is not None:
            self._close()
            if self.trace_path is None and exc_type is None:
                self.log(f"profile: the run ended after {self._calls} step(s), within the "
                         f"{self.warmup} warm-up step(s): nothing recorded")

    def _close(self) -> None:
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)  # stops; writes a partly filled window (on_trace_ready)

    def _write(self, prof: Any) -> None:
        if self.recorded == 0:  # stopped right after the warm-up: only what followed the loop
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / TRACE_NAME
        prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if self._cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=self.row_limit)
        head = (f"top operators over {self.recorded} profiled step(s), by "
                f"{sort.replace('_', ' ')}:")
        (self.out_dir / TABLE_NAME).write_text(head + "\n" + table + "\n")
        self.trace_path, self.table = trace, table
        self.log(head + "\n" + table)
        self.log(f"profile: {self.recorded} step(s) -> {trace} (open in https://ui.perfetto.dev"
                 f"), table in {self.out_dir / TABLE_NAME}")
