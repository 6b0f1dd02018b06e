"""The lease engine: serves aperture accesses from lent memory, revokes, pages in.

Concurrency model: accesses are synchronous `pread`/`pwrite` on the lender's fd (for a
dma-buf lease: sync ioctl, a copy from its mapping, sync ioctl; devmodel/leases/dmabuf.py), so
an access never holds anything across an await; only waits (for a revoke to finish or a
page-in to be answered) suspend, and each wait is per window with a deadline. Nothing global
is held across a wait, so a vfio-user client (one access at a time) and Xen (one per vCPU)
both fit.

Forward progress: when a grant makes a window resident, the accesses waiting on it are
performed inside the grant itself, before any other message (such as an immediate REVOKE) can
be processed. A lender that revokes right after every grant still sees every fault served.

Observation: the engine is the one object every transport calls, so whatever watches accesses
(latency histograms, `trace on`) plugs in here as a hook (`timing`, `tracer`) rather than as a
subclass wrapped around the access path. Unset, a hook costs one attribute test; set, one call
with the duration. `in_flight` and `drain()` live here too: only the engine knows which
accesses are waiting, and a graceful stop must wait for them whatever else is attached.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import trio

from devmodel.counters import DeviceCounters
from devmodel.leases.backing import FdKey, FdStore, GrantRefused
from devmodel.leases.dmabuf import DmabufMapping, DmabufSupport
from devmodel.leases.policy import FailurePolicy
from devmodel.leases.states import LIVE, Trigger, WindowState, transition
from devmodel.leases.table import FAST_FD_MASK, FAST_SHIFT, WindowTable
from devmodel.leases.window import Pending, Window
from devmodel.pci.errors import AccessError
from devmodel.ratelimit import RateLimitedLogger
from devmodel_wire.lease.constants import (
    FD_KIND_FEATURE,
    GRANT_FD_KIND_MASK,
    GRANT_FLAGS_KNOWN,
    PROT_WRITE,
    VALID_PROTS,
    Access,
    FdKind,
    NackReason,
    PageInStatus,
    RevokeMode,
    code_name,
)

log = logging.getLogger("devmodel.leases")

S = WindowState
# The fast paths' state test: a global, not an Enum member read off its class (~60 ns more).
_RESIDENT = WindowState.RESIDENT
_EVICTED = WindowState.EVICTED
_now = time.perf_counter_ns


class LenderPort(Protocol):
    """How the engine reaches the lender: asks for a page-in; False if no lender is there."""

    answers_later: bool
    """True if no answer can come before `send_page_in` returns: the lender is in another
    process, and what it sends is handled only by a later receive. The engine then asks as
    soon as an access finds its window evicted (`read_now`, `write_now`) and books the
    request once the PAGE_IN is out, so the access's way into the slow path overlaps the
    lender's work instead of delaying the question. False for a lender in this process,
    which may grant inside the call: its request is booked first."""

    def send_page_in(self, request_id: int, offset: int, length: int, access: Access) -> bool: ...


class AnswerPoller(Protocol):
    """What an access that has asked for a page-in may do before it parks."""

    def poll_answer(self, done: Callable[[], bool]) -> bool:
        """Try for a short while to receive and handle the lender's answer; True if `done()`."""
        ...

    def answer_parked(self) -> None:
        """The answer came after the access parked (so the poller can tune its budget)."""
        ...


class AccessObserver(Protocol):
    """Told how long each access and each revoke took (devmodel.metrics.timing fills
    histograms with it). Called on the access path: it must be cheap and must not raise."""

    def access(self, ns: int) -> None:
        """An access finished after `ns` nanoseconds (every access, faulted or not)."""

    def fault(self, ns: int) -> None:
        """The access just given to `access` faulted: its memory was not resident when it
        came (evicted, paging in or being revoked), so it asked for a page-in or waited. An
        access whose early PAGE_IN (`_ask_early`) was answered before it reached the slow
        path is counted in `faults` but timed only as an access."""

    def revoke(self, ns: int) -> None:
        """A revoke finished (or failed) after `ns` nanoseconds."""


class AccessTracer(Protocol):
    """Sees every access with its data (`trace on`); set only while someone is looking."""

    def __call__(self, write: bool, offset: int, data: bytes, ns: int) -> None: ...


class UnknownLease(Exception):
    """A REVOKE named a lease this side does not hold."""


@dataclass(slots=True)
class EngineConfig:
    # Every wait ends well before QEMU's vfio-user reply timeout (5 s by default).
    page_in_timeout: float = 2.0
    revoke_timeout: float = 2.0
    policy: FailurePolicy = FailurePolicy.ALL_ONES
    max_leases: int = 1 << 22


@dataclass(slots=True)
class _Request:
    request_id: int
    start: int
    end: int
    # Asked from the fast path's miss (`_ask_early`), whose access was counted as a fault
    # there; the first access to wait on it is that one, or stands in for it.
    early: bool = False


EventSink = Callable[[str, dict[str, object]], None]
UnmapHook = Callable[[int, int], Awaitable[None]]


class LeaseEngine:
    """The aperture as a set of leased windows (implements `devmodel.aperture.Aperture`)."""

    def __init__(
        self,
        size: int,
        granule: int,
        counters: DeviceCounters,
        config: EngineConfig | None = None,
        *,
        timing: AccessObserver | None = None,
    ) -> None:
        self._size = size
        self._granule = granule
        self.counters = counters
        self.config = config or EngineConfig()
        self.port: LenderPort | None = None
        # Polls the lender for a page-in's answer before an access parks (the lender link,
        # when polling is on); None: accesses park at once.
        self.answer_poller: AnswerPoller | None = None
        # Transports that map resident windows into the guest (the Xen fast path) register
        # here; a revoke awaits every hook before it drops the engine's own access.
        self.unmap_hooks: list[UnmapHook] = []
        self.on_event: EventSink | None = None
        # Observers (module docstring): timing for every access and revoke, a tracer on request.
        # `_observed` says whether either is set, so that an unobserved access reads no clock.
        self._timing: AccessObserver | None = timing
        self._tracer: AccessTracer | None = None
        self._observed = timing is not None
        # Accesses inside the engine right now. Only the slow path counts: a resident access
        # never suspends, so nobody could ever see it in flight.
        self.in_flight = 0
        self._table = WindowTable(granule, size=size)
        self._live: dict[int, Window] = {}  # lease id -> RESIDENT/REVOKING window
        self._evicted: dict[int, set[Window]] = {}  # lease id -> its EVICTED/PAGING_IN pieces
        self._requests: dict[int, _Request] = {}
        self._next_request = 1
        self._fds = FdStore()
        self._fail_log = RateLimitedLogger(log)

    # ------------------------------------------------------------------ observers

    @property
    def timing(self) -> AccessObserver | None:
        """Told the duration of every access and revoke (devmodel.metrics.timing)."""
        return self._timing

    @timing.setter
    def timing(self, timing: AccessObserver | None) -> None:
        self._timing = timing
        self._observed = timing is not None or self._tracer is not None

    @property
    def tracer(self) -> AccessTracer | None:
        """Shown every access with its data (`trace on`, devmodel.metrics.trace)."""
        return self._tracer

    @tracer.setter
    def tracer(self, tracer: AccessTracer | None) -> None:
        self._tracer = tracer
        self._observed = self._timing is not None or tracer is not None

    @property
    def dmabuf(self) -> DmabufSupport:
        """How dma-buf leases reach the kernel (exporter allow-list, inspection, sync); tests
        replace it to stand memfds in for dma-bufs."""
        return self._fds.dmabuf

    @dmabuf.setter
    def dmabuf(self, support: DmabufSupport) -> None:
        self._fds.dmabuf = support

    # ------------------------------------------------------------------ Aperture protocol

    @property
    def size(self) -> int:
        return self._size

    @property
    def granule(self) -> int:
        return self._granule

    def read_now(self, offset: int, size: int) -> bytes | None:
        """`read` when it needs no wait: the bytes of a RESIDENT window, timed and traced as
        `read` does; None (nothing done, nothing counted) when the access must wait or fail,
        and then the caller awaits `read`. Same rule as `read`: only a RESIDENT window is read,
        so nothing touches a page after its revoke.

        In a crowded block the table answers with the unit's fast entry instead of the window
        (devmodel/leases/table.py): fd and fd_base in one int, non-zero only while the window
        is RESIDENT and memfd-backed (`_update` keeps it so), so the access reads one cache
        line, not two."""
        found = self._table.find_fast(offset)
        if type(found) is int:
            fd = (found >> 1) & FAST_FD_MASK
            at = (found >> FAST_SHIFT) + offset
            mem = None
        else:
            # mypy narrows on isinstance only (int has subclasses); isinstance costs ~15 ns more.
            w: Window | None = found  # type: ignore[assignment]
            if w is None or w.state is not _RESIDENT:
                if w is not None and w.state is _EVICTED:
                    self._ask_early(w, Access.READ)
                return None
            fd = w.fd
            at = w.fd_base + offset
            mem = w.mem
        # mem: a dma-buf lease, read through its mapping (sync-bracketed), which maps exactly
        # the granted range: fd offset `at` is `at - mem.fd_offset` into it.
        observed = self._observed
        began = _now() if observed else 0
        try:
            data = os.pread(fd, size, at) if mem is None else mem.read(at - mem.fd_offset, size)
        except OSError:
            return None
        if len(data) != size:
            return None
        if observed:
            ns = _now() - began
            if self._timing is not None:
                self._timing.access(ns)
            if self._tracer is not None:
                self._tracer(False, offset, data, ns)
        return data

    def write_now(self, offset: int, data: bytes) -> bool:
        """`write` when it needs no wait: True once `data` is in a RESIDENT writable window,
        timed and traced as `write` does; False (nothing done, nothing counted) when the
        access must wait or fail, and then the caller awaits `write`. The revoke guarantee is
        `read_now`'s: only a RESIDENT window is written, with no await between the state test
        (or the fast entry's read) and the `pwrite`."""
        found = self._table.find_fast(offset)
        if type(found) is int:
            if not found & 1:
                return False  # read-only: the awaited write answers with the policy
            fd = (found >> 1) & FAST_FD_MASK
            at = (found >> FAST_SHIFT) + offset
            mem = None
        else:
            w: Window | None = found  # type: ignore[assignment]  # as in read_now
            if w is None or w.state is not _RESIDENT or not w.prot & PROT_WRITE:
                if w is not None and w.state is _EVICTED:
                    self._ask_early(w, Access.WRITE)
                return False
            fd = w.fd
            at = w.fd_base + offset
            mem = w.mem
        observed = self._observed
        began = _now() if observed else 0
        try:
            done = os.pwrite(fd, data, at) if mem is None else mem.write(at - mem.fd_offset, data)
            if done != len(data):
                return False
        except OSError:
            return False  # a write seal, say: the awaited write answers with the policy
        if observed:
            ns = _now() - began
            if self._timing is not None:
                self._timing.access(ns)
            if self._tracer is not None:
                self._tracer(True, offset, data, ns)
        return True

    async def read(self, offset: int, size: int) -> bytes:
        """A read that may wait: `read_now` when the window is resident, else the slow path
        (page-in, deadline, failure policy)."""
        data = self.read_now(offset, size)
        if data is not None:
            return data
        return await self._slow(offset, size, None, _now() if self._observed else 0)

    async def write(self, offset: int, data: bytes) -> None:
        """A write that may wait: `write_now` when the window is resident and writable, else
        the slow path. A lender may write-seal its memfd after the grant (EPERM): `write_now`
        then declines and the slow path answers with the failure policy instead of raising
        into the transport."""
        if not self.write_now(offset, data):
            await self._slow(offset, len(data), data, _now() if self._observed else 0)

    def _observe(self, write: bool, offset: int, data: bytes, ns: int, faulted: bool) -> None:
        timing = self._timing
        if timing is not None:
            timing.access(ns)
            if faulted:
                timing.fault(ns)
        tracer = self._tracer
        if tracer is not None:
            tracer(write, offset, data, ns)

    def reset(self) -> None:
        """Device reset: lent memory belongs to the lender, so nothing here changes."""

    def close(self) -> None:
        # The table goes first: no access can reach a window through it once its memory goes.
        old, self._table = self._table, WindowTable(self._granule, size=self._size)
        for w in list(old):
            self._fail_waiters(w.waiters, "device closing")
            self._update(w, drop_memory=True)
        self._fds.close_all()
        self._live.clear()
        self._evicted.clear()

    def _update(
        self, w: Window, trigger: Trigger | None = None, *, drop_memory: bool = False
    ) -> None:
        """The one place where a window's state, fd or memory changes after it was added to
        the table (tests/unit/test_lease_fast_entries.py checks that no other code assigns
        them): apply `trigger` through the transition table, drop its memory (its dma-buf
        mapping, then its fd) if asked, then refresh its fast entries in the table. One
        synchronous step: the revoke guarantee, which the fast entries carry for a crowded
        block (devmodel/leases/table.py), holds as soon as this returns, and no access can
        run before it does (the engine's accesses run in this thread, between awaits). The
        refresh runs whatever raised before it (an illegal transition, a failed unmap), so the
        entries never outlive what they were computed from."""
        try:
            if trigger is not None:
                w.state = transition(w.state, trigger)
            if drop_memory:
                mem = w.mem
                if mem is not None:
                    w.mem = None
                    mem.close()
                if w.fd >= 0:
                    self._fds.release(w.fd)
                    w.fd = -1
        finally:
            self._table.refresh(w)

    # ------------------------------------------------------------------ queries

    def windows(self) -> Iterator[Window]:
        return iter(self._table)

    def outstanding_page_ins(self) -> int:
        """PAGE_INs sent and not yet ended by their PAGE_IN_DONE (or the lender's loss)."""
        return len(self._requests)

    def window_at(self, offset: int) -> Window | None:
        return self._table.find(offset)

    @property
    def lease_count(self) -> int:
        return len(self._live)

    @property
    def kept_fds(self) -> int:
        return len(self._fds)

    def state_counts(self) -> dict[str, int]:
        """Windows per state (a walk over the table: for queries, never the hot path)."""
        counts = {s.value: 0 for s in WindowState if s is not WindowState.VACANT}
        for w in self._table:
            counts[w.state.value] += 1
        return counts

    async def drain(self, timeout: float) -> bool:
        """Wait (up to `timeout`) until no access is inside the engine; True if none is.

        A waiting access ends by itself within the page-in deadline (served, or given the
        failure policy), so a graceful stop that waits here never cuts one off half-done.
        """
        with trio.move_on_after(timeout):
            while self.in_flight:
                await trio.sleep(0.005)
        return not self.in_flight

    # ------------------------------------------------------------------ the slow path

    async def _slow(self, offset: int, size: int, data: bytes | None, start: int) -> bytes:
        """An access the fast path could not serve: counted in flight, then observed."""
        self.in_flight += 1
        try:
            result, faulted = await self._serve_slowly(offset, size, data)
        finally:
            self.in_flight -= 1
        if self._observed and start:  # start is 0 if nobody observed when the access came
            shown = result if data is None else data
            self._observe(data is not None, offset, shown, _now() - start, faulted)
        return result

    async def _serve_slowly(self, offset: int, size: int, data: bytes | None) -> tuple[bytes, bool]:
        """(the answer, whether the access faulted: met its memory evicted or in transition)."""
        deadline = trio.current_time() + self.config.page_in_timeout
        waited = False
        faulted = False
        while True:
            w = self._table.find(offset)
            if w is None:
                return self._fail(offset, size, data, "nothing is lent there"), faulted
            state = w.state
            if state is S.RESIDENT:
                return self._perform(w, offset, size, data), faulted
            if state is S.LOST:
                return self._fail(offset, size, data, "the lender is gone"), faulted
            faulted = True
            if state is S.EVICTED:
                access = Access.READ if data is None else Access.WRITE
                if not self._start_page_in(w, access):
                    return self._fail(offset, size, data, "no lender to page in from"), True
                continue  # an in-process lender may have answered already
            # REVOKING or PAGING_IN: wait for it, within the deadline.
            if not waited:
                waited = True
                req = self._requests.get(w.request_id) if state is S.PAGING_IN else None
                if req is not None and req.early:
                    req.early = False  # counted when it was asked (`_ask_early`)
                else:
                    self.counters.faults += 1
            pending = Pending(offset, size, data)
            w.wait(pending)
            done = pending.done
            poller = self.answer_poller if state is S.PAGING_IN else None
            if poller is None or not poller.poll_answer(done.is_set):
                with trio.move_on_at(deadline):
                    await done.wait()
                if poller is not None and done.is_set():
                    poller.answer_parked()
            if pending.served:
                if pending.error is not None:
                    raise pending.error
                return pending.result, True
            if not pending.done.is_set():
                # Only this access gives up. The PAGE_IN stays outstanding and its window
                # PAGING_IN (docs/lease-protocol.md 9.4, "Late answers"): later accesses wait
                # on it, each to its own deadline, instead of asking again, so a silent lender
                # sees one PAGE_IN per window, not one per access; its late answer ends it.
                holder = self._table.find(offset)
                if holder is not None and holder.waiters and pending in holder.waiters:
                    holder.waiters.remove(pending)
                    if not holder.waiters:
                        holder.waiters = None
                return self._fail(offset, size, data, "page-in deadline passed"), True
            if pending.retry:
                continue
            return self._fail(offset, size, data, "page-in failed"), True

    def _perform(self, w: Window, offset: int, size: int, data: bytes | None) -> bytes:
        at = w.fd_base + offset
        mem = w.mem  # a dma-buf lease: a mapping of the granted range, sync-bracketed
        try:
            if data is None:
                got = os.pread(w.fd, size, at) if mem is None else mem.read(offset - w.start, size)
                if len(got) == size:
                    return got
            elif w.prot & PROT_WRITE:
                done = (
                    os.pwrite(w.fd, data, at) if mem is None else mem.write(offset - w.start, data)
                )
                if done == len(data):
                    return b""
            else:
                return self._fail(offset, size, data, "the lease is read-only")
        except OSError as exc:
            return self._fail(offset, size, data, f"lender memory failed: {exc.strerror}")
        return self._fail(offset, size, data, "lender memory shrank under the lease")

    def _fail(self, offset: int, size: int, data: bytes | None, why: str) -> bytes:
        self.counters.failed_accesses += 1
        self._fail_log.warning(
            "%s of %d bytes at %#x failed: %s",
            "read" if data is None else "write",
            size,
            offset,
            why,
        )
        if data is None:
            return self.config.policy.read_result(size)
        self.config.policy.write_result()
        return b""

    def _start_page_in(self, w: Window, access: Access) -> bool:
        port = self.port
        if port is None:
            return False
        rid = self._next_request
        self._book_page_in(w, rid)
        if not port.send_page_in(rid, w.start, w.length, access):
            self._page_in_failed(rid, "lender unreachable")
            return False
        return True

    def _ask_early(self, w: Window, access: Access) -> None:
        """The PAGE_IN for an access that has just found `w` evicted, from the fast path's
        miss, if the lender answers later (`LenderPort.answers_later`): sent first, booked
        after, with nothing in between that could handle an answer. Nothing happens if it
        cannot be sent: the slow path, which the access enters next, asks again and answers
        it as a failed page-in, counted and reported once."""
        port = self.port
        if port is not None and port.answers_later:
            rid = self._next_request
            if port.send_page_in(rid, w.start, w.length, access):
                self._book_page_in(w, rid).early = True
                # The access has met its memory evicted: a fault, whether or not it still
                # has to wait when it reaches the slow path (a transport that hands it to a
                # worker, libvfio-user's, may find the grant there before it).
                self.counters.faults += 1

    def _book_page_in(self, w: Window, rid: int) -> _Request:
        self._next_request = rid + 1
        self._update(w, Trigger.FAULT)
        w.request_id = rid
        req = self._requests[rid] = _Request(rid, w.start, w.end)
        self.counters.page_ins += 1
        self._emit("PAGE_IN_REQUESTED", {"request": rid, "offset": w.start, "length": w.length})
        return req

    # ------------------------------------------------------------------ lender side

    def grant(
        self,
        lease_id: int,
        offset: int,
        length: int,
        fd_offset: int,
        prot: int,
        fd: int,
        flags: int = 0,
        fd_key: FdKey | None = None,
    ) -> int:
        """Accept a GRANT or raise GrantRefused (nothing changed). `fd` is consumed.

        `fd_key`: the caller validated `fd` already (`FdStore.adopt` says how). Returns how
        many waiting accesses the grant served (forward progress, below)."""
        try:
            pieces = self._check_grant(lease_id, offset, length, fd_offset, prot, flags)
        except GrantRefused:
            os.close(fd)
            raise
        kind = flags & GRANT_FD_KIND_MASK
        kept = self._fds.adopt(fd, fd_offset, length, prot, fd_key, kind)
        mem: DmabufMapping | None = None
        if kind == FdKind.DMABUF:
            mem = self._map_dmabuf(kept, fd_offset, length, prot)
        end = offset + length
        w = Window(
            offset,
            length,
            S.RESIDENT,
            fd=kept,
            fd_base=fd_offset - offset,
            mem=mem,
            prot=prot,
            lease_id=lease_id,
        )
        served: list[Pending]
        if len(pieces) == 1 and pieces[0].start == offset and pieces[0].length == length:
            # The usual grant: a page-in's answer for just the window it asked for.
            old = pieces[0]
            transition(old.state, Trigger.GRANT)  # validates; the window becomes RESIDENT
            served = old.take_waiters(offset, end)
            self._table.replace(old, w)
            self._forget_evicted(old)
        else:
            served = self._grant_over(pieces, offset, end)
            self._table.add(w)
        self._live[lease_id] = w
        self.counters.grants += 1
        self._emit("LEASE_GRANTED", {"lease": lease_id, "offset": offset, "length": length})
        # Forward progress: the accesses that waited for this memory are served now, in the
        # order they came. Coalesced reads of the same bytes share one successful read of them
        # (no await and no write between them: the bytes cannot differ); a write among the
        # waiters forgets what was read, and a failed read is not shared, so each access that
        # fails is counted and answered as it would be alone.
        counters = self.counters
        same: dict[tuple[int, int], bytes] = {}
        for p in served:
            try:
                if p.data is not None:
                    same.clear()
                    p.result = self._perform(w, p.offset, p.size, p.data)
                elif (got := same.get((p.offset, p.size))) is not None:
                    p.result = got
                else:
                    failed = counters.failed_accesses
                    p.result = self._perform(w, p.offset, p.size, None)
                    if counters.failed_accesses == failed:
                        same[(p.offset, p.size)] = p.result
            except AccessError as exc:  # the ERROR policy: a write to a read-only grant, say
                p.error = exc
            p.served = True
            p.done.set()
        return len(served)

    def _grant_over(self, pieces: list[Window], offset: int, end: int) -> list[Pending]:
        """Take `[offset, end)` out of the windows it meets, keeping what lies outside it as
        windows of their own; the waiters inside it, in order."""
        served: list[Pending] = []
        for old in pieces:
            transition(old.state, Trigger.GRANT)  # validates; the part granted becomes RESIDENT
            served += old.take_waiters(offset, end)
            self._table.remove(old)
            self._forget_evicted(old)
            for start, stop in ((old.start, offset), (end, old.start + old.length)):
                if start < stop:
                    rest = Window(
                        start,
                        stop - start,
                        old.state,
                        lease_id=old.lease_id,
                        request_id=old.request_id,
                    )
                    rest.waiters = old.take_waiters(start, stop) or None
                    self._table.add(rest)
                    if rest.state in (S.EVICTED, S.PAGING_IN):
                        self._evicted.setdefault(rest.lease_id, set()).add(rest)
        return served

    def _map_dmabuf(self, fd: int, fd_offset: int, length: int, prot: int) -> DmabufMapping:
        """Map a dma-buf lease's range, or release `fd` and raise GrantRefused (BAD_FD: the
        specification's "cannot be mapped"; an exporter may refuse mmap altogether)."""
        try:
            return self._fds.dmabuf.map(fd, fd_offset, length, prot)
        except (OSError, ValueError, OverflowError) as exc:
            self._fds.release(fd)
            raise GrantRefused(NackReason.BAD_FD, f"dma-buf cannot be mapped: {exc}") from None

    def _check_grant(
        self, lease_id: int, offset: int, length: int, fd_offset: int, prot: int, flags: int
    ) -> list[Window]:
        g = self._granule
        if lease_id in self._live or lease_id in self._evicted:
            raise GrantRefused(NackReason.DUPLICATE_LEASE_ID, f"lease {lease_id} already exists")
        if prot not in VALID_PROTS:
            raise GrantRefused(NackReason.BAD_PROTECTION, f"protection {prot:#x} is not R or RW")
        if flags & ~GRANT_FLAGS_KNOWN or (flags & GRANT_FD_KIND_MASK) not in FD_KIND_FEATURE:
            raise GrantRefused(NackReason.UNSUPPORTED_FLAGS, f"grant flags {flags:#x} unknown")
        # docs/lease-protocol.md 9.2: a zero length and an fd_offset off the granule are
        # MISALIGNED too (a window must be mappable with pages of the granule's size).
        if length <= 0 or offset % g or length % g or fd_offset % g:
            raise GrantRefused(
                NackReason.MISALIGNED,
                f"{offset:#x}+{length:#x} at fd offset {fd_offset:#x} is not on {g:#x} granules",
            )
        if offset < 0 or offset + length > self._size:
            raise GrantRefused(
                NackReason.OUTSIDE_APERTURE,
                f"{offset:#x}+{length:#x} is outside the {self._size:#x}-byte aperture",
            )
        if len(self._live) >= self.config.max_leases:
            raise GrantRefused(NackReason.TOO_MANY_LEASES, f"{len(self._live)} leases are live")
        w = self._table.find(offset)
        if w is not None and w.start == offset and w.length == length:
            pieces = [w]  # the window a page-in asked for: nothing else can meet its range
        else:
            pieces = self._table.overlapping(offset, offset + length)
        for w in pieces:
            if w.state in LIVE:
                raise GrantRefused(
                    NackReason.OVERLAPS_LIVE_LEASE,
                    f"{offset:#x}+{length:#x} overlaps live lease {w.lease_id}",
                )
        return pieces

    async def revoke(self, lease_id: int, mode: RevokeMode) -> None:
        """Take a lease back; returns once nothing here can reach its pages (send REVOKED)."""
        start = _now()
        try:
            await self._revoke(lease_id, mode)
        finally:
            if self._timing is not None:
                self._timing.revoke(_now() - start)

    def revoke_now(self, lease_id: int, mode: RevokeMode) -> bool:
        """`revoke` without awaiting, when nothing needs awaiting: True if the lease is taken
        back (send REVOKED now), False if a transport must unmap it first (call `revoke`).

        With no unmap hook registered (vfio-user, Xen without the p2m fast path) no mapping of
        the window exists outside the engine and no access can be in flight (module
        docstring), so the whole revoke is a few table updates: the lender link does it in
        message order, without a task. Raises UnknownLease as `revoke` does.
        """
        w = self._live.get(lease_id)
        if w is not None and self.unmap_hooks:
            return False
        start = _now()
        try:
            if w is None:
                self._revoke_evicted(lease_id, mode)
            else:
                self._update(w, Trigger.REVOKE)
                self.counters.revokes += 1
                self._revoked(lease_id, w, mode)
        finally:
            if self._timing is not None:
                self._timing.revoke(_now() - start)
        return True

    async def _revoke(self, lease_id: int, mode: RevokeMode) -> None:
        w = self._live.get(lease_id)
        if w is None:
            self._revoke_evicted(lease_id, mode)
            return
        self._update(w, Trigger.REVOKE)
        self.counters.revokes += 1
        # 1. New accesses now wait (state REVOKING). 2. Transports unmap the window.
        await self._unmap(lease_id, w)
        # 3. In-flight accesses: none can be, an access never awaits while it holds the fd.
        if w.state is not S.REVOKING:  # the lender vanished meanwhile; lender_lost cleaned up
            return
        self._revoked(lease_id, w, mode)

    def _revoked(self, lease_id: int, w: Window, mode: RevokeMode) -> None:
        """The end of a revoke, once nothing outside the engine maps the window."""
        # 4. Drop our own access to the memory (a dma-buf's mapping first), then (by
        # returning) acknowledge.
        del self._live[lease_id]
        if mode is RevokeMode.EVICT:
            self._update(w, Trigger.REVOKED_EVICT, drop_memory=True)
            self._evicted.setdefault(lease_id, set()).add(w)
        else:
            self._update(w, Trigger.REVOKED_RELEASE, drop_memory=True)
            self._table.remove(w)
        self._emit("LEASE_REVOKED", {"lease": lease_id, "mode": mode.name})
        for p in w.waiters or ():
            p.retry = True
            p.done.set()
        w.waiters = None

    async def _unmap(self, lease_id: int, w: Window) -> None:
        """Have every transport unmap the window; REVOKED waits for this, however long.

        The revoke timeout only decides when to complain: acknowledging a revoke while a
        transport may still map the pages would break the one invariant the lender relies on
        (docs/lease-protocol.md 9.3), so an unmap is never cut short, only reported late.
        """
        if not self.unmap_hooks:
            return

        async def complain() -> None:
            await trio.sleep(self.config.revoke_timeout)
            log.error(
                "a transport has not unmapped lease %d after %.1f s; REVOKED is withheld "
                "until it has",
                lease_id,
                self.config.revoke_timeout,
            )
            self._emit("REVOKE_DELAYED", {"lease": lease_id})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(complain)
            for hook in self.unmap_hooks:
                await hook(w.start, w.length)
            nursery.cancel_scope.cancel()

    def _revoke_evicted(self, lease_id: int, mode: RevokeMode) -> None:
        pieces = self._evicted.get(lease_id)
        if pieces is None:
            raise UnknownLease(f"no lease {lease_id}")
        if mode is RevokeMode.EVICT:
            return  # already holds no memory
        for w in list(pieces):
            self._update(w, Trigger.RELEASE)
            self._table.remove(w)
            self._fail_waiters(w.waiters, "lease released")
        del self._evicted[lease_id]
        self._emit("LEASE_RELEASED", {"lease": lease_id})

    def _forget_evicted(self, w: Window) -> None:
        pieces = self._evicted.get(w.lease_id)
        if pieces is not None:
            pieces.discard(w)
            if not pieces:
                del self._evicted[w.lease_id]

    def page_in_done(self, request_id: int, status: int) -> None:
        if status == PageInStatus.OK:
            # The grants came first; whatever the request still covers was not granted.
            self._page_in_failed(request_id, "lender reported OK without granting", quiet=True)
        else:
            # docs/lease-protocol.md 9.4: NOT_LENT also marks the range vacant (no further
            # PAGE_IN for it); every other failure leaves it evicted, so the next access asks.
            self._page_in_failed(
                request_id,
                f"lender: {code_name(PageInStatus, status)}",
                release=status == PageInStatus.NOT_LENT,
            )

    def _page_in_failed(
        self, request_id: int, why: str, quiet: bool = False, release: bool = False
    ) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        for w in self._table.overlapping(req.start, req.end):
            if w.state is S.PAGING_IN and w.request_id == request_id:
                if not quiet:
                    self._emit("PAGE_IN_FAILED", {"request": request_id, "reason": why})
                self._update(w, Trigger.RELEASE if release else Trigger.PAGE_IN_FAILED)
                w.request_id = 0
                self._fail_waiters(w.waiters, why)
                w.waiters = None
                if release:
                    self._table.remove(w)
                    self._forget_evicted(w)

    def lender_lost(self, counted: bool = True) -> None:
        """Every window LOST, every fd closed; the device keeps answering with the policy.

        `counted` is False when the device model itself is stopping: the leases go all the
        same, but that is no lender failure to count or report.
        """
        for w in list(self._table):
            self._update(w, None if w.state is S.LOST else Trigger.LENDER_LOST, drop_memory=True)
            self._fail_waiters(w.waiters, "lender lost")
            w.waiters = None
            w.request_id = 0  # its PAGE_IN died with the lender; no answer can match it now
        self._live.clear()
        self._evicted.clear()
        self._requests.clear()
        if counted:
            self.counters.lender_losses += 1
            self._emit("LENDER_LOST", {})

    # ------------------------------------------------------------------ helpers

    def _fail_waiters(self, waiters: list[Pending] | None, why: str) -> None:
        for p in waiters or ():
            if not p.done.is_set():
                p.done.set()

    def _emit(self, name: str, data: dict[str, object]) -> None:
        if self.on_event is not None:
            self.on_event(name, data)


__all__ = [
    "AccessError",
    "AccessObserver",
    "AccessTracer",
    "EngineConfig",
    "LeaseEngine",
    "LenderPort",
    "UnknownLease",
    "errno",
]
