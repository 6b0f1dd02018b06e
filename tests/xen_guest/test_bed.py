"""bed.most_page_ins_at_once on made-up event streams: it runs in the main suite (no marker),
because the Xen suite's claim that two vCPUs waited at once rests on it and a boot is too dear
a place to find out it counts wrong."""

from __future__ import annotations

from typing import Any

from .bed import most_page_ins_at_once

MIB2 = 2 << 20


def requested(request: int, window: int) -> dict[str, Any]:
    return {"event": "PAGE_IN_REQUESTED",
            "data": {"request": request, "offset": window * MIB2, "length": MIB2}}


def granted(window: int) -> dict[str, Any]:
    return {"event": "LEASE_GRANTED",
            "data": {"lease": 100 + window, "offset": window * MIB2, "length": MIB2}}


def test_page_ins_one_after_another_never_overlap() -> None:
    events = [{"recording": True}, requested(1, 0), granted(0), requested(2, 3), granted(3),
              {"event": "LEASE_REVOKED", "data": {"lease": 103, "mode": "NORMAL"}},
              requested(3, 3), granted(3), {"ended": "ConnectionLost"}]
    assert most_page_ins_at_once(events) == 1


def test_a_second_request_before_the_first_grant_overlaps() -> None:
    events = [requested(1, 0), requested(2, 5), granted(5), granted(0)]
    assert most_page_ins_at_once(events) == 2


def test_a_grant_of_another_window_or_a_failure_ends_only_its_own() -> None:
    events = [requested(1, 0), granted(1), requested(2, 2),
              {"event": "PAGE_IN_FAILED", "data": {"request": 1, "reason": "deadline passed"}},
              requested(3, 4)]
    # Request 1 stayed open through the grant of window 1, so 1 and 2 overlapped; its failure
    # closed it before request 3, which overlaps only request 2.
    assert most_page_ins_at_once(events) == 2


def test_no_events_no_page_ins() -> None:
    assert most_page_ins_at_once([]) == 0
