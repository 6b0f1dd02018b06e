"""AdaptivePoll: the self-tuned spin before a park (QEMU's poll-max-ns rule), on a fake clock."""

from __future__ import annotations

import pytest

from devmodel.counters import DeviceCounters
from devmodel.polling import POLL_INITIAL_NS, AdaptivePoll, PageInPoll

MAX = 50_000


class FakeClock:
    """Each read advances time by `step` ns, as a spinning loop would see it."""

    def __init__(self, step: int = 1_000) -> None:
        self.now = 0
        self.step = step

    def __call__(self) -> int:
        self.now += self.step
        return self.now


def poller(max_ns: int = MAX, step: int = 1_000) -> tuple[AdaptivePoll, FakeClock]:
    clock = FakeClock(step)
    return AdaptivePoll(max_ns, DeviceCounters(), clock), clock


def test_it_starts_off_and_grows_when_a_longer_spin_would_have_caught_the_message() -> None:
    poll, _ = poller()
    assert poll.budget_ns == 0
    poll.adjust(10_000)  # came after 10 us: within the max
    assert poll.budget_ns == POLL_INITIAL_NS
    poll.adjust(10_000)
    assert poll.budget_ns == 2 * POLL_INITIAL_NS
    poll.adjust(10_000)
    assert poll.budget_ns == 4 * POLL_INITIAL_NS  # 16 us >= 10 us now
    poll.adjust(10_000)
    assert poll.budget_ns == 4 * POLL_INITIAL_NS  # caught: the sweet spot, kept


def test_growth_stops_at_the_maximum() -> None:
    poll, _ = poller()
    for _ in range(20):
        poll.adjust(MAX - 1)
    assert poll.budget_ns == MAX


def test_misses_beyond_the_maximum_halve_it_then_turn_it_off() -> None:
    poll, _ = poller()
    poll.budget_ns = MAX
    seen = []
    for _ in range(5):
        poll.adjust(MAX + 1)  # an idle client: no allowed spin would have caught it
        seen.append(poll.budget_ns)
    assert seen == [25_000, 12_500, 6_250, 0, 0]  # below POLL_INITIAL_NS it is 0


def test_zero_max_never_polls() -> None:
    poll, _ = poller(max_ns=0)
    calls = []
    for waited in (0, 1, 10_000, 10**9):
        poll.adjust(waited)
        assert poll.poll(lambda: calls.append(1)) is None
    assert poll.budget_ns == 0 and calls == []


def test_a_spin_that_gets_a_message_counts_a_hit_and_its_time() -> None:
    poll, _ = poller(step=1_000)
    poll.budget_ns = 10_000
    attempts = iter([None, None, "message"])
    assert poll.poll(lambda: next(attempts)) == "message"
    c = poll.counters
    assert (c.poll_hits, c.poll_misses) == (1, 0)
    assert c.poll_ns == 3_000  # three attempts, a clock read after each
    assert poll.budget_ns == 10_000  # a hit keeps the budget


def test_a_spin_that_runs_out_counts_a_miss_and_stops_at_the_budget() -> None:
    poll, clock = poller(step=1_000)
    poll.budget_ns = 5_000
    attempts: list[int] = []

    def nothing() -> None:
        attempts.append(1)

    assert poll.poll(nothing) is None
    c = poll.counters
    assert (c.poll_hits, c.poll_misses) == (0, 1)
    assert len(attempts) == 5 and c.poll_ns == 5_000
    # The message then came after a park, 200 us after the wait began: beyond the max.
    clock.now += 200_000 - 6_000
    poll.parked()
    assert poll.budget_ns == 0  # 5 us halved is below POLL_INITIAL_NS: off


def test_a_park_that_was_short_grows_the_budget() -> None:
    poll, clock = poller(step=1_000)
    assert poll.poll(lambda: None) is None  # budget 0: no attempt, the wait starts now
    clock.now += 8_000
    poll.parked()
    assert poll.budget_ns == POLL_INITIAL_NS


def test_a_negative_maximum_is_refused() -> None:
    with pytest.raises(ValueError):
        AdaptivePoll(-1, DeviceCounters())


def test_the_page_in_poll_counts_under_its_own_names() -> None:
    counters = DeviceCounters()
    clock = FakeClock()
    poll = PageInPoll(MAX, counters, clock)
    poll.budget_ns = 3_000
    assert poll.poll(lambda: None) is None
    poll.budget_ns = 10_000
    assert poll.poll(lambda: "grant") == "grant"
    assert (counters.page_in_poll_hits, counters.page_in_poll_misses) == (1, 1)
    assert counters.page_in_poll_ns == 3_000 + 1_000
    assert (counters.poll_hits, counters.poll_misses, counters.poll_ns) == (0, 0, 0)


def test_a_park_is_judged_by_when_the_answer_arrived_not_when_the_waiter_woke() -> None:
    """The access learns of its GRANT after the reader handled it and the scheduler ran it:
    only the arrival says whether a longer spin would have caught it."""
    poll, clock = poller()
    assert poll.poll(lambda: None) is None  # budget 0: the wait starts at once
    arrived = clock() + 20_000  # within the maximum ...
    clock.now = arrived + 200_000  # ... though the waiter woke far beyond it
    poll.parked_until(arrived)
    assert poll.budget_ns == POLL_INITIAL_NS
    assert poll.clock is clock


def test_the_page_in_poll_runs_what_it_put_off_once() -> None:
    """`follow_up` runs the work `defer` left, once; the latest deferral wins; nothing left
    is nothing done."""
    poll = PageInPoll(MAX, DeviceCounters(), FakeClock())
    ran: list[str] = []
    poll.follow_up()  # nothing deferred: nothing happens
    poll.defer(lambda: ran.append("first"))
    poll.defer(lambda: ran.append("second"))
    poll.follow_up()
    poll.follow_up()
    assert ran == ["second"]
