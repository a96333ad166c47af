"""dptrain.lazydynamo: eager training never imports torch._dynamo, and compiling still gets
PyTorch's own dynamo-disabled methods. Each case runs in a fresh interpreter: pytest's own
process has long imported torch._dynamo."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_an_eager_training_run_never_imports_dynamo(tmp_path):
    out = _python("""
        import sys
        from dptrain.cli import main
        assert main(["train", "--dataset", "synthetic", "--model", "fastnet", "--max-steps",
                     "3", "--batch-size", "16", "--quiet", "--out", sys.argv[1]]) == 0
        import json
        summary = json.load(open(sys.argv[1] + "/summary.json"))
        print(summary["steps"], summary["model_flops_per_sample"] > 0,
              "torch._dynamo" in sys.modules, "sympy" in sys.modules)
    """, str(tmp_path / "run"))
    assert out == "3 True False False"  # trained, counted its FLOPs, imported neither


def test_optimizer_methods_behave_as_pytorch_s_without_dynamo():
    out = _python("""
        import sys, torch
        from dptrain import lazydynamo
        from dptrain.optim import direct_step
        lazydynamo.defer(torch.optim.Optimizer)
        w = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([w], lr=0.5, momentum=0.9)
        w.grad = torch.ones(3)
        direct_step(opt)()  # Optimizer.step's own wrapper imports dynamo; dptrain skips it
        opt.zero_grad()
        sd = opt.state_dict()
        opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
        opt2.load_state_dict(sd)
        print(w.grad is None, w.tolist(), opt2.param_groups[0]["lr"],
              opt2.state_dict()["state"][0]["momentum_buffer"].tolist(),
              "torch._dynamo" in sys.modules)
    """)
    assert out == "True [0.5, 0.5, 0.5] 0.5 [1.0, 1.0, 1.0] False"


def test_once_dynamo_is_imported_the_methods_take_pytorch_s_disabled_wrapper():
    out = _python("""
        import torch
        from dptrain import lazydynamo
        lazydynamo.defer(torch.optim.Optimizer)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
        import torch._dynamo
        wrapped = []
        real = torch._dynamo.disable
        torch._dynamo.disable = lambda fn, *a, **k: wrapped.append(fn.__name__) or real(fn, *a, **k)
        opt.zero_grad()
        opt.zero_grad()  # built once, then reused
        fn = vars(torch.optim.Optimizer)["zero_grad"].__wrapped__
        print(wrapped, lazydynamo.deferred(fn))
    """)
    assert out == "['zero_grad'] True"


def test_defer_is_idempotent_and_leaves_pytorch_s_own_wrapper_alone():
    out = _python("""
        import torch
        import torch._dynamo
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)  # PyTorch wraps
        from dptrain import lazydynamo
        lazydynamo.defer(torch.optim.Optimizer, torch.optim.Optimizer)
        fns = {n: a.__wrapped__ for n, a in vars(torch.optim.Optimizer).items()
               if n in ("add_param_group", "zero_grad")}
        print(lazydynamo.deferred(fns["add_param_group"]), lazydynamo.deferred(fns["zero_grad"]))
    """)
    assert out == "False True"  # add_param_group already had PyTorch's wrapper


def test_ddp_init_answers_dynamo_s_default_without_importing_it_and_leaves_no_trace():
    out = _python("""
        import sys, torch
        from torch.nn.parallel import DistributedDataParallel as DDP
        from dptrain import lazydynamo
        with lazydynamo.ddp_init():
            mode = torch._dynamo.utils.get_optimize_ddp_mode()
        imported, left = "torch._dynamo" in sys.modules, "_dynamo" in vars(torch)
        [(fn, recursive)] = lazydynamo._disabled_functions(DDP)
        import torch._dynamo
        print(mode, imported, left, torch._dynamo.utils.get_optimize_ddp_mode() == mode,
              fn.__name__, recursive, lazydynamo.deferred(fn))
    """)
    # dynamo's own default, unimported, nothing left behind; DDP's forward context deferred
    assert out == "ddp_optimizer False False True _inside_ddp_forward False True"


def test_ddp_init_defers_to_dynamo_once_it_is_imported_and_configured():
    out = _python("""
        import torch, torch._dynamo
        from dptrain import lazydynamo
        torch._dynamo.config.optimize_ddp = "python_reducer"
        with lazydynamo.ddp_init():
            mode = torch._dynamo.utils.get_optimize_ddp_mode()
        print(mode, torch._dynamo.__name__)
    """)
    assert out == "python_reducer torch._dynamo"
