"""Lease protocol connections: every state x every message, id bookkeeping, fds, end of stream.

The expected outcomes here are written from the specification's rules (docs/lease-protocol.md,
"Session states"), not read from the connection's tables, so that a wrong table entry fails.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterator

import pytest

from devmodel.testing import fd_is_open
from devmodel_wire.lease import (
    Access,
    BorrowerConnection,
    Bye,
    ByeReason,
    Error,
    ErrorCode,
    Event,
    Grant,
    GrantAck,
    GrantNack,
    Hello,
    LeaseProtocolError,
    LenderConnection,
    MsgType,
    NackReason,
    PageIn,
    PageInDone,
    PageInStatus,
    Ping,
    Pong,
    Revoke,
    Revoked,
    RevokeMode,
    Role,
    State,
)
from devmodel_wire.lease import connection as connection_module
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

Conn = BorrowerConnection | LenderConnection
UNKNOWN = 0x7777

BORROWER_SENDS = frozenset(
    {
        MsgType.HELLO,
        MsgType.BYE,
        MsgType.ERROR,
        MsgType.PING,
        MsgType.PONG,
        MsgType.GRANT_ACK,
        MsgType.GRANT_NACK,
        MsgType.REVOKED,
        MsgType.PAGE_IN,
    }
)
LENDER_SENDS = frozenset(
    {
        MsgType.HELLO,
        MsgType.BYE,
        MsgType.ERROR,
        MsgType.PING,
        MsgType.PONG,
        MsgType.GRANT,
        MsgType.REVOKE,
        MsgType.PAGE_IN_DONE,
    }
)


@pytest.fixture
def pool() -> Iterator[FdPool]:
    with fd_pool() as p:
        yield p


# -- getting a connection into each state -----------------------------------------------------


def _take(conn: Conn, data: bytes, fds: tuple[int, ...] = ()) -> Event:
    conn.receive_data(data, fds)
    event = conn.next_event()
    assert isinstance(event, EVENT_TYPES), event
    return event


def _open_borrower(pool: FdPool) -> BorrowerConnection:
    """OPEN, awaiting PAGE_IN 1 and PING 1, owing GRANT 1, GRANT 2, REVOKE 1 and PING 1."""
    conn = BorrowerConnection()
    conn.send(borrower_hello())
    _take(conn, encode(lender_hello()))
    conn.send(PageIn(1, 0, GRANULE, Access.READ))
    conn.send(Ping(1))
    for lease in (1, 2):
        grant = encode(Grant(lease, (lease - 1) * GRANULE, GRANULE, 0, RW, 0))
        assert isinstance(_take(conn, grant, (pool.new(),)), Grant)
    _take(conn, encode(Revoke(1, RevokeMode.EVICT)))
    _take(conn, encode(Ping(1)))
    return conn


def _open_lender(pool: FdPool) -> LenderConnection:
    """OPEN, awaiting GRANT 1, GRANT 2, REVOKE 1 and PING 1, owing PAGE_IN 1 and PING 1."""
    conn = LenderConnection()
    _take(conn, encode(borrower_hello()))
    conn.send(conn.hello_reply("gpu-lender"))
    for lease in (1, 2):
        conn.send(Grant(lease, (lease - 1) * GRANULE, GRANULE, 0, RW, pool.new()))
    conn.send(Revoke(1, RevokeMode.EVICT))
    conn.send(Ping(1))
    _take(conn, encode(PageIn(1, 0, GRANULE, Access.READ)))
    _take(conn, encode(Ping(1)))
    return conn


def make(role: Role, state: State, pool: FdPool) -> Conn:
    conn: Conn
    if state is State.START:
        return BorrowerConnection() if role is Role.BORROWER else LenderConnection()
    if state is State.HELLO_SENT:
        conn = BorrowerConnection()
        conn.send(borrower_hello())
        return conn
    if state is State.HELLO_RECEIVED:
        conn = LenderConnection()
        _take(conn, encode(borrower_hello()))
        return conn
    conn = _open_borrower(pool) if role is Role.BORROWER else _open_lender(pool)
    if state is State.BYE_SENT:
        conn.send(Bye())
    elif state is State.BYE_RECEIVED:
        _take(conn, encode(Bye()))
    elif state is State.CLOSED:
        conn.receive_data(b"")
        assert conn.next_event() is CLOSED
    elif state is State.ERROR:
        conn.receive_data(struct.pack("<HHIQ", MsgType.PING, 0, 3, 0))
        with pytest.raises(LeaseProtocolError):
            conn.next_event()
    assert conn.state is state
    return conn


def received_sample(msg_type: TypeKey, fd: int) -> tuple[bytes, tuple[int, ...]]:
    """A message of each type that the OPEN setups above would accept if its direction is
    right (ids chosen to match their outstanding requests)."""
    samples: dict[TypeKey, Event] = {
        MsgType.HELLO: lender_hello(),
        MsgType.BYE: Bye(),
        MsgType.ERROR: Error(MsgType.PING, 1, ErrorCode.OTHER),
        MsgType.PING: Ping(2),
        MsgType.PONG: Pong(1),
        MsgType.GRANT: Grant(3, 2 * GRANULE, GRANULE, 0, RW, fd),
        MsgType.GRANT_ACK: GrantAck(1),
        MsgType.GRANT_NACK: GrantNack(2, NackReason.OTHER),
        MsgType.REVOKE: Revoke(2, RevokeMode.RELEASE),
        MsgType.REVOKED: Revoked(1),
        MsgType.PAGE_IN: PageIn(2, 0, GRANULE, Access.READ),
        MsgType.PAGE_IN_DONE: PageInDone(1, PageInStatus.OK),
    }
    if msg_type is None:
        return raw_message(UNKNOWN, 5, b"body"), ()
    event = samples[msg_type]
    return encode(event), (fd,) if msg_type is MsgType.GRANT else ()


def sent_sample(role: Role, msg_type: MsgType, fd: int) -> Event:
    samples: dict[MsgType, Event] = {
        MsgType.HELLO: borrower_hello() if role is Role.BORROWER else lender_hello(),
        MsgType.BYE: Bye(),
        MsgType.ERROR: Error(MsgType.GRANT, 99, ErrorCode.OTHER),
        MsgType.PING: Ping(2),
        MsgType.PONG: Pong(1),
        MsgType.GRANT: Grant(3, 2 * GRANULE, GRANULE, 0, RW, fd),
        MsgType.GRANT_ACK: GrantAck(1),
        MsgType.GRANT_NACK: GrantNack(2, NackReason.OTHER),
        MsgType.REVOKE: Revoke(2, RevokeMode.RELEASE),
        MsgType.REVOKED: Revoked(1),
        MsgType.PAGE_IN: PageIn(2, 0, GRANULE, Access.READ),
        MsgType.PAGE_IN_DONE: PageInDone(1, PageInStatus.OK),
    }
    return samples[msg_type]


# -- the rules, as the specification states them ----------------------------------------------


def expected_receive(role: Role, state: State, msg_type: TypeKey) -> State | Verdict:
    peer_sends = LENDER_SENDS if role is Role.BORROWER else BORROWER_SENDS
    if state is State.BYE_SENT:
        return Verdict.DISCARD
    if state in (State.BYE_RECEIVED, State.CLOSED, State.ERROR):
        return Verdict.FATAL
    if msg_type is MsgType.BYE:
        return State.BYE_RECEIVED
    if state is State.START:
        if role is Role.LENDER and msg_type is MsgType.HELLO:
            return State.HELLO_RECEIVED
        return Verdict.FATAL
    if state is State.HELLO_SENT:
        return State.OPEN if msg_type is MsgType.HELLO else Verdict.FATAL
    if state is State.HELLO_RECEIVED:
        return Verdict.FATAL
    assert state is State.OPEN
    if msg_type is MsgType.HELLO:
        return Verdict.FATAL
    if msg_type in peer_sends:
        return State.OPEN
    return Verdict.REJECT


def expected_send(role: Role, state: State, msg_type: MsgType) -> State | None:
    own = BORROWER_SENDS if role is Role.BORROWER else LENDER_SENDS
    if state is State.ERROR:
        return State.ERROR if msg_type is MsgType.BYE else None
    if state in (State.BYE_SENT, State.BYE_RECEIVED, State.CLOSED):
        return None
    if msg_type is MsgType.BYE:
        return State.BYE_SENT
    if msg_type is MsgType.HELLO:
        if role is Role.BORROWER and state is State.START:
            return State.HELLO_SENT
        if role is Role.LENDER and state is State.HELLO_RECEIVED:
            return State.OPEN
        return None
    if state is State.OPEN and msg_type in own:
        return State.OPEN
    return None


ALL_TYPES: list[TypeKey] = [*MsgType, None]
RECEIVE_CASES = [
    (role, state, t) for role in Role for state in ROLE_STATES[role] for t in ALL_TYPES
]
SEND_CASES = [(role, state, t) for role in Role for state in ROLE_STATES[role] for t in MsgType]


def _id(case: tuple[Role, State, TypeKey]) -> str:
    role, state, t = case
    return f"{role.value}-{state.name}-{'UNKNOWN' if t is None else t.name}"


def test_tables_match_the_rules() -> None:
    for role, receive, send in (
        (Role.BORROWER, BORROWER_RECEIVE, BORROWER_SEND),
        (Role.LENDER, LENDER_RECEIVE, LENDER_SEND),
    ):
        assert set(receive) == set(send) == set(ROLE_STATES[role])
        for state in ROLE_STATES[role]:
            for t in ALL_TYPES:
                assert receive[state][t] == expected_receive(role, state, t), (role, state, t)
            for mt in MsgType:
                assert send[state].get(mt) == expected_send(role, state, mt), (role, state, mt)


@pytest.mark.parametrize("case", RECEIVE_CASES, ids=[_id(c) for c in RECEIVE_CASES])
def test_receive_every_message_in_every_state(
    case: tuple[Role, State, TypeKey], pool: FdPool
) -> None:
    role, state, msg_type = case
    conn = make(role, state, pool)
    fd = pool.new()
    data, fds = received_sample(msg_type, fd)
    if state is State.CLOSED:
        with pytest.raises(LeaseProtocolError) as info:
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
        with pytest.raises(LeaseProtocolError) as info:
            conn.next_event()
        err = info.value
        assert err.fatal
        assert conn.state is State.ERROR
        assert not (fds and fd_is_open(fd))
        may_reply = state in (State.START, State.HELLO_SENT, State.HELLO_RECEIVED, State.OPEN)
        assert isinstance(err.reply, Bye) == may_reply
        with pytest.raises(LeaseProtocolError) as again:
            conn.next_event()
        assert again.value.fatal
        return
    if expected is Verdict.REJECT:
        with pytest.raises(LeaseProtocolError) as info:
            conn.next_event()
        err = info.value
        assert not err.fatal
        assert conn.state is state
        assert not (fds and fd_is_open(fd))
        code = ErrorCode.UNKNOWN_TYPE if msg_type is None else ErrorCode.UNEXPECTED
        raw_type = UNKNOWN if msg_type is None else msg_type
        assert err.reply == Error(raw_type, err.reply.ref_id, code, err.reply.text)  # type: ignore[union-attr]
        assert conn.next_event() is NEED_DATA
        return
    event = conn.next_event()
    assert isinstance(event, EVENT_TYPES)
    assert event.TYPE is msg_type
    assert conn.state is expected
    if fds:
        assert isinstance(event, Grant) and event.fd == fd and fd_is_open(fd)


@pytest.mark.parametrize("case", SEND_CASES, ids=[_id(c) for c in SEND_CASES])
def test_send_every_message_in_every_state(case: tuple[Role, State, MsgType], pool: FdPool) -> None:
    role, state, msg_type = case
    conn = make(role, state, pool)
    event = sent_sample(role, msg_type, pool.new())
    expected = expected_send(role, state, msg_type)
    awaiting, owed = conn.awaiting_answers(), conn.owed_answers()
    if expected is None:
        with pytest.raises(LeaseProtocolError) as info:
            conn.send(event)
        assert not info.value.fatal and info.value.reply is None
        assert conn.state is state
        assert (conn.awaiting_answers(), conn.owed_answers()) == (awaiting, owed)
        return
    out = conn.send(event)
    assert out.data == encode(event)
    assert out.fds == ((event.fd,) if isinstance(event, Grant) else ())
    assert conn.state is expected
    if msg_type is MsgType.BYE:
        with pytest.raises(LeaseProtocolError):
            conn.send(Bye())


# -- handshake --------------------------------------------------------------------------------


def _fatal_on_receive(conn: Conn, data: bytes) -> LeaseProtocolError:
    conn.receive_data(data)
    with pytest.raises(LeaseProtocolError) as info:
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
    return raw_message(MsgType.HELLO, 0, body)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"major": 2}, ByeReason.UNSUPPORTED_VERSION),
        ({"major": 0}, ByeReason.UNSUPPORTED_VERSION),
        ({"granule": 8192}, ByeReason.BAD_GEOMETRY),
        ({"aperture": APERTURE + GRANULE}, ByeReason.BAD_GEOMETRY),
        ({"magic": 0x4F494656}, ByeReason.PROTOCOL_ERROR),
    ],
)
def test_lender_refuses_a_bad_offer(fields: dict[str, int], reason: ByeReason) -> None:
    err = _fatal_on_receive(LenderConnection(), _hello_bytes(**fields))
    assert isinstance(err.reply, Bye) and err.reply.reason == reason


def test_lender_answers_a_newer_minor_with_its_own() -> None:
    conn = LenderConnection()
    offer = _take(conn, _hello_bytes(minor=7, features=0b1010))
    assert isinstance(offer, Hello) and offer.minor == 7
    reply = conn.hello_reply("l", features=0b0110)
    assert (reply.major, reply.minor, reply.features) == (1, 0, 0b0010)
    conn.send(reply)
    assert conn.version == (1, 0) and conn.features == 0b0010


def test_lender_hello_must_echo_the_offer() -> None:
    conn = LenderConnection()
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
        with pytest.raises(LeaseProtocolError) as info:
            conn.send(bad)
        assert not info.value.fatal
        assert conn.state is State.HELLO_RECEIVED
    with pytest.raises(LeaseProtocolError):
        LenderConnection().hello_reply()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"major": 2}, ByeReason.UNSUPPORTED_VERSION),
        ({"minor": 1}, ByeReason.PROTOCOL_ERROR),
        ({"guest": 8}, ByeReason.PROTOCOL_ERROR),
        ({"aperture": APERTURE * 2}, ByeReason.PROTOCOL_ERROR),
        ({"granule": 4096}, ByeReason.PROTOCOL_ERROR),
        ({"features": 4}, ByeReason.PROTOCOL_ERROR),
        ({"magic": 0}, ByeReason.PROTOCOL_ERROR),
    ],
)
def test_borrower_refuses_a_bad_answer(fields: dict[str, int], reason: ByeReason) -> None:
    conn = BorrowerConnection()
    conn.send(borrower_hello(features=3))
    err = _fatal_on_receive(conn, _hello_bytes(**fields))
    assert isinstance(err.reply, Bye) and err.reply.reason == reason


def test_borrower_accepts_a_subset_of_features_and_ignores_max_leases() -> None:
    conn = BorrowerConnection()
    conn.send(borrower_hello(features=3))
    _take(conn, _hello_bytes(features=2, max_leases=9))
    assert conn.state is State.OPEN and conn.features == 2 and conn.version == (1, 0)


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
def test_borrower_refuses_to_offer_what_it_cannot_speak(hello: Hello) -> None:
    conn = BorrowerConnection()
    with pytest.raises(LeaseProtocolError):
        conn.send(hello)
    assert conn.state is State.START and conn.local_hello is None


def test_lender_may_refuse_with_bye_before_and_after_hello() -> None:
    for conn in (LenderConnection(), make(Role.LENDER, State.HELLO_RECEIVED, FdPool())):
        out = conn.send(Bye(ByeReason.GUEST_REFUSED, "unknown guest"))
        assert conn.state is State.BYE_SENT
        borrower = BorrowerConnection()
        borrower.send(borrower_hello())
        assert _take(borrower, out.data) == Bye(ByeReason.GUEST_REFUSED, "unknown guest")
        assert borrower.state is State.BYE_RECEIVED
        borrower.receive_data(b"")
        assert borrower.next_event() is CLOSED


def test_after_a_fatal_error_only_one_bye_may_be_sent(pool: FdPool) -> None:
    conn = make(Role.BORROWER, State.ERROR, pool)
    with pytest.raises(LeaseProtocolError):
        conn.send(Ping(9))
    conn.send(Bye(ByeReason.PROTOCOL_ERROR))
    with pytest.raises(LeaseProtocolError):
        conn.send(Bye(ByeReason.PROTOCOL_ERROR))
    conn.receive_data(b"more", (pool.new(),))  # swallowed, fds closed
    with pytest.raises(LeaseProtocolError):
        conn.next_event()


# -- ids and bookkeeping ----------------------------------------------------------------------


def _refusal(conn: Conn, data: bytes, fds: tuple[int, ...] = ()) -> LeaseProtocolError:
    conn.receive_data(data, fds)
    with pytest.raises(LeaseProtocolError) as info:
        conn.next_event()
    assert not info.value.fatal
    return info.value


def test_grant_ids_must_increase(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    for stale in (0, 1, 2):
        fd = pool.new()
        err = _refusal(borrower, encode(Grant(stale, 0, GRANULE, 0, RW, 0)), (fd,))
        assert not fd_is_open(fd)
        assert isinstance(err.reply, GrantNack)
        assert (err.reply.lease_id, err.reply.reason) == (stale, NackReason.DUPLICATE_LEASE_ID)
        borrower.send(err.reply)  # the NACK answers the refused GRANT
    assert (MsgType.GRANT, 1) in borrower.owed_answers()  # the first GRANT 1 is still owed
    borrower.send(GrantAck(1))
    with pytest.raises(LeaseProtocolError):
        borrower.send(GrantAck(1))


def test_revoke_ids(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    assert _refusal(borrower, encode(Revoke(3, RevokeMode.EVICT))).code == ErrorCode.UNKNOWN_ID
    assert _refusal(borrower, encode(Revoke(0, RevokeMode.EVICT))).code == ErrorCode.UNKNOWN_ID
    err = _refusal(borrower, encode(Revoke(1, RevokeMode.RELEASE)))
    assert err.code == ErrorCode.DUPLICATE_ID
    assert err.reply == Error(MsgType.REVOKE, 1, ErrorCode.DUPLICATE_ID, err.reply.text)  # type: ignore[union-attr]
    borrower.send(Revoked(1))
    # A lease that is no longer live may be revoked again: the answer is trivially true.
    assert _take(borrower, encode(Revoke(1, RevokeMode.RELEASE))) == Revoke(1, RevokeMode.RELEASE)
    borrower.send(Revoked(1))


def test_answers_must_match_a_request(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    assert _refusal(borrower, encode(PageInDone(7, 0))).code == ErrorCode.UNKNOWN_ID
    assert _refusal(borrower, encode(Pong(7))).code == ErrorCode.UNKNOWN_ID
    assert _take(borrower, encode(PageInDone(1, 0))) == PageInDone(1, 0)
    assert _refusal(borrower, encode(PageInDone(1, 0))).code == ErrorCode.UNKNOWN_ID
    lender = make(Role.LENDER, State.OPEN, pool)
    for event in (GrantAck(5), GrantNack(5, 1), Revoked(2), Pong(2)):
        assert _refusal(lender, encode(event)).code == ErrorCode.UNKNOWN_ID
    assert _refusal(lender, encode(PageIn(1, 0, GRANULE, Access.READ))).code == (
        ErrorCode.DUPLICATE_ID
    )
    assert _refusal(lender, encode(Ping(1))).code == ErrorCode.DUPLICATE_ID


def test_error_answers_the_request_it_names(pool: FdPool) -> None:
    lender = make(Role.LENDER, State.OPEN, pool)
    assert (MsgType.GRANT, 2) in lender.awaiting_answers()
    _take(lender, encode(Error(MsgType.GRANT, 2, ErrorCode.DUPLICATE_ID)))
    assert (MsgType.GRANT, 2) in lender.awaiting_answers()
    _take(lender, encode(Error(MsgType.GRANT, 2, ErrorCode.BAD_FD_COUNT)))
    assert (MsgType.GRANT, 2) not in lender.awaiting_answers()
    _take(lender, encode(Error(UNKNOWN, 2, ErrorCode.OTHER)))  # names nothing we know: fine
    borrower = make(Role.BORROWER, State.OPEN, pool)
    borrower.send(Error(MsgType.GRANT, 2, ErrorCode.OTHER, "cannot handle it"))
    assert (MsgType.GRANT, 2) not in borrower.owed_answers()
    borrower.send(Error(MsgType.REVOKE, 1, ErrorCode.DUPLICATE_ID))
    assert (MsgType.REVOKE, 1) in borrower.owed_answers()


def test_a_bad_error_is_not_answered(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    err = _refusal(borrower, raw_message(MsgType.ERROR, 1, b"\x00"))
    assert err.reply is None
    err = _refusal(borrower, raw_message(MsgType.ERROR, 1, b"\x00"), (pool.new(),))
    assert err.reply is None


def test_local_request_rules(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    refused: list[Callable[[], object]] = [
        lambda: borrower.send(PageIn(1, GRANULE, GRANULE, Access.READ)),  # outstanding
        lambda: borrower.send(PageIn(9, 4096, GRANULE, Access.READ)),  # misaligned
        lambda: borrower.send(PageIn(9, 0, 0, Access.READ)),  # empty
        lambda: borrower.send(PageIn(9, APERTURE, GRANULE, Access.READ)),  # outside
        lambda: borrower.send(Ping(1)),  # outstanding
        lambda: borrower.send(Pong(5)),  # never pinged
        lambda: borrower.send(Revoked(2)),  # never asked
        lambda: borrower.send(GrantAck(3)),  # never granted
    ]
    lender = make(Role.LENDER, State.OPEN, pool)
    refused += [
        lambda: lender.send(Grant(2, 0, GRANULE, 0, RW, 9)),  # not increasing
        lambda: lender.send(Revoke(3, RevokeMode.EVICT)),  # never granted
        lambda: lender.send(Revoke(0, RevokeMode.EVICT)),
        lambda: lender.send(Revoke(1, RevokeMode.RELEASE)),  # outstanding
        lambda: lender.send(PageInDone(2, 0)),  # never asked
        lambda: lender.send(Grant(3, 0, GRANULE, 0, RW, -1)),  # no fd
    ]
    def bookkeeping() -> object:
        return [(c.state, c.owed_answers(), c.awaiting_answers()) for c in (borrower, lender)]

    for attempt in refused:
        before = bookkeeping()
        with pytest.raises(LeaseProtocolError) as info:
            attempt()
        assert not info.value.fatal
        assert bookkeeping() == before
    lender.send(Grant(3, 0, GRANULE, 0, RW, 9))  # the refused -1 did not use up id 3


def test_in_flight_limit(pool: FdPool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection_module, "MAX_IN_FLIGHT", 4)
    borrower = make(Role.BORROWER, State.OPEN, pool)  # already owes 4 answers
    err = _fatal_on_receive(borrower, encode(Ping(77)))
    assert isinstance(err.reply, Bye)
    lender = make(Role.LENDER, State.OPEN, pool)  # already awaits 4 answers
    with pytest.raises(LeaseProtocolError):
        lender.send(Ping(2))
    _take(lender, encode(Pong(1)))
    lender.send(Ping(2))


# -- file descriptors -------------------------------------------------------------------------


def test_fds_belong_to_the_message_holding_the_chunks_last_byte(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    ping, grant = encode(Ping(5)), encode(Grant(3, 2 * GRANULE, GRANULE, 0, RW, 0))
    fd = pool.new()
    borrower.receive_data(ping + grant[:10], (fd,))
    assert borrower.next_event() == Ping(5)
    assert borrower.next_event() is NEED_DATA
    borrower.receive_data(grant[10:])
    assert borrower.next_event() == Grant(3, 2 * GRANULE, GRANULE, 0, RW, fd)
    assert fd_is_open(fd)


def test_fds_with_a_chunk_ending_in_the_next_message_go_to_that_message(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    grant, ping = encode(Grant(3, 2 * GRANULE, GRANULE, 0, RW, 0)), encode(Ping(5))
    fd = pool.new()
    borrower.receive_data(grant + ping[:1], (fd,))
    with pytest.raises(LeaseProtocolError) as info:
        borrower.next_event()
    assert info.value.code == ErrorCode.BAD_FD_COUNT  # the GRANT came without its fd
    err = _refusal(borrower, ping[1:])
    assert err.code == ErrorCode.BAD_FD_COUNT  # the PING came with one
    assert not fd_is_open(fd)


def test_wrong_fd_counts_close_every_fd(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    grant = encode(Grant(3, 2 * GRANULE, GRANULE, 0, RW, 0))
    fds = (pool.new(), pool.new())
    err = _refusal(borrower, grant, fds)
    assert err.reply == Error(MsgType.GRANT, 3, ErrorCode.BAD_FD_COUNT, err.reply.text)  # type: ignore[union-attr]
    assert not any(map(fd_is_open, fds))
    # Two chunks, each ending inside the same GRANT, each with an fd: still two.
    a, b = pool.new(), pool.new()
    borrower.receive_data(grant[:20], (a,))
    borrower.receive_data(grant[20:], (b,))
    with pytest.raises(LeaseProtocolError):
        borrower.next_event()
    assert not fd_is_open(a) and not fd_is_open(b)
    # A refused GRANT leaves its id unused: the same GRANT with one fd is fine now.
    c = pool.new()
    assert _take(borrower, grant, (c,)) == Grant(3, 2 * GRANULE, GRANULE, 0, RW, c)


def test_fd_on_a_message_that_takes_none(pool: FdPool) -> None:
    for role, event in ((Role.BORROWER, Ping(9)), (Role.LENDER, GrantAck(1))):
        conn = make(role, State.OPEN, pool)
        fd = pool.new()
        awaiting = conn.awaiting_answers()
        err = _refusal(conn, encode(event), (fd,))
        assert err.code == ErrorCode.BAD_FD_COUNT and not fd_is_open(fd)
        assert conn.awaiting_answers() == awaiting  # a refused answer answers nothing


def test_refused_grant_after_checks_closes_its_fd(pool: FdPool) -> None:
    lender = make(Role.LENDER, State.OPEN, pool)
    fd = pool.new()
    err = _refusal(lender, encode(Grant(3, 0, GRANULE, 0, RW, 0)), (fd,))
    assert err.code == ErrorCode.UNEXPECTED and not fd_is_open(fd)


def test_fatal_error_closes_fds_buffered_behind_it(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    fd = pool.new()
    grant = encode(Grant(3, 2 * GRANULE, GRANULE, 0, RW, 0))
    borrower.receive_data(encode(Ping(5)))
    borrower.receive_data(grant, (fd,))
    borrower.receive_data(struct.pack("<HHIQ", MsgType.PING, 0, 1 << 20, 0))
    assert borrower.next_event() == Ping(5)
    event = borrower.next_event()
    assert isinstance(event, Grant) and fd_is_open(fd)  # handed out: the caller's now
    fd2 = pool.new()
    borrower.receive_data(grant, (fd2,))
    with pytest.raises(LeaseProtocolError) as info:
        borrower.next_event()
    assert info.value.fatal and not fd_is_open(fd2)


def test_close_releases_held_fds(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    fd = pool.new()
    borrower.receive_data(encode(Grant(3, 2 * GRANULE, GRANULE, 0, RW, 0))[:30], (fd,))
    assert borrower.next_event() is NEED_DATA and fd_is_open(fd)
    borrower.close()
    assert not fd_is_open(fd)
    assert borrower.next_event() is CLOSED


# -- end of stream and BYE --------------------------------------------------------------------


def test_end_of_stream_after_buffered_events(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    borrower.receive_data(encode(Ping(5)) + encode(Ping(6)))
    borrower.receive_data(b"")
    assert borrower.next_event() == Ping(5)
    assert borrower.next_event() == Ping(6)
    assert borrower.next_event() is CLOSED
    assert borrower.next_event() is CLOSED
    assert borrower.state is State.CLOSED
    fd = pool.new()
    with pytest.raises(LeaseProtocolError):
        borrower.receive_data(b"x", (fd,))
    assert not fd_is_open(fd)
    with pytest.raises(LeaseProtocolError):
        borrower.send(Ping(9))


def test_end_of_stream_inside_a_message(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    fd = pool.new()
    borrower.receive_data(encode(Grant(3, 2 * GRANULE, GRANULE, 0, RW, 0))[:40], (fd,))
    borrower.receive_data(b"")
    with pytest.raises(LeaseProtocolError) as info:
        borrower.next_event()
    assert info.value.fatal and not fd_is_open(fd)


def test_end_of_stream_with_fds_and_no_data(pool: FdPool) -> None:
    borrower = make(Role.BORROWER, State.OPEN, pool)
    fd = pool.new()
    borrower.receive_data(b"", (fd,))
    assert not fd_is_open(fd)
    assert borrower.next_event() is CLOSED


def test_after_our_bye_everything_is_dropped(pool: FdPool) -> None:
    lender = make(Role.LENDER, State.BYE_SENT, pool)
    fd = pool.new()
    stream = encode(PageIn(2, 0, GRANULE, Access.READ)) + encode(Bye())
    lender.receive_data(stream + encode(GrantAck(1)), (fd,))
    lender.receive_data(raw_message(UNKNOWN, 1))
    assert lender.next_event() is NEED_DATA
    assert not fd_is_open(fd)
    lender.receive_data(b"")
    assert lender.next_event() is CLOSED


def test_nothing_may_follow_the_peers_bye(pool: FdPool) -> None:
    lender = make(Role.LENDER, State.BYE_RECEIVED, pool)
    err = _fatal_on_receive(lender, encode(Ping(3)))
    assert err.reply is None


def test_framing_limits(pool: FdPool) -> None:
    for length in (0, 15, 4097, 0xFFFF_FFFF):
        conn = make(Role.LENDER, State.OPEN, pool)
        err = _fatal_on_receive(conn, struct.pack("<HHIQ", MsgType.PING, 0, length, 0))
        assert isinstance(err.reply, Bye) and err.reply.reason == ByeReason.PROTOCOL_ERROR
    conn = make(Role.LENDER, State.OPEN, pool)
    biggest = raw_message(UNKNOWN, 1, b"\x00" * (4096 - 16))
    assert _refusal(conn, biggest).code == ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize(
    ("role", "event"),
    list(
        itertools.product(
            [Role.BORROWER, Role.LENDER],
            [Ping(1), Error(1, 1, 1), raw_message(UNKNOWN, 1), Grant(1, 0, GRANULE, 0, RW, 0)],
        )
    ),
)
def test_nothing_but_hello_or_bye_before_the_handshake(
    role: Role, event: Event | bytes, pool: FdPool
) -> None:
    conn = make(role, State.START, pool)
    data = event if isinstance(event, bytes) else encode(event)
    fds = (pool.new(),) if isinstance(event, Grant) else ()
    conn.receive_data(data, fds)
    with pytest.raises(LeaseProtocolError) as info:
        conn.next_event()
    assert info.value.fatal and isinstance(info.value.reply, Bye)
    assert not (fds and fd_is_open(fds[0]))


def test_a_hello_with_an_fd_is_fatal(pool: FdPool) -> None:
    conn = LenderConnection()
    fd = pool.new()
    conn.receive_data(encode(borrower_hello()), (fd,))
    with pytest.raises(LeaseProtocolError) as info:
        conn.next_event()
    assert info.value.fatal and info.value.code == ErrorCode.OTHER and not fd_is_open(fd)
    assert isinstance(info.value.reply, Bye)
