"""A buggy or hostile lender against the real LenderLink and LeaseEngine.

Every bad grant is NACKed with the reason docs/lease-protocol.md 9.2 gives, changes nothing,
leaves no fd behind and keeps the session; every bad fd count is refused with ERROR; broken
framing, a silent handshake or a wrong HELLO end only that connection, and the link connects
again; a lender that revokes every lease the moment it grants it cannot starve the guest.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

import devmodel_wire.lease as lp
from devmodel.leases.states import WindowState
from devmodel.testing import (
    F_ADD_SEALS,
    F_SEAL_WRITE,
    RW,
    LenderLinkRig,
    ScriptedLender,
    fds_naming,
    lender_link_rig,
    lender_session,
    open_fds,
    sealed_memfd,
)
from devmodel.testing import (
    LINK_APERTURE as APERTURE,
)
from devmodel.testing import (
    LINK_GRANULE as GRANULE,
)
from devmodel.testing import (
    LINK_STEP as STEP,
)
from devmodel.unixfds import rights
from devmodel_wire.lease.wire import HEADER, encode

ONES = b"\xff" * 8
NAME = f"hostile-{os.getpid()}"


async def grant_ok(peer: ScriptedLender, lease: int, offset: int, fd: int) -> None:
    await peer.send(lp.Grant(lease, offset, GRANULE, offset, RW, fd))
    assert await peer.event() == lp.GrantAck(lease)


async def still_alive(r: LenderLinkRig, peer: ScriptedLender, token: int = 77) -> None:
    await peer.send(lp.Ping(token))
    assert await peer.event() == lp.Pong(token)
    assert r.link.connected and r.counters.lender_losses == 0


def snapshot(r: LenderLinkRig) -> list[tuple[int, int, WindowState, int]]:
    return [(w.start, w.length, w.state, w.lease_id) for w in r.engine.windows()]


# -------------------------------------------------------------------------- bad grants


@dataclass
class BadGrant:
    """A GRANT (lease id 2; lease 1 is live at [0, 2 granules)) and the fd it carries."""

    make_fd: Callable[[Path], int]
    offset: int = 4 * GRANULE
    length: int = GRANULE
    fd_offset: int = 0
    prot: int = RW
    flags: int = 0
    lease_id: int = 2


def memfd(_: Path) -> int:
    return sealed_memfd(8 * GRANULE, NAME)


def unsealed_memfd(_: Path) -> int:
    return sealed_memfd(8 * GRANULE, NAME, seal=False)


def write_sealed_memfd(_: Path) -> int:
    fd = sealed_memfd(8 * GRANULE, NAME)
    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)
    return fd


def read_only_memfd(_: Path) -> int:
    fd = sealed_memfd(8 * GRANULE, NAME)
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def small_memfd(_: Path) -> int:
    return sealed_memfd(GRANULE // 2, NAME)


def tmpfs_file(tmp_path: Path) -> int:
    # A regular tmpfs file can never be sealed (it carries F_SEAL_SEAL from birth).
    path = f"/dev/shm/{NAME}-{tmp_path.name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.unlink(path)
    os.ftruncate(fd, 8 * GRANULE)
    return fd


def disk_file(tmp_path: Path) -> int:
    fd = os.open(tmp_path / NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, 8 * GRANULE)
    return fd


def pipe(_: Path) -> int:
    r, w = os.pipe()
    os.close(w)
    return r


BAD_GRANTS: dict[str, tuple[BadGrant, lp.NackReason]] = {
    "beyond the aperture": (
        BadGrant(memfd, offset=APERTURE - GRANULE, length=2 * GRANULE),
        lp.NackReason.OUTSIDE_APERTURE,
    ),
    "offset overflows u64": (
        BadGrant(memfd, offset=(1 << 64) - GRANULE, length=GRANULE),
        lp.NackReason.OUTSIDE_APERTURE,
    ),
    "offset misaligned": (BadGrant(memfd, offset=4 * GRANULE + 512), lp.NackReason.MISALIGNED),
    "length misaligned": (BadGrant(memfd, length=GRANULE + 8), lp.NackReason.MISALIGNED),
    "length zero": (BadGrant(memfd, length=0), lp.NackReason.MISALIGNED),
    "fd offset misaligned": (BadGrant(memfd, fd_offset=512), lp.NackReason.MISALIGNED),
    "overlaps the live lease": (
        BadGrant(memfd, offset=GRANULE, length=2 * GRANULE),
        lp.NackReason.OVERLAPS_LIVE_LEASE,
    ),
    "fd too small": (BadGrant(small_memfd), lp.NackReason.FD_TOO_SMALL),
    "fd offset beyond the fd": (BadGrant(memfd, fd_offset=8 * GRANULE), lp.NackReason.FD_TOO_SMALL),
    "memfd not sealed": (BadGrant(unsealed_memfd), lp.NackReason.FD_NOT_SEALED),
    "tmpfs file": (BadGrant(tmpfs_file), lp.NackReason.FD_NOT_SEALED),
    "plain disk file": (BadGrant(disk_file), lp.NackReason.FD_NOT_SEALED),
    "prot none": (BadGrant(memfd, prot=0), lp.NackReason.BAD_PROTECTION),
    "prot write only": (BadGrant(memfd, prot=2), lp.NackReason.BAD_PROTECTION),
    "prot exec": (BadGrant(memfd, prot=7), lp.NackReason.BAD_PROTECTION),
    "unknown flags": (BadGrant(memfd, flags=1), lp.NackReason.UNSUPPORTED_FLAGS),
    "lease id reused": (BadGrant(memfd, lease_id=1), lp.NackReason.DUPLICATE_LEASE_ID),
    "lease id zero": (BadGrant(memfd, lease_id=0), lp.NackReason.DUPLICATE_LEASE_ID),
    "pipe": (BadGrant(pipe), lp.NackReason.BAD_FD),
    "read-only fd, prot RW": (BadGrant(read_only_memfd), lp.NackReason.BAD_FD),
    "write-sealed, prot RW": (BadGrant(write_sealed_memfd), lp.NackReason.BAD_FD),
}


@pytest.mark.parametrize("case", BAD_GRANTS, ids=list(BAD_GRANTS))
async def test_bad_grant_is_nacked_and_changes_nothing(tmp_path: Path, case: str) -> None:
    bad, reason = BAD_GRANTS[case]
    async with lender_link_rig(tmp_path) as r:
        peer = await r.lender.session()
        good = sealed_memfd(2 * GRANULE, NAME)
        fd = bad.make_fd(tmp_path)
        try:
            await peer.send(lp.Grant(1, 0, 2 * GRANULE, 0, RW, good))
            assert await peer.event() == lp.GrantAck(1)
            await r.engine.write(GRANULE, b"before!!")
            before = snapshot(r)
            fds_before = open_fds()
            grant = lp.Grant(
                bad.lease_id, bad.offset, bad.length, bad.fd_offset, bad.prot, fd, bad.flags
            )
            await peer.send_encoded(grant, [fd])
            nack = await peer.event()
            assert isinstance(nack, lp.GrantNack), nack
            assert (nack.lease_id, nack.reason) == (bad.lease_id, reason), nack.text
            assert snapshot(r) == before
            assert r.engine.lease_count == 1 and r.engine.kept_fds == 1
            assert r.counters.grants == 1 and r.counters.grant_nacks == 1
            # The device model closed its copy of the refused fd.
            assert open_fds() == fds_before
            assert await r.engine.read(GRANULE, 8) == b"before!!"
            await still_alive(r, peer)
            # The session goes on: a correct grant with a new id is accepted.
            await peer.send(lp.Grant(10, 6 * GRANULE, GRANULE, 0, RW, good))
            assert await peer.event() == lp.GrantAck(10)
        finally:
            os.close(fd)
            os.close(good)


async def test_read_only_grant_of_a_read_only_fd_is_fine_and_writes_are_dropped(
    tmp_path: Path,
) -> None:
    async with lender_link_rig(tmp_path) as r:
        peer = await r.lender.session()
        fd = read_only_memfd(tmp_path)
        try:
            await peer.send(lp.Grant(1, 0, GRANULE, 0, 1, fd))
            assert await peer.event() == lp.GrantAck(1)
            await r.engine.write(0, b"ignored!")
            assert await r.engine.read(0, 8) == bytes(8)
            assert r.counters.failed_accesses == 1
        finally:
            os.close(fd)


# -------------------------------------------------------------------------- fd counts


async def send_with_fds(peer: ScriptedLender, data: bytes, fds: list[int]) -> None:
    with trio.fail_after(STEP):
        sent = await peer.sock.sendmsg([data], rights(fds))
    assert sent == len(data)


async def test_wrong_fd_counts_are_refused_and_the_fds_closed(tmp_path: Path) -> None:
    async with lender_link_rig(tmp_path) as r:
        peer = await r.lender.session()
        fd = sealed_memfd(2 * GRANULE, NAME)
        other = sealed_memfd(2 * GRANULE, NAME)
        try:
            mine = len(fds_naming(NAME))
            # A GRANT without its fd, one with two, a PING with one.
            await peer.send_encoded(lp.Grant(1, 0, GRANULE, 0, RW, fd))
            await send_with_fds(peer, encode(lp.Grant(1, 0, GRANULE, 0, RW, fd)), [fd, other])
            await send_with_fds(peer, encode(lp.Ping(5)), [fd])
            for ref_type, ref_id in (
                (lp.MsgType.GRANT, 1),
                (lp.MsgType.GRANT, 1),
                (lp.MsgType.PING, 5),
            ):
                err = await peer.event()
                assert isinstance(err, lp.Error), err
                assert (err.code, err.ref_type, err.ref_id) == (
                    lp.ErrorCode.BAD_FD_COUNT,
                    ref_type,
                    ref_id,
                )
            assert len(fds_naming(NAME)) == mine
            assert r.engine.lease_count == 0 and r.engine.kept_fds == 0
            # The refused GRANT did not use up its lease id.
            await grant_ok(peer, 1, 0, fd)
            await still_alive(r, peer)
        finally:
            os.close(fd)
            os.close(other)


async def test_more_fds_than_room_fails_the_connection_and_closes_them(tmp_path: Path) -> None:
    async with lender_session(tmp_path, 2 * GRANULE, NAME) as (r, peer, fd):
        await grant_ok(peer, 1, 0, fd)
        mine = len(fds_naming(NAME)) - 1  # the engine keeps one
        await send_with_fds(peer, encode(lp.Grant(2, GRANULE, GRANULE, 0, RW, fd)), [fd] * 40)
        bye = await peer.event()
        assert isinstance(bye, lp.Bye) and bye.reason == lp.ByeReason.PROTOCOL_ERROR
        assert await peer.event() is None
        await r.lender.session()
        await r.connected()
        assert r.counters.lender_losses == 1
        assert len(fds_naming(NAME)) == mine  # nothing received was kept
        assert await r.engine.read(0, 8) == ONES  # the old session's lease is gone


# -------------------------------------------------------------------------- broken sessions


async def test_garbage_bytes_end_the_connection_and_the_link_reconnects(tmp_path: Path) -> None:
    async with lender_session(tmp_path, GRANULE, NAME) as (r, peer, fd):
        await grant_ok(peer, 1, 0, fd)
        await r.engine.write(0, b"survives")
        await peer.send_raw(b"\xde\xad\xbe\xef" * 8)  # a header with length 0xefbeadde
        bye = await peer.event()
        assert isinstance(bye, lp.Bye) and bye.reason == lp.ByeReason.PROTOCOL_ERROR
        assert await peer.event() is None
        assert await r.engine.read(0, 8) == ONES
        again = await r.lender.session()
        await grant_ok(again, 1, 0, fd)
        assert await r.engine.read(0, 8) == b"survives"
        assert r.counters.lender_losses == 1 and r.link.sessions == 2


async def test_well_framed_unknown_and_misdirected_messages_are_answered(tmp_path: Path) -> None:
    async with lender_link_rig(tmp_path) as r:
        peer = await r.lender.session()
        await peer.send_raw(HEADER.pack(0x7777, 0, 24, 9) + b"12345678")
        await peer.send_raw(HEADER.pack(lp.MsgType.GRANT_ACK, 0, 16, 3))
        await peer.send_encoded(lp.PageInDone(99, lp.PageInStatus.OK))
        expected = [
            (lp.ErrorCode.UNKNOWN_TYPE, 0x7777, 9),
            (lp.ErrorCode.UNEXPECTED, lp.MsgType.GRANT_ACK, 3),
            (lp.ErrorCode.UNKNOWN_ID, lp.MsgType.PAGE_IN_DONE, 99),
        ]
        for code, ref_type, ref_id in expected:
            err = await peer.event()
            assert isinstance(err, lp.Error), err
            assert (err.code, err.ref_type, err.ref_id) == (code, ref_type, ref_id)
        await still_alive(r, peer)


async def test_lender_that_never_answers_hello_is_left_and_retried(tmp_path: Path) -> None:
    async with lender_link_rig(tmp_path, hello_timeout=0.2) as r:
        silent = await r.lender.accept()
        assert isinstance(await silent.event(), lp.Hello)
        bye = await silent.event(timeout=1.0)
        assert isinstance(bye, lp.Bye) and bye.reason == lp.ByeReason.TIMEOUT
        assert await silent.event() is None
        await r.lender.session()
        await r.connected()
        # Nothing was ever lent by the silent one: no loss to count.
        assert r.counters.lender_losses == 0 and r.link.attempts >= 2


@pytest.mark.parametrize("change", ["guest_id", "aperture_size", "granule", "features"])
async def test_lender_hello_that_does_not_echo_the_offer_is_fatal(
    tmp_path: Path, change: str
) -> None:
    async with lender_link_rig(tmp_path) as r:
        peer = await r.lender.accept()
        offer = await peer.event()
        assert isinstance(offer, lp.Hello)
        values = {
            "guest_id": offer.guest_id + 1,
            "aperture_size": offer.aperture_size * 2,
            "granule": 2 << 20,
            "features": 1 << 40,
        }
        fields = {
            "guest_id": offer.guest_id,
            "aperture_size": offer.aperture_size,
            "granule": offer.granule,
            "features": 0,
        }
        fields[change] = values[change]
        await peer.send_encoded(lp.Hello(**fields, name="liar"))
        bye = await peer.event()
        assert isinstance(bye, lp.Bye) and bye.reason == lp.ByeReason.PROTOCOL_ERROR
        assert await peer.event() is None
        await r.lender.session()
        await r.connected()


async def test_second_hello_after_the_handshake_is_fatal(tmp_path: Path) -> None:
    async with lender_link_rig(tmp_path) as r:
        peer = await r.lender.session()
        assert peer.hello is not None
        await peer.send_encoded(peer.hello)
        bye = await peer.event()
        assert isinstance(bye, lp.Bye) and bye.reason == lp.ByeReason.PROTOCOL_ERROR
        await r.lender.session()
        await r.connected()
        assert r.counters.lender_losses == 1


async def test_lender_refusing_the_guest_is_retried(tmp_path: Path) -> None:
    async with lender_link_rig(tmp_path) as r:
        peer = await r.lender.accept()
        assert isinstance(await peer.event(), lp.Hello)
        await peer.send(lp.Bye(lp.ByeReason.GUEST_REFUSED, "not you"))
        assert await peer.event() is None
        await r.lender.session()
        await r.connected()


# -------------------------------------------------------------------------- revokes


async def test_a_revoke_in_progress_does_not_block_the_session(tmp_path: Path) -> None:
    async with lender_session(tmp_path, GRANULE, NAME) as (r, peer, fd):
        unmapped = trio.Event()
        release = trio.Event()

        async def slow_unmap(offset: int, length: int) -> None:
            unmapped.set()
            await release.wait()

        r.engine.unmap_hooks.append(slow_unmap)
        await grant_ok(peer, 1, 0, fd)
        await peer.send(lp.Revoke(1, lp.RevokeMode.EVICT))
        with trio.fail_after(STEP):
            await unmapped.wait()
        # The reader goes on meanwhile: PING answered, a repeated REVOKE refused.
        await still_alive(r, peer)
        await peer.send_encoded(lp.Revoke(1, lp.RevokeMode.EVICT))
        err = await peer.event()
        assert isinstance(err, lp.Error) and err.code == lp.ErrorCode.DUPLICATE_ID
        assert r.engine.kept_fds == 1  # not yet: REVOKED is never early
        release.set()
        assert await peer.event() == lp.Revoked(1)
        assert r.engine.kept_fds == 0


async def test_lender_revoking_every_grant_at_once_cannot_starve_the_guest(
    tmp_path: Path,
) -> None:
    """Each page-in is answered GRANT, PAGE_IN_DONE, REVOKE in one burst: still no livelock."""
    async with lender_session(tmp_path, 4 * GRANULE, NAME) as (r, peer, fd):
        next_lease = 1

        async def nasty_lender() -> None:
            nonlocal next_lease
            while True:
                event = await peer.event(timeout=10)
                if isinstance(event, lp.PageIn):
                    lease = next_lease
                    next_lease += 1
                    off = event.offset
                    await peer.send(lp.Grant(lease, off, event.length, off, RW, fd))
                    await peer.send(lp.PageInDone(event.request_id, lp.PageInStatus.OK))
                    await peer.send(lp.Revoke(lease, lp.RevokeMode.EVICT))
                elif event is None:
                    return

        for lease in range(4):
            await peer.send(lp.Grant(next_lease, lease * GRANULE, GRANULE, lease * GRANULE, RW, fd))
            await peer.send(lp.Revoke(next_lease, lp.RevokeMode.EVICT))
            next_lease += 1
        for _ in range(8):
            assert isinstance(await peer.event(), lp.GrantAck | lp.Revoked)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(nasty_lender)
            model: dict[int, bytes] = {}
            for i in range(200):
                offset = (i * 7 % 4) * GRANULE + (i % 16) * 8
                if i % 3:
                    data = i.to_bytes(8, "little")
                    await r.engine.write(offset, data)
                    model[offset] = data
                else:
                    assert await r.engine.read(offset, 8) == model.get(offset, bytes(8))
            nursery.cancel_scope.cancel()
        assert r.counters.failed_accesses == 0
        # Nearly every access pages in (the REVOKE usually lands before the next access).
        assert r.counters.page_ins >= 100
        assert r.link.connected


async def test_truncated_plain_file_gives_the_failure_policy_not_a_crash(tmp_path: Path) -> None:
    """The link NACKs files that cannot be sealed; the engine still survives one shrinking.

    The engine is the second line: it never maps lender memory, so a file shrunk under a lease
    makes accesses short (failure policy), where a mapping would have raised SIGBUS.
    """
    async with lender_link_rig(tmp_path) as r:
        await r.lender.session()
        await r.connected()
        fd = disk_file(tmp_path)
        try:
            os.pwrite(fd, b"on disk!", 0)
            r.engine.grant(1, 0, 2 * GRANULE, 0, RW, os.dup(fd))
            assert await r.engine.read(0, 8) == b"on disk!"
            os.ftruncate(fd, 0)
            assert await r.engine.read(0, 8) == ONES
            assert r.counters.failed_accesses == 1
            assert r.link.connected
        finally:
            os.close(fd)
