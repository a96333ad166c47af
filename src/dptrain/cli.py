"""Command line: ``dptrain {data,train,verify,bench,plot,slurm,doctor}``.

Flags for ``train`` are generated from :class:`~dptrain.config.TrainConfig`, so the CLI, the
TOML file and validation always agree. Any :class:`~dptrain.errors.UsageError` ends the command
with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from dptrain import __version__
from dptrain.config import (
    FIELDS,
    TrainConfig,
    coerce,
    default_data_root,
    field_type,
    flag,
    load_toml,
    to_toml,
)
from dptrain.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one ``error:`` line (exit status 2), and takes flags
    spelled out only: argparse's prefix matching would read ``--lr-s`` as ``--lr-scaling``
    today and refuse it, or read it as another flag, once a second ``--lr-s...`` exists."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # noqa: D102
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34, width=100)


def add_config_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None,
                     defaults: dict[str, Any] | None = None) -> None:
    """One flag per :class:`TrainConfig` field; defaults shown; values left unset unless given.
    ``defaults``: what the command uses instead of the field's default (shown as such)."""
    for f in fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        kind = field_type(f.name)
        default = (defaults or {}).get(f.name, f.default)
        shown = f.metadata.get("shown", default if default != "" else "none")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{f.metadata['help']} (default: {shown})"}
        if f.name == "model_args":  # one string field, filled by a repeatable --model-arg
            parser.add_argument("--model-arg", action=_AppendModelArg, metavar="KEY=VALUE",
                                **kwargs)
            continue
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.metadata.get("bool_spelling"):  # --x [auto|on|off]; --x = on; --no-x = off
            parser.add_argument(f"--{flag(f.name)}", nargs="?", const="on",
                                choices=f.metadata["choices"], **kwargs)
            parser.add_argument(f"--no-{flag(f.name)}", action="store_const", const="off",
                                dest=f.name, default=argparse.SUPPRESS,
                                help=f"= --{flag(f.name)} off")
            continue
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs.pop("metavar")
        parser.add_argument(f"--{flag(f.name)}", **kwargs)


class _AppendModelArg(argparse.Action):
    """``--model-arg KEY=VALUE`` (repeatable) -> the ``model_args`` string "k=v,k2=v2"."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 value: Any, option: str | None = None) -> None:
        if "," in value or "=" not in value:
            parser.error(f"--model-arg {value!r}: give one KEY=VALUE per flag (no commas); "
                         "repeat the flag for more")
        before = getattr(namespace, self.dest, "")
        setattr(namespace, self.dest, f"{before},{value}" if before else value)


def check_replayable(path: str) -> None:
    """A run directory's config.toml after a resume with other settings holds the last ones:
    a new run from it would train every step with them, another run than the one recorded."""
    from dptrain.checkpoint import RESUMED_MARK

    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.readline().rstrip("\n")
    except OSError:
        return
    if first.startswith(RESUMED_MARK):
        what = first[len("# replayable = false: "):].rstrip(".")
        raise UsageError(f"config file {path} records a run {what}: a new run from it would "
                         "train every step with the last settings, "
                         "not the run it records; pass --resume auto (and that run's --out) to "
                         "continue it, or delete its first comment lines to train with these "
                         "settings from the start")


def resolve_config(args: argparse.Namespace, overrides: dict[str, Any] | None = None
                   ) -> TrainConfig:
    """Defaults < recipe < ``--config`` file < flags (< ``overrides``), then validate."""
    from dptrain.recipes import recipe_values

    explicit = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    from_file = load_toml(args.config) if getattr(args, "config", None) else {}
    if from_file and "resume" not in explicit:
        check_replayable(args.config)
    recipe = explicit.get("recipe", from_file.get("recipe", ""))
    values: dict[str, Any] = {}
    if recipe:
        values.update(coerce(recipe_values(recipe), source=f"recipe {recipe}"))
    values.update(from_file)
    values.update(explicit)
    values.update(overrides or {})
    try:
        return TrainConfig(**values).validate()
    except UsageError as exc:  # say where a bad value came from when it was not a flag
        named = re.match(r"--([a-z0-9-]+)", str(exc))
        name = named.group(1).replace("-", "_") if named else ""
        if name in from_file and name not in explicit and name not in (overrides or {}):
            raise UsageError(f"{exc} (set in {args.config}: fix it there, or override it with "
                             f"--{flag(name)})") from None
        raise


# ---------------------------------------------------------------------------- train
def worker_entry(plan: Any, started_at: float, count_comm: bool = False) -> dict[str, Any]:
    """What each launched worker runs (module-level, so that spawn can import it); ``plan``
    is the validated :class:`~dptrain.plan.Plan` itself."""
    from dptrain import run

    return run.train(plan, started_at=started_at, count_comm=count_comm)


def run_training(cfg: TrainConfig, *, legacy_local_rank: int | None = None,
                 started_at: float | None = None, count_comm: bool = False
                 ) -> dict[str, Any] | None:
    """Train as the plan says: in this process, as a worker of an external launcher, or by
    launching local workers. Returns rank 0's summary (None on other ranks)."""
    from dptrain import dist, launch, run
    from dptrain.plan import make_plan, prepare_data
    from dptrain.rundir import check_out_dir, default_out

    started_at = time.time() if started_at is None else started_at
    env = dist.detect(legacy_local_rank=legacy_local_rank)
    plan = make_plan(cfg, env)
    if plan.launch == "external":  # started by torchrun / srun / torch.distributed.launch
        summary = run.train(plan, env, started_at=started_at, count_comm=count_comm)
        return summary if env.rank == 0 else None
    prepare_data(plan)
    if plan.launch == "inprocess":
        return run.train(plan, env, started_at=started_at, count_comm=count_comm)
    plan = plan.with_out(cfg.out or default_out())
    if cfg.node_rank == 0:
        check_out_dir(Path(plan.cfg.out), cfg.resume)
    try:
        results = launch.launch(
            worker_entry, (plan, started_at, count_comm), nproc=plan.nproc,
            nnodes=plan.nnodes, node_rank=cfg.node_rank,
            master_addr=cfg.master_addr, master_port=cfg.master_port,
            max_restarts=cfg.max_restarts, rdzv_timeout_s=int(cfg.timeout_s),
            fast_exit=True)
    except launch.Interrupted as exc:
        exc.out = plan.cfg.out
        raise
    return results.get(0)


def interrupted_message(exc: Exception) -> str:
    """One line for a launcher stopped by a signal: where training stands, how to go on."""
    from dptrain.checkpoint import Checkpointer

    out = getattr(exc, "out", "")
    newest = Checkpointer(Path(out) / "checkpoints", is_main=False).numbered() if out else []
    where = (f"the newest checkpoint is {newest[0]}" if newest else "no checkpoint was written")
    return (f"stopped by {exc.name}: the workers were stopped ({where}); continue with "
            f"`dptrain train --resume auto --out {out}` and the same flags")


def print_summary(summary: dict[str, Any]) -> None:
    from dptrain.metrics import format_metrics

    sps = summary.get("train_samples_per_s")
    metrics = summary.get("test_metrics") or {}
    print(f"test {format_metrics(metrics) or 'n/a'} ({summary['test_samples']} samples) | "
          + (f"{sps:,.0f} samples/s" if sps else "n/a samples/s")
          + f" | {summary['steps']} steps | {summary['strategy']} x {summary['world_size']} "
          f"on {summary['device']} | wall {summary['wall_time_s']:.1f} s | {summary['out']}")


def cmd_train(args: argparse.Namespace) -> int:
    started_at = time.time()
    cfg = resolve_config(args)
    if args.print_config:
        sys.stdout.write(to_toml(cfg))
        return 0
    summary = run_training(cfg, legacy_local_rank=args.local_rank, started_at=started_at)
    if summary is not None:
        if summary.get("stopped_by_signal"):
            # stderr, like the launcher's own stop line: stdout stays for results
            print(f"stopped by signal at step {summary['steps']}; checkpoint written, "
                  f"continue with `dptrain train --resume auto --out {summary['out']}` and the "
                  "same flags", file=sys.stderr)
            return 143
        print_summary(summary)
    return 0


# ---------------------------------------------------------------------------- data
def cmd_data(args: argparse.Namespace) -> int:
    from dptrain.data.fetch import fetch

    root = Path(args.root or default_data_root())
    path = fetch(args.name, root, log=print)
    print(f"{args.name}: ready in {path}")
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> Parser:
    parser = Parser(prog="dptrain", formatter_class=_help_formatter,
                    description="Data-parallel training with PyTorch that you can trust and "
                                "measure.")
    parser.add_argument("--version", action="version", version=f"dptrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    p = sub.add_parser("data", help="get datasets", formatter_class=_help_formatter)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=Parser)
    dsub.required = True
    f = dsub.add_parser("fetch", help="fetch and verify a dataset (offline-capable)")
    f.add_argument("name", choices=["mnist", "fashion-mnist"])
    f.add_argument("--root", default=None, help="data root (default: $DPTRAIN_DATA or ./data)")
    f.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="train a model (single / dp / ddp)",
                       formatter_class=_help_formatter,
                       description=TRAIN_EXAMPLES)
    t.add_argument("--config", default=None, metavar="FILE.toml",
                   help="TOML configuration; flags override it")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as TOML and exit")
    # the legacy torch.distributed.launch passes --local-rank=N: see split_local_rank
    t.set_defaults(local_rank=None)
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    for name in SUBCOMMAND_MODULES:  # each module owns its subcommand's flags and handler
        importlib.import_module(name).add_parser(sub)
    return parser


SUBCOMMAND_MODULES = ("dptrain.verify", "dptrain.bench.command", "dptrain.plot", "dptrain.slurm",
                      "dptrain.doctor", "dptrain.runscript", "dptrain.predict")


TRAIN_EXAMPLES = """\
examples:
  dptrain train --model linear --epochs 1 --batch-size 64 --lr 0.01      # one process
  dptrain train --nproc 2 --model convnet --epochs 2                     # DDP, 2 local workers
  torchrun --nproc-per-node 2 -m dptrain train --model convnet           # under torchrun
  srun --ntasks-per-node 2 dptrain train --model convnet                 # under SLURM
  dptrain train --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 --nproc 2
"""


def split_local_rank(argv: list[str]) -> tuple[list[str], int | None]:
    """Remove the legacy launcher's ``--local-rank=N`` (it puts it before the subcommand)."""
    rest, local_rank, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--local-rank", "--local_rank"):
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            try:
                local_rank = int(value)
            except ValueError:
                raise UsageError(f"--local-rank must be an integer, got {value!r}") from None
        else:
            rest.append(arg)
        i += 1
    return rest, local_rank


# Commands that run only dptrain's code (and plug-in factories), whose files are all closed
# when they return. Not ``run``: a user's script may leave a file open for the teardown to
# flush, and skipping the teardown would lose what it wrote.
FAST_EXIT_COMMANDS = frozenset({"train", "bench", "verify", "predict", "data", "doctor",
                                "plot", "slurm"})
_ran: list[str] = []  # the command main() dispatched (console reads it)
_gc_paused: list[bool] = []  # console() turned the garbage collector off for the start-up


def _startup_imported() -> None:
    """The start-up's imports are done (torch, dptrain): freeze what they made and turn the
    garbage collector back on, if :func:`console` turned it off.

    Importing torch triggers two full collections, and a full collection walks every object
    torch's modules hold: 0.1-0.2 s of a 5 s run, with nothing to free (measured with
    ``gc.callbacks``: 3 full collections, 0.175 s, in one ``--recipe mnist-fast`` run).
    Frozen, those objects are never scanned again; everything made afterwards (the run's
    own objects, a user's script) is collected as usual.
    """
    import gc

    if _gc_paused:
        _gc_paused.clear()
        gc.freeze()
        gc.enable()


def console() -> None:
    """The ``dptrain`` command (console script, ``python -m dptrain``): :func:`main`, then
    :func:`exit_now` after the commands of :data:`FAST_EXIT_COMMANDS`. Library callers and
    tests call :func:`main`, which only returns. A command that will start local workers
    starts the fork server they come from first (:func:`_prestart_workers`). The garbage
    collector waits out the start-up's imports (:func:`_startup_imported`)."""
    import gc

    gc.disable()
    _gc_paused.append(True)
    _prestart_workers(sys.argv[1:])
    code = main()
    if _ran and _ran[-1] in FAST_EXIT_COMMANDS:
        exit_now(code)
    raise SystemExit(code)


LAUNCHING_COMMANDS = ("train", "bench", "verify")  # commands that start local workers


def _prestart_workers(argv: list[str]) -> None:
    """Start the fork server (:func:`dptrain.launch.prestart_workers`) before this process
    imports torch, when ``argv`` will start local workers: ``bench`` and ``verify``, and
    ``train`` with ``--nproc`` other than 1; not under torchrun/srun (this process is a
    worker). The server imports torch on another core meanwhile. A wrong guess costs an
    import in the background and nothing else."""
    import contextlib
    import os

    if not argv or argv[0] not in LAUNCHING_COMMANDS or "-h" in argv or "--help" in argv:
        return
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ or "SLURM_PROCID" in os.environ:
        return
    if argv[0] == "train":
        values = [a.split("=", 1)[1] for a in argv if a.startswith("--nproc=")]
        values += [b for a, b in zip(argv, argv[1:], strict=False) if a == "--nproc"]
        if not values or values[-1] == "1":
            return
    from dptrain.launch import prestart_workers

    with contextlib.suppress(Exception):  # an optimisation only: launch() starts it anyway
        prestart_workers()


def exit_now(code: int) -> None:
    """End the process with ``code`` without Python's interpreter teardown where that is safe.

    Once torch is imported, the teardown (freeing every module, tensor and thread pool) takes
    ~0.8 s on this project's 2-core VM after the summary is printed, and does nothing a
    finished dptrain command needs. This runs what a normal exit would that matters -- the
    ``atexit`` handlers (logging, multiprocessing, the loggers' own) and a flush of
    stdout/stderr -- then ``os._exit``. It exits the normal way when torch is not imported,
    when a non-daemon thread is still running (its work would be cut short), under a profiler
    or tracer (``python -m cProfile -m dptrain ...`` writes its output after this returns), or
    with ``DPTRAIN_NO_FAST_EXIT=1``.
    """
    import atexit
    import contextlib
    import os
    import threading

    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if ("torch" not in sys.modules or others or sys.getprofile() is not None
            or sys.gettrace() is not None or os.environ.get("DPTRAIN_NO_FAST_EXIT")):
        raise SystemExit(code)
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe (dptrain ... | head)
                stream.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C anywhere, even while the parser is being built: one line, exit 130
        return _main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    _startup_imported()
    try:
        argv, local_rank = split_local_rank(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if argv[:1] == ["run"]:
        from dptrain.runscript import mark_separator

        argv = mark_separator(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help/--version (0) or a usage error, already printed
        return exc.code if isinstance(exc.code, int) else 2
    if local_rank is not None:
        args.local_rank = local_rank
    _ran.append(args.command)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a worker's crash: show ranks and tracebacks, no second trace
        from dptrain.launch import Interrupted, WorkerFailure

        if isinstance(exc, Interrupted):  # SIGTERM/SIGINT to the launcher: no traceback
            print(interrupted_message(exc), file=sys.stderr)
            return exc.exit_code
        if isinstance(exc, WorkerFailure):
            print(f"error: {exc.headline}\n{exc}", file=sys.stderr)
            return exc.exit_code
        raise
