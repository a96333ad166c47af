"""StepProfiler: a real small model profiled for a few steps; the trace and the table."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dptrain.models import build_model
from dptrain.profiling import StepProfiler


def _train(prof: StepProfiler, steps: int, model_name: str = "linear") -> None:
    torch.manual_seed(0)
    model = build_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        prof.step()


def _events(path) -> list[dict]:
    doc = json.loads(path.read_text())
    return doc["traceEvents"] if isinstance(doc, dict) else doc


def test_profiles_n_steps_then_stops(tmp_path):
    logged: list[str] = []
    with StepProfiler(tmp_path / "profile", steps=3, active=True, log=logged.append) as prof:
        _train(prof, 6)
        assert prof._prof is None  # stopped after warm-up + 3 steps, not at the end of the run
    trace = tmp_path / "profile" / "trace.json"
    assert prof.trace_path == trace and prof.recorded == 3
    names = {e.get("name") for e in _events(trace)}
    assert "aten::addmm" in names  # Linear's forward
    steps = sorted(n for n in names if n and n.startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#1", "ProfilerStep#2", "ProfilerStep#3"]  # #0: warm-up
    table = (tmp_path / "profile" / "top_ops.txt").read_text()
    assert table.startswith("top operators over 3 profiled step(s), by self cpu time total:")
    assert "aten::addmm" in table and "Self CPU" in table
    assert logged[0].startswith("top operators") and "aten::addmm" in logged[0]
    assert "trace.json" in logged[1] and "perfetto" in logged[1]


def test_short_run_writes_what_it_recorded(tmp_path):
    logged: list[str] = []
    with StepProfiler(tmp_path, steps=10, active=True, log=logged.append) as prof:
        _train(prof, 3, "convnet")
    assert prof.recorded == 2
    names = {e.get("name") for e in _events(tmp_path / "trace.json")}
    assert any("conv" in (n or "") for n in names)
    assert "profiled step(s)" in (tmp_path / "top_ops.txt").read_text()


def test_run_within_the_warmup_records_nothing(tmp_path):
    logged: list[str] = []
    with StepProfiler(tmp_path, steps=2, active=True, warmup=1, log=logged.append) as prof:
        _train(prof, 1)
    assert prof.trace_path is None and not (tmp_path / "trace.json").exists()
    assert logged and "nothing recorded" in logged[-1]


@pytest.mark.parametrize(("steps", "active"), [(5, False), (0, True)])
def test_inactive_does_nothing(tmp_path, steps, active):
    with StepProfiler(tmp_path / "p", steps=steps, active=active, log=pytest.fail) as prof:
        _train(prof, 3)
    assert not (tmp_path / "p").exists() and prof.trace_path is None
    assert prof.step.__name__ == "_noop"  # no profiler, no per-step branch


def test_bad_arguments():
    with pytest.raises(ValueError, match="must be >= 0"):
        StepProfiler("x", steps=-1, active=True)
