#!/usr/bin/env python3
"""A reference lender: a simulated GPU memory manager serving several guests.

It implements the lender side of docs/lease-protocol.md the way a real GPU backend's memory
manager would use it, small enough to read in one sitting:

- It listens on a unix socket; every device model (one per guest) that connects gets its own
  session (a `LenderConnection`), all served at once.
- VRAM is a budget (`--vram`) split into heaps, each one memfd sealed against shrinking and
  growing. Each guest's aperture is lent in chunks (the granule, or `--chunk`) as long as
  free VRAM lasts; the rest of the aperture is paged in on demand.
- Under pressure, and on demand, buffers are evicted least recently used first: REVOKE(EVICT),
  wait for REVOKED (only then may the memory be touched), copy the contents out to the
  guest's backing store (a private memfd), and free the VRAM (zeroed, or filled with a
  poison pattern with `--poison` so that a borrower reading stale memory would notice).
- A page-in brings the contents back byte for byte, sometimes to a different memfd or offset
  (`--move-probability`), grants it, and only then answers PAGE_IN_DONE.
- `--revoke-rate` evicts random resident buffers at that rate, as a stress knob; SIGUSR1
  evicts everything; SIGUSR2 logs the statistics; SIGINT/SIGTERM print a summary and exit 0.
- `--fd-kind dmabuf` lends VRAM as dma-bufs, the fd type a real GPU driver hands out: each
  heap memfd also becomes one udmabuf (/dev/udmabuf, at most the udmabuf module's
  `size_limit_mb`, 64 MiB by default, per heap), and grants to a borrower that accepted the
  `dmabuf-grants` feature carry that udmabuf; a borrower without the feature still gets the
  memfd. The lender itself keeps reading and writing VRAM through the memfd (the same pages:
  the udmabuf pins them), so freed VRAM is overwritten rather than hole-punched, which would
  leave the udmabuf holding the old pages. The backing store stays a memfd (lent only to
  stage evicted chunks). Without /dev/udmabuf it exits at once and says so.

Run: `python examples/reference_lender.py --socket /run/lender.sock --vram 256M`, then
`devmodel run --lender-socket /run/lender.sock --domid 7 ...` for each guest.

Tests drive it in-process: `ReferenceLender(...).serve(listener)`, `evict()`, `evict_all()`
and `stats`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import enum
import errno
import fcntl
import logging
import math
import os
import random
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Final

import trio
from lender_vram import Extent, Lru, Vram

import devmodel_wire.lease as lp
from devmodel.leases.dmabuf import udmabuf_create, udmabuf_missing
from devmodel.sizes import format_size, parse_size
from devmodel.unixfds import FdsTruncated, ancillary_space, fds_from_ancillary, rights
from devmodel_wire.lease.constants import FEATURE_DMABUF_GRANTS, FdKind, NackReason, code_name
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA

log = logging.getLogger("reference-lender")

F_ADD_SEALS: Final = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SHRINK: Final = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW: Final = getattr(fcntl, "F_SEAL_GROW", 0x0004)
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
PROT_RW: Final = 3
POISON: Final = b"\xde\xad\xbe\xef"
ANCILLARY_SPACE: Final = ancillary_space(16)
COPY_STEP: Final = 1 << 20
# Chunks lent-and-evicted at connection time, in flight at once per guest.
STAGING_WORKERS: Final = 32

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


# ---------------------------------------------------------------------------- memory helpers


def make_memfd(name: str, size: int, *, seal: bool) -> int:
    """A sparse memfd: pages exist only once written, so a big VRAM budget costs nothing."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if seal:
            # What makes lending safe for the borrower: the file can never shrink under it.
            fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
    except OSError:
        os.close(fd)
        raise
    return fd


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, length: int) -> None:
    """Copy inside the kernel where it can (memfd to memfd), with pread/pwrite otherwise."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, length - done, src_offset + done, dst_offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = 0
        if n <= 0:
            step = min(COPY_STEP, length - done)
            data = os.pread(src, step, src_offset + done)
            if len(data) != step:
                raise OSError(errno.EIO, "short read while copying")
            n = os.pwrite(dst, data, dst_offset + done)
        done += n


def scrub(fd: int, offset: int, length: int, poison: bool, *, punch: bool = True) -> None:
    """Free memory's contents: poison it (tests) or punch it out (zero, and pages freed).

    `punch=False` writes zeros instead: a udmabuf made from the memfd pins its pages, and a
    punched hole would leave the udmabuf with the old contents and the memfd with new pages.
    """
    if poison:
        pattern = POISON * (min(COPY_STEP, length) // len(POISON))
        for at in range(offset, offset + length, len(pattern)):
            os.pwrite(fd, pattern[: offset + length - at], at)
        return
    if not punch or _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        zeros = bytes(min(COPY_STEP, length))
        for at in range(offset, offset + length, len(zeros)):
            os.pwrite(fd, zeros[: offset + length - at], at)


# ---------------------------------------------------------------------------- logging


class EventLog:
    """One info line per event, at most `burst` a second; the rest are only counted.

    A lender under a revoke storm does thousands of things a second; the log stays readable
    and the summary still says how much happened.
    """

    def __init__(self, burst: int = 20) -> None:
        self.burst = burst
        self._second = 0
        self._sent = 0
        self.suppressed = 0

    def info(self, msg: str, *args: object) -> None:
        now = int(time.monotonic())
        if now != self._second:
            if self._sent > self.burst:
                log.info("(%d more events in the last second not logged)", self._sent - self.burst)
            self._second = now
            self._sent = 0
        self._sent += 1
        if self._sent <= self.burst:
            log.info(msg, *args)
        else:
            self.suppressed += 1


# ---------------------------------------------------------------------------- model


@dataclass
class LenderStats:
    sessions: int = 0
    guests_connected: int = 0
    grants: int = 0
    grant_acks: int = 0
    grant_nacks: int = 0
    revokes: int = 0
    staged: int = 0
    evictions: int = 0
    random_evictions: int = 0
    page_ins: int = 0
    page_in_failures: int = 0
    moves: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    # Freed VRAM filled with POISON (--poison): shows a soak's poison check had poison to find.
    bytes_poisoned: int = 0
    vram_used: int = 0
    vram_peak: int = 0
    vram_capacity: int = 0
    quarantined: int = 0
    protocol_errors: int = 0
    log_lines_suppressed: int = 0
    dmabuf_grants: int = 0


class RegionState(enum.Enum):
    ABSENT = "absent"  # not lent yet: the contents are zero
    LOADING = "loading"  # VRAM being filled and the GRANT being sent
    RESIDENT = "resident"  # lent: a lease is live (from its GRANT until REVOKED)
    EVICTING = "evicting"  # REVOKE sent, waiting for REVOKED
    SWAPPED = "swapped"  # contents in the backing store, no VRAM


@dataclass(eq=False)
class Region:
    """One chunk of one guest's aperture, and where its contents are."""

    session: GuestSession
    offset: int
    length: int
    state: RegionState = RegionState.ABSENT
    lease_id: int = 0
    extent: Extent | None = None
    home: Extent | None = None  # where it lived last: a page-in goes back there if it can
    swapped: bool = False  # the backing store holds its contents
    settled: trio.Event = field(default_factory=trio.Event)


class DmabufUnavailable(Exception):
    """`--fd-kind dmabuf` where no udmabuf can be made (the message says why)."""


MakeDmabuf = Callable[[int, int, int], int]
"""(memfd, offset, size) -> a dma-buf fd of that range: udmabuf_create, or a test's stand-in."""


def make_udmabuf(memfd: int, offset: int, size: int) -> int:
    """A udmabuf of a heap, or DmabufUnavailable saying what is missing."""
    missing = udmabuf_missing()
    if missing is not None:
        raise DmabufUnavailable(f"--fd-kind dmabuf needs udmabuf: {missing}")
    try:
        return udmabuf_create(memfd, offset, size)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EINVAL:
            hint = (
                " (a heap may be at most the udmabuf module's size_limit_mb, 64 MiB by "
                "default: use more --heaps or a smaller --vram)"
            )
        raise DmabufUnavailable(
            f"cannot make a {format_size(size)} udmabuf: {exc.strerror}{hint}"
        ) from None


class NoMemory(Exception):
    """Nothing can be evicted to make room."""


class SessionGone(Exception):
    """The guest's connection ended while something was being done for it."""


class GuestSession:
    """One device model: its connection, its aperture's regions and its backing store."""

    def __init__(self, lender: ReferenceLender, sock: trio.socket.SocketType, number: int):
        self.lender = lender
        self.sock = sock
        self.number = number
        self.conn = lp.LenderConnection()
        self.guest_id = -1
        self.peer_pid = 0
        self.aperture = 0
        self.granule = 0
        self.chunk = 0
        self.regions: dict[int, Region] = {}
        self.by_lease: dict[int, Region] = {}
        self.revoked: dict[int, trio.Event] = {}
        self.swap_fd = -1
        # The session agreed on dmabuf-grants and the lender lends dma-bufs: VRAM goes out as
        # the heaps' udmabufs.
        self.dmabuf = False
        self.populated = trio.Event()
        self.closed = False
        self.scope = trio.CancelScope()
        self._send_lock = trio.Lock()
        self._next_lease = 1
        self._buf = bytearray(65536)

    def __repr__(self) -> str:
        return f"guest {self.guest_id} (session {self.number})"

    def region(self, index: int) -> Region:
        r = self.regions.get(index)
        if r is None:
            offset = index * self.chunk
            r = Region(self, offset, min(self.chunk, self.aperture - offset))
            r.settled.set()
            self.regions[index] = r
        return r

    def covering(self, offset: int, length: int) -> list[Region]:
        first = offset // self.chunk
        last = (offset + length - 1) // self.chunk
        return [self.region(i) for i in range(first, last + 1)]

    # -- output

    async def send(self, event: lp.Event) -> None:
        async with self._send_lock:
            await self._send_locked(event)

    async def send_grant(self, region: Region, fd_offset: int, fd: int, flags: int = 0) -> int:
        """Send a GRANT for `region`; the lease id is taken under the lock so that ids go out
        strictly increasing whatever order concurrent page-ins reach this point in. `flags`
        carries the fd kind (FdKind.DMABUF for a udmabuf)."""
        async with self._send_lock:
            lease = self._next_lease
            self._next_lease += 1
            await self._send_locked(
                lp.Grant(lease, region.offset, region.length, fd_offset, PROT_RW, fd, flags)
            )
            self.by_lease[lease] = region
            return lease

    async def _send_locked(self, event: lp.Event) -> None:
        if self.closed:
            raise SessionGone(repr(self))
        try:
            out = self.conn.send(event)
            view = memoryview(out.data)
            with trio.fail_after(self.lender.write_timeout):
                if out.fds:
                    view = view[await self.sock.sendmsg([view], rights(out.fds)) :]
                while view:
                    view = view[await self.sock.send(view) :]
        except (OSError, ProtocolError, trio.TooSlowError) as exc:
            self.fail(f"cannot send {event.TYPE.name}: {exc or type(exc).__name__}")
            raise SessionGone(repr(self)) from None

    @property
    def sending(self) -> bool:
        """A message is partly written: nothing else may go on the stream now."""
        return self._send_lock.locked()

    def fail(self, why: str) -> None:
        if not self.closed:
            log.warning("%s: %s", self, why)
        self.closed = True
        self.scope.cancel()

    # -- input

    async def next_event(self) -> lp.Event | None:
        while True:
            try:
                event = self.conn.next_event()
            except lp.LeaseProtocolError as exc:
                self.lender.stats.protocol_errors += 1
                log.warning("%s: %s", self, exc)
                if exc.reply is not None:
                    with contextlib.suppress(SessionGone):
                        await self.send(exc.reply)
                if exc.fatal:
                    return None
                continue
            if event is CLOSED:
                return None
            if event is not NEED_DATA:
                assert not isinstance(event, type(NEED_DATA))
                return event
            nbytes, ancillary, flags, _ = await self.sock.recvmsg_into(
                [self._buf], ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
            )
            try:
                fds = fds_from_ancillary(ancillary, flags)
            except FdsTruncated:
                log.warning("%s: file descriptors lost (MSG_CTRUNC)", self)
                return None
            self.conn.receive_data(memoryview(self._buf)[:nbytes], fds)


class ReferenceLender:
    """Lends VRAM to any number of device models; see the module docstring."""

    def __init__(
        self,
        vram: int,
        *,
        heaps: int = 4,
        chunk: int | None = None,
        move_probability: float = 0.0,
        revoke_rate: float = 0.0,
        seed: int | None = None,
        poison: bool = False,
        name: str = "reference-lender",
        revoke_timeout: float = 10.0,
        page_in_timeout: float = 1.5,
        write_timeout: float = 5.0,
        fd_kind: str = "memfd",
        make_dmabuf: MakeDmabuf = make_udmabuf,
    ) -> None:
        if fd_kind not in ("memfd", "dmabuf"):
            raise ValueError(f"fd kind {fd_kind!r} is not memfd or dmabuf")
        self.vram = Vram(vram, heaps, align=max(chunk or 4096, 4096))
        self.fd_kind = fd_kind
        self.chunk = chunk
        self.move_probability = move_probability
        self.revoke_rate = revoke_rate
        self.rng = random.Random(seed)
        self.poison = poison
        self.name = name
        self.revoke_timeout = revoke_timeout
        self.page_in_timeout = page_in_timeout
        self.write_timeout = write_timeout
        self.heap_fds = [
            make_memfd(f"vram-heap{i}", self.vram.heap_size, seal=True)
            for i in range(len(self.vram.heaps))
        ]
        # --fd-kind dmabuf: one dma-buf per heap, of the same pages (see the module docstring).
        self.heap_dmabufs: list[int] = []
        if fd_kind == "dmabuf":
            try:
                for fd in self.heap_fds:
                    self.heap_dmabufs.append(make_dmabuf(fd, 0, self.vram.heap_size))
            except BaseException:
                self.close()
                raise
        self.sessions: list[GuestSession] = []
        self.lru: Lru[Region] = Lru()
        self._stats = LenderStats(vram_capacity=self.vram.capacity)
        self.events = EventLog()
        self._freed = trio.Event()  # set whenever VRAM is freed: wakes page-ins waiting for room
        self._nursery: trio.Nursery | None = None
        self._session_numbers = 0

    @property
    def stats(self) -> LenderStats:
        self._stats.vram_used = self.vram.used
        self._stats.vram_peak = self.vram.peak
        self._stats.guests_connected = len(self.sessions)
        self._stats.log_lines_suppressed = self.events.suppressed
        return self._stats

    def close(self) -> None:
        for fd in self.heap_fds + self.heap_dmabufs:
            os.close(fd)
        self.heap_fds = []
        self.heap_dmabufs = []

    def _scrub(self, extent: Extent, poison: bool) -> None:
        # Never punch holes under a udmabuf: it would keep serving the old pages.
        punch = not self.heap_dmabufs
        scrub(self.heap_fds[extent.heap], extent.offset, extent.length, poison, punch=punch)
        self._stats.bytes_poisoned += extent.length if poison else 0

    # ------------------------------------------------------------------ serving

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.revoke_rate > 0:
                nursery.start_soon(self._random_revocations)
            task_status.started()
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as exc:
                    # Out of fds and the like: wait a little rather than spin or die.
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                self._session_numbers += 1
                nursery.start_soon(self._serve_guest, sock, self._session_numbers)

    async def _serve_guest(self, sock: trio.socket.SocketType, number: int) -> None:
        """One device model, start to end. Nothing it does can take the lender down."""
        session = GuestSession(self, sock, number)
        try:
            with session.scope:
                if await self._handshake(session):
                    self.sessions.append(session)
                    self._stats.sessions += 1
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._quietly, self._populate(session))
                        await self._receive_loop(session, nursery)
                        nursery.cancel_scope.cancel()
        except OSError as exc:
            log.warning("%s: %s", session, exc)
        except Exception:
            log.exception("%s: internal error", session)
        finally:
            # Cancelled from outside session.scope (which stops at its own `with`): the whole
            # lender is stopping, and quarantining its memory would be pointless.
            stopping = trio.current_effective_deadline() == -math.inf
            with trio.CancelScope(shield=True):
                await self._end_session(session, stopping=stopping)

    async def _quietly(self, work: Awaitable[object]) -> None:
        """Run `work` as a task whose failure ends at most its session, never the lender."""
        try:
            await work
        except SessionGone:
            pass
        except Exception:
            log.exception("internal error")

    async def _handshake(self, session: GuestSession) -> bool:
        creds = session.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid, _gid = struct.unpack("3i", creds)
        session.peer_pid = pid
        # Lend only to device models of the same user (or root): section 2 of the spec.
        if uid not in (os.getuid(), 0):
            log.warning("refusing a connection from pid %d, uid %d", pid, uid)
            return False
        with trio.move_on_after(5.0):
            hello = await session.next_event()
            if not isinstance(hello, lp.Hello):
                return False
            granule = hello.granule
            chunk = max(self.chunk or granule, granule)
            session.guest_id = hello.guest_id
            if chunk % granule or chunk > self.vram.heap_size:
                with contextlib.suppress(SessionGone):
                    reason = lp.ByeReason.BAD_GEOMETRY
                    await session.send(lp.Bye(reason, f"cannot lend {format_size(chunk)} chunks"))
                return False
            session.aperture = hello.aperture_size
            session.granule = granule
            session.chunk = chunk
            # The backing store is lent too (_populate), so it is sealed like VRAM.
            swap_name = f"swap-guest{hello.guest_id}"
            session.swap_fd = make_memfd(swap_name, hello.aperture_size, seal=True)
            offer = FEATURE_DMABUF_GRANTS if self.fd_kind == "dmabuf" else 0
            try:
                # hello_reply narrows the offer to what the borrower offered: a borrower that
                # does not know dma-buf grants is lent memfds (6.3: never sent a dma-buf).
                await session.send(session.conn.hello_reply(self.name, features=offer))
            except SessionGone:
                return False
            session.dmabuf = bool(session.conn.features & FEATURE_DMABUF_GRANTS)
            self.events.info(
                "%s connected (pid %d, %s '%s', aperture %s, chunk %s, lending %s)",
                session,
                pid,
                f"v{hello.major}.{hello.minor}",
                hello.name,
                format_size(hello.aperture_size),
                format_size(chunk),
                "dma-bufs" if session.dmabuf else "memfds",
            )
            return True
        log.warning("session %d: no HELLO within 5 s", session.number)
        return False

    async def _receive_loop(self, session: GuestSession, nursery: trio.Nursery) -> None:
        while True:
            try:
                event = await session.next_event()
            except OSError as exc:
                log.warning("%s: %s", session, exc)
                return
            if event is None:
                return
            if isinstance(event, lp.GrantAck):
                self._stats.grant_acks += 1
            elif isinstance(event, lp.GrantNack):
                self._grant_refused(session, event.lease_id, code_name(NackReason, event.reason))
            elif isinstance(event, lp.Revoked):
                done = session.revoked.pop(event.lease_id, None)
                if done is not None:
                    done.set()
            elif isinstance(event, lp.PageIn):
                nursery.start_soon(self._quietly, self._page_in(session, event))
            elif isinstance(event, lp.Ping):
                nursery.start_soon(self._quietly, session.send(lp.Pong(event.token)))
            elif isinstance(event, lp.Error):
                log.warning(
                    "%s refused %s %d: %s",
                    session,
                    _type_name(event.ref_type),
                    event.ref_id,
                    event.text,
                )
                if event.ref_type == lp.MsgType.GRANT:
                    self._grant_refused(session, event.ref_id, "ERROR")
            elif isinstance(event, lp.Bye):
                self.events.info("%s said BYE: %s", session, event.text or event.reason)
                return
            # Pong: nothing to do (this lender does not ping).

    def _grant_refused(self, session: GuestSession, lease: int, why: str) -> None:
        """A NACKed grant never existed: its VRAM is free again, its contents where they were."""
        self._stats.grant_nacks += 1
        region = session.by_lease.pop(lease, None)
        log.warning("%s refused lease %d: %s", session, lease, why)
        if region is None or region.lease_id != lease or region.state is not RegionState.RESIDENT:
            return
        self.lru.discard(region)
        self._free_vram(region, scrub_it=False)
        region.state = RegionState.SWAPPED if region.swapped else RegionState.ABSENT

    async def _end_session(self, session: GuestSession, *, stopping: bool = False) -> None:
        """The connection is over: every lease of it ended with it (section 6.5)."""
        # Who ended it decides whether the memory may be reused at once. A borrower that
        # closes (or says BYE) has dropped every lease first; when this side ends it, the
        # borrower may still touch the pages until it reads the end of the stream, so they are
        # reused only once that process is gone.
        borrower_ended = session.conn.state in (lp.State.CLOSED, lp.State.BYE_RECEIVED)
        session.closed = True
        if session in self.sessions:
            self.sessions.remove(session)
        held: list[Extent] = []
        for region in session.regions.values():
            self.lru.discard(region)
            if region.extent is not None:
                held.append(region.extent)
                region.extent = None
            region.state = RegionState.ABSENT
            region.settled.set()
        for done in session.revoked.values():
            done.set()
        if session.conn.state is lp.State.OPEN and not session.sending:
            bye = session.conn.send(lp.Bye(lp.ByeReason.NORMAL, "lender stopping")).data
            with trio.move_on_after(0.2), contextlib.suppress(OSError):
                await session.sock.send(bye)
        session.conn.close()
        session.sock.close()
        if session.swap_fd >= 0:
            os.close(session.swap_fd)
            session.swap_fd = -1
        if borrower_ended or not held or stopping:
            self._release(held)
        elif self._nursery is not None and session.peer_pid > 0:
            self._stats.quarantined += sum(e.length for e in held)
            self._nursery.start_soon(self._quietly, self._release_when_gone(session, held))
        else:
            self._stats.quarantined += sum(e.length for e in held)
        if session.guest_id >= 0:
            self.events.info("%s disconnected", session)

    def _release(self, extents: list[Extent]) -> None:
        for extent in extents:
            self._scrub(extent, self.poison)
            self.vram.release(extent)
        if extents:
            self._freed.set()

    async def _release_when_gone(self, session: GuestSession, extents: list[Extent]) -> None:
        """Quarantine: the borrower never acknowledged these pages; reuse them after it exits."""
        try:
            pidfd = os.pidfd_open(session.peer_pid)
        except OSError:
            self._release(extents)  # already gone
            return
        try:
            log.warning(
                "%s: %s quarantined until pid %d exits",
                session,
                format_size(sum(e.length for e in extents)),
                session.peer_pid,
            )
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        self._stats.quarantined -= sum(e.length for e in extents)
        self._release(extents)

    # ------------------------------------------------------------------ lending

    async def _populate(self, session: GuestSession) -> None:
        """Lend the whole aperture: from VRAM while it lasts, the rest already evicted.

        A range is only ever paged in if it was lent and then evicted (a vacant range just
        gets the failure policy), so every chunk must be lent once. Chunks beyond the free
        VRAM are lent straight from the guest's backing store and revoked at once: no VRAM,
        no copy, and the backing store (sparse) holds their zeros until a page-in.
        """
        count = -(-session.aperture // session.chunk)
        index = 0
        while index < count:
            region = session.region(index)
            extent = self.vram.allocate(region.length, session.granule, self.rng)
            if extent is None:
                break
            region.state = RegionState.LOADING
            region.settled = trio.Event()
            region.extent = extent
            try:
                await self._lend(region)
            finally:
                region.settled.set()
            index += 1
        resident = index
        pending = iter(range(index, count))

        async def stager() -> None:
            for i in pending:
                await self._stage(session.region(i))

        async with trio.open_nursery() as nursery:
            for _ in range(min(STAGING_WORKERS, count - index)):
                nursery.start_soon(stager)
        session.populated.set()
        self.events.info(
            "%s: aperture lent, %d chunks resident, %d evicted", session, resident, count - resident
        )

    async def _stage(self, region: Region) -> None:
        """Lend a chunk from the backing store and take it back at once (see _populate)."""
        session = region.session
        if region.state is not RegionState.ABSENT:
            return
        region.state = RegionState.EVICTING
        region.settled = trio.Event()
        try:
            lease = await session.send_grant(region, region.offset, session.swap_fd)
            done = session.revoked[lease] = trio.Event()
            await session.send(lp.Revoke(lease, lp.RevokeMode.EVICT))
            with trio.move_on_after(self.revoke_timeout):
                await done.wait()
            if not done.is_set() and not session.closed:
                session.fail(f"no REVOKED for lease {lease} in {self.revoke_timeout:g} s")
            if session.closed:
                return
            session.by_lease.pop(lease, None)
            session.revoked.pop(lease, None)
            region.swapped = True
            region.state = RegionState.SWAPPED
            self._stats.staged += 1
        finally:
            region.settled.set()

    async def _lend(self, region: Region) -> None:
        """Fill the region's new extent with its contents and grant it (LOADING -> RESIDENT)."""
        session = region.session
        extent = region.extent
        assert extent is not None
        fd = self.heap_fds[extent.heap]
        if region.swapped:
            copy_range(session.swap_fd, region.offset, fd, extent.offset, region.length)
            self._stats.bytes_in += region.length
        else:
            self._scrub(extent, poison=False)
        if session.dmabuf:
            lease = await session.send_grant(
                region, extent.offset, self.heap_dmabufs[extent.heap], FdKind.DMABUF
            )
            self._stats.dmabuf_grants += 1
        else:
            lease = await session.send_grant(region, extent.offset, fd)
        if region.home is not None and region.home != extent:
            self._stats.moves += 1
        region.home = extent
        region.lease_id = lease
        region.state = RegionState.RESIDENT
        self.lru.touch(region)
        self._stats.grants += 1
        self.events.info(
            "%s: lease %d = aperture %#x+%s from heap %d at %#x",
            session,
            lease,
            region.offset,
            format_size(region.length),
            extent.heap,
            extent.offset,
        )

    async def _page_in(self, session: GuestSession, request: lp.PageIn) -> None:
        self._stats.page_ins += 1
        status = lp.PageInStatus.OK
        text = ""
        regions = session.covering(request.offset, request.length)
        wanted = set(regions)
        try:
            with trio.fail_after(self.page_in_timeout):
                for region in regions:
                    await self._make_resident(region, wanted)
        except NoMemory as exc:
            status, text = lp.PageInStatus.NO_MEMORY, str(exc)
        except trio.TooSlowError:
            status, text = lp.PageInStatus.BUSY, "could not make room in time"
        except SessionGone:
            return
        if status != lp.PageInStatus.OK:
            self._stats.page_in_failures += 1
            log.warning("%s: page-in %d failed: %s", session, request.request_id, text)
        with contextlib.suppress(SessionGone):
            # The GRANTs went out first, on the same ordered stream.
            await session.send(lp.PageInDone(request.request_id, status, text))
        self.events.info(
            "%s: page-in %d of %#x+%s: %s",
            session,
            request.request_id,
            request.offset,
            format_size(request.length),
            code_name(lp.PageInStatus, status),
        )

    async def _make_resident(self, region: Region, wanted: set[Region]) -> None:
        session = region.session
        while True:
            if session.closed:
                raise SessionGone(repr(session))
            if region.state is RegionState.RESIDENT:
                self.lru.touch(region)
                return
            if region.state in (RegionState.ABSENT, RegionState.SWAPPED):
                break
            await region.settled.wait()  # an eviction or another page-in is under way
        region.state = RegionState.LOADING
        region.settled = trio.Event()
        try:
            region.extent = await self._allocate(region, wanted)
            await self._lend(region)
        finally:
            if region.state is RegionState.LOADING:  # failed: back to where it was
                if region.extent is not None:
                    self._free_vram(region, scrub_it=False)
                region.state = RegionState.SWAPPED if region.swapped else RegionState.ABSENT
            region.settled.set()

    async def _allocate(self, region: Region, wanted: set[Region]) -> Extent:
        """VRAM for `region`, evicting least recently used buffers (never `wanted` ones)."""
        granule = region.session.granule
        while True:
            move = region.home is not None and self.rng.random() < self.move_probability
            extent = self.vram.allocate(
                region.length, granule, self.rng, home=region.home, move=move
            )
            if extent is not None:
                return extent
            victim = self.lru.oldest(lambda r: r.state is RegionState.RESIDENT and r not in wanted)
            if victim is not None:
                await self._evict(victim)
                continue
            if any(r.state is RegionState.EVICTING for r in self._all_regions()):
                if self._freed.is_set():
                    self._freed = trio.Event()
                await self._freed.wait()
                continue
            raise NoMemory(
                f"{format_size(region.length)} wanted, {format_size(self.vram.free_bytes)} free "
                "and nothing left to evict"
            )

    def _all_regions(self) -> list[Region]:
        return [r for session in self.sessions for r in session.regions.values()]

    def _free_vram(self, region: Region, *, scrub_it: bool) -> None:
        extent = region.extent
        assert extent is not None
        if scrub_it:
            self._scrub(extent, self.poison)
        self.vram.release(extent)
        region.extent = None
        self._freed.set()

    # ------------------------------------------------------------------ evicting

    async def _evict(self, region: Region) -> bool:
        """REVOKE(EVICT), wait for REVOKED, copy out, free. False if it was not resident."""
        if region.state is not RegionState.RESIDENT:
            return False
        session = region.session
        lease = region.lease_id
        region.state = RegionState.EVICTING
        region.settled = trio.Event()
        self.lru.discard(region)
        done = session.revoked[lease] = trio.Event()
        try:
            await session.send(lp.Revoke(lease, lp.RevokeMode.EVICT))
            self._stats.revokes += 1
            with trio.move_on_after(self.revoke_timeout):
                await done.wait()
            if session.closed:
                return False  # _end_session took care of the memory
            if not done.is_set():
                # No REVOKED, no guarantee: ending the session quarantines the pages.
                session.fail(f"no REVOKED for lease {lease} in {self.revoke_timeout:g} s")
                return False
            # REVOKED: nothing on the borrower side can touch the pages; they are ours again.
            extent = region.extent
            assert extent is not None
            fd = self.heap_fds[extent.heap]
            copy_range(fd, extent.offset, session.swap_fd, region.offset, region.length)
            self._stats.bytes_out += region.length
            region.swapped = True
            self._free_vram(region, scrub_it=True)
            session.by_lease.pop(lease, None)
            region.state = RegionState.SWAPPED
            self._stats.evictions += 1
            self.events.info("%s: evicted lease %d (%#x)", session, lease, region.offset)
            return True
        except SessionGone:
            return False
        except OSError as exc:
            session.fail(f"cannot evict lease {lease}: {exc}")
            return False
        finally:
            session.revoked.pop(lease, None)
            region.settled.set()
            self._freed.set()  # freed, or at least no longer in flight: re-check for room

    async def evict(self, guest_id: int, lease_id: int) -> bool:
        """Evict one lease of a guest (its newest session); False if it is not resident."""
        for session in reversed(self.sessions):
            if session.guest_id == guest_id:
                region = session.by_lease.get(lease_id)
                return region is not None and await self._evict(region)
        return False

    async def evict_all(self) -> int:
        """Evict every resident buffer of every guest at once; the number evicted."""
        victims = [r for r in self.lru if r.state is RegionState.RESIDENT]
        results: list[bool] = []

        async def one(region: Region) -> None:
            results.append(await self._evict(region))

        async with trio.open_nursery() as nursery:
            for region in victims:
                nursery.start_soon(one, region)
        evicted = sum(results)
        # Always logged, not rate-limited like the per-lease events around it: it answers an
        # operator's SIGUSR1, and the Xen test bed waits for this line (dom0/lender-bg).
        log.info("evicted everything: %d buffers", evicted)
        return evicted

    def resident(self) -> list[tuple[int, int]]:
        """(guest id, lease id) of every resident buffer, least recently used first."""
        return [
            (r.session.guest_id, r.lease_id) for r in self.lru if r.state is RegionState.RESIDENT
        ]

    async def _random_revocations(self) -> None:
        assert self._nursery is not None
        while True:
            await trio.sleep(self.rng.expovariate(self.revoke_rate))
            candidates = [r for r in self.lru if r.state is RegionState.RESIDENT]
            if candidates:
                self._stats.random_evictions += 1
                self._nursery.start_soon(self._quietly, self._evict(self.rng.choice(candidates)))


def _type_name(raw: int) -> str:
    try:
        return lp.MsgType(raw).name
    except ValueError:
        return f"type {raw:#06x}"


# ---------------------------------------------------------------------------- command line


async def bind_listener(path: str) -> trio.socket.SocketType:
    """Listen on `path`, replacing a stale socket file left by a dead lender (not a live one)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
            else:
                raise SystemExit(f"another lender is serving on {path}")
            finally:
                probe.close()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(64)
    return sock


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    def size(text: str) -> int:
        try:
            return parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--socket", required=True, metavar="PATH", help="unix socket to listen on")
    p.add_argument("--vram", type=size, default=256 << 20, help="VRAM budget (K/M/G suffixes)")
    p.add_argument("--heaps", type=int, default=4, help="VRAM heaps (memfds), default 4")
    p.add_argument("--chunk", type=size, help="lease size (default: each guest's granule)")
    p.add_argument("--move-probability", type=float, default=0.0, metavar="P")
    p.add_argument("--revoke-rate", type=float, default=0.0, metavar="PER_SECOND")
    p.add_argument("--seed", type=int)
    p.add_argument("--poison", action="store_true", help="fill freed VRAM with 0xdeadbeef")
    p.add_argument(
        "--fd-kind",
        choices=["memfd", "dmabuf"],
        default="memfd",
        help="lend VRAM as memfds (default) or as udmabufs made from them (needs /dev/udmabuf)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if not 0.0 <= args.move_probability <= 1.0:
        p.error("--move-probability must be between 0 and 1")
    if args.revoke_rate < 0:
        p.error("--revoke-rate must not be negative")
    return args


async def _main(args: argparse.Namespace) -> LenderStats:
    lender = ReferenceLender(
        args.vram,
        heaps=args.heaps,
        chunk=args.chunk,
        move_probability=args.move_probability,
        revoke_rate=args.revoke_rate,
        seed=args.seed,
        poison=args.poison,
        fd_kind=args.fd_kind,
    )
    listener = await bind_listener(args.socket)
    stops = (signal.SIGINT, signal.SIGTERM)
    try:
        with trio.open_signal_receiver(*stops, signal.SIGUSR1, signal.SIGUSR2) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(lender.serve, listener)
                log.info(
                    "listening on %s: VRAM %s in %d heaps",
                    args.socket,
                    format_size(lender.vram.capacity),
                    len(lender.vram.heaps),
                )
                print(f"listening on {args.socket}", flush=True)
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        nursery.start_soon(lender.evict_all)
                    elif signum == signal.SIGUSR2:
                        log.info("stats: %s", asdict(lender.stats))
                    else:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        break
                nursery.cancel_scope.cancel()
        return lender.stats
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
        lender.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s lender[%(process)d] %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        stats = trio.run(_main, args)
    except DmabufUnavailable as exc:
        print(f"reference-lender: {exc}", file=sys.stderr)
        return 1
    print("summary:")
    for key, value in asdict(stats).items():
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
