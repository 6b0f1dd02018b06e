"""The lease engine's own observation API: the timing and tracer hooks, in_flight, drain(),
state_counts(); all on a plain LeaseEngine, with no metrics subclass in between."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio
import trio.testing

from devmodel.counters import DeviceCounters
from devmodel.leases.builtin_lender import BuiltinLender
from devmodel.leases.engine import LeaseEngine
from devmodel.leases.states import WindowState
from devmodel.metrics.timing import AccessTiming
from devmodel_wire.lease.constants import Access, PageInStatus, RevokeMode

MiB = 1 << 20
S = WindowState


class Recorder:
    """An AccessObserver and a tracer that keep what they are told."""

    def __init__(self) -> None:
        self.accesses: list[tuple[int, bool]] = []
        self.revokes: list[int] = []
        self.traced: list[tuple[bool, int, bytes]] = []

    def access(self, ns: int) -> None:
        self.accesses.append((ns, False))

    def fault(self, ns: int) -> None:
        # Always right after `access`, for the same access (the same duration).
        assert self.accesses and self.accesses[-1] == (ns, False)
        self.accesses[-1] = (ns, True)

    def revoke(self, ns: int) -> None:
        self.revokes.append(ns)

    def __call__(self, write: bool, offset: int, data: bytes, ns: int) -> None:
        assert ns >= 0
        self.traced.append((write, offset, data))


class SilentPort:
    """A lender that takes page-in requests and answers only when told."""

    answers_later = True  # LenderPort: asked from the fast path's miss

    def __init__(self, engine: LeaseEngine) -> None:
        self.requests: list[tuple[int, int, int]] = []
        engine.port = self

    def send_page_in(self, request_id: int, offset: int, length: int, access: Access) -> bool:
        self.requests.append((request_id, offset, length))
        return True


@contextlib.contextmanager
def lent_engine(
    timing: Recorder | AccessTiming | None = None,
) -> Iterator[tuple[LeaseEngine, BuiltinLender]]:
    """An 8 MiB engine wholly lent by a BuiltinLender; both closed at the end."""
    engine = LeaseEngine(8 * MiB, 2 * MiB, DeviceCounters(), timing=timing)
    lender = BuiltinLender(engine, 2 * MiB)
    lender.lend_everything()
    try:
        yield engine, lender
    finally:
        engine.close()
        lender.close()


async def test_the_timing_hook_sees_accesses_faults_and_revokes() -> None:
    rec = Recorder()
    with lent_engine(rec) as (engine, _lender):
        await engine.write(0, b"12345678")
        assert await engine.read(0, 8) == b"12345678"
        assert [f for _, f in rec.accesses] == [False, False]
        await engine.revoke(1, RevokeMode.EVICT)
        assert len(rec.revokes) == 1 and rec.revokes[0] >= 0
        # Evicted: the access asks for a page-in (answered at once by the built-in lender).
        assert await engine.read(0, 8) == b"12345678"
        assert rec.accesses[-1][1] is True
        await engine.revoke(5, RevokeMode.RELEASE)  # the page-in granted lease 5
        # Vacant now: the failure policy, which is no fault (nothing was paged in or waited on).
        assert await engine.read(0, 8) == b"\xff" * 8
        assert rec.accesses[-1][1] is False and len(rec.accesses) == 4
        assert all(ns >= 0 for ns, _ in rec.accesses)


async def test_the_tracer_sees_each_access_with_its_data_only_while_set() -> None:
    with lent_engine() as (engine, _lender):
        rec = Recorder()
        engine.tracer = rec
        await engine.write(16, b"\x01\x02")
        assert await engine.read(16, 2) == b"\x01\x02"
        await engine.revoke(1, RevokeMode.EVICT)
        await engine.write(24, b"\x03")  # a faulting write is traced too
        assert rec.traced == [
            (True, 16, b"\x01\x02"),
            (False, 16, b"\x01\x02"),
            (True, 24, b"\x03"),
        ]
        assert rec.accesses == []  # a tracer alone is no timing hook
        engine.tracer = None
        await engine.read(16, 2)
        assert len(rec.traced) == 3


async def test_access_timing_fills_its_histograms_through_the_hook() -> None:
    timing = AccessTiming()
    with lent_engine(timing) as (engine, _lender):
        await engine.read(0, 8)
        await engine.revoke(2, RevokeMode.EVICT)
        await engine.read(2 * MiB, 8)
        assert [h.count for h in timing.histograms()] == [2, 1, 1]
        engine.timing = None  # detached: the engine keeps serving, nothing is recorded
        await engine.read(0, 8)
        assert timing.access_latency.count == 2


async def test_in_flight_and_drain_on_the_plain_engine(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with lent_engine() as (engine, lender):
        await engine.revoke(1, RevokeMode.EVICT)
        port = SilentPort(engine)  # the next page-in waits for an answer
        assert engine.in_flight == 0 and await engine.drain(0.1)
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                got.append(await engine.read(8, 8))

            nursery.start_soon(reader)
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert engine.in_flight == 2 and len(port.requests) == 1
            assert not await engine.drain(0.5)  # both still wait for the page-in
            request_id, offset, length = port.requests[0]
            lender.engine.port = lender
            lender.send_page_in(request_id, offset, length, Access.READ)
            assert await engine.drain(0.5)
        assert engine.in_flight == 0 and got == [bytes(8), bytes(8)]
        engine.page_in_done(request_id, PageInStatus.OK)


async def test_drain_gives_up_at_its_timeout_and_the_access_gets_the_policy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with lent_engine() as (engine, _lender):
        await engine.revoke(1, RevokeMode.EVICT)
        SilentPort(engine)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.read, 0, 8)
            await trio.testing.wait_all_tasks_blocked()
            assert not await engine.drain(0.1)
            assert await engine.drain(engine.config.page_in_timeout)  # the deadline ends it
        assert engine.counters.failed_accesses == 1


async def test_state_counts_on_the_plain_engine() -> None:
    with lent_engine() as (engine, _lender):
        assert engine.state_counts() == {
            "resident": 4,
            "revoking": 0,
            "evicted": 0,
            "paging-in": 0,
            "lost": 0,
        }
        await engine.revoke(3, RevokeMode.EVICT)
        counts = engine.state_counts()
        assert counts[S.RESIDENT.value] == 3 and counts[S.EVICTED.value] == 1
        assert S.VACANT.value not in counts


async def test_read_now_reads_only_resident_windows_and_is_observed_like_read() -> None:
    rec = Recorder()
    with lent_engine(rec) as (engine, _lender):
        engine.tracer = rec
        await engine.write(8, b"abcdefgh")
        rec.accesses.clear()
        rec.traced.clear()
        assert engine.read_now(8, 8) == b"abcdefgh"
        assert [f for _, f in rec.accesses] == [False]
        assert rec.traced == [(False, 8, b"abcdefgh")]
        await engine.revoke(1, RevokeMode.EVICT)
        # Evicted: nothing read, nothing observed; the awaited read pages in and serves it.
        assert engine.read_now(8, 8) is None
        assert len(rec.accesses) == 1 and len(rec.traced) == 1
        assert engine.in_flight == 0
        assert await engine.read(8, 8) == b"abcdefgh"
        assert rec.accesses[-1][1] is True
        assert engine.read_now(8, 8) == b"abcdefgh"  # resident again (the page-in's lease)
        await engine.revoke(5, RevokeMode.RELEASE)
        assert engine.read_now(8, 8) is None  # vacant: the awaited read gives the policy
        assert await engine.read(8, 8) == b"\xff" * 8


async def test_write_now_writes_only_resident_writable_windows_and_is_observed_like_write() -> None:
    rec = Recorder()
    with lent_engine(rec) as (engine, _lender):
        engine.tracer = rec
        assert engine.write_now(8, b"abcdefgh") is True
        assert [f for _, f in rec.accesses] == [False]
        assert rec.traced == [(True, 8, b"abcdefgh")]
        assert engine.read_now(8, 8) == b"abcdefgh"
        rec.accesses.clear()
        rec.traced.clear()
        await engine.revoke(1, RevokeMode.EVICT)
        # Evicted: nothing written, nothing observed; the awaited write pages in and does it.
        assert engine.write_now(8, b"12345678") is False
        assert rec.accesses == [] and rec.traced == []
        assert engine.in_flight == 0
        await engine.write(8, b"12345678")
        assert rec.accesses[-1][1] is True
        assert engine.write_now(8, b"ABCDEFGH") is True  # resident again
        assert await engine.read(8, 8) == b"ABCDEFGH"
        await engine.revoke(5, RevokeMode.RELEASE)
        assert engine.write_now(8, b"zzzzzzzz") is False  # vacant: the awaited write fails
        failed = engine.counters.failed_accesses
        await engine.write(8, b"zzzzzzzz")
        assert engine.counters.failed_accesses == failed + 1
