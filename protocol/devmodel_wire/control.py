"""The control protocol: QEMU's QMP, narrowed to a device model, sans-IO (docs in README, "Attach").

A toolstack, a monitoring agent or the debug REPL talks to a running device model over its
control socket. The format is QEMU's QMP, narrowed to what a device model needs, so a client
that already speaks QMP (libxl's readiness check is `query-status`) needs no new code:

    S: {"QMP": {"version": {...}, "capabilities": []}}          greeting, once
    C: {"execute": "qmp_capabilities"}                          leave negotiation mode
    S: {"return": {}}
    C: {"execute": "query-windows", "arguments": {"state": "evicted"}, "id": 7}
    S: {"return": {...}, "id": 7}                                or {"error": {"class", "desc"}}
    S: {"event": "LEASE_REVOKED", "data": {...}, "timestamp": {"seconds": .., "microseconds": ..}}

The server writes one JSON object per line (LF). It reads commands as QMP does, as a stream
of JSON objects: a command ends where its object closes, with or without a newline after it,
because stock QMP clients (QEMU's own qemu.qmp library, qmp-shell) send objects back to back
without one; a command may span lines. Anything at the top level that is not an object ends at
the next newline and is answered with an error, as is an object nested deeper than
`MAX_NESTING` or holding a raw newline inside a string; the rest of that line is skipped, so a
person typing into `socat` resynchronises at the next line. Events reach a client only after it
has left negotiation mode, as in QMP, so a one-shot script never has to skip them before its
first answer. Commands are answered in the order they arrive; `id` (any JSON value) is echoed.

Malformed input never raises out of a connection except for a command over the length limit,
which is fatal (`ControlProtocolError`, `fatal=True`): a peer that sends megabytes without
ending a command is not speaking this protocol, and buffering it would let it grow our memory.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import CLOSED, NEED_DATA, Sentinel

# A command is a few hundred bytes; the biggest legitimate one is a debug-console statement.
MAX_COMMAND_LINE: Final = 64 << 10
# Answers can be long (a page of windows, the metrics text), events short; a client bounds them
# too, so that a confused server cannot make a client buffer without limit.
MAX_REPLY_LINE: Final = 16 << 20
# QEMU's JSON parser refuses nesting deeper than this (json-streamer.c, MAX_NESTING); so do we,
# before json.loads can recurse that far.
MAX_NESTING: Final = 1024

CAPABILITIES_COMMAND: Final = "qmp_capabilities"

# Error classes: QEMU's two common ones plus what a device model adds.
GENERIC_ERROR: Final = "GenericError"
COMMAND_NOT_FOUND: Final = "CommandNotFound"
# A testing aid used where it cannot work (evict with an external lender).
NOT_SUPPORTED: Final = "NotSupported"

_EXECUTE_KEYS: Final = frozenset({"execute", "arguments", "id"})
_NO_ID: Final = object()


class ControlProtocolError(ProtocolError):
    """The peer's byte stream cannot be read as control-protocol lines."""


# ---------------------------------------------------------------------------- messages


class _MaybeId:
    """For messages whose `id` may be absent (the field comes last in each, with a default)."""

    __slots__ = ()
    id: object

    @property
    def has_id(self) -> bool:
        return self.id is not _NO_ID


@dataclass(slots=True)
class Command(_MaybeId):
    """`{"execute": name, "arguments": {...}, "id": ...}` from a client."""

    name: str
    arguments: dict[str, object] = field(default_factory=dict)
    id: object = _NO_ID


@dataclass(slots=True)
class BadCommand:
    """A line that is not a valid command; answer it with `error` (carries the id if known)."""

    error: ErrorReply


@dataclass(slots=True)
class Greeting:
    version: dict[str, object]
    capabilities: list[str]


@dataclass(slots=True)
class Return(_MaybeId):
    value: object
    id: object = _NO_ID


@dataclass(slots=True)
class ErrorReply(_MaybeId):
    error_class: str
    desc: str
    id: object = _NO_ID


@dataclass(slots=True)
class EventMessage:
    name: str
    data: dict[str, object]
    seconds: int
    microseconds: int

    @property
    def time(self) -> float:
        return self.seconds + self.microseconds / 1e6


ServerMessage = Greeting | Return | ErrorReply | EventMessage


class CommandFailed(Exception):
    """Raised by a command's implementation (or the argument checks) to answer with an error."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


# ---------------------------------------------------------------------------- encoding


def encode(obj: Mapping[str, object]) -> bytes:
    """One line: compact JSON, ASCII only (no terminal escape can hide in a reply), LF."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def encode_greeting(version: Mapping[str, object], capabilities: list[str]) -> bytes:
    return encode({"QMP": {"version": dict(version), "capabilities": list(capabilities)}})


def encode_return(value: object, id: object = _NO_ID) -> bytes:
    msg: dict[str, object] = {"return": value}
    if id is not _NO_ID:
        msg["id"] = id
    return encode(msg)


def encode_error(error: ErrorReply) -> bytes:
    msg: dict[str, object] = {"error": {"class": error.error_class, "desc": error.desc}}
    if error.id is not _NO_ID:
        msg["id"] = error.id
    return encode(msg)


def timestamp(now: float) -> tuple[int, int]:
    """QMP's event timestamp from wall-clock `now`: seconds and microseconds.

    The caller reads the clock (sans-IO: nothing here does)."""
    seconds = math.floor(now)
    return seconds, min(999_999, round((now - seconds) * 1e6))


def encode_event(name: str, data: Mapping[str, object], now: float) -> bytes:
    seconds, micro = timestamp(now)
    return encode(
        {
            "event": name,
            "data": dict(data),
            "timestamp": {"seconds": seconds, "microseconds": micro},
        }
    )


def encode_command(
    name: str, arguments: Mapping[str, object] | None = None, id: object = _NO_ID
) -> bytes:
    msg: dict[str, object] = {"execute": name}
    if arguments:
        msg["arguments"] = dict(arguments)
    if id is not _NO_ID:
        msg["id"] = id
    return encode(msg)


# ---------------------------------------------------------------------------- framing


class LineBuffer:
    """Splits a byte stream into lines, never holding more than `max_line` bytes of one."""

    __slots__ = ("_buf", "_closed", "max_line")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._closed = False

    def feed(self, data: bytes) -> None:
        if not data:
            self._closed = True
            return
        self._buf += data

    def next_line(self) -> bytes | Sentinel:
        """The next complete line (without LF or CR), NEED_DATA, or CLOSED."""
        at = self._buf.find(b"\n")
        if at < 0:
            if len(self._buf) > self.max_line:
                raise ControlProtocolError(f"line longer than {self.max_line} bytes")
            if self._closed:
                # A last line without LF is still a line; then the end of the stream.
                if self._buf:
                    line = bytes(self._buf)
                    self._buf.clear()
                    return line.rstrip(b"\r")
                return CLOSED
            return NEED_DATA
        if at > self.max_line:
            raise ControlProtocolError(f"line longer than {self.max_line} bytes")
        line = bytes(self._buf[:at])
        del self._buf[: at + 1]
        return line.rstrip(b"\r")


class FramingError:
    """A command that cannot be JSON, known before it is parsed (the framer's verdict)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


# What is significant in each framer state (everything else is copied as it is).
_IN_STRING: Final = re.compile(rb'["\\\n]')
_IN_OBJECT: Final = re.compile(rb'["{}\[\]]')
_NOT_SPACE: Final = re.compile(rb"[^ \t\r\n]")


class JsonStream:
    """Splits a client's byte stream into commands the way QMP does: one per top-level JSON
    object, newline or not; a top-level run that does not start an object ends at a newline.

    Only brackets, strings and escapes are tracked (json.loads still parses each command), so
    this is a scan of each byte once, whatever the chunking. Never holds more than `max_line`
    bytes of one command.
    """

    __slots__ = (
        "_buf",
        "_closed",
        "_depth",
        "_done",
        "_garbage",
        "_scanned",
        "_skip",
        "_string",
        "max_line",
    )

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()  # bytes not yet scanned
        # Commands framed and not yet taken; a ControlProtocolError ends the list for good.
        self._done: list[bytes | FramingError | ControlProtocolError] = []
        self._closed = False
        self._depth = 0
        self._string = False
        self._garbage = False  # a top-level run that is not an object: up to the newline
        self._skip = False  # after a framing error: drop the rest of the line
        self._scanned = 0

    def feed(self, data: bytes) -> None:
        """Bytes from the peer (b"" at its end); never raises: a command over the limit is
        reported, in its turn, by `next_message`."""
        if self._fatal:
            return
        if not data:
            self._closed = True
        else:
            self._buf += data
        try:
            self._scan()
        except ControlProtocolError as exc:
            self._done.append(exc)
            self._buf.clear()

    @property
    def _fatal(self) -> bool:
        return bool(self._done) and isinstance(self._done[-1], ControlProtocolError)

    def _emit(self, end: int, error: str | None = None) -> None:
        if end > self.max_line:
            raise ControlProtocolError(f"command longer than {self.max_line} bytes")
        message = bytes(self._buf[:end])
        del self._buf[:end]
        self._scanned = 0
        self._depth = 0
        self._string = self._garbage = False
        if error is not None:
            self._done.append(FramingError(error))
            self._skip = True
        else:
            self._done.append(message.rstrip(b"\r"))

    def _scan(self) -> None:
        buf = self._buf
        i = self._scanned
        while True:
            if self._skip:
                at = buf.find(b"\n", i)
                if at < 0:
                    del buf[:]
                    i = 0
                    break
                del buf[: at + 1]
                i = 0
                self._skip = False
                continue
            if self._garbage:
                at = buf.find(b"\n", i)
                if at < 0:
                    i = len(buf)
                    break
                self._emit(at)
                del buf[:1]
                i = 0
                continue
            if self._depth == 0:
                m = _NOT_SPACE.search(buf, i)
                if m is None:
                    del buf[:]
                    i = 0
                    break
                del buf[: m.start()]
                i = 1
                if buf[0] in b"{[":
                    self._depth = 1
                else:
                    self._garbage = True
                continue
            m = (_IN_STRING if self._string else _IN_OBJECT).search(buf, i)
            if m is None:
                i = len(buf)
                break
            c = buf[m.start()]
            i = m.end()
            if self._string:
                if c == 0x5C:  # backslash: the next byte is escaped, whatever it is
                    if i >= len(buf):
                        i -= 1  # scan the backslash again once its escaped byte is here
                        break
                    i += 1
                elif c == 0x22:
                    self._string = False
                else:  # a raw newline: no JSON string holds one; end the command there
                    self._emit(m.start(), "JSON parse error: newline inside a string")
                    i = 0
            elif c == 0x22:
                self._string = True
            elif c in b"{[":
                self._depth += 1
                if self._depth > MAX_NESTING:
                    self._emit(i, "JSON nested too deeply")
                    i = 0
            else:
                self._depth -= 1
                if self._depth == 0:
                    self._emit(i)
                    i = 0
        self._scanned = i
        if len(buf) > self.max_line:
            raise ControlProtocolError(f"command longer than {self.max_line} bytes")

    def next_message(self) -> bytes | FramingError | Sentinel:
        """The next command's bytes (or why it is not JSON), NEED_DATA, or CLOSED; raises
        ControlProtocolError (fatal) when it comes to a command over the length limit."""
        if self._done:
            message = self._done[0]
            if isinstance(message, ControlProtocolError):
                raise message
            del self._done[0]
            return message
        if self._closed:
            if self._buf and not self._skip:
                # What is left is a last command without its end: json.loads says what is wrong.
                self._emit(len(self._buf))
                return self.next_message()
            return CLOSED
        return NEED_DATA


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """A JSON number as a float, refused when it overflows to infinity (1e999): it would be
    the id echoed in a reply, and no reply holding it can be encoded."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {_clip(text, 24)} is out of range")
    return value


def decode_json(line: bytes) -> object:
    """Parse one line of JSON; ValueError with a short reason for anything else.

    NaN and Infinity are refused (not JSON), and so are numbers too big for a float (1e999,
    which Python would read as infinity), nesting deep enough to exhaust the parser's
    recursion (RecursionError), and integers too long to convert (ValueError).
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("input is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"JSON parse error: {exc.msg} at column {exc.colno}") from None


def parse_command(line: bytes) -> Command | BadCommand:
    """One client line as a Command, or a BadCommand carrying the error to send back."""
    try:
        obj = decode_json(line)
    except ValueError as exc:
        return BadCommand(ErrorReply(GENERIC_ERROR, str(exc)))
    if not isinstance(obj, dict):
        return BadCommand(ErrorReply(GENERIC_ERROR, "QMP input must be a JSON object"))
    id_ = obj.get("id", _NO_ID)
    for key in obj:
        if key not in _EXECUTE_KEYS:
            return BadCommand(
                ErrorReply(GENERIC_ERROR, f"QMP input member '{_clip(key)}' is unexpected", id_)
            )
    name = obj.get("execute")
    if not isinstance(name, str):
        return BadCommand(
            ErrorReply(GENERIC_ERROR, "QMP input member 'execute' must be a string", id_)
        )
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return BadCommand(
            ErrorReply(GENERIC_ERROR, "QMP input member 'arguments' must be an object", id_)
        )
    return Command(name, arguments, id_)


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------- connections


class _LineConnection:
    """Either side: bytes in, non-blank lines out."""

    def __init__(self, max_line: int) -> None:
        self._lines = LineBuffer(max_line)

    def receive_data(self, data: bytes) -> None:
        self._lines.feed(data)

    def _next_line(self) -> bytes | Sentinel:
        """The next line that is not blank, NEED_DATA, or CLOSED."""
        while True:
            line = self._lines.next_line()
            if isinstance(line, Sentinel) or line.strip():
                return line


class ServerConnection:
    """The device model's side of one control connection.

    Feed it bytes; `next_event()` gives Commands to execute, BadCommands to answer with their
    error, NEED_DATA or CLOSED. Negotiation mode is enforced here: until `qmp_capabilities`
    every other command is answered CommandNotFound (as QEMU does), and `events_enabled`
    tells the caller whether events may be sent to this client yet.
    """

    def __init__(self, max_line: int = MAX_COMMAND_LINE) -> None:
        self._stream = JsonStream(max_line)
        self.events_enabled = False

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client (b"" at its end). Raises ControlProtocolError (fatal) once
        a command outgrows the length limit."""
        self._stream.feed(data)

    def next_event(self) -> Command | BadCommand | Sentinel:
        line = self._stream.next_message()
        if isinstance(line, Sentinel):
            return line
        if isinstance(line, FramingError):
            return BadCommand(ErrorReply(GENERIC_ERROR, line.reason))
        parsed = parse_command(line)
        if isinstance(parsed, BadCommand):
            return parsed
        if parsed.name == CAPABILITIES_COMMAND:
            if self.events_enabled:
                return BadCommand(
                    ErrorReply(
                        COMMAND_NOT_FOUND,
                        "Capabilities negotiation is already complete, command ignored",
                        parsed.id,
                    )
                )
            enable = parsed.arguments.get("enable", [])
            if not isinstance(enable, list) or enable:
                return BadCommand(
                    ErrorReply(
                        GENERIC_ERROR, "this server offers no optional capabilities", parsed.id
                    )
                )
            self.events_enabled = True
            return parsed
        if not self.events_enabled:
            return BadCommand(
                ErrorReply(
                    COMMAND_NOT_FOUND,
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                    parsed.id,
                )
            )
        return parsed


class ClientConnection(_LineConnection):
    """A client's side: bytes in, Greeting/Return/ErrorReply/EventMessage out."""

    def __init__(self, max_line: int = MAX_REPLY_LINE) -> None:
        super().__init__(max_line)
        self.greeting: Greeting | None = None

    def next_event(self) -> ServerMessage | Sentinel:
        line = self._next_line()
        if isinstance(line, Sentinel):
            return line
        try:
            obj = decode_json(line)
        except ValueError as exc:
            raise ControlProtocolError(f"server sent bad JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ControlProtocolError("server sent something other than a JSON object")
        return self._message(obj)

    def _message(self, obj: dict[str, object]) -> ServerMessage:
        id_ = obj.get("id", _NO_ID)
        if "QMP" in obj:
            qmp = obj["QMP"]
            if not isinstance(qmp, dict):
                raise ControlProtocolError("malformed greeting")
            version = qmp.get("version", {})
            caps = qmp.get("capabilities", [])
            if not isinstance(version, dict) or not isinstance(caps, list):
                raise ControlProtocolError("malformed greeting")
            self.greeting = Greeting(version, [str(c) for c in caps])
            return self.greeting
        if "return" in obj:
            return Return(obj["return"], id_)
        if "error" in obj:
            err = obj["error"]
            if not isinstance(err, dict):
                raise ControlProtocolError("malformed error reply")
            return ErrorReply(str(err.get("class", GENERIC_ERROR)), str(err.get("desc", "")), id_)
        if "event" in obj:
            data = obj.get("data", {})
            ts = obj.get("timestamp", {})
            if not isinstance(data, dict) or not isinstance(ts, dict):
                raise ControlProtocolError("malformed event")
            seconds, micro = ts.get("seconds", 0), ts.get("microseconds", 0)
            if not isinstance(seconds, int) or not isinstance(micro, int):
                raise ControlProtocolError("malformed event timestamp")
            return EventMessage(str(obj["event"]), data, seconds, micro)
        raise ControlProtocolError("server message is none of greeting, return, error, event")


# ---------------------------------------------------------------------------- arguments


@dataclass(frozen=True, slots=True)
class Arg:
    """One command argument: its JSON type, whether it is required, allowed values, help."""

    kind: str  # "int", "number", "str", "bool", "str-list"
    required: bool = False
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    help: str = ""

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"type": self.kind, "required": self.required}
        if self.choices:
            out["choices"] = list(self.choices)
        if self.help:
            out["help"] = self.help
        return out


def check_arguments(arguments: Mapping[str, object], spec: Mapping[str, Arg]) -> dict[str, object]:
    """The arguments checked against `spec` (CommandFailed with QEMU-like wording otherwise)."""
    for name in arguments:
        if name not in spec:
            raise CommandFailed(f"Parameter '{_clip(name)}' is unexpected")
    out: dict[str, object] = {}
    for name, arg in spec.items():
        if name not in arguments:
            if arg.required:
                raise CommandFailed(f"Parameter '{name}' is missing")
            continue
        value = arguments[name]
        out[name] = _check_one(name, value, arg)
    return out


def _check_one(name: str, value: object, arg: Arg) -> object:
    kind = arg.kind
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise CommandFailed(f"Parameter '{name}' expects an integer")
        if arg.minimum is not None and value < arg.minimum:
            raise CommandFailed(f"Parameter '{name}' must be at least {arg.minimum}")
        return value
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CommandFailed(f"Parameter '{name}' expects a number")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise CommandFailed(f"Parameter '{name}' expects a boolean")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise CommandFailed(f"Parameter '{name}' expects a string")
        if arg.choices and value not in arg.choices:
            raise CommandFailed(
                f"Parameter '{name}' must be one of {', '.join(arg.choices)}, not '{_clip(value)}'"
            )
        return value
    if kind == "str-list":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise CommandFailed(f"Parameter '{name}' expects a string or a list of strings")
        for v in items:
            if arg.choices and v not in arg.choices:
                raise CommandFailed(
                    f"Parameter '{name}' values must be among {', '.join(arg.choices)}, "
                    f"not '{_clip(v)}'"
                )
        return list(items)
    raise AssertionError(f"unknown argument kind {kind}")


__all__ = [
    "CAPABILITIES_COMMAND",
    "CLOSED",
    "COMMAND_NOT_FOUND",
    "GENERIC_ERROR",
    "MAX_COMMAND_LINE",
    "MAX_NESTING",
    "MAX_REPLY_LINE",
    "NEED_DATA",
    "NOT_SUPPORTED",
    "Arg",
    "BadCommand",
    "ClientConnection",
    "Command",
    "CommandFailed",
    "ControlProtocolError",
    "ErrorReply",
    "EventMessage",
    "Greeting",
    "JsonStream",
    "LineBuffer",
    "Return",
    "ServerConnection",
    "ServerMessage",
    "check_arguments",
    "decode_json",
    "encode",
    "encode_command",
    "encode_error",
    "encode_event",
    "encode_greeting",
    "encode_return",
    "parse_command",
    "timestamp",
]
