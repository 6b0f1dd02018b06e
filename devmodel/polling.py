"""Adaptive polling: spin briefly on a socket before parking in trio, as QEMU's event loop does.

Parking a task in trio (`wait_readable`) and being woken again costs a pass through epoll and
the scheduler, which is a large part of a trapped access when the guest sends its next request
a few microseconds after the last reply. Trying the non-blocking receive again for a short
while first catches such a request without parking. The spin must pay for itself, so its budget
tunes itself the way QEMU's AioContext does (poll-max-ns, poll-grow, poll-shrink; util/aio-posix.c
`adjust_polling_time`), from how long each wait really lasted (spin plus park):

- the message came while spinning: the budget is right, keep it;
- it came after the budget but within the maximum: a longer spin would have caught it, so the
  budget doubles (from `POLL_INITIAL_NS` when it was 0), up to the maximum;
- it came after the maximum: no allowed spin would have caught it, so the budget halves, and
  below `POLL_INITIAL_NS` it becomes 0: a few such misses in a row and the loop parks at once.

An idle peer thus costs nothing (the loop parks; each spin that misses shrinks the budget), and
a peer that answers quickly gets caught without a park. The spin is bounded by the budget and is
continuous work as far as fairness goes (devmodel/fairness.py): it never delays another task
by more than the loop's time slice allows.

`AdaptivePoll` is pure logic around a clock and an `attempt` callable, so tests drive it with a
fake clock; the transport gives it its non-blocking receive.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter_ns
from typing import Final, TypeVar

from devmodel.counters import DeviceCounters

__all__ = [
    "DEFAULT_PAGE_IN_POLL_MAX_US",
    "DEFAULT_POLL_MAX_US",
    "MAX_POLL_MAX_US",
    "POLL_INITIAL_NS",
    "AdaptivePoll",
    "PageInPoll",
]

T = TypeVar("T")

POLL_INITIAL_NS: Final = 4_000
"""The first budget after 0 (QEMU's too): and below it, 0."""
DEFAULT_POLL_MAX_US: Final = 50
DEFAULT_PAGE_IN_POLL_MAX_US: Final = 100
"""A lender's GRANT comes later than a client's next request: the lender must be woken on its
own CPU and map or find the memory. An instant lender answers in 30-60 us on the test VMs."""
MAX_POLL_MAX_US: Final = 1_000
"""A spin longer than a millisecond would eat the loop's whole time slice (fairness.py)."""


class AdaptivePoll:
    """One socket's polling budget and the spin that uses it.

    Use: `got = poll.poll(attempt)`; if None, park until readable, receive, then `parked()`.
    Counters: `poll_hits` (a spin got a message), `poll_misses` (a spin ran out of budget) and
    `poll_ns` (time spent spinning: CPU time, since a spin never sleeps); PageInPoll keeps the
    same three under its own names.
    """

    __slots__ = ("_clock", "_started", "budget_ns", "counters", "max_ns")

    def __init__(
        self,
        max_ns: int,
        counters: DeviceCounters,
        clock: Callable[[], int] = perf_counter_ns,
    ) -> None:
        if max_ns < 0:
            raise ValueError("the polling budget cannot be negative")
        self.max_ns = max_ns
        self.budget_ns = 0
        self.counters = counters
        self._clock = clock
        self._started = 0

    def poll(self, attempt: Callable[[], T | None]) -> T | None:
        """Call `attempt` until it returns something or the budget is spent (None then).

        The wait starts now, whatever the budget: `parked()` measures from here.
        """
        clock = self._clock
        start = self._started = clock()
        budget = self.budget_ns
        if not budget:
            return None
        deadline = start + budget
        while True:
            got = attempt()
            now = clock()
            if got is not None:
                self._hit(now - start)
                return got
            if now >= deadline:
                self._missed(now - start)
                return None

    def _hit(self, spun_ns: int) -> None:
        c = self.counters
        c.poll_hits += 1
        c.poll_ns += spun_ns

    def _missed(self, spun_ns: int) -> None:
        c = self.counters
        c.poll_misses += 1
        c.poll_ns += spun_ns

    def parked(self) -> None:
        """The message came after a park: tune the budget to how long the whole wait took."""
        self.adjust(self._clock() - self._started)

    @property
    def clock(self) -> Callable[[], int]:
        """The clock the budget is kept in (what `parked_until` expects)."""
        return self._clock

    def parked_until(self, arrived_ns: int) -> None:
        """`parked`, when the message was received at `arrived_ns` (the clock's) by another
        task, and the waiter learns of it later."""
        self.adjust(arrived_ns - self._started)

    def adjust(self, waited_ns: int) -> None:
        """QEMU's rule (see the module): keep, grow or shrink the budget after a wait."""
        budget = self.budget_ns
        if waited_ns <= budget:
            return
        if waited_ns > self.max_ns:
            budget //= 2
            self.budget_ns = budget if budget >= POLL_INITIAL_NS else 0
        elif budget < self.max_ns:
            self.budget_ns = min(budget * 2 if budget else POLL_INITIAL_NS, self.max_ns)


class PageInPoll(AdaptivePoll):
    """The lender socket's poll while an access waits for a page-in (lender_link.py): the
    same budget and rule, counted in DeviceCounters' `page_in_poll_*`.

    It also carries the one piece of work such a poll puts off (`defer`, `follow_up`): a
    lender sends its PAGE_IN_DONE right behind the GRANT that answered the access, and
    receiving and handling it before the guest's reply would add ~20-30 us to every fault,
    while leaving it to the lender link's reader costs a wake-up of the event loop just when
    the guest sends its next access. So the poll returns at the GRANT, and the transport
    calls `follow_up` once that access's reply is out, before it waits for the next request
    (docs/performance.md, "The page-in poll").
    """

    __slots__ = ("_follow_up",)

    def __init__(
        self,
        max_ns: int,
        counters: DeviceCounters,
        clock: Callable[[], int] = perf_counter_ns,
    ) -> None:
        super().__init__(max_ns, counters, clock)
        self._follow_up: Callable[[], object] | None = None

    def defer(self, work: Callable[[], object]) -> None:
        """Run `work` at the next `follow_up` (one piece at a time: the latest wins)."""
        self._follow_up = work

    def follow_up(self) -> None:
        """The guest's reply is out: run what the poll put off, if anything (cheap if not)."""
        work = self._follow_up
        if work is not None:
            self._follow_up = None
            work()

    def _hit(self, spun_ns: int) -> None:
        c = self.counters
        c.page_in_poll_hits += 1
        c.page_in_poll_ns += spun_ns

    def _missed(self, spun_ns: int) -> None:
        c = self.counters
        c.page_in_poll_misses += 1
        c.page_in_poll_ns += spun_ns
