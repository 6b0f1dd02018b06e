"""Window states and the one table of legal transitions (shared/DESIGN.md, "Lease model").

Every state change in the engine goes through `transition()`, so the table below is the whole
state machine: a change it does not list is a bug, raised as `IllegalTransition`.
"""

from __future__ import annotations

import enum
from typing import Final


class WindowState(enum.Enum):
    # Members are singletons: identity hashing (C) instead of Enum's hash of the name (a Python
    # call) for every TRANSITIONS lookup on the fault, grant and revoke paths.
    __hash__ = object.__hash__

    VACANT = "vacant"  # nothing lent (windows in this state are not stored)
    RESIDENT = "resident"  # lent and backed: accesses are served
    REVOKING = "revoking"  # the lender asked for it back: new accesses wait, then re-fault
    EVICTED = "evicted"  # taken back, contents kept by the lender: the next access pages in
    PAGING_IN = "paging-in"  # one PAGE_IN is out: every access to the window waits on it
    LOST = "lost"  # the lender failed or vanished: accesses get the failure policy


class Trigger(enum.Enum):
    __hash__ = object.__hash__  # as WindowState's

    GRANT = "grant"  # a GRANT covering the window was accepted
    REVOKE = "revoke"  # a REVOKE of the window's lease arrived
    REVOKED_EVICT = "revoked-evict"  # the revoke finished; contents kept by the lender
    REVOKED_RELEASE = "revoked-release"  # the revoke finished; the lease is gone
    RELEASE = "release"  # REVOKE(RELEASE) of a lease that holds no memory any more
    FAULT = "fault"  # an access touched an evicted window: PAGE_IN sent
    PAGE_IN_FAILED = "page-in-failed"  # PAGE_IN_DONE with an error (a deadline only fails accesses)
    LENDER_LOST = "lender-lost"  # the lender connection ended


S, T = WindowState, Trigger

TRANSITIONS: Final[dict[tuple[WindowState, Trigger], WindowState]] = {
    (S.VACANT, T.GRANT): S.RESIDENT,
    (S.RESIDENT, T.REVOKE): S.REVOKING,
    (S.RESIDENT, T.LENDER_LOST): S.LOST,
    (S.REVOKING, T.REVOKED_EVICT): S.EVICTED,
    (S.REVOKING, T.REVOKED_RELEASE): S.VACANT,
    (S.REVOKING, T.LENDER_LOST): S.LOST,
    (S.EVICTED, T.FAULT): S.PAGING_IN,
    (S.EVICTED, T.GRANT): S.RESIDENT,
    (S.EVICTED, T.RELEASE): S.VACANT,
    (S.EVICTED, T.REVOKE): S.EVICTED,  # evicting an evicted lease again changes nothing
    (S.EVICTED, T.LENDER_LOST): S.LOST,
    (S.PAGING_IN, T.GRANT): S.RESIDENT,
    (S.PAGING_IN, T.PAGE_IN_FAILED): S.EVICTED,
    (S.PAGING_IN, T.RELEASE): S.VACANT,
    (S.PAGING_IN, T.LENDER_LOST): S.LOST,
    (S.LOST, T.GRANT): S.RESIDENT,
    (S.LOST, T.LENDER_LOST): S.LOST,
}

# States whose window holds a live lease: a new grant must not overlap them.
LIVE: Final = frozenset({S.RESIDENT, S.REVOKING})


class IllegalTransition(Exception):
    """The engine tried a change the table does not allow: a bug, never a peer's fault."""


def transition(state: WindowState, trigger: Trigger) -> WindowState:
    try:
        return TRANSITIONS[(state, trigger)]
    except KeyError:
        raise IllegalTransition(f"{trigger.value} is not allowed in state {state.value}") from None
