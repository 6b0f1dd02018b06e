"""One immutable event per lease-protocol message, as connections hand them out and take them.

Each event names its wire type in `TYPE` so that the connection's tables can be indexed without
isinstance chains. The header's 64-bit id is not a separate field: every message that has one
gives it the name of what it identifies (lease id, request id, ping token), which is what callers
match on. Code fields that the specification declares open (reasons, statuses, error codes) are
typed `int`: a known value arrives as its IntEnum member, an unknown one as a plain int, and
both compare equal to the number on the wire.
"""

from __future__ import annotations

from typing import ClassVar, get_args

from devmodel_wire.lease.constants import (
    GRANT_FD_KIND_MASK,
    VERSION_MAJOR,
    VERSION_MINOR,
    Access,
    ByeReason,
    MsgType,
    RevokeMode,
)
from pyvfio_user.frozen import frozen


@frozen
class Hello:
    """Opens the session: the borrower offers, the lender answers with what was agreed.

    `max_leases` is the borrower's announced limit on live leases (0 = none announced); the
    lender sends 0. `features` is the offered set from the borrower and the accepted subset
    from the lender.
    """

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    guest_id: int
    aperture_size: int
    granule: int
    features: int = 0
    max_leases: int = 0
    name: str = ""
    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR


@frozen
class Bye:
    """Ends the session; the sender closes the socket right after it."""

    TYPE: ClassVar[MsgType] = MsgType.BYE
    reason: int = ByeReason.NORMAL
    text: str = ""


@frozen
class Error:
    """Says that one received message was refused and had no effect.

    `ref_type` is kept as an int because the refused message may have a type this side does
    not know.
    """

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    ref_type: int
    ref_id: int
    code: int
    text: str = ""


@frozen
class Ping:
    TYPE: ClassVar[MsgType] = MsgType.PING
    token: int


@frozen
class Pong:
    TYPE: ClassVar[MsgType] = MsgType.PONG
    token: int


@frozen
class Grant:
    """Lends `[offset, offset + length)` of the aperture, backed by `fd` from `fd_offset`.

    `flags` is the wire field as is: its low byte is the fd kind (`fd_kind`), e.g.
    `flags=FdKind.DMABUF` for a dma-buf, which the session must have agreed on.

    A received Grant's `fd` belongs to the caller from the moment the event is handed out: the
    caller must close it whether it acknowledges the grant or not. A Grant given to `send()`
    stays the caller's too; the connection only puts the number in `Outgoing.fds`.
    """

    TYPE: ClassVar[MsgType] = MsgType.GRANT
    lease_id: int
    offset: int
    length: int
    fd_offset: int
    prot: int
    fd: int
    flags: int = 0

    @property
    def fd_kind(self) -> int:
        """The kind of `fd` (FdKind: memfd 0, dma-buf 1), the low byte of `flags`; an int,
        since a lender may send a kind this side does not know (NACKed, not malformed)."""
        return self.flags & GRANT_FD_KIND_MASK


@frozen
class GrantAck:
    TYPE: ClassVar[MsgType] = MsgType.GRANT_ACK
    lease_id: int


@frozen
class GrantNack:
    TYPE: ClassVar[MsgType] = MsgType.GRANT_NACK
    lease_id: int
    reason: int
    text: str = ""


@frozen
class Revoke:
    TYPE: ClassVar[MsgType] = MsgType.REVOKE
    lease_id: int
    mode: RevokeMode


@frozen
class Revoked:
    """Promises that nothing on the borrower side can touch the lease's pages any more."""

    TYPE: ClassVar[MsgType] = MsgType.REVOKED
    lease_id: int


@frozen
class PageIn:
    TYPE: ClassVar[MsgType] = MsgType.PAGE_IN
    request_id: int
    offset: int
    length: int
    access: Access


@frozen
class PageInDone:
    """Completes a PAGE_IN; the GRANTs serving it, if any, were sent before it."""

    TYPE: ClassVar[MsgType] = MsgType.PAGE_IN_DONE
    request_id: int
    status: int
    text: str = ""


Event = (
    Hello
    | Bye
    | Error
    | Ping
    | Pong
    | Grant
    | GrantAck
    | GrantNack
    | Revoke
    | Revoked
    | PageIn
    | PageInDone
)

EVENT_TYPES: tuple[type[Event], ...] = get_args(Event)
"""Every event class, for isinstance checks."""
