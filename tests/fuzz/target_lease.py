"""Fuzz target: lease-protocol connections (devmodel_wire.lease), both roles, with fds.

The stream goes to a borrower that sent HELLO, a fresh lender, or either side OPEN with
requests outstanding (small ids match them), optionally after the HELLO that opens the
session; chunks may carry real eventfds. Every request is answered as a correct peer would,
and every refusal's reply is sent. Invariants (docs/lease-protocol.md):

- nothing but LeaseProtocolError escapes (not even a plain ProtocolError); the state is
  always one of the role's states;
- a non-fatal error leaves the session OPEN and its reply (an ERROR naming the refused
  message, or a GRANT_NACK for a reused lease id) is accepted by send(); a fatal one leaves
  the connection in ERROR, every later call raises fatal again, and its reply is a BYE (or
  nothing), which send() accepts;
- every answer a correct peer gives to a delivered request is accepted by send();
- every fd fed in is inside a delivered GRANT (and still open) or closed by the connection;
- the stream stays in sync: an OPEN connection with no partial message buffered takes a PING
  appended to the stream as that PING, whatever was refused before it;
- chunking does not matter: without fds, the chunked stream gives what the whole stream gives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import devmodel_wire.lease as lp
from devmodel_wire.lease.connection import ROLE_STATES
from devmodel_wire.lease.wire import encode
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA
from tests.fuzz.common import FdLedger, Plan, fds_for, parse_plan
from tests.unit.lease_protocol_support import (
    borrower_hello,
    borrower_hello_sent,
    borrower_open,
    lender_open,
)

Conn = lp.BorrowerConnection | lp.LenderConnection
SYNC_TOKEN = 0x5EED_5EED_5EED_5EED


VARIANTS: tuple[tuple[Callable[[], Conn], bytes], ...] = (
    (borrower_hello_sent, encode(borrower_hello(name="gpu-lender"))),
    (lp.LenderConnection, encode(borrower_hello())),
    (borrower_open, b""),
    (lender_open, b""),
)
"""A connection to start from and the HELLO that opens its session (if it needs one)."""


def _answer(conn: Conn, event: lp.Event) -> None:
    """What a correct peer sends back; send() must accept it while the session is OPEN."""
    answer: lp.Event | None = None
    if isinstance(conn, lp.LenderConnection) and isinstance(event, lp.Hello):
        answer = conn.hello_reply("fuzz")
    elif conn.state is not lp.State.OPEN:
        return
    elif isinstance(event, lp.Grant):
        assert isinstance(conn, lp.BorrowerConnection)
        reason = conn.check_grant(event)
        answer = (
            lp.GrantAck(event.lease_id) if reason is None else lp.GrantNack(event.lease_id, reason)
        )
    elif isinstance(event, lp.Revoke):
        answer = lp.Revoked(event.lease_id)
    elif isinstance(event, lp.PageIn):
        answer = lp.PageInDone(event.request_id, lp.PageInStatus.OK)
    elif isinstance(event, lp.Ping):
        answer = lp.Pong(event.token)
    if answer is not None:
        conn.send(answer)


def _refused(conn: Conn, exc: lp.LeaseProtocolError) -> str:
    """Check a raised error and send its reply; a summary for the outcome list."""
    assert isinstance(exc.code, int) and 0 < exc.code <= 255, exc.code
    assert conn.state in ROLE_STATES[conn.role], conn.state
    if exc.fatal:
        assert conn.state is lp.State.ERROR, f"{conn.state} after fatal {exc}"
        assert exc.reply is None or isinstance(exc.reply, lp.Bye), exc.reply
        if exc.reply is not None:
            conn.send(exc.reply)
        try:
            conn.next_event()
        except lp.LeaseProtocolError as again:
            assert again.fatal
        else:
            raise AssertionError("a failed connection parsed again")
        return f"fatal {exc.code}: {exc}"
    assert conn.state is lp.State.OPEN, f"non-fatal {exc} in {conn.state}"
    reply = exc.reply
    if reply is not None:
        if isinstance(reply, lp.Error):
            assert reply.code == exc.code, (reply, exc.code)
        else:
            assert isinstance(reply, lp.GrantNack), reply
            assert exc.code == lp.ErrorCode.DUPLICATE_ID
        conn.send(reply)
    return f"refused {exc.code}: {exc}"


def drive(conn: Conn, chunks: list[tuple[bytes, list[int]]], eof: bool) -> list[Any]:
    outcomes: list[Any] = []
    feeds = [*chunks, (b"", [])] if eof else chunks
    for data, fds in feeds:
        conn.receive_data(data, fds)  # also after a fatal error: it must close the fds
        while conn.state is not lp.State.ERROR:
            try:
                event = conn.next_event()
            except lp.LeaseProtocolError as exc:
                outcomes.append(_refused(conn, exc))
                continue
            except ProtocolError as exc:
                raise AssertionError(f"a plain ProtocolError escaped: {exc}") from exc
            assert conn.state in ROLE_STATES[conn.role], conn.state
            if event is NEED_DATA:
                break
            outcomes.append(event)
            if event is CLOSED:
                break
            _answer(conn, event)
    return outcomes


def _check_sync(conn: Conn) -> None:
    if conn.state is not lp.State.OPEN or len(conn._buf) > conn._read:
        return
    conn.receive_data(encode(lp.Ping(SYNC_TOKEN)))
    event = conn.next_event()
    assert event == lp.Ping(SYNC_TOKEN), f"stream out of sync: {event}"
    assert conn.next_event() is NEED_DATA


def _chunks(plan: Plan, prefix: bytes, ledger: FdLedger | None) -> list[tuple[bytes, list[int]]]:
    batches = ledger.batches if ledger is not None else [[] for _ in plan.chunks]
    head: list[tuple[bytes, list[int]]] = [(prefix, [])] if prefix else []
    return head + list(zip(plan.chunks, batches, strict=True))


def one_input(data: bytes) -> None:
    plan = parse_plan(data)
    make, hello = VARIANTS[plan.variant % len(VARIANTS)]
    prefix = hello if plan.alternate else b""
    conn = make()
    with fds_for(plan) as ledger:
        outcomes = drive(conn, _chunks(plan, prefix, ledger), plan.eof)
        if not plan.eof:
            _check_sync(conn)
        elif conn.state is not lp.State.ERROR:
            assert outcomes and outcomes[-1] is CLOSED, outcomes[-3:]
        conn.close()
        ledger.check({e.fd for e in outcomes if isinstance(e, lp.Grant)})
    if not plan.carries_fds and len(plan.chunks) > 1:
        whole: list[tuple[bytes, list[int]]] = [(plan.stream, [])] if plan.stream else []
        head: list[tuple[bytes, list[int]]] = [(prefix, [])] if prefix else []
        again = drive(make(), head + whole, plan.eof)
        assert again == outcomes, f"chunking changed the outcome: {outcomes} {again}"
