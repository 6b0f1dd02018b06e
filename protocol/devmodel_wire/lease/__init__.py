"""The lease protocol between a lender and the device model (docs/lease-protocol.md)."""

from devmodel_wire.lease.connection import BorrowerConnection, LenderConnection, Role, State
from devmodel_wire.lease.constants import (
    Access,
    ByeReason,
    ErrorCode,
    MsgType,
    NackReason,
    PageInStatus,
    RevokeMode,
)
from devmodel_wire.lease.errors import LeaseProtocolError
from devmodel_wire.lease.events import (
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
