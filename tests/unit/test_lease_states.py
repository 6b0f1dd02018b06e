"""The window state table (devmodel/leases/states.py), every (state, trigger) pair.

The expected table below is written out independently of the code from shared/DESIGN.md
("Lease model") and docs/lease-protocol.md section 9. Invariants it encodes:

- LIVE = {RESIDENT, REVOKING}: the states in which the window holds a lease's fd. A grant may
  never land on them (OVERLAPS_LIVE_LEASE), so GRANT is legal only from VACANT, EVICTED,
  PAGING_IN and LOST.
- A live window leaves LIVE only through the revoke path (REVOKE, then REVOKED_EVICT or
  REVOKED_RELEASE) or because the lender vanished (LENDER_LOST): nothing else can take its fd.
- Only an EVICTED window faults (sends a PAGE_IN); a PAGING_IN window ends by a GRANT, a failed
  page-in (back to EVICTED, so the next access asks again), a RELEASE, or LENDER_LOST.
- LENDER_LOST is legal in every stored state (everything but VACANT, which is not stored) and
  always ends in LOST; a LOST window leaves LOST only through a new GRANT.
- Every state is reachable from VACANT and every state can get back to RESIDENT (no dead end).
"""

from __future__ import annotations

import itertools

import pytest

from devmodel.leases.states import (
    LIVE,
    TRANSITIONS,
    IllegalTransition,
    Trigger,
    WindowState,
    transition,
)

S, T = WindowState, Trigger

EXPECTED: dict[tuple[WindowState, Trigger], WindowState] = {
    (S.VACANT, T.GRANT): S.RESIDENT,
    (S.RESIDENT, T.REVOKE): S.REVOKING,
    (S.RESIDENT, T.LENDER_LOST): S.LOST,
    (S.REVOKING, T.REVOKED_EVICT): S.EVICTED,
    (S.REVOKING, T.REVOKED_RELEASE): S.VACANT,
    (S.REVOKING, T.LENDER_LOST): S.LOST,
    (S.EVICTED, T.FAULT): S.PAGING_IN,
    (S.EVICTED, T.GRANT): S.RESIDENT,
    (S.EVICTED, T.RELEASE): S.VACANT,
    (S.EVICTED, T.REVOKE): S.EVICTED,
    (S.EVICTED, T.LENDER_LOST): S.LOST,
    (S.PAGING_IN, T.GRANT): S.RESIDENT,
    (S.PAGING_IN, T.PAGE_IN_FAILED): S.EVICTED,
    (S.PAGING_IN, T.RELEASE): S.VACANT,
    (S.PAGING_IN, T.LENDER_LOST): S.LOST,
    (S.LOST, T.GRANT): S.RESIDENT,
    (S.LOST, T.LENDER_LOST): S.LOST,
}

ALL_PAIRS = list(itertools.product(WindowState, Trigger))


def _id(pair: tuple[WindowState, Trigger]) -> str:
    return f"{pair[0].name}-{pair[1].name}"


def test_table_is_exactly_the_expected_one() -> None:
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize("pair", [p for p in ALL_PAIRS if p in EXPECTED], ids=_id)
def test_allowed_transition_goes_where_the_table_says(
    pair: tuple[WindowState, Trigger],
) -> None:
    state, trigger = pair
    assert transition(state, trigger) is EXPECTED[pair]


@pytest.mark.parametrize("pair", [p for p in ALL_PAIRS if p not in EXPECTED], ids=_id)
def test_every_other_pair_raises_illegal_transition(pair: tuple[WindowState, Trigger]) -> None:
    state, trigger = pair
    with pytest.raises(IllegalTransition) as info:
        transition(state, trigger)
    # The message names both, for the log of a bug report.
    assert trigger.value in str(info.value)
    assert state.value in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_pair_count() -> None:
    # 6 states x 8 triggers: the parametrized tests above cover all 48 pairs.
    assert len(ALL_PAIRS) == 48
    assert len(EXPECTED) == 17


def test_live_states() -> None:
    assert frozenset({S.RESIDENT, S.REVOKING}) == LIVE


def test_grant_never_lands_on_a_live_window() -> None:
    for state in WindowState:
        assert ((state, T.GRANT) in TRANSITIONS) == (state not in LIVE)
        if state not in LIVE:
            assert transition(state, T.GRANT) is S.RESIDENT


def test_live_windows_leave_only_through_the_revoke_path_or_lender_loss() -> None:
    leaving = {T.REVOKE, T.REVOKED_EVICT, T.REVOKED_RELEASE, T.LENDER_LOST}
    for (state, trigger), target in TRANSITIONS.items():
        if state in LIVE and target not in LIVE:
            assert trigger in leaving
        if target in LIVE and state not in LIVE:
            assert trigger is T.GRANT  # the only way memory becomes reachable


def test_only_evicted_windows_fault() -> None:
    assert [s for s, t in TRANSITIONS if t is T.FAULT] == [S.EVICTED]


def test_lender_lost_is_legal_everywhere_stored_and_ends_in_lost() -> None:
    for state in WindowState:
        if state is S.VACANT:
            assert (state, T.LENDER_LOST) not in TRANSITIONS
        else:
            assert transition(state, T.LENDER_LOST) is S.LOST
    assert {t for (s, t) in TRANSITIONS if s is S.LOST} == {T.GRANT, T.LENDER_LOST}


def test_page_in_failure_goes_back_to_evicted() -> None:
    # So that the next access sends a new PAGE_IN rather than failing forever.
    assert transition(S.PAGING_IN, T.PAGE_IN_FAILED) is S.EVICTED


def test_every_trigger_is_used() -> None:
    assert {t for _, t in TRANSITIONS} == set(Trigger)


def _reachable(start: WindowState) -> set[WindowState]:
    seen = {start}
    todo = [start]
    while todo:
        state = todo.pop()
        for (s, _), target in TRANSITIONS.items():
            if s is state and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_state_is_reachable_from_vacant() -> None:
    assert _reachable(S.VACANT) == set(WindowState)


def test_no_dead_end() -> None:
    for state in WindowState:
        assert S.RESIDENT in _reachable(state) or state is S.RESIDENT
