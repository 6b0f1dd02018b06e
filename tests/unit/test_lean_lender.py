"""bench/lean_lender.py, the benchmark's lender: its bytes are the protocol's, and it behaves as
a lender must (a PAGE_IN behind a REVOKE is served after REVOKED, with a new lease).

It builds messages with the wire module's structs instead of the sans-IO connection, to keep
its own time out of bench/run's lease figures; these tests hold it to the sans-IO side: every
message it sends is parsed by a `BorrowerConnection`, which refuses anything out of place.
"""

from __future__ import annotations

import array
import importlib.util
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import devmodel_wire.lease as lp
from devmodel_wire.lease.events import EVENT_TYPES
from devmodel_wire.lease.wire import encode
from pyvfio_user.sansio import NEED_DATA

BENCH = Path(__file__).resolve().parents[2] / "bench" / "lean_lender.py"
MiB = 1 << 20


@pytest.fixture(scope="module")
def ll() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("lean_lender", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_bytes_are_the_encoders(ll: ModuleType) -> None:
    fd = 99  # travels beside the bytes, not in them
    assert ll.grant_bytes(5, 2 * MiB, MiB, 4096, ll.RW) == encode(
        lp.Grant(5, 2 * MiB, MiB, 4096, ll.RW, fd)
    )
    assert ll.page_in_done_bytes(7) == encode(lp.PageInDone(7, lp.PageInStatus.OK))
    assert ll.revoke_bytes(3) == encode(lp.Revoke(3, lp.RevokeMode.EVICT))
    assert ll.ping_bytes(11) == encode(lp.Ping(11))
    assert ll.pong_bytes(12) == encode(lp.Pong(12))


class Borrower:
    """The other end of the socket: a BorrowerConnection fed by blocking receives."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = lp.BorrowerConnection()

    def send(self, event: lp.Event) -> None:
        self.sock.sendall(self.conn.send(event).data)

    def event(self) -> lp.Event:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, EVENT_TYPES), event
                return event
            data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(16))
            assert data, "the lender closed the socket"
            fds: list[int] = []
            for level, kind, payload in ancdata:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
            self.conn.receive_data(data, fds)

    def grant(self) -> lp.Grant:
        grant = self.event()
        assert isinstance(grant, lp.Grant), grant
        os.close(grant.fd)
        return grant


@pytest.fixture
def pair(ll: ModuleType) -> Iterator[tuple[object, Borrower]]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.settimeout(10)
    lender = ll.LeanLender(a, aperture=4 * MiB, window=2 * MiB)
    borrower = Borrower(b)
    borrower.send(lp.Hello(guest_id=7, aperture_size=4 * MiB, granule=2 * MiB))
    lender.handshake()
    assert isinstance(borrower.event(), lp.Hello)
    grants = [borrower.grant(), borrower.grant()]
    assert [(g.lease_id, g.offset, g.fd_offset) for g in grants] == [
        (1, 0, 0),
        (2, 2 * MiB, 2 * MiB),
    ]
    for g in grants:
        borrower.send(lp.GrantAck(g.lease_id))
    lender.ready()
    yield lender, borrower
    a.close()
    b.close()
    os.close(lender.home)


def test_page_in_of_a_resident_window_is_done_at_once(pair: tuple[object, Borrower]) -> None:
    lender, borrower = pair
    borrower.send(lp.PageIn(1, 0, 2 * MiB, lp.Access.READ))
    lender.receive()  # type: ignore[attr-defined]
    assert borrower.event() == lp.PageInDone(1, lp.PageInStatus.OK)
    assert lender.stats["page_ins"] == 1  # type: ignore[attr-defined]


def test_page_in_behind_a_revoke_waits_for_revoked(
    ll: ModuleType, pair: tuple[object, Borrower]
) -> None:
    lender, borrower = pair
    # The first half of lender.revoke(0), without its wait: REVOKE sent, window revoking.
    lender.sock.sendall(ll.revoke_bytes(1))  # type: ignore[attr-defined]
    lender.state[0] = ll.REVOKING  # type: ignore[attr-defined]
    assert borrower.event() == lp.Revoke(1, lp.RevokeMode.EVICT)
    borrower.send(lp.PageIn(1, 0, 2 * MiB, lp.Access.WRITE))
    borrower.send(lp.Revoked(1))
    while lender.stats["grants"] == 2:  # type: ignore[attr-defined]
        lender.receive()  # type: ignore[attr-defined]
    grant = borrower.grant()
    assert (grant.lease_id, grant.offset, grant.length) == (3, 0, 2 * MiB)
    assert borrower.event() == lp.PageInDone(1, lp.PageInStatus.OK)
    assert lender.state[0] == ll.RESIDENT  # type: ignore[attr-defined]


def test_ping_and_revoke_are_timed_to_their_answers(pair: tuple[object, Borrower]) -> None:
    lender, borrower = pair

    def answer() -> None:
        ping = borrower.event()
        assert isinstance(ping, lp.Ping)
        borrower.send(lp.Ping(500))  # devmodel's keepalive, crossing: answered on the way
        borrower.send(lp.Pong(ping.token))
        assert borrower.event() == lp.Pong(500)
        revoke = borrower.event()
        assert revoke == lp.Revoke(2, lp.RevokeMode.EVICT)
        borrower.send(lp.Revoked(2))

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        assert lender.ping() > 0  # type: ignore[attr-defined]
        assert lender.revoke(1) > 0  # type: ignore[attr-defined]
    finally:
        thread.join(10)
    assert not thread.is_alive()
    assert lender.state[1] == "evicted"  # type: ignore[attr-defined]
    assert lender.stats["errors"] == 0  # type: ignore[attr-defined]
