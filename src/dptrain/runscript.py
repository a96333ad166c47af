"""``dptrain run SCRIPT [--nproc N] [ARGS...]``: your own training script on N processes.

The script (which uses :class:`dptrain.Session`) runs as ``__main__`` with ``sys.argv`` =
``[SCRIPT, *ARGS]``, exactly as ``python SCRIPT ARGS`` would run it: in this process when one
process is asked for (or when torchrun/srun already started this one), else in ``--nproc``
local workers started by the same launcher as ``dptrain train --nproc``
(:func:`dptrain.launch.launch`), which sets each worker's ``RANK``/``WORLD_SIZE``/... for the
Session to read.

``dptrain run``'s own flags may come before or after SCRIPT; everything after ``--`` goes to
the script untouched (use it when the script has a flag of the same name, e.g. ``--nproc``).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

from dptrain.errors import UsageError

RUN_FLAGS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port", "max_restarts",
             "timeout_s")

EXAMPLES = """\
examples:
  dptrain run examples/own_loop.py                     # one process (like python SCRIPT)
  dptrain run examples/own_loop.py --nproc 2 --epochs 2      # DDP, 2 local workers
  dptrain run --nproc 2 train.py -- --nproc 8          # after --: the script's own flags
  torchrun --standalone --nproc-per-node 2 examples/own_loop.py   # the same, under torchrun
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from dptrain.cli import _help_formatter, add_config_flags

    p = sub.add_parser("run", help="run your own training script (dptrain.Session) on N "
                       "processes", formatter_class=_help_formatter, description=(
                           "Run SCRIPT as `python SCRIPT ARGS` would, in --nproc local workers "
                           "(the launcher of `dptrain train --nproc`), under torchrun/srun, or "
                           "in this process.\n\n" + EXAMPLES))
    add_config_flags(p, only=RUN_FLAGS)
    p.add_argument("script", metavar="SCRIPT", help="the Python script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the script's arguments (dptrain run's flags among them are taken out;"
                        " everything after -- is the script's)")
    p.set_defaults(func=cmd_run)


# argparse drops the first ``--`` of a command line, even one after SCRIPT, and then
# ``dptrain run s.py -- --nproc 8`` would read the script's --nproc as ours. cli replaces
# that ``--`` with this token (no flag or path looks like it) before parsing.
SEPARATOR = "\x00--"


def mark_separator(argv: list[str]) -> list[str]:
    """``argv`` (starting with ``run``) with its first ``--`` replaced by :data:`SEPARATOR`."""
    if "--" not in argv:
        return argv
    cut = argv.index("--")
    return [*argv[:cut], SEPARATOR, *argv[cut + 1:]]


def split_args(args: list[str]) -> tuple[dict[str, object], list[str]]:
    """dptrain run's flags found among the script's arguments (before a ``--``) -> (their
    values, the script's arguments)."""
    from dptrain.cli import Parser, add_config_flags

    sep = SEPARATOR if SEPARATOR in args else "--"
    cut = args.index(sep) if sep in args else len(args)
    head, tail = args[:cut], args[cut + 1:]
    parser = Parser(prog="dptrain run", allow_abbrev=False, add_help=False)
    add_config_flags(parser, only=RUN_FLAGS)
    ours, rest = parser.parse_known_args(head)
    return vars(ours), rest + tail


def run_script(script: str, args: list[str]) -> int:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *args]`` (module-level, so
    that a spawned worker can import it); returns its exit status."""
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python SCRIPT` does
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def worker(script: str, args: list[str]) -> None:
    """A launched worker: the script; a non-zero exit status fails this worker."""
    code = run_script(script, args)
    if code:
        raise SystemExit(code)


def cmd_run(args: argparse.Namespace) -> int:
    from dptrain import dist, launch
    from dptrain.config import TrainConfig, coerce
    from dptrain.plan import make_plan

    given = {name: getattr(args, name) for name in RUN_FLAGS if hasattr(args, name)}
    script, rest = args.script, list(args.args)
    if script == SEPARATOR:  # `dptrain run [FLAGS] -- SCRIPT ARGS`: all of ARGS is the script's
        if not rest:
            raise UsageError("no SCRIPT after --; usage: dptrain run [FLAGS] SCRIPT [ARGS]")
        script, rest = rest[0], [SEPARATOR, *rest[1:]]
    after, script_args = split_args(rest)
    given.update(after)
    if not os.path.isfile(script):
        raise UsageError(f"script {script} does not exist (or is not a file); check the path")
    cfg = TrainConfig(**coerce(given, source="dptrain run")).validate()
    plan = make_plan(cfg, dist.detect())
    if plan.launch != "workers":  # one process, or torchrun/srun started this one
        return run_script(script, script_args)
    try:
        launch.launch(worker, (script, script_args), nproc=plan.nproc,
                      nnodes=plan.nnodes, node_rank=cfg.node_rank,
                      master_addr=cfg.master_addr, master_port=cfg.master_port,
                      max_restarts=cfg.max_restarts, rdzv_timeout_s=int(cfg.timeout_s))
    except launch.Interrupted as exc:
        print(f"stopped by {exc.name}: the workers were stopped; run the script again to "
              "continue (a Session resumes with session.resume)", file=sys.stderr)
        return exc.exit_code
    return 0
