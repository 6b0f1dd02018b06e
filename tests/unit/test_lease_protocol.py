"""Lease protocol wire format: round trips, exact layouts, refusal of malformed bodies, checks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

import devmodel_wire.lease as lp
from devmodel.leases.grant_checks import check_grant_fd
from devmodel.testing import fd_is_open
from devmodel_wire.lease.checks import check_grant, geometry_problem, range_problem
from devmodel_wire.lease.constants import MAX_NAME_BYTES, MAX_TEXT_BYTES, code_name
from devmodel_wire.lease.wire import decode, decode_message, encode, fd_count
from pyvfio_user.errors import ProtocolError
from tests.unit.lease_protocol_support import (
    APERTURE,
    GRANULE,
    RW,
    FdPool,
    MiB,
    deliver,
    fd_pool,
    open_pair,
    raw_message,
    sample_events,
)


@pytest.fixture
def pool() -> Iterator[FdPool]:
    with fd_pool() as p:
        yield p


# -- round trips ------------------------------------------------------------------------------


def test_every_message_type_has_a_sample() -> None:
    assert {e.TYPE for e in sample_events(0)} == set(lp.MsgType)


@pytest.mark.parametrize("index", range(len(sample_events(0))))
def test_wire_round_trip(index: int, pool: FdPool) -> None:
    fd = pool.new()
    event = sample_events(fd)[index]
    data = encode(event)
    fds = (fd,) if isinstance(event, lp.Grant) else ()
    assert decode_message(data, fds) == event
    assert fd_count(event.TYPE) == len(fds)


def test_connection_round_trip_both_directions(pool: FdPool) -> None:
    """Every message through a real pair of connections, in the direction the spec allows."""
    b2l, l2b = "borrower->lender", "lender->borrower"
    script: list[tuple[str, lp.Event]] = [
        (l2b, lp.Grant(1, 0, GRANULE, 0, RW, pool.new())),
        (l2b, lp.Grant(2, GRANULE, GRANULE, GRANULE, 1, pool.new())),
        (l2b, lp.Grant(9, 4 * GRANULE, 2 * GRANULE, 0, RW, pool.new())),
        (b2l, lp.GrantAck(1)),
        (b2l, lp.GrantNack(2, lp.NackReason.OVERLAPS_LIVE_LEASE, "lease 1 covers 0x200000")),
        (b2l, lp.GrantAck(9)),
        (l2b, lp.Revoke(1, lp.RevokeMode.EVICT)),
        (l2b, lp.Revoke(9, lp.RevokeMode.RELEASE)),
        (b2l, lp.Revoked(9)),
        (b2l, lp.Revoked(1)),
        (b2l, lp.PageIn(10, 8 * MiB, 2 * MiB, lp.Access.READ)),
        (b2l, lp.PageIn(11, 0, 4 * MiB, lp.Access.WRITE)),
        (l2b, lp.PageInDone(11, lp.PageInStatus.NOT_LENT, "released")),
        (l2b, lp.PageInDone(10, lp.PageInStatus.OK)),
        (b2l, lp.Ping(5)),
        (l2b, lp.Ping(5)),
        (l2b, lp.Pong(5)),
        (b2l, lp.Pong(5)),
        (b2l, lp.Error(lp.MsgType.GRANT, 3, lp.ErrorCode.BAD_FD_COUNT, "2 fds")),
        (l2b, lp.Error(0x7777, 12, lp.ErrorCode.UNKNOWN_TYPE, "")),
    ]
    borrower, lender = open_pair()
    assert borrower.peer_hello == lender.local_hello
    assert lender.peer_hello == borrower.local_hello
    assert borrower.version == lender.version == (1, 0)
    for direction, event in script:
        if direction == b2l:
            assert deliver(borrower, lender, event) == event
        else:
            # No kernel in between: a Grant's fd number is passed through unchanged.
            assert deliver(lender, borrower, event) == event
    assert borrower.awaiting_answers() == lender.awaiting_answers() == frozenset()
    assert borrower.owed_answers() == lender.owed_answers() == frozenset()
    bye = lp.Bye(lp.ByeReason.NORMAL, "guest shut down")
    assert deliver(borrower, lender, bye) == bye
    borrower, lender = open_pair()
    bye = lp.Bye(lp.ByeReason.TIMEOUT, "REVOKE 1 took 10 s")
    assert deliver(lender, borrower, bye) == bye


# -- exact layouts (the specification's examples are these bytes) -----------------------------


def test_hello_layout() -> None:
    hello = lp.Hello(7, 256 * MiB, 2 * MiB, features=0, max_leases=64, name="dm")
    expected = (
        bytes.fromhex("0100 0000 3800 0000 0000 0000 0000 0000")  # HELLO, flags, 56, id 0
        + b"LEND"
        + bytes.fromhex("0100 0000")  # version 1.0
        + bytes.fromhex("0700 0000 0000 2000")  # guest 7, granule 2 MiB
        + bytes.fromhex("0000 0010 0000 0000")  # aperture 256 MiB
        + bytes.fromhex("0000 0000 0000 0000")  # features
        + bytes.fromhex("4000 0000 0200")  # max_leases 64, name_len 2
        + b"dm"
    )
    assert encode(hello) == expected


def test_grant_layout() -> None:
    grant = lp.Grant(0x1122, 0x40_0000, 0x20_0000, 0x60_0000, RW, 9, 0)
    assert encode(grant) == struct.pack(
        "<HHIQQQQII", 0x10, 0, 48, 0x1122, 0x400000, 0x200000, 0x600000, 3, 0
    )


@pytest.mark.parametrize(
    ("event", "size"),
    [
        (lp.Bye(), 22),
        (lp.Error(1, 2, 3), 24),
        (lp.Ping(1), 16),
        (lp.Pong(1), 16),
        (lp.GrantAck(1), 16),
        (lp.GrantNack(1, 1), 22),
        (lp.Revoke(1, lp.RevokeMode.EVICT), 20),
        (lp.Revoked(1), 16),
        (lp.PageIn(1, 0, GRANULE, lp.Access.READ), 36),
        (lp.PageInDone(1, 0), 22),
    ],
)
def test_message_sizes(event: lp.Event, size: int) -> None:
    assert len(encode(event)) == size


def test_header_flags_are_ignored_on_receipt() -> None:
    data = bytearray(encode(lp.Ping(77)))
    data[2:4] = b"\xff\xff"
    assert decode_message(bytes(data)) == lp.Ping(77)


def test_hello_may_carry_bytes_after_the_name() -> None:
    data = encode(lp.Hello(1, APERTURE, GRANULE, name="x")) + b"future"
    header = struct.pack("<HHIQ", lp.MsgType.HELLO, 0, len(data), 0)
    assert decode_message(header + data[16:]) == lp.Hello(1, APERTURE, GRANULE, name="x")


def test_open_code_families_keep_unknown_values() -> None:
    nack = decode_message(raw_message(lp.MsgType.GRANT_NACK, 4, struct.pack("<IH", 4242, 0)))
    assert nack == lp.GrantNack(4, 4242)
    done = decode_message(raw_message(lp.MsgType.PAGE_IN_DONE, 4, struct.pack("<IH", 77, 0)))
    assert done == lp.PageInDone(4, 77)
    bye = decode_message(raw_message(lp.MsgType.BYE, 0, struct.pack("<IH", 900, 0)))
    assert bye == lp.Bye(900)
    assert code_name(lp.NackReason, 4242) == "NackReason(4242)"
    assert code_name(lp.NackReason, 3) == "OVERLAPS_LIVE_LEASE"


# -- refusal of malformed input ---------------------------------------------------------------


def _refused(data: bytes, fds: tuple[int, ...] = ()) -> lp.LeaseProtocolError:
    with pytest.raises(lp.LeaseProtocolError) as info:
        decode_message(data, fds)
    assert isinstance(info.value, ProtocolError)
    return info.value


@pytest.mark.parametrize(
    ("msg_type", "body"),
    [
        (lp.MsgType.PING, b"\x00"),
        (lp.MsgType.PONG, b"\x00" * 8),
        (lp.MsgType.GRANT_ACK, b"\x00"),
        (lp.MsgType.REVOKED, b"\x00"),
        (lp.MsgType.REVOKE, b""),
        (lp.MsgType.REVOKE, b"\x01\x00\x00\x00\x00"),
        (lp.MsgType.PAGE_IN, b"\x00" * 19),
        (lp.MsgType.PAGE_IN, b"\x00" * 21),
        (lp.MsgType.PAGE_IN_DONE, b"\x00" * 5),
        (lp.MsgType.GRANT_NACK, b""),
        (lp.MsgType.BYE, b"\x00"),
        (lp.MsgType.ERROR, b"\x00" * 7),
        (lp.MsgType.HELLO, b"LEND" + b"\x00" * 20),
        (lp.MsgType.GRANT, b"\x00" * 31),
        (lp.MsgType.GRANT, b"\x00" * 33),
    ],
)
def test_wrong_body_size_is_malformed(msg_type: int, body: bytes) -> None:
    err = _refused(raw_message(msg_type, 1, body), (5,) if msg_type == lp.MsgType.GRANT else ())
    assert (err.fatal, err.code) == (False, lp.ErrorCode.MALFORMED)


@pytest.mark.parametrize(
    ("text", "declared"),
    [
        (b"\xff\xfe", 2),  # not UTF-8
        (b"a\x00b", 3),  # NUL
        (b"abc", 2),  # a byte after the string
        (b"ab", 3),  # string runs past the body
        (b"x" * (MAX_TEXT_BYTES + 1), MAX_TEXT_BYTES + 1),  # over the limit
    ],
)
def test_bad_strings_are_malformed(text: bytes, declared: int) -> None:
    for msg_type in (lp.MsgType.BYE, lp.MsgType.GRANT_NACK, lp.MsgType.PAGE_IN_DONE):
        err = _refused(raw_message(msg_type, 1, struct.pack("<IH", 1, declared) + text))
        assert err.code == lp.ErrorCode.MALFORMED
    err = _refused(raw_message(lp.MsgType.ERROR, 1, struct.pack("<IHH", 1, 1, declared) + text))
    assert err.code == lp.ErrorCode.MALFORMED


def test_hello_name_limit_and_magic() -> None:
    good = encode(lp.Hello(1, APERTURE, GRANULE, name="n" * MAX_NAME_BYTES))
    assert isinstance(decode_message(good), lp.Hello)
    body = bytearray(good[16:])
    struct.pack_into("<H", body, 36, MAX_NAME_BYTES + 1)
    body += b"n"
    assert _refused(raw_message(lp.MsgType.HELLO, 0, bytes(body))).code == lp.ErrorCode.MALFORMED
    bad_magic = bytearray(good)
    bad_magic[16:20] = b"VFIO"
    assert _refused(bytes(bad_magic)).code == lp.ErrorCode.MALFORMED


def test_closed_enumerations_refuse_unknown_values() -> None:
    assert _refused(raw_message(lp.MsgType.REVOKE, 1, struct.pack("<I", 3))).code == (
        lp.ErrorCode.MALFORMED
    )
    assert _refused(raw_message(lp.MsgType.REVOKE, 1, struct.pack("<I", 0))).code == (
        lp.ErrorCode.MALFORMED
    )
    body = struct.pack("<QQI", 0, GRANULE, 3)
    assert _refused(raw_message(lp.MsgType.PAGE_IN, 1, body)).code == lp.ErrorCode.MALFORMED


def test_fd_counts() -> None:
    grant = encode(lp.Grant(1, 0, GRANULE, 0, RW, 5))
    assert _refused(grant, ()).code == lp.ErrorCode.BAD_FD_COUNT
    assert _refused(grant, (5, 6)).code == lp.ErrorCode.BAD_FD_COUNT
    for event in (lp.Ping(1), lp.Bye(), lp.GrantAck(1), lp.Revoke(1, lp.RevokeMode.EVICT)):
        assert _refused(encode(event), (5,)).code == lp.ErrorCode.BAD_FD_COUNT


def test_unknown_type() -> None:
    err = _refused(raw_message(0x7777, 1, b"whatever"))
    assert (err.fatal, err.code) == (False, lp.ErrorCode.UNKNOWN_TYPE)
    assert _refused(raw_message(0, 1)).code == lp.ErrorCode.UNKNOWN_TYPE


def test_decode_never_closes_fds(pool: FdPool) -> None:
    fd = pool.new()
    with pytest.raises(lp.LeaseProtocolError):
        decode(lp.MsgType.PING, 1, b"", (fd,))
    assert fd_is_open(fd)


def test_decode_message_framing() -> None:
    assert _refused(b"\x01\x00").fatal
    assert _refused(encode(lp.Ping(1)) + b"\x00").fatal


@pytest.mark.parametrize(
    "event",
    [
        lp.Ping(1 << 64),
        lp.Ping(-1),
        lp.Grant(1, 0, GRANULE, 0, RW, -1),
        lp.Grant(1, 1 << 64, GRANULE, 0, RW, 3),
        lp.Grant(1, 0, GRANULE, 0, 1 << 32, 3),
        lp.GrantNack(1, 1, "x" * (MAX_TEXT_BYTES + 1)),
        lp.Bye(0, "nul\x00"),
        lp.Bye(0, "\ud800"),
        lp.Error(1 << 16, 1, 1),
        lp.Hello(1, APERTURE, GRANULE, name="n" * (MAX_NAME_BYTES + 1)),
        lp.Hello(1 << 32, APERTURE, GRANULE),
        lp.PageIn(1, 0, GRANULE, 3),  # type: ignore[arg-type]
        lp.Revoke(1, 0),  # type: ignore[arg-type]
    ],
)
def test_encode_refuses_what_does_not_fit(event: lp.Event) -> None:
    with pytest.raises(lp.LeaseProtocolError) as info:
        encode(event)
    assert not info.value.fatal


# -- shared checks ----------------------------------------------------------------------------


def test_geometry_and_range_checks() -> None:
    assert geometry_problem(APERTURE, GRANULE) is None
    assert geometry_problem(APERTURE, 8192) is not None
    assert geometry_problem(APERTURE + GRANULE, GRANULE) is not None
    assert geometry_problem(MiB // 2, 4096) is not None
    assert geometry_problem(MiB, 2 * MiB) is not None
    assert geometry_problem(1 << 30, 1 << 30) is None
    geometry = {"aperture_size": APERTURE, "granule": GRANULE}
    assert range_problem(0, GRANULE, **geometry) is None
    assert range_problem(APERTURE - GRANULE, GRANULE, **geometry) is None
    assert range_problem(0, 0, **geometry) is not None
    assert range_problem(4096, GRANULE, **geometry) is not None
    assert range_problem(0, 4096, **geometry) is not None
    assert range_problem(APERTURE, GRANULE, **geometry) is not None


@pytest.mark.parametrize(
    ("grant", "reason"),
    [
        (lp.Grant(1, 0, GRANULE, 0, RW, 3), None),
        (lp.Grant(1, 0, GRANULE, 0, 1, 3), None),
        (lp.Grant(1, 0, GRANULE, 0, 2, 3), lp.NackReason.BAD_PROTECTION),
        (lp.Grant(1, 0, GRANULE, 0, 0, 3), lp.NackReason.BAD_PROTECTION),
        (lp.Grant(1, 0, GRANULE, 0, 7, 3), lp.NackReason.BAD_PROTECTION),
        (lp.Grant(1, 0, GRANULE, 0, RW, 3, 1), lp.NackReason.UNSUPPORTED_FLAGS),
        (lp.Grant(1, 4096, GRANULE, 0, RW, 3), lp.NackReason.MISALIGNED),
        (lp.Grant(1, 0, 4096, 0, RW, 3), lp.NackReason.MISALIGNED),
        (lp.Grant(1, 0, GRANULE, 4096, RW, 3), lp.NackReason.MISALIGNED),
        (lp.Grant(1, 0, 0, 0, RW, 3), lp.NackReason.MISALIGNED),
        (lp.Grant(1, APERTURE - GRANULE, 2 * GRANULE, 0, RW, 3), lp.NackReason.OUTSIDE_APERTURE),
        (lp.Grant(1, (1 << 64) - GRANULE, GRANULE, 0, RW, 3), lp.NackReason.OUTSIDE_APERTURE),
    ],
)
def test_check_grant(grant: lp.Grant, reason: lp.NackReason | None) -> None:
    assert check_grant(grant, aperture_size=APERTURE, granule=GRANULE) == reason


def test_borrower_connection_check_grant_uses_the_session_geometry() -> None:
    borrower, _ = open_pair()
    assert borrower.check_grant(lp.Grant(1, APERTURE, GRANULE, 0, RW, 3)) == (
        lp.NackReason.OUTSIDE_APERTURE
    )
    with pytest.raises(lp.LeaseProtocolError):
        lp.BorrowerConnection().check_grant(lp.Grant(1, 0, GRANULE, 0, RW, 3))
    assert isinstance(lp.LenderConnection(), lp.LenderConnection)


def _memfd(size: int, seals: int) -> int:
    fd = os.memfd_create("lease-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_check_grant_fd() -> None:
    shrink = fcntl.F_SEAL_SHRINK
    opened: list[int] = []
    try:
        good = _memfd(2 * GRANULE, shrink)
        unsealed = _memfd(2 * GRANULE, 0)
        write_sealed = _memfd(GRANULE, shrink | fcntl.F_SEAL_WRITE)
        r, w = os.pipe()
        read_only = os.open(f"/proc/self/fd/{good}", os.O_RDONLY)
        opened += [good, unsealed, write_sealed, r, w, read_only]

        def check(fd: int, fd_offset: int = 0, length: int = GRANULE, prot: int = RW) -> object:
            return check_grant_fd(fd, fd_offset=fd_offset, length=length, prot=prot)

        assert check(good) is None
        assert check(good, GRANULE, GRANULE) is None
        assert check(good, GRANULE, 2 * GRANULE) == lp.NackReason.FD_TOO_SMALL
        assert check(unsealed) == lp.NackReason.FD_NOT_SEALED
        assert check(write_sealed) == lp.NackReason.BAD_FD
        assert check(write_sealed, prot=1) is None
        assert check(r) == lp.NackReason.BAD_FD
        assert check(read_only) == lp.NackReason.BAD_FD
        assert check(read_only, prot=1) is None
        os.close(unsealed)
        assert check(unsealed) == lp.NackReason.BAD_FD
    finally:
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)


# -- the specification's worked example ---------------------------------------------------------

SPEC = Path(__file__).resolve().parents[2] / "docs" / "lease-protocol.md"


def _example_bytes() -> bytes:
    """Every hex byte in the code blocks of the specification's section 12, in order."""
    text = SPEC.read_text(encoding="utf-8")
    section = text.split("## 12. Example", 1)[1].split("## 13.", 1)[0]
    out = bytearray()
    for block in section.split("```")[1::2]:
        for line in block.splitlines():
            hex_part = line.split("   ", 1)[0]  # a comment follows three spaces
            out += bytes.fromhex(hex_part)
    return bytes(out)


def test_the_specifications_example_decodes_as_described() -> None:
    data = _example_bytes()
    events: list[lp.Event] = []
    while data:
        length = struct.unpack_from("<I", data, 4)[0]
        fds = (7,) if data[0] == lp.MsgType.GRANT else ()
        events.append(decode_message(data[:length], fds))
        data = data[length:]
    assert events == [
        lp.Hello(7, 256 * MiB, 2 * MiB, 0, 1024, "devmodel"),
        lp.Hello(7, 256 * MiB, 2 * MiB, 0, 0, "gpu"),
        lp.PageIn(1, 0x800000, 2 * MiB, lp.Access.WRITE),
        lp.Grant(1, 0x800000, 2 * MiB, 0, RW, 7),
        lp.PageInDone(1, lp.PageInStatus.OK),
        lp.GrantAck(1),
        lp.Revoke(1, lp.RevokeMode.EVICT),
        lp.Revoked(1),
        lp.GrantNack(2, lp.NackReason.FD_NOT_SEALED, "no seal"),
        lp.Error(0x7777, 9, lp.ErrorCode.UNKNOWN_TYPE),
    ]
