"""The libvfio-user transport: the same device backend served through libvfio-user (ctypes).

A second way to speak vfio-user, through the C library QEMU's and SPDK's servers are built on,
for a site that trusts that library rather than devmodel's own server (vfio_user.py). It is
one more thin loop over the device backend (devmodel/backend): the library decodes the wire,
and its region callbacks call the same regions the native transport calls.

Who runs what:
- The trio loop stays in charge. It waits for `vfu_get_poll_fd()` to be readable, then lets
  the library run non-blocking (LIBVFIO_USER_FLAG_ATTACH_NB: `vfu_attach_ctx` and
  `vfu_run_ctx` return at once, EAGAIN / 0 when there is nothing to do).
- Before the library reads a request, a peek at the socket (`_plan`) decides who runs it,
  for every whole request the peek sees (one peek per batch: a guest's posted writes arrive
  in streams). A request no callback can wait in (a control request, a config access, a BAR
  access that `read_now`/`write_now` answers: resident memory, a register) is run by
  `vfu_run_ctx` right in the trio thread, its answer found before the call and handed to the
  callback.
- Any other request (a fault on an evicted window, a refused access, one not whole in the
  socket yet) is run in one worker thread (trio.to_thread), because the library's region
  callbacks are synchronous: a read of an evicted window must wait for the lender's PAGE_IN,
  and that PAGE_IN arrives on the lender link, a trio task. The worker blocks in the callback;
  the trio thread keeps running the lender link, the control socket and the REPL.
- A callback in the worker reaches the device through `trio.from_thread.run`, so the lease
  engine, the region bus and the PCI function are only ever touched by the trio thread, as
  with every other transport. No thread but the trio thread reads or writes lent memory, so
  the engine's revoke guarantee (no access touches a mapping after its REVOKED) holds here
  unchanged: the worker only copies the bytes the trio side hands it.
- The library is not thread-safe: the context is used by one thread at a time. The trio thread
  calls it (attach, poll fd) only while no worker is in it; there is at most one worker.

Every wait is bounded: the engine bounds a page-in by --page-in-timeout, and the transport
gives up on an access (EIO to the client) `wait_limit` seconds after it started, whatever the
engine does. On a stop the access being served is cancelled (EIO to the client).

Interrupts: the library keeps the client's eventfds (one array for INTx, MSI and MSI-X, the
last index the client set up) and offers `vfu_irq_trigger(vector)`. The function's IrqTable
keeps masks, INTx's level and pending bits as with the native transport and signals through
`_signal`, which calls `vfu_irq_trigger` only while no worker is inside the library, or while
the worker is parked in one of devmodel's callbacks (blocked on the trio thread, so the library
is not running); otherwise the vector is left pending and signalled when the worker is back.
The client's INTx mask and unmask reach the table through the library's IRQ state callback
(QEMU unmasks after the guest's EOI; a still asserted line fires again). The library does not
report eventfds being attached, so a signal that found none (ENOENT) stays pending and is tried
again after every SET_IRQS the transport sees go by.

Config space stays devmodel's: the config region is registered with VFU_REGION_FLAG_ALWAYS_CB,
so the library's own header emulation (32-bit BARs only in Debian's copy) never answers, and
BAR0 stays the 64-bit prefetchable BAR the PCI function defines. What remains is the library's
region size, a uint32_t: BAR0 (a power of two) can be at most 2 GiB here (see MAX_APERTURE).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Final

import trio

from devmodel.backend.device import BAR_INDEXES, DeviceBackend
from devmodel.counters import DeviceCounters
from devmodel.pci.errors import AccessError
from devmodel.pci.function import REGION_CONFIG
from devmodel.pci.irqs import IrqIndex
from devmodel.transports import libvfio_user_lib as lvu

__all__ = [
    "MAX_APERTURE",
    "RUN_BATCH",
    "STOP_DRAIN_SECONDS",
    "LibVfioUserError",
    "LibVfioUserServer",
]

log = logging.getLogger("devmodel.libvfio_user")

MAX_APERTURE: Final = 2 << 30
"""The largest BAR the library can describe: its region size is a uint32_t, a BAR a power of
two. (Upstream libvfio-user grew 64-bit regions after the copy Debian bundles.)"""
STOP_DRAIN_SECONDS: Final = 0.5
"""How long a graceful stop may spend answering what the client already sent."""
RUN_BATCH: Final = 64
"""Requests served at most, in the trio thread or in one trip to the worker, before the trio
thread looks at its other tasks again."""

_HEADER: Final = struct.Struct("<HHIII")
"""vfio-user's message header: msg_id, command, size, flags, error."""
_ACCESS: Final = struct.Struct("<QII")
"""REGION_READ/WRITE's access header: offset, region, count."""
_ACCESS_END: Final = _HEADER.size + _ACCESS.size
_SET_IRQS: Final = 8
_REGION_READ: Final = 9
_REGION_WRITE: Final = 10
_PEEK: Final = 4096 + _ACCESS_END
"""How much a peek looks at: a whole write of up to 4 KiB."""

_Planned = tuple[int, int, int, bytes | None]
"""A BAR access `_plan` answered: region, offset, count, the data read (None: a write)."""

_SYSLOG_LEVELS: Final = {0: 50, 1: 50, 2: 50, 3: 40, 4: 30, 5: 20, 6: 20, 7: 10}
"""syslog(3) priority -> logging level."""

_libc = ctypes.CDLL(None, use_errno=True)
_errno_location = _libc.__errno_location
_errno_location.restype = ctypes.POINTER(ctypes.c_int)
_errno_location.argtypes = []


def _fail(code: int) -> int:
    """Return -1 from a callback with errno set in the calling (worker) thread, as C would."""
    _errno_location()[0] = code
    return -1


class LibVfioUserError(Exception):
    """The library refused to set the device up (the message says which call and why)."""


class LibVfioUserServer:
    """Serves a device backend to one vfio-user client at a time through libvfio-user."""

    def __init__(
        self,
        backend: DeviceBackend,
        counters: DeviceCounters,
        socket_path: str,
        *,
        on_client: Callable[[str], None] | None = None,
        wait_limit: float = 10.0,
        lib: lvu.LibVfioUser | None = None,
    ) -> None:
        self.backend = backend
        self.counters = counters
        self.socket_path = socket_path
        self.wait_limit = wait_limit
        self.lib = lib if lib is not None else lvu.load()
        self.connected = False
        self._on_client = on_client
        self._ctx: int | None = None
        # A worker is (or was abandoned) inside vfu_attach_ctx: the context is not ours to free.
        self._attaching = False
        # A worker is inside vfu_run_ctx.
        self._busy = False
        # A graceful stop began (`drain`): accesses that would wait are answered EIO at once.
        self._stopping = False
        # The wait of the access being served, cancelled by `drain`.
        self._waiting: trio.CancelScope | None = None
        # The answers `_plan` found for the requests the trio thread lets the library serve
        # (None: a request with no BAR access, served by its callback), and the one the
        # request being served now gets.
        self._planned: collections.deque[_Planned | None] = collections.deque()
        self._prepared: _Planned | None = None
        # A socket object over the library's connection fd, for peeking (never closed here).
        self._peeker: socket.socket | None = None
        self._trio_thread = threading.get_ident()
        # The worker is blocked in one of devmodel's callbacks, waiting on the trio thread:
        # the library is not running, so the trio thread may trigger an interrupt.
        self._parked = False
        # An interrupt was left pending because the worker was in the library.
        self._retry = False
        # The command of the lone control request `_plan` last let the trio thread serve.
        self._peeked_command = 0
        # ctypes callbacks must outlive the context: the library keeps raw pointers to them.
        self._keep: list[Any] = []

    # --- set-up -------------------------------------------------------------------------------

    def _check(self, what: str, rc: int) -> None:
        if rc < 0:
            code = ctypes.get_errno()
            raise LibVfioUserError(f"libvfio-user {what}: {os.strerror(code)}")

    def open(self) -> None:
        """Create the context, describe the device, bind the socket (LibVfioUserError)."""
        lib, backend = self.lib, self.backend
        function = backend.function
        size0 = backend.region_size(0) or 0
        if size0 > MAX_APERTURE:
            raise LibVfioUserError(
                f"libvfio-user describes a region's size in 32 bits: BAR0 can be at most "
                f"{MAX_APERTURE >> 30} GiB with this transport (use --transport vfio-user)"
            )
        ctx = lib.vfu_create_ctx(
            lvu.VFU_TRANS_SOCK,
            self.socket_path.encode(),
            lvu.LIBVFIO_USER_FLAG_ATTACH_NB,
            None,
            lvu.VFU_DEV_TYPE_PCI,
        )
        if not ctx:
            code = ctypes.get_errno()
            raise LibVfioUserError(
                f"libvfio-user cannot listen on {self.socket_path}: {os.strerror(code)}"
            )
        self._ctx = ctx
        try:
            log_cb = lvu.LogCallback(self._log)
            self._keep.append(log_cb)
            self._check("vfu_setup_log", lib.vfu_setup_log(ctx, log_cb, 4))  # LOG_WARNING
            self._check(
                "vfu_pci_init",
                lib.vfu_pci_init(ctx, lvu.VFU_PCI_TYPE_CONVENTIONAL, lvu.PCI_HEADER_TYPE_NORMAL, 0),
            )
            identity = function.identity
            lib.vfu_pci_set_id(
                ctx,
                identity.vendor_id,
                identity.device_id,
                identity.subsystem_vendor_id,
                identity.subsystem_id,
            )
            for bar in BAR_INDEXES:
                size = backend.region_size(bar) or 0
                if size:
                    self._region(bar, size, lvu.VFU_REGION_FLAG_RW | lvu.VFU_REGION_FLAG_MEM)
            # Every config access goes to devmodel's config space, header included.
            self._region(
                REGION_CONFIG,
                function.config_size,
                lvu.VFU_REGION_FLAG_RW | lvu.VFU_REGION_FLAG_ALWAYS_CB,
            )
            reset_cb = lvu.ResetCallback(self._reset)
            self._keep.append(reset_cb)
            self._check("vfu_setup_device_reset_cb", lib.vfu_setup_device_reset_cb(ctx, reset_cb))
            # DMA maps are accepted and kept by the library (devmodel's device does no DMA).
            self._check("vfu_setup_device_dma", lib.vfu_setup_device_dma(ctx, None, None))
            for index, spec in enumerate(backend.irqs.specs):
                self._check(
                    f"vfu_setup_device_nr_irqs({index})",
                    lib.vfu_setup_device_nr_irqs(ctx, index, spec.count),
                )
            irq_state_cb = lvu.IrqStateCallback(self._irq_state)
            self._keep.append(irq_state_cb)
            self._check(
                "vfu_setup_irq_state_callback(INTx)",
                lib.vfu_setup_irq_state_callback(ctx, lvu.VFU_DEV_INTX_IRQ, irq_state_cb),
            )
            backend.irqs.external = self._signal
            self._check("vfu_realize_ctx", lib.vfu_realize_ctx(ctx))
        except BaseException:
            self.close()
            raise

    def _region(self, index: int, size: int, flags: int) -> None:
        cb = lvu.RegionAccessCallback(self._access_callback(index))
        self._keep.append(cb)
        assert self._ctx is not None
        rc = self.lib.vfu_setup_region(self._ctx, index, size, cb, flags, None, 0, -1, 0)
        self._check(f"vfu_setup_region({index})", rc)

    def close(self) -> None:
        """Destroy the context (its socket goes with it). Never while a worker is in it."""
        if self.backend.irqs.external == self._signal:
            self.backend.irqs.external = None
        self._forget_peeker()
        ctx, self._ctx = self._ctx, None
        if ctx is not None and not self._attaching:
            self.lib.vfu_destroy_ctx(ctx)
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)

    # --- the loop -----------------------------------------------------------------------------

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Attach clients one after another and serve each until it leaves (until cancelled)."""
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("LibVfioUserServer.open() was not called")
        lib = self.lib
        self._trio_thread = threading.get_ident()
        task_status.started()
        while True:
            # No worker is in the library now: the trio thread may ask it for its fd.
            await trio.lowlevel.wait_readable(lib.vfu_get_poll_fd(ctx))
            # Attaching accepts the connection and then reads the client's VERSION with a
            # blocking receive, so it runs in the worker too. A client that connects and never
            # speaks holds it there: a stop abandons that thread, and `close` then leaves the
            # context to the process's exit rather than destroy it under the thread.
            self._attaching = True
            rc, code = await trio.to_thread.run_sync(self._attach, ctx, abandon_on_cancel=True)
            self._attaching = False
            if rc < 0:
                if code not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    log.info("libvfio-user did not attach a client: %s", os.strerror(code))
                continue
            self.counters.client_connects += 1
            self.connected = True
            log.info("client connected")
            if self._on_client:
                self._on_client("connected")
            try:
                await self._serve_client(ctx)
            finally:
                self.connected = False
                # The library closed the client's eventfds; its masks go too (a new client
                # starts unmasked, as with the native server). INTx's level stays.
                self.backend.irqs.close()
                log.info("client gone")
                if self._on_client:
                    self._on_client("disconnected")

    async def drain(self) -> None:
        """A graceful stop, before any task is cancelled: answer what the client already sent.

        Called while the lender link still holds its leases, so queued reads of resident
        memory are answered with their data (once tasks are cancelled, the link's teardown
        takes lent memory away). The access waiting on a page-in, and any later one that
        would wait, is answered EIO at once. At most STOP_DRAIN_SECONDS.
        """
        self._stopping = True
        if self._waiting is not None:
            self._waiting.cancel()
        with trio.move_on_after(STOP_DRAIN_SECONDS):
            while self.connected and (self._busy or self._readable()):
                await trio.sleep(0.002)

    def _readable(self) -> bool:
        """Whether the client's socket holds unread requests (no worker is in the library)."""
        if self._ctx is None:
            return False
        poller = select.poll()
        poller.register(self.lib.vfu_get_poll_fd(self._ctx), select.POLLIN)
        return bool(poller.poll(0))

    async def _serve_client(self, ctx: int) -> None:
        try:
            await self._serve_requests(ctx)
        except trio.Cancelled:
            await self._drain_on_stop(ctx)
            raise
        finally:
            self._forget_peeker()

    def _forget_peeker(self) -> None:
        """The library owns the connection's fd: the peeking socket object must never close
        it (garbage-collected, it would close whatever has that number by then)."""
        sock, self._peeker = self._peeker, None
        if sock is not None:
            sock.detach()

    async def _drain_on_stop(self, ctx: int) -> None:
        """On a stop, answer what the client already sent before the socket closes.

        As the native transport does (vfio_user.py, `_drain_on_stop`): QEMU aborts when its
        socket is reset under it, which closing it with unread requests does. Within
        STOP_DRAIN_SECONDS; an access that would wait longer is answered EIO.
        """
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + STOP_DRAIN_SECONDS
            while True:
                self._busy = True
                try:
                    rc, _ = await trio.to_thread.run_sync(self._run_some, ctx)
                finally:
                    self._busy = False
                if rc <= 0:
                    return

    async def _serve_requests(self, ctx: int) -> None:
        lib = self.lib
        follow_up = self.backend.follow_up
        while True:
            if follow_up is not None:
                follow_up()  # the library's replies are out: what an access put off runs now
            fd = lib.vfu_get_poll_fd(ctx)
            await trio.lowlevel.wait_readable(fd)
            # Requests that need no wait are served right here, in the trio thread, planned a
            # batch per peek; the first one that may wait (or the end of the batch) hands over
            # to the worker.
            served, rc, code = 0, 0, 0
            planned: int | None = 0
            while served < RUN_BATCH:
                planned = self._plan(fd, RUN_BATCH - served)
                if not planned:
                    break
                rc, code = self._run_planned(ctx)
                served += planned
                if self._peeked_command == _SET_IRQS:
                    # The client attached eventfds: what was raised without one goes now.
                    self._peeked_command = 0
                    self._redeliver()
                if rc < 0:
                    break
            if rc >= 0:
                if served == RUN_BATCH:
                    # Fair to every other task: a client that streams never runs dry.
                    await trio.lowlevel.checkpoint()
                    continue
                if planned is None:
                    continue  # the socket is empty
                # Not abandoned on cancel: the worker is inside the library, which must
                # finish the request (a cancelled access answers EIO) before anyone else
                # may touch it.
                self._busy = True
                try:
                    rc, code = await trio.to_thread.run_sync(self._run_some, ctx)
                finally:
                    self._busy = False
                    if self._retry:  # raised while the worker was in the library
                        self._retry = False
                        self._redeliver()
            if rc >= 0:
                continue
            if code == errno.ENOTCONN:
                return
            if code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.EBUSY):
                continue
            # Anything else is the library dropping this client (bad framing and the like).
            self.counters.protocol_errors += 1
            log.error("libvfio-user dropped the client: %s", os.strerror(code))
            return

    def _run_planned(self, ctx: int) -> tuple[int, int]:
        """In the trio thread: let the library serve the requests `_plan` planned, one
        `vfu_run_ctx` each (the library serves one request per call when non-blocking), each
        callback handed its planned answer. On an error the rest of the plan is dropped, and
        so it is if the library served nothing (it cannot, with the request whole in the socket;
        the next plan would see the rest again, never a callback the answer of another)."""
        run, plan = self.lib.vfu_run_ctx, self._planned
        try:
            while plan:
                self._prepared = plan.popleft()
                rc = run(ctx)
                if rc < 0:
                    return rc, ctypes.get_errno()
                if rc == 0:
                    break
            return 0, 0
        finally:
            self._prepared = None
            plan.clear()

    def _peek_socket(self, fd: int) -> socket.socket:
        sock = self._peeker
        if sock is None or sock.fileno() != fd:
            if sock is not None:
                sock.detach()
            sock = self._peeker = socket.socket(fileno=fd)
        return sock

    def _plan(self, fd: int, limit: int) -> int | None:
        """How many requests at the head of the socket the trio thread may let the library
        serve now, without a wait (at most `limit`); 0 when the first one must go to the
        worker, None when the socket is empty (a closed connection is 0: the worker hears it).

        The library decodes requests itself, so the decision is made on one peek at the
        socket, for a batch: a streaming client (a guest's posted writes) costs one peek per
        batch, not one per request. What may be served inline: a control request or a config
        access (alone: it may change what the next access finds, so it ends the batch), or a
        run of BAR accesses that `read_now` / `write_now` serve (resident memory, a register),
        each planned in order, its answer queued in `_planned` for its callback. A write is
        applied here, in order with the reads planned after it; with no await between the
        plan and `_run_planned`, no task (no revoke) sees the plan half done. Anything that
        may wait, or is not whole in the socket yet (the library would block reading the
        rest), ends the batch, and goes to the worker if it is first.
        """
        sock = self._peek_socket(fd)
        try:
            head = sock.recv(_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return 0  # the worker sees the error the library reports
        plan = self._planned
        at, end = 0, len(head)
        while len(plan) < limit and end - at >= _HEADER.size:
            command, size, flags = _HEADER.unpack_from(head, at)[1:4]
            size = int(size)
            if end - at < max(size, _HEADER.size):
                break  # only a whole message is served inline
            if command not in (_REGION_READ, _REGION_WRITE) or flags & 0xF != 0:
                # Not an access (or not a request): no region callback may wait. Alone.
                if not plan:
                    plan.append(None)
                    self._peeked_command = int(command)
                break
            if size < _ACCESS_END:
                break  # framing the library refuses: the worker hears it
            offset, index, count = _ACCESS.unpack_from(head, at + _HEADER.size)
            if index == REGION_CONFIG or not 0 <= index < len(BAR_INDEXES):
                # Config space never waits; an index with no region the library refuses
                # itself. Alone.
                if not plan:
                    plan.append(None)
                break
            region = self.backend.lookup(index)
            if command == _REGION_READ:
                if size != _ACCESS_END:
                    break
                data = region.read_now(offset, count)
                if data is None:
                    break
                plan.append((index, offset, count, data))
            else:
                if size != _ACCESS_END + count:
                    break
                if not region.write_now(offset, head[at + _ACCESS_END : at + size]):
                    break
                plan.append((index, offset, count, None))
            at += size
        return len(plan)

    def _attach(self, ctx: int) -> tuple[int, int]:
        """In the worker: accept a client and negotiate its version."""
        rc = self.lib.vfu_attach_ctx(ctx)
        return rc, ctypes.get_errno() if rc < 0 else 0

    def _run_some(self, ctx: int) -> tuple[int, int]:
        """In the worker: serve what the socket holds (at most RUN_BATCH requests)."""
        run = self.lib.vfu_run_ctx
        done = 0
        for _ in range(RUN_BATCH):
            rc = run(ctx)
            if rc < 0:
                return rc, ctypes.get_errno()
            if rc == 0:
                break
            done += rc
        return done, 0

    # --- callbacks (in the worker thread) -----------------------------------------------------

    def _access_callback(self, index: int) -> Callable[[int, int, int, int, bool], int]:
        from_trio = trio.from_thread.run
        read, write = self._read, self._write

        def access(ctx: int, buf: int, count: int, offset: int, is_write: bool) -> int:
            if threading.get_ident() == self._trio_thread:
                return self._inline(index, buf, count, offset, is_write)
            self._parked = True
            try:
                if is_write:
                    from_trio(write, index, offset, ctypes.string_at(buf, count))
                    return count
                data = from_trio(read, index, offset, count)
            except AccessError as exc:
                return _fail(exc.errno)
            except BaseException:  # nothing may unwind into C; a stop (Cancelled) is EIO
                return _fail(errno.EIO)
            finally:
                self._parked = False
            ctypes.memmove(buf, data, len(data))
            return len(data)

        return access

    def _inline(self, index: int, buf: int, count: int, offset: int, is_write: bool) -> int:
        """A callback in the trio thread: config space, or the access `_plan` answered."""
        try:
            if index == REGION_CONFIG:
                if is_write:
                    self.backend.config_write(offset, ctypes.string_at(buf, count))
                    return count
                data = self.backend.config_read(offset, count)
            else:
                prepared, self._prepared = self._prepared, None
                if prepared is None or prepared[:3] != (index, offset, count):
                    # The library called back for something the peek did not see: never
                    # wait in the trio thread; the client gets EIO and a log line.
                    log.error("libvfio-user: unexpected access %d+%#x:%d", index, offset, count)
                    return _fail(errno.EIO)
                if is_write:
                    return count
                data = prepared[3] or b""
        except AccessError as exc:
            return _fail(exc.errno)
        except BaseException:  # nothing may unwind into C
            return _fail(errno.EIO)
        ctypes.memmove(buf, data, len(data))
        return len(data)

    async def _read(self, index: int, offset: int, count: int) -> bytes:
        if index == REGION_CONFIG:
            return self.backend.config_read(offset, count)
        region = self.backend.lookup(index)
        data = region.read_now(offset, count)
        if data is not None:
            return data
        with self._bounded() as scope:
            data = await region.read(offset, count)
            self._waiting = None
            return data
        raise self._gave_up(scope, "read", index, offset)

    def _bounded(self) -> trio.CancelScope:
        """The scope an access waits in: `wait_limit`, cancelled by a stop."""
        if self._stopping:
            raise AccessError(errno.EIO, "the device model is stopping")
        scope = self._waiting = trio.move_on_after(self.wait_limit)
        return scope

    def _gave_up(self, scope: trio.CancelScope, what: str, index: int, offset: int) -> AccessError:
        self._waiting = None
        why = "stopping" if self._stopping else "no answer in time"
        return AccessError(errno.EIO, f"region {index} {what} at {offset:#x}: {why}")

    async def _write(self, index: int, offset: int, data: bytes) -> None:
        if index == REGION_CONFIG:
            self.backend.config_write(offset, data)
            return
        region = self.backend.lookup(index)
        if region.write_now(offset, data):
            return
        with self._bounded() as scope:
            await region.write(offset, data)
            self._waiting = None
            return
        raise self._gave_up(scope, "write", index, offset)

    def _reset(self, ctx: int, kind: int) -> int:
        if kind in (lvu.VFU_RESET_DEVICE, lvu.VFU_RESET_PCI_FLR):
            try:
                if threading.get_ident() == self._trio_thread:
                    self.backend.reset()
                else:
                    trio.from_thread.run_sync(self.backend.reset)
            except BaseException:  # nothing may unwind into C; a stop (Cancelled) is EIO
                return _fail(errno.EIO)
            log.info("device reset by the client")
        return 0

    # --- interrupts -----------------------------------------------------------------------------

    def _signal(self, index: int, vector: int) -> bool:
        """The IrqTable's signaller (trio thread): True if the interrupt went out, False to
        leave it pending (no client, no eventfd for it, or the worker in the library)."""
        ctx = self._ctx
        if ctx is None or not self.connected:
            return False
        if (self._busy and not self._parked) or self._attaching:
            # The worker is inside the library, which is not thread-safe: left pending, and
            # signalled once the worker is back (`_redeliver`).
            self._retry = True
            return False
        config = self.backend.function.config
        if index != (
            IrqIndex.MSIX
            if config.msix_enabled
            else IrqIndex.MSI
            if config.msi_enabled
            else IrqIndex.INTX
        ):
            # The library's one eventfd array belongs to the mechanism the guest enabled:
            # a vector left pending under another one must not fire through it.
            return False
        if self.lib.vfu_irq_trigger(ctx, vector) == 0:
            return True
        code = ctypes.get_errno()
        if code != errno.ENOENT:  # ENOENT: no eventfd attached, an ordinary pending interrupt
            log.warning("libvfio-user: interrupt %s/%d: %s", index, vector, os.strerror(code))
        return False

    def _redeliver(self) -> None:
        """Try every pending, unmasked vector again: after the worker leaves the library, and
        after a SET_IRQS (which may have attached the eventfd a vector was waiting for)."""
        irqs = self.backend.irqs
        for index in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX):
            irqs.redeliver(index)

    def _irq_state(self, ctx: int, start: int, count: int, mask: bool) -> None:
        """The client masked or unmasked INTx (the library's IRQ state callback)."""
        irqs = self.backend.irqs

        def apply() -> None:
            for vector in range(start, start + count):
                if mask:
                    irqs.mask(IrqIndex.INTX, vector)
                else:
                    irqs.unmask(IrqIndex.INTX, vector)

        try:
            if threading.get_ident() == self._trio_thread:
                apply()
                return
            self._parked = True
            try:
                trio.from_thread.run_sync(apply)
            finally:
                self._parked = False
        except BaseException:  # nothing may unwind into C
            log.exception("libvfio-user: applying an INTx %s failed", "mask" if mask else "unmask")

    def _log(self, ctx: int, level: int, msg: bytes | None) -> None:
        text = msg.decode(errors="replace") if msg else ""
        log.log(_SYSLOG_LEVELS.get(level, logging.INFO), "libvfio-user: %s", text)
