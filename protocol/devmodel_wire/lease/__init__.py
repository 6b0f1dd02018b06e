"""The lease protocol between a lender and the device model (docs/lease-protocol.md).

Its names are loaded at first use (PEP 562), each from its module: a device model whose lender is
the built-in one needs the protocol's constants and GRANT checks, not its connection and events
(docs/performance.md, "Footprint of an idle instance").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
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

_MODULE_OF: Final = {
    "BorrowerConnection": "connection",
    "LenderConnection": "connection",
    "Role": "connection",
    "State": "connection",
    "Access": "constants",
    "ByeReason": "constants",
    "ErrorCode": "constants",
    "MsgType": "constants",
    "NackReason": "constants",
    "PageInStatus": "constants",
    "RevokeMode": "constants",
    "LeaseProtocolError": "errors",
    "Bye": "events",
    "Error": "events",
    "Event": "events",
    "Grant": "events",
    "GrantAck": "events",
    "GrantNack": "events",
    "Hello": "events",
    "PageIn": "events",
    "PageInDone": "events",
    "Ping": "events",
    "Pong": "events",
    "Revoke": "events",
    "Revoked": "events",
}


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


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
