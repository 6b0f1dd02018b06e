"""vfio-user, spoken natively: wire formats and sans-IO connections for both ends.

Written from the protocol specification (QEMU docs/interop/vfio-user.rst) and checked against
what QEMU's client actually sends. `ServerConnection` is what a device model uses;
`ClientConnection` is what tests, benchmarks and tooling use to play the VMM.
"""

from pyvfio_user.connection import ClientConnection, ServerConnection
from pyvfio_user.constants import Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.events import Event
from pyvfio_user.sansio import CLOSED, NEED_DATA, Outgoing
from pyvfio_user.version import Capabilities

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "Capabilities",
    "ClientConnection",
    "Command",
    "Event",
    "Outgoing",
    "ProtocolError",
    "ServerConnection",
]
