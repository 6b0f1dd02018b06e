"""The control socket: QMP (devmodel_wire.control) for toolstacks and people.

Nothing a control client does may stall the device, so:

- each client is its own task pair: a reader that executes commands in order, a writer that
  drains the client's send queue; the device's tasks never wait on a client;
- the send queue is bounded (`SEND_QUEUE` messages): events are pushed without waiting, and a
  client whose queue is full (it stopped reading) is dropped, as is one whose writes stay
  blocked longer than `SEND_STALL`;
- commands are a JSON stream, as in QMP (devmodel_wire.control); one longer than
  `MAX_COMMAND_LINE` ends the client (after an error reply), malformed JSON only earns an
  error reply; each command is followed by a checkpoint, so a client pipelining thousands of
  commands yields to the device between them;
- at most `MAX_CLIENTS` at once; more are told so and closed.

Who may connect: the socket file is 0600 inside a private directory, and every peer's
credentials (SO_PEERCRED) are checked: the same uid as the device model, or root.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from devmodel.control.toolstack import bind_unix, private_directory, unlink_quietly
from devmodel.logs import clean
from devmodel.ratelimit import RateLimitedLogger
from devmodel.unixfds import ACCEPT_BACKOFF, ACCEPT_SHORTAGES
from devmodel_wire.control import (
    GENERIC_ERROR,
    MAX_COMMAND_LINE,
    BadCommand,
    Command,
    CommandFailed,
    ControlProtocolError,
    ErrorReply,
    ServerConnection,
    encode_error,
    encode_event,
    encode_greeting,
    encode_return,
)
from pyvfio_user.sansio import CLOSED, NEED_DATA

log = logging.getLogger("devmodel.control")

SEND_QUEUE: Final = 1024
SEND_STALL: Final = 30.0
MAX_CLIENTS: Final = 16
RECV_SIZE: Final = 65536
WRITE_BATCH: Final = 256 << 10
_UCRED: Final = struct.Struct("3i")


@dataclass(slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


@dataclass(eq=False)
class ControlClient:
    """One attached client, as commands see it (the debug console keeps its state here)."""

    number: int
    peer: Peer
    conn: ServerConnection
    send: trio.MemorySendChannel[bytes]
    receive: trio.MemoryReceiveChannel[bytes]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dropped: str = ""
    connected_at: float = field(default_factory=time.time)
    commands: int = 0
    console: dict[str, object] | None = None
    console_statements: int = 0

    def describe(self) -> str:
        return f"client {self.number} (pid {self.peer.pid}, uid {self.peer.uid})"


# A command executor: (client, command) -> (result, or raises CommandFailed).
Executor = Callable[[ControlClient, Command], Awaitable[object]]


class ControlServer:
    def __init__(
        self,
        path: str,
        execute: Executor,
        greeting_version: dict[str, object],
        *,
        max_clients: int = MAX_CLIENTS,
        send_queue: int = SEND_QUEUE,
        send_stall: float = SEND_STALL,
        allowed_uids: frozenset[int] | None = None,
    ) -> None:
        self.path = path
        self._execute = execute
        self._greeting = encode_greeting(greeting_version, [])
        self.max_clients = max_clients
        self.send_queue = send_queue
        self.send_stall = send_stall
        # Same user as the device model, or root (the toolstack).
        self.allowed_uids = (
            allowed_uids if allowed_uids is not None else frozenset({os.geteuid(), 0})
        )
        self.clients: dict[int, ControlClient] = {}
        self._numbers = itertools.count(1)
        self._listener: socket.socket | None = None
        self._created_dir = False
        self._accept_log = RateLimitedLogger(log)
        self.dropped_clients = 0
        self.refused_peers = 0
        # Called with a client when it leaves (the debug console logs the session's end).
        self.on_disconnect: Callable[[ControlClient], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Create the socket (synchronously, at startup: errors become StartupError)."""
        self._created_dir = private_directory(self.path)
        self._listener = bind_unix(self.path, mode=0o600, backlog=16)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            unlink_quietly(self.path)
            if self._created_dir:
                # Left alone if something else lives there too.
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(os.path.abspath(self.path)))

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self._listener is not None, "open() first"
        listener = trio.socket.from_stdlib_socket(self._listener)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_SHORTAGES:
                        raise
                    # Out of fds or memory: the client waits in the backlog (unixfds).
                    self._accept_log.warning("cannot accept a control client yet: %s", exc.strerror)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                nursery.start_soon(self._client, sock)

    async def flush(self, timeout: float) -> None:
        """Give writers up to `timeout` to send what is queued (the reply to `quit`, the
        SHUTDOWN event) before the server is cancelled."""
        with trio.move_on_after(timeout):
            while any(c.send.statistics().current_buffer_used for c in self.clients.values()):
                await trio.sleep(0.01)
        # What the writers took off the queues may still be in flight to the kernel.
        await trio.sleep(0.01)

    # ------------------------------------------------------------------ events

    def broadcast(self, name: str, data: dict[str, object]) -> None:
        """Queue an event for every client out of negotiation mode; never waits."""
        if not self.clients:
            return
        line = encode_event(name, data, time.time())
        for client in list(self.clients.values()):
            if client.conn.events_enabled:
                self._queue(client, line)

    def _queue(self, client: ControlClient, line: bytes) -> None:
        try:
            client.send.send_nowait(line)
        except trio.WouldBlock:
            self._drop(client, f"its send queue is full ({self.send_queue} messages unread)")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _drop(self, client: ControlClient, why: str) -> None:
        if not client.dropped:
            client.dropped = why
            self.dropped_clients += 1
            log.warning("dropping control %s: %s", client.describe(), why)
        client.scope.cancel()

    # ------------------------------------------------------------------ one client

    async def _client(self, sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                pid, uid, gid = _UCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
                )
            except OSError:
                return
            if uid not in self.allowed_uids:
                self.refused_peers += 1
                log.warning("refused a control connection from pid %d uid %d", pid, uid)
                return
            if len(self.clients) >= self.max_clients:
                refusal = ErrorReply(GENERIC_ERROR, f"too many clients ({self.max_clients})")
                with trio.move_on_after(1):
                    await sock.send(encode_error(refusal))
                log.warning("refused a control client: %d attached already", self.max_clients)
                return
            send, receive = trio.open_memory_channel[bytes](self.send_queue)
            client = ControlClient(
                next(self._numbers), Peer(pid, uid, gid), ServerConnection(), send, receive
            )
            self.clients[client.number] = client
            log.info("control %s attached", client.describe())
            try:
                with client.scope:
                    self._queue(client, self._greeting)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._writer, client, sock)
                        await self._reader(client, sock)
                        # The peer closed its side: let the writer finish what is queued.
                        send.close()
            finally:
                del self.clients[client.number]
                send.close()
                log.info(
                    "control %s detached%s",
                    client.describe(),
                    f" ({client.dropped})" if client.dropped else "",
                )
                if self.on_disconnect is not None:
                    self.on_disconnect(client)

    async def _reader(self, client: ControlClient, sock: trio.socket.SocketType) -> None:
        conn = client.conn
        while True:
            try:
                data = await sock.recv(RECV_SIZE)
            except OSError:
                return
            conn.receive_data(data)
            while True:
                try:
                    event = conn.next_event()
                except ControlProtocolError as exc:
                    self._queue(client, encode_error(ErrorReply(GENERIC_ERROR, str(exc))))
                    client.dropped = str(exc)
                    self.dropped_clients += 1
                    log.warning("dropping control %s: %s", client.describe(), exc)
                    return
                if event is NEED_DATA:
                    break
                if event is CLOSED:
                    return
                if isinstance(event, BadCommand):
                    self._queue(client, encode_error(event.error))
                elif isinstance(event, Command):
                    client.commands += 1
                    await self._run(client, event)
                # A pipelining client must not keep the device's tasks from running.
                await trio.lowlevel.checkpoint()

    async def _run(self, client: ControlClient, cmd: Command) -> None:
        try:
            value = await self._execute(client, cmd)
        except CommandFailed as exc:
            self._queue(client, encode_error(ErrorReply(exc.error_class, exc.desc, cmd.id)))
            return
        except Exception as exc:
            # A bug in a command must cost that command, never the device.
            log.exception("control command %s failed", clean(cmd.name))
            desc = f"internal error: {type(exc).__name__}"
            self._queue(client, encode_error(ErrorReply(GENERIC_ERROR, desc, cmd.id)))
            return
        try:
            line = encode_return(value, cmd.id)
        except (TypeError, ValueError) as exc:
            line = encode_error(ErrorReply(GENERIC_ERROR, f"unencodable result: {exc}", cmd.id))
        self._queue(client, line)

    async def _writer(self, client: ControlClient, sock: trio.socket.SocketType) -> None:
        async for line in client.receive:
            # Whatever else is queued goes in the same send: one wakeup per batch, not per line.
            batch = [line]
            size = len(line)
            while size < WRITE_BATCH:
                try:
                    more = client.receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                batch.append(more)
                size += len(more)
            view = memoryview(b"".join(batch) if len(batch) > 1 else line)
            while view:
                with trio.move_on_after(self.send_stall) as scope:
                    try:
                        sent = await sock.send(view)
                    except OSError as exc:
                        client.dropped = client.dropped or f"send failed: {exc.strerror}"
                        client.scope.cancel()
                        return
                if scope.cancelled_caught:
                    self._drop(client, f"it has not read for {self.send_stall:g} s")
                    return
                view = view[sent:]


__all__ = ["MAX_COMMAND_LINE", "ControlClient", "ControlServer", "Peer"]
