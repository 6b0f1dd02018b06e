"""Stopping `devmodel run` the ways toolstacks do: SIGTERM, SIGINT, SIGHUP (libxl) and `quit`.

Each is a clean stop against a real process: exit status 0, the vfio-user socket, the control
socket (and the directory devmodel created for it) and the pidfile removed, the control
clients told SHUTDOWN, and the lender told BYE (a tiny fake lender records it).
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from devmodel.control.client import ConnectionLost
from devmodel_wire.lease import Bye, Event, Hello, LeaseProtocolError, LenderConnection, Ping, Pong
from pyvfio_user.sansio import CLOSED, NEED_DATA
from tests.integration.test_cli_run import Launched, launch


class ByeRecorder:
    """A lender that answers HELLO (and PING), lends nothing, and records the borrower's BYE."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hello: Hello | None = None
        self.bye: Bye | None = None
        self.connected = threading.Event()
        self.ended = threading.Event()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self._listener], [], [], 0.1)
                if ready:
                    sock, _ = self._listener.accept()
                    with sock:
                        self._session(sock)
                    return
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.ended.set()

    def _session(self, sock: socket.socket) -> None:
        conn = LenderConnection()
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.1)
            if not ready:
                continue
            data = sock.recv(65536)  # a borrower sends no fds
            conn.receive_data(data, [])
            while True:
                try:
                    event = conn.next_event()
                except LeaseProtocolError as exc:
                    self.errors.append(str(exc))
                    return
                if event is NEED_DATA:
                    break
                if event is CLOSED:
                    return
                assert not isinstance(event, type(NEED_DATA))
                self._handle(sock, conn, event)

    def _handle(self, sock: socket.socket, conn: LenderConnection, event: Event) -> None:
        if isinstance(event, Hello):
            self.hello = event
            sock.sendall(conn.send(conn.hello_reply(name="bye-recorder")).data)
            self.connected.set()
        elif isinstance(event, Ping):
            sock.sendall(conn.send(Pong(event.token)).data)
        elif isinstance(event, Bye):
            self.bye = event


def files_of(dm: Launched) -> list[Path]:
    return [
        Path(dm.socket_path),
        Path(dm.control_path),
        Path(dm.control_path).parent,
        Path(dm.pidfile),
    ]


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
    another signal ends the process by the signal's default action."""
    dm = launch(tmp_path)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(dm.control_path)
        sock.sendall(b'{"execute":"qmp_capabilities"}\n' + b'{"execute":"query-metrics"}\n' * 200)
        # Never read: the replies fill the socket and the queue holds the rest.
        time.sleep(0.5)
        dm.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        dm.proc.send_signal(signal.SIGTERM)
        assert dm.proc.wait(10) == -signal.SIGTERM
        sock.close()
    finally:
        dm.kill()
