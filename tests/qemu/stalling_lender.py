"""A lender that never answers a page-in: the guest-visible worst case of a stuck lender.

It speaks the lease protocol with devmodel_wire.lease's `LenderConnection` from a thread (the
tests are synchronous and need nothing from trio here): it lends the whole aperture, one lease
per granule, from one sealed memfd; evicts the windows it was asked to evict as soon as the
borrower has acknowledged every grant; and then records every PAGE_IN and answers none of them.
PINGs are answered, so the borrower's keepalive keeps the session up and the only thing wrong
is the missing page-in answer.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import select
import socket
import threading
import time
from pathlib import Path

from devmodel_wire.lease import (
    Bye,
    Event,
    Grant,
    GrantAck,
    GrantNack,
    Hello,
    LeaseProtocolError,
    LenderConnection,
    PageIn,
    Ping,
    Pong,
    Revoke,
    Revoked,
    RevokeMode,
)
from pyvfio_user.sansio import CLOSED, NEED_DATA

PROT_READ_WRITE = 3
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_FD_SIZE = array.array("i").itemsize


class StallingLender:
    """Serves one borrower on `path`; windows listed in `evict` (granule indexes) are evicted
    right after the grants and their page-ins are never answered."""

    def __init__(self, path: Path, evict: tuple[int, ...] = (1,)) -> None:
        self.path = path
        self.evict = evict
        self.hello: Hello | None = None
        self.acked: set[int] = set()
        self.nacked: list[GrantNack] = []
        self.revoked: set[int] = set()
        self.page_ins: list[tuple[float, PageIn]] = []
        self.errors: list[str] = []
        self.evicted = threading.Event()  # every window in `evict` is REVOKED
        self.ended = threading.Event()
        self._lease_of_window: dict[int, int] = {}
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, name="stalling-lender", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
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
        except Exception as exc:  # reported to the test, never lost in a thread
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.ended.set()

    def _session(self, sock: socket.socket) -> None:
        conn = LenderConnection()
        memfd: int | None = None
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([sock], [], [], 0.1)
                if not ready:
                    continue
                data, ancdata, _flags, _ = sock.recvmsg(
                    65536, socket.CMSG_SPACE(16 * _FD_SIZE))
                fds: list[int] = []
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        usable = len(payload) - len(payload) % _FD_SIZE
                        fds.extend(array.array("i", payload[:usable]))
                conn.receive_data(data, fds)
                while True:
                    try:
                        event = conn.next_event()
                    except LeaseProtocolError as exc:
                        self.errors.append(f"protocol error: {exc}")
                        if exc.reply is not None:
                            self._send(sock, conn, exc.reply)
                        continue
                    if event is NEED_DATA:
                        break
                    if event is CLOSED:
                        return
                    assert not isinstance(event, type(NEED_DATA))
                    memfd = self._handle(sock, conn, event, memfd)
                    if isinstance(event, Bye):
                        return
        finally:
            if memfd is not None:
                os.close(memfd)
            conn.close()

    def _handle(self, sock: socket.socket, conn: LenderConnection, event: Event,
                memfd: int | None) -> int | None:
        if isinstance(event, Hello):
            self.hello = event
            self._send(sock, conn, conn.hello_reply(name="stalling-lender"))
            memfd = os.memfd_create("stalling-lender", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(memfd, event.aperture_size)
            fcntl.fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK)
            for window in range(event.aperture_size // event.granule):
                lease = window + 1
                self._lease_of_window[window] = lease
                offset = window * event.granule
                self._send(sock, conn, Grant(lease_id=lease, offset=offset, length=event.granule,
                                             fd_offset=offset, prot=PROT_READ_WRITE, fd=memfd))
        elif isinstance(event, GrantAck):
            self.acked.add(event.lease_id)
            if len(self.acked) == len(self._lease_of_window):
                for window in self.evict:
                    self._send(sock, conn,
                               Revoke(self._lease_of_window[window], RevokeMode.EVICT))
        elif isinstance(event, GrantNack):
            self.nacked.append(event)
        elif isinstance(event, Revoked):
            self.revoked.add(event.lease_id)
            if {self._lease_of_window[w] for w in self.evict} <= self.revoked:
                self.evicted.set()
        elif isinstance(event, PageIn):
            self.page_ins.append((time.monotonic(), event))  # and never answered
        elif isinstance(event, Ping):
            self._send(sock, conn, Pong(event.token))
        return memfd

    @staticmethod
    def _send(sock: socket.socket, conn: LenderConnection, event: Event) -> None:
        """One sendmsg per message, its fds with its first bytes (docs/lease-protocol.md 5)."""
        out = conn.send(event)
        data = memoryview(out.data)
        if out.fds:
            sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", out.fds))])
            data = data[sent:]
        if data:
            sock.sendall(data)
