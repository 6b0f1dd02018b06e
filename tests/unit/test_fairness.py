"""TimeSlice: the budget of continuous work a socket loop gets before it must yield to trio."""

from __future__ import annotations

import trio

from devmodel.fairness import TimeSlice


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


def test_a_slice_is_due_once_its_length_has_passed_and_restarts() -> None:
    clock = FakeClock()
    fair = TimeSlice(500, clock)
    assert not fair.due()
    clock.now += 499
    assert not fair.due()
    clock.now += 1
    assert fair.due()
    fair.restart()
    assert not fair.due()
    assert fair.deadline == clock.now + 500


async def test_maybe_yield_lets_other_tasks_run_only_when_due() -> None:
    clock = FakeClock()
    fair = TimeSlice(500, clock)
    ran: list[int] = []

    async def other() -> None:
        ran.append(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(100):
            await fair.maybe_yield()  # not due: no checkpoint, the other task never runs
        assert ran == [] and fair.yields == 0
        # Due at every call now: each yields (trio may order one batch either way, so the
        # other task runs within a yield or two).
        while not ran:
            clock.now += 500
            await fair.maybe_yield()
        assert ran == [1] and 1 <= fair.yields <= 3
        assert not fair.due()


async def test_a_yield_delivers_cancellation() -> None:
    fair = TimeSlice(0)
    with trio.CancelScope() as scope:
        scope.cancel()
        await fair.yield_now()
        raise AssertionError("not cancelled")  # pragma: no cover
    assert scope.cancelled_caught
