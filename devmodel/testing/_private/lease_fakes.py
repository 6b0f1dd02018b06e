"""Lease engine fakes: a LenderPort that records PAGE_INs; tasks whose outcome a test reads.

`FakeLender` is the lender side as the engine sees it: it records every PAGE_IN the engine
sends and lets a test answer them (grant a range from any memfd, then PAGE_IN_DONE), either by
hand, inline (an in-process lender answering inside `send_page_in`, like BuiltinLender), or from
a task (`serve`). It hands out strictly increasing lease ids as the protocol requires, and keeps
its own copy of every fd it grants so tests can look at (and poison) the lender's memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from devmodel.counters import DeviceCounters
from devmodel.leases.engine import EngineConfig, LeaseEngine
from devmodel.leases.policy import FailurePolicy
from devmodel_wire.lease.constants import PROT_READ, PROT_WRITE, Access, PageInStatus, RevokeMode

PAGE = 4096
RW = PROT_READ | PROT_WRITE
RO = PROT_READ


def pattern(seed: int, length: int) -> bytes:
    """Deterministic, position-dependent bytes: a misplaced read cannot match by accident."""
    unit = bytes((seed * 131 + i * 7 + (i >> 8)) & 0xFF for i in range(256))
    reps = -(-length // len(unit))
    return (unit * reps)[:length]


def make_engine(
    size: int = 1 << 20,
    granule: int = PAGE,
    *,
    policy: FailurePolicy = FailurePolicy.ALL_ONES,
    page_in_timeout: float = 2.0,
    revoke_timeout: float = 2.0,
    max_leases: int = 1 << 22,
) -> LeaseEngine:
    config = EngineConfig(page_in_timeout, revoke_timeout, policy, max_leases)
    return LeaseEngine(size, granule, DeviceCounters(), config)


@dataclass(frozen=True, slots=True)
class RecordedPageIn:
    request_id: int
    offset: int
    length: int
    access: Access


Answer = Callable[["FakeLender", RecordedPageIn], object]


class FakeLender:
    """A LenderPort that records PAGE_INs; tests answer them by granting and PAGE_IN_DONE."""

    def __init__(
        self,
        engine: LeaseEngine,
        *,
        reachable: bool = True,
        inline: Answer | None = None,
        answers_later: bool = False,
    ) -> None:
        self.engine = engine
        engine.port = self
        self.reachable = reachable
        # LenderPort: True to be asked from the fast path's miss, as a socket lender is (only
        # without `inline`: an inline answer comes inside the call).
        if answers_later and inline is not None:
            raise ValueError("an inline lender answers inside send_page_in, not later")
        self.answers_later = answers_later
        # Called inside send_page_in: an in-process lender that answers at once.
        self.inline = inline
        self.page_ins: list[RecordedPageIn] = []
        self.unanswered: list[RecordedPageIn] = []
        self.granted: list[int] = []  # lease ids the engine accepted, in order
        self.next_lease = 1
        self._arrival: trio.Event | None = None
        self._own: list[int] = []  # fds this lender opened; closed by close()

    # ---------------------------------------------------------------- LenderPort

    def send_page_in(self, request_id: int, offset: int, length: int, access: Access) -> bool:
        pi = RecordedPageIn(request_id, offset, length, access)
        self.page_ins.append(pi)
        if not self.reachable:
            return False
        self.unanswered.append(pi)
        if self.inline is not None and self.answers_later:
            # The engine books an early PAGE_IN after this returns (LenderPort.answers_later):
            # an answer inside the call would come before it.
            raise AssertionError("an inline lender cannot answer later: set answers_later")
        if self._arrival is not None:
            self._arrival.set()
            self._arrival = None
        if self.inline is not None:
            self.inline(self, pi)
        return True

    # ---------------------------------------------------------------- lender actions

    def own(self, fd: int) -> int:
        """Let the lender close `fd` in close()."""
        self._own.append(fd)
        return fd

    def grant(
        self,
        offset: int,
        length: int,
        fd: int,
        fd_offset: int | None = None,
        prot: int = RW,
        flags: int = 0,
    ) -> int:
        """GRANT a dup of `fd` (the lender keeps `fd`); raises GrantRefused like the engine."""
        lease = self.next_lease
        self.next_lease += 1
        self.engine.grant(
            lease,
            offset,
            length,
            offset if fd_offset is None else fd_offset,
            prot,
            os.dup(fd),
            flags,
        )
        self.granted.append(lease)
        return lease

    def take(self, request_id: int | None = None) -> RecordedPageIn:
        """Remove an unanswered PAGE_IN (the oldest, or the one with `request_id`)."""
        for i, pi in enumerate(self.unanswered):
            if request_id is None or pi.request_id == request_id:
                return self.unanswered.pop(i)
        raise AssertionError(f"no unanswered PAGE_IN {request_id}")

    def answer(
        self,
        pi: RecordedPageIn,
        fd: int,
        fd_offset: int | None = None,
        prot: int = RW,
        status: int = PageInStatus.OK,
    ) -> int:
        """Grant the requested range from `fd`, then PAGE_IN_DONE; returns the new lease id."""
        if pi in self.unanswered:
            self.unanswered.remove(pi)
        lease = self.grant(pi.offset, pi.length, fd, fd_offset, prot)
        self.engine.page_in_done(pi.request_id, status)
        return lease

    def fail(self, pi: RecordedPageIn, status: int) -> None:
        if pi in self.unanswered:
            self.unanswered.remove(pi)
        self.engine.page_in_done(pi.request_id, status)

    async def next_page_in(self) -> RecordedPageIn:
        while not self.unanswered:
            self._arrival = trio.Event()
            await self._arrival.wait()
        return self.unanswered.pop(0)

    async def serve(self, home: int, *, evict_after_grant: bool = False) -> None:
        """Answer every PAGE_IN from `home` (fd_offset = aperture offset), forever.

        With `evict_after_grant` the lender takes every lease back (EVICT) right after granting
        it, before PAGE_IN_DONE: the hostile pattern the forward-progress rule is about.
        """
        while True:
            pi = await self.next_page_in()
            lease = self.grant(pi.offset, pi.length, home)
            if evict_after_grant:
                await self.engine.revoke(lease, RevokeMode.EVICT)
            self.engine.page_in_done(pi.request_id, PageInStatus.OK)

    def close(self) -> None:
        for fd in self._own:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._own.clear()


def answer_from(home: int) -> Answer:
    """An inline answer: grant the range from `home` at fd_offset = aperture offset."""

    def answer(lender: FakeLender, pi: RecordedPageIn) -> None:
        lender.answer(pi, home)

    return answer


class Box:
    """The outcome of a task started with `spawn`: its return value or its exception."""

    def __init__(self) -> None:
        self.done = False
        self.value: object = None
        self.error: BaseException | None = None
        self.finished_at = -1.0

    def get(self) -> object:
        assert self.done, "the task has not finished"
        if self.error is not None:
            raise self.error
        return self.value


def spawn(nursery: trio.Nursery, fn: Callable[..., Awaitable[object]], *args: object) -> Box:
    """Run `fn(*args)` in `nursery`, recording its outcome (exceptions included) in a Box."""
    box = Box()

    async def run() -> None:
        try:
            box.value = await fn(*args)
        except Exception as exc:
            box.error = exc
        box.finished_at = trio.current_time()
        box.done = True

    nursery.start_soon(run)
    return box


def hold_unmaps(engine: LeaseEngine) -> trio.Event:
    """Make every unmap of `engine` wait, like a stuck hypervisor, until the returned event
    is set."""
    release = trio.Event()

    async def held_unmap(start: int, length: int) -> None:
        await release.wait()

    engine.unmap_hooks.append(held_unmap)
    return release


def delay_unmaps(engine: LeaseEngine, seconds: float) -> None:
    """Make every unmap of `engine` take `seconds`, like a slow hypervisor."""

    async def slow_unmap(start: int, length: int) -> None:
        await trio.sleep(seconds)

    engine.unmap_hooks.append(slow_unmap)
