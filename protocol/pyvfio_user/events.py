"""Typed events: one class per vfio-user message and direction.

Requests carry `no_reply` (the sender's NO_REPLY flag: the receiver must stay silent). File
descriptors inside an event belong to whoever holds the event: the connection hands them over
and never closes them afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyvfio_user.constants import Command
from pyvfio_user.version import Capabilities

# ---------------------------------------------------------------- client to server requests


@dataclass(slots=True)
class VersionRequest:
    msg_id: int
    major: int
    minor: int
    capabilities: Capabilities = field(default_factory=Capabilities)
    # The capability keys the sender named; a reply may only use these.
    keys: frozenset[str] = frozenset()
    no_reply: bool = False


@dataclass(slots=True)
class DmaMap:
    msg_id: int
    flags: int
    offset: int
    address: int
    size: int
    fd: int | None = None
    no_reply: bool = False


@dataclass(slots=True)
class DmaUnmap:
    msg_id: int
    flags: int
    address: int
    size: int
    argsz: int = 24
    no_reply: bool = False


@dataclass(slots=True)
class DeviceGetInfo:
    msg_id: int
    argsz: int = 16
    no_reply: bool = False


@dataclass(slots=True)
class DeviceGetRegionInfo:
    msg_id: int
    index: int
    argsz: int = 32
    no_reply: bool = False


@dataclass(slots=True)
class DeviceGetRegionIoFds:
    msg_id: int
    index: int
    argsz: int = 16
    no_reply: bool = False


@dataclass(slots=True)
class DeviceGetIrqInfo:
    msg_id: int
    index: int
    argsz: int = 16
    no_reply: bool = False


@dataclass(slots=True)
class DeviceSetIrqs:
    msg_id: int
    flags: int
    index: int
    start: int
    count: int
    # DATA_BOOL: one byte per vector. Empty otherwise.
    data: bytes = b""
    # DATA_EVENTFD: one eventfd per vector, in order; none means "de-assign".
    fds: tuple[int, ...] = ()
    no_reply: bool = False


@dataclass(slots=True)
class RegionRead:
    msg_id: int
    offset: int
    region: int
    count: int
    no_reply: bool = False


@dataclass(slots=True)
class RegionWrite:
    msg_id: int
    offset: int
    region: int
    data: bytes
    no_reply: bool = False


@dataclass(slots=True)
class WriteEntry:
    offset: int
    region: int
    data: bytes


@dataclass(slots=True)
class RegionWriteMulti:
    msg_id: int
    writes: tuple[WriteEntry, ...]
    no_reply: bool = False


@dataclass(slots=True)
class DeviceReset:
    msg_id: int
    no_reply: bool = False


@dataclass(slots=True)
class DeviceFeature:
    msg_id: int
    flags: int
    data: bytes = b""
    argsz: int = 8
    no_reply: bool = False


@dataclass(slots=True)
class MigDataRead:
    msg_id: int
    size: int
    argsz: int = 8
    no_reply: bool = False


@dataclass(slots=True)
class MigDataWrite:
    msg_id: int
    data: bytes
    argsz: int = 8
    no_reply: bool = False


# ---------------------------------------------------------------- server to client requests


@dataclass(slots=True)
class DmaRead:
    msg_id: int
    address: int
    count: int
    no_reply: bool = False


@dataclass(slots=True)
class DmaWrite:
    msg_id: int
    address: int
    data: bytes
    no_reply: bool = False


# ---------------------------------------------------------------- replies


@dataclass(slots=True)
class VersionReply:
    msg_id: int
    major: int
    minor: int
    capabilities: Capabilities = field(default_factory=Capabilities)
    keys: frozenset[str] | None = None


@dataclass(slots=True)
class Ack:
    """The payload-less reply that DMA_MAP, SET_IRQS and DEVICE_RESET get."""

    msg_id: int
    command: Command


@dataclass(slots=True)
class DmaUnmapReply:
    msg_id: int
    flags: int
    address: int
    size: int
    argsz: int = 24


@dataclass(slots=True)
class DeviceInfo:
    msg_id: int
    flags: int
    num_regions: int
    num_irqs: int


@dataclass(slots=True)
class SparseMmapCap:
    areas: tuple[tuple[int, int], ...]


@dataclass(slots=True)
class RawRegionCap:
    """A region capability we carry without interpreting (type capabilities and the like)."""

    id: int
    version: int
    body: bytes


RegionCap = SparseMmapCap | RawRegionCap


@dataclass(slots=True)
class RegionInfo:
    msg_id: int
    index: int
    flags: int
    size: int
    offset: int = 0
    caps: tuple[RegionCap, ...] = ()
    fd: int | None = None
    # Sending: the argsz the client asked with. When the full reply (32 bytes of info plus the
    # capability chain) needs more, only the info goes out, carrying the needed argsz, without
    # the CAPS flag and with cap_offset 0: the client asks again with a bigger argsz.
    # Receiving: the argsz the server said the full reply needs.
    argsz: int = 32


@dataclass(slots=True)
class IoFdSubregion:
    offset: int
    size: int
    fd_index: int
    type: int
    flags: int
    data: int


@dataclass(slots=True)
class RegionIoFds:
    msg_id: int
    index: int
    subregions: tuple[IoFdSubregion, ...] = ()
    fds: tuple[int, ...] = ()
    argsz: int = 16


@dataclass(slots=True)
class IrqInfo:
    msg_id: int
    index: int
    flags: int
    count: int


@dataclass(slots=True)
class RegionReadReply:
    msg_id: int
    offset: int
    region: int
    data: bytes


@dataclass(slots=True)
class RegionWriteReply:
    msg_id: int
    offset: int
    region: int
    count: int


@dataclass(slots=True)
class RegionWriteMultiReply:
    msg_id: int
    wr_cnt: int


@dataclass(slots=True)
class DeviceFeatureReply:
    msg_id: int
    flags: int
    data: bytes = b""


@dataclass(slots=True)
class MigDataReadReply:
    msg_id: int
    data: bytes


@dataclass(slots=True)
class MigDataWriteReply:
    msg_id: int
    size: int


@dataclass(slots=True)
class DmaReadReply:
    msg_id: int
    address: int
    data: bytes


@dataclass(slots=True)
class DmaWriteReply:
    msg_id: int
    address: int
    count: int


@dataclass(slots=True)
class ErrorReply:
    """A reply with the ERROR flag: the header alone, with an errno."""

    msg_id: int
    command: int
    errno: int


# ---------------------------------------------------------------- local events


@dataclass(slots=True)
class BadRequest:
    """A well-framed request that cannot be honoured as sent.

    The stream is intact; the receiver should answer `ErrorReply(msg_id, command, errno)`
    unless `no_reply` is set. Any fds that came with it were already closed.
    """

    msg_id: int
    command: int
    errno: int
    reason: str
    no_reply: bool = False


ClientRequest = (
    VersionRequest
    | DmaMap
    | DmaUnmap
    | DeviceGetInfo
    | DeviceGetRegionInfo
    | DeviceGetRegionIoFds
    | DeviceGetIrqInfo
    | DeviceSetIrqs
    | RegionRead
    | RegionWrite
    | RegionWriteMulti
    | DeviceReset
    | DeviceFeature
    | MigDataRead
    | MigDataWrite
)
ServerRequest = DmaRead | DmaWrite
ServerReply = (
    VersionReply
    | Ack
    | DmaUnmapReply
    | DeviceInfo
    | RegionInfo
    | RegionIoFds
    | IrqInfo
    | RegionReadReply
    | RegionWriteReply
    | RegionWriteMultiReply
    | DeviceFeatureReply
    | MigDataReadReply
    | MigDataWriteReply
    | ErrorReply
)
ClientReply = DmaReadReply | DmaWriteReply | ErrorReply
