"""Tensor datasets are built once per node and mapped by the node's other processes
(``data/shared.py``): one build, the same training as one process, nothing left in /dev/shm."""

from __future__ import annotations

from pathlib import Path

from dptrain.data.shared import PREFIX, shared_dir
from dptrain.verify import compare, run_pair
from tests.conftest import clean_env, run_cli
from tests.integration.test_features import params


def _leftovers() -> set[str]:
    return {p.name for p in shared_dir().glob(PREFIX + "*")}


def test_a_plugin_dataset_is_built_once_for_three_processes(tmp_path, monkeypatch):
    before = _leftovers()
    monkeypatch.setenv("DPTRAIN_TEST_BUILDS", str(tmp_path / "builds"))
    values = {"dataset": "myplugins:counted_data", "data_root": "unused",
              "model": "myplugins:mlp", "lr": 0.05, "momentum": 0.9, "seed": 2, "threads": 1,
              "batch_size": 8}
    s1, s3 = run_pair(values, 3, 12, tmp_path)
    builds = sorted((tmp_path / "builds").iterdir())
    assert len(builds) == 2  # one for the one-process run, one for the three processes
    diff, where = compare(params(tmp_path / "one"), params(tmp_path / "ddp3"))
    assert diff < 1e-5, where
    assert s3["test_samples"] == 100 and s3["world_size"] == 3
    assert _leftovers() <= before


def test_a_failing_build_on_local_rank_0_reaches_every_rank_as_one_error(tmp_path):
    r = run_cli("train", "--dataset", "myplugins:no_such_factory", "--model", "myplugins:mlp",
                "--nproc", "2", "--threads", "1", "--max-steps", "2", "--quiet", "--out",
                str(tmp_path / "bad"), env=clean_env(), timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "no_such_factory" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not Path(tmp_path / "bad" / "config.toml").exists()
