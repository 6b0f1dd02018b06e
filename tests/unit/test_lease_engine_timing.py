"""The lease engine in time (trio MockClock): deadlines, coalescing, slow revokes, forward
progress, failed page-ins (DESIGN.md "Lease model", docs/lease-protocol.md 9.3 and 9.4).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from devmodel.leases.engine import LeaseEngine
from devmodel.leases.policy import FailurePolicy
from devmodel.pci.errors import AccessError
from devmodel.testing import (
    PAGE,
    Box,
    FakeLender,
    delay_unmaps,
    fds_of_memfd,
    make_engine,
    memfd,
    pattern,
    spawn,
)
from devmodel_wire.lease.constants import Access, PageInStatus
from tests.unit.lease_engine_support import APERTURE, EVICT, RELEASE, S, state

TIMEOUT = 2.0


@pytest.fixture
def engine() -> Iterator[LeaseEngine]:
    e = make_engine(APERTURE, page_in_timeout=TIMEOUT, revoke_timeout=TIMEOUT)
    yield e
    e.close()


@pytest.fixture
def lender(engine: LeaseEngine) -> Iterator[FakeLender]:
    lender = FakeLender(engine)
    yield lender
    lender.close()


def lend_first_page(lender: FakeLender) -> int:
    """Lend the first page of the aperture from a fresh memfd; return the lease id."""
    return lender.grant(0, PAGE, lender.own(memfd(APERTURE)))


async def evicted_window(
    engine: LeaseEngine, lender: FakeLender, offset: int, length: int, fill: bytes = b""
) -> int:
    """Lend [offset, offset + length) from a fresh memfd, evict it; return the lender's fd."""
    home = lender.own(memfd(APERTURE, fill=fill))
    lease = lender.grant(offset, length, home)
    await engine.revoke(lease, EVICT)
    return home


# ---------------------------------------------------------------------------- deadlines


@pytest.mark.parametrize("policy", list(FailurePolicy))
async def test_unanswered_page_in_fails_exactly_at_the_deadline(
    mock_clock: trio.testing.MockClock, policy: FailurePolicy
) -> None:
    engine = make_engine(APERTURE, page_in_timeout=TIMEOUT, policy=policy)
    lender = FakeLender(engine)
    try:
        home = await evicted_window(engine, lender, 0, 2 * PAGE, b"\x42" * PAGE)
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            read = spawn(nursery, engine.read, 8, 8)
            await trio.testing.wait_all_tasks_blocked()
            write = spawn(nursery, engine.write, PAGE, b"\x33" * 8)
            await trio.testing.wait_all_tasks_blocked()
            [first] = lender.page_ins
            assert first.access is Access.READ
            mock_clock.jump(TIMEOUT - 0.001)
            await trio.testing.wait_all_tasks_blocked()
            assert not read.done and not write.done
            assert state(engine, 0) is S.PAGING_IN
            mock_clock.jump(0.001)
        assert read.finished_at == pytest.approx(t0 + TIMEOUT, abs=1e-9)
        assert write.finished_at == pytest.approx(t0 + TIMEOUT, abs=1e-9)
        if policy is FailurePolicy.ERROR:
            assert isinstance(read.error, AccessError)
            assert isinstance(write.error, AccessError)
        else:
            fill = b"\xff" if policy is FailurePolicy.ALL_ONES else b"\x00"
            assert read.get() == fill * 8
            assert write.get() is None
        assert os.pread(home, 8, PAGE) == bytes(8)  # the write was dropped
        # The PAGE_IN stays outstanding (9.4 "Late answers"): the window still waits on it.
        assert state(engine, 0) is S.PAGING_IN
        assert engine.counters.failed_accesses == 2
        assert engine.counters.faults == 2

        # The next access waits on that same request, and its late answer serves it.
        async with trio.open_nursery() as nursery:
            again = spawn(nursery, engine.read, 16, 8)
            await trio.testing.wait_all_tasks_blocked()
            assert lender.page_ins == [first]
            assert not again.done
            lender.answer(lender.take(first.request_id), home)
        assert again.get() == b"\x42" * 8
        assert engine.counters.page_ins == 1
    finally:
        engine.close()
        lender.close()


async def test_deadline_with_the_autojump_clock(
    autojump_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    await evicted_window(engine, lender, 0, PAGE)
    t0 = trio.current_time()
    assert await engine.read(0, 4) == b"\xff" * 4
    assert trio.current_time() - t0 == TIMEOUT
    assert state(engine, 0) is S.PAGING_IN  # the PAGE_IN is still outstanding
    assert len(lender.page_ins) == 1


async def test_late_grant_after_the_deadline_is_an_ordinary_grant(
    autojump_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    home = await evicted_window(engine, lender, 0, PAGE, b"\x42" * 8)
    assert await engine.read(0, 8) == b"\xff" * 8
    pi = lender.take()
    lender.answer(pi, home)  # late: the access already failed (9.4 "Late answers")
    assert state(engine, 0) is S.RESIDENT
    assert await engine.read(0, 8) == b"\x42" * 8
    assert len(lender.page_ins) == 1


async def test_waiters_that_came_later_do_not_wait_past_their_own_deadline(
    autojump_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    await evicted_window(engine, lender, 0, PAGE)
    async with trio.open_nursery() as nursery:
        first = spawn(nursery, engine.read, 0, 4)
        await trio.sleep(1.0)
        later = spawn(nursery, engine.read, 8, 4)
    assert first.get() == b"\xff" * 4 and later.get() == b"\xff" * 4
    assert first.finished_at == TIMEOUT
    assert later.finished_at == 1.0 + TIMEOUT
    assert len(lender.page_ins) == 1
    assert state(engine, 0) is S.PAGING_IN


async def test_a_fault_blocks_only_its_own_window(
    autojump_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    await evicted_window(engine, lender, 0, PAGE)
    other = lender.own(memfd(APERTURE, fill=b"\x42" * APERTURE))
    lender.grant(8 * PAGE, PAGE, other)
    async with trio.open_nursery() as nursery:
        stuck = spawn(nursery, engine.read, 0, 4)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        for _ in range(100):
            assert await engine.read(8 * PAGE, 8) == b"\x42" * 8
            await engine.write(8 * PAGE + 8, b"\x01" * 8)
        assert trio.current_time() == t0  # nothing global was held
        assert not stuck.done
    assert stuck.get() == b"\xff" * 4


# ---------------------------------------------------------------------------- coalescing


async def test_64_concurrent_faults_send_one_page_in_and_are_served_by_one_grant(
    mock_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    contents = pattern(21, 4 * PAGE)
    await evicted_window(engine, lender, 4 * PAGE, 4 * PAGE)
    new = lender.own(memfd(8 * PAGE, "coalesce", fill=bytes(2 * PAGE) + contents))
    rng = random.Random(64)
    accesses: list[tuple[int, bytes | None, Box]] = []
    # Reads and writes of many places, a few of them the same place (a write, then reads).
    slots = [*rng.sample(range(4 * PAGE // 8), 56), *[7] * 8]
    async with trio.open_nursery() as nursery:
        for i, slot in enumerate(slots):
            at = 4 * PAGE + slot * 8
            if (i % 2 and slot != 7) or i == 56:
                data = bytes([i]) * 8
                accesses.append((at, data, spawn(nursery, engine.write, at, data)))
            else:
                accesses.append((at, None, spawn(nursery, engine.read, at, 8)))
        await trio.testing.wait_all_tasks_blocked()
        assert len(lender.page_ins) == 1
        [pi] = lender.page_ins
        assert (pi.offset, pi.length) == (4 * PAGE, 4 * PAGE)
        assert all(not box.done for _, _, box in accesses)
        window = engine.window_at(4 * PAGE)
        assert window is not None and window.waiters is not None and len(window.waiters) == 64
        order = [(p.offset, p.data) for p in window.waiters]
        lender.answer(lender.take(), new, 2 * PAGE)
    assert trio.current_time() == 0  # served without any time passing
    # Each waiter was performed inside the grant, in the order it queued, from the one grant:
    # replay that order on a model of the lender's memory.
    model = bytearray(contents)
    expected: dict[tuple[int, bytes | None], list[bytes]] = {}
    for at, queued in order:
        rel = at - 4 * PAGE
        if queued is None:
            expected.setdefault((at, None), []).append(bytes(model[rel : rel + 8]))
        else:
            model[rel : rel + 8] = queued
    for at, wrote, box in accesses:
        if wrote is None:
            assert box.get() in expected[(at, None)]
        else:
            assert box.get() is None
    assert os.pread(new, 4 * PAGE, 2 * PAGE) == bytes(model)
    c = engine.counters
    assert (c.page_ins, c.faults, c.failed_accesses, c.grants) == (1, 64, 0, 2)


# ---------------------------------------------------------------------------- slow revokes


async def test_waiters_on_a_revoking_window_refault_after_the_revoke(
    autojump_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    name = "slow-revoke"
    home = lender.own(memfd(APERTURE, name, fill=pattern(4, 2 * PAGE)))
    lease = lender.grant(0, 2 * PAGE, home)
    unmapped: list[float] = []

    async def slow_unmap(start: int, length: int) -> None:
        await trio.sleep(0.5)
        unmapped.append(trio.current_time())

    engine.unmap_hooks.append(slow_unmap)
    async with trio.open_nursery() as nursery:
        revoke = spawn(nursery, engine.revoke, lease, EVICT)
        await trio.sleep(0.1)
        assert state(engine, 0) is S.REVOKING
        waiters = [spawn(nursery, engine.read, i * 256, 8) for i in range(16)]
        waiters.append(spawn(nursery, engine.write, PAGE, b"\x55" * 8))
        await trio.sleep(0.1)
        assert not revoke.done and not any(w.done for w in waiters)
        assert lender.page_ins == []  # nothing is paged in while the revoke runs
        pi = await lender.next_page_in()
        # The PAGE_IN came only after the revoke returned: the fd was gone by then.
        assert revoke.done and revoke.finished_at == pytest.approx(0.5)
        assert trio.current_time() == pytest.approx(0.5)
        assert fds_of_memfd(name) == [home]
        assert (pi.offset, pi.length) == (0, 2 * PAGE)
        await trio.sleep(0.2)  # the lender takes its time; the accesses keep waiting
        lender.answer(pi, home)
    revoke.get()
    assert unmapped == [pytest.approx(0.5)]
    for i, w in enumerate(waiters[:-1]):
        assert w.get() == pattern(4, 2 * PAGE)[i * 256 : i * 256 + 8]
        assert w.finished_at == pytest.approx(0.7)
    assert os.pread(home, 8, PAGE) == b"\x55" * 8
    assert len(lender.page_ins) == 1
    assert engine.counters.failed_accesses == 0
    assert engine.counters.faults == 17


async def test_waiters_on_a_revoking_window_get_the_policy_after_release(
    autojump_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    lease = lend_first_page(lender)
    delay_unmaps(engine, 0.5)
    async with trio.open_nursery() as nursery:
        spawn(nursery, engine.revoke, lease, RELEASE)
        await trio.sleep(0.1)
        waiter = spawn(nursery, engine.read, 0, 4)
    assert waiter.get() == b"\xff" * 4
    assert waiter.finished_at == pytest.approx(0.5)
    assert lender.page_ins == []
    assert engine.window_at(0) is None


async def test_a_revoke_slower_than_the_access_deadline(
    autojump_clock: trio.testing.MockClock, lender: FakeLender
) -> None:
    # The access gives up at its deadline; the revoke still completes properly afterwards.
    engine = lender.engine
    engine.config.page_in_timeout = 1.0
    home = lender.own(memfd(APERTURE, "slower"))
    lease = lender.grant(0, PAGE, home)
    delay_unmaps(engine, 1.5)
    async with trio.open_nursery() as nursery:
        revoke = spawn(nursery, engine.revoke, lease, EVICT)
        await trio.sleep(0)
        waiter = spawn(nursery, engine.read, 0, 4)
    assert waiter.get() == b"\xff" * 4 and waiter.finished_at == pytest.approx(1.0)
    assert revoke.get() is None and revoke.finished_at == pytest.approx(1.5)
    assert state(engine, 0) is S.EVICTED
    assert engine.window_at(0).waiters is None  # type: ignore[union-attr]
    assert fds_of_memfd("slower") == [home]
    assert lender.page_ins == []


async def test_revoke_is_never_acknowledged_before_the_unmap_hooks_finish(
    autojump_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    lease = lend_first_page(lender)
    unmapped = trio.Event()

    async def stuck_unmap(start: int, length: int) -> None:
        await trio.sleep(3 * TIMEOUT)  # a hypervisor that takes very long to unmap
        unmapped.set()

    engine.unmap_hooks.append(stuck_unmap)
    returned_before_unmap = False
    with trio.move_on_after(10 * TIMEOUT):
        await engine.revoke(lease, EVICT)
        returned_before_unmap = not unmapped.is_set()
    assert not returned_before_unmap


# ---------------------------------------------------------------------------- forward progress


async def test_forward_progress_when_every_grant_is_revoked_at_once(
    autojump_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    """A lender that evicts every lease right after granting it, from a new place each time
    (it moves the contents back home on eviction): every access is still served, right."""
    windows = [(0, PAGE), (4 * PAGE, 2 * PAGE), (16 * PAGE, 4 * PAGE)]
    home = lender.own(memfd(APERTURE, "fp-home", fill=pattern(8, 32 * PAGE)))
    model = bytearray(pattern(8, 32 * PAGE))
    for start, length in windows:
        await engine.revoke(lender.grant(start, length, home), EVICT)
    moves = 0

    async def hostile_lender() -> None:
        nonlocal moves
        while True:
            pi = await lender.next_page_in()
            moves += 1
            where = (moves % 5) * PAGE
            elsewhere = memfd(where + pi.length, f"fp-{moves}")
            os.pwrite(elsewhere, os.pread(home, pi.length, pi.offset), where)
            lease = lender.grant(pi.offset, pi.length, elsewhere, where)
            await engine.revoke(lease, EVICT)  # at once
            os.pwrite(home, os.pread(elsewhere, pi.length, where), pi.offset)
            os.close(elsewhere)
            engine.page_in_done(pi.request_id, PageInStatus.OK)

    served = 0

    async def guest(seed: int) -> None:
        nonlocal served
        rng = random.Random(seed)
        for _ in range(40):
            start, length = rng.choice(windows)
            at = start + rng.randrange(0, length // 8) * 8
            if rng.random() < 0.5:
                data = rng.randbytes(8)
                await engine.write(at, data)
                model[at : at + 8] = data
            else:
                got = await engine.read(at, 8)
                # What the model held when the access was served: no one else wrote this
                # spot since (guests write their own lanes only).
                assert got == bytes(model[at : at + 8])
            served += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hostile_lender)
        async with trio.open_nursery() as guests:
            for seed in range(8):
                guests.start_soon(guest, seed)
        nursery.cancel_scope.cancel()
    assert served == 8 * 40
    assert engine.counters.failed_accesses == 0
    assert engine.counters.page_ins == moves > 0
    assert all(state(engine, s) is S.EVICTED for s, _ in windows)
    assert engine.kept_fds == 0
    assert os.pread(home, 32 * PAGE, 0) == bytes(model)
    assert trio.current_time() < TIMEOUT  # nothing ever waited for a deadline


async def test_waiters_are_served_inside_the_grant(
    mock_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    """The revoke that follows a grant (no checkpoint between) cannot starve its waiters, and
    poison written after that revoke never reaches them."""
    home = await evicted_window(engine, lender, 0, PAGE)
    fresh = lender.own(memfd(PAGE, fill=b"\x42" * PAGE))
    async with trio.open_nursery() as nursery:
        reads = [spawn(nursery, engine.read, i * 8, 8) for i in range(8)]
        write = spawn(nursery, engine.write, 512, b"\x99" * 8)
        await trio.testing.wait_all_tasks_blocked()
        pi = lender.take()
        lease = lender.grant(0, PAGE, fresh, 0)
        await engine.revoke(lease, EVICT)  # no hooks: completes without a checkpoint
        assert not any(r.done for r in reads)  # they have not even run yet...
        os.pwrite(fresh, b"\xde" * PAGE, 0)  # ...and the lender reuses the pages
        engine.page_in_done(pi.request_id, PageInStatus.OK)
    for r in reads:
        assert r.get() == b"\x42" * 8  # ...but were served from the grant
    assert write.get() is None
    assert engine.counters.failed_accesses == 0
    assert len(lender.page_ins) == 1
    assert os.pread(home, 8, 0) == bytes(8)


async def test_coalesced_reads_share_a_read_only_until_a_write_between_them(
    mock_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    """The grant serves its waiters in the order they came: reads of the same bytes may share
    one read of them, but a read that came after a write to those bytes sees the write."""
    await evicted_window(engine, lender, 0, PAGE)
    fresh = lender.own(memfd(PAGE, fill=b"\x42" * PAGE))
    async with trio.open_nursery() as nursery:
        before = [spawn(nursery, engine.read, 64, 8) for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        write = spawn(nursery, engine.write, 64, b"\x99" * 8)
        await trio.testing.wait_all_tasks_blocked()
        after = [spawn(nursery, engine.read, 64, 8) for _ in range(3)]
        other = spawn(nursery, engine.read, 128, 4)
        await trio.testing.wait_all_tasks_blocked()
        pi = lender.take()
        lender.grant(0, PAGE, fresh, 0)
        engine.page_in_done(pi.request_id, PageInStatus.OK)
    assert [r.get() for r in before] == [b"\x42" * 8] * 3
    assert write.get() is None
    assert [r.get() for r in after] == [b"\x99" * 8] * 3
    assert other.get() == b"\x42" * 4
    assert engine.counters.failed_accesses == 0 and len(lender.page_ins) == 1


# ---------------------------------------------------------------------------- failed page-ins


@pytest.mark.parametrize(
    "status",
    [
        PageInStatus.NO_MEMORY,
        PageInStatus.BUSY,
        PageInStatus.INVALID_RANGE,
        PageInStatus.FAILED,
        77,
    ],
)
async def test_page_in_done_with_an_error_fails_the_waiters(
    mock_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender, status: int
) -> None:
    home = await evicted_window(engine, lender, 0, 2 * PAGE, b"\x42" * 8)
    events: list[str] = []
    engine.on_event = lambda name, data: events.append(name)
    async with trio.open_nursery() as nursery:
        boxes = [spawn(nursery, engine.read, i * 8, 8) for i in range(10)]
        await trio.testing.wait_all_tasks_blocked()
        lender.fail(lender.take(), status)
    for b in boxes:
        assert b.get() == b"\xff" * 8
        assert b.finished_at == 0  # at once, not at the deadline
    assert state(engine, 0) is S.EVICTED  # the next access asks again
    assert events == ["PAGE_IN_REQUESTED", "PAGE_IN_FAILED"]
    assert engine.counters.failed_accesses == 10
    lender.inline = lambda lender_, pi: lender_.answer(pi, home)
    assert await engine.read(0, 8) == b"\x42" * 8
    assert len(lender.page_ins) == 2


async def test_page_in_done_not_lent_makes_the_range_vacant(
    mock_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    # docs/lease-protocol.md 9.4: NOT_LENT "fails the waiting accesses and marks the range
    # vacant (nothing lent there any more)": no further PAGE_IN for it.
    await evicted_window(engine, lender, 0, 2 * PAGE)
    async with trio.open_nursery() as nursery:
        box = spawn(nursery, engine.read, 8, 8)
        await trio.testing.wait_all_tasks_blocked()
        lender.fail(lender.take(), PageInStatus.NOT_LENT)
    assert box.get() == b"\xff" * 8
    assert engine.window_at(0) is None
    assert await engine.read(PAGE, 8) == b"\xff" * 8
    assert len(lender.page_ins) == 1
    assert engine._evicted == {}


async def test_page_in_done_ok_without_a_grant_fails_what_was_not_granted(
    mock_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    home = await evicted_window(engine, lender, 0, 4 * PAGE, pattern(6, 4 * PAGE))
    async with trio.open_nursery() as nursery:
        boxes = [spawn(nursery, engine.read, i * PAGE + 8, 8) for i in range(4)]
        await trio.testing.wait_all_tasks_blocked()
        pi = lender.take()
        # The lender grants only the first half (say the GRANT of the rest was NACKed).
        lender.grant(0, 2 * PAGE, home)
        await trio.testing.wait_all_tasks_blocked()
        assert [b.done for b in boxes] == [True, True, False, False]
        engine.page_in_done(pi.request_id, PageInStatus.OK)
    for i in (0, 1):
        assert boxes[i].get() == pattern(6, 4 * PAGE)[i * PAGE + 8 : i * PAGE + 16]
    for i in (2, 3):
        assert boxes[i].get() == b"\xff" * 8
    assert [(w.start, w.length, w.state) for w in engine.windows()] == [
        (0, 2 * PAGE, S.RESIDENT),
        (2 * PAGE, 2 * PAGE, S.EVICTED),
    ]
    assert engine.counters.failed_accesses == 2


async def test_release_of_a_lease_being_paged_in(
    mock_clock: trio.testing.MockClock, engine: LeaseEngine, lender: FakeLender
) -> None:
    lease = lend_first_page(lender)
    await engine.revoke(lease, EVICT)
    async with trio.open_nursery() as nursery:
        box = spawn(nursery, engine.read, 0, 8)
        await trio.testing.wait_all_tasks_blocked()
        pi = lender.take()
        await engine.revoke(lease, RELEASE)
    assert box.get() == b"\xff" * 8 and box.finished_at == 0
    assert engine.window_at(0) is None
    engine.page_in_done(pi.request_id, PageInStatus.OK)  # consumed, changes nothing
    assert engine.window_at(0) is None


async def test_unknown_page_in_done_is_ignored(engine: LeaseEngine, lender: FakeLender) -> None:
    await evicted_window(engine, lender, 0, PAGE)
    for rid in (0, 1, 99, 1 << 63):
        for status in (PageInStatus.OK, PageInStatus.FAILED):
            engine.page_in_done(rid, status)
    assert state(engine, 0) is S.EVICTED
