"""launch's pure parts: which worker failures are a lost peer (the survivor then waits, so
that the launcher reports the peer's own failure, the cause)."""

from __future__ import annotations

import signal
import time

import pytest

from dptrain import launch
from dptrain.strategies.shm import ShmError


@pytest.mark.parametrize("message", [
    "shared-memory all-reduce: rank 1 (pid 4242) died",
    "shared-memory all-reduce: rank 2 failed in this collective (see its error)",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
    "[127.0.0.1]:41234",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection reset by peer",
])
def test_a_lost_peer_is_recognised_through_the_exception_chain(message):
    assert launch.peer_lost(ShmError(message))
    try:
        try:
            raise RuntimeError(message)
        except RuntimeError as inner:
            raise ValueError("while reducing the bucket") from inner
    except ValueError as outer:
        assert launch.peer_lost(outer)


@pytest.mark.parametrize("exc", [ValueError("injected failure in rank 1"),
                                 ShmError("shared-memory all-reduce: timed out after 5 s "
                                          "(--timeout-s) waiting for rank(s) 1")])
def test_a_worker_s_own_failure_is_not_a_lost_peer(exc):
    assert not launch.peer_lost(exc)


def test_the_survivor_of_a_lost_peer_fails_after_the_grace_and_others_at_once(monkeypatch):
    monkeypatch.setattr(launch, "PEER_LOST_GRACE_S", 0.3)
    # the entry point sets the worker's SIGINT handler: keep pytest's
    monkeypatch.setattr(signal, "signal", lambda *a: None)

    def failing(exc: Exception):  # noqa: ANN202
        def fn() -> None:
            raise exc
        return fn

    for exc, least, most in ((ShmError("shared-memory all-reduce: rank 1 (pid 7) died"), 0.3,
                              5.0), (ValueError("own bug"), 0.0, 0.2)):
        t0 = time.monotonic()
        with pytest.raises(type(exc)):
            launch._WorkerMain(failing(exc))()
        assert least <= time.monotonic() - t0 < most


def test_a_node_that_cannot_reach_node_0_is_one_error_and_one_that_can_goes_on():
    """Node 1 started before node 0, or a wrong --master-addr/--master-port: torch's agent
    printed a C++ stack trace per retry and a 90-line traceback, exit 1."""
    import socket

    from dptrain.errors import UsageError

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=rf"node 1 could not reach node 0's rendezvous at "
                                         rf"127.0.0.1:{port} within 0.6 s \(--timeout-s; "):
        launch._wait_for_node_0("127.0.0.1", port, 1, 0.6)
    assert 0.5 < time.monotonic() - t0 < 5
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        launch._wait_for_node_0("127.0.0.1", server.getsockname()[1], 1, 5)
