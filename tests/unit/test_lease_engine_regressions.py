"""Engine bugs found by the state machine (test_lease_engine_state_machine.py), each pinned by
the smallest case that showed it, at the engine and, where the lender could see it, on the wire.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio
import trio.testing

import devmodel_wire.lease as lp
from devmodel.leases.policy import FailurePolicy
from devmodel.leases.states import WindowState
from devmodel.pci.errors import AccessError
from devmodel.testing import (
    LINK_GRANULE as GRANULE,
)
from devmodel.testing import (
    PAGE,
    RO,
    FakeLender,
    lender_link_rig,
    make_engine,
    memfd,
    pattern,
    sealed_memfd,
    spawn,
)

S = WindowState
EVICT = lp.RevokeMode.EVICT


async def test_error_policy_for_a_waiter_is_raised_in_its_own_task_not_in_the_grant(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A write waiting on a page-in that the lender answers with a read-only grant fails under
    the ERROR policy. The grant serves waiters inline, and it used to raise that AccessError
    out of `grant()` itself: into the lender link, which ended the session (BYE
    INTERNAL_ERROR), while the waiters after the failing one were left until their deadline."""
    engine = make_engine(policy=FailurePolicy.ERROR)
    lender = FakeLender(engine)
    home = lender.own(memfd(4 * PAGE, fill=pattern(1, 4 * PAGE)))
    try:
        await engine.revoke(lender.grant(0, PAGE, home), EVICT)
        t0 = trio.current_time()  # the mock clock stands still: no access waits for a deadline
        async with trio.open_nursery() as nursery:
            writer = spawn(nursery, engine.write, 16, b"\x01\x02")
            reader = spawn(nursery, engine.read, 32, 8)
            await trio.testing.wait_all_tasks_blocked()
            assert engine.window_at(0).state is S.PAGING_IN  # type: ignore[union-attr]
            pi = lender.take()
            lender.grant(0, PAGE, home, prot=RO)  # must not raise
            engine.page_in_done(pi.request_id, lp.PageInStatus.OK)
        assert isinstance(writer.error, AccessError) and writer.error.errno == errno.EIO
        assert reader.get() == pattern(1, PAGE)[32:40]
        assert writer.finished_at == reader.finished_at == t0
        assert engine.counters.failed_accesses == 1
        assert engine.lease_count == 1
        assert engine.window_at(0).state is S.RESIDENT  # type: ignore[union-attr]
    finally:
        engine.close()
        lender.close()


async def test_link_acks_a_read_only_answer_to_a_write_fault_under_the_error_policy(
    tmp_path: Path,
) -> None:
    """The same on the wire: the GRANT is ACKed and the session goes on."""
    async with lender_link_rig(tmp_path) as r:
        r.engine.config.policy = FailurePolicy.ERROR
        peer = await r.lender.session()
        fd = sealed_memfd(GRANULE)
        try:
            await peer.grant(1, 0, GRANULE, fd, 0)
            await peer.revoke(1)
            failed: list[BaseException] = []

            async def guest_write() -> None:
                try:
                    await r.engine.write(0, b"\x05")
                except AccessError as exc:
                    failed.append(exc)

            async with trio.open_nursery() as guests:
                guests.start_soon(guest_write)
                ask = await peer.event()
                assert isinstance(ask, lp.PageIn)
                await peer.send(lp.Grant(2, 0, GRANULE, 0, RO, fd))
                assert await peer.event() == lp.GrantAck(2)
                await peer.send(lp.PageInDone(ask.request_id, lp.PageInStatus.OK))
            assert len(failed) == 1
            assert r.link.connected
            assert r.engine.lease_count == 1
        finally:
            os.close(fd)


@pytest.mark.parametrize("split", [False, True])
async def test_lender_lost_while_paging_in_leaves_no_request_id(split: bool) -> None:
    """A window that was PAGING_IN when the lender went away kept the id of a PAGE_IN that can
    never be answered now (fixed in 6b0e513); a later grant over part of it copied the stale id
    into the pieces it left."""
    engine = make_engine()
    lender = FakeLender(engine)
    home = lender.own(memfd(4 * PAGE))
    try:
        await engine.revoke(lender.grant(0, 4 * PAGE, home), EVICT)
        async with trio.open_nursery() as nursery:
            reader = spawn(nursery, engine.read, 0, 8)
            await trio.testing.wait_all_tasks_blocked()
            assert engine.window_at(0).request_id != 0  # type: ignore[union-attr]
            engine.lender_lost()
        assert reader.get() == b"\xff" * 8
        if split:
            lender.grant(PAGE, PAGE, home)
        for w in engine.windows():
            assert w.request_id == 0, w
            assert w.state is (S.RESIDENT if w.start == PAGE and split else S.LOST)
    finally:
        engine.close()
        lender.close()
