"""A lender in a thread of its own, for synchronous tests that need a real lender socket.

It speaks the lease protocol with devmodel_wire.lease's `LenderConnection` over a blocking unix
socket: it serves the first borrower that connects, answers HELLO and PING, records the
borrower's BYE, and hands every event to `handle`, which subclasses override to lend. Errors
are recorded in `errors`, never lost in the thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from pathlib import Path

import devmodel_wire.lease as lp
from devmodel.unixfds import recv_nowait, send_nowait
from pyvfio_user.sansio import CLOSED, NEED_DATA

POLL = 0.1  # how often the thread looks at `close()`


class ThreadedLender:
    """Serves one borrower on `path` from a thread until BYE, the end of the stream or close()."""

    name = "threaded-lender"
    """What this lender calls itself in its HELLO."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hello: lp.Hello | None = None
        self.bye: lp.Bye | None = None
        self.errors: list[str] = []
        self.connected = threading.Event()  # HELLO answered
        self.ended = threading.Event()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._conn = lp.LenderConnection()
        self._buf = bytearray(65536)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # ---------------------------------------------------------------- for subclasses

    def handle(self, event: lp.Event) -> None:
        """Called for every event the borrower sends, after the answers the base class gives."""

    def session_ended(self) -> None:
        """Called once the session is over, in the lender's thread: release what it used."""

    def send(self, event: lp.Event) -> None:
        """One message, its fds with its first bytes (docs/lease-protocol.md 5)."""
        assert self._sock is not None, "no borrower is connected"
        out = self._conn.send(event)
        data = memoryview(out.data)
        sent = send_nowait(self._sock, data, out.fds)
        self._sock.sendall(data[sent:])

    # ---------------------------------------------------------------- the thread

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self._listener], [], [], POLL)
                if ready:
                    sock, _ = self._listener.accept()
                    with sock:
                        self._sock = sock
                        self._session(sock)
                    return
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.ended.set()

    def _session(self, sock: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([sock], [], [], POLL)
                if not ready:
                    continue
                n, fds = recv_nowait(sock, self._buf)
                self._conn.receive_data(self._buf[:n], fds)
                if not self._drain():
                    return
        finally:
            self._conn.close()
            self.session_ended()

    def _drain(self) -> bool:
        """Handle every event buffered; False once the session is over."""
        while True:
            try:
                event = self._conn.next_event()
            except lp.LeaseProtocolError as exc:
                self.errors.append(f"protocol error: {exc}")
                if exc.reply is not None:
                    self.send(exc.reply)
                if exc.fatal:
                    return False
                continue
            if event is NEED_DATA:
                return True
            if event is CLOSED:
                return False
            assert not isinstance(event, type(NEED_DATA))
            self._answer(event)
            self.handle(event)
            if isinstance(event, lp.Bye):
                return False

    def _answer(self, event: lp.Event) -> None:
        if isinstance(event, lp.Hello):
            self.hello = event
            self.send(self._conn.hello_reply(name=self.name))
            self.connected.set()
        elif isinstance(event, lp.Ping):
            self.send(lp.Pong(event.token))
        elif isinstance(event, lp.Bye):
            self.bye = event
