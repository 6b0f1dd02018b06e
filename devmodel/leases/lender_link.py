"""The lender link: the lease protocol (docs/lease-protocol.md) over the lender's unix socket.

The link is the only place where the lender's bytes meet the device model, so it is built to
survive any lender: every ProtocolError, OSError or deadline ends only the current connection,
`LeaseEngine.lender_lost()` drops every lease of it, and the link reconnects with exponential
backoff for as long as the device model runs. The guest meanwhile sees the failure policy for
lent ranges and nothing worse; a restarted lender simply grants again.

One connection is one `_Session`: a reader (the main loop, which handles messages strictly in
order, as the specification's ordering rules require), a writer draining an outbound queue,
a keepalive, and a task per REVOKE that must await a transport's unmap hook (a REVOKE with
none is done by the reader itself, in order). Sending never awaits: `send` writes at once when
nothing is queued (PONG, REVOKED and GRANT_ACK leave from the reader, PAGE_IN from the guest
access that asked for it, with no hand-off between tasks), and queues for the writer what the
socket does not take. The queue is bounded by pausing the reader while it is long, and the
writer has a deadline, so a lender that stops reading cannot make the device model buffer
without limit.

Every wait has a deadline: connecting, the lender's HELLO, each write, each revoke, and the
idle read, which the keepalive bounds by pinging a silent lender.

The reader handles everything one receive brought before it receives again; a lender that
sends a buffer full of messages gets a time slice for them (devmodel/fairness.py), after which
the reader yields, so a chatty lender cannot hold up the guest's accesses either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import Final

import trio

from devmodel.fairness import TimeSlice
from devmodel.leases.backing import GrantRefused
from devmodel.leases.engine import LeaseEngine, UnknownLease
from devmodel.leases.grant_checks import check_grant_fd_key
from devmodel.polling import PageInPoll
from devmodel.ratelimit import RateLimitedLogger
from devmodel.unixfds import (
    MSG_CMSG_CLOEXEC,
    MSG_DONTWAIT,
    FdsTruncated,
    ancillary_space,
    fds_from_ancillary,
)
from devmodel_wire.lease import (
    Access,
    BorrowerConnection,
    Bye,
    ByeReason,
    Error,
    ErrorCode,
    Event,
    Grant,
    GrantAck,
    GrantNack,
    Hello,
    LeaseProtocolError,
    MsgType,
    NackReason,
    PageInDone,
    PageInStatus,
    Ping,
    Pong,
    Revoke,
    Revoked,
    State,
)
from devmodel_wire.lease.checks import check_grant
from devmodel_wire.lease.connection import clip
from devmodel_wire.lease.constants import (
    FEATURES_KNOWN,
    GRANT_FD_KIND_MASK,
    MAX_NAME_BYTES,
    FdKind,
    code_name,
)
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA

log = logging.getLogger("devmodel.lender")

RECV_BUFFER: Final = 64 << 10
# The specification asks for room for at least 4 fds per recvmsg; more costs nothing.
MAX_FDS_PER_RECV: Final = 16
ANCILLARY_SPACE: Final = ancillary_space(MAX_FDS_PER_RECV)
_RECV_FLAGS: Final = MSG_CMSG_CLOEXEC | MSG_DONTWAIT  # ints: an IntFlag `|` costs ~0.5 us
# The reader stops reading while this much is waiting to be written (answers pile up only when
# the lender does not read them).
OUTBOUND_HIGH_WATER: Final = 1 << 20
# A revoke is bounded by the engine's own revoke timeout; this is the margin on top after which
# the link gives up on the connection (it never sends REVOKED early).
REVOKE_MARGIN: Final = 1.0
HELLO_MAX_LEASES: Final = 0xFFFFFFFF

__all__ = ["ANCILLARY_SPACE", "MAX_FDS_PER_RECV", "LenderLink"]


class _Ended(Exception):
    """Why a connection ended, and the BYE to send before closing it (None: send nothing)."""

    def __init__(self, reason: str, bye: Bye | None = None, *, lost: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bye = bye
        # False when this side ended it on purpose: not counted or reported as a lost lender.
        self.lost = lost


class LenderLink:
    """Keeps one lender connection alive for one device model; the engine's `LenderPort`.

    `run()` never returns on its own; cancel it to stop (a BYE is then sent, best effort, once
    every lease has been dropped, as section 6.5 requires of a borrower).
    """

    def __init__(
        self,
        engine: LeaseEngine,
        path: str,
        guest_id: int,
        *,
        name: str = "devmodel",
        reconnect_min: float = 0.05,
        reconnect_max: float = 2.0,
        connect_timeout: float = 2.0,
        hello_timeout: float = 2.0,
        write_timeout: float = 2.0,
        ping_interval: float = 5.0,
        ping_timeout: float = 2.0,
        bye_timeout: float = 0.2,
        features: int = FEATURES_KNOWN,
        poll: PageInPoll | None = None,
    ) -> None:
        if not 0 < reconnect_min <= reconnect_max:
            raise ValueError("need 0 < reconnect_min <= reconnect_max")
        self.engine = engine
        self.path = path
        self.guest_id = guest_id
        self.name = clip(name, MAX_NAME_BYTES)
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.connect_timeout = connect_timeout
        self.hello_timeout = hello_timeout
        self.write_timeout = write_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.bye_timeout = bye_timeout
        # Offered in HELLO: every feature this side implements (dma-buf grants included),
        # unless a test plays a borrower without them.
        self.features = features
        # Sessions whose handshake completed, and connections attempted: for logs and tests.
        self.sessions = 0
        self.attempts = 0
        self.last_end_reason = ""
        self._session: _Session | None = None
        self._last_failure = ""
        self._log = RateLimitedLogger(log)
        engine.port = self
        # Polling for the answer to a page-in from the access that waits for it (see
        # `poll_answer`); None: such an access always parks.
        self.poll = poll
        if poll is not None:
            engine.answer_poller = self

    @property
    def connected(self) -> bool:
        """True while a session is open (handshake done, not failed)."""
        s = self._session
        return s is not None and s.usable

    # ------------------------------------------------------------------ LenderPort

    answers_later = True
    """The lender's answers come over the socket, read after `send_page_in` returns."""

    def send_page_in(self, request_id: int, offset: int, length: int, access: Access) -> bool:
        s = self._session
        if s is None or not s.usable:
            return False
        try:
            s.send_page_in(request_id, offset, length, access)
        except LeaseProtocolError as exc:
            self._log.warning("cannot ask the lender for a page-in: %s", exc)
            return False
        return True

    def poll_answer(self, done: Callable[[], bool]) -> bool:
        """Spin on the lender's socket for the polling budget, handling what comes in, until
        `done()`; False if it did not come in time (the access then parks as before).

        Called by an access that has just sent a PAGE_IN and would otherwise park until the
        GRANT: trio would idle the CPU, the GRANT would wake it, and two scheduler passes
        (the reader, then the access) would follow before the guest's reply. A lender that
        answers at once does so within tens of microseconds; catching its GRANT here serves
        the access in its own task (docs/performance.md, "The lease path"). The messages are
        handled exactly as the reader handles them, in order, and only while the reader waits
        for the socket with nothing half done (`_Session.poll_answer`).
        """
        s = self._session
        poll = self.poll
        if s is None or poll is None or not s.usable:
            return False
        return poll.poll(lambda: s.poll_answer(done)) is not None

    def answer_parked(self) -> None:
        """The answer came after the access parked: tune the budget (AdaptivePoll.parked)."""
        s = self._session
        if self.poll is not None and s is not None:
            self.poll.parked_until(s.received_ns)

    # ------------------------------------------------------------------ connection loop

    async def run(self) -> None:
        delay = self.reconnect_min
        while True:
            opened = await self._connect_once()
            if opened:
                delay = self.reconnect_min
            # Jitter spreads the reconnects of many device models after a lender restart.
            await trio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.reconnect_max)

    async def _connect_once(self) -> bool:
        """One connection from connect to close; True if its handshake completed."""
        self.attempts += 1
        try:
            # The stdlib socket stays at hand: the session writes to it without awaiting when
            # nothing is queued (`_Session.send`); trio makes it non-blocking.
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            self._note_failure(f"cannot create a socket: {exc.strerror}")
            return False
        sock = trio.socket.from_stdlib_socket(raw)
        session = _Session(self, sock, raw)
        # What a cancellation (the device model stopping) leaves in place: a polite BYE.
        ended = _Ended(
            "the device model is stopping", Bye(ByeReason.NORMAL, "stopping"), lost=False
        )
        try:
            try:
                with trio.fail_after(self.connect_timeout):
                    await sock.connect(self.path)
            except (OSError, trio.TooSlowError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "timed out"
                self._note_failure(f"cannot connect to the lender at {self.path}: {why}")
                ended = _Ended("not connected")
                return False
            session.connected = True
            ended = await session.run()
        finally:
            with trio.CancelScope(shield=True):
                await self._teardown(session, ended)
        return session.opened

    def _note_failure(self, why: str) -> None:
        # Say it once at warning level; repeating it every backoff step would flood the log.
        if why != self._last_failure:
            log.warning("%s; retrying", why)
            self._last_failure = why
        else:
            log.debug("%s; retrying", why)

    async def _teardown(self, session: _Session, ended: _Ended) -> None:
        if self._session is session:
            self._session = None
        if session.opened:
            # Drop every lease (fds closed) before anything else, BYE included (section 6.5).
            self.engine.lender_lost(counted=ended.lost)
            self.last_end_reason = ended.reason
            stopping = ended.bye is not None and ended.bye.reason == ByeReason.NORMAL
            log.log(
                logging.INFO if stopping else logging.WARNING,
                "lender connection ended: %s",
                ended.reason,
            )
        elif session.connected:
            self._note_failure(f"lender handshake failed: {ended.reason}")
        if ended.bye is not None and session.connected:
            await session.say_bye(ended.bye)
        session.close()


class _Session:
    """One connection to the lender; everything in it ends with it."""

    def __init__(self, link: LenderLink, sock: trio.socket.SocketType, raw: socket.socket) -> None:
        self.link = link
        self.engine = link.engine
        self.sock = sock
        self._raw = raw  # the same socket, for the writes `send` makes without awaiting
        self.conn = BorrowerConnection()
        self.connected = False
        self.opened = False
        self.failure: _Ended | None = None
        self._nursery: trio.Nursery | None = None
        # Outbound bytes: the writer takes from `_out`; `_inflight` is what it is writing now.
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._inflight = memoryview(b"")
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        # trio's clock itself: its `current_time` is `trio.current_time` without the two
        # calls in between, on every message received (a MockClock in tests all the same).
        self._trio_clock = trio.lowlevel.current_clock()
        self._last_heard = self._trio_clock.current_time()
        self._heard = trio.Event()
        # The GRANT shape check's session terms (`check_grant`), fixed by the handshake.
        self._aperture_size = 0
        self._granule = 0
        self._features = 0
        self._next_token = 1
        self._slice = TimeSlice()
        # The lease ids of GRANT_ACKs held back until the accesses their grant served have
        # run (ids: the event is built once the access is answered, not while it waits).
        self._after_served: list[int] = []
        # The same, of grants `poll_answer` handled, not yet encoded: the writer's next turn
        # or the next `send`, whichever comes first, encodes them ahead of its own bytes.
        self._held: list[int] = []
        # The reader is parked on the empty socket with every event handled: only then may an
        # access handle the lender's messages itself (`poll_answer`).
        self._idle = False
        # When the last receive returned, on the polling budget's clock: when the answer to a
        # parked access came (LenderLink.answer_parked).
        self._clock = link.poll.clock if link.poll is not None else perf_counter_ns
        self.received_ns = 0

    @property
    def usable(self) -> bool:
        return self.opened and self.failure is None and self.conn.state is State.OPEN

    # ------------------------------------------------------------------ structure

    async def run(self) -> _Ended:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._guarded, self._writer)
            nursery.start_soon(self._guarded, self._reader)
        assert self.failure is not None  # the reader only ever ends by ending the session
        return self.failure

    def end(self, ended: _Ended) -> None:
        if self.failure is None:
            self.failure = ended
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _guarded(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run one task of the session; whatever it raises ends the session, not the process."""
        try:
            await fn(*args)
        except Exception as exc:
            self._end_from(exc)

    def _end_from(self, exc: BaseException) -> None:
        """End the session for what a task of it raised (anything but an Exception: re-raised)."""
        if isinstance(exc, _Ended):
            self.end(exc)
        elif isinstance(exc, ProtocolError):
            reply = getattr(exc, "reply", None)
            self.end(_Ended(f"protocol error: {exc}", reply if isinstance(reply, Bye) else None))
        elif isinstance(exc, OSError):
            self.end(_Ended(f"socket error: {exc.strerror or exc}"))
        elif isinstance(exc, Exception):
            # A bug, possibly provoked by a lender: log it fully but keep the device model up.
            log.exception("internal error in the lender link", exc_info=exc)
            text = clip(f"internal error: {type(exc).__name__}")
            self.end(_Ended(f"internal error: {exc!r}", Bye(ByeReason.INTERNAL_ERROR, text)))
        else:
            raise exc

    # ------------------------------------------------------------------ output

    def send(self, event: Event) -> None:
        """Send `event` now if the socket takes it, else queue it for the writer; the order of
        calls is the order on the wire.

        When the writer is not in the middle of a write, the bytes go out right here, from the
        caller's context (the reader answering a PING or a REVOKE, a guest access asking for a
        page-in): one non-blocking send, no hand-off to the writer task and no scheduler pass
        before the lender sees them, with whatever was queued and not yet taken by the writer
        (GRANT_ACKs held back by `poll_answer`) in front of them: a PAGE_IN must not wait
        behind a queue that only the writer's next turn would empty. Whatever the socket does
        not take (full buffer, error) is queued, and the writer deals with it under its
        deadline, as before.
        """
        if self._held:
            self._encode_held()
        out = self.conn.send(event)
        assert not out.fds  # the borrower never sends file descriptors
        self._write(out.data)

    def send_page_in(self, request_id: int, offset: int, length: int, access: Access) -> None:
        """`send(PageIn(...))`, through the connection's one-call PAGE_IN."""
        if self._held:
            self._encode_held()
        self._write(self.conn.send_page_in(request_id, offset, length, access))

    def _write(self, data: bytes) -> None:
        if not self._inflight and self.connected:
            if self._out:
                queued = b"".join(self._out)
                self._out.clear()
                self._out_bytes -= len(queued)
                self._progress.set()
                self._progress = trio.Event()
                data = queued + data
            try:
                sent = self._raw.send(data, MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # the writer meets the error again and ends the session
            if sent == len(data):
                return
            data = data[sent:]
        self._append(data)

    def _encode_held(self) -> None:
        """Queue the GRANT_ACKs `poll_answer` held back, ahead of anything encoded after."""
        held, self._held = self._held, []
        for lease_id in held:
            self._append(self.conn.send(GrantAck(lease_id)).data)

    def _append(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        self._wakeup.set()

    async def _writer(self) -> None:
        while True:
            if self._held:
                self._encode_held()
            if not self._out:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            batch = b"".join(self._out)
            self._out.clear()
            self._inflight = memoryview(batch)
            with trio.move_on_after(self.link.write_timeout) as scope:
                while self._inflight:
                    sent = await self.sock.send(self._inflight)
                    self._inflight = self._inflight[sent:]
            if scope.cancelled_caught:
                raise _Ended(
                    f"the lender read nothing for {self.link.write_timeout:g} s",
                    Bye(ByeReason.TIMEOUT, "not reading"),
                )
            self._out_bytes -= len(batch)
            self._progress.set()
            self._progress = trio.Event()

    async def say_bye(self, bye: Bye) -> None:
        """Best effort, short deadline: whatever is queued, then BYE, if the state allows."""
        if self._held:
            with contextlib.suppress(ProtocolError):
                self._encode_held()
        try:
            tail = self.conn.send(bye).data
        except ProtocolError:
            return
        data = bytes(self._inflight) + b"".join(self._out) + tail
        self._out.clear()
        with trio.move_on_after(self.link.bye_timeout), contextlib.suppress(OSError):
            view = memoryview(data)
            while view:
                view = view[await self.sock.send(view) :]

    def close(self) -> None:
        self.conn.close()
        self.sock.close()

    # ------------------------------------------------------------------ input

    async def _receive(self) -> None:
        while self._out_bytes > OUTBOUND_HIGH_WATER:
            await self._progress.wait()  # the writer's deadline bounds this wait
        # Try the socket first and park in trio only when it is empty, as the vfio-user loop
        # does: a trio socket call would also yield after every successful receive (a
        # scheduler pass per lender message). What keeps this fair is the time slice: the
        # reader yields once it has worked for a slice (`_reader`), and a real wait restarts
        # it. devmodel.unixfds reads the fds out of what arrived, with the one rule every
        # receiver here follows: a message that lost fds in transit (MSG_CTRUNC) cannot be
        # read correctly, so the connection ends.
        raw = self._raw
        while not self._receive_nowait():
            self._idle = True
            try:
                await trio.lowlevel.wait_readable(raw)
            finally:
                self._idle = False
            self._slice.restart()  # others ran meanwhile: a new slice starts

    def _receive_nowait(self) -> bool:
        """One non-blocking receive into the connection; False if the socket was empty."""
        try:
            nbytes, ancillary, flags, _ = self._raw.recvmsg_into(
                [self._view], ANCILLARY_SPACE, _RECV_FLAGS
            )
        except BlockingIOError:
            return False
        self.received_ns = self._clock()
        try:
            fds = fds_from_ancillary(ancillary, flags)
        except FdsTruncated:
            raise _Ended(
                "file descriptors were lost (MSG_CTRUNC)",
                Bye(ByeReason.PROTOCOL_ERROR, "ancillary data truncated"),
            ) from None
        self._last_heard = self._trio_clock.current_time()
        self._heard.set()
        self.conn.receive_data(self._view[:nbytes], fds)
        return True

    async def _next_event(self) -> Event | None:
        """The next event (None at the end of the stream); refused messages are answered here."""
        while True:
            event = self._buffered_event()
            if event is NEED_DATA:
                await self._receive()
                continue
            return event  # type: ignore[return-value]

    def _buffered_event(self) -> Event | object | None:
        """The next complete event, NEED_DATA, or None at the end of the stream."""
        while True:
            try:
                event = self.conn.next_event()
            except LeaseProtocolError as exc:
                if exc.fatal:
                    bye = exc.reply if isinstance(exc.reply, Bye) else None
                    raise _Ended(f"protocol error: {exc}", bye) from None
                self._refused(exc)
                continue
            if event is CLOSED:
                return None
            return event

    def poll_answer(self, done: Callable[[], bool]) -> bool | None:
        """One try of `LenderLink.poll_answer`: receive without waiting and handle every
        event that came, as the reader would; True once `done()`, None to try again.

        Only while the reader is parked on the empty socket (`_idle`): then nothing it read is
        unhandled and it is in no step of its own, so handling the next messages here keeps
        the order the reader would. Whatever ends the session here ends it as it would in the
        reader (`_guarded`). GRANT_ACKs of grants that served accesses are held back until this
        access has answered (`_handle_buffered`), as the reader's checkpoints hold them, and
        go out ahead of anything sent after them.
        """
        if done():
            return True
        if not self._idle or self.failure is not None or self._out_bytes > OUTBOUND_HIGH_WATER:
            return None  # the reader's turn (and its back-pressure on a lender that stops reading)
        try:
            if not self._receive_nowait():
                return None
            self._handle_buffered()
        except BaseException as exc:
            self._end_from(exc)
            return True  # the session is ending: its waiters are failed, nothing to wait for
        if not done():
            return None
        # Served. What the lender sent right behind its GRANT (its PAGE_IN_DONE) is received
        # once the guest has its reply (PageInPoll.follow_up), not before it.
        poll = self.link.poll
        if poll is not None:
            poll.defer(self.follow_up)
        return True

    def follow_up(self) -> None:
        """Receive and handle, without waiting, what came behind a polled answer; under the
        same conditions as `poll_answer` (else the reader takes it, as it takes everything)."""
        if not self._idle or self.failure is not None or self._out_bytes > OUTBOUND_HIGH_WATER:
            return
        try:
            if self._receive_nowait():
                self._handle_buffered()
        except BaseException as exc:
            self._end_from(exc)

    def _handle_buffered(self) -> None:
        """Handle every complete event the connection holds (`poll_answer`)."""
        while True:
            event = self._buffered_event()
            if event is NEED_DATA:
                return
            if event is None:
                raise _Ended("the lender closed the connection")
            self._handle(event)  # type: ignore[arg-type]
            if self._after_served:
                # Held, then encoded and sent by the writer's next turn or ahead of the next
                # `send` (a REVOKED for a REVOKE right behind this GRANT, say), whichever comes
                # first: after this access, never after what follows it on the wire.
                self._held += self._after_served
                self._after_served = []
                self._wakeup.set()
            if self.conn.drained():
                return

    def _refused(self, exc: LeaseProtocolError) -> None:
        self.link._log.warning("refused a message from the lender: %s", exc)
        reply = exc.reply
        if isinstance(reply, GrantNack):
            self.engine.counters.grant_nacks += 1
        if reply is not None:
            self.send(reply)

    # ------------------------------------------------------------------ the session

    async def _reader(self) -> None:
        link = self.link
        engine = self.engine
        self.send(
            Hello(
                guest_id=link.guest_id,
                aperture_size=engine.size,
                granule=engine.granule,
                features=link.features,
                max_leases=min(engine.config.max_leases, HELLO_MAX_LEASES),
                name=link.name,
            )
        )
        answer: Event | None = None
        with trio.move_on_after(link.hello_timeout) as scope:
            answer = await self._next_event()
        if scope.cancelled_caught:
            raise _Ended(
                f"no HELLO from the lender within {link.hello_timeout:g} s",
                Bye(ByeReason.TIMEOUT, "no HELLO in time"),
            )
        if answer is None:
            raise _Ended("the lender closed the connection during the handshake")
        if isinstance(answer, Bye):
            raise _Ended(f"the lender refused: {_bye_text(answer)}")
        assert isinstance(answer, Hello)  # the connection refuses anything else as fatal
        ours = self.conn.local_hello
        assert ours is not None
        self._aperture_size, self._granule = ours.aperture_size, ours.granule
        self._features = self.conn.features
        self.opened = True
        link.sessions += 1
        link._session = self
        link._last_failure = ""
        log.info(
            "lender %r at %s: version %d.%d, guest %d",
            answer.name,
            link.path,
            answer.major,
            answer.minor,
            link.guest_id,
        )
        assert self._nursery is not None
        self._nursery.start_soon(self._guarded, self._keepalive)
        fair = self._slice
        while True:
            event = await self._next_event()
            if event is None:
                raise _Ended("the lender closed the connection")
            self._handle(event)
            if self._after_served:
                await self._acknowledge_after_served()
            await fair.maybe_yield()

    async def _acknowledge_after_served(self) -> None:
        """Send the GRANT_ACKs of grants that served waiting accesses, once those accesses
        have had their turn to answer the guest.

        A faulted access is woken by the grant (`LeaseEngine.grant` serves it in place), but
        its task only runs at trio's next batch, in an order trio randomises; acknowledging
        first would also wake the lender just when the guest's reply is due, and on a busy
        machine the two compete for a CPU. Two checkpoints put the reader behind every task
        the grant woke. The reader handles nothing else meanwhile, so no REVOKE or
        PAGE_IN_DONE overtakes the acknowledgement, and the delay stays within the time
        slices of the tasks that run (fairness.py): the lender sees GRANT_ACK slightly later,
        the guest its data sooner (docs/performance.md, "The lease path").
        """
        await trio.lowlevel.cancel_shielded_checkpoint()
        await trio.lowlevel.cancel_shielded_checkpoint()
        acks, self._after_served = self._after_served, []
        for lease_id in acks:
            self.send(GrantAck(lease_id))

    def _handle(self, event: Event) -> None:
        if isinstance(event, Grant):
            self._grant(event)
        elif isinstance(event, Revoke):
            self._revoke_event(event)
        elif isinstance(event, PageInDone):
            self.engine.page_in_done(event.request_id, event.status)
        elif isinstance(event, Ping):
            self.send(Pong(event.token))
        elif isinstance(event, Error):
            self._error(event)
        elif isinstance(event, Bye):
            raise _Ended(f"the lender said BYE: {_bye_text(event)}")
        # PONG: hearing it is all the keepalive needs; the connection matched its token.

    def _grant(self, g: Grant) -> None:
        # The specification's own checks (devmodel_wire.lease.checks) come first, so that every
        # lender meets one reading of it: the shape under the session geometry (fd_offset on
        # the granule too), then the fd (a sealed regular file, writable if prot asks for
        # write, big enough). The engine then adds what needs its table (overlaps, limits).
        # (`check_grant` with the session's terms, as `BorrowerConnection.check_grant` would
        # call it: three calls fewer on a fault's way back to the guest.)
        reason = check_grant(
            g, aperture_size=self._aperture_size, granule=self._granule, features=self._features
        )
        what = "grant"
        key = None
        if reason is None:
            kind = g.flags & GRANT_FD_KIND_MASK
            reason, key = check_grant_fd_key(
                g.fd,
                fd_offset=g.fd_offset,
                length=g.length,
                prot=g.prot,
                kind=kind,
                dmabuf=self.engine.dmabuf if kind == FdKind.DMABUF else None,
            )
            what = "memory fd"
        if reason is not None:
            with contextlib.suppress(OSError):
                os.close(g.fd)
            self._nack(
                g.lease_id,
                reason,
                f"{what} refused: {g.offset:#x}+{g.length:#x} at fd offset {g.fd_offset:#x}, "
                f"prot {g.prot}, flags {g.flags:#x}",
            )
            return
        try:
            served = self.engine.grant(
                g.lease_id, g.offset, g.length, g.fd_offset, g.prot, g.fd, g.flags, fd_key=key
            )
        except GrantRefused as refused:
            self._nack(g.lease_id, refused.reason, str(refused))
            return
        if served:
            self._after_served.append(g.lease_id)
        else:
            self.send(GrantAck(g.lease_id))

    def _nack(self, lease_id: int, reason: NackReason, text: str) -> None:
        self.engine.counters.grant_nacks += 1
        self.link._log.warning(
            "refused lease %d: %s: %s", lease_id, code_name(NackReason, reason), text
        )
        self.send(GrantNack(lease_id, reason, clip(text)))

    def _revoke_event(self, event: Revoke) -> None:
        """A revoke with nothing to wait for (no transport mapping to remove) is done and
        answered right here, in message order; one that must await unmap hooks gets a task."""
        try:
            done = self.engine.revoke_now(event.lease_id, event.mode)
        except UnknownLease:
            done = True  # see `_revoke`: nothing here can touch it
        if done:
            if self.usable:
                self.send(Revoked(event.lease_id))
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._guarded, self._revoke, event)

    async def _revoke(self, event: Revoke) -> None:
        limit = self.engine.config.revoke_timeout + REVOKE_MARGIN
        # UnknownLease: granted on this connection (the connection refuses ids never granted)
        # but not live: NACKed, released or superseded. Nothing here can touch it, so the
        # guarantee of REVOKED holds already (specification, section 8).
        with trio.move_on_after(limit) as scope, contextlib.suppress(UnknownLease):
            await self.engine.revoke(event.lease_id, event.mode)
        if scope.cancelled_caught:
            # REVOKED must never be early; ending the connection drops the lease instead.
            raise _Ended(
                f"revoking lease {event.lease_id} took over {limit:g} s",
                Bye(ByeReason.INTERNAL_ERROR, "revoke did not complete"),
            )
        if self.usable:
            self.send(Revoked(event.lease_id))

    def _error(self, error: Error) -> None:
        self.link._log.warning(
            "the lender refused %s %d: %s %s",
            _type_name(error.ref_type),
            error.ref_id,
            code_name(ErrorCode, error.code),
            error.text,
        )
        if error.ref_type == MsgType.PAGE_IN and error.code != ErrorCode.DUPLICATE_ID:
            # An ERROR answers the request it names: the page-in failed.
            self.engine.page_in_done(error.ref_id, PageInStatus.FAILED)

    async def _keepalive(self) -> None:
        """Bound the idle wait for the lender: a silent lender is pinged, and must answer."""
        link = self.link
        while True:
            quiet_until = self._last_heard + link.ping_interval
            if trio.current_time() < quiet_until:
                await trio.sleep_until(quiet_until)
                continue
            token = self._next_token
            self._next_token += 1
            self._heard = trio.Event()
            self.send(Ping(token))
            with trio.move_on_after(link.ping_timeout) as scope:
                await self._heard.wait()
            if scope.cancelled_caught:
                raise _Ended(
                    f"the lender did not answer a PING within {link.ping_timeout:g} s",
                    Bye(ByeReason.TIMEOUT, "no answer to PING"),
                )


def _bye_text(bye: Bye) -> str:
    name = code_name(ByeReason, bye.reason)
    return f"{name}: {bye.text}" if bye.text else name


def _type_name(raw: int) -> str:
    try:
        return MsgType(raw).name
    except ValueError:
        return f"type {raw:#06x}"
