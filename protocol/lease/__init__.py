"""The lease protocol between a lender and the device model (docs/lease-protocol.md)."""

from protocol.lease.connection import BorrowerConnection, LenderConnection, Role, State
from protocol.lease.constants import (
    Access,
    ByeReason,
    ErrorCode,
    MsgType,
    NackReason,
    PageInStatus,
    RevokeMode,
)
from protocol.lease.errors import LeaseProtocolError
from protocol.lease.events import (
    Bye,
    Error,
    Event,
    Grant,
    GrantAck,
    GrantNack,
    Hello,
    PageIn,
    PageInDone,
    Ping,
    Pong,
    Revoke,
    Revoked,
)

__all__ = [
    "Access",
    "BorrowerConnection",
    "Bye",
    "ByeReason",
    "Error",
    "ErrorCode",
    "Event",
    "Grant",
    "GrantAck",
    "GrantNack",
    "Hello",
    "LeaseProtocolError",
    "LenderConnection",
    "MsgType",
    "NackReason",
    "PageIn",
    "PageInDone",
    "PageInStatus",
    "Ping",
    "Pong",
    "Revoke",
    "RevokeMode",
    "Revoked",
    "Role",
    "State",
]
