"""Start local workers through PyTorch's own elastic launcher (what ``torchrun`` runs).

No home-made process manager: :func:`launch` hands a picklable function to
``torch.distributed.launcher.api.elastic_launch``, which spawns ``nproc`` workers, sets their
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` environment, watches them, kills the rest
when one fails and restarts them up to ``max_restarts`` times.

A worker's failure comes back as :class:`WorkerFailure` carrying each failed rank's traceback;
a :class:`~dptrain.errors.UsageError` raised inside a worker comes back as a UsageError, so the
command still ends with one ``error:`` line and exit status 2. A signal to the launcher (SIGTERM,
SIGINT, ...) is forwarded to the workers by the agent, which then raises; it comes back as
:class:`Interrupted`.

Workers of dptrain's own commands (``fast_exit=True``) are forked from multiprocessing's fork
server, which imports torch and dptrain's worker modules once (:data:`WORKER_PRELOAD`); a
spawned worker imports torch itself (2.5 s on this project's VM). ``dptrain train --nproc N``
starts that server at the command's start (:func:`prestart_workers`), while the launcher
imports torch itself: on two or more cores both imports run at once. Workers of a user's
script (``dptrain run``) and of ``dptrain.fit`` are spawned (or forked), as before.

Single-node runs keep their rendezvous on loopback: the launcher binds the port itself, on
``--master-addr`` (127.0.0.1 by default), and hands that socket to the TCPStore the agent uses,
instead of letting it listen on every interface. Binding first is also the preflight check for
``--master-port``: a port already in use is an :class:`~dptrain.errors.UsageError`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from dptrain.errors import UsageError

_NOISY_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing",
                  "torch.distributed.launcher")


# After one worker failed, the agent stops the others with SIGTERM and waits this long before
# SIGKILL (torch's agent hard-codes 30 s there). Survivors cannot checkpoint anyway (their
# collectives have lost a peer), and a *hung* worker never reacts to SIGTERM: without this, a
# hang would keep the job alive for 30 s after --timeout-s has already fired.
STOP_GRACE_S = 5


class WorkerFailure(Exception):
    """One or more workers failed; ``str()`` is a report with each rank's traceback and
    ``headline`` one line that says what happened."""

    def __init__(self, report: str, exit_code: int = 1,
                 headline: str = "training failed") -> None:
        super().__init__(report)
        self.exit_code = exit_code
        self.headline = headline


_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)


def _headline(failures: list[tuple[int, Any]], node_ranks: range) -> str:
    """Name the culprit of a collective timeout: the ranks that did *not* fail themselves."""
    failed = [rank for rank, _ in failures]
    timed_out = [rank for rank, f in failures
                 if _TIMEOUT.search("\n".join(_failure_text(f).strip().splitlines()[-3:]))]
    if not timed_out:
        return f"training failed in worker rank {', '.join(map(str, failed))}"
    quiet = [r for r in node_ranks if r not in failed]
    who = " ".join(map(str, timed_out))
    if quiet:
        hung = ", ".join(map(str, quiet))
        return (f"rank {who} timed out in a collective (--timeout-s) waiting for rank {hung}, "
                f"which hung or stalled and was stopped; see rank {hung}'s code path, or raise "
                "--timeout-s if it is just slow")
    return (f"rank {who} timed out in a collective (--timeout-s): a rank on another node hung, "
            "died or is unreachable")


class Interrupted(Exception):
    """The launcher got a signal (SIGTERM, SIGINT, ...); the agent forwarded it to the workers
    (which checkpoint on SIGTERM if they can) and stopped them."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        super().__init__(f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _failure_text(failure: Any) -> str:
    message = failure.message
    if isinstance(message, dict):
        info = message.get("extraInfo", {})
        return info.get("py_callstack") or message.get("message", "")
    return str(message or "")


def _usage_error_text(failure: Any) -> str | None:
    message = failure.message
    if isinstance(message, dict):
        text = message.get("message", "")
        for prefix in ("UsageError: ", "dptrain.errors.UsageError: "):
            if text.startswith(prefix):
                return text[len(prefix):]
    return None


def _port_in_use(port: int, where: str) -> UsageError:
    return UsageError(f"--master-port {port} is already in use on {where} (another job or "
                      "service holds it); pick another --master-port, or leave it at 0 so that "
                      "a free one is chosen (single node)")


def _bind(addr: str, port: int) -> socket.socket:
    """A socket bound to ``addr:port`` (0 = any free port); a busy port is a UsageError."""
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--master-addr {addr!r} cannot be resolved ({exc.strerror}); use an "
                         "address of this machine, e.g. 127.0.0.1") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore does
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise _port_in_use(port, addr) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"--master-addr {addr} is not an address of this machine; a "
                             "single-node run needs a local one, e.g. 127.0.0.1") from None
        raise UsageError(f"cannot bind the rendezvous port {addr}:{port} ({exc.strerror or exc})"
                         "; pick another --master-port") from None
    return sock


def _check_port_free(port: int) -> None:
    """Multi-node, node 0: torch's store will listen on every interface; is the port free?"""
    _bind("0.0.0.0", port).close()


def _loopback_store(addr: str, port: int, timeout_s: int) -> tuple[Any, int]:
    """The rendezvous TCPStore of a single-node run, listening on ``addr`` only.

    torch's static rendezvous creates its store with ``multi_tenant=True``; a multi-tenant
    server already running in this process on that port is reused rather than a second one
    bound to every interface. So we start it first, on a socket we bound ourselves.
    """
    import torch.distributed as tdist

    from dptrain import dist

    sock = _bind(addr, port)
    try:
        # with loopback down, the store would fail only after the rendezvous timeout (and
        # then as "Bad file descriptor"); say so now, in one line
        dist.check_loopback(addr)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    fd = sock.detach()  # the store's server owns the descriptor from here on
    try:
        store = tdist.TCPStore(addr, port, 1, True, datetime.timedelta(seconds=timeout_s),
                               wait_for_workers=False, multi_tenant=True, master_listen_fd=fd)
    except BaseException:
        with contextlib.suppress(OSError):  # the store may have closed it already
            os.close(fd)
        raise
    return store, port


@contextlib.contextmanager
def _agent_with_stop_grace(grace_s: int) -> Iterator[None]:
    """torch's LocalElasticAgent, except that stopping the workers after a failure sends
    SIGKILL ``grace_s`` after SIGTERM instead of a fixed 30 s (see STOP_GRACE_S).

    Also, workers that returned exit at once when the agent stops them (see close_soon).

    torch stops the survivors in three places, each with a default of 30 s: the spawn context
    (``torch.multiprocessing``) when it joins a failed worker, the elastic process context
    right after, and the agent before a restart or after the last failure. A stop because the
    *launcher* got a signal passes its own timeout (``LaunchConfig.shutdown_timeout``) and
    keeps it: there the workers checkpoint. If torch's internals move, this degrades to
    torch's own behaviour (30 s), nothing worse.
    """
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.launcher import api

    class Agent(LocalElasticAgent):
        def _start_workers(self, worker_group: Any) -> dict[int, Any]:
            # the workers start with SIGINT blocked (the mask survives fork and exec): a
            # Ctrl-C to the terminal's process group while they import torch stays pending
            # until _WorkerMain, instead of a KeyboardInterrupt traceback from the middle of
            # an import. A Ctrl-C meanwhile reaches the launcher right after the spawn.
            with _sigint_blocked():
                pids = super()._start_workers(worker_group)
            context = getattr(self, "_pcontext", None)
            if context is not None:
                close = context.close

                def close_soon(death_sig: Any = None, timeout: int | None = None) -> None:
                    # A worker whose function returned (e.g. it checkpointed on SIGTERM) waits
                    # for this event before it exits; torch sets it only on success, so on a
                    # signal the agent would wait out the whole timeout, then SIGKILL it.
                    finished = getattr(context, "_worker_finished_event", None)
                    if finished is not None:
                        finished.set()
                    _stop_starting_workers(context)
                    close(death_sig, grace_s if timeout is None else timeout)

                context.close = close_soon
            spawned = getattr(context, "_pc", None)
            if spawned is not None and hasattr(spawned, "join"):
                join = spawned.join

                def join_soon(timeout: float | None = None,
                              grace_period: float | None = None) -> bool:
                    # waits up to grace_period for a clean exit, SIGTERM, grace_period, SIGKILL
                    return join(timeout, grace_s / 2 if grace_period is None else grace_period)

                spawned.join = join_soon
            return pids

        def _stop_workers(self, worker_group: Any) -> None:
            self._shutdown(timeout=grace_s)

    original = api.LocalElasticAgent
    api.LocalElasticAgent = Agent
    try:
        yield
    finally:
        api.LocalElasticAgent = original


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread (and in the processes it starts meanwhile)."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    # Starting multiprocessing's resource tracker *unblocks* SIGINT afterwards (it blocks it
    # around the tracker's own spawn); the first spawn starts it, so start it before we block.
    from multiprocessing import resource_tracker

    with contextlib.suppress(Exception):
        resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _starting(pid: int) -> bool:
    """Is worker ``pid`` still starting (SIGINT still blocked: not yet in _WorkerMain)?"""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("SigBlk:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except (OSError, ValueError, IndexError):
        pass
    return False


def _stop_starting_workers(context: Any) -> None:
    """Workers still importing (SIGINT blocked) would hold a stop up until they are ready to
    take it; they have nothing to save: SIGTERM ends them at once, quietly (no handler yet)."""
    with contextlib.suppress(Exception):
        for pid in context.pids().values():
            if _starting(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)


# A worker that lost a peer (it died, or failed inside a collective) waits this long before it
# fails in turn. torch's agent reports the first failed worker it finds at a poll (every
# monitor_interval, 0.1 s), the lowest local rank first when several have exited: without the
# wait, rank 0's "rank 1 died" often reached the report instead of rank 1's own traceback.
PEER_LOST_GRACE_S = 1.0
_PEER_LOST = re.compile(r"shared-memory all-reduce: rank \d+ (\(pid \d+\) died|failed in this)"
                        r"|[Cc]onnection (closed|reset) by peer|Broken pipe")


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it came from) says another worker is gone."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _PEER_LOST.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


class _WorkerMain:
    """A worker's entry point around ``fn``: SIGINT, blocked since the spawn (see
    ``_start_workers``), is delivered from here on. One that arrived during start-up raises
    KeyboardInterrupt now, which torch's worker wrapper swallows (the launcher reports the stop,
    once); so does one mid-training. It stays deliverable afterwards (torch makes a worker whose
    launcher died receive SIGINT), but then ends the process without a traceback."""

    def __init__(self, fn: Callable[..., Any], forked: bool = False,
                 env: dict[str, str] | None = None, unset: tuple[str, ...] = ()) -> None:
        self.fn = fn
        self.forked = forked
        # what the workers' environment lacks of the launcher's (a worker forked from the fork
        # server has the environment the server started with): variables to set, to unset
        self.env, self.unset = dict(env or {}), tuple(unset)
        # torch's launcher and agent name the entry point in their events
        self.__name__ = getattr(fn, "__name__", "worker")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)

    def __call__(self, *args: Any) -> Any:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        for name in self.unset:
            os.environ.pop(name, None)
        os.environ.update(self.env)
        if self.forked:
            from dptrain import _forkserver

            _forkserver.restore_hook()
            _drop_server_keepalive()
        try:
            result = self.fn(*args)
            if self.forked:
                _run_exit_handlers_at_the_end()
            return result
        except Exception as exc:
            if peer_lost(exc):  # let the agent see the peer's failure first: it is the cause
                time.sleep(PEER_LOST_GRACE_S)
            raise
        finally:
            # A Ctrl-C comes twice (the terminal's to the whole group, then the agent's
            # forward): one landing after the function, outside torch's wrapper, would print
            # a traceback. From here on SIGINT ends the worker at once, quietly.
            with contextlib.suppress(ValueError, OSError):  # not the main thread
                signal.signal(signal.SIGINT, _exit_on_signal)


def _exit_on_signal(signum: int, frame: Any) -> None:
    os._exit(128 + signum)


def _drop_server_keepalive() -> None:
    """A worker forked from the fork server inherits the launcher's end of the pipe that keeps
    the server alive (so that it could fork from the server itself). Holding it, the workers
    would keep the server alive after the launcher died, and the server them: torch makes a
    worker receive SIGINT when its parent -- here the server -- dies. Closed, the launcher's
    death ends the server, and that the workers."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    fd, server._forkserver_alive_fd = server._forkserver_alive_fd, None
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _run_exit_handlers_at_the_end() -> None:
    """A worker forked by multiprocessing ends with ``os._exit`` (no interpreter teardown, which
    is why the fork server's workers exit at once) and so never runs ``atexit`` handlers. Run
    them at its very end, as a spawned worker's exit would: from the last of multiprocessing's
    own exit finalizers, after torch's wrapper has sent the result; multiprocessing's exit
    function, which is running them, is not run twice."""
    import atexit
    from multiprocessing import util

    def run() -> None:
        atexit.unregister(util._exit_function)
        atexit._run_exitfuncs()

    util.Finalize(None, run, exitpriority=-(10**9))


#: what the fork server imports once: each worker forked from it starts with these imported
WORKER_PRELOAD = ("torch", "torch.distributed", "torch.distributed.elastic.multiprocessing.api",
                  "dptrain.cli", "dptrain.run", "dptrain.strategies", "dptrain._forkserver")


def fork_server_usable() -> bool:
    """Whether dptrain's own workers start from the fork server: POSIX with ``forkserver``,
    unless ``DPTRAIN_NO_FAST_EXIT=1`` asks for spawned workers with a normal exit."""
    import multiprocessing

    return ("forkserver" in multiprocessing.get_all_start_methods()
            and not os.environ.get("DPTRAIN_NO_FAST_EXIT"))


def prestart_workers() -> None:
    """Start multiprocessing's fork server now, importing :data:`WORKER_PRELOAD` in it.

    Cheap for the caller (the server imports in its own process); idempotent. The server
    starts with SIGINT blocked, and so does every worker forked from it, as spawned workers
    do (see ``_start_workers``). It ends when this process does."""
    if not fork_server_usable():
        return
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.set_forkserver_preload(list(WORKER_PRELOAD))
    with _sigint_blocked():
        forkserver.ensure_running()
    global _server_env
    pid = forkserver._forkserver._forkserver_pid
    if _server_env is None or _server_env[0] != pid:  # a new server
        _server_env = (pid, dict(os.environ))


def _reap_fork_server_at_exit() -> None:
    """After workers forked from the server have all finished: not on a failure or a Ctrl-C,
    where a worker still starting holds the server up (and a server still importing its
    preload would delay the exit)."""
    import atexit

    atexit.unregister(_reap_fork_server)  # once, however many launches
    atexit.register(_reap_fork_server)


def _reap_fork_server(wait_s: float = 1.0) -> None:
    """At this process's exit: stop the fork server and reap it, as a process reaps its
    children. Reaped, its CPU time and its workers' (which it reaps) count among this
    process's children's (``getrusage``), as spawned workers' do: a benchmark that measures
    what else loads the machine reads them there; unreaped, the server would end an orphan.
    Waits at most ``wait_s``: a server still busy stops by itself when it is done."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    with server._lock:
        pid, fd = server._forkserver_pid, server._forkserver_alive_fd
        if pid is None or fd is None:
            return
        # as multiprocessing's own stop: a later start makes a new server
        address, server._forkserver_address = server._forkserver_address, None
        server._forkserver_alive_fd = server._forkserver_pid = None
    os.close(fd)  # the server's signal to stop
    from multiprocessing import util

    if address and not util.is_abstract_socket_namespace(address):
        with contextlib.suppress(OSError):
            os.unlink(address)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() > deadline:
                return
        except ChildProcessError:
            return
        time.sleep(0.005)


_server_env: tuple[int | None, dict[str, str]] | None = None  # the fork server's pid, its env


def _environment_delta() -> tuple[dict[str, str], tuple[str, ...]]:
    """(to set, to unset) in a worker forked from the fork server for it to have this
    process's environment."""
    start = {} if _server_env is None else _server_env[1]
    now = dict(os.environ)
    return ({k: v for k, v in now.items() if start.get(k) != v},
            tuple(k for k in start if k not in now))


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the workers we spawn; restore ours afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """torch's agent installs handlers that raise SignalException and never removes them; after
    the launch, a signal must mean what it meant before (e.g. SIGINT -> KeyboardInterrupt)."""
    sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]
    saved = {sig: signal.getsignal(sig) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread / not ours
                signal.signal(sig, handler)


def _rendezvous(nnodes: int, node_rank: int, master_addr: str, master_port: int,
                timeout_s: float) -> tuple[Any, int, dict[str, str]]:
    """Where the agents meet: (the store this process hosts, or ``None``; its port; the
    workers' extra environment). One node: a store of our own on loopback. Several: node 0's
    agent hosts it at ``--master-addr:--master-port``; the others wait for it first."""
    from dptrain import dist

    if nnodes == 1:
        store, port = _loopback_store(master_addr, master_port, timeout_s)
        return store, port, _loopback_gloo_env()
    dist.check_master_addr(master_addr, "--master-addr")
    if node_rank == 0:
        _check_port_free(master_port)
    else:
        _wait_for_node_0(master_addr, master_port, node_rank, timeout_s)
    return None, master_port, {}


def _node_0_unreachable(addr: str, port: int, node_rank: int, timeout_s: float,
                        why: str) -> UsageError:
    return UsageError(f"node {node_rank} could not reach node 0's rendezvous at {addr}:{port} "
                      f"within {timeout_s:g} s (--timeout-s; {why}): start node 0 "
                      "(--node-rank 0) first or together with this one, and check "
                      "--master-addr, --master-port, the firewall and GLOO_SOCKET_IFNAME")


def _wait_for_node_0(addr: str, port: int, node_rank: int, timeout_s: float) -> None:
    """Wait until node 0's rendezvous store accepts connections (it may start after this
    node), or fail with one error line. torch's agent would retry too, but each failed try
    logs a C++ warning with its stack trace, and the last one ends in a traceback."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise _node_0_unreachable(addr, port, node_rank, timeout_s,
                                          str(exc.strerror or exc)) from None
        time.sleep(0.25)


def _loopback_gloo_env() -> dict[str, str]:
    """Single node: gloo's data connections on loopback too (unless the user chose)."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return {}
    with contextlib.suppress(OSError):
        if "lo" in {name for _, name in socket.if_nameindex()}:
            return {"GLOO_SOCKET_IFNAME": "lo"}
    return {}


def shm_problem() -> str | None:
    """Why POSIX shared memory (``/dev/shm`` on Linux) cannot hold a small segment here, or
    ``None``. A read-only or missing one is common in containers."""
    import multiprocessing

    try:
        multiprocessing.get_context("spawn").Lock()  # what the launcher's workers need
    except OSError as exc:
        return f"POSIX shared memory is not usable ({exc.strerror or exc})"
    return None


def launch(fn: Callable[..., Any], args: tuple[Any, ...], *, nproc: int, nnodes: int = 1,
           node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int = 0,
           max_restarts: int = 0, rdzv_timeout_s: int = 300, fast_exit: bool = False
           ) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` local workers; return ``{global_rank: result}``.

    ``fast_exit``: for dptrain's own worker functions: the workers are forked from the fork
    server (:func:`prestart_workers`) and end without an interpreter teardown; where there is
    no fork server (or with ``DPTRAIN_NO_FAST_EXIT=1``) they are spawned and exit normally."""
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    why = shm_problem()
    if why is not None:
        raise UsageError(f"{why}: local workers need it (multiprocessing's locks, the "
                         "shared-memory all-reduce); mount a writable /dev/shm (docker: "
                         "--shm-size 1g or --ipc=host), or train in one process")
    forked = fast_exit and fork_server_usable()
    if forked:
        prestart_workers()
    store, port, env = _rendezvous(nnodes, node_rank, master_addr, master_port, rdzv_timeout_s)
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=f"dptrain-{uuid.uuid4().hex[:8]}" if nnodes == 1 else f"dptrain-{port}",
        # torchrun's default: a static rendezvous hosted by node 0 at MASTER_ADDR:MASTER_PORT
        rdzv_backend="static",
        rdzv_endpoint=f"{master_addr}:{port}",
        rdzv_configs={"rank": node_rank, "timeout": rdzv_timeout_s},
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="forkserver" if forked else "spawn",
    )
    try:
        with _quiet_torch_loggers(), _agent_with_stop_grace(STOP_GRACE_S), _env(**env), \
                _own_signal_handlers():
            # inside _env(): a spawned worker inherits it, a forked one gets the difference
            add, unset = _environment_delta() if forked else ({}, ())
            results = elastic_launch(config, _WorkerMain(fn, forked, add, unset))(*args)
            if forked:
                _reap_fork_server_at_exit()
            return results
    except SignalException as exc:
        raise Interrupted(exc.sigval) from None
    except DistNetworkError as exc:  # node 0's store went away after _wait_for_node_0
        if nnodes == 1 or node_rank == 0:
            raise
        raise _node_0_unreachable(master_addr, port, node_rank, rdzv_timeout_s,
                                  str(exc).splitlines()[0][:200]) from None
    except ChildFailedError as exc:
        raise _failure(exc, range(node_rank * nproc, (node_rank + 1) * nproc)) from None
    finally:
        del store  # the rendezvous server stops with its last reference


@contextlib.contextmanager
def _quiet_torch_loggers() -> Iterator[None]:
    """We print failures ourselves, once, with the rank; torch gives some of these loggers
    their own level (e.g. the agent's "Received 15 death signal"), so the parents alone won't
    do."""
    noisy = [*_NOISY_LOGGERS, *(name for name in list(logging.root.manager.loggerDict)
                                if name.startswith(tuple(f"{n}." for n in _NOISY_LOGGERS)))]
    levels = {name: logging.getLogger(name).level for name in noisy}
    for name in noisy:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _failure(exc: Any, node_ranks: range) -> Exception:
    """A failed job as the error to raise: a worker's UsageError as itself, else every failed
    rank with its traceback."""
    failures = sorted(exc.failures.items())
    for _, failure in failures:
        text = _usage_error_text(failure)
        if text is not None:
            return UsageError(text)
    parts = [f"worker rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) failed "
             f"with exit code {failure.exitcode}:\n{_failure_text(failure).rstrip()}"
             for rank, failure in failures]
    # every failed rank exited with one status of its own (a script's sys.exit(3) under
    # `dptrain run`): that status; an exception or a signal: 1
    codes = {failure.exitcode for _, failure in failures}
    code = codes.pop() if len(codes) == 1 else 1
    return WorkerFailure("\n".join(parts), exit_code=code if isinstance(code, int) and code > 0
                         else 1, headline=_headline(failures, node_ranks))
