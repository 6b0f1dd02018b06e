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
from collections import deque
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
# What a message without fds carries: shared, so the common case allocates no list.
_NO_FDS: Final[tuple[int, ...]] = ()
# Outgoing from an encoded (data, fds) pair in one C call (the NamedTuple's own __new__ is
# Python code, and this runs once per trapped access).
_outgoing: Final = tuple.__new__


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Framer:
    """Byte stream plus fd batches in, (header, payload, fds) frames out."""

    __slots__ = ("_base", "_eof", "_fd_batches", "_start", "buf", "max_msg_size")

    def __init__(self, max_msg_size: int) -> None:
        self.buf = bytearray()
        self._start = 0  # offset in buf of the first unconsumed byte
        self._base = 0  # stream position of buf[0]
        self._fd_batches: deque[tuple[int, list[int]]] = deque()
        self._eof = False
        self.max_msg_size = max_msg_size

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int]) -> None:
        if self._eof:
            _close_fds(fds)
            if data:
                raise ProtocolError("data received after the end of the stream")
            return
        if self._start and (self._start == len(self.buf) or self._start > 65536):
            del self.buf[: self._start]
            self._base += self._start
            self._start = 0
        if not data:
            self._eof = True
            if fds:
                _close_fds(fds)
            return
        self.buf += data
        if fds:
            last = self._base + len(self.buf) - 1
            self._fd_batches.append((last, list(fds)))

    @property
    def buffered(self) -> int:
        return len(self.buf) - self._start

    def next_frame(self) -> tuple[tuple[int, int, int, int, int], int, Sequence[int]] | Sentinel:
        """The next complete message: (header fields, payload start offset, fds).

        The payload is `self.buf[start : start + size - 16]`, valid until the next `feed`.
        """
        avail = len(self.buf) - self._start
        if avail < _HEADER_SIZE:
            if self._eof:
                if avail:
                    self._start = len(self.buf)
                    self.drop_fds()
                    raise ProtocolError(f"stream ended inside a message header ({avail} bytes)")
                return CLOSED
            return NEED_DATA
        hdr = _HEADER.unpack_from(self.buf, self._start)
        size = hdr[2]
        if size < _HEADER_SIZE:
            self.drop_fds()
            raise ProtocolError(f"message size {size} is smaller than the 16-byte header")
        if size > self.max_msg_size:
            self.drop_fds()
            raise ProtocolError(f"message size {size} exceeds the limit of {self.max_msg_size}")
        if avail < size:
            if self._eof:
                self._start = len(self.buf)
                self.drop_fds()
                raise ProtocolError(f"stream ended inside a {size}-byte message")
            return NEED_DATA
        start = self._start
        self._start += size
        batches = self._fd_batches
        if not batches:
            return hdr, start + _HEADER_SIZE, _NO_FDS
        end_pos = self._base + self._start  # stream position just past this message
        fds: list[int] = []
        while batches and batches[0][0] < end_pos:
            fds.extend(batches.popleft()[1])
        return hdr, start + _HEADER_SIZE, fds

    def drop_fds(self) -> None:
        while self._fd_batches:
            _close_fds(self._fd_batches.popleft()[1])


class State(enum.Enum):
    AWAIT_VERSION = "await-version"  # nothing negotiated yet
    VERSION_PENDING = "version-pending"  # a VERSION was received or sent, its reply not yet
    READY = "ready"
    CLOSED = "closed"
    BROKEN = "broken"  # a fatal protocol error; nothing more is parsed


# The states the per-message paths test, as module constants: reading an Enum member off its
# class goes through the enum machinery (~60 ns each here), a global is a dict lookup.
_READY: Final = State.READY
_BROKEN: Final = State.BROKEN
_CLOSED: Final = State.CLOSED


# Requests a READY server takes without consulting the rules table, and their header flags.
_PLAIN_FLAGS: Final = (c.TYPE_COMMAND, c.TYPE_COMMAND | c.FLAG_NO_REPLY)
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
# The client side announces the same limits unless told otherwise.
CLIENT_DEFAULT_CAPS: Final = SERVER_DEFAULT_CAPS

_VERSION: Final = int(Command.VERSION)
_READ: Final = int(Command.REGION_READ)
_REPLY: Final = c.TYPE_REPLY
_REQUEST: Final = c.TYPE_COMMAND
_HEADER_AND_ACCESS: Final = codec.HEADER_AND_ACCESS

# What each side sends, by event type (the command comes from the event: its class variable, or
# the field of the three events whose command varies).
_CLIENT_REQUESTS: Final = frozenset(
    row.request.event for row in codec.TABLE if row.command not in c.SERVER_TO_CLIENT
)
# Replies a server sends, by type: their command, or 0 where the event's own field says it.
_SERVER_REPLIES: Final[dict[type, int]] = {
    row.reply.event: 0 if row.reply.event is ev.Ack else int(row.command)
    for row in codec.TABLE
    if row.command not in c.SERVER_TO_CLIENT
} | {ev.ErrorReply: 0}
_SERVER_REQUESTS: Final = frozenset(
    row.request.event for row in codec.TABLE if row.command in c.SERVER_TO_CLIENT
)
_CLIENT_REPLIES: Final = frozenset(
    {ev.ErrorReply} | {row.reply.event for row in codec.TABLE if row.command in c.SERVER_TO_CLIENT}
)

Header = codec.Header


class _Base:
    """What both ends share: framing, ids of requests awaiting replies, replies owed."""

    def __init__(self, max_data_xfer_size: int, max_msg_fds: int) -> None:
        self._framer = _Framer(max_data_xfer_size + MSG_OVERHEAD)
        self._limits = codec.Limits(max_data_xfer_size, max_msg_fds)
        self.state = State.AWAIT_VERSION
        # Our requests awaiting replies: msg_id -> command.
        self._pending: dict[int, int] = {}
        # The peer's requests we owe a reply: (msg_id, command) -> how many.
        self._owed: dict[tuple[int, int], int] = {}
        self._next_id = 0

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Feed what arrived. `b""` means the peer closed its end."""
        state = self.state
        if state is _BROKEN or state is _CLOSED:
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

    def next_msg_id(self) -> int:
        """An id for a request of ours that no outstanding one uses."""
        for _ in range(1 << 16):
            msg_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
            if msg_id not in self._pending:
                return msg_id
        raise ProtocolError("all 65536 message ids are awaiting replies")

    # ------------------------------------------------------------------ receiving

    def _frame(self) -> tuple[Header, int, Sequence[int]] | Sentinel:
        state = self.state
        if state is _BROKEN:
            raise ProtocolError("connection is broken by an earlier protocol error")
        if state is _CLOSED:
            return CLOSED
        try:
            frame = self._framer.next_frame()
        except ProtocolError:
            self._break()
            raise
        if frame is CLOSED:
            self.state = State.CLOSED
        return frame

    def _fatal(self, fds: Sequence[int], message: str) -> ProtocolError:
        _close_fds(fds)
        self._break()
        return ProtocolError(message)

    def _reply(self, hdr: Header, start: int, fds: Sequence[int]) -> ev.Event:
        """A reply from the peer: it must answer a request of ours, and parse; else fatal."""
        msg_id, command, size, flags, err = hdr
        if self._pending.pop(msg_id, None) != command:
            raise self._fatal(fds, f"reply {msg_id} to command {command} answers nothing we sent")
        if flags & c.FLAG_ERROR:
            if size != _HEADER_SIZE:
                raise self._fatal(fds, f"error reply to command {command} has a payload")
            _close_fds(fds)
            return ev.ErrorReply(msg_id, command, err)
        try:
            return codec.REPLIES[command].decode(hdr, self._framer.buf, start, fds, self._limits)
        except ProtocolError as exc:
            raise self._fatal(fds, f"malformed reply: {exc}") from None

    def _request(self, hdr: Header, start: int, fds: Sequence[int], no_reply: bool) -> ev.Event:
        """A request the peer may send in this state: its event, or BadRequest if malformed."""
        msg_id, command = hdr[0], hdr[1]
        try:
            event = codec.REQUESTS[command].decode(hdr, self._framer.buf, start, fds, self._limits)
        except ProtocolError as exc:
            err = exc.errno if isinstance(exc, codec.RequestError) else errno.EINVAL
            return self._refuse(msg_id, command, err, str(exc), fds, no_reply)
        if not no_reply:
            key = (msg_id, command)
            owed = self._owed
            owed[key] = owed.get(key, 0) + 1
        return event

    def _refuse(
        self, msg_id: int, command: int, err: int, why: str, fds: Sequence[int], no_reply: bool
    ) -> ev.BadRequest:
        """Close what came with a request we cannot honour, and owe it an error reply."""
        _close_fds(fds)
        if not no_reply:
            key = (msg_id, command)
            self._owed[key] = self._owed.get(key, 0) + 1
        return ev.BadRequest(msg_id, command, err, why, no_reply)

    # ------------------------------------------------------------------ sending

    def _pay(self, event: ev.Event, command: int) -> None:
        """Account for a reply we send: it must answer a request of the peer's."""
        self._pay_key(event.msg_id, command, type(event).__name__)

    def _pay_key(self, msg_id: int, command: int, name: str) -> None:
        key = (msg_id, command)
        owed = self._owed
        n = owed.get(key, 0)
        if not n:
            raise ProtocolError(
                f"{name} answers no request that awaits a reply "
                f"(message {key[0]}, command {key[1]}; posted requests get none)"
            )
        if n == 1:
            del owed[key]
        else:
            owed[key] = n - 1

    def _expect(self, event: ev.Event, command: int, no_reply: bool) -> None:
        """Account for a request we send: its reply will come under its id."""
        if not no_reply:
            if event.msg_id in self._pending:
                raise ProtocolError(f"message id {event.msg_id} is already awaiting a reply")
            self._pending[event.msg_id] = command


def _command(event: Any) -> int:
    """The command of any request or reply event (a class variable or, for three, a field)."""
    return int(event.command)


class ServerConnection(_Base):
    """The device side of one vfio-user connection."""

    def __init__(self, capabilities: Capabilities = SERVER_DEFAULT_CAPS) -> None:
        super().__init__(capabilities.max_data_xfer_size, capabilities.max_msg_fds)
        self.capabilities = capabilities
        # What the client announced; valid once READY.
        self.peer: Capabilities = Capabilities()
        # The id of the accepted VERSION awaiting its reply; only that reply changes the state
        # (an error reply to a refused, stray VERSION must not undo a negotiation).
        self._version_id: int | None = None

    # ------------------------------------------------------------------ receiving

    def next_event(self) -> ev.Event | Sentinel:
        """The next event: a request, `BadRequest`, a reply to our DMA request, or a sentinel.

        Raises ProtocolError (fatal) when the stream can no longer be parsed.
        """
        frame = self._frame()
        if isinstance(frame, Sentinel):
            return frame
        hdr, start, fds = frame
        flags = hdr[3]
        # The common case first, without the rules table: a plain request, once READY.
        if flags in _PLAIN_FLAGS and not fds and hdr[1] in _PLAIN_REQUESTS and self.state is _READY:
            return self._request(hdr, start, fds, flags != c.TYPE_COMMAND)
        kind = flags & c.TYPE_MASK
        if kind == c.TYPE_REPLY:
            return self._reply(hdr, start, fds)
        if kind != c.TYPE_COMMAND:
            raise self._fatal(fds, f"message type {kind} is neither command nor reply")
        msg_id, command = hdr[0], hdr[1]
        no_reply = bool(flags & c.FLAG_NO_REPLY)
        bad = self._check_request(msg_id, command, flags, fds, no_reply)
        if bad is not None:
            return bad
        event = self._request(hdr, start, fds, no_reply)
        if command == _VERSION and type(event) is ev.VersionRequest:
            self.state = State.VERSION_PENDING
            self._version_id = msg_id
        return event

    def next_read(self) -> tuple[int, int, int, int] | Sentinel | None:
        """The trapped read's shortcut past `next_event`: if the next message is a plain
        REGION_READ (READY, 32 bytes, a reply wanted, no fds pending, a count within the
        limit), take it and return (msg_id, offset, region, count); NEED_DATA when READY and
        not even a header is buffered (what `next_event` would say); else None, nothing
        taken, and `next_event` decodes it as ever (malformed and odd reads included).

        A read taken here is owed nothing yet: answer it at once with `read_reply` (no event,
        no bookkeeping: nothing can come between), or call `owe_read` for the event that
        `next_event` would have returned, to be answered with `send` like any other.
        """
        framer = self._framer
        buf = framer.buf
        start = framer._start
        if self.state is not _READY:
            return None
        avail = len(buf) - start
        if avail < 32 or framer._fd_batches:
            if avail < _HEADER_SIZE and not framer._eof:
                return NEED_DATA
            return None
        msg_id, command, size, flags, _err, offset, region, count = _HEADER_AND_ACCESS.unpack_from(
            buf, start
        )
        if (
            command != _READ
            or size != 32
            or flags != _REQUEST
            or not 0 < count <= self._limits.max_data_xfer_size
        ):
            return None
        framer._start = start + 32
        return msg_id, offset, region, count

    def read_reply(self, msg_id: int, offset: int, region: int, data: bytes) -> bytes:
        """The reply to a read taken with `next_read`, encoded (as `send` would encode a
        `RegionReadReply`)."""
        n = len(data)
        return _HEADER_AND_ACCESS.pack(msg_id, _READ, 32 + n, _REPLY, 0, offset, region, n) + data

    def read_reply_owed(self, msg_id: int, offset: int, region: int, data: bytes) -> bytes:
        """The reply to an owed read (`owe_read`, or a REGION_READ from `next_event`), encoded
        as `send(RegionReadReply(...))` would encode it, and paid the same way, without
        building the event: the answer to a read that waited for its memory."""
        self._pay_key(msg_id, _READ, "RegionReadReply")
        return self.read_reply(msg_id, offset, region, data)

    def owe_read(self, msg_id: int, offset: int, region: int, count: int) -> ev.RegionRead:
        """A read taken with `next_read` that will be answered later: its event, now owed a
        reply exactly as if `next_event` had returned it."""
        key = (msg_id, _READ)
        self._owed[key] = self._owed.get(key, 0) + 1
        return ev.RegionRead(msg_id, offset, region, count, False)

    def _check_request(
        self, msg_id: int, command: int, flags: int, fds: Sequence[int], no_reply: bool
    ) -> ev.BadRequest | None:
        """A BadRequest for what this state or the table does not allow, else None."""
        refuse = self._refuse
        if flags & ~c.KNOWN_HEADER_FLAGS or flags & c.FLAG_ERROR:
            why = f"command flags {flags:#x} are invalid"
            return refuse(msg_id, command, errno.EINVAL, why, fds, no_reply)
        spec = codec.REQUESTS.get(command)
        if spec is None:
            why = f"unknown command {command}"
            return refuse(msg_id, command, errno.ENOSYS, why, fds, no_reply)
        name = Command(command).name
        if command in c.SERVER_TO_CLIENT:
            why = f"{name} goes from server to client"
            return refuse(msg_id, command, errno.EINVAL, why, fds, no_reply)
        kind = _Kind.VERSION if command == _VERSION else _Kind.REQUEST
        _next, err, why = _SERVER_RULES[(self.state, kind)]
        if err:
            return refuse(msg_id, command, err, why, fds, no_reply)
        if len(fds) > min(self._limits.max_msg_fds, spec.fds.most):
            why = f"{name} carries {len(fds)} file descriptors, too many"
            return refuse(msg_id, command, errno.EINVAL, why, fds, no_reply)
        return None

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

    def send(self, event: ev.Event) -> Outgoing:
        """Encode a reply (or a server-to-client request) for the wire."""
        cls = type(event)
        command = _SERVER_REPLIES.get(cls)
        if command is not None:
            command = command or _command(event)
            self._pay(event, command)
            if command == _VERSION and event.msg_id == self._version_id:
                self._version_id = None
                self.state = State.READY if cls is ev.VersionReply else State.AWAIT_VERSION
        elif cls in _SERVER_REQUESTS:
            if self.state is not State.READY:
                raise ProtocolError("DMA requests need a negotiated connection")
            self._expect(event, _command(event), getattr(event, "no_reply", False))
        else:
            raise ProtocolError(f"{cls.__name__} is not a reply a server sends")
        return _outgoing(Outgoing, codec.encode(event))


class ClientConnection(_Base):
    """The VMM side: sends requests, matches replies, receives DMA requests."""

    def __init__(self, capabilities: Capabilities = CLIENT_DEFAULT_CAPS) -> None:
        super().__init__(capabilities.max_data_xfer_size, capabilities.max_msg_fds)
        self.capabilities = capabilities
        self.server: Capabilities = Capabilities()

    def send(self, event: ev.Event) -> Outgoing:
        cls = type(event)
        if cls in _CLIENT_REPLIES:
            self._pay(event, _command(event))
        elif cls in _CLIENT_REQUESTS:
            command = _command(event)
            kind = _Kind.VERSION if command == _VERSION else _Kind.REQUEST
            next_state = _CLIENT_RULES[(self.state, kind)]
            if next_state is None:
                raise ProtocolError(
                    f"cannot send {Command(command).name} in state {self.state.value}"
                )
            self._expect(event, command, getattr(event, "no_reply", False))
            self.state = next_state
        else:
            raise ProtocolError(f"{cls.__name__} is not a request a client sends")
        return _outgoing(Outgoing, codec.encode(event))

    def next_event(self) -> ev.Event | Sentinel:
        frame = self._frame()
        if isinstance(frame, Sentinel):
            return frame
        hdr, start, fds = frame
        msg_id, command, _size, flags, _err = hdr
        kind = flags & c.TYPE_MASK
        if kind == c.TYPE_REPLY:
            event = self._reply(hdr, start, fds)
            if command == _VERSION:
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
            raise self._fatal(fds, f"message type {kind} is neither command nor reply")
        no_reply = bool(flags & c.FLAG_NO_REPLY)
        if command not in c.SERVER_TO_CLIENT or flags & c.FLAG_ERROR:
            why = f"command {command} is not one a server sends"
            return self._refuse(msg_id, command, errno.EINVAL, why, fds, no_reply)
        return self._request(hdr, start, fds, no_reply)
