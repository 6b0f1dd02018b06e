"""Stopping `devmodel run` the ways toolstacks do: SIGTERM, SIGINT, SIGHUP (libxl) and `quit`.

Each is a clean stop against a real process: exit status 0, the vfio-user socket, the control
socket (and the directory devmodel created for it) and the pidfile removed, the control
clients told SHUTDOWN, and the lender told BYE (a tiny fake lender records it).
"""

from __future__ import annotations

import fcntl
import signal
import socket
import termios
import time
from pathlib import Path

import pytest

from devmodel.control.client import ConnectionLost
from devmodel.testing import ThreadedLender
from tests.integration.launching import Launched, launch


class ByeRecorder(ThreadedLender):
    """A lender that answers HELLO (and PING), lends nothing, and records the borrower's BYE."""

    name = "bye-recorder"


def files_of(dm: Launched) -> list[Path]:
    return [
        Path(dm.socket_path),
        Path(dm.control_path),
        Path(dm.control_path).parent,
        Path(dm.pidfile),
    ]


def unread_control_client(dm: Launched) -> socket.socket:
    """A control client that never reads: its replies fill the socket and devmodel's queue
    holds the rest, so a stop waits (up to CONTROL_FLUSH) to flush it. Returns once the replies
    stopped coming (the socket is full), however long the machine takes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(dm.control_path)
    sock.sendall(b'{"execute":"qmp_capabilities"}\n' + b'{"execute":"query-metrics"}\n' * 200)
    deadline = time.monotonic() + 30  # guards against a hang, not measures
    queued = [-1, -2, -3]
    while queued[-1] <= 0 or len(set(queued[-3:])) > 1:
        assert time.monotonic() < deadline, (queued[-3:], dm.stderr())
        time.sleep(0.05)
        queued.append(int.from_bytes(fcntl.ioctl(sock, termios.FIONREAD, bytes(4)), "little"))
    return sock


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGHUP", "quit"])
def test_a_stop_is_clean_files_removed_lender_told_bye(tmp_path: Path, how: str) -> None:
    lender = ByeRecorder(tmp_path / "lender.sock")
    dm = launch(tmp_path, "--lender-socket", str(lender.path), "--domid", "9")
    try:
        assert lender.connected.wait(10), dm.stderr()
        assert lender.hello is not None and lender.hello.guest_id == 9
        assert all(p.exists() for p in files_of(dm))
        with dm.control() as watcher:
            if how == "quit":
                with dm.control() as ctl:
                    assert ctl.execute("quit") == {}
            else:
                dm.proc.send_signal(getattr(signal, how))
            shutdown = watcher.read_event(timeout=10)
            assert shutdown.name == "SHUTDOWN"
            reason = str(shutdown.data["reason"])
            assert reason == how if how != "quit" else reason.startswith("quit from control")
            with pytest.raises(ConnectionLost):
                watcher.read_event(timeout=10)
        assert dm.proc.wait(15) == 0, dm.stderr()
        assert lender.ended.wait(10)
        assert lender.bye is not None, dm.stderr()
        assert lender.bye.text == "stopping"
        assert not lender.errors
        for path in files_of(dm):
            assert not path.exists(), path
        log = dm.stderr()
        assert "stopping" in log and "stopped; counters: {" in log.strip().splitlines()[-1]
        assert "lender_losses': 0" in log  # stopping is no lender failure
    finally:
        dm.kill()
        lender.close()


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    """While a stop waits (here for a control client's unread SHUTDOWN event: up to 0.5 s),
    another signal ends the process by the signal's default action.

    The second signal goes once the log says the stop began, not after a fixed sleep: under
    load, a signal sent before devmodel handled the first one merges with it (one pending
    SIGTERM) and the stop is a clean one."""
    dm = launch(tmp_path)
    try:
        sock = unread_control_client(dm)
        deadline = time.monotonic() + 30  # guards against a hang, not measures
        dm.proc.send_signal(signal.SIGTERM)
        while "SIGTERM: stopping" not in dm.stderr():
            assert dm.proc.poll() is None, dm.stderr()
            assert time.monotonic() < deadline, dm.stderr()
            time.sleep(0.005)
        dm.proc.send_signal(signal.SIGTERM)
        assert dm.proc.wait(10) == -signal.SIGTERM
        sock.close()
    finally:
        dm.kill()


def test_a_signal_during_a_stop_for_another_reason_joins_it(tmp_path: Path) -> None:
    """A stop that no signal began (`quit`; under Xen, the guest's end) keeps the handlers: the
    toolstack's SIGTERM that follows joins the stop in progress, which ends cleanly."""
    dm = launch(tmp_path)
    try:
        sock = unread_control_client(dm)
        deadline = time.monotonic() + 30  # guards against a hang, not measures
        with dm.control() as ctl:
            assert ctl.execute("quit") == {}
        while ": stopping" not in dm.stderr():
            assert dm.proc.poll() is None, dm.stderr()
            assert time.monotonic() < deadline, dm.stderr()
            time.sleep(0.005)
        dm.proc.send_signal(signal.SIGTERM)
        assert dm.proc.wait(10) == 0, dm.stderr()
        log = dm.stderr()
        assert "SIGTERM: already stopping (quit from control" in log, log
        assert "stopped; counters: {" in log.strip().splitlines()[-1]
        sock.close()
    finally:
        dm.kill()
