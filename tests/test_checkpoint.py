"""Checkpoint files: atomic writes, rotation, corrupt-file fallback, safe loading."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from dptrain import checkpoint
from dptrain.checkpoint import Checkpointer, load
from dptrain.errors import UsageError


def state(v: float) -> dict:
    """A complete checkpoint state (what exact resume needs), its weights all ``v``."""
    return {"model": {"w": torch.full((3,), v)}, "optimizer": {"state": {}, "param_groups": []},
            "position": {"step": int(v), "epoch": 0, "step_in_epoch": int(v)},
            "rng": {"cpu": [torch.get_rng_state()]}, "world_size": 1}


def test_save_rotates_and_last_points_to_newest(tmp_path: Path):
    ck = Checkpointer(tmp_path, is_main=True, keep=2)
    for step in (1, 2, 3):
        ck.save(state(step), step)
    assert [p.name for p in ck.numbered()] == ["step-00000003.pt", "step-00000002.pt"]
    assert load(tmp_path / "last.pt")["model"]["w"][0] == 3
    assert not list(tmp_path.glob(".*tmp*"))


def test_only_the_main_process_writes(tmp_path: Path):
    assert Checkpointer(tmp_path / "c", is_main=False).save(state(1), 1) is None
    assert not (tmp_path / "c").exists()


def test_full_disk_during_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    ck = Checkpointer(tmp_path, is_main=True)
    ck.save(state(1), 1)
    before = (tmp_path / "last.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, fh, *a, **k):  # write part of the file, then fail like ENOSPC
        fh.write(b"PK\x03\x04partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(UsageError, match="No space left on device"):
        ck.save(state(2), 2)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in ck.numbered()] == ["step-00000001.pt"]
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written leftovers
    assert load(tmp_path / "last.pt")["model"]["w"][0] == 1


def test_corrupt_newest_falls_back_to_previous_with_warning(tmp_path: Path):
    ck = Checkpointer(tmp_path, is_main=True, keep=3)
    ck.save(state(1), 1)
    ck.save(state(2), 2)
    newest = tmp_path / "step-00000002.pt"
    data = newest.read_bytes()
    os.unlink(tmp_path / "last.pt")
    newest.write_bytes(data[: len(data) // 2])  # truncated
    warnings: list[str] = []
    path, st = ck.latest_good(warn=warnings.append)
    assert path.name == "step-00000001.pt" and st["model"]["w"][0] == 1
    assert len(warnings) == 1 and "corrupt or truncated" in warnings[0]


def test_a_zeroed_byte_inside_a_tensor_is_caught_by_the_crc_and_skipped(tmp_path: Path):
    """torch.load does not check the zip's CRCs: without our check, damaged bytes inside a
    tensor would load as different weights and resume silently."""
    ck = Checkpointer(tmp_path, is_main=True, keep=3)
    ck.save(state(1), 1)
    big = state(2)
    big["model"]["w"] = torch.full((4096,), 2.0)
    ck.save(big, 2)
    newest = tmp_path / "step-00000002.pt"
    data = bytearray(newest.read_bytes())
    at = data.index(torch.full((8,), 2.0).numpy().tobytes())  # inside the tensor's bytes
    data[at:at + 200] = bytes(200)
    newest.write_bytes(bytes(data))  # last.pt is the same file (a hard link)
    with pytest.raises(UsageError, match=r"is corrupt \(CRC mismatch in .*/data/"):
        load(newest)
    warnings: list[str] = []
    path, st = ck.latest_good(warn=warnings.append)
    assert path.name == "step-00000001.pt" and st["model"]["w"][0] == 1
    assert len(warnings) == 1 and "CRC mismatch" in warnings[0]


def test_random_bytes_and_foreign_files_are_usage_errors(tmp_path: Path):
    p = tmp_path / "x.pt"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(UsageError, match="corrupt or truncated"):
        load(p)
    torch.save({"weights": torch.ones(2)}, p)
    with pytest.raises(UsageError, match="not a dptrain checkpoint"):
        load(p)
    with pytest.raises(UsageError, match="does not exist"):
        load(tmp_path / "missing.pt")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_is_refused_and_not_run(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": Evil()}, p, pickle_module=pickle)
    with pytest.raises(UsageError, match="not allowed with weights_only=True"):
        load(p)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- complete and consistent
def _broken(mutate) -> dict:
    s = {"format": checkpoint.FORMAT, **state(2)}
    mutate(s)
    return s


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda s: s.pop("position"), "no 'position'"),
    (lambda s: s.pop("optimizer"), "no 'optimizer'"),
    (lambda s: s.pop("rng"), "no 'rng'"),
    (lambda s: s.update(model=[1, 2]), "not a state dict"),
    (lambda s: s.update(optimizer={"state": {}, "param_groups": "x"}), "optimizer state dict"),
    (lambda s: s["position"].update(step=-1), "non-negative integers"),
    (lambda s: s["position"].update(epoch=1.5), "non-negative integers"),
    (lambda s: s.update(rng={"cpu": []}), "generator states"),
    (lambda s: s["model"].update(w=torch.tensor([float("nan")])), "NaN"),
])
def test_incomplete_or_inconsistent_checkpoints_are_refused(tmp_path, mutate, message):
    path = tmp_path / "c.pt"
    torch.save(_broken(mutate), path)
    with pytest.raises(UsageError, match=message):
        load(path)


def test_resume_auto_falls_back_past_an_unusable_newest_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path, is_main=True)
    ck.save(state(1), 1)
    torch.save(_broken(lambda s: s.pop("rng")), tmp_path / "step-00000002.pt")
    warnings = []
    path, found = ck.latest_good(warn=warnings.append)
    assert path.name == "step-00000001.pt" and found["position"]["step"] == 1
    assert "no 'rng'" in warnings[0]


def test_positions_are_checked_against_the_run_being_resumed():
    s = state(8)  # step 8 = step_in_epoch 8 of epoch 0
    assert checkpoint.check_position(s, "p", total_steps=20, steps_per_epoch=10).step == 8
    with pytest.raises(UsageError, match="beyond this run's 5 steps"):
        checkpoint.check_position(s, "p", total_steps=5, steps_per_epoch=10)
    with pytest.raises(UsageError, match="dataset or batch changed"):
        checkpoint.check_position(s, "p", total_steps=20, steps_per_epoch=4)


def test_another_optimizer_is_refused_by_name():
    from dptrain.config import TrainConfig

    saved = {**state(1), "config": TrainConfig(optimizer="adam").to_dict()}
    with pytest.raises(UsageError, match="optimizer='adam'"):
        checkpoint.check_compatible(saved, TrainConfig(optimizer="sgd"), "p", 1)


def test_global_batch_settings_keep_the_batch_a_multiple_of_the_micro_batches():
    from dptrain.checkpoint import global_batch_settings

    assert global_batch_settings(32, 1, 12) == (16, 2)  # 16 is closer to 12 than 8 or 32
    assert global_batch_settings(32, 1, 12, multiple=4) == (16, 2)
    assert global_batch_settings(32, 1, 12, multiple=32) == (32, 1)
    assert global_batch_settings(32, 1, 12, multiple=6) is None
    assert global_batch_settings(48, 2, 12, multiple=6) == (12, 2)


def test_a_resume_with_another_lr_is_recorded_not_silent(tmp_path: Path):
    from tests.conftest import train_inproc

    base = ["--dataset", "synthetic", "--model", "linear", "--ckpt-every", "2"]
    train_inproc(tmp_path / "r", *base, "--max-steps", "2")
    same = train_inproc(tmp_path / "r", *base, "--max-steps", "4", "--resume", "auto")
    assert "resumed_with_changes" not in same
    moved = train_inproc(tmp_path / "r", *base, "--max-steps", "6", "--resume", "auto",
                         "--lr", "0.5", "--grad-clip", "1")
    assert moved["resumed_with_changes"] == {"lr": [0.01, 0.5], "grad_clip": [0.0, 1.0]}


def test_a_config_toml_of_a_run_resumed_with_changes_does_not_replay_as_another_run(
        tmp_path: Path, capsys):
    """config.toml holds the last settings: replayed from scratch it trained every step at the
    new lr, a different run, silently. It now says so; the record survives later resumes
    without changes (checkpoints carry it); with --resume the file continues the run."""
    from dptrain import cli
    from tests.conftest import train_inproc

    run = tmp_path / "r"
    base = ["--dataset", "synthetic", "--model", "linear", "--ckpt-every", "2"]
    train_inproc(run, *base, "--max-steps", "2")
    train_inproc(run, *base, "--max-steps", "4", "--resume", "auto", "--lr", "0.5")
    later = train_inproc(run, *base, "--max-steps", "6", "--resume", "auto", "--lr", "0.5")
    assert "resumed_with_changes" not in later
    assert later["settings_history"] == [{"step": 2, "changes": {"lr": [0.01, 0.5]}}]
    text = (run / "config.toml").read_text()
    assert text.startswith("# replayable = false: resumed at step 2 (lr 0.5, was 0.01).\n")
    capsys.readouterr()
    assert cli.main(["train", "--config", str(run / "config.toml"), "--out",
                     str(tmp_path / "replay")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {run / 'config.toml'} records a run resumed at "
                          "step 2 (lr 0.5, was 0.01): ")
    assert not (tmp_path / "replay").exists()
    assert cli.main(["train", "--config", str(run / "config.toml"), "--max-steps", "8",
                     "--resume", "auto", "--quiet"]) == 0
    assert (run / "config.toml").read_text().startswith(text.splitlines()[0])


def test_a_resume_that_stretches_a_cosine_schedule_is_recorded(tmp_path: Path):
    """A cosine (or onecycle) curve is laid out over the run's length: resuming a 4-step run
    to 8 steps restarts the lr near its peak. The constant schedule has no length to move."""
    from tests.conftest import train_inproc

    base = ["--dataset", "synthetic", "--model", "linear", "--ckpt-every", "2"]
    train_inproc(tmp_path / "c", *base, "--schedule", "cosine", "--max-steps", "4")
    moved = train_inproc(tmp_path / "c", *base, "--schedule", "cosine", "--max-steps", "8",
                         "--resume", "auto")
    assert moved["resumed_with_changes"] == {"total_steps": [4, 8]}
    train_inproc(tmp_path / "k", *base, "--max-steps", "4")
    assert "resumed_with_changes" not in train_inproc(tmp_path / "k", *base, "--max-steps", "8",
                                                      "--resume", "auto")


def test_inconsistent_rng_and_config_records_are_incomplete_not_a_traceback(tmp_path: Path):
    from dptrain.checkpoint import incomplete

    good = state(1)
    assert incomplete(good) is None
    for change, needle in (
            (lambda s: s["rng"].update(cpu=[torch.zeros(3, dtype=torch.uint8)]), "bytes each"),
            (lambda s: s.update(config="model linear"), "not a mapping"),
            (lambda s: s.update(config={"batch_size": "64"}), "batch_size is '64'"),
            (lambda s: s.update(config={"accum": 0}), "accum is 0")):
        bad = state(1)
        change(bad)
        assert needle in incomplete(bad)
        torch.save({**bad, "format": checkpoint.FORMAT}, tmp_path / "x.pt")
        with pytest.raises(UsageError, match="incomplete or inconsistent"):
            load(tmp_path / "x.pt")


def test_resuming_a_complete_run_changes_nothing(tmp_path: Path):
    """A finished run resumed with --resume auto (a requeued job, a rerun script) used to
    evaluate again, log the step-N evaluation twice and replace its summary with one of no
    timed step (final_loss NaN, no throughput). Killed between its last checkpoint and its
    summary, it is finished instead."""
    import hashlib

    from tests.conftest import train_inproc

    out = tmp_path / "r"
    base = ["--dataset", "synthetic", "--model", "linear", "--max-steps", "6", "--ckpt-every",
            "3"]
    first = train_inproc(out, *base)

    def digests() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*")
                if p.is_file() and p.name != ".dptrain.lock"}

    before = digests()
    assert train_inproc(out, *base, "--resume", "auto") == first
    assert digests() == before
    (out / "summary.json").unlink()
    again = train_inproc(out, *base, "--resume", "auto")
    assert again["steps"] == 6 and again["test_accuracy"] == first["test_accuracy"]
