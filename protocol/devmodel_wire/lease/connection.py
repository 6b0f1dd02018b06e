"""Sans-IO lease-protocol connections for the borrower (devmodel) and the lender.

Both sides are driven the same way (pyvfio_user.sansio): `receive_data(data, fds)` with what a
recvmsg returned, `next_event()` until NEED_DATA, `send(event)` for what to write. Which
message is acceptable in which state is decided by the tables below and nowhere else, so that
the tests and the specification's state table can be compared entry by entry.

File descriptors follow the kernel's rule for SCM_RIGHTS on a Unix stream socket: a recvmsg
that returns fds stops right after the data the sender passed with them, and a sender passes a
message's fds with that message's own sendmsg. So the fds of one `receive_data` call belong to
the message containing the last byte of that call's data. The connection owns them until it
hands them out inside an event; it closes any it refuses, and `close()` closes the rest.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections import deque
from collections.abc import Mapping, Sequence
from typing import ClassVar, Final, TypeAlias

from devmodel_wire.lease import events as ev
from devmodel_wire.lease.checks import (
    check_grant,
    fd_kind_problem,
    geometry_problem,
    range_problem,
)
from devmodel_wire.lease.constants import (
    HEADER_SIZE,
    MAX_IN_FLIGHT,
    MAX_MESSAGE_SIZE,
    MAX_TEXT_BYTES,
    VERSION_MAJOR,
    VERSION_MINOR,
    ByeReason,
    ErrorCode,
    MsgType,
    NackReason,
)
from devmodel_wire.lease.errors import LeaseProtocolError
from devmodel_wire.lease.wire import HEADER, decode, encode, encode_page_in
from pyvfio_user.sansio import CLOSED, NEED_DATA, Outgoing, Sentinel


class Role(enum.Enum):
    BORROWER = "borrower"
    LENDER = "lender"


class State(enum.Enum):
    # Members are singletons: identity hashing (C), not Enum's Python-level hash of the name,
    # for the SEND/RECEIVE table lookups every message makes.
    __hash__ = object.__hash__

    START = "START"
    HELLO_SENT = "HELLO_SENT"  # borrower: offered, waiting for the lender's answer
    HELLO_RECEIVED = "HELLO_RECEIVED"  # lender: must answer HELLO or BYE
    OPEN = "OPEN"
    BYE_SENT = "BYE_SENT"  # we said BYE; what still arrives is dropped
    BYE_RECEIVED = "BYE_RECEIVED"  # the peer said BYE; only end of stream may follow
    CLOSED = "CLOSED"
    ERROR = "ERROR"  # a fatal error happened; only a BYE may still be sent


class Verdict(enum.Enum):
    """Receive-table outcomes that are not a next state."""

    FATAL = "fatal"  # the stream cannot be trusted: raise fatal, drop the connection
    REJECT = "reject"  # refuse this message (ERROR back), the session goes on
    DISCARD = "discard"  # drop silently (we already said BYE)


Outcome: TypeAlias = State | Verdict
TypeKey: TypeAlias = MsgType | None
"""A message type as the tables index it; None stands for every number 1.0 does not define."""
Key: TypeAlias = tuple[MsgType, int]

ALL_TYPES: Final[tuple[TypeKey, ...]] = (*MsgType, None)

ROLE_STATES: Final[Mapping[Role, tuple[State, ...]]] = {
    Role.BORROWER: (
        State.START,
        State.HELLO_SENT,
        State.OPEN,
        State.BYE_SENT,
        State.BYE_RECEIVED,
        State.CLOSED,
        State.ERROR,
    ),
    Role.LENDER: (
        State.START,
        State.HELLO_RECEIVED,
        State.OPEN,
        State.BYE_SENT,
        State.BYE_RECEIVED,
        State.CLOSED,
        State.ERROR,
    ),
}

REQUEST_TYPES: Final = frozenset({MsgType.GRANT, MsgType.REVOKE, MsgType.PAGE_IN, MsgType.PING})
ANSWERED_BY: Final[Mapping[MsgType, MsgType]] = {
    MsgType.GRANT_ACK: MsgType.GRANT,
    MsgType.GRANT_NACK: MsgType.GRANT,
    MsgType.REVOKED: MsgType.REVOKE,
    MsgType.PAGE_IN_DONE: MsgType.PAGE_IN,
    MsgType.PONG: MsgType.PING,
}
"""Answer type -> the request type it answers (ERROR can answer any request as well)."""

_M = MsgType
_S = State
_V = Verdict

_Rows: TypeAlias = Mapping[State, tuple[Mapping[TypeKey, Outcome], Outcome]]
_Table: TypeAlias = Mapping[State, Mapping[TypeKey, Outcome]]


def _complete(rows: _Rows) -> _Table:
    """Expand each row's default so that the table has an entry for every state and type."""
    return {
        state: {t: explicit.get(t, default) for t in ALL_TYPES}
        for state, (explicit, default) in rows.items()
    }


# The messages each side may send while OPEN, besides BYE: what the other side may receive.
BORROWER_SENDS: Final = (
    _M.ERROR,
    _M.PING,
    _M.PONG,
    _M.GRANT_ACK,
    _M.GRANT_NACK,
    _M.REVOKED,
    _M.PAGE_IN,
)
LENDER_SENDS: Final = (_M.ERROR, _M.PING, _M.PONG, _M.GRANT, _M.REVOKE, _M.PAGE_IN_DONE)


def _receive_table(handshake: _Rows, peer_sends: tuple[MsgType, ...]) -> _Table:
    """The receive table of a side: its handshake rows, then what every side shares."""
    open_row: dict[TypeKey, Outcome] = {_M.HELLO: _V.FATAL, _M.BYE: _S.BYE_RECEIVED}
    open_row.update(dict.fromkeys(peer_sends, _S.OPEN))
    return _complete(
        {
            **handshake,
            _S.OPEN: (open_row, _V.REJECT),
            _S.BYE_SENT: ({}, _V.DISCARD),
            _S.BYE_RECEIVED: ({}, _V.FATAL),
            _S.CLOSED: ({}, _V.FATAL),
            _S.ERROR: ({}, _V.FATAL),
        }
    )


def _send_table(
    handshake: Mapping[State, Mapping[MsgType, State]], sends: tuple[MsgType, ...]
) -> Mapping[State, Mapping[MsgType, State]]:
    """The send table of a side: its handshake rows, then what every side shares."""
    return {
        **handshake,
        _S.OPEN: {_M.BYE: _S.BYE_SENT, **dict.fromkeys(sends, _S.OPEN)},
        _S.BYE_SENT: {},
        _S.BYE_RECEIVED: {},
        _S.CLOSED: {},
        _S.ERROR: {_M.BYE: _S.ERROR},
    }


# What receiving each message does, per state: the next state, or a Verdict.
BORROWER_RECEIVE: Final = _receive_table(
    {
        _S.START: ({_M.BYE: _S.BYE_RECEIVED}, _V.FATAL),
        _S.HELLO_SENT: ({_M.HELLO: _S.OPEN, _M.BYE: _S.BYE_RECEIVED}, _V.FATAL),
    },
    LENDER_SENDS,
)
LENDER_RECEIVE: Final = _receive_table(
    {
        _S.START: ({_M.HELLO: _S.HELLO_RECEIVED, _M.BYE: _S.BYE_RECEIVED}, _V.FATAL),
        _S.HELLO_RECEIVED: ({_M.BYE: _S.BYE_RECEIVED}, _V.FATAL),
    },
    BORROWER_SENDS,
)

# What sending each message does, per state; a missing entry means send() refuses it.
BORROWER_SEND: Final = _send_table(
    {
        _S.START: {_M.HELLO: _S.HELLO_SENT, _M.BYE: _S.BYE_SENT},
        _S.HELLO_SENT: {_M.BYE: _S.BYE_SENT},
    },
    BORROWER_SENDS,
)
LENDER_SEND: Final = _send_table(
    {_S.START: {_M.BYE: _S.BYE_SENT}, _S.HELLO_RECEIVED: {_M.HELLO: _S.OPEN, _M.BYE: _S.BYE_SENT}},
    LENDER_SENDS,
)


_BY_NUMBER: Final[Mapping[int, MsgType]] = {int(t): t for t in MsgType}


def known_type(raw: int) -> TypeKey:
    # A dict rather than MsgType(raw): this runs for every message, and an enum call costs
    # several times a lookup (and an exception for unknown numbers).
    return _BY_NUMBER.get(raw)


def type_name(raw: int) -> str:
    known = known_type(raw)
    return known.name if known is not None else f"type {raw:#06x}"


def event_id(event: ev.Event) -> int:
    """The value the event puts in the header's id field."""
    # A lookup by exact type: this runs for every message sent, and a chain of isinstance
    # tests against unions cost more than the rest of the bookkeeping.
    field = _ID_FIELD.get(type(event))
    if field is not None:
        value: int = getattr(event, field)
        return value
    if isinstance(event, ev.Grant | ev.GrantAck | ev.GrantNack | ev.Revoke | ev.Revoked):
        return event.lease_id  # subclasses (none in this package) take the slow way
    if isinstance(event, ev.PageIn | ev.PageInDone):
        return event.request_id
    if isinstance(event, ev.Ping | ev.Pong):
        return event.token
    if isinstance(event, ev.Error):
        return event.ref_id
    return 0


_ID_FIELD: dict[type, str] = {
    ev.Grant: "lease_id",
    ev.GrantAck: "lease_id",
    ev.GrantNack: "lease_id",
    ev.Revoke: "lease_id",
    ev.Revoked: "lease_id",
    ev.PageIn: "request_id",
    ev.PageInDone: "request_id",
    ev.Ping: "token",
    ev.Pong: "token",
    ev.Error: "ref_id",
}


def answered_by_error(error: ev.Error) -> Key | None:
    """The request an ERROR answers, or None: a type this side does not know was never sent,
    and a DUPLICATE_ID refusal leaves the first request of that id outstanding."""
    ref = known_type(error.ref_type)
    if ref is None or error.code == ErrorCode.DUPLICATE_ID:
        return None
    return ref, error.ref_id


def clip(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """Cut `text` to at most `limit` UTF-8 bytes on a character boundary, without NULs."""
    raw = text.replace("\x00", "?").encode("utf-8", "replace")[:limit]
    return raw.decode("utf-8", "ignore")


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


_Frame: TypeAlias = tuple[int, int, bytes, list[int]]


class _Connection:
    """What both sides share: framing, fd association, tables, request bookkeeping."""

    role: ClassVar[Role]
    RECEIVE: ClassVar[Mapping[State, Mapping[TypeKey, Outcome]]]
    SEND: ClassVar[Mapping[State, Mapping[MsgType, State]]]

    def __init__(self) -> None:
        self._state = State.START
        self._buf = bytearray()
        self._buf_start = 0  # stream offset of self._buf[0]
        self._read = 0  # index in self._buf of the first unconsumed byte
        # (stream offset of the last byte of a receive_data chunk, the fds that came with it)
        self._fd_groups: deque[tuple[int, list[int]]] = deque()
        self._eof = False
        self._failure = ""
        self._bye_sent = False
        self._local_hello: ev.Hello | None = None
        self._peer_hello: ev.Hello | None = None
        self._awaiting: set[Key] = set()  # requests we sent, not yet answered
        self._owed: dict[Key, int] = {}  # requests we received and must answer, with counts
        self._owed_total = 0
        # Borrower: highest lease id received; lender: highest lease id sent.
        self._last_lease_id = 0

    # -- what the caller may inspect ----------------------------------------------------------

    def drained(self) -> bool:
        """True when `next_event()` can only answer NEED_DATA: nothing is buffered, the stream
        has not ended, the connection has not failed or closed. A receiver that handles what
        one receive brought asks this after each event instead of calling `next_event()` once
        more just to hear NEED_DATA (four calls on the way from a GRANT to the guest)."""
        return (
            self._read == len(self._buf)
            and not self._eof
            and self._state is not State.ERROR
            and self._state is not State.CLOSED
        )

    @property
    def state(self) -> State:
        return self._state

    @property
    def local_hello(self) -> ev.Hello | None:
        return self._local_hello

    @property
    def peer_hello(self) -> ev.Hello | None:
        return self._peer_hello

    @property
    def version(self) -> tuple[int, int] | None:
        """The agreed version, known once the lender's HELLO has been sent or received."""
        hello = self._lender_hello()
        return None if hello is None else (hello.major, hello.minor)

    @property
    def features(self) -> int:
        """The agreed feature bits (the lender's HELLO), 0 until then."""
        hello = self._lender_hello()
        return 0 if hello is None else hello.features

    def awaiting_answers(self) -> frozenset[Key]:
        """Requests this side sent that are not answered yet, as (type, id)."""
        return frozenset(self._awaiting)

    def owed_answers(self) -> frozenset[Key]:
        """Requests the peer sent that this side has not answered yet, as (type, id)."""
        return frozenset(self._owed)

    def _lender_hello(self) -> ev.Hello | None:
        raise NotImplementedError

    # -- input --------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Buffer what one recvmsg returned; `b""` means the peer closed the stream."""
        if self._eof or self._state in (State.ERROR, State.CLOSED):
            _close_fds(fds)
            if self._state is State.ERROR:
                return
            raise LeaseProtocolError("receive_data() after the end of the stream", fatal=False)
        if not data:
            # Linux never returns fds without data on a stream socket; nothing to attach to.
            _close_fds(fds)
            self._eof = True
            return
        if fds:
            self._fd_groups.append((self._buf_start + len(self._buf) + len(data) - 1, list(fds)))
        self._buf += data

    def next_event(self) -> ev.Event | Sentinel:
        """The next event, NEED_DATA, or CLOSED once the stream ended and all was delivered.

        Raises LeaseProtocolError: non-fatal ones consumed the offending message and the next
        call goes on with the following one; after a fatal one every call raises again.
        """
        while True:
            if self._state is State.ERROR:
                raise LeaseProtocolError(f"the connection failed earlier: {self._failure}")
            if self._state is State.CLOSED:
                return CLOSED
            frame = self._frame()
            if frame is NEED_DATA:
                return NEED_DATA
            if frame is CLOSED:
                self._state = State.CLOSED
                return CLOSED
            assert isinstance(frame, tuple)
            event = self._dispatch(*frame)
            if event is not None:
                return event

    def close(self) -> None:
        """Close every fd still held (received but not handed out) and drop buffered input."""
        for _, fds in self._fd_groups:
            _close_fds(fds)
        self._fd_groups.clear()
        self._buf.clear()
        self._buf_start += self._read
        self._read = 0
        if self._state is not State.ERROR:
            self._state = State.CLOSED

    def _frame(self) -> _Frame | Sentinel:
        available = len(self._buf) - self._read
        if available < HEADER_SIZE:
            return self._short(available)
        raw_type, _flags, length, msg_id = HEADER.unpack_from(self._buf, self._read)
        if length < HEADER_SIZE or length > MAX_MESSAGE_SIZE:
            raise self._fail(
                f"{type_name(raw_type)} header gives length {length}, outside "
                f"{HEADER_SIZE}..{MAX_MESSAGE_SIZE}: framing is lost"
            )
        if available < length:
            return self._short(available)
        start = self._read
        end = start + length
        with memoryview(self._buf) as view:
            body = bytes(view[start + HEADER_SIZE : end])
        end_offset = self._buf_start + end
        fds: list[int] = []
        while self._fd_groups and self._fd_groups[0][0] < end_offset:
            fds.extend(self._fd_groups.popleft()[1])
        self._read = end
        if self._read == len(self._buf):
            self._buf_start += self._read
            self._buf.clear()
            self._read = 0
        elif self._read >= 1 << 16:
            del self._buf[: self._read]
            self._buf_start += self._read
            self._read = 0
        return raw_type, msg_id, body, fds

    def _short(self, available: int) -> Sentinel:
        if not self._eof:
            return NEED_DATA
        if available:
            raise self._fail(f"the stream ended inside a message ({available} bytes buffered)")
        return CLOSED

    def _dispatch(self, raw_type: int, msg_id: int, body: bytes, fds: list[int]) -> ev.Event | None:
        known = _BY_NUMBER.get(raw_type)
        outcome = self.RECEIVE[self._state][known]
        if outcome is Verdict.DISCARD:
            _close_fds(fds)
            return None
        if outcome is Verdict.FATAL:
            _close_fds(fds)
            name = type_name(raw_type)
            raise self._fail(f"the {self.role.value} cannot receive {name} in {self._state.name}")
        if outcome is Verdict.REJECT:
            _close_fds(fds)
            name = type_name(raw_type)
            if known is None:
                raise self._refuse(raw_type, msg_id, ErrorCode.UNKNOWN_TYPE, f"unknown {name}")
            why = f"the {self.role.value} never receives {name}"
            raise self._refuse(raw_type, msg_id, ErrorCode.UNEXPECTED, why)
        assert isinstance(outcome, State)
        try:
            event = decode(raw_type, msg_id, body, fds)
        except LeaseProtocolError as exc:
            _close_fds(fds)
            if self._state is not State.OPEN:
                raise self._fail(str(exc)) from None
            raise self._refuse(raw_type, msg_id, exc.code, str(exc)) from None
        try:
            if isinstance(event, ev.Hello):
                self._receive_hello(event)
            elif self._state is State.OPEN and not isinstance(event, ev.Bye):
                self._track_received(event)
        except LeaseProtocolError:
            if isinstance(event, ev.Grant):
                _close_fds((event.fd,))
            raise
        self._state = outcome
        return event

    def _receive_hello(self, hello: ev.Hello) -> None:
        raise NotImplementedError

    def _track_received(self, event: ev.Event) -> None:
        msg_type = event.TYPE
        msg_id = event_id(event)
        if isinstance(event, ev.Error):
            settled = answered_by_error(event)
            if settled is not None:
                self._awaiting.discard(settled)
            return
        request = ANSWERED_BY.get(msg_type)
        if request is not None:
            if (request, msg_id) not in self._awaiting:
                raise self._refuse(
                    msg_type,
                    msg_id,
                    ErrorCode.UNKNOWN_ID,
                    f"{msg_type.name} {msg_id} answers no outstanding {request.name}",
                )
            self._awaiting.remove((request, msg_id))
            return
        key = (msg_type, msg_id)
        if msg_type is MsgType.GRANT:
            if msg_id <= self._last_lease_id:
                self._owe(key)
                text = f"lease id {msg_id} is not above {self._last_lease_id}"
                raise LeaseProtocolError(
                    f"GRANT: {text}",
                    fatal=False,
                    code=ErrorCode.DUPLICATE_ID,
                    reply=ev.GrantNack(msg_id, NackReason.DUPLICATE_LEASE_ID, text),
                )
            self._owe(key)
            self._last_lease_id = msg_id
            return
        if msg_type is MsgType.REVOKE and (msg_id == 0 or msg_id > self._last_lease_id):
            raise self._refuse(
                msg_type, msg_id, ErrorCode.UNKNOWN_ID, f"lease {msg_id} was never granted"
            )
        if key in self._owed:
            raise self._refuse(
                msg_type,
                msg_id,
                ErrorCode.DUPLICATE_ID,
                f"{msg_type.name} {msg_id} is already outstanding",
            )
        self._owe(key)

    def _owe(self, key: Key) -> None:
        if self._owed_total >= MAX_IN_FLIGHT:
            raise self._fail(f"the peer has more than {MAX_IN_FLIGHT} unanswered requests")
        self._owed[key] = self._owed.get(key, 0) + 1
        self._owed_total += 1

    def _settle(self, key: Key) -> bool:
        count = self._owed.get(key, 0)
        if not count:
            return False
        if count == 1:
            del self._owed[key]
        else:
            self._owed[key] = count - 1
        self._owed_total -= 1
        return True

    def _fail(
        self, message: str, reason: ByeReason = ByeReason.PROTOCOL_ERROR
    ) -> LeaseProtocolError:
        """Enter ERROR: release every held fd and build the fatal error to raise."""
        may_say_bye = not self._bye_sent and self._state in (
            State.START,
            State.HELLO_SENT,
            State.HELLO_RECEIVED,
            State.OPEN,
        )
        self._state = State.ERROR
        self._failure = message
        for _, fds in self._fd_groups:
            _close_fds(fds)
        self._fd_groups.clear()
        self._buf.clear()
        self._read = 0
        reply = ev.Bye(reason, clip(message)) if may_say_bye else None
        return LeaseProtocolError(message, fatal=True, code=ErrorCode.OTHER, reply=reply)

    def _refuse(
        self, raw_type: int, msg_id: int, code: ErrorCode, message: str
    ) -> LeaseProtocolError:
        """A non-fatal error whose reply is the ERROR for the refused message."""
        reply = (
            None if raw_type == MsgType.ERROR else ev.Error(raw_type, msg_id, code, clip(message))
        )
        return LeaseProtocolError(message, fatal=False, code=code, reply=reply)

    # -- output -------------------------------------------------------------------------------

    def send(self, event: ev.Event) -> Outgoing:
        """The bytes and fds for `event`; refuses (non-fatal) what this side may not send now.

        A refused send changes nothing. The fd of a Grant stays the caller's: close it after
        the sendmsg that carries it.
        """
        msg_type = event.TYPE
        next_state = self.SEND[self._state].get(msg_type)
        if next_state is None or (msg_type is MsgType.BYE and self._bye_sent):
            raise self._local(
                f"the {self.role.value} may not send {msg_type.name} in {self._state.name}"
            )
        data = encode(event)
        if isinstance(event, ev.Hello):
            self._send_hello(event)
        elif self._state is State.OPEN and not isinstance(event, ev.Bye):
            self._track_sent(event)
        if isinstance(event, ev.Bye):
            self._bye_sent = True
        self._state = next_state
        return Outgoing(data, (event.fd,) if isinstance(event, ev.Grant) else ())

    def _send_hello(self, hello: ev.Hello) -> None:
        raise NotImplementedError

    def _track_sent(self, event: ev.Event) -> None:
        """Check `event` against the bookkeeping and record it; changes nothing if it raises."""
        msg_type = event.TYPE
        msg_id = event_id(event)
        if isinstance(event, ev.Error):
            settled = answered_by_error(event)
            if settled is not None:
                self._settle(settled)
            return
        request = ANSWERED_BY.get(msg_type)
        if request is not None:
            if not self._settle((request, msg_id)):
                raise self._local(f"there is no {request.name} {msg_id} to answer")
            return
        key = (msg_type, msg_id)
        if key in self._awaiting:
            raise self._local(f"{msg_type.name} {msg_id} is already outstanding")
        if len(self._awaiting) >= MAX_IN_FLIGHT:
            raise self._local(f"{MAX_IN_FLIGHT} requests are already outstanding")
        self._check_request(event)
        if msg_type is MsgType.GRANT:
            self._last_lease_id = msg_id
        self._awaiting.add(key)

    def _check_request(self, event: ev.Event) -> None:
        """Role-specific rules for a request about to be sent."""

    def _local(self, message: str) -> LeaseProtocolError:
        return LeaseProtocolError(message, fatal=False, code=ErrorCode.OTHER)


class BorrowerConnection(_Connection):
    """The device model's side: connects, offers HELLO, takes grants, asks for page-ins."""

    role: ClassVar[Role] = Role.BORROWER
    RECEIVE = BORROWER_RECEIVE
    SEND = BORROWER_SEND

    def _lender_hello(self) -> ev.Hello | None:
        return self._peer_hello

    def check_grant(self, grant: ev.Grant) -> NackReason | None:
        """The NACK reason for the grant's shape under the session geometry and the agreed
        features (its fd kind), or None."""
        hello = self._local_hello
        if hello is None:
            raise self._local("no HELLO has been sent, the geometry is unknown")
        return check_grant(
            grant,
            aperture_size=hello.aperture_size,
            granule=hello.granule,
            features=self.features,
        )

    def _send_hello(self, hello: ev.Hello) -> None:
        if (hello.major, hello.minor) != (VERSION_MAJOR, VERSION_MINOR):
            raise self._local(
                f"this borrower implements {VERSION_MAJOR}.{VERSION_MINOR}, "
                f"not {hello.major}.{hello.minor}"
            )
        problem = geometry_problem(hello.aperture_size, hello.granule)
        if problem is not None:
            raise self._local(problem)
        self._local_hello = hello

    def _receive_hello(self, hello: ev.Hello) -> None:
        offer = self._local_hello
        assert offer is not None
        if hello.major != offer.major:
            raise self._fail(
                f"the lender answered version {hello.major}.{hello.minor} to an offer of "
                f"{offer.major}.{offer.minor}",
                ByeReason.UNSUPPORTED_VERSION,
            )
        if hello.minor > offer.minor:
            raise self._fail(
                f"the lender chose minor version {hello.minor}, above the offered {offer.minor}"
            )
        echoed = (hello.guest_id, hello.aperture_size, hello.granule)
        if echoed != (offer.guest_id, offer.aperture_size, offer.granule):
            raise self._fail(
                f"the lender's HELLO names guest {hello.guest_id}, aperture "
                f"{hello.aperture_size:#x}, granule {hello.granule:#x}, not what was offered"
            )
        if hello.features & ~offer.features:
            raise self._fail(
                f"the lender accepted features {hello.features & ~offer.features:#x} "
                "that were never offered"
            )
        self._peer_hello = hello

    def _check_request(self, event: ev.Event) -> None:
        if isinstance(event, ev.PageIn):
            self._check_page_in(event.request_id, event.offset, event.length)

    def _check_page_in(self, request_id: int, offset: int, length: int) -> None:
        hello = self._local_hello
        assert hello is not None
        problem = range_problem(
            offset, length, aperture_size=hello.aperture_size, granule=hello.granule
        )
        if problem is not None:
            raise self._local(f"PAGE_IN {request_id}: {problem}")

    def send_page_in(self, request_id: int, offset: int, length: int, access: int) -> bytes:
        """`send(PageIn(request_id, offset, length, access)).data` in one call: the same
        rules, bytes, errors and bookkeeping (tests/unit/test_lease_page_in_fast.py holds the
        two to each other). A guest's fault sends this while its vCPU waits, so the generic
        path's event object and its dispatch on the event's type are left out."""
        next_state = self.SEND[self._state].get(MsgType.PAGE_IN)
        if next_state is None:
            raise self._local(f"the {self.role.value} may not send PAGE_IN in {self._state.name}")
        data = encode_page_in(request_id, offset, length, access)
        if self._state is State.OPEN:
            key = (MsgType.PAGE_IN, request_id)
            if key in self._awaiting:
                raise self._local(f"PAGE_IN {request_id} is already outstanding")
            if len(self._awaiting) >= MAX_IN_FLIGHT:
                raise self._local(f"{MAX_IN_FLIGHT} requests are already outstanding")
            self._check_page_in(request_id, offset, length)
            self._awaiting.add(key)
        self._state = next_state
        return data


class LenderConnection(_Connection):
    """The lender's side: accepts one borrower, grants, revokes, answers page-ins."""

    role: ClassVar[Role] = Role.LENDER
    RECEIVE = LENDER_RECEIVE
    SEND = LENDER_SEND

    def _lender_hello(self) -> ev.Hello | None:
        return self._local_hello

    def hello_reply(self, name: str = "", features: int = 0) -> ev.Hello:
        """The HELLO that accepts the borrower's offer: its geometry, the agreed version, and
        `features` narrowed to what was offered."""
        offer = self._peer_hello
        if offer is None or self._state is not State.HELLO_RECEIVED:
            raise self._local("there is no borrower HELLO to answer")
        return ev.Hello(
            guest_id=offer.guest_id,
            aperture_size=offer.aperture_size,
            granule=offer.granule,
            features=features & offer.features,
            max_leases=0,
            name=name,
            major=VERSION_MAJOR,
            minor=min(offer.minor, VERSION_MINOR),
        )

    def _receive_hello(self, hello: ev.Hello) -> None:
        if hello.major != VERSION_MAJOR:
            raise self._fail(
                f"the borrower offers version {hello.major}.{hello.minor}; this lender speaks "
                f"{VERSION_MAJOR}.{VERSION_MINOR}",
                ByeReason.UNSUPPORTED_VERSION,
            )
        problem = geometry_problem(hello.aperture_size, hello.granule)
        if problem is not None:
            raise self._fail(problem, ByeReason.BAD_GEOMETRY)
        self._peer_hello = hello

    def _send_hello(self, hello: ev.Hello) -> None:
        offer = self._peer_hello
        assert offer is not None
        expected = self.hello_reply(hello.name, hello.features)
        if hello != expected or hello.features & ~offer.features:
            raise self._local(
                "the lender's HELLO must echo the borrower's guest id, aperture size and "
                f"granule, carry version {expected.major}.{expected.minor}, max_leases 0 and "
                "only offered features"
            )
        self._local_hello = hello

    def _check_request(self, event: ev.Event) -> None:
        if isinstance(event, ev.Grant) and event.lease_id <= self._last_lease_id:
            raise self._local(
                f"lease id {event.lease_id} is not above the last one, {self._last_lease_id}"
            )
        if isinstance(event, ev.Grant):
            # A peer that did not accept a feature is never sent what depends on it (6.3).
            problem = fd_kind_problem(event.flags, self.features)
            if problem is not None:
                raise self._local(f"GRANT {event.lease_id}: {problem}")
        if isinstance(event, ev.Revoke) and not 0 < event.lease_id <= self._last_lease_id:
            raise self._local(f"lease {event.lease_id} was never granted")
