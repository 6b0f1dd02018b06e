"""The lease protocol's flavour of ProtocolError: it also says how to answer the peer.

Still a ProtocolError (callers catch that one type); the two extra attributes exist because
the answer to a refused message depends on what only the parser saw: its type, its id, why it
was refused. This is the same idea as h11's `error_status_hint`.
"""

from __future__ import annotations

from devmodel_wire.lease.constants import ErrorCode
from devmodel_wire.lease.events import Event
from pyvfio_user.errors import ProtocolError


class LeaseProtocolError(ProtocolError):
    """`code` classifies the fault for an ERROR message; `reply` is the event to send back.

    `reply` is None when nothing should be sent: the refused message was itself an ERROR (never
    answered, so two confused peers cannot loop), the error is local (raised by `send()`), or
    the peer has already said BYE. For a fatal error it is a BYE, to send best effort before
    closing the socket.
    """

    def __init__(
        self,
        message: str,
        *,
        fatal: bool = True,
        code: ErrorCode = ErrorCode.MALFORMED,
        reply: Event | None = None,
    ) -> None:
        super().__init__(message, fatal=fatal)
        self.code = code
        self.reply = reply
