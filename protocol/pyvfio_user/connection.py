"""Sans-IO vfio-user connections: `ServerConnection` (the device side) and `ClientConnection`.

Both share a framer that cuts the byte stream into messages and pairs each message with the
file descriptors that arrived for it. Linux delivers SCM_RIGHTS on a stream socket with the
recvmsg call that ends at the end of the skb carrying them, and senders send one message per
sendmsg, so the fds fed with a chunk belong to the message holding that chunk's *last byte*.

What each side may receive or send in each state is one table (`_SERVER_RULES`,
`_CLIENT_RULES`). The server side also enforces the rule that desynchronises QEMU when broken:
a request sent with NO_REPLY is never answered; `send()` refuses such a reply.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Final

from pyvfio_user import codec
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user.constants import Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA, Outgoing, Sentinel
from pyvfio_user.version import MAJOR, MINOR, Capabilities, negotiate

# Payload room beyond the data transfer limit: VERSION JSON, WRITE_MULTI batches, IRQ bitmaps.
MSG_OVERHEAD: Final = 64 * 1024

_HEADER = c.HEADER
_HEADER_SIZE = c.HEADER_SIZE


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Framer:
    """Byte stream plus fd batches in, (header, payload, fds) frames out."""

    __slots__ = ("_base", "_buf", "_eof", "_fd_batches", "_start", "max_msg_size")

    def __init__(self, max_msg_size: int) -> None:
        self._buf = bytearray()
        self._start = 0  # offset in _buf of the first unconsumed byte
        self._base = 0  # stream position of _buf[0]
        self._fd_batches: deque[tuple[int, list[int]]] = deque()
        self._eof = False
        self.max_msg_size = max_msg_size

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int]) -> None:
        if self._eof:
            _close_fds(fds)
            if data:
                raise ProtocolError("data received after the end of the stream")
            return
        if self._start and (self._start == len(self._buf) or self._start > 65536):
            del self._buf[: self._start]
            self._base += self._start
            self._start = 0
        if not data:
            self._eof = True
            if fds:
                _close_fds(fds)
            return
        self._buf += data
        if fds:
            last = self._base + len(self._buf) - 1
            self._fd_batches.append((last, list(fds)))

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._start

    def next_frame(self) -> tuple[tuple[int, int, int, int, int], int, list[int]] | Sentinel:
        """The next complete message: (header fields, payload start offset, fds).

        The payload is `self.payload(start, size)`; it is valid until the next `feed`.
        """
        avail = len(self._buf) - self._start
        if avail < _HEADER_SIZE:
            if self._eof:
                if avail:
                    self._start = len(self._buf)
                    self.drop_fds()
                    raise ProtocolError(f"stream ended inside a message header ({avail} bytes)")
                return CLOSED
            return NEED_DATA
        hdr = _HEADER.unpack_from(self._buf, self._start)
        size = hdr[2]
        if size < _HEADER_SIZE:
            self.drop_fds()
            raise ProtocolError(f"message size {size} is smaller than the 16-byte header")
        if size > self.max_msg_size:
            self.drop_fds()
            raise ProtocolError(f"message size {size} exceeds the limit of {self.max_msg_size}")
        if avail < size:
            if self._eof:
                self._start = len(self._buf)
                self.drop_fds()
                raise ProtocolError(f"stream ended inside a {size}-byte message")
            return NEED_DATA
        start = self._start
        self._start += size
        end_pos = self._base + self._start  # stream position just past this message
        fds: list[int] = []
        batches = self._fd_batches
        while batches and batches[0][0] < end_pos:
            fds.extend(batches.popleft()[1])
        return hdr, start + _HEADER_SIZE, fds

    def payload(self, start: int, end: int) -> memoryview:
        return memoryview(self._buf)[start:end]

    def drop_fds(self) -> None:
        while self._fd_batches:
            _close_fds(self._fd_batches.popleft()[1])


class State(enum.Enum):
    AWAIT_VERSION = "await-version"  # nothing negotiated yet
    VERSION_PENDING = "version-pending"  # a VERSION was received or sent, its reply not yet
    READY = "ready"
    CLOSED = "closed"
    BROKEN = "broken"  # a fatal protocol error; nothing more is parsed


# Requests a READY server takes without consulting the rules table.
_PLAIN_REQUESTS: Final = frozenset(
    int(cmd) for cmd in Command if cmd not in c.SERVER_TO_CLIENT and cmd != Command.VERSION
)


class _Kind(enum.Enum):
    VERSION = "version"
    REQUEST = "request"


# (state, what arrived) -> (state after it, errno to refuse it with, why). errno 0 = accepted.
_SERVER_RULES: Final[dict[tuple[State, _Kind], tuple[State, int, str]]] = {
    (State.AWAIT_VERSION, _Kind.VERSION): (State.VERSION_PENDING, 0, ""),
    (State.AWAIT_VERSION, _Kind.REQUEST): (
        State.AWAIT_VERSION,
        errno.EINVAL,
        "VERSION must be the first message",
    ),
    (State.VERSION_PENDING, _Kind.VERSION): (
        State.VERSION_PENDING,
        errno.EINVAL,
        "a VERSION is already being negotiated",
    ),
    (State.VERSION_PENDING, _Kind.REQUEST): (
        State.VERSION_PENDING,
        errno.EINVAL,
        "requests must wait for the VERSION reply",
    ),
    (State.READY, _Kind.VERSION): (State.READY, errno.EINVAL, "VERSION was already negotiated"),
    (State.READY, _Kind.REQUEST): (State.READY, 0, ""),
}

# What the client may send in each state: VERSION only first, everything else once READY.
_CLIENT_RULES: Final[dict[tuple[State, _Kind], State | None]] = {
    (State.AWAIT_VERSION, _Kind.VERSION): State.VERSION_PENDING,
    (State.AWAIT_VERSION, _Kind.REQUEST): None,
    (State.VERSION_PENDING, _Kind.VERSION): None,
    (State.VERSION_PENDING, _Kind.REQUEST): None,
    (State.READY, _Kind.VERSION): None,
    (State.READY, _Kind.REQUEST): State.READY,
}

SERVER_DEFAULT_CAPS: Final = Capabilities(
    max_msg_fds=16,
    max_data_xfer_size=1 << 20,
    max_dma_maps=65535,
    pgsizes=4096,
    write_multiple=True,
)


class _Base:
    def __init__(self, max_data_xfer_size: int, max_msg_fds: int) -> None:
        self._framer = _Framer(max_data_xfer_size + MSG_OVERHEAD)
        self._limits = codec.Limits(max_data_xfer_size, max_msg_fds)
        self.state = State.AWAIT_VERSION

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Feed what arrived. `b""` means the peer closed its end."""
        if self.state in (State.BROKEN, State.CLOSED):
            _close_fds(fds)
            return
        try:
            self._framer.feed(data, fds)
        except ProtocolError:
            self._break()
            raise

    def _break(self) -> None:
        self.state = State.BROKEN
        self._framer.drop_fds()

    def close(self) -> None:
        """Drop everything buffered, closing fds nobody was handed."""
        self._framer.drop_fds()
        self.state = State.CLOSED

    @property
    def buffered(self) -> int:
        return self._framer.buffered

    def _frame(self) -> tuple[tuple[int, int, int, int, int], int, list[int]] | Sentinel:
        if self.state is State.BROKEN:
            raise ProtocolError("connection is broken by an earlier protocol error")
        if self.state is State.CLOSED:
            return CLOSED
        try:
            frame = self._framer.next_frame()
        except ProtocolError:
            self._break()
            raise
        if frame is CLOSED:
            self.state = State.CLOSED
        return frame

    def _decode_reply(self, hdr: tuple[int, int, int, int, int], start: int, fds: list[int]) -> Any:
        msg_id, command, size, flags, err = hdr
        if flags & c.FLAG_ERROR:
            _close_fds(fds)
            if size != _HEADER_SIZE:
                self._break()
                raise ProtocolError(f"error reply to command {command} has a payload")
            return ev.ErrorReply(msg_id, command, err)
        with self._framer.payload(start, start + size - _HEADER_SIZE) as payload:
            try:
                return codec.REPLY_DECODERS[command](msg_id, payload, fds)
            except ProtocolError as exc:
                _close_fds(fds)
                self._break()
                raise ProtocolError(f"malformed reply: {exc}") from None


class ServerConnection(_Base):
    """The device side of one vfio-user connection."""

    def __init__(self, capabilities: Capabilities = SERVER_DEFAULT_CAPS) -> None:
        super().__init__(capabilities.max_data_xfer_size, capabilities.max_msg_fds)
        self.capabilities = capabilities
        # What the client announced; valid once READY.
        self.peer: Capabilities = Capabilities()
        self._owed: dict[tuple[int, int], int] = {}
        self._pending: dict[int, int] = {}  # our DMA_READ/WRITE ids awaiting replies
        self._next_id = 0
        # The id of the accepted VERSION awaiting its reply; only that reply changes the state
        # (an error reply to a refused, stray VERSION must not undo a negotiation).
        self._version_id: int | None = None

    # ------------------------------------------------------------------ receiving

    def next_event(self) -> Any:
        """The next event: a request, `BadRequest`, a reply to our DMA request, or a sentinel.

        Raises ProtocolError (fatal) when the stream can no longer be parsed.
        """
        frame = self._frame()
        if isinstance(frame, Sentinel):
            return frame
        hdr, start, fds = frame
        msg_id, command, size, flags, _err = hdr
        kind = flags & c.TYPE_MASK
        no_reply = bool(flags & c.FLAG_NO_REPLY)
        if kind == c.TYPE_REPLY:
            expected = self._pending.pop(msg_id, None)
            if expected != command:
                _close_fds(fds)
                self._break()
                raise ProtocolError(f"reply {msg_id} to command {command} answers nothing we sent")
            return self._decode_reply(hdr, start, fds)
        if kind != c.TYPE_COMMAND:
            _close_fds(fds)
            self._break()
            raise ProtocolError(f"message type {kind} is neither command nor reply")
        bad = self._check_request(msg_id, command, flags, fds, no_reply)
        if bad is not None:
            return bad
        decoder = codec.REQUEST_DECODERS[command]
        with self._framer.payload(start, start + size - _HEADER_SIZE) as payload:
            try:
                event = decoder(msg_id, payload, fds, no_reply, self._limits)
            except codec.RequestError as exc:
                return self._refuse(msg_id, command, exc.errno, str(exc), fds, no_reply)
            except ProtocolError as exc:
                return self._refuse(msg_id, command, errno.EINVAL, str(exc), fds, no_reply)
        if command == Command.VERSION:
            self.state = State.VERSION_PENDING
            self._version_id = msg_id
        if not no_reply:
            key = (msg_id, command)
            owed = self._owed
            owed[key] = owed.get(key, 0) + 1
        return event

    def _check_request(
        self, msg_id: int, command: int, flags: int, fds: list[int], no_reply: bool
    ) -> ev.BadRequest | None:
        # The common case first, without touching the rules table (enum hashing is slow).
        if (
            not fds
            and self.state is State.READY
            and command in _PLAIN_REQUESTS
            and flags
            in (
                c.TYPE_COMMAND,
                c.TYPE_COMMAND | c.FLAG_NO_REPLY,
            )
        ):
            return None
        if flags & ~c.KNOWN_HEADER_FLAGS or flags & c.FLAG_ERROR:
            return self._refuse(
                msg_id,
                command,
                errno.EINVAL,
                f"command flags {flags:#x} are invalid",
                fds,
                no_reply,
            )
        if command not in codec.REQUEST_DECODERS:
            return self._refuse(
                msg_id, command, errno.ENOSYS, f"unknown command {command}", fds, no_reply
            )
        if command in c.SERVER_TO_CLIENT:
            name = Command(command).name
            return self._refuse(
                msg_id, command, errno.EINVAL, f"{name} goes from server to client", fds, no_reply
            )
        kind = _Kind.VERSION if command == Command.VERSION else _Kind.REQUEST
        _next, err, why = _SERVER_RULES[(self.state, kind)]
        if err:
            return self._refuse(msg_id, command, err, why, fds, no_reply)
        if len(fds) > min(self._limits.max_msg_fds, codec.REQUEST_MAX_FDS.get(command, 0)):
            return self._refuse(
                msg_id,
                command,
                errno.EINVAL,
                f"{Command(command).name} carries {len(fds)} file descriptors, too many",
                fds,
                no_reply,
            )
        return None

    def _refuse(
        self, msg_id: int, command: int, err: int, why: str, fds: list[int], no_reply: bool
    ) -> ev.BadRequest:
        _close_fds(fds)
        if not no_reply:
            key = (msg_id, command)
            self._owed[key] = self._owed.get(key, 0) + 1
        return ev.BadRequest(msg_id, command, err, why, no_reply)

    # ------------------------------------------------------------------ sending

    def version_reply(self, request: ev.VersionRequest) -> ev.VersionReply | ev.ErrorReply:
        """The answer to a client's VERSION: our limits, keyed as the client named them."""
        if request.major != MAJOR:
            return ev.ErrorReply(request.msg_id, Command.VERSION, errno.ENOTSUP)
        try:
            caps = negotiate(request.capabilities, request.keys, self.capabilities)
        except ProtocolError:
            return ev.ErrorReply(request.msg_id, Command.VERSION, errno.EINVAL)
        self.peer = request.capabilities
        return ev.VersionReply(request.msg_id, MAJOR, min(request.minor, MINOR), caps, request.keys)

    def send(self, event: Any) -> Outgoing:
        """Encode a reply (or a server-to-client request) for the wire."""
        if type(event) is ev.RegionReadReply or type(event) is ev.RegionWriteReply:
            key = (event.msg_id, 9 if type(event) is ev.RegionReadReply else 10)
        elif isinstance(event, ev.DmaRead | ev.DmaWrite):
            return self._send_request(event)
        else:
            command = _reply_command(event)  # first: it refuses what is not a reply
            key = (event.msg_id, command)
        owed = self._owed
        n = owed.get(key, 0)
        if not n:
            raise ProtocolError(
                f"{type(event).__name__} answers no request that awaits a reply "
                f"(message {key[0]}, command {key[1]}; posted writes get none)"
            )
        if n == 1:
            del owed[key]
        else:
            owed[key] = n - 1
        if key[1] == Command.VERSION and key[0] == self._version_id:
            self._version_id = None
            self.state = State.READY if isinstance(event, ev.VersionReply) else State.AWAIT_VERSION
        data, fds = codec.encode(event)
        return Outgoing(data, fds)

    def _send_request(self, event: ev.DmaRead | ev.DmaWrite) -> Outgoing:
        if self.state is not State.READY:
            raise ProtocolError("DMA requests need a negotiated connection")
        command = Command.DMA_READ if isinstance(event, ev.DmaRead) else Command.DMA_WRITE
        if not event.no_reply:
            if event.msg_id in self._pending:
                raise ProtocolError(f"message id {event.msg_id} is already awaiting a reply")
            self._pending[event.msg_id] = command
        data, fds = codec.encode(event)
        return Outgoing(data, fds)

    def next_msg_id(self) -> int:
        """An id for a server-to-client request that no outstanding one uses."""
        for _ in range(1 << 16):
            msg_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
            if msg_id not in self._pending:
                return msg_id
        raise ProtocolError("all 65536 message ids are awaiting replies")


def _reply_command(event: Any) -> int:
    if isinstance(event, ev.Ack | ev.ErrorReply):
        return int(event.command)
    command = _REPLY_COMMANDS.get(type(event))
    if command is None:
        raise ProtocolError(f"{type(event).__name__} is not a reply a server sends")
    return command


_REPLY_COMMANDS: Final[dict[type, int]] = {
    ev.VersionReply: Command.VERSION,
    ev.DmaUnmapReply: Command.DMA_UNMAP,
    ev.DeviceInfo: Command.DEVICE_GET_INFO,
    ev.RegionInfo: Command.DEVICE_GET_REGION_INFO,
    ev.RegionIoFds: Command.DEVICE_GET_REGION_IO_FDS,
    ev.IrqInfo: Command.DEVICE_GET_IRQ_INFO,
    ev.RegionReadReply: Command.REGION_READ,
    ev.RegionWriteReply: Command.REGION_WRITE,
    ev.RegionWriteMultiReply: Command.REGION_WRITE_MULTI,
    ev.DeviceFeatureReply: Command.DEVICE_FEATURE,
    ev.MigDataReadReply: Command.MIG_DATA_READ,
    ev.MigDataWriteReply: Command.MIG_DATA_WRITE,
}

_REQUEST_COMMANDS: Final[dict[type, int]] = {
    ev.VersionRequest: Command.VERSION,
    ev.DmaMap: Command.DMA_MAP,
    ev.DmaUnmap: Command.DMA_UNMAP,
    ev.DeviceGetInfo: Command.DEVICE_GET_INFO,
    ev.DeviceGetRegionInfo: Command.DEVICE_GET_REGION_INFO,
    ev.DeviceGetRegionIoFds: Command.DEVICE_GET_REGION_IO_FDS,
    ev.DeviceGetIrqInfo: Command.DEVICE_GET_IRQ_INFO,
    ev.DeviceSetIrqs: Command.DEVICE_SET_IRQS,
    ev.RegionRead: Command.REGION_READ,
    ev.RegionWrite: Command.REGION_WRITE,
    ev.RegionWriteMulti: Command.REGION_WRITE_MULTI,
    ev.DeviceReset: Command.DEVICE_RESET,
    ev.DeviceFeature: Command.DEVICE_FEATURE,
    ev.MigDataRead: Command.MIG_DATA_READ,
    ev.MigDataWrite: Command.MIG_DATA_WRITE,
}

CLIENT_DEFAULT_CAPS: Final = Capabilities(
    max_msg_fds=16,
    max_data_xfer_size=1 << 20,
    max_dma_maps=65535,
    pgsizes=4096,
    write_multiple=True,
)


class ClientConnection(_Base):
    """The VMM side: sends requests, matches replies, receives DMA requests."""

    def __init__(self, capabilities: Capabilities = CLIENT_DEFAULT_CAPS) -> None:
        super().__init__(capabilities.max_data_xfer_size, capabilities.max_msg_fds)
        self.capabilities = capabilities
        self.server: Capabilities = Capabilities()
        self._pending: dict[int, int] = {}
        self._owed: Counter[tuple[int, int]] = Counter()
        self._next_id = 0

    def next_msg_id(self) -> int:
        for _ in range(1 << 16):
            msg_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
            if msg_id not in self._pending:
                return msg_id
        raise ProtocolError("all 65536 message ids are awaiting replies")

    def send(self, event: Any) -> Outgoing:
        if isinstance(event, ev.DmaReadReply | ev.DmaWriteReply | ev.ErrorReply):
            command = (
                event.command
                if isinstance(event, ev.ErrorReply)
                else Command.DMA_READ
                if isinstance(event, ev.DmaReadReply)
                else Command.DMA_WRITE
            )
            key = (event.msg_id, int(command))
            if not self._owed.get(key):
                raise ProtocolError(f"{type(event).__name__} answers no server request")
            self._owed[key] -= 1
            if not self._owed[key]:
                del self._owed[key]
            data, fds = codec.encode(event)
            return Outgoing(data, fds)
        request_command = _REQUEST_COMMANDS.get(type(event))
        if request_command is None:
            raise ProtocolError(f"{type(event).__name__} is not a request a client sends")
        command = request_command
        kind = _Kind.VERSION if command == Command.VERSION else _Kind.REQUEST
        next_state = _CLIENT_RULES[(self.state, kind)]
        if next_state is None:
            raise ProtocolError(f"cannot send {Command(command).name} in state {self.state.value}")
        if not event.no_reply:
            if event.msg_id in self._pending:
                raise ProtocolError(f"message id {event.msg_id} is already awaiting a reply")
            self._pending[event.msg_id] = command
        self.state = next_state
        data, fds = codec.encode(event)
        return Outgoing(data, fds)

    def next_event(self) -> Any:
        frame = self._frame()
        if isinstance(frame, Sentinel):
            return frame
        hdr, start, fds = frame
        msg_id, command, size, flags, _err = hdr
        kind = flags & c.TYPE_MASK
        if kind == c.TYPE_REPLY:
            expected = self._pending.pop(msg_id, None)
            if expected != command:
                _close_fds(fds)
                self._break()
                raise ProtocolError(f"reply {msg_id} to command {command} answers nothing we sent")
            event = self._decode_reply(hdr, start, fds)
            if command == Command.VERSION:
                if isinstance(event, ev.VersionReply):
                    if event.major != MAJOR or event.minor > MINOR:
                        self._break()
                        raise ProtocolError(f"server answered version {event.major}.{event.minor}")
                    self.server = event.capabilities
                    self.state = State.READY
                else:
                    self.state = State.AWAIT_VERSION
            return event
        if kind != c.TYPE_COMMAND:
            _close_fds(fds)
            self._break()
            raise ProtocolError(f"message type {kind} is neither command nor reply")
        no_reply = bool(flags & c.FLAG_NO_REPLY)
        if command not in c.SERVER_TO_CLIENT or flags & c.FLAG_ERROR:
            _close_fds(fds)
            if not no_reply:
                self._owed[(msg_id, command)] += 1
            return ev.BadRequest(
                msg_id,
                command,
                errno.EINVAL,
                f"command {command} is not one a server sends",
                no_reply,
            )
        with self._framer.payload(start, start + size - _HEADER_SIZE) as payload:
            try:
                event = codec.REQUEST_DECODERS[command](
                    msg_id, payload, fds, no_reply, self._limits
                )
            except ProtocolError as exc:
                _close_fds(fds)
                err = exc.errno if isinstance(exc, codec.RequestError) else errno.EINVAL
                event = ev.BadRequest(msg_id, command, err, str(exc), no_reply)
        if not no_reply:
            self._owed[(msg_id, command)] += 1
        return event
