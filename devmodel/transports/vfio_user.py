"""The vfio-user transport: a trio loop that serves the device backend to one client at a time.

One client at a time (QEMU's vfio-user-pci); further clients wait in the listen backlog until
the current one leaves. The loop is: receive, let the requests be answered, send the replies.
Requests are answered strictly in order, because the client expects replies in order and QEMU
holds its big lock while it waits; that rule and the socket are all this module owns. What a
request means is `VfioUserRequests`' (vfio_user_requests.py) and the device's is the backend's.

The socket is driven directly, non-blocking, through devmodel.unixfds (the one place fds cross
unix sockets) into one reused buffer, which keeps the per-access cost of the event loop to a
few microseconds. Two things keep that cheap without making it unfair:

- Fairness: the loop parks in trio only when the socket is empty, so a client that never lets
  it run dry (posted writes need no reply) would starve every other task, the lender link
  included. The requests' time slice (devmodel/fairness.py) makes the loop yield at least every
  millisecond of continuous work; a real wait starts a new slice.
- Adaptive polling (devmodel/polling.py, `--poll-max-us`): when the socket is empty, the loop
  first retries the receive for a self-tuned budget before parking, because a client that sends
  its next request within microseconds is caught far cheaper than by a park and a wakeup. The
  spin counts as continuous work for the slice.

BAR0 is never offered as MMAP: a vfio-user server cannot take back a mapping it gave away, and
lent memory must be revocable (shared/reference/vfio-user.md). Every access is trapped.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Final

import trio

from devmodel.backend.device import DeviceBackend, backend_for
from devmodel.counters import DeviceCounters
from devmodel.pci.function import PciFunction
from devmodel.polling import AdaptivePoll
from devmodel.ratelimit import RateLimitedLogger
from devmodel.transports.intx_unmask import IntxUnmaskWatcher
from devmodel.transports.vfio_user_requests import VfioUserRequests
from devmodel.unixfds import (
    ACCEPT_BACKOFF,
    ACCEPT_SHORTAGES,
    FdsTruncated,
    recv_nowait,
    send_all_async,
)
from pyvfio_user.connection import SERVER_DEFAULT_CAPS
from pyvfio_user.errors import ProtocolError
from pyvfio_user.version import Capabilities

__all__ = ["RECV_BUFFER", "STOP_DRAIN_SECONDS", "VfioUserServer"]

log = logging.getLogger("devmodel.vfio_user")

RECV_BUFFER: Final = 2 << 20
"""The most one receive takes: a whole message of the largest transfer in one call."""
RECV_START: Final = 16 << 10
"""What a session's receive buffer starts with; it doubles (up to RECV_BUFFER) each time a
receive fills it, so an idle or small-access client costs 16 KiB, not 2 MiB, per instance."""
STOP_DRAIN_SECONDS: Final = 0.5
"""How long a graceful stop may spend answering what the client already sent."""
STOP_FLUSH_SECONDS: Final = 0.1
"""The part of STOP_DRAIN_SECONDS kept for sending the answers (a client may keep sending)."""
DRAIN_RECV: Final = 64 << 10
"""A stop reads at most this much at a time, so its clock is checked every few milliseconds."""
NEVER: Final = 1 << 62
"""A time-slice deadline (perf_counter_ns) that never comes."""


class VfioUserServer:
    """Serves a device over vfio-user to whichever client connects to `listener`."""

    def __init__(
        self,
        device: PciFunction | DeviceBackend,
        counters: DeviceCounters,
        capabilities: Capabilities = SERVER_DEFAULT_CAPS,
        on_client: Callable[[str], None] | None = None,
        poll_max_ns: int = 0,
    ) -> None:
        self.backend, _ = backend_for(device)
        self.device = self.backend.function
        self.counters = counters
        self.capabilities = capabilities
        # One budget for every client in turn: a new client of the same guest behaves alike.
        self.poll = AdaptivePoll(poll_max_ns, counters) if poll_max_ns else None
        self._on_client = on_client
        self._bad_log = RateLimitedLogger(log)
        self.connected = False

    async def serve(
        self,
        listener: socket.socket,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept clients one after another, forever (until cancelled)."""
        listener.setblocking(False)
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                if exc.errno not in ACCEPT_SHORTAGES:
                    raise
                # Out of fds (RLIMIT_NOFILE) or memory: the client waits in the backlog.
                self._bad_log.warning("cannot accept a client yet: %s", exc.strerror)
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            with sock:
                sock.setblocking(False)
                self.counters.client_connects += 1
                self.connected = True
                log.info("client connected")
                if self._on_client:
                    self._on_client("connected")
                try:
                    await self.serve_client(sock)
                finally:
                    self.connected = False
                    if self._on_client:
                        self._on_client("disconnected")

    async def serve_client(self, sock: socket.socket) -> None:
        """Run one client's session to its end; the device survives whatever happens here."""
        requests = VfioUserRequests(self.backend, self.capabilities, self._bad_log)
        session = _Session(sock, requests, self.poll)
        # KVM's resample fd, when the client sets one as INTx's unmask eventfd (intx_unmask.py).
        watcher = IntxUnmaskWatcher(self.backend.irqs)
        requests.on_set_irqs = watcher.changed
        try:
            failed: BaseException | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watcher.run)
                try:
                    await session.run()
                except trio.Cancelled:
                    raise
                except BaseException as exc:
                    # Raised after the nursery, so that it stays itself rather than become
                    # an ExceptionGroup: the handlers below catch it by type.
                    failed = exc
                finally:
                    nursery.cancel_scope.cancel()
            if failed is not None:
                raise failed
        except ProtocolError as exc:
            self.counters.protocol_errors += 1
            log.error("dropping the client: %s", exc)
        except OSError as exc:
            log.warning("client connection failed: %s", exc)
        finally:
            session.close()
            log.info("client gone")


class _Session:
    """One client connection: its socket, the receive buffer, and its requests in order."""

    __slots__ = ("buffer", "poll", "requests", "sock", "view")

    def __init__(
        self, sock: socket.socket, requests: VfioUserRequests, poll: AdaptivePoll | None = None
    ) -> None:
        self.sock = sock
        self.requests = requests
        self.poll = poll
        self.buffer = bytearray(RECV_START)
        self.view = memoryview(self.buffer)

    def _grow(self) -> memoryview:
        """A receive filled the buffer: double it (the bytes are already fed elsewhere)."""
        self.buffer = bytearray(min(len(self.buffer) * 2, RECV_BUFFER))
        self.view = memoryview(self.buffer)
        return self.view

    def close(self) -> None:
        self.requests.close()
        self.view.release()

    async def run(self) -> None:
        """Receive, answer in order, send; until the client closes or the server stops."""
        requests = self.requests
        conn = requests.conn
        sock = self.sock
        view = self.view
        try:
            while True:
                try:
                    n, fds = recv_nowait(sock, view)
                except (BlockingIOError, InterruptedError):
                    n, fds = await self._wait()
                conn.receive_data(view[:n], fds)
                if n == len(view) and n < RECV_BUFFER:
                    view = self._grow()
                more = await requests.process()
                if requests.out:
                    await self._flush()
                if not more:
                    return
        except FdsTruncated as exc:
            raise ProtocolError(str(exc)) from None
        except trio.Cancelled:
            await self._drain_on_stop()
            raise

    async def _wait(self) -> tuple[int, list[int]]:
        """The socket was empty: poll it for the budget, else park in trio until it is not."""
        poll = self.poll
        if poll is not None:
            got = poll.poll(self._try_recv)
            if got is not None:
                return got
        follow_up = self.requests.backend.follow_up
        if follow_up is not None:
            # About to park: what an access put off until its reply was out runs now, after
            # any request the spin caught, instead of waking the loop again for it.
            follow_up()
            got = self._try_recv()
            if got is not None:
                if poll is not None:
                    poll.parked()
                return got
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            # Others ran while this loop was parked: its time slice starts again.
            self.requests.slice.restart()
            got = self._try_recv()
            if got is not None:
                if poll is not None:
                    poll.parked()
                return got

    def _try_recv(self) -> tuple[int, list[int]] | None:
        """One non-blocking receive: (bytes, fds), or None when there was nothing to read."""
        try:
            return recv_nowait(self.sock, self.view)
        except (BlockingIOError, InterruptedError):
            return None

    async def _drain_on_stop(self) -> None:
        """On a graceful stop, answer what the client already sent before the socket closes.

        QEMU 11.1's client aborts when the server's socket is reset under it, which is what
        closing a socket with unread requests in it does; and a vCPU whose request was taken
        but not answered waits out the whole reply timeout. So: answer the request being
        served (with an error if it cannot finish), read and answer whatever else is already
        there, within a short deadline, and only then let the socket close.

        The answering does not yield to the time slice: every other task is stopping too, and
        the lender link's teardown would take lent memory away from requests sent before the
        stop. A client that keeps sending is cut off by the clock instead, checked between
        receives that are kept small (DRAIN_RECV), leaving time to send what was answered.
        """
        requests = self.requests
        requests.slice.deadline = NEVER
        answer_until = time.monotonic() + STOP_DRAIN_SECONDS - STOP_FLUSH_SECONDS
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + STOP_DRAIN_SECONDS
            try:
                requests.fail_current()
                # Requests that arrived in the same read as the one being served are already
                # in the connection's buffer: answer those first, then whatever the socket holds.
                more = await requests.process()
                while more and time.monotonic() < answer_until and self._recv_nowait():
                    more = await requests.process()
                if requests.out:
                    await self._flush()
            except (ProtocolError, OSError) as exc:
                log.info("could not answer everything before stopping: %s", exc)

    def _recv_nowait(self) -> bool:
        """Feed whatever is readable right now; False when nothing (or the end) was there."""
        try:
            n, fds = recv_nowait(self.sock, self.view[:DRAIN_RECV])
        except (BlockingIOError, InterruptedError):
            return False
        except FdsTruncated as exc:
            raise ProtocolError(str(exc)) from None
        self.requests.conn.receive_data(self.view[:n], fds)
        return n > 0

    async def _flush(self) -> None:
        out = self.requests.out
        # Coalesce consecutive fd-less replies into one send; a message with fds goes alone.
        i = 0
        while i < len(out):
            data, fds = out[i]
            if not fds:
                j = i + 1
                while j < len(out) and not out[j][1]:
                    j += 1
                if j - i > 1:
                    data = b"".join(d for d, _ in out[i:j])
                await send_all_async(self.sock, data)
                i = j
            else:
                await send_all_async(self.sock, data, fds)
                i += 1
        out.clear()
