"""Helpers shared by the lease-protocol tests (this module holds no tests itself)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import devmodel_wire.lease as lp
from devmodel_wire.lease.constants import HEADER_SIZE
from devmodel_wire.lease.wire import HEADER
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA, Sentinel

MiB = 1 << 20
GUEST = 7
APERTURE = 256 * MiB
GRANULE = 2 * MiB
RW = 3


def borrower_hello(**changes: object) -> lp.Hello:
    fields: dict[str, object] = {
        "guest_id": GUEST,
        "aperture_size": APERTURE,
        "granule": GRANULE,
        "features": 0,
        "max_leases": 0,
        "name": "devmodel",
    }
    fields.update(changes)
    return lp.Hello(**fields)  # type: ignore[arg-type]


def lender_hello(**changes: object) -> lp.Hello:
    return borrower_hello(**{"name": "gpu-lender", **changes})


def raw_message(msg_type: int, msg_id: int = 0, body: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(msg_type, flags, HEADER_SIZE + len(body), msg_id) + body


class FdPool:
    """Real fds for tests (pipe read ends), all closed at the end whoever owned them last."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def new(self) -> int:
        r, w = os.pipe()
        self._fds += (r, w)
        return r

    def close(self) -> None:
        for fd in self._fds:
            with suppress(OSError):
                os.close(fd)
        self._fds.clear()


@contextmanager
def fd_pool() -> Iterator[FdPool]:
    pool = FdPool()
    try:
        yield pool
    finally:
        pool.close()


def open_pair() -> tuple[lp.BorrowerConnection, lp.LenderConnection]:
    """A borrower and a lender connection that have completed the handshake."""
    borrower, lender = lp.BorrowerConnection(), lp.LenderConnection()
    out = borrower.send(borrower_hello())
    lender.receive_data(out.data)
    assert isinstance(lender.next_event(), lp.Hello)
    out = lender.send(lender.hello_reply("gpu-lender"))
    borrower.receive_data(out.data)
    assert isinstance(borrower.next_event(), lp.Hello)
    return borrower, lender


def borrower_hello_sent() -> lp.BorrowerConnection:
    """A borrower that said HELLO and waits for the lender's."""
    conn = lp.BorrowerConnection()
    conn.send(borrower_hello())
    return conn


def borrower_open() -> lp.BorrowerConnection:
    """OPEN with PAGE_IN and PING 1..3 outstanding, so that small ids match something."""
    conn, _ = open_pair()
    for i in (1, 2, 3):
        conn.send(lp.PageIn(i, (i - 1) * GRANULE, GRANULE, lp.Access.WRITE))
        conn.send(lp.Ping(i))
    return conn


def lender_open() -> lp.LenderConnection:
    """OPEN with leases 1..3 granted (fd 0: only a number to a sans-IO connection), PING 1..3
    and a REVOKE of lease 1 outstanding."""
    _, conn = open_pair()
    for i in (1, 2, 3):
        conn.send(lp.Grant(i, (i - 1) * GRANULE, GRANULE, 0, RW, 0))
        conn.send(lp.Ping(i))
    conn.send(lp.Revoke(1, lp.RevokeMode.EVICT))
    return conn


def deliver(
    sender: lp.BorrowerConnection | lp.LenderConnection,
    receiver: lp.BorrowerConnection | lp.LenderConnection,
    event: lp.Event,
) -> lp.Event:
    """Send `event` through `sender` and return what `receiver` makes of it."""
    out = sender.send(event)
    receiver.receive_data(out.data, out.fds)
    got = receiver.next_event()
    assert not isinstance(got, Sentinel), got
    return got


@dataclass(frozen=True)
class Failure:
    """A raised error as the tests compare it."""

    fatal: bool
    code: int
    reply: lp.Event | None


Outcome = lp.Event | Failure | Sentinel


def drain(conn: lp.BorrowerConnection | lp.LenderConnection) -> list[Outcome]:
    """Everything next_event() yields until NEED_DATA, CLOSED or a fatal error."""
    seen: list[Outcome] = []
    while True:
        # `drained()` promises NEED_DATA (a receiver stops on it without asking again).
        drained = conn.drained()
        try:
            got = conn.next_event()
            assert got is NEED_DATA or not drained, got
        except lp.LeaseProtocolError as exc:
            seen.append(Failure(exc.fatal, exc.code, exc.reply))
            if exc.fatal:
                return seen
            continue
        except ProtocolError as exc:  # pragma: no cover - would be a bug: wrong class raised
            raise AssertionError(f"plain ProtocolError escaped: {exc}") from exc
        if got is NEED_DATA:
            return seen
        seen.append(got)
        if got is CLOSED:
            return seen


def feed_all(
    conn: lp.BorrowerConnection | lp.LenderConnection,
    chunks: Sequence[tuple[bytes, Sequence[int]]],
    eof: bool = True,
) -> list[Outcome]:
    """Feed chunks one by one, draining after each; stop at the first fatal error."""
    seen: list[Outcome] = []
    for data, fds in chunks:
        conn.receive_data(data, fds)
        seen += drain(conn)
        if seen and isinstance(seen[-1], Failure) and seen[-1].fatal:
            return seen
    if eof:
        conn.receive_data(b"")
        seen += drain(conn)
    return seen


# One valid sample of every message, for round trips and the exhaustive table tests.
def sample_events(fd: int) -> list[lp.Event]:
    return [
        borrower_hello(features=0x5, max_leases=64, name="devmodel-ü"),
        lp.Bye(lp.ByeReason.GUEST_REFUSED, "guest 7 is not mine"),
        lp.Bye(),
        lp.Error(0x7777, 99, lp.ErrorCode.UNKNOWN_TYPE, "what is this"),
        lp.Ping(0xFFFF_FFFF_FFFF_FFFF),
        lp.Pong(0),
        lp.Grant(1, 2 * MiB, 4 * MiB, 6 * MiB, RW, fd, 0),
        lp.GrantAck(1),
        lp.GrantNack(1, lp.NackReason.FD_NOT_SEALED, "add F_SEAL_SHRINK"),
        lp.Revoke(1, lp.RevokeMode.EVICT),
        lp.Revoke(2, lp.RevokeMode.RELEASE),
        lp.Revoked(1),
        lp.PageIn(3, 8 * MiB, 2 * MiB, lp.Access.READ),
        lp.PageIn(4, 8 * MiB, 2 * MiB, lp.Access.WRITE),
        lp.PageInDone(3, lp.PageInStatus.OK),
        lp.PageInDone(4, lp.PageInStatus.NO_MEMORY, "VRAM budget exhausted"),
    ]
