"""A lender that stops answering PAGE_IN, against the real LenderLink and LeaseEngine.

docs/lease-protocol.md 9.4: there is never more than one outstanding PAGE_IN covering a
granule, and an access whose deadline passes fails while its request stays outstanding ("Late
answers"). Issue 14 found devmodel sending a new PAGE_IN at every later access instead, so a
looping guest and a hung lender drove the outstanding requests toward the flow limit. Here a
guest keeps reading an evicted granule through many deadlines; the lender must see exactly one
PAGE_IN, and its late answer ends it (grant: served; failing status: the next access asks again).

Virtual time (autojumping MockClock): the deadlines cost nothing, and nothing here depends on
how fast the machine is. The keepalive is pushed out of the way (the lender still answers
PINGs in a real deployment; here it is silent on PAGE_IN only).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

import devmodel_wire.lease as lp
from devmodel.leases.states import WindowState
from devmodel.testing import LINK_GRANULE as GRANULE
from devmodel.testing import RW, LenderLinkRig, ScriptedLender, lender_session

TIMEOUT = 1.0  # the rig's page-in deadline
ONES = b"\xff" * 8
QUIET = 1e6  # ping interval: no keepalive PING within these tests' virtual time


async def _evicted(peer: ScriptedLender, fd: int) -> None:
    os.pwrite(fd, b"precious", 0)
    await peer.grant(1, 0, GRANULE, fd, 0)
    await peer.revoke(1)


async def _nothing_more(peer: ScriptedLender) -> None:
    """The device model sends nothing (no second PAGE_IN) for a while of virtual time."""
    with pytest.raises(trio.TooSlowError):
        got = await peer.event(timeout=5 * TIMEOUT)
        raise AssertionError(f"unexpected message from the device model: {got}")


def _state(r: LenderLinkRig) -> WindowState:
    w = r.engine.window_at(0)
    assert w is not None
    return w.state


async def test_a_silent_lender_gets_one_page_in_however_often_the_guest_asks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with lender_session(tmp_path, GRANULE, ping_interval=QUIET) as (r, peer, fd):
        await _evicted(peer, fd)
        results: list[tuple[bytes, float]] = []

        async def looping_guest(rounds: int) -> None:
            for _ in range(rounds):
                t0 = trio.current_time()
                got = await r.engine.read(8 * (len(results) % 4), 8)
                results.append((got, trio.current_time() - t0))

        async with trio.open_nursery() as guests:
            guests.start_soon(looping_guest, 6)
            guests.start_soon(looping_guest, 6)  # two vCPUs on the same granule
            ask = await peer.event()
            assert isinstance(ask, lp.PageIn) and (ask.offset, ask.length) == (0, GRANULE)
            await _nothing_more(peer)
        # Every access failed at its own deadline, none before and none later.
        assert [got for got, _ in results] == [ONES] * 12
        assert all(took == TIMEOUT for _, took in results)
        assert r.counters.page_ins == 1 and r.counters.failed_accesses == 12
        assert _state(r) is WindowState.PAGING_IN
        assert r.link.connected

        # The late answer completes the outstanding request: the granule is resident again,
        # and an access waiting on it meanwhile is served by the grant.
        served: list[bytes] = []
        async with trio.open_nursery() as guests:
            guests.start_soon(lambda: _read_into(r, served))
            await trio.testing.wait_all_tasks_blocked()
            await peer.send(lp.Grant(2, 0, GRANULE, 0, RW, fd))
            await peer.send(lp.PageInDone(ask.request_id, lp.PageInStatus.OK))
            assert await peer.event() == lp.GrantAck(2)
        assert served == [b"precious"]
        assert _state(r) is WindowState.RESIDENT
        assert await r.engine.read(0, 8) == b"precious"
        assert r.counters.page_ins == 1


async def test_a_late_failing_answer_lets_the_next_access_ask_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with lender_session(tmp_path, GRANULE, ping_interval=QUIET) as (r, peer, fd):
        await _evicted(peer, fd)
        async with trio.open_nursery() as guests:
            guests.start_soon(r.engine.read, 0, 8)
            first = await peer.event()
            assert isinstance(first, lp.PageIn)
        assert await r.engine.read(0, 8) == ONES  # waits on `first`, sends nothing
        assert r.counters.page_ins == 1
        # The late answer (9.4: consumed normally): failed, so the range is evicted again...
        await peer.send(lp.PageInDone(first.request_id, lp.PageInStatus.BUSY))
        with trio.fail_after(TIMEOUT):
            while _state(r) is not WindowState.EVICTED:
                await trio.sleep(0.001)
        # ...and the next access sends a new PAGE_IN, which the lender now answers in time.
        result: list[bytes] = []
        async with trio.open_nursery() as guests:
            guests.start_soon(lambda: _read_into(r, result))
            second = await peer.event()
            assert isinstance(second, lp.PageIn) and second.request_id != first.request_id
            await peer.send(lp.Grant(2, 0, GRANULE, 0, RW, fd))
            await peer.send(lp.PageInDone(second.request_id, lp.PageInStatus.OK))
        assert result == [b"precious"]
        assert r.counters.page_ins == 2 and r.link.connected


async def _read_into(r: LenderLinkRig, into: list[bytes]) -> None:
    into.append(await r.engine.read(0, 8))
