"""Byte layouts of the lease protocol (docs/lease-protocol.md, "Messages") and nothing else.

Plain precompiled `struct.Struct` throughout, no construct. The formats are a dozen flat
little-endian records with at most one trailing string, so a declarative library buys little
readability over one Struct per table in the specification, while it costs about 9 us per
parse against 0.1 us (measured on the build machine). A guest fault costs four of these
messages (PAGE_IN, GRANT, GRANT_ACK, PAGE_IN_DONE) while the vCPU waits, so the difference is
on the critical path.

`decode` checks form only: sizes, string encoding, closed enumerations and the number of fds.
What a field means for the session (ids, geometry, state) is the connection's business, and
what it means for the aperture is the lease engine's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Final, TypeAlias

from devmodel_wire.lease import constants
from devmodel_wire.lease import events as ev
from devmodel_wire.lease.constants import (
    HEADER_SIZE,
    MAGIC,
    MAX_NAME_BYTES,
    MAX_TEXT_BYTES,
    MsgType,
)
from devmodel_wire.lease.errors import LeaseProtocolError

HEADER: Final = struct.Struct("<HHIQ")
"""type u16, flags u16, length u32 (header included), id u64."""

HELLO_BODY: Final = struct.Struct("<IHHIIQQIH")
"""magic, major, minor, guest_id, granule, aperture_size, features, max_leases, name_len."""
GRANT_BODY: Final = struct.Struct("<QQQII")
"""offset, length, fd_offset, prot, flags."""
CODE_TEXT_BODY: Final = struct.Struct("<IH")
"""reason or status, text_len: the head of BYE, GRANT_NACK and PAGE_IN_DONE."""
ERROR_BODY: Final = struct.Struct("<IHH")
"""code, ref_type, text_len."""
REVOKE_BODY: Final = struct.Struct("<I")
"""mode."""
PAGE_IN_BODY: Final = struct.Struct("<QQI")
"""offset, length, access."""


def fd_count(msg_type: int) -> int:
    """How many fds a message of this type must carry: one for GRANT, none for the rest."""
    return 1 if msg_type == MsgType.GRANT else 0


# -- encoding ---------------------------------------------------------------------------------


def _text_bytes(text: str, limit: int, what: str) -> bytes:
    try:
        raw = text.encode("utf-8")
    except UnicodeError as exc:
        raise LeaseProtocolError(f"{what} is not encodable as UTF-8: {exc}", fatal=False) from None
    if len(raw) > limit:
        raise LeaseProtocolError(f"{what} is {len(raw)} bytes, the limit is {limit}", fatal=False)
    if b"\x00" in raw:
        raise LeaseProtocolError(f"{what} contains NUL", fatal=False)
    return raw


def _body(event: ev.Event) -> tuple[int, bytes]:
    """The header id and the body bytes of `event`."""
    if isinstance(event, ev.Grant):
        if event.fd < 0:
            raise LeaseProtocolError(f"GRANT needs a file descriptor, not {event.fd}", fatal=False)
        body = GRANT_BODY.pack(event.offset, event.length, event.fd_offset, event.prot, event.flags)
        return event.lease_id, body
    if isinstance(event, ev.GrantAck | ev.Revoked):
        return event.lease_id, b""
    if isinstance(event, ev.PageIn):
        if event.access not in _ACCESSES:
            raise ValueError(f"unknown access type {event.access}")
        return event.request_id, PAGE_IN_BODY.pack(event.offset, event.length, event.access)
    if isinstance(event, ev.PageInDone):
        text = _text_bytes(event.text, MAX_TEXT_BYTES, "PAGE_IN_DONE text")
        return event.request_id, CODE_TEXT_BODY.pack(event.status, len(text)) + text
    if isinstance(event, ev.GrantNack):
        text = _text_bytes(event.text, MAX_TEXT_BYTES, "GRANT_NACK text")
        return event.lease_id, CODE_TEXT_BODY.pack(event.reason, len(text)) + text
    if isinstance(event, ev.Revoke):
        if event.mode not in _MODES:
            raise ValueError(f"unknown revoke mode {event.mode}")
        return event.lease_id, REVOKE_BODY.pack(event.mode)
    if isinstance(event, ev.Ping | ev.Pong):
        return event.token, b""
    if isinstance(event, ev.Error):
        text = _text_bytes(event.text, MAX_TEXT_BYTES, "ERROR text")
        return event.ref_id, ERROR_BODY.pack(event.code, event.ref_type, len(text)) + text
    if isinstance(event, ev.Bye):
        text = _text_bytes(event.text, MAX_TEXT_BYTES, "BYE text")
        return 0, CODE_TEXT_BODY.pack(event.reason, len(text)) + text
    name = _text_bytes(event.name, MAX_NAME_BYTES, "HELLO name")
    body = HELLO_BODY.pack(
        MAGIC,
        event.major,
        event.minor,
        event.guest_id,
        event.granule,
        event.aperture_size,
        event.features,
        event.max_leases,
        len(name),
    )
    return 0, body + name


def encode(event: ev.Event) -> bytes:
    """The complete message for `event`; its fd (GRANT only) travels separately.

    Raises a non-fatal LeaseProtocolError for values that do not fit their fields, so that a
    caller's bug surfaces as the one exception type instead of struct.error.
    """
    try:
        msg_id, body = _body(event)
        return HEADER.pack(event.TYPE, 0, HEADER_SIZE + len(body), msg_id) + body
    except (struct.error, ValueError, OverflowError) as exc:
        raise LeaseProtocolError(f"cannot encode {event.TYPE.name}: {exc}", fatal=False) from None


def encode_page_in(request_id: int, offset: int, length: int, access: int) -> bytes:
    """`encode(PageIn(request_id, offset, length, access))` without the event: the same bytes
    and the same errors, packed in the same order (tests/unit/test_lease_page_in_fast.py).

    A guest's fault sends this, and the vCPU waits until the lender has it, so it skips the
    event object and `encode`'s dispatch on the event's type.
    """
    try:
        if access not in _ACCESSES:
            raise ValueError(f"unknown access type {access}")
        body = PAGE_IN_BODY.pack(offset, length, access)
        return _PAGE_IN_HEADER(MsgType.PAGE_IN, 0, _PAGE_IN_SIZE, request_id) + body
    except (struct.error, ValueError, OverflowError) as exc:
        raise LeaseProtocolError(f"cannot encode PAGE_IN: {exc}", fatal=False) from None


_PAGE_IN_HEADER: Final = HEADER.pack
_PAGE_IN_SIZE: Final = HEADER_SIZE + PAGE_IN_BODY.size


# -- decoding ---------------------------------------------------------------------------------


def _malformed(msg_type: MsgType, why: str) -> LeaseProtocolError:
    return LeaseProtocolError(f"malformed {msg_type.name}: {why}", fatal=False)


def _exact(msg_type: MsgType, body: bytes, size: int) -> None:
    if len(body) != size:
        raise _malformed(msg_type, f"body is {len(body)} bytes, expected {size}")


def _text(msg_type: MsgType, body: bytes, start: int, length: int, limit: int) -> str:
    """Decode the trailing string; only HELLO may have bytes after it (version growth)."""
    if length > limit:
        raise _malformed(msg_type, f"string of {length} bytes, the limit is {limit}")
    end = start + length
    if len(body) < end or (msg_type != MsgType.HELLO and len(body) != end):
        raise _malformed(msg_type, f"body is {len(body)} bytes, its string says {end}")
    raw = body[start:end]
    if b"\x00" in raw:
        raise _malformed(msg_type, "string contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(msg_type, "string is not valid UTF-8") from None


def _members(family: type[IntEnum]) -> dict[int, IntEnum]:
    return {int(member): member for member in family}


# Dict lookups instead of enum calls: these run for every message, and an enum call costs
# several times as much (plus an exception for values a newer peer may send).
_BYE_REASONS: Final = _members(constants.ByeReason)
_NACK_REASONS: Final = _members(constants.NackReason)
_STATUSES: Final = _members(constants.PageInStatus)
_ERROR_CODES: Final = _members(constants.ErrorCode)
_MODES: Final[dict[int, constants.RevokeMode]] = {int(m): m for m in constants.RevokeMode}
_ACCESSES: Final[dict[int, constants.Access]] = {int(a): a for a in constants.Access}


def _code(known: dict[int, IntEnum], value: int) -> int:
    """The enum member for a known code, the bare number for one this version does not know."""
    return known.get(value, value)


def _hello(msg_id: int, body: bytes) -> ev.Hello:
    if len(body) < HELLO_BODY.size:
        raise _malformed(MsgType.HELLO, f"body is {len(body)} bytes, at least {HELLO_BODY.size}")
    magic, major, minor, guest, granule, size, features, max_leases, name_len = (
        HELLO_BODY.unpack_from(body)
    )
    if magic != MAGIC:
        raise _malformed(MsgType.HELLO, f"magic is {magic:#010x}, not {MAGIC:#010x}")
    name = _text(MsgType.HELLO, body, HELLO_BODY.size, name_len, MAX_NAME_BYTES)
    return ev.Hello(guest, size, granule, features, max_leases, name, major, minor)


def _code_text(msg_type: MsgType, body: bytes, known: dict[int, IntEnum]) -> tuple[int, str]:
    """The code (reason or status) and the text of a BYE, GRANT_NACK or PAGE_IN_DONE body."""
    if len(body) < CODE_TEXT_BODY.size:
        raise _malformed(msg_type, "body too short")
    code, text_len = CODE_TEXT_BODY.unpack_from(body)
    text = _text(msg_type, body, CODE_TEXT_BODY.size, text_len, MAX_TEXT_BYTES)
    return _code(known, code), text


def _bye(msg_id: int, body: bytes) -> ev.Bye:
    return ev.Bye(*_code_text(MsgType.BYE, body, _BYE_REASONS))


def _grant_nack(msg_id: int, body: bytes) -> ev.GrantNack:
    return ev.GrantNack(msg_id, *_code_text(MsgType.GRANT_NACK, body, _NACK_REASONS))


def _page_in_done(msg_id: int, body: bytes) -> ev.PageInDone:
    return ev.PageInDone(msg_id, *_code_text(MsgType.PAGE_IN_DONE, body, _STATUSES))


def _error(msg_id: int, body: bytes) -> ev.Error:
    if len(body) < ERROR_BODY.size:
        raise _malformed(MsgType.ERROR, "body too short")
    code, ref_type, text_len = ERROR_BODY.unpack_from(body)
    text = _text(MsgType.ERROR, body, ERROR_BODY.size, text_len, MAX_TEXT_BYTES)
    return ev.Error(ref_type, msg_id, _code(_ERROR_CODES, code), text)


_IdOnly: TypeAlias = type[ev.Ping | ev.Pong | ev.GrantAck | ev.Revoked]


def _id_only(cls: _IdOnly) -> Callable[[int, bytes], ev.Event]:
    """The decoder of a message that is its header id alone, with an empty body."""
    msg_type = cls.TYPE

    def decode_id_only(msg_id: int, body: bytes) -> ev.Event:
        _exact(msg_type, body, 0)
        return cls(msg_id)

    return decode_id_only


def _revoke(msg_id: int, body: bytes) -> ev.Revoke:
    _exact(MsgType.REVOKE, body, REVOKE_BODY.size)
    (mode,) = REVOKE_BODY.unpack(body)
    known = _MODES.get(mode)
    if known is None:
        raise _malformed(MsgType.REVOKE, f"unknown mode {mode}")
    return ev.Revoke(msg_id, known)


def _page_in(msg_id: int, body: bytes) -> ev.PageIn:
    _exact(MsgType.PAGE_IN, body, PAGE_IN_BODY.size)
    offset, length, access = PAGE_IN_BODY.unpack(body)
    known = _ACCESSES.get(access)
    if known is None:
        raise _malformed(MsgType.PAGE_IN, f"unknown access type {access}")
    return ev.PageIn(msg_id, offset, length, known)


_DECODERS: Final[dict[int, Callable[[int, bytes], ev.Event]]] = {
    MsgType.HELLO: _hello,
    MsgType.BYE: _bye,
    MsgType.ERROR: _error,
    MsgType.PING: _id_only(ev.Ping),
    MsgType.PONG: _id_only(ev.Pong),
    MsgType.GRANT_ACK: _id_only(ev.GrantAck),
    MsgType.GRANT_NACK: _grant_nack,
    MsgType.REVOKE: _revoke,
    MsgType.REVOKED: _id_only(ev.Revoked),
    MsgType.PAGE_IN: _page_in,
    MsgType.PAGE_IN_DONE: _page_in_done,
}


def decode(msg_type: int, msg_id: int, body: bytes, fds: Sequence[int]) -> ev.Event:
    """The event for one framed message (header already split off).

    Raises a non-fatal LeaseProtocolError whose `code` is the ERROR code to answer with. Never
    closes `fds`: whoever called decides what happens to refused descriptors.
    """
    if msg_type == MsgType.GRANT:
        _exact(MsgType.GRANT, body, GRANT_BODY.size)
        if len(fds) != 1:
            raise LeaseProtocolError(
                f"GRANT carries {len(fds)} file descriptors, exactly 1 is required",
                fatal=False,
                code=constants.ErrorCode.BAD_FD_COUNT,
            )
        offset, length, fd_offset, prot, flags = GRANT_BODY.unpack(body)
        return ev.Grant(msg_id, offset, length, fd_offset, prot, fds[0], flags)
    decoder = _DECODERS.get(msg_type)
    if decoder is None:
        raise LeaseProtocolError(
            f"unknown message type {msg_type:#06x}",
            fatal=False,
            code=constants.ErrorCode.UNKNOWN_TYPE,
        )
    event = decoder(msg_id, body)
    if fds:
        raise LeaseProtocolError(
            f"{event.TYPE.name} carries {len(fds)} file descriptors, it may carry none",
            fatal=False,
            code=constants.ErrorCode.BAD_FD_COUNT,
        )
    return event


def decode_message(data: bytes, fds: Sequence[int] = ()) -> ev.Event:
    """Decode one whole message (header and body), for tools and tests that hold exactly one."""
    if len(data) < HEADER_SIZE:
        raise LeaseProtocolError(f"{len(data)} bytes cannot hold a {HEADER_SIZE}-byte header")
    msg_type, _flags, length, msg_id = HEADER.unpack_from(data)
    if length != len(data):
        raise LeaseProtocolError(f"header says {length} bytes, the message has {len(data)}")
    return decode(msg_type, msg_id, data[HEADER_SIZE:], fds)
