"""A small blocking control-socket client: `devmodel attach`, scripts and tests use it.

Two ways to read: synchronously (each `execute()` reads until its answer, keeping the events it
meets in `events`), or with a background reader thread (`start_reader(on_event)`), which hands
events to a callback the moment they arrive: what an interactive REPL needs while it sits in
`input()`.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable, Mapping

from devmodel_wire.control import (
    CAPABILITIES_COMMAND,
    ClientConnection,
    ControlProtocolError,
    ErrorReply,
    EventMessage,
    Greeting,
    Return,
    ServerMessage,
    encode_command,
)
from pyvfio_user.sansio import CLOSED, NEED_DATA

__all__ = [
    "ConnectionLost",
    "ControlClient",
    "ControlError",
]


class ControlError(Exception):
    """The server answered a command with an error."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class ConnectionLost(Exception):
    """The control socket closed (the device model stopped, or dropped this client)."""


class ControlClient:
    def __init__(self, path: str, timeout: float = 10.0, negotiate: bool = True) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.conn = ClientConnection()
        self.events: deque[EventMessage] = deque(maxlen=10000)
        self._ids = itertools.count(1)
        self._replies: queue.Queue[ServerMessage | BaseException] | None = None
        self._reader: threading.Thread | None = None
        # Called with the raw JSON of every message sent and received (the REPL's -v).
        self.on_wire: Callable[[str, bytes], None] | None = None
        self._lock = threading.Lock()
        greeting = self._read_message()
        if not isinstance(greeting, Greeting):
            raise ControlProtocolError("the server did not greet first")
        self.greeting = greeting
        if negotiate:
            self.execute(CAPABILITIES_COMMAND)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self._reader is not None:
            self._reader.join(timeout=2)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def _read_message(self) -> ServerMessage:
        while True:
            msg = self.conn.next_event()
            if msg is NEED_DATA:
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    raise
                except OSError as exc:
                    raise ConnectionLost(str(exc)) from None
                if self.on_wire is not None and data:
                    self.on_wire("<", data)
                self.conn.receive_data(data)
                continue
            if msg is CLOSED:
                raise ConnectionLost("the control socket closed")
            assert not isinstance(msg, type(NEED_DATA))
            return msg

    def read_event(self, timeout: float | None = None) -> EventMessage:
        """The next event (synchronous mode); TimeoutError if none comes in time."""
        if self.events:
            return self.events.popleft()
        self.sock.settimeout(timeout if timeout is not None else self.timeout)
        try:
            while True:
                msg = self._read_message()
                if isinstance(msg, EventMessage):
                    return msg
        finally:
            self.sock.settimeout(self.timeout)

    def start_reader(
        self,
        on_event: Callable[[EventMessage], None],
        on_close: Callable[[BaseException], None] | None = None,
    ) -> None:
        """From now on a thread reads: events go to `on_event`, answers to `execute()`, and
        `on_close` learns when the connection ends (the device model stopped, or dropped us)."""
        self._replies = queue.Queue()
        replies = self._replies
        self.sock.settimeout(None)

        def run() -> None:
            try:
                while True:
                    msg = self._read_message()
                    if isinstance(msg, EventMessage):
                        on_event(msg)
                    else:
                        replies.put(msg)
            except BaseException as exc:
                replies.put(exc)
                if on_close is not None:
                    on_close(exc)

        self._reader = threading.Thread(target=run, name="control-reader", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ commands

    def send_raw(self, line: bytes) -> None:
        if self.on_wire is not None:
            self.on_wire(">", line)
        with self._lock:
            self.sock.sendall(line)

    def execute(
        self,
        name: str,
        arguments: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> object:
        """Run a command; its return value, or ControlError."""
        msg = self.request(encode_command(name, arguments, next(self._ids)), timeout)
        if isinstance(msg, ErrorReply):
            raise ControlError(msg.error_class, msg.desc)
        return msg.value

    def request(self, line: bytes, timeout: float | None = None) -> Return | ErrorReply:
        """Send one raw line and wait for the answer (used for user-typed JSON too)."""
        self.send_raw(line)
        wait = self.timeout if timeout is None else timeout
        if self._replies is not None:
            try:
                msg = self._replies.get(timeout=wait)
            except queue.Empty:
                raise TimeoutError("no answer from the device model") from None
            if isinstance(msg, BaseException):
                self._replies.put(msg)  # every later call fails the same way
                raise ConnectionLost(str(msg) or type(msg).__name__)
        else:
            self.sock.settimeout(wait)
            while True:
                msg = self._read_message()
                if isinstance(msg, EventMessage):
                    self.events.append(msg)
                    continue
                break
            self.sock.settimeout(self.timeout)
        if isinstance(msg, Return | ErrorReply):
            return msg
        raise ControlProtocolError(f"unexpected message {msg!r}")
