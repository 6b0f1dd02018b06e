"""A real LeaseEngine and LenderLink, and a lender the test scripts step by step.

The scripted lender is a LenderConnection on a real unix socket in the test's own trio loop, driven
step by step by the test: that is what lets a test misbehave exactly where it wants to (send a
raw GRANT with no fd, stop answering, revoke at once) against the real LenderLink and
LeaseEngine, with nothing mocked on the device model's side.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

import devmodel_wire.lease as lp
from devmodel.counters import DeviceCounters
from devmodel.leases.engine import EngineConfig, LeaseEngine
from devmodel.leases.lender_link import LenderLink
from devmodel.polling import PageInPoll
from devmodel.testing._private.fds import sealed_memfd
from devmodel.testing._private.lease_fakes import RW
from devmodel.unixfds import rights
from devmodel_wire.lease.constants import HEADER_SIZE
from devmodel_wire.lease.wire import HEADER, decode_message, encode
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA

LINK_APERTURE = 4 << 20
LINK_GRANULE = 4 << 10
LINK_GUEST = 7
LINK_STEP = 2.0  # deadline of every single wait of a lender-link test


class ScriptedLender:
    """One accepted connection, spoken through LenderConnection (or raw bytes on purpose)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.conn = lp.LenderConnection()
        self._buf = bytearray(65536)
        self._raw = bytearray()
        self._eof = False
        self.hello: lp.Hello | None = None

    async def send(self, event: lp.Event) -> None:
        out = self.conn.send(event)
        await self.send_raw(out.data, out.fds)

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        view = memoryview(data)
        with trio.fail_after(LINK_STEP):
            if fds:
                view = view[await self.sock.sendmsg([view], rights(fds)) :]
            while view:
                view = view[await self.sock.send(view) :]

    async def send_encoded(self, event: lp.Event, fds: Sequence[int] = ()) -> None:
        """Bypass the lender-side checks: what a buggy or hostile lender would put on the wire."""
        await self.send_raw(encode(event), fds)

    async def event(self, timeout: float = LINK_STEP) -> lp.Event | None:
        """The next event from the device model, None at the end of the stream.

        Decoded from the raw bytes, so that answers to messages sent with `send_encoded` (which
        the connection never saw) come out too; the connection is fed the same bytes only to
        keep its state for what `send` may send next, and its complaints are ignored.
        """
        with trio.fail_after(timeout):
            while True:
                if len(self._raw) >= HEADER_SIZE:
                    length = HEADER.unpack_from(self._raw)[2]
                    if len(self._raw) >= length:
                        message = bytes(self._raw[:length])
                        del self._raw[:length]
                        return decode_message(message)
                if self._eof:
                    assert not self._raw, "the device model stopped inside a message"
                    return None
                try:
                    n = await self.sock.recv_into(self._buf)
                except ConnectionResetError:
                    n = 0
                self._eof = n == 0
                self._raw += self._buf[:n]
                self._feed(self._buf[:n])

    def _feed(self, data: bytes | bytearray) -> None:
        with contextlib.suppress(ProtocolError):
            self.conn.receive_data(data)
        while True:
            try:
                got = self.conn.next_event()
            except ProtocolError as exc:
                if exc.fatal:
                    return
                continue
            if got is NEED_DATA or got is CLOSED:
                return

    async def handshake(self, name: str = "fake") -> lp.Hello:
        hello = await self.event()
        assert isinstance(hello, lp.Hello), hello
        self.hello = hello
        await self.send(self.conn.hello_reply(name))
        return hello

    async def grant(self, lease: int, offset: int, length: int, fd: int, at: int) -> None:
        """GRANT `length` bytes of `fd` from `at` as lease `lease` at `offset`; expect the ack."""
        await self.send(lp.Grant(lease, offset, length, at, RW, fd))
        ack = await self.event()
        assert ack == lp.GrantAck(lease), ack

    async def revoke(self, lease: int, mode: lp.RevokeMode = lp.RevokeMode.EVICT) -> None:
        """REVOKE `lease`; expect REVOKED."""
        await self.send(lp.Revoke(lease, mode))
        assert await self.event() == lp.Revoked(lease)

    def close(self) -> None:
        self.conn.close()
        self.sock.close()


class LenderListener:
    def __init__(self, sock: trio.socket.SocketType, path: str) -> None:
        self.sock = sock
        self.path = path
        self.accepted: list[ScriptedLender] = []

    async def accept(self, timeout: float = LINK_STEP) -> ScriptedLender:
        with trio.fail_after(timeout):
            sock, _ = await self.sock.accept()
        peer = ScriptedLender(sock)
        self.accepted.append(peer)
        return peer

    async def session(self) -> ScriptedLender:
        """Accept the next connection and complete its handshake."""
        peer = await self.accept()
        await peer.handshake()
        return peer


@dataclass
class LenderLinkRig:
    engine: LeaseEngine
    link: LenderLink
    lender: LenderListener
    nursery: trio.Nursery

    @property
    def counters(self) -> DeviceCounters:
        return self.engine.counters

    async def connected(self) -> None:
        with trio.fail_after(LINK_STEP):
            while not self.link.connected:
                await trio.sleep(0.005)


@contextlib.asynccontextmanager
async def lender_link_rig(
    tmp_path: Path,
    *,
    page_in_timeout: float = 1.0,
    revoke_timeout: float = 1.0,
    poll: PageInPoll | None = None,
    make_link: Callable[[LeaseEngine, str], LenderLink] | None = None,
    **link_options: float,
) -> AsyncIterator[LenderLinkRig]:
    """A real LeaseEngine and LenderLink, and a listening socket the test plays lender on.

    `make_link(engine, socket_path)`, when given, builds the link instead (as `devmodel run`
    does from its settings, say), and `poll` and `link_options` are not used.
    """
    path = str(tmp_path / "lender.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(8)
    config = EngineConfig(page_in_timeout=page_in_timeout, revoke_timeout=revoke_timeout)
    engine = LeaseEngine(LINK_APERTURE, LINK_GRANULE, DeviceCounters(), config)
    options: dict[str, float] = {"reconnect_min": 0.01, "reconnect_max": 0.05}
    options.update(link_options)
    if poll is not None:
        poll.counters = engine.counters  # the page-in poll counts where the engine does
    if make_link is not None:
        link = make_link(engine, path)
    else:
        link = LenderLink(engine, path, LINK_GUEST, poll=poll, **options)  # type: ignore[arg-type]
    lender = LenderListener(listener, path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            yield LenderLinkRig(engine, link, lender, nursery)
            nursery.cancel_scope.cancel()
    finally:
        for peer in lender.accepted:
            peer.close()
        listener.close()
        engine.close()


@contextlib.asynccontextmanager
async def lender_session(
    tmp_path: Path, memfd_size: int, memfd_name: str = "test-lender", **rig_options: float
) -> AsyncIterator[tuple[LenderLinkRig, ScriptedLender, int]]:
    """A `lender_link_rig` whose first session is open, and a sealed memfd of `memfd_size` for
    the lender to grant from (closed at the end)."""
    async with lender_link_rig(tmp_path, **rig_options) as rig:  # type: ignore[arg-type]
        peer = await rig.lender.session()
        fd = sealed_memfd(memfd_size, memfd_name)
        try:
            yield rig, peer, fd
        finally:
            os.close(fd)
