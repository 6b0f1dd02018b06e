"""Property tests for the lease connections: hostile bytes, arbitrary chunking, fd ownership.

- Whatever bytes arrive, in whatever chunks, a connection yields events or LeaseProtocolError,
  nothing else, and how the bytes are chunked never changes what it yields.
- Valid streams, cut anywhere the kernel could cut them (fds arriving with any recvmsg whose
  last byte lies in their message), decode to exactly the messages that were sent, with each
  fd on its own GRANT.
- Every fd handed to a connection is either inside a delivered Grant or closed.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Mapping, Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st

import devmodel_wire.lease as lp
from devmodel.testing import fd_is_open
from devmodel_wire.lease.constants import HEADER_SIZE
from devmodel_wire.lease.wire import encode
from pyvfio_user.sansio import CLOSED, Sentinel
from tests.unit.lease_protocol_support import (
    GRANULE,
    RW,
    Failure,
    Outcome,
    borrower_hello,
    borrower_hello_sent,
    borrower_open,
    drain,
    fd_pool,
    feed_all,
    lender_hello,
    lender_open,
)

Conn = lp.BorrowerConnection | lp.LenderConnection
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- connections to attack --------------------------------------------------------------------


TARGETS: dict[str, Callable[[], Conn]] = {
    "borrower-hello-sent": borrower_hello_sent,
    "lender-start": lp.LenderConnection,
    "borrower-open": borrower_open,
    "lender-open": lender_open,
}
HELLO_PREFIX: dict[str, bytes] = {
    "borrower-hello-sent": encode(lender_hello()),
    "lender-start": encode(borrower_hello()),
    "borrower-open": b"",
    "lender-open": b"",
}

# -- streams ----------------------------------------------------------------------------------

TYPES = st.one_of(st.sampled_from([int(t) for t in lp.MsgType]), st.integers(0, 0xFFFF))
TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=20)
SMALL_IDS = st.one_of(st.integers(0, 4), st.integers(0, (1 << 64) - 1))


VALID_EVENTS: st.SearchStrategy[lp.Event] = st.one_of(
    st.builds(lp.Ping, SMALL_IDS),
    st.builds(lp.Pong, SMALL_IDS),
    st.builds(lp.GrantAck, SMALL_IDS),
    st.builds(lp.Revoked, SMALL_IDS),
    st.builds(lp.GrantNack, SMALL_IDS, st.integers(0, 300), TEXT),
    st.builds(lp.PageInDone, SMALL_IDS, st.integers(0, 300), TEXT),
    st.builds(lp.Revoke, SMALL_IDS, st.sampled_from(lp.RevokeMode)),
    st.builds(
        lp.PageIn,
        SMALL_IDS,
        st.integers(0, 1 << 30),
        st.integers(0, 1 << 30),
        st.sampled_from(lp.Access),
    ),
    st.builds(lp.Bye, st.integers(0, 300), TEXT),
    st.builds(lp.Error, TYPES, SMALL_IDS, st.integers(0, 300), TEXT),
    st.builds(
        lp.Grant,
        SMALL_IDS,
        st.integers(0, 1 << 40),
        st.integers(0, 1 << 40),
        st.integers(0, 1 << 40),
        st.integers(0, 7),
        st.just(0),
    ),
    st.just(lender_hello()),
    st.just(borrower_hello(features=1)),
)
"""Well-formed messages with ids that often match something outstanding, in any direction."""


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One message-like frame: a well-formed message, or a header of some type around the body
    of another or around noise, sometimes with a lying length field."""
    if draw(st.booleans()):
        return encode(draw(VALID_EVENTS))
    msg_type = draw(TYPES)
    msg_id = draw(SMALL_IDS)
    body = draw(
        st.one_of(VALID_EVENTS.map(lambda e: encode(e)[HEADER_SIZE:]), st.binary(max_size=80))
    )
    length = HEADER_SIZE + len(body)
    if draw(st.integers(0, 19)) == 0:
        length = draw(st.integers(0, 0xFFFF_FFFF))
    flags = draw(st.sampled_from([0, 0, 0, 0xFFFF]))
    return struct.pack("<HHIQ", msg_type, flags, length, msg_id) + body


STREAMS = st.one_of(
    st.binary(max_size=600),
    st.lists(frames(), max_size=12).map(b"".join),
)


def cut(data: bytes, points: Sequence[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(marks) if b > a]


STREAM_CASES: dict[str, st.SearchStrategy[object]] = {
    "target": st.sampled_from(sorted(TARGETS)),
    "prefix": st.booleans(),
    "data": STREAMS,
}
"""A connection to feed (by name), whether its session opens first, and the bytes."""


def _head(target: str, prefix: bool) -> list[tuple[bytes, list[int]]]:
    """The HELLO that opens the session of `target`, if `prefix` asks and it needs one."""
    return [(HELLO_PREFIX[target], [])] if prefix and HELLO_PREFIX[target] else []


def _run(target: str, prefix: bool, chunks: Sequence[bytes]) -> list[Outcome]:
    conn = TARGETS[target]()
    body: list[tuple[bytes, Sequence[int]]] = [(c, ()) for c in chunks]
    return feed_all(conn, [*_head(target, prefix), *body])


@PROPERTY
@given(
    **STREAM_CASES,
    points=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_any_bytes_any_chunks_only_events_or_protocol_errors(
    target: str, prefix: bool, data: bytes, points: list[int]
) -> None:
    whole = _run(target, prefix, [data] if data else [])
    chunked = _run(target, prefix, cut(data, points))
    assert chunked == whole
    # drain() re-raises anything that is not a LeaseProtocolError, so reaching here means
    # only events, sentinels and protocol errors came out. The stream ends in CLOSED or in
    # a fatal error, never in between.
    last = whole[-1]
    assert last is CLOSED or (isinstance(last, Failure) and last.fatal)
    for outcome in whole:  # coverage evidence: --hypothesis-show-statistics
        if isinstance(outcome, Failure):
            note_event(f"{target}: {'fatal' if outcome.fatal else 'refused'} {outcome.code!r}")
        elif not isinstance(outcome, Sentinel):
            note_event(f"{target}: {outcome.TYPE.name}")


@PROPERTY
@given(
    **STREAM_CASES,
    points=st.lists(st.integers(0, 10_000), max_size=20),
    fd_chunks=st.lists(st.tuples(st.integers(0, 50), st.integers(1, 3)), max_size=6),
)
def test_every_fd_is_either_handed_out_or_closed(
    target: str,
    prefix: bool,
    data: bytes,
    points: list[int],
    fd_chunks: list[tuple[int, int]],
) -> None:
    with fd_pool() as pool:
        chunks: list[tuple[bytes, list[int]]] = [(c, []) for c in cut(data, points)]
        given_fds: list[int] = []
        for index, count in fd_chunks:
            if chunks:
                fds = [pool.new() for _ in range(count)]
                chunks[index % len(chunks)][1].extend(fds)
                given_fds += fds
        conn = TARGETS[target]()
        outcomes: list[Outcome] = []
        for chunk, fds in _head(target, prefix) + chunks:  # all of them, also after a fatal error
            conn.receive_data(chunk, fds)
            outcomes += drain(conn)
        conn.close()
        handed_out = {e.fd for e in outcomes if isinstance(e, lp.Grant)}
        for fd in given_fds:
            assert fd_is_open(fd) == (fd in handed_out), (fd, outcomes)


# -- valid streams ----------------------------------------------------------------------------


def _draw_error(draw: st.DrawFn, outstanding: Mapping[int, set[int]], text: str = "") -> lp.Error:
    """An ERROR naming any type and id; a request it names that is still `outstanding` (ids by
    type) is answered by it, unless it is a DUPLICATE_ID refusal."""
    error = lp.Error(draw(TYPES), draw(SMALL_IDS), draw(st.sampled_from(lp.ErrorCode)), text)
    if error.code != lp.ErrorCode.DUPLICATE_ID:  # an ERROR answers the request it names
        outstanding.get(error.ref_type, set()).discard(error.ref_id)
    return error


@st.composite
def lender_script(draw: st.DrawFn, fd_source: Callable[[], int]) -> list[lp.Event]:
    """What a correct lender may send after HELLO, given that the borrower asked PAGE_IN 1..4
    and PING 1..2 (see `_borrower_reacts`)."""
    out: list[lp.Event] = [lender_hello()]
    next_lease = 1
    granted: list[int] = []
    revoking: set[int] = set()
    page_ins, pings = {1, 2, 3, 4}, {1, 2}
    outstanding: dict[int, set[int]] = {lp.MsgType.PAGE_IN: page_ins, lp.MsgType.PING: pings}
    token = 100
    for _ in range(draw(st.integers(0, 14))):
        choice = draw(st.sampled_from(["grant", "revoke", "done", "ping", "pong", "error"]))
        if choice == "grant":
            offset = draw(st.integers(0, 100)) * GRANULE
            out.append(lp.Grant(next_lease, offset, GRANULE, 0, RW, fd_source()))
            granted.append(next_lease)
            next_lease += draw(st.integers(1, 1000))
        elif choice == "revoke" and set(granted) - revoking:
            lease = draw(st.sampled_from(sorted(set(granted) - revoking)))
            revoking.add(lease)
            out.append(lp.Revoke(lease, draw(st.sampled_from(lp.RevokeMode))))
        elif choice == "done" and page_ins:
            request = draw(st.sampled_from(sorted(page_ins)))
            page_ins.discard(request)
            status = draw(st.sampled_from([*lp.PageInStatus, 77]))
            out.append(lp.PageInDone(request, status, draw(TEXT)))
        elif choice == "ping":
            out.append(lp.Ping(token))
            token += 1
        elif choice == "pong" and pings:
            out.append(lp.Pong(pings.pop()))
        elif choice == "error":
            out.append(_draw_error(draw, outstanding, "x"))
    if draw(st.booleans()):
        out.append(lp.Bye(lp.ByeReason.NORMAL, draw(TEXT)))
    return out


@st.composite
def borrower_script(draw: st.DrawFn) -> list[lp.Event]:
    """What a correct borrower may send, given that the lender granted leases 1..5, revoked
    1..2 and pinged 1..2 once it saw the HELLO (see `_lender_reacts`)."""
    out: list[lp.Event] = [borrower_hello(name="b")]
    grants, revokes, pings = {1, 2, 3, 4, 5}, {1, 2}, {1, 2}
    outstanding: dict[int, set[int]] = {
        lp.MsgType.GRANT: grants,
        lp.MsgType.REVOKE: revokes,
        lp.MsgType.PING: pings,
    }
    request = 1
    for _ in range(draw(st.integers(0, 14))):
        choice = draw(st.sampled_from(["answer", "revoked", "page_in", "ping", "pong", "err"]))
        if choice == "answer" and grants:
            lease = draw(st.sampled_from(sorted(grants)))
            grants.discard(lease)
            answer: lp.Event = lp.GrantAck(lease)
            if draw(st.booleans()):
                answer = lp.GrantNack(lease, draw(st.sampled_from(lp.NackReason)), draw(TEXT))
            out.append(answer)
        elif choice == "revoked" and revokes:
            out.append(lp.Revoked(revokes.pop()))
        elif choice == "page_in":
            offset = draw(st.integers(0, 127)) * GRANULE
            out.append(lp.PageIn(request, offset, GRANULE, draw(st.sampled_from(lp.Access))))
            request += draw(st.integers(1, 1 << 40))
        elif choice == "ping":
            out.append(lp.Ping(request))
            request += 1
        elif choice == "pong" and pings:
            out.append(lp.Pong(pings.pop()))
        elif choice == "err":
            out.append(_draw_error(draw, outstanding))
    if draw(st.booleans()):
        out.append(lp.Bye(lp.ByeReason.NORMAL))
    return out


def _borrower_reacts(conn: Conn, event: lp.Event) -> None:
    if isinstance(event, lp.Hello):
        for i in (1, 2, 3, 4):
            conn.send(lp.PageIn(i, 0, GRANULE, lp.Access.READ))
        conn.send(lp.Ping(1))
        conn.send(lp.Ping(2))


def _lender_reacts(conn: Conn, event: lp.Event) -> None:
    if isinstance(event, lp.Hello):
        assert isinstance(conn, lp.LenderConnection)
        conn.send(conn.hello_reply("l"))
        for lease in (1, 2, 3, 4, 5):
            conn.send(lp.Grant(lease, 0, GRANULE, 0, RW, 0))
        conn.send(lp.Revoke(1, lp.RevokeMode.EVICT))
        conn.send(lp.Revoke(2, lp.RevokeMode.RELEASE))
        conn.send(lp.Ping(1))
        conn.send(lp.Ping(2))


@st.composite
def kernel_chunks(draw: st.DrawFn, messages: list[lp.Event]) -> list[tuple[bytes, list[int]]]:
    """Cut the encoded stream as a Linux Unix stream socket could deliver it: anywhere, except
    that a recvmsg returning fds ends inside the message that carried them."""
    data = b""
    spans: list[tuple[int, int, list[int]]] = []
    for event in messages:
        raw = encode(event)
        fds = [event.fd] if isinstance(event, lp.Grant) else []
        spans.append((len(data), len(data) + len(raw), fds))
        data += raw
    points = set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=40)))
    points |= {end for _, end, fds in spans if fds}
    marks = sorted(points | {0, len(data)})
    chunks: list[tuple[bytes, list[int]]] = [
        (data[a:b], []) for a, b in itertools.pairwise(marks) if b > a
    ]
    ends = [b for a, b in itertools.pairwise(marks) if b > a]
    for start, end, fds in spans:
        if fds:
            candidates = [i for i, e in enumerate(ends) if start < e <= end]
            chunks[draw(st.sampled_from(candidates))][1].extend(fds)
    return chunks


def _deliver(
    conn: Conn, chunks: list[tuple[bytes, list[int]]], react: Callable[[Conn, lp.Event], None]
) -> list[lp.Event]:
    events: list[lp.Event] = []
    for data, fds in [*chunks, (b"", [])]:
        conn.receive_data(data, fds)
        while True:
            got = conn.next_event()
            if got is CLOSED:
                return events
            if isinstance(got, Sentinel):
                break
            react(conn, got)
            events.append(got)
    raise AssertionError("no CLOSED after the end of the stream")


@PROPERTY
@given(data=st.data())
def test_valid_lender_streams_survive_any_chunking(data: st.DataObject) -> None:
    with fd_pool() as pool:
        script = data.draw(lender_script(pool.new))
        chunks = data.draw(kernel_chunks(script))
        conn = lp.BorrowerConnection()
        conn.send(borrower_hello())
        assert _deliver(conn, chunks, _borrower_reacts) == script
        for event in script:
            if isinstance(event, lp.Grant):
                assert fd_is_open(event.fd)


@PROPERTY
@given(data=st.data())
def test_valid_borrower_streams_survive_any_chunking(data: st.DataObject) -> None:
    script = data.draw(borrower_script())
    chunks = data.draw(kernel_chunks(script))
    whole = lp.LenderConnection()
    assert _deliver(whole, [(b"".join(c for c, _ in chunks), [])], _lender_reacts) == script
    conn = lp.LenderConnection()
    assert _deliver(conn, chunks, _lender_reacts) == script


def test_drain_helper_reports_non_fatal_and_goes_on() -> None:
    conn = borrower_open()
    conn.receive_data(encode(lp.Pong(99)) + encode(lp.Pong(1)))
    seen = drain(conn)
    assert isinstance(seen[0], Failure) and not seen[0].fatal
    assert seen[1] == lp.Pong(1)
