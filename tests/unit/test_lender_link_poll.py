"""An access polling the lender's socket for its page-in's answer (LenderLink.poll_answer).

The lender here is a thread with a blocking socket, so that it can answer while the trio loop
spins (a lender task in the same loop never could). The polling budget runs on a clock that
advances by one microsecond per reading, so a spin is bounded by a count of tries and never by
the machine's speed: with a budget of a million tries an answering lender is always caught,
and with a budget of a few tries a lender in the test's own loop never is.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

import devmodel_wire.lease as lp
from devmodel.counters import DeviceCounters
from devmodel.leases.engine import EngineConfig, LeaseEngine
from devmodel.leases.lender_link import LenderLink
from devmodel.leases.states import WindowState
from devmodel.polling import PageInPoll
from devmodel.testing import (
    LINK_APERTURE as APERTURE,
)
from devmodel.testing import (
    LINK_GRANULE as GRANULE,
)
from devmodel.testing import (
    LINK_STEP,
    RW,
    lender_link_rig,
    sealed_memfd,
)
from devmodel.unixfds import ancillary_space, fds_from_ancillary, rights

ONES = b"\xff" * 8
WINDOWS = 16


def ticking_clock() -> Callable[[], int]:
    """One microsecond per reading: a spin's length is a number of tries."""
    ticks = itertools.count(0, 1_000)
    return lambda: next(ticks)


def poll_with(tries: int, max_tries: int | None = None) -> PageInPoll:
    """A page-in poll whose budget is `tries` clock readings now (and at most `max_tries`);
    the rig that takes it gives it the engine's counters."""
    poll = PageInPoll((max_tries or tries) * 1_000, DeviceCounters(), ticking_clock())
    poll.budget_ns = tries * 1_000
    return poll


@dataclass
class ThreadRig:
    engine: LeaseEngine
    link: LenderLink
    listener: socket.socket
    path: str

    @property
    def counters(self) -> DeviceCounters:
        return self.engine.counters

    async def connected(self) -> None:
        """Connected, every window lent and evicted (ThreadLender's opening), and the link's
        reader parked on the empty socket again. Only then may an access poll (the reader may
        be in no step of its own): a reader that used up its time slice on the opening waits
        at a checkpoint instead, and an access that never awaits would find it there in every
        poll (a flake of these tests on a slow machine, seen ~1 run in 13)."""
        await wait_until(lambda: self.link.connected)
        await wait_until(
            lambda: (
                self.counters.revokes == WINDOWS
                and all(w.state is WindowState.EVICTED for w in self.engine.windows())
            )
        )
        await wait_until(self.reader_parked)

    def reader_parked(self) -> bool:
        session = self.link._session
        return session is not None and session._idle


@contextlib.asynccontextmanager
async def thread_rig(tmp_path: Path, poll: PageInPoll) -> AsyncIterator[ThreadRig]:
    """A real LeaseEngine and LenderLink (polling with `poll`) and a blocking listening socket
    for a ThreadLender."""
    path = str(tmp_path / "thread-lender.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    config = EngineConfig(page_in_timeout=LINK_STEP, revoke_timeout=LINK_STEP)
    engine = LeaseEngine(APERTURE, GRANULE, DeviceCounters(), config)
    poll.counters = engine.counters
    link = LenderLink(engine, path, 7, reconnect_min=0.01, reconnect_max=0.05, poll=poll)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            yield ThreadRig(engine, link, listener, path)
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
        engine.close()


def mark(index: int) -> bytes:
    return struct.pack("<Q", 0x1E4D_0000 + index)


class ThreadLender:
    """A lender on a blocking socket in its own thread. After the handshake it lends and at
    once evicts WINDOWS windows (leases 1 to WINDOWS), so that each first access faults; it
    answers every PAGE_IN at once with one GRANT per window (fd offset = aperture offset),
    then, if `then` says so, other messages in the same breath, then PAGE_IN_DONE. Everything
    the device model sent is kept in order."""

    def __init__(self, memfd: int) -> None:
        self.memfd = memfd
        self.conn = lp.LenderConnection()
        self.received: list[lp.Event] = []
        self.next_lease = 1
        self.lease_of: dict[int, int] = {}  # window start -> its lease
        # Called after each GRANT: the bytes to send right behind it, before PAGE_IN_DONE.
        self.then: Callable[[int], bytes] = lambda lease: b""
        self.error: BaseException | None = None
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self, listener: socket.socket) -> None:
        self._listener = listener
        self._thread.start()

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        assert not self._thread.is_alive()
        self.conn.close()

    def _send(self, event: lp.Event) -> None:
        assert self._sock is not None
        out = self.conn.send(event)
        self._sock.sendmsg([out.data], rights(out.fds))

    def _serve(self) -> None:
        try:
            sock, _ = self._listener.accept()
            self._sock = sock
            while True:
                data, ancillary, flags, _ = sock.recvmsg(65536, ancillary_space())
                fds = fds_from_ancillary(ancillary, flags)
                self.conn.receive_data(data, fds)
                if not data:
                    return
                while True:
                    event = self.conn.next_event()
                    if not isinstance(event, lp.Event):
                        break
                    self.received.append(event)
                    self._handle(event)
        except OSError:
            return  # the device model closed, or stop() shut the socket down
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def _handle(self, event: lp.Event) -> None:
        if isinstance(event, lp.Hello):
            self._send(self.conn.hello_reply("thread-lender"))
            for i in range(WINDOWS):
                self._send(lp.Grant(i + 1, i * GRANULE, GRANULE, i * GRANULE, RW, self.memfd))
                self._send(lp.Revoke(i + 1, lp.RevokeMode.EVICT))
            self.next_lease = WINDOWS + 1
        elif isinstance(event, lp.PageIn):
            assert self._sock is not None
            for start in range(event.offset, event.offset + event.length, GRANULE):
                lease = self.next_lease
                self.next_lease += 1
                self.lease_of[start] = lease
                self._send(lp.Grant(lease, start, GRANULE, start, RW, self.memfd))
                extra = self.then(lease)
                if extra:
                    self._sock.sendall(extra)
            self._send(lp.PageInDone(event.request_id, lp.PageInStatus.OK))


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = sealed_memfd(APERTURE)
    for i in range(WINDOWS):
        os.pwrite(fd, mark(i), i * GRANULE)
    yield fd
    os.close(fd)


async def test_an_answering_lender_is_caught_by_the_poll(tmp_path: Path, memfd: int) -> None:
    """Every fault is served inside the access's own poll: one PAGE_IN, GRANT handled in line,
    GRANT_ACK sent (after the access), contents right, no park."""
    poll = poll_with(1_000_000)
    async with thread_rig(tmp_path, poll) as r:
        lender = ThreadLender(memfd)
        lender.start(r.listener)
        try:
            await r.connected()
            for i in range(WINDOWS):
                assert await r.engine.read(i * GRANULE, 8) == mark(i)
            assert r.counters.page_in_poll_hits == WINDOWS
            assert r.counters.page_in_poll_misses == 0
            assert r.counters.page_ins == WINDOWS and r.counters.grants == 2 * WINDOWS
            assert all(w.state is WindowState.RESIDENT for w in r.engine.windows())
            # Every GRANT was acknowledged, in the order of the grants.
            await wait_until(lambda: len(acks(lender)) == 2 * WINDOWS)
            assert acks(lender) == list(range(1, 2 * WINDOWS + 1))
        finally:
            lender.stop()
        assert lender.error is None


async def test_messages_behind_the_grant_are_handled_in_order(tmp_path: Path, memfd: int) -> None:
    """A REVOKE of the previous lease right behind each GRANT: handled in the poll too, and
    REVOKED leaves after the GRANT_ACK of the grant before it, as the wire order says."""
    poll = poll_with(1_000_000)
    async with thread_rig(tmp_path, poll) as r:
        lender = ThreadLender(memfd)
        first = WINDOWS + 1  # the first lease a page-in gets
        lender.then = lambda lease: (
            lender.conn.send(lp.Revoke(lease - 1, lp.RevokeMode.EVICT)).data
            if lease > first
            else b""
        )
        lender.start(r.listener)
        try:
            await r.connected()
            for i in range(4):
                assert await r.engine.read(i * GRANULE, 8) == mark(i)
            await wait_until(
                lambda: sum(isinstance(e, lp.Revoked) for e in lender.received) == WINDOWS + 3
            )
            answers = [
                (type(e).__name__, e.lease_id - WINDOWS)
                for e in lender.received
                if isinstance(e, lp.GrantAck | lp.Revoked) and e.lease_id > WINDOWS
            ]
            assert answers == [
                ("GrantAck", 1),
                ("GrantAck", 2),
                ("Revoked", 1),
                ("GrantAck", 3),
                ("Revoked", 2),
                ("GrantAck", 4),
                ("Revoked", 3),
            ]
            states = [r.engine.window_at(i * GRANULE) for i in range(4)]
            assert [w.state if w else None for w in states] == [WindowState.EVICTED] * 3 + [
                WindowState.RESIDENT
            ]
            assert r.counters.page_in_poll_hits == 4
        finally:
            lender.stop()
        assert lender.error is None


async def test_what_follows_the_grant_waits_for_the_follow_up(tmp_path: Path, memfd: int) -> None:
    """The access returns at its GRANT: the PAGE_IN_DONE right behind it is not received
    before the guest's reply could go out, but by the follow-up the transport runs once it
    has (PageInPoll.follow_up); no trio checkpoint runs in between, so the reader could not
    have taken it."""
    poll = poll_with(1_000_000)
    async with thread_rig(tmp_path, poll) as r:
        lender = ThreadLender(memfd)
        lender.start(r.listener)
        try:
            await r.connected()
            for i in range(3):
                assert await r.engine.read(i * GRANULE, 8) == mark(i)
                # Still outstanding: the request ends with its PAGE_IN_DONE, not yet received.
                assert r.engine.outstanding_page_ins() == 1
                session = r.link._session
                assert session is not None
                # Block (no checkpoint) until the lender's PAGE_IN_DONE is there to read.
                readable, _, _ = select.select([session._raw], [], [], 10)
                assert readable
                poll.follow_up()
                assert r.engine.outstanding_page_ins() == 0
                poll.follow_up()  # nothing left: harmless
            assert r.counters.page_in_poll_hits == 3
            await wait_until(lambda: len(acks(lender)) == WINDOWS + 3)
        finally:
            lender.stop()
        assert lender.error is None


async def test_a_lender_breaking_the_protocol_inside_the_poll_ends_only_its_session(
    tmp_path: Path, memfd: int
) -> None:
    """A malformed message right behind the GRANT: the session ends where the poll met it, the
    access still gets its data (the grant served it first) and nothing raises into it."""
    poll = poll_with(1_000_000)
    async with thread_rig(tmp_path, poll) as r:
        lender = ThreadLender(memfd)
        lender.then = lambda lease: struct.pack("<HHII", 0xBEEF, 0, 4, 0)  # length < header
        lender.start(r.listener)
        try:
            await r.connected()
            assert await r.engine.read(0, 8) == mark(0)
            await wait_until(lambda: bool(r.link.last_end_reason))
            assert "protocol error" in r.link.last_end_reason
            # The session's leases went with it: the failure policy, not stale memory.
            assert await r.engine.read(0, 8) == ONES
        finally:
            lender.stop()


async def test_a_lender_in_the_same_loop_is_not_caught_and_the_budget_tunes(
    tmp_path: Path,
) -> None:
    """The scripted lender cannot answer while the loop spins: the poll misses, the access
    parks, the reader serves it, and the budget follows QEMU's rule (doubled: the answer came
    within the maximum)."""
    poll = poll_with(8, max_tries=1_000_000)
    async with lender_link_rig(tmp_path, poll=poll) as r:
        peer = await r.lender.session()
        fd = sealed_memfd(GRANULE)
        try:
            os.pwrite(fd, b"scripted", 0)
            await peer.grant(1, 0, GRANULE, fd, 0)
            await peer.revoke(1)
            async with trio.open_nursery() as nursery:
                got: list[bytes] = []

                async def access() -> None:
                    got.append(await r.engine.read(0, 8))

                nursery.start_soon(access)
                page_in = await peer.event()
                assert isinstance(page_in, lp.PageIn)
                await peer.send(lp.Grant(2, 0, GRANULE, 0, RW, fd))
                await peer.send(lp.PageInDone(page_in.request_id, lp.PageInStatus.OK))
            assert got == [b"scripted"]
            assert (r.counters.page_in_poll_hits, r.counters.page_in_poll_misses) == (0, 1)
            assert poll.budget_ns == 16_000
            assert await peer.event() == lp.GrantAck(2)
        finally:
            os.close(fd)


def acks(lender: ThreadLender) -> list[int]:
    return [e.lease_id for e in lender.received if isinstance(e, lp.GrantAck)]


async def wait_until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.001)
