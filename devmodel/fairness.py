"""Time slices: how long a loop may work without letting trio run anything else.

trio is cooperative: a task runs until it awaits something that really waits. The loops that
serve sockets (vfio-user, the lender link, Xen's event channel) read without waiting as long as
there is something to read, because a wait per message would double the cost of a trapped
access. A peer that always has something to send (a guest streaming posted writes) would then
keep its loop running forever, and every other socket and deadline would starve: the lender
would wait seconds for REVOKED (docs/lease-protocol.md 9.3 bounds it) or a PONG (7.4).

So each such loop owns a `TimeSlice`: after `SLICE_NS` of continuous work it yields (a trio
checkpoint, which also delivers cancellation), and a real wait restarts the slice. A yield costs
one pass of trio's scheduler (tens of microseconds), so once a millisecond costs a busy loop a
few percent, and a loop that waits for its next message anyway (a guest doing trapped reads one
at a time) never pays it. A lender then waits at most a few slices per scheduler round its
request needs.

The hot paths read the clock themselves and compare it with `deadline` (one call and one
comparison per message); `yield_now` is the slow part, outside the hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter_ns
from typing import Final

import trio

__all__ = ["SLICE_NS", "TimeSlice"]

SLICE_NS: Final = 1_000_000
"""1 ms: at most this much continuous work before a loop lets the others run."""


class TimeSlice:
    """One loop's budget of continuous work; `perf_counter_ns() >= deadline` means yield now."""

    __slots__ = ("_clock", "deadline", "length_ns", "yields")

    def __init__(
        self, length_ns: int = SLICE_NS, clock: Callable[[], int] = perf_counter_ns
    ) -> None:
        self.length_ns = length_ns
        self._clock = clock
        self.deadline = clock() + length_ns
        # Yields forced by the slice (not counting real waits): for tests and debugging.
        self.yields = 0

    def restart(self) -> None:
        """The loop just waited (others ran meanwhile): a new slice starts now."""
        self.deadline = self._clock() + self.length_ns

    def due(self) -> bool:
        return self._clock() >= self.deadline

    async def yield_now(self) -> None:
        """Let every other ready task run once; Cancelled here if the loop is being stopped."""
        self.yields += 1
        self.restart()
        await trio.lowlevel.checkpoint()
        self.restart()

    async def maybe_yield(self) -> None:
        """`yield_now` if the slice is used up (for loops that are not per-access hot)."""
        if self._clock() >= self.deadline:
            await self.yield_now()
