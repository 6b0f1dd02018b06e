"""vfio-user, spoken natively: wire formats and sans-IO connections for both ends.

Written from the protocol specification (QEMU docs/interop/vfio-user.rst) and checked against
what QEMU's client actually sends. `ServerConnection` is what a device model uses;
`ClientConnection` is what tests, benchmarks and tooling use to play the VMM.
"""

from protocol.errors import ProtocolError
from protocol.sansio import CLOSED, NEED_DATA, Outgoing
from protocol.vfio_user.connection import ClientConnection, ServerConnection
from protocol.vfio_user.constants import Command
from protocol.vfio_user.version import Capabilities

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "Capabilities",
    "ClientConnection",
    "Command",
    "Outgoing",
    "ProtocolError",
    "ServerConnection",
]
