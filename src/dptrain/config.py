"""One configuration tree for a training run.

:class:`TrainConfig` is a kw-only dataclass; every field carries its help text and, where it
has one, its set of choices. The same description drives the command line (``cli.py``), the
TOML file (``--config`` / ``config.toml``) and validation, so the three cannot drift apart.

Precedence, lowest first: field defaults, the ``--recipe`` preset, ``--config FILE``, flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dptrain.errors import UsageError

MODELS = ("linear", "convnet", "cnn", "fastnet", "fastnet-v1", "fastnet-strided")
DATASETS = ("mnist", "fashion-mnist", "synthetic")
OPTIMIZERS = ("sgd", "adam", "adamw", "adadelta")
SCHEDULES = ("none", "step", "onecycle", "cosine")
STRATEGIES = ("auto", "single", "dp", "ddp", "zero", "fsdp", "pipeline", "hogwild", "localsgd")
SCHEDULES_PP = ("gpipe", "1f1b")  # pipeline schedules offered on this torch (see strategies/pipeline.py)
LOGGERS = ("jsonl", "tensorboard", "mlflow", "csv")


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, **extra: Any) -> Any:
    """A dataclass field with its CLI help and choices attached as metadata."""
    return field(default=default, metadata={"help": help, "choices": choices, **extra})


def on_off(value: Any) -> Any:
    """A field that was a bool and is now auto/on/off: True -> "on", False -> "off"."""
    return ("on" if value else "off") if isinstance(value, bool) else value


def default_data_root() -> str:
    """The one definition of the default data root: ``$DPTRAIN_DATA`` if set and non-empty."""
    return os.environ.get("DPTRAIN_DATA") or "./data"


LOSSES = ("cross_entropy", "nll", "bce", "mse", "l1", "huber")
TASKS = ("auto", "classification", "multilabel", "regression")
MAX_SEED = 2**32 - 1  # the data order's generator seed is seed * 1_000_003 + epoch (int64)
BOUNDS = {  # name: (lowest, highest) for the integer settings that have a sensible ceiling
    "seed": (0, MAX_SEED), "log_every": (1, 1_000_000), "stages": (0, 64),
    "microbatches": (0, 4096), "sync_every": (1, 1_000_000),
    "nnodes": (1, 4096), "node_rank": (0, 4095), "max_restarts": (0, 1000),
    "accum": (1, 65536), "batch_size": (1, 1 << 24), "eval_batch_size": (1, 1 << 24),
    "keep_ckpts": (1, 10_000), "profile": (0, 10_000),
}


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that defines a training run. Resolved once, saved beside the run."""

    # --- what to train
    dataset: str = _opt("mnist", "dataset name, or package.module:factory", plugin_ok=True)
    data_root: str = _opt("", "dataset root", shown="$DPTRAIN_DATA, else ./data")
    model: str = _opt("linear", "model name, or package.module:factory", plugin_ok=True)
    model_args: str = _opt("", "keyword arguments for --model package.module:factory, "
                           "comma-separated KEY=VALUE (values read as int/float/bool/str); "
                           "flag: --model-arg KEY=VALUE, repeatable")
    val_fraction: float = _opt(0.0, "hold out this fraction of the training split (seeded) "
                               "for the per-epoch evaluation; the test split is then evaluated "
                               "once at the end")
    workers: int = _opt(0, "DataLoader worker processes per rank for map-style Datasets")
    recipe: str = _opt("", "named preset (mnist-fast); explicit flags override it")
    loss: str = _opt("cross_entropy", f"training loss: {', '.join(LOSSES)}, or "
                     "package.module:fn (fn(outputs, targets) -> scalar)", plugin_ok=True)
    task: str = _opt("auto", "metrics to report; auto = from the loss (a custom loss: from the "
                     "target dtype)", TASKS)
    # --- how to parallelise
    strategy: str = _opt("auto", "auto = ddp when several processes, else single; zero = DDP "
                         "with the optimizer state sharded (ZeRO-1); fsdp = parameters, "
                         "gradients and optimizer state sharded (FSDP2); pipeline = the model "
                         "cut into --stages processes (x data-parallel replicas); hogwild = "
                         "lock-free asynchronous updates of shared parameters (one node, CPU); "
                         "localsgd = local steps, parameters averaged every --sync-every",
                         STRATEGIES)
    nproc: str = _opt("1", "local worker processes: N or auto (= GPUs, else CPU cores)")
    nnodes: int = _opt(1, "number of nodes (as torchrun)")
    node_rank: int = _opt(0, "rank of this node (as torchrun)")
    master_addr: str = _opt("127.0.0.1", "address of node 0 (as torchrun)")
    master_port: int = _opt(0, "rendezvous port; 0 = pick a free one (single node only)")
    device: str = _opt("auto", "training device", ("auto", "cpu", "cuda"))
    backend: str = _opt("auto", "auto = nccl on CUDA, gloo on CPU", ("auto", "gloo", "nccl"))
    timeout_s: float = _opt(300.0, "process-group timeout: a collective waiting longer fails")
    max_restarts: int = _opt(0, "elastic restarts of the workers after a failure")
    threads: str = _opt("0", "intra-op threads per process; 0 = CPU cores / local processes; "
                        "one value per local process, comma-separated (2,1), for unequal "
                        "workers")
    cpu_bind: str = _opt("none", "pin each local process to its own cores: auto = on the "
                         "CPU with 2+ local processes whose threads fit the usable cores; none "
                         "= leave it to the OS (as torchrun)", ("none", "auto"))
    cpu_heap: str = _opt("tuned", "the C heap under CPU tensors (glibc): tuned keeps memory "
                         "freed in a step for the next one (no page faults per step); system = "
                         "glibc's defaults", ("tuned", "system"))
    # --- DDP knobs
    bucket_cap_mb: float = _opt(25.0, "DDP gradient bucket size in MiB")
    gradient_as_bucket_view: bool = _opt(False, "DDP: gradients are views into the buckets")
    static_graph: bool = _opt(False, "DDP: the graph is the same every step")
    find_unused_parameters: bool = _opt(False, "DDP: allow parameters that get no gradient")
    comm_hook: str = _opt("none", "DDP gradient compression hook", ("none", "fp16", "bf16"))
    cpu_allreduce: str = _opt("auto", "DDP on CPU, one node: gradients through shared memory "
                              "(shm) or gloo's TCP; auto = shm where possible",
                              ("auto", "shm", "gloo"))
    sync_bn: bool = _opt(False, "convert BatchNorm to SyncBatchNorm (DDP)")
    # --- sharding
    reshard_after_forward: bool = _opt(True, "FSDP: free the gathered parameters after the "
                                       "forward (gather again for the backward)")
    # --- pipeline, local SGD, load balancing
    stages: int = _opt(0, "pipeline: stages the model is cut into, one process each; --nproc "
                       "= stages x data-parallel replicas; 0 = one stage per process")
    microbatches: int = _opt(0, "pipeline: micro-batches each process's batch is cut into "
                             "(must divide --batch-size); 0 = 2 x stages")
    pipeline_schedule: str = _opt("1f1b", "pipeline schedule (torch.distributed.pipelining)",
                                  SCHEDULES_PP)
    split_points: str = _opt("", "pipeline: comma-separated module names where stages 2..S "
                             "begin; default: the model's own split points, else its "
                             "nn.Sequential children cut by parameter count")
    sync_every: int = _opt(8, "localsgd: average the parameters every H optimizer steps")
    localsgd_warmup_steps: int = _opt(0, "localsgd: synchronous (DDP) steps before the local "
                                      "steps begin")
    balance: str = _opt("off", "ddp: per-rank micro-batch sizes in proportion to each rank's "
                        "speed measured during warm-up, summing to the same global batch "
                        "(auto)", ("off", "auto"))
    keep_global_batch: bool = _opt(False, "resuming with another number of processes: pick "
                                   "the --batch-size/--accum that keep the global batch")
    # --- optimisation
    epochs: float = _opt(1.0, "passes over the training split; a fraction trains that share "
                         "of the last pass (0.85: 85 percent of one epoch)")
    max_steps: int = _opt(0, "stop after this many optimizer steps (0 = no cap)")
    batch_size: int = _opt(64, "samples per process per micro-batch")
    eval_batch_size: int = _opt(1000, "samples per process per evaluation batch")
    accum: int = _opt(1, "gradient accumulation: micro-batches per optimizer step")
    optimizer: str = _opt("sgd", "optimizer", OPTIMIZERS)
    lr: float = _opt(0.01, "learning rate (before --lr-scaling)")
    momentum: float = _opt(0.0, "SGD momentum (0, as torch.optim.SGD)")
    nesterov: bool = _opt(False, "SGD Nesterov momentum")
    weight_decay: float = _opt(0.0, "weight decay")
    schedule: str = _opt("none", "learning-rate schedule", SCHEDULES)
    step_size: int = _opt(1, "step schedule: epochs between decays")
    gamma: float = _opt(0.7, "step schedule: decay factor")
    warmup_steps: int = _opt(0, "linear warm-up steps")
    grad_clip: float = _opt(0.0, "clip the gradients' global norm to this (0 = off; localsgd "
                            "clips each rank's own gradient between averages)")
    no_decay_norm_bias: bool = _opt(False, "no weight decay on biases and norm layers' "
                                    "parameters")
    lr_scaling: str = _opt("none", "scale lr with the global batch", ("none", "linear", "sqrt"))
    ref_batch: int = _opt(64, "global batch the given lr is tuned for (for --lr-scaling)")
    precision: str = _opt("32", "32, bf16 (autocast) or 16 (fp16 + GradScaler, CUDA)",
                          ("32", "bf16", "16"))
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing")
    augment: str = _opt("none", "training augmentation", ("none", "shift"))
    channels_last: str = _opt("auto", "channels_last memory format for the parameters and "
                              "4-d inputs: auto = for dptrain's conv models on the CPU "
                              "(faster there), on, off; --channels-last alone = on",
                              ("auto", "on", "off"), bool_spelling=True)
    compile: bool = _opt(False, "torch.compile the model")
    seed: int = _opt(0, "seed: same seed, same result")
    # --- outputs
    out: str = _opt("", "run directory", shown="runs/<timestamp>")
    ckpt_every: int = _opt(0, "checkpoint every N optimizer steps (0 = only at the end)")
    keep_ckpts: int = _opt(3, "numbered checkpoints to keep")
    resume: str = _opt("", "auto (newest good checkpoint in --out) or a checkpoint path")
    log_every: int = _opt(50, "log every N optimizer steps")
    quiet: bool = _opt(False, "print only the final result")
    tensorboard: bool = _opt(False, "write TensorBoard event files (needs tensorboard)")
    logger: str = _opt("jsonl", f"experiment loggers, comma-separated: {', '.join(LOGGERS)}")
    eval_every_epoch: bool = _opt(True, "evaluate at the end of every epoch")
    eval_every: int = _opt(0, "also evaluate every N optimizer steps (0 = only at epoch ends)")
    target_accuracy: float = _opt(0.0, "stop once an evaluation reaches this accuracy (the "
                                  "--val-fraction hold-out if any, else test; 0 = off); the "
                                  "summary records the step and training time it took")
    profile: int = _opt(0, "profile N optimizer steps with torch.profiler (0 = off)")

    def __post_init__(self) -> None:
        if isinstance(self.threads, int) and not isinstance(self.threads, bool):
            self.threads = str(self.threads)  # threads=2 from Python, as before
        self.channels_last = on_off(self.channels_last)  # a bool from Python (it was one)
        if not self.data_root:
            self.data_root = default_data_root()

    # ------------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        """Check every value once; raise :class:`UsageError` naming the flag and the fix."""
        self._check_names()
        self._check_numbers()
        self._check_lists()
        self._check_launch()
        if (self.nesterov and self.optimizer == "sgd" and not self.momentum > 0
                and not self.recipe):  # a recipe's own nesterov yields to --momentum 0
            raise UsageError("--nesterov needs momentum (--momentum 0.9, say): without it SGD "
                             "has no Nesterov step and the flag would change nothing")
        return self

    def _check_names(self) -> None:
        """Choices, finite floats, and the built-in model/loss/dataset names."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise UsageError(
                    f"--{flag(f.name)} {value!r} is not one of {', '.join(choices)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{flag(f.name)} must be a finite number, got {value}")
        if ":" not in self.model and self.model not in MODELS:
            raise UsageError(f"unknown --model {self.model!r}: use one of {', '.join(MODELS)} "
                             "or package.module:factory")
        if ":" not in self.loss and self.loss not in LOSSES:
            raise UsageError(f"unknown --loss {self.loss!r}: use one of {', '.join(LOSSES)} or "
                             "package.module:fn")
        if ":" not in self.dataset and self.dataset not in DATASETS:
            raise UsageError(f"unknown --dataset {self.dataset!r}: use one of "
                             f"{', '.join(DATASETS)} or package.module:factory")

    def _check_numbers(self) -> None:
        """Signs, bounds and ranges of the numeric settings."""
        positive = ("batch_size", "eval_batch_size", "accum", "nnodes", "ref_batch",
                    "step_size", "keep_ckpts", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"--{flag(name)} must be at least 1, got {getattr(self, name)}")
        non_negative = ("max_steps", "eval_every", "node_rank", "master_port", "max_restarts",
                        "localsgd_warmup_steps", "ckpt_every", "warmup_steps", "weight_decay", "momentum", "seed")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UsageError(f"--{flag(name)} must not be negative, got {getattr(self, name)}")
        for name, (lo, hi) in BOUNDS.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise UsageError(f"--{flag(name)} {value} is out of range: use {lo} to {hi}")
        if not self.timeout_s <= 7 * 86400:
            raise UsageError(f"--timeout-s {self.timeout_s:g} is more than a week; use at most "
                             "604800")
        if not 0 < self.epochs <= 1_000_000:
            raise UsageError(f"--epochs must be positive (at most 1000000), got {self.epochs:g}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if not self.timeout_s > 0:
            raise UsageError(f"--timeout-s must be positive, got {self.timeout_s}")
        if not self.bucket_cap_mb > 0:
            raise UsageError(f"--bucket-cap-mb must be positive, got {self.bucket_cap_mb}")
        if not 0 < self.gamma <= 1:
            raise UsageError(f"--gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.grad_clip >= 0:
            raise UsageError(f"--grad-clip must not be negative, got {self.grad_clip}")
        if not 0 <= self.target_accuracy <= 1:
            raise UsageError(f"--target-accuracy must be in [0, 1] (a fraction: 0.98 for 98 %), "
                             f"got {self.target_accuracy}")
        if not 0 <= self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.target_accuracy and not (self.eval_every or self.eval_every_epoch):
            raise UsageError("--target-accuracy is checked at evaluations, and this run makes "
                             "none before its end (--no-eval-every-epoch, no --eval-every): "
                             "add --eval-every N")
        if not 0 <= self.workers <= 256:
            raise UsageError(f"--workers {self.workers} is out of range: use 0 to 256")

    def thread_counts(self) -> list[int]:
        """``--threads`` as numbers: [] for 0 (automatic), one per local process, or one
        for all (an invalid value is refused by :meth:`validate`)."""
        values = [int(v) for v in self.threads.split(",")]
        return [] if values == [0] else values

    def _check_lists(self) -> None:
        """The comma-separated settings: --threads, --model-arg, --logger, --split-points."""
        try:
            counts = [int(v) for v in self.threads.split(",")]
        except ValueError:
            raise UsageError(f"--threads {self.threads!r}: expected a number of threads, or "
                             "one per local process, comma-separated (e.g. 2,1)") from None
        if any(not 0 <= c <= 1024 for c in counts) or (len(counts) > 1 and 0 in counts):
            raise UsageError(f"--threads {self.threads!r}: each value must be 1 to 1024 (0 "
                             "alone = automatic)")
        for name in filter(None, (x.strip() for x in self.split_points.split(","))):
            if not all(part.isidentifier() or part.isdigit() for part in name.split(".")):
                raise UsageError(f"--split-points {name!r} is not a module name (e.g. "
                                 "layers.2 or fc1)")
        for item in filter(None, self.model_args.split(",")):
            key, eq, _ = item.partition("=")
            if not eq or not key.strip().isidentifier():
                raise UsageError(f"--model-arg {item!r}: expected KEY=VALUE with KEY a Python "
                                 "identifier (e.g. --model-arg hidden=128)")
        if self.model_args and ":" not in self.model:
            raise UsageError(f"--model-arg is for --model package.module:factory; the built-in "
                             f"--model {self.model} takes no arguments")
        loggers = [x.strip() for x in self.logger.split(",") if x.strip()]
        bad = [x for x in loggers if x not in LOGGERS]
        if bad or not loggers:
            raise UsageError(f"--logger {self.logger!r}: use one or more of {', '.join(LOGGERS)}, "
                             "comma-separated")

    def _check_launch(self) -> None:
        """Nodes, ports, the CPU all-reduce path and --nproc."""
        if self.node_rank >= self.nnodes:
            raise UsageError(f"--node-rank {self.node_rank} must be below --nnodes {self.nnodes}")
        if self.master_port > 65535:
            raise UsageError(f"--master-port {self.master_port} is not a TCP port (1-65535)")
        if self.cpu_allreduce == "shm" and self.comm_hook != "none":
            raise UsageError(f"--cpu-allreduce shm sums full-precision gradients; it cannot "
                             f"combine with --comm-hook {self.comm_hook} (use one or the other)")
        if self.cpu_allreduce == "shm" and self.nnodes > 1:
            raise UsageError("--cpu-allreduce shm works within one node; with --nnodes "
                             f"{self.nnodes} use --cpu-allreduce auto or gloo")
        if self.nnodes > 1 and self.master_port == 0:
            raise UsageError("multi-node runs need --master-port (the same on every node)")
        if self.nproc != "auto":
            try:
                n = int(self.nproc)
            except ValueError:
                raise UsageError(f"--nproc must be a positive integer or auto, got "
                                 f"{self.nproc!r}") from None
            if n < 1:
                raise UsageError(f"--nproc must be a positive integer or auto, got {n}")

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        return cls(**coerce(values, source=source))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in fields(TrainConfig)}


def flag(name: str) -> str:
    """Field name -> CLI flag spelling (without the dashes)."""
    return name.replace("_", "-")


def field_type(name: str) -> type:
    default = FIELDS[name].default
    return type(default)


def coerce(values: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Check keys and types of a mapping from TOML or a recipe; ints are accepted for floats."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UsageError(f"{source}: unknown key {key!r}; see `dptrain train --help` "
                             "for the valid names")
        if name in out:
            raise UsageError(f"{source}: {key!r} sets {name}, which another spelling of it "
                             "already set; keep one of them")
        want = field_type(name)
        if FIELDS[name].metadata.get("bool_spelling"):
            value = on_off(value)  # an older config.toml: channels_last = true
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is str and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # e.g. nproc = 2, precision = 16
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise UsageError(f"{source}: {key} must be {want.__name__}, got "
                             f"{type(value).__name__} {value!r}")
        out[name] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file; a missing or malformed file is a :class:`UsageError`."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {p} does not exist (or is not a file); check the path")
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {p} is not valid TOML ({exc}); fix the syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file {p}: {exc}; save it as UTF-8 text (TOML)"
                         ) from None
    if "train" in data and isinstance(data["train"], dict):
        others = sorted(k for k in data if k != "train")
        if others:
            raise UsageError(f"config file {p} has both a [train] table and top-level keys "
                             f"({', '.join(others)}); put every setting in one of the two")
        data = data["train"]  # allow a [train] table as well as top-level keys
    return coerce(data, source=str(p))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return '"' + "".join(_TOML_ESCAPES.get(ch) or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20
                                                  or ord(ch) == 0x7F else ch)
                         for ch in str(value)) + '"'


# TOML basic strings: these escaped by name, other control characters as \uXXXX
_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


# the first words of the config.toml a run writes (a Session's: SESSION_HEADER), by which a
# run directory's own file is told from a user's (rundir.written_by_dptrain)
CONFIG_HEADER = "# dptrain resolved configuration"
SESSION_HEADER = "# dptrain.Session"


def to_toml(cfg: TrainConfig) -> str:
    """The resolved configuration as TOML; ``--config`` on this text reproduces the run."""
    lines = [f"{CONFIG_HEADER}: dptrain train --config THIS_FILE"]
    for f in fields(cfg):
        lines.append(f"{f.name} = {_toml_value(getattr(cfg, f.name))}")
    return "\n".join(lines) + "\n"
