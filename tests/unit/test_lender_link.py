"""LenderLink against a fake lender on a real unix socket: the normal life of a session.

Handshake, grants serving guest accesses, revokes that close the fd and keep nothing mapped,
page-ins (several at once, answered out of order, from moved memory), keepalive, BYE both
ways, and reconnecting after the lender goes away.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

import devmodel_wire.lease as lp
from devmodel.leases.states import WindowState
from devmodel.testing import (
    LINK_APERTURE as APERTURE,
)
from devmodel.testing import (
    LINK_GRANULE as GRANULE,
)
from devmodel.testing import (
    LINK_GUEST as GUEST,
)
from devmodel.testing import (
    LINK_STEP as STEP,
)
from devmodel.testing import (
    RW,
    LenderLinkRig,
    fds_naming,
    lender_link_rig,
    lender_session,
    mapped,
    sealed_memfd,
)
from devmodel_wire.lease.constants import FEATURE_DMABUF_GRANTS

ONES = b"\xff" * 8


async def test_handshake_offers_the_engine_geometry(tmp_path: Path) -> None:
    async with lender_link_rig(tmp_path) as r:
        peer = await r.lender.accept()
        hello = await peer.handshake("gpu-7")
        assert (hello.guest_id, hello.aperture_size, hello.granule) == (GUEST, APERTURE, GRANULE)
        assert (hello.major, hello.minor, hello.features) == (1, 0, FEATURE_DMABUF_GRANTS)
        assert hello.name == "devmodel"
        assert hello.max_leases > 0
        await r.connected()
        assert r.link.sessions == 1


async def test_grant_serves_reads_and_writes_from_the_memfd(tmp_path: Path) -> None:
    async with lender_session(tmp_path, 4 * GRANULE) as (r, peer, fd):
        os.pwrite(fd, b"lender!!", GRANULE)
        await peer.grant(1, 8 * GRANULE, 2 * GRANULE, fd, GRANULE)
        assert await r.engine.read(8 * GRANULE, 8) == b"lender!!"
        await r.engine.write(9 * GRANULE + 16, b"guest123")
        assert os.pread(fd, 8, 2 * GRANULE + 16) == b"guest123"
        assert r.counters.grants == 1 and r.counters.failed_accesses == 0
        # Outside the lease nothing is lent: the failure policy, no page-in.
        assert await r.engine.read(0, 8) == ONES


async def test_revoked_means_fd_closed_nothing_mapped_and_poison_never_read(
    tmp_path: Path,
) -> None:
    name = f"lender-poison-{os.getpid()}"
    async with lender_link_rig(tmp_path) as r:
        peer = await r.lender.session()
        fd = sealed_memfd(GRANULE, name)
        moved = sealed_memfd(2 * GRANULE, name + "-moved")
        try:
            os.pwrite(fd, b"precious", 0)
            await peer.grant(1, 0, GRANULE, fd, 0)
            assert len(fds_naming(name)) == 3  # ours twice (fd, moved) and the engine's copy
            assert r.engine.kept_fds == 1
            await peer.revoke(1)
            # After REVOKED: the engine holds no fd of the lease and nothing is mapped.
            assert r.engine.kept_fds == 0
            assert sorted(fds_naming(name)) == sorted([fd, moved])
            assert not mapped(name)
            # The lender reuses its memory at once; the guest must never see that.
            os.pwrite(fd, b"POISON!!" * (GRANULE // 8), 0)
            reader = trio.Event()
            result: list[bytes] = []

            async def guest_read() -> None:
                result.append(await r.engine.read(0, 8))
                reader.set()

            r.nursery.start_soon(guest_read)
            ask = await peer.event()
            assert isinstance(ask, lp.PageIn) and (ask.offset, ask.length) == (0, GRANULE)
            assert ask.access is lp.Access.READ
            # Page the contents back in elsewhere: another memfd, another offset.
            os.pwrite(moved, b"precious", GRANULE)
            await peer.send(lp.Grant(2, 0, GRANULE, GRANULE, RW, moved))
            await peer.send(lp.PageInDone(ask.request_id, lp.PageInStatus.OK))
            with trio.fail_after(STEP):
                await reader.wait()
            assert result == [b"precious"]
            assert await peer.event() == lp.GrantAck(2)
            assert await r.engine.read(0, 8) == b"precious"
            assert r.counters.page_ins == 1 and r.counters.revokes == 1
        finally:
            os.close(fd)
            os.close(moved)


async def test_several_page_ins_in_flight_answered_out_of_order(tmp_path: Path) -> None:
    async with lender_session(tmp_path, 4 * GRANULE) as (r, peer, fd):
        for lease in (1, 2, 3):
            os.pwrite(fd, f"window {lease}".encode(), lease * GRANULE)
            await peer.grant(lease, lease * GRANULE, GRANULE, fd, lease * GRANULE)
        for lease in (1, 2, 3):
            await peer.revoke(lease)
        results: dict[int, bytes] = {}

        async def guest_read(lease: int) -> None:
            results[lease] = await r.engine.read(lease * GRANULE, 8)

        async with trio.open_nursery() as guests:
            for lease in (1, 2, 3):
                guests.start_soon(guest_read, lease)
            asks = [await peer.event() for _ in range(3)]
            assert all(isinstance(a, lp.PageIn) for a in asks)
            next_lease = 4
            for ask in reversed(asks):
                assert isinstance(ask, lp.PageIn)
                await peer.send(lp.Grant(next_lease, ask.offset, GRANULE, ask.offset, RW, fd))
                await peer.send(lp.PageInDone(ask.request_id, lp.PageInStatus.OK))
                next_lease += 1
        assert results == {n: f"window {n}".encode()[:8] for n in (1, 2, 3)}
        assert r.counters.page_ins == 3


async def test_page_in_failures_give_the_failure_policy(tmp_path: Path) -> None:
    async with lender_session(tmp_path, GRANULE) as (r, peer, fd):
        await peer.grant(1, 0, GRANULE, fd, 0)
        await peer.revoke(1)
        for answer in ("status", "error"):
            result: list[bytes] = []
            async with trio.open_nursery() as guests:
                guests.start_soon(_read_into, r, 0, result)
                ask = await peer.event()
                assert isinstance(ask, lp.PageIn)
                if answer == "status":
                    await peer.send(lp.PageInDone(ask.request_id, lp.PageInStatus.NO_MEMORY))
                else:
                    await peer.send(
                        lp.Error(lp.MsgType.PAGE_IN, ask.request_id, lp.ErrorCode.OTHER, "no")
                    )
            assert result == [ONES]
        # The range stays evicted: the next access asks again.
        window = r.engine.window_at(0)
        assert window is not None and window.state is WindowState.EVICTED
        assert r.link.connected


async def _read_into(r: LenderLinkRig, offset: int, into: list[bytes]) -> None:
    into.append(await r.engine.read(offset, 8))


async def test_revoke_release_then_repeat_and_unknown_ids(tmp_path: Path) -> None:
    async with lender_session(tmp_path, GRANULE) as (r, peer, fd):
        await peer.grant(1, 0, GRANULE, fd, 0)
        await peer.revoke(1, lp.RevokeMode.RELEASE)
        assert r.engine.window_at(0) is None
        # Granted but no longer live: REVOKED at once (specification, section 8).
        await peer.revoke(1, lp.RevokeMode.RELEASE)
        # Never granted: the protocol answers UNKNOWN_ID.
        await peer.send_encoded(lp.Revoke(9, lp.RevokeMode.EVICT))
        err = await peer.event()
        assert isinstance(err, lp.Error) and err.code == lp.ErrorCode.UNKNOWN_ID
        assert err.ref_type == lp.MsgType.REVOKE and err.ref_id == 9
        assert r.link.connected and r.counters.lender_losses == 0


async def test_ping_is_answered_and_a_silent_lender_is_pinged_then_dropped(
    tmp_path: Path,
) -> None:
    async with lender_link_rig(tmp_path, ping_interval=0.2, ping_timeout=0.2) as r:
        peer = await r.lender.session()
        await peer.send(lp.Ping(42))
        assert await peer.event() == lp.Pong(42)
        # Quiet for a while: the link pings; answering keeps the session.
        ping = await peer.event()
        assert isinstance(ping, lp.Ping)
        await peer.send(lp.Pong(ping.token))
        ping = await peer.event()
        assert isinstance(ping, lp.Ping)
        # Not answering ends it: BYE TIMEOUT, then a new connection.
        bye = await peer.event()
        assert isinstance(bye, lp.Bye) and bye.reason == lp.ByeReason.TIMEOUT
        assert await peer.event() is None
        await r.lender.session()
        await r.connected()
        assert r.link.sessions == 2 and r.counters.lender_losses == 1


async def test_lender_bye_drops_leases_and_the_link_reconnects(tmp_path: Path) -> None:
    async with lender_session(tmp_path, GRANULE) as (r, peer, fd):
        await peer.grant(1, 0, GRANULE, fd, 0)
        await r.engine.write(0, b"12345678")
        await peer.send(lp.Bye(lp.ByeReason.NORMAL, "maintenance"))
        assert await peer.event() is None  # the link closes without answering
        with trio.fail_after(STEP):
            while r.counters.lender_losses == 0:
                await trio.sleep(0.005)
        assert r.engine.kept_fds == 0
        assert await r.engine.read(0, 8) == ONES
        await r.engine.write(0, b"dropped!")
        # A new lender grants again and the guest is served again.
        again = await r.lender.session()
        await again.grant(1, 0, GRANULE, fd, 0)
        assert await r.engine.read(0, 8) == b"12345678"
        assert r.link.last_end_reason.startswith("the lender said BYE")


async def test_no_lender_means_failure_policy_and_no_page_in(tmp_path: Path) -> None:
    async with lender_link_rig(tmp_path) as r:
        assert not r.link.connected
        assert not r.link.send_page_in(1, 0, GRANULE, lp.Access.READ)
        assert await r.engine.read(0, 8) == ONES
        # Connections the lender does not accept yet do not count as sessions.
        assert r.link.sessions == 0


async def test_stopping_drops_every_lease_then_says_bye(tmp_path: Path) -> None:
    async with lender_session(tmp_path, GRANULE) as (r, peer, fd):
        await peer.grant(1, 0, GRANULE, fd, 0)
        assert r.engine.kept_fds == 1
        r.nursery.cancel_scope.cancel()
        bye = await peer.event()
        assert isinstance(bye, lp.Bye) and bye.reason == lp.ByeReason.NORMAL
        assert r.engine.kept_fds == 0  # dropped before the BYE went out
        assert await peer.event() is None


async def test_a_grant_that_served_a_fault_is_acknowledged_after_the_access_returned(
    tmp_path: Path,
) -> None:
    # The guest's answer first, the lender's GRANT_ACK after it (docs/performance.md, "The
    # lease path"); the message order on the lease socket is unchanged.
    async with lender_session(tmp_path, GRANULE) as (r, peer, fd):
        os.pwrite(fd, b"faulted!", 0)
        await peer.grant(1, 0, GRANULE, fd, 0)
        await peer.revoke(1)
        order: list[object] = []

        async def guest_read() -> None:
            order.append(await r.engine.read(0, 8))

        r.nursery.start_soon(guest_read)
        ask = await peer.event()
        assert isinstance(ask, lp.PageIn)
        await peer.send(lp.Grant(2, 0, GRANULE, 0, RW, fd))
        order.append(await peer.event())
        assert order == [b"faulted!", lp.GrantAck(2)]
        await peer.send(lp.PageInDone(ask.request_id, lp.PageInStatus.OK))
        await peer.revoke(2)  # the PAGE_IN_DONE was consumed, the session goes on
        assert r.counters.page_ins == 1 and r.counters.failed_accesses == 0
