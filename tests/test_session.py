"""dptrain.Session in one process (no process group): the loader's order, the step, exact
evaluation, checkpoints and exact resume, the errors; ``dptrain run`` in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dptrain
from dptrain import cli
from dptrain.data.datasets import synthetic
from dptrain.data.loader import Normalizer, ShardedLoader
from dptrain.errors import UsageError
from dptrain.models import build_model
from dptrain.runscript import split_args

DATA = synthetic(n_train=640, n_test=250)
NORM = (DATA.mean, DATA.std)


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def train(s: dptrain.Session, model, opt, loader, start: dptrain.session.Resumed, total: int,
          save_at: tuple[int, ...] = ()) -> list[float]:
    losses, step, epoch = [], start.step, start.epoch
    while step < total:
        for micro in loader.epoch(epoch, start.step_in_epoch if epoch == start.epoch else 0):
            for x, y in s.accumulate(model, micro):
                loss = F.cross_entropy(model(x), y)
                s.backward(loss / len(micro))
            s.step(opt)
            step += 1
            losses.append(loss.item())
            if step in save_at:
                s.save(step, model, opt, extra={"sched": {"last": step}})
            if step == total:
                break
        epoch += 1
    return losses


def session_run(out: Path | None, total: int, save_at: tuple[int, ...] = (), accum: int = 1,
                batch: int = 32) -> tuple[dict[str, torch.Tensor], dptrain.session.Resumed]:
    with dptrain.Session(seed=3, out=out, quiet=True) as s:
        model, opt = s.setup(build_model("linear"), "sgd")
        loader = s.loader(DATA.train_x, DATA.train_y, batch_size=batch, accum=accum,
                          normalize=NORM)
        start = s.resume(model, opt) if out is not None else dptrain.session.Resumed()
        train(s, model, opt, loader, start, total, save_at)
        return {k: v.clone() for k, v in s.unwrap(model).state_dict().items()}, start


def test_loader_cuts_exactly_like_dptrain_train(tmp_path):
    with dptrain.Session(seed=5) as s:
        ours = s.loader(DATA.train_x, DATA.train_y, batch_size=16, accum=2, normalize=NORM)
        ref = ShardedLoader(DATA.train_x, DATA.train_y, batch_size=16, rank=0, world=1, accum=2,
                            seed=5, normalize=Normalizer(*NORM))
        assert ours.steps_per_epoch == 640 // 32 and ours.samples_per_step == 32
        for a, b in zip(ours.epoch(1), ref.epoch(1), strict=True):
            assert all(torch.equal(xa, xb) and torch.equal(ya, yb)
                       for (xa, ya), (xb, yb) in zip(a, b, strict=True))


def test_accumulation_equals_the_larger_batch_and_resume_is_exact(tmp_path):
    straight, _ = session_run(None, 30)
    accumulated, _ = session_run(None, 30, accum=2, batch=16)
    assert max((straight[k] - accumulated[k]).abs().max().item() for k in straight) <= 1e-6
    # 30 steps = 1.5 epochs: stop at step 25 (mid-epoch 1), continue in a second session
    first, start = session_run(tmp_path / "r", 25, save_at=(10, 25))
    assert not start  # nothing to resume the first time
    resumed, start = session_run(tmp_path / "r", 30)
    assert (start.step, start.epoch, start.step_in_epoch) == (25, 1, 5)
    assert start.extra == {"sched": {"last": 25}}
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert state["position"] == {"step": 25, "epoch": 1, "step_in_epoch": 5}
    assert sorted(state["model"]) == ["1.bias", "1.weight"]  # unwrapped, as dptrain train
    with pytest.raises(UsageError, match=r"written by a dptrain.Session script with its own "
                       r"model \(Sequential\).*load_state_dict"):
        dptrain.load_model(tmp_path / "r" / "checkpoints" / "last.pt")


def test_evaluate_counts_every_sample_once_and_logs(tmp_path):
    with dptrain.Session(seed=0, out=tmp_path / "e", quiet=True) as s:
        model = s.setup(build_model("linear"))
        metrics = s.evaluate(model, DATA.test_x, DATA.test_y, normalize=NORM, batch_size=64,
                             step=0)
        plain = s.unwrap(model).eval()
        with torch.no_grad():
            logits = plain(Normalizer(*NORM)(DATA.test_x))
        assert metrics["samples"] == 250
        assert metrics["accuracy"] == int((logits.argmax(1) == DATA.test_y).sum()) / 250
        s.log(1, loss=torch.tensor(0.5), lr=0.1)
        for bad, needle in (({"loss": torch.ones(3)}, "tensor of 3 values"),
                            ({"thing": object()}, "is a object; log numbers")):
            with pytest.raises(UsageError, match=needle):
                s.log(2, **bad)
    records = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["test_samples"] == 250 and records[1]["loss"] == 0.5
    assert "[session]" in (tmp_path / "e" / "config.toml").read_text()


def test_bad_settings_and_misuse_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not start processes"):
        dptrain.Session(nproc=2)
    with pytest.raises(UsageError, match="unknown key 'lrate'"):
        dptrain.Session(lrate=0.1)
    with pytest.raises(UsageError, match="needs CUDA"):
        dptrain.Session(strategy="dp", device="cpu")
    with pytest.raises(UsageError, match="only dptrain's own step can drive"):
        dptrain.Session(strategy="pipeline")
    session_run(tmp_path / "done", 2, save_at=(2,))
    with dptrain.Session(out=tmp_path / "done") as s, \
            pytest.raises(UsageError, match="already holds a run"):
        s.log(1, loss=1.0)  # the directory holds a run, and no resume was asked for
    with dptrain.Session() as s:
        model = build_model("linear")
        foreign = torch.optim.SGD(build_model("linear").parameters(), lr=0.1)
        with pytest.raises(UsageError, match="pass a factory"):
            s.setup(model, foreign)
        wrapped, opt = s.setup(model, lambda p: torch.optim.SGD(p, lr=0.1))
        with pytest.raises(UsageError, match="needs a run directory"):
            s.save(1, wrapped, opt)
        with pytest.raises(UsageError, match="larger than the data"):
            s.loader(DATA.test_x, DATA.test_y, batch_size=300)


def test_dptrain_run_in_this_process(tmp_path, capsys):
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint('args', sys.argv[1:])\nsys.exit(3)\n")
    assert cli.main(["run", str(script), "--epochs", "2", "--nproc", "1", "--", "--nproc",
                     "x"]) == 3
    assert "args ['--epochs', '2', '--nproc', 'x']" in capsys.readouterr().out
    assert cli.main(["run", str(tmp_path / "missing.py")]) == 2
    assert "error: script" in capsys.readouterr().err
    script.write_text("import dptrain\ndptrain.Session(nproc=2)\n")
    assert cli.main(["run", str(script)]) == 2
    assert "error: dptrain.Session(nproc=...)" in capsys.readouterr().err


def test_split_args_takes_only_our_flags_before_the_separator():
    ours, rest = split_args(["--lr", "1", "--nproc", "2", "--nnodes=1", "x", "--", "--nproc",
                             "3"])
    assert ours == {"nproc": "2", "nnodes": 1}
    assert rest == ["--lr", "1", "x", "--nproc", "3"]


def test_run_gives_everything_after_the_separator_to_the_script(tmp_path, capsys):
    """argparse drops the first `--`; `dptrain run s.py -- --nproc 8` must not start 8."""
    from dptrain import cli

    script, seen = tmp_path / "s.py", tmp_path / "argv.json"
    script.write_text("import json, os, sys\n"
                      f"open({str(seen)!r}, 'a').write(json.dumps([sys.argv[1:], "
                      "os.environ.get('WORLD_SIZE')]) + '\\n')\n")
    cases = {(str(script), "--", "--nproc", "8", "a"): ["--nproc", "8", "a"],
             (str(script), "x", "--", "--nproc", "8"): ["x", "--nproc", "8"],
             ("--nproc", "1", str(script), "--", "--lr", "3"): ["--lr", "3"],
             (str(script), "--nproc", "1", "--", "--nproc", "8"): ["--nproc", "8"],
             (str(script), "--", "--", "b"): ["--", "b"],
             ("--", str(script), "--nproc", "3"): ["--nproc", "3"]}
    for argv, want in cases.items():
        seen.unlink(missing_ok=True)
        assert cli.main(["run", *argv]) == 0
        assert [json.loads(line) for line in seen.read_text().splitlines()] == [[want, None]]
    assert cli.main(["run", "--"]) == 2
    assert capsys.readouterr().err.startswith("error: no SCRIPT after --")
