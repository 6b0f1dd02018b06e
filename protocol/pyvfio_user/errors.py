"""The one exception type every parser in `protocol/` raises (or subclasses) for malformed input."""

from __future__ import annotations


class ProtocolError(Exception):
    """Input that breaks a wire format or a connection's state machine.

    `fatal` says whether the byte stream can still be trusted: False when the bad message was
    framed correctly (the peer can be answered with an error and the stream goes on), True when
    framing itself is broken and the connection must be dropped.
    """

    def __init__(self, message: str, *, fatal: bool = True) -> None:
        super().__init__(message)
        self.fatal = fatal
