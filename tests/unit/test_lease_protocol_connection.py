"""Lease protocol connections: every state x every message, id bookkeeping, fds, end of stream.

The expected outcomes here are written from the specification's rules (docs/lease-protocol.md,
"Session states"), not read from the connection's tables, so that a wrong table entry fails.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterator

import pytest

import devmodel_wire.lease as lp
from devmodel.testing import fd_is_open
from devmodel_wire.lease.connection import (
    BORROWER_RECEIVE,
    BORROWER_SEND,
    LENDER_RECEIVE,
    LENDER_SEND,
    ROLE_STATES,
    TypeKey,
    Verdict,
)
from devmodel_wire.lease.events import EVENT_TYPES
from devmodel_wire.lease.wire import encode
from pyvfio_user.sansio import CLOSED, NEED_DATA
from tests.unit.lease_protocol_support import (
    APERTURE,
    GRANULE,
    RW,
    FdPool,
    borrower_hello,
    fd_pool,
    lender_hello,
    raw_message,
)

Conn = lp.BorrowerConnection | lp.LenderConnection
UNKNOWN = 0x7777

BORROWER_SENDS = frozenset(
    {
        lp.MsgType.HELLO,
        lp.MsgType.BYE,
        lp.MsgType.ERROR,
        lp.MsgType.PING,
        lp.MsgType.PONG,
        lp.MsgType.GRANT_ACK,
        lp.MsgType.GRANT_NACK,
        lp.MsgType.REVOKED,
        lp.MsgType.PAGE_IN,
    }
)
LENDER_SENDS = frozenset(
    {
        lp.MsgType.HELLO,
        lp.MsgType.BYE,
        lp.MsgType.ERROR,
        lp.MsgType.PING,
        lp.MsgType.PONG,
        lp.MsgType.GRANT,
        lp.MsgType.REVOKE,
        lp.MsgType.PAGE_IN_DONE,
    }
)


@pytest.fixture
def pool() -> Iterator[FdPool]:
    with fd_pool() as p:
        yield p


# -- getting a connection into each state -----------------------------------------------------


def _take(conn: Conn, data: bytes, fds: tuple[int, ...] = ()) -> lp.Event:
    conn.receive_data(data, fds)
    event = conn.next_event()
    assert isinstance(event, EVENT_TYPES), event
    return event


def _open_borrower(pool: FdPool) -> lp.BorrowerConnection:
    """OPEN, awaiting PAGE_IN 1 and PING 1, owing GRANT 1, GRANT 2, REVOKE 1 and PING 1."""
    conn = lp.BorrowerConnection()
    conn.send(borrower_hello())
    _take(conn, encode(lender_hello()))
    conn.send(lp.PageIn(1, 0, GRANULE, lp.Access.READ))
    conn.send(lp.Ping(1))
    for lease in (1, 2):
        grant = encode(lp.Grant(lease, (lease - 1) * GRANULE, GRANULE, 0, RW, 0))
        assert isinstance(_take(conn, grant, (pool.new(),)), lp.Grant)
    _take(conn, encode(lp.Revoke(1, lp.RevokeMode.EVICT)))
    _take(conn, encode(lp.Ping(1)))
    return conn


def _open_lender(pool: FdPool) -> lp.LenderConnection:
    """OPEN, awaiting GRANT 1, GRANT 2, REVOKE 1 and PING 1, owing PAGE_IN 1 and PING 1."""
    conn = lp.LenderConnection()
    _take(conn, encode(borrower_hello()))
    conn.send(conn.hello_reply("gpu-lender"))
    for lease in (1, 2):
        conn.send(lp.Grant(lease, (lease - 1) * GRANULE, GRANULE, 0, RW, pool.new()))
    conn.send(lp.Revoke(1, lp.RevokeMode.EVICT))
    conn.send(lp.Ping(1))
    _take(conn, encode(lp.PageIn(1, 0, GRANULE, lp.Access.READ)))
    _take(conn, encode(lp.Ping(1)))
    return conn


def make(role: lp.Role, state: lp.State, pool: FdPool) -> Conn:
    conn: Conn
    if state is lp.State.START:
        return lp.BorrowerConnection() if role is lp.Role.BORROWER else lp.LenderConnection()
    if state is lp.State.HELLO_SENT:
        conn = lp.BorrowerConnection()
        conn.send(borrower_hello())
        return conn
    if state is lp.State.HELLO_RECEIVED:
        conn = lp.LenderConnection()
        _take(conn, encode(borrower_hello()))
        return conn
    conn = _open_borrower(pool) if role is lp.Role.BORROWER else _open_lender(pool)
    if state is lp.State.BYE_SENT:
        conn.send(lp.Bye())
    elif state is lp.State.BYE_RECEIVED:
        _take(conn, encode(lp.Bye()))
    elif state is lp.State.CLOSED:
        conn.receive_data(b"")
        assert conn.next_event() is CLOSED
    elif state is lp.State.ERROR:
        conn.receive_data(struct.pack("<HHIQ", lp.MsgType.PING, 0, 3, 0))
        with pytest.raises(lp.LeaseProtocolError):
            conn.next_event()
    assert conn.state is state
    return conn


def samples(hello: lp.Hello, error: lp.Error, fd: int) -> dict[lp.MsgType, lp.Event]:
    """A message of each type, with `hello` and `error` as given (ids chosen to match the
    outstanding requests of the OPEN setups above)."""
    return {
        lp.MsgType.HELLO: hello,
        lp.MsgType.BYE: lp.Bye(),
        lp.MsgType.ERROR: error,
        lp.MsgType.PING: lp.Ping(2),
        lp.MsgType.PONG: lp.Pong(1),
        lp.MsgType.GRANT: lp.Grant(3, 2 * GRANULE, GRANULE, 0, RW, fd),
        lp.MsgType.GRANT_ACK: lp.GrantAck(1),
        lp.MsgType.GRANT_NACK: lp.GrantNack(2, lp.NackReason.OTHER),
        lp.MsgType.REVOKE: lp.Revoke(2, lp.RevokeMode.RELEASE),
        lp.MsgType.REVOKED: lp.Revoked(1),
        lp.MsgType.PAGE_IN: lp.PageIn(2, 0, GRANULE, lp.Access.READ),
        lp.MsgType.PAGE_IN_DONE: lp.PageInDone(1, lp.PageInStatus.OK),
    }


def received_sample(msg_type: TypeKey, fd: int) -> tuple[bytes, tuple[int, ...]]:
    """A message of each type that the OPEN setups above would accept if its direction is
    right (ids chosen to match their outstanding requests)."""
    if msg_type is None:
        return raw_message(UNKNOWN, 5, b"body"), ()
    event = samples(lender_hello(), lp.Error(lp.MsgType.PING, 1, lp.ErrorCode.OTHER), fd)[msg_type]
    return encode(event), (fd,) if msg_type is lp.MsgType.GRANT else ()


def sent_sample(role: lp.Role, msg_type: lp.MsgType, fd: int) -> lp.Event:
    hello = borrower_hello() if role is lp.Role.BORROWER else lender_hello()
    return samples(hello, lp.Error(lp.MsgType.GRANT, 99, lp.ErrorCode.OTHER), fd)[msg_type]


# -- the rules, as the specification states them ----------------------------------------------


def expected_receive(role: lp.Role, state: lp.State, msg_type: TypeKey) -> lp.State | Verdict:
    peer_sends = LENDER_SENDS if role is lp.Role.BORROWER else BORROWER_SENDS
    if state is lp.State.BYE_SENT:
        return Verdict.DISCARD
    if state in (lp.State.BYE_RECEIVED, lp.State.CLOSED, lp.State.ERROR):
        return Verdict.FATAL
    if msg_type is lp.MsgType.BYE:
        return lp.State.BYE_RECEIVED
    if state is lp.State.START:
        if role is lp.Role.LENDER and msg_type is lp.MsgType.HELLO:
            return lp.State.HELLO_RECEIVED
        return Verdict.FATAL
    if state is lp.State.HELLO_SENT:
        return lp.State.OPEN if msg_type is lp.MsgType.HELLO else Verdict.FATAL
    if state is lp.State.HELLO_RECEIVED:
        return Verdict.FATAL
    assert state is lp.State.OPEN
    if msg_type is lp.MsgType.HELLO:
        return Verdict.FATAL
    if msg_type in peer_sends:
        return lp.State.OPEN
    return Verdict.REJECT


def expected_send(role: lp.Role, state: lp.State, msg_type: lp.MsgType) -> lp.State | None:
    own = BORROWER_SENDS if role is lp.Role.BORROWER else LENDER_SENDS
    if state is lp.State.ERROR:
        return lp.State.ERROR if msg_type is lp.MsgType.BYE else None
    if state in (lp.State.BYE_SENT, lp.State.BYE_RECEIVED, lp.State.CLOSED):
        return None
    if msg_type is lp.MsgType.BYE:
        return lp.State.BYE_SENT
    if msg_type is lp.MsgType.HELLO:
        if role is lp.Role.BORROWER and state is lp.State.START:
            return lp.State.HELLO_SENT
        if role is lp.Role.LENDER and state is lp.State.HELLO_RECEIVED:
            return lp.State.OPEN
        return None
    if state is lp.State.OPEN and msg_type in own:
        return lp.State.OPEN
    return None


ALL_TYPES: list[TypeKey] = [*lp.MsgType, None]
RECEIVE_CASES = [
    (role, state, t) for role in lp.Role for state in ROLE_STATES[role] for t in ALL_TYPES
]
SEND_CASES = [
    (role, state, t) for role in lp.Role for state in ROLE_STATES[role] for t in lp.MsgType
]


def _id(case: tuple[lp.Role, lp.State, TypeKey]) -> str:
    role, state, t = case
    return f"{role.value}-{state.name}-{'UNKNOWN' if t is None else t.name}"


def test_tables_match_the_rules() -> None:
    for role, receive, send in (
        (lp.Role.BORROWER, BORROWER_RECEIVE, BORROWER_SEND),
        (lp.Role.LENDER, LENDER_RECEIVE, LENDER_SEND),
    ):
        assert set(receive) == set(send) == set(ROLE_STATES[role])
        for state in ROLE_STATES[role]:
            for t in ALL_TYPES:
                assert receive[state][t] == expected_receive(role, state, t), (role, state, t)
            for mt in lp.MsgType:
                assert send[state].get(mt) == expected_send(role, state, mt), (role, state, mt)


@pytest.mark.parametrize("case", RECEIVE_CASES, ids=[_id(c) for c in RECEIVE_CASES])
def test_receive_every_message_in_every_state(
    case: tuple[lp.Role, lp.State, TypeKey], pool: FdPool
) -> None:
    role, state, msg_type = case
    conn = make(role, state, pool)
    fd = pool.new()
    data, fds = received_sample(msg_type, fd)
    if state is lp.State.CLOSED:
        with pytest.raises(lp.LeaseProtocolError) as info:
            conn.receive_data(data, fds)
        assert not info.value.fatal
        assert not fd_is_open(fd) or not fds
        assert conn.next_event() is CLOSED
        return
    conn.receive_data(data, fds)
    expected = expected_receive(role, state, msg_type)
    if expected is Verdict.DISCARD:
        assert conn.next_event() is NEED_DATA
        assert conn.state is state
        assert not (fds and fd_is_open(fd))
        return
    if expected is Verdict.FATAL:
        with pytest.raises(lp.LeaseProtocolError) as info:
            conn.next_event()
        err = info.value
        assert err.fatal
        assert conn.state is lp.State.ERROR
        assert not (fds and fd_is_open(fd))
        may_reply = state in (
            lp.State.START,
            lp.State.HELLO_SENT,
            lp.State.HELLO_RECEIVED,
            lp.State.OPEN,
        )
        assert isinstance(err.reply, lp.Bye) == may_reply
        with pytest.raises(lp.LeaseProtocolError) as again:
            conn.next_event()
        assert again.value.fatal
        return
    if expected is Verdict.REJECT:
        with pytest.raises(lp.LeaseProtocolError) as info:
            conn.next_event()
        err = info.value
        assert not err.fatal
        assert conn.state is state
        assert not (fds and fd_is_open(fd))
        code = lp.ErrorCode.UNKNOWN_TYPE if msg_type is None else lp.ErrorCode.UNEXPECTED
        raw_type = UNKNOWN if msg_type is None else msg_type
        assert err.reply == lp.Error(raw_type, err.reply.ref_id, code, err.reply.text)  # type: ignore[union-attr]
        assert conn.next_event() is NEED_DATA
        return
    event = conn.next_event()
    assert isinstance(event, EVENT_TYPES)
    assert event.TYPE is msg_type
    assert conn.state is expected
    if fds:
        assert isinstance(event, lp.Grant) and event.fd == fd and fd_is_open(fd)


@pytest.mark.parametrize("case", SEND_CASES, ids=[_id(c) for c in SEND_CASES])
def test_send_every_message_in_every_state(
    case: tuple[lp.Role, lp.State, lp.MsgType], pool: FdPool
) -> None:
    role, state, msg_type = case
    conn = make(role, state, pool)
    event = sent_sample(role, msg_type, pool.new())
    expected = expected_send(role, state, msg_type)
    awaiting, owed = conn.awaiting_answers(), conn.owed_answers()
    if expected is None:
        with pytest.raises(lp.LeaseProtocolError) as info:
            conn.send(event)
        assert not info.value.fatal and info.value.reply is None
        assert conn.state is state
        assert (conn.awaiting_answers(), conn.owed_answers()) == (awaiting, owed)
        return
    out = conn.send(event)
    assert out.data == encode(event)
    assert out.fds == ((event.fd,) if isinstance(event, lp.Grant) else ())
    assert conn.state is expected
    if msg_type is lp.MsgType.BYE:
        with pytest.raises(lp.LeaseProtocolError):
            conn.send(lp.Bye())


# -- handshake --------------------------------------------------------------------------------


def _fatal_on_receive(conn: Conn, data: bytes, fds: tuple[int, ...] = ()) -> lp.LeaseProtocolError:
    conn.receive_data(data, fds)
    with pytest.raises(lp.LeaseProtocolError) as info:
        conn.next_event()
    assert info.value.fatal
    return info.value


def _hello_bytes(**fields: int) -> bytes:
    """A HELLO with raw field values (the connection's own send refuses most of these)."""
    values = {
        "magic": 0x444E454C,
        "major": 1,
        "minor": 0,
        "guest": 7,
        "granule": GRANULE,
        "aperture": APERTURE,
        "features": 0,
        "max_leases": 0,
    }
    values.update(fields)
    body = struct.pack("<IHHIIQQIH", *values.values(), 0)
    return raw_message(lp.MsgType.HELLO, 0, body)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"major": 2}, lp.ByeReason.UNSUPPORTED_VERSION),
        ({"major": 0}, lp.ByeReason.UNSUPPORTED_VERSION),
        ({"granule": 8192}, lp.ByeReason.BAD_GEOMETRY),
        ({"aperture": APERTURE + GRANULE}, lp.ByeReason.BAD_GEOMETRY),
        ({"magic": 0x4F494656}, lp.ByeReason.PROTOCOL_ERROR),
    ],
)
def test_lender_refuses_a_bad_offer(fields: dict[str, int], reason: lp.ByeReason) -> None:
    err = _fatal_on_receive(lp.LenderConnection(), _hello_bytes(**fields))
    assert isinstance(err.reply, lp.Bye) and err.reply.reason == reason


def test_lender_answers_a_newer_minor_with_its_own() -> None:
    conn = lp.LenderConnection()
    offer = _take(conn, _hello_bytes(minor=7, features=0b1010))
    assert isinstance(offer, lp.Hello) and offer.minor == 7
    reply = conn.hello_reply("l", features=0b0110)
    assert (reply.major, reply.minor, reply.features) == (1, 0, 0b0010)
    conn.send(reply)
    assert conn.version == (1, 0) and conn.features == 0b0010


def test_lender_hello_must_echo_the_offer() -> None:
    conn = lp.LenderConnection()
    _take(conn, _hello_bytes(features=1))
    for bad in (
        lender_hello(guest_id=8),
        lender_hello(aperture_size=APERTURE * 2),
        lender_hello(granule=4096),
        lender_hello(features=2),
        lender_hello(max_leases=3),
        lender_hello(minor=1),
        lender_hello(major=2),
    ):
        with pytest.raises(lp.LeaseProtocolError) as info:
            conn.send(bad)
        assert not info.value.fatal
        assert conn.state is lp.State.HELLO_RECEIVED
    with pytest.raises(lp.LeaseProtocolError):
        lp.LenderConnection().hello_reply()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"major": 2}, lp.ByeReason.UNSUPPORTED_VERSION),
        ({"minor": 1}, lp.ByeReason.PROTOCOL_ERROR),
        ({"guest": 8}, lp.ByeReason.PROTOCOL_ERROR),
        ({"aperture": APERTURE * 2}, lp.ByeReason.PROTOCOL_ERROR),
        ({"granule": 4096}, lp.ByeReason.PROTOCOL_ERROR),
        ({"features": 4}, lp.ByeReason.PROTOCOL_ERROR),
        ({"magic": 0}, lp.ByeReason.PROTOCOL_ERROR),
    ],
)
def test_borrower_refuses_a_bad_answer(fields: dict[str, int], reason: lp.ByeReason) -> None:
    conn = lp.BorrowerConnection()
    conn.send(borrower_hello(features=3))
    err = _fatal_on_receive(conn, _hello_bytes(**fields))
    assert isinstance(err.reply, lp.Bye) and err.reply.reason == reason


def test_borrower_accepts_a_subset_of_features_and_ignores_max_leases() -> None:
    conn = lp.BorrowerConnection()
    conn.send(borrower_hello(features=3))
    _take(conn, _hello_bytes(features=2, max_leases=9))
    assert conn.state is lp.State.OPEN and conn.features == 2 and conn.version == (1, 0)


@pytest.mark.parametrize(
    "hello",
    [
        borrower_hello(major=2),
        borrower_hello(minor=1),
        borrower_hello(granule=8192),
        borrower_hello(aperture_size=3 << 20),
        borrower_hello(aperture_size=1 << 20, granule=1 << 30),
    ],
)
def test_borrower_refuses_to_offer_what_it_cannot_speak(hello: lp.Hello) -> None:
    conn = lp.BorrowerConnection()
    with pytest.raises(lp.LeaseProtocolError):
        conn.send(hello)
    assert conn.state is lp.State.START and conn.local_hello is None


def test_lender_may_refuse_with_bye_before_and_after_hello() -> None:
    for conn in (lp.LenderConnection(), make(lp.Role.LENDER, lp.State.HELLO_RECEIVED, FdPool())):
        out = conn.send(lp.Bye(lp.ByeReason.GUEST_REFUSED, "unknown guest"))
        assert conn.state is lp.State.BYE_SENT
        borrower = lp.BorrowerConnection()
        borrower.send(borrower_hello())
        assert _take(borrower, out.data) == lp.Bye(lp.ByeReason.GUEST_REFUSED, "unknown guest")
        assert borrower.state is lp.State.BYE_RECEIVED
        borrower.receive_data(b"")
        assert borrower.next_event() is CLOSED


def test_after_a_fatal_error_only_one_bye_may_be_sent(pool: FdPool) -> None:
    conn = make(lp.Role.BORROWER, lp.State.ERROR, pool)
    with pytest.raises(lp.LeaseProtocolError):
        conn.send(lp.Ping(9))
    conn.send(lp.Bye(lp.ByeReason.PROTOCOL_ERROR))
    with pytest.raises(lp.LeaseProtocolError):
        conn.send(lp.Bye(lp.ByeReason.PROTOCOL_ERROR))
    conn.receive_data(b"more", (pool.new(),))  # swallowed, fds closed
    with pytest.raises(lp.LeaseProtocolError):
        conn.next_event()


# -- ids and bookkeeping ----------------------------------------------------------------------


def _refusal(conn: Conn, data: bytes, fds: tuple[int, ...] = ()) -> lp.LeaseProtocolError:
    conn.receive_data(data, fds)
    with pytest.raises(lp.LeaseProtocolError) as info:
        conn.next_event()
    assert not info.value.fatal
    return info.value


def test_grant_ids_must_increase(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    for stale in (0, 1, 2):
        fd = pool.new()
        err = _refusal(borrower, encode(lp.Grant(stale, 0, GRANULE, 0, RW, 0)), (fd,))
        assert not fd_is_open(fd)
        assert isinstance(err.reply, lp.GrantNack)
        assert (err.reply.lease_id, err.reply.reason) == (stale, lp.NackReason.DUPLICATE_LEASE_ID)
        borrower.send(err.reply)  # the NACK answers the refused GRANT
    assert (lp.MsgType.GRANT, 1) in borrower.owed_answers()  # the first GRANT 1 is still owed
    borrower.send(lp.GrantAck(1))
    with pytest.raises(lp.LeaseProtocolError):
        borrower.send(lp.GrantAck(1))


def test_revoke_ids(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    assert (
        _refusal(borrower, encode(lp.Revoke(3, lp.RevokeMode.EVICT))).code
        == lp.ErrorCode.UNKNOWN_ID
    )
    assert (
        _refusal(borrower, encode(lp.Revoke(0, lp.RevokeMode.EVICT))).code
        == lp.ErrorCode.UNKNOWN_ID
    )
    err = _refusal(borrower, encode(lp.Revoke(1, lp.RevokeMode.RELEASE)))
    assert err.code == lp.ErrorCode.DUPLICATE_ID
    assert err.reply == lp.Error(lp.MsgType.REVOKE, 1, lp.ErrorCode.DUPLICATE_ID, err.reply.text)  # type: ignore[union-attr]
    borrower.send(lp.Revoked(1))
    # A lease that is no longer live may be revoked again: the answer is trivially true.
    assert _take(borrower, encode(lp.Revoke(1, lp.RevokeMode.RELEASE))) == lp.Revoke(
        1, lp.RevokeMode.RELEASE
    )
    borrower.send(lp.Revoked(1))


def test_answers_must_match_a_request(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    assert _refusal(borrower, encode(lp.PageInDone(7, 0))).code == lp.ErrorCode.UNKNOWN_ID
    assert _refusal(borrower, encode(lp.Pong(7))).code == lp.ErrorCode.UNKNOWN_ID
    assert _take(borrower, encode(lp.PageInDone(1, 0))) == lp.PageInDone(1, 0)
    assert _refusal(borrower, encode(lp.PageInDone(1, 0))).code == lp.ErrorCode.UNKNOWN_ID
    lender = make(lp.Role.LENDER, lp.State.OPEN, pool)
    for event in (lp.GrantAck(5), lp.GrantNack(5, 1), lp.Revoked(2), lp.Pong(2)):
        assert _refusal(lender, encode(event)).code == lp.ErrorCode.UNKNOWN_ID
    assert _refusal(lender, encode(lp.PageIn(1, 0, GRANULE, lp.Access.READ))).code == (
        lp.ErrorCode.DUPLICATE_ID
    )
    assert _refusal(lender, encode(lp.Ping(1))).code == lp.ErrorCode.DUPLICATE_ID


def test_error_answers_the_request_it_names(pool: FdPool) -> None:
    lender = make(lp.Role.LENDER, lp.State.OPEN, pool)
    assert (lp.MsgType.GRANT, 2) in lender.awaiting_answers()
    _take(lender, encode(lp.Error(lp.MsgType.GRANT, 2, lp.ErrorCode.DUPLICATE_ID)))
    assert (lp.MsgType.GRANT, 2) in lender.awaiting_answers()
    _take(lender, encode(lp.Error(lp.MsgType.GRANT, 2, lp.ErrorCode.BAD_FD_COUNT)))
    assert (lp.MsgType.GRANT, 2) not in lender.awaiting_answers()
    _take(lender, encode(lp.Error(UNKNOWN, 2, lp.ErrorCode.OTHER)))  # names nothing we know: fine
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    borrower.send(lp.Error(lp.MsgType.GRANT, 2, lp.ErrorCode.OTHER, "cannot handle it"))
    assert (lp.MsgType.GRANT, 2) not in borrower.owed_answers()
    borrower.send(lp.Error(lp.MsgType.REVOKE, 1, lp.ErrorCode.DUPLICATE_ID))
    assert (lp.MsgType.REVOKE, 1) in borrower.owed_answers()


def test_a_bad_error_is_not_answered(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    err = _refusal(borrower, raw_message(lp.MsgType.ERROR, 1, b"\x00"))
    assert err.reply is None
    err = _refusal(borrower, raw_message(lp.MsgType.ERROR, 1, b"\x00"), (pool.new(),))
    assert err.reply is None


def test_local_request_rules(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    refused: list[Callable[[], object]] = [
        lambda: borrower.send(lp.PageIn(1, GRANULE, GRANULE, lp.Access.READ)),  # outstanding
        lambda: borrower.send(lp.PageIn(9, 4096, GRANULE, lp.Access.READ)),  # misaligned
        lambda: borrower.send(lp.PageIn(9, 0, 0, lp.Access.READ)),  # empty
        lambda: borrower.send(lp.PageIn(9, APERTURE, GRANULE, lp.Access.READ)),  # outside
        lambda: borrower.send(lp.Ping(1)),  # outstanding
        lambda: borrower.send(lp.Pong(5)),  # never pinged
        lambda: borrower.send(lp.Revoked(2)),  # never asked
        lambda: borrower.send(lp.GrantAck(3)),  # never granted
    ]
    lender = make(lp.Role.LENDER, lp.State.OPEN, pool)
    refused += [
        lambda: lender.send(lp.Grant(2, 0, GRANULE, 0, RW, 9)),  # not increasing
        lambda: lender.send(lp.Revoke(3, lp.RevokeMode.EVICT)),  # never granted
        lambda: lender.send(lp.Revoke(0, lp.RevokeMode.EVICT)),
        lambda: lender.send(lp.Revoke(1, lp.RevokeMode.RELEASE)),  # outstanding
        lambda: lender.send(lp.PageInDone(2, 0)),  # never asked
        lambda: lender.send(lp.Grant(3, 0, GRANULE, 0, RW, -1)),  # no fd
    ]

    def bookkeeping() -> object:
        return [(c.state, c.owed_answers(), c.awaiting_answers()) for c in (borrower, lender)]

    for attempt in refused:
        before = bookkeeping()
        with pytest.raises(lp.LeaseProtocolError) as info:
            attempt()
        assert not info.value.fatal
        assert bookkeeping() == before
    lender.send(lp.Grant(3, 0, GRANULE, 0, RW, 9))  # the refused -1 did not use up id 3


def test_in_flight_limit(pool: FdPool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lp.connection, "MAX_IN_FLIGHT", 4)
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)  # already owes 4 answers
    err = _fatal_on_receive(borrower, encode(lp.Ping(77)))
    assert isinstance(err.reply, lp.Bye)
    lender = make(lp.Role.LENDER, lp.State.OPEN, pool)  # already awaits 4 answers
    with pytest.raises(lp.LeaseProtocolError):
        lender.send(lp.Ping(2))
    _take(lender, encode(lp.Pong(1)))
    lender.send(lp.Ping(2))


# -- file descriptors -------------------------------------------------------------------------

GRANT_BYTES = encode(lp.Grant(3, 2 * GRANULE, GRANULE, 0, RW, 0))
"""A GRANT an OPEN borrower accepts, as bytes; its fd travels beside them (each test its own)."""


def test_fds_belong_to_the_message_holding_the_chunks_last_byte(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    ping = encode(lp.Ping(5))
    fd = pool.new()
    borrower.receive_data(ping + GRANT_BYTES[:10], (fd,))
    assert borrower.next_event() == lp.Ping(5)
    assert borrower.next_event() is NEED_DATA
    borrower.receive_data(GRANT_BYTES[10:])
    assert borrower.next_event() == lp.Grant(3, 2 * GRANULE, GRANULE, 0, RW, fd)
    assert fd_is_open(fd)


def test_fds_with_a_chunk_ending_in_the_next_message_go_to_that_message(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    ping = encode(lp.Ping(5))
    fd = pool.new()
    borrower.receive_data(GRANT_BYTES + ping[:1], (fd,))
    with pytest.raises(lp.LeaseProtocolError) as info:
        borrower.next_event()
    assert info.value.code == lp.ErrorCode.BAD_FD_COUNT  # the GRANT came without its fd
    err = _refusal(borrower, ping[1:])
    assert err.code == lp.ErrorCode.BAD_FD_COUNT  # the PING came with one
    assert not fd_is_open(fd)


def test_wrong_fd_counts_close_every_fd(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    fds = (pool.new(), pool.new())
    err = _refusal(borrower, GRANT_BYTES, fds)
    assert err.reply == lp.Error(lp.MsgType.GRANT, 3, lp.ErrorCode.BAD_FD_COUNT, err.reply.text)  # type: ignore[union-attr]
    assert not any(map(fd_is_open, fds))
    # Two chunks, each ending inside the same GRANT, each with an fd: still two.
    a, b = pool.new(), pool.new()
    borrower.receive_data(GRANT_BYTES[:20], (a,))
    borrower.receive_data(GRANT_BYTES[20:], (b,))
    with pytest.raises(lp.LeaseProtocolError):
        borrower.next_event()
    assert not fd_is_open(a) and not fd_is_open(b)
    # A refused GRANT leaves its id unused: the same GRANT with one fd is fine now.
    c = pool.new()
    assert _take(borrower, GRANT_BYTES, (c,)) == lp.Grant(3, 2 * GRANULE, GRANULE, 0, RW, c)


def test_fd_on_a_message_that_takes_none(pool: FdPool) -> None:
    for role, event in ((lp.Role.BORROWER, lp.Ping(9)), (lp.Role.LENDER, lp.GrantAck(1))):
        conn = make(role, lp.State.OPEN, pool)
        fd = pool.new()
        awaiting = conn.awaiting_answers()
        err = _refusal(conn, encode(event), (fd,))
        assert err.code == lp.ErrorCode.BAD_FD_COUNT and not fd_is_open(fd)
        assert conn.awaiting_answers() == awaiting  # a refused answer answers nothing


def test_refused_grant_after_checks_closes_its_fd(pool: FdPool) -> None:
    lender = make(lp.Role.LENDER, lp.State.OPEN, pool)
    fd = pool.new()
    err = _refusal(lender, encode(lp.Grant(3, 0, GRANULE, 0, RW, 0)), (fd,))
    assert err.code == lp.ErrorCode.UNEXPECTED and not fd_is_open(fd)


def test_fatal_error_closes_fds_buffered_behind_it(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    fd = pool.new()
    borrower.receive_data(encode(lp.Ping(5)))
    borrower.receive_data(GRANT_BYTES, (fd,))
    borrower.receive_data(struct.pack("<HHIQ", lp.MsgType.PING, 0, 1 << 20, 0))
    assert borrower.next_event() == lp.Ping(5)
    event = borrower.next_event()
    assert isinstance(event, lp.Grant) and fd_is_open(fd)  # handed out: the caller's now
    fd2 = pool.new()
    _fatal_on_receive(borrower, GRANT_BYTES, (fd2,))
    assert not fd_is_open(fd2)


def test_close_releases_held_fds(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    fd = pool.new()
    borrower.receive_data(GRANT_BYTES[:30], (fd,))
    assert borrower.next_event() is NEED_DATA and fd_is_open(fd)
    borrower.close()
    assert not fd_is_open(fd)
    assert borrower.next_event() is CLOSED


# -- end of stream and BYE --------------------------------------------------------------------


def test_end_of_stream_after_buffered_events(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    borrower.receive_data(encode(lp.Ping(5)) + encode(lp.Ping(6)))
    borrower.receive_data(b"")
    assert borrower.next_event() == lp.Ping(5)
    assert borrower.next_event() == lp.Ping(6)
    assert borrower.next_event() is CLOSED
    assert borrower.next_event() is CLOSED
    assert borrower.state is lp.State.CLOSED
    fd = pool.new()
    with pytest.raises(lp.LeaseProtocolError):
        borrower.receive_data(b"x", (fd,))
    assert not fd_is_open(fd)
    with pytest.raises(lp.LeaseProtocolError):
        borrower.send(lp.Ping(9))


def test_end_of_stream_inside_a_message(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    fd = pool.new()
    borrower.receive_data(GRANT_BYTES[:40], (fd,))
    _fatal_on_receive(borrower, b"")
    assert not fd_is_open(fd)


def test_end_of_stream_with_fds_and_no_data(pool: FdPool) -> None:
    borrower = make(lp.Role.BORROWER, lp.State.OPEN, pool)
    fd = pool.new()
    borrower.receive_data(b"", (fd,))
    assert not fd_is_open(fd)
    assert borrower.next_event() is CLOSED


def test_after_our_bye_everything_is_dropped(pool: FdPool) -> None:
    lender = make(lp.Role.LENDER, lp.State.BYE_SENT, pool)
    fd = pool.new()
    stream = encode(lp.PageIn(2, 0, GRANULE, lp.Access.READ)) + encode(lp.Bye())
    lender.receive_data(stream + encode(lp.GrantAck(1)), (fd,))
    lender.receive_data(raw_message(UNKNOWN, 1))
    assert lender.next_event() is NEED_DATA
    assert not fd_is_open(fd)
    lender.receive_data(b"")
    assert lender.next_event() is CLOSED


def test_nothing_may_follow_the_peers_bye(pool: FdPool) -> None:
    lender = make(lp.Role.LENDER, lp.State.BYE_RECEIVED, pool)
    err = _fatal_on_receive(lender, encode(lp.Ping(3)))
    assert err.reply is None


def test_framing_limits(pool: FdPool) -> None:
    for length in (0, 15, 4097, 0xFFFF_FFFF):
        conn = make(lp.Role.LENDER, lp.State.OPEN, pool)
        err = _fatal_on_receive(conn, struct.pack("<HHIQ", lp.MsgType.PING, 0, length, 0))
        assert isinstance(err.reply, lp.Bye) and err.reply.reason == lp.ByeReason.PROTOCOL_ERROR
    conn = make(lp.Role.LENDER, lp.State.OPEN, pool)
    biggest = raw_message(UNKNOWN, 1, b"\x00" * (4096 - 16))
    assert _refusal(conn, biggest).code == lp.ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize(
    ("role", "event"),
    list(
        itertools.product(
            [lp.Role.BORROWER, lp.Role.LENDER],
            [
                lp.Ping(1),
                lp.Error(1, 1, 1),
                raw_message(UNKNOWN, 1),
                lp.Grant(1, 0, GRANULE, 0, RW, 0),
            ],
        )
    ),
)
def test_nothing_but_hello_or_bye_before_the_handshake(
    role: lp.Role, event: lp.Event | bytes, pool: FdPool
) -> None:
    conn = make(role, lp.State.START, pool)
    data = event if isinstance(event, bytes) else encode(event)
    fds = (pool.new(),) if isinstance(event, lp.Grant) else ()
    error = _fatal_on_receive(conn, data, fds)
    assert isinstance(error.reply, lp.Bye)
    assert not (fds and fd_is_open(fds[0]))


def test_a_hello_with_an_fd_is_fatal(pool: FdPool) -> None:
    conn = lp.LenderConnection()
    fd = pool.new()
    error = _fatal_on_receive(conn, encode(borrower_hello()), (fd,))
    assert error.code == lp.ErrorCode.OTHER and not fd_is_open(fd)
    assert isinstance(error.reply, lp.Bye)
