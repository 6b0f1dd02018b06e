"""`BorrowerConnection.send_page_in` and `wire.encode_page_in` (the fault's one-call PAGE_IN)
against the generic `send(PageIn(...))` and `encode(PageIn(...))`: for any arguments and any
state the two give the same bytes, or the same error, and leave the same bookkeeping."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import devmodel_wire.lease as lp
from devmodel_wire.lease.constants import MAX_IN_FLIGHT
from devmodel_wire.lease.wire import encode, encode_page_in
from tests.unit.lease_protocol_support import (
    APERTURE,
    GRANULE,
    borrower_hello_sent,
    open_pair,
)

# Around the limits of every field: valid and aligned values, misaligned and out-of-range
# ones, and values that do not fit the wire's unsigned fields.
ids = st.one_of(st.integers(0, 8), st.sampled_from([2**64 - 1, 2**64, -1]))
offsets = st.one_of(
    st.integers(0, APERTURE // GRANULE).map(lambda n: n * GRANULE),
    st.integers(0, APERTURE + GRANULE),
    st.sampled_from([2**64 - GRANULE, 2**64, -GRANULE]),
)
lengths = st.one_of(
    st.integers(0, 4).map(lambda n: n * GRANULE),
    st.integers(0, 3 * GRANULE),
    st.sampled_from([2**64, -1]),
)
accesses = st.one_of(st.sampled_from(list(lp.Access)), st.integers(-1, 4), st.just(2**32))


def outcome(call: Callable[[], object]) -> tuple[str, object]:
    try:
        return "ok", call()
    except lp.LeaseProtocolError as exc:
        return "error", (str(exc), exc.fatal)


@given(ids, offsets, lengths, accesses)
def test_encode_page_in_is_encode_of_the_event(
    request_id: int, offset: int, length: int, access: int
) -> None:
    event = lp.PageIn(request_id, offset, length, access)  # type: ignore[arg-type]
    assert outcome(lambda: encode_page_in(request_id, offset, length, access)) == outcome(
        lambda: encode(event)
    )


def fresh(state: str, outstanding: int) -> lp.BorrowerConnection:
    """A borrower in `state`: OPEN with `outstanding` PAGE_INs 1.. already sent, or before the
    handshake ended (HELLO sent, none received)."""
    if state == "hello-sent":
        return borrower_hello_sent()
    conn, _ = open_pair()
    for i in range(1, outstanding + 1):
        conn.send(lp.PageIn(i, 0, GRANULE, lp.Access.READ))
    return conn


def bookkeeping(conn: lp.BorrowerConnection) -> object:
    return conn.state, conn.awaiting_answers(), conn.owed_answers()


@settings(max_examples=300)
@given(
    st.sampled_from(["open", "hello-sent"]),
    st.integers(0, 3),
    ids,
    offsets,
    lengths,
    accesses,
)
def test_send_page_in_is_send_of_the_event(
    state: str, outstanding: int, request_id: int, offset: int, length: int, access: int
) -> None:
    generic, fast = fresh(state, outstanding), fresh(state, outstanding)
    event = lp.PageIn(request_id, offset, length, access)  # type: ignore[arg-type]
    want = outcome(lambda: generic.send(event).data)
    got = outcome(lambda: fast.send_page_in(request_id, offset, length, access))
    assert got == want
    assert bookkeeping(fast) == bookkeeping(generic)


@pytest.mark.parametrize("fast", [False, True])
def test_the_in_flight_limit_holds_for_both(fast: bool) -> None:
    conn, _ = open_pair()
    for i in range(1, MAX_IN_FLIGHT + 1):
        conn.send_page_in(i, 0, GRANULE, lp.Access.READ)
    with pytest.raises(lp.LeaseProtocolError, match="already outstanding"):
        if fast:
            conn.send_page_in(MAX_IN_FLIGHT + 1, 0, GRANULE, lp.Access.READ)
        else:
            conn.send(lp.PageIn(MAX_IN_FLIGHT + 1, 0, GRANULE, lp.Access.READ))
