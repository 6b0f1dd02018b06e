"""Typed events: one immutable class per vfio-user message and direction, as in h11.

Every event is a frozen dataclass under `Event` and starts with the header's `msg_id`. A
request or reply knows its command as the class variable `command`, so that neither the codec's
table nor a caller ever writes a command number; the three events whose command varies (`Ack`,
`ErrorReply`, the local `BadRequest`) carry it as a field instead.

Requests carry `no_reply` (the sender's NO_REPLY flag: the receiver must stay silent). File
descriptors inside an event belong to whoever holds the event: the connection hands them over
and never closes them afterwards. Freezing makes an event safe to keep, compare and hash after
it was sent or handed out: nothing downstream can change what the wire said.
"""

from __future__ import annotations

from dataclasses import field
from typing import ClassVar

from pyvfio_user.constants import Command
from pyvfio_user.frozen import frozen
from pyvfio_user.version import Capabilities


@frozen
class Event:
    """The base of every message a connection hands out or takes."""

    msg_id: int


@frozen
class _Version(Event):
    """What both VERSION messages say: the protocol version and the sender's capabilities."""

    major: int
    minor: int
    capabilities: Capabilities = field(default_factory=Capabilities)


@frozen
class _DmaRange(Event):
    """A DMA_UNMAP and its reply: the range (or, with UNMAP_ALL, every range) unmapped."""

    flags: int
    address: int
    size: int
    argsz: int = 24


@frozen
class _Feature(Event):
    """A DEVICE_FEATURE and its reply; `data` is the feature's own payload, uninterpreted."""

    flags: int
    data: bytes = b""


@frozen
class _IndexQuery(Event):
    """A question about one region or IRQ; `argsz` is the room the client has for the answer."""

    index: int
    argsz: int = 16
    no_reply: bool = False


@frozen
class _Access(Event):
    """Where a trapped access lands: an offset into one of the device's regions."""

    offset: int
    region: int


@frozen
class _Dma(Event):
    """Where a server's DMA lands: an address in guest memory the client shared."""

    address: int


# ---------------------------------------------------------------- client to server requests


@frozen
class VersionRequest(_Version):
    """Opens the session; `keys` are the capability names the client sent (a reply may only
    use these), `capabilities` what they said, with the specification's defaults elsewhere."""

    command: ClassVar[Command] = Command.VERSION
    keys: frozenset[str] = frozenset()
    no_reply: bool = False


@frozen
class DmaMap(Event):
    """Guest memory the client shares; `fd` is None when the server may only use DMA_READ/WRITE."""

    command: ClassVar[Command] = Command.DMA_MAP
    flags: int
    offset: int
    address: int
    size: int
    fd: int | None = None
    no_reply: bool = False


@frozen
class DmaUnmap(_DmaRange):
    command: ClassVar[Command] = Command.DMA_UNMAP
    no_reply: bool = False


@frozen
class DeviceGetInfo(Event):
    command: ClassVar[Command] = Command.DEVICE_GET_INFO
    argsz: int = 16
    no_reply: bool = False


@frozen
class DeviceGetRegionInfo(_IndexQuery):
    """A capability chain that needs more than `argsz` is left out; the client asks again."""

    command: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    argsz: int = 32


@frozen
class DeviceGetRegionIoFds(_IndexQuery):
    command: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS


@frozen
class DeviceGetIrqInfo(_IndexQuery):
    command: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO


@frozen
class DeviceSetIrqs(Event):
    """`data`: DATA_BOOL's one byte per vector, empty otherwise. `fds`: DATA_EVENTFD's one
    eventfd per vector, in order; none means "de-assign"."""

    command: ClassVar[Command] = Command.DEVICE_SET_IRQS
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    fds: tuple[int, ...] = ()
    no_reply: bool = False


@frozen
class RegionRead(_Access):
    """A trapped read: the hot path, decoded with one precompiled struct."""

    command: ClassVar[Command] = Command.REGION_READ
    count: int
    no_reply: bool = False


@frozen
class RegionWrite(_Access):
    """A trapped write; QEMU posts most of them (`no_reply`)."""

    command: ClassVar[Command] = Command.REGION_WRITE
    data: bytes
    no_reply: bool = False


@frozen
class WriteEntry:
    """One write of a REGION_WRITE_MULTI batch (1 to 8 bytes); not a message by itself."""

    offset: int
    region: int
    data: bytes


@frozen
class RegionWriteMulti(Event):
    command: ClassVar[Command] = Command.REGION_WRITE_MULTI
    writes: tuple[WriteEntry, ...]
    no_reply: bool = False


@frozen
class DeviceReset(Event):
    command: ClassVar[Command] = Command.DEVICE_RESET
    no_reply: bool = False


@frozen
class DeviceFeature(_Feature):
    command: ClassVar[Command] = Command.DEVICE_FEATURE
    argsz: int = 8
    no_reply: bool = False


@frozen
class MigDataRead(Event):
    command: ClassVar[Command] = Command.MIG_DATA_READ
    size: int
    argsz: int = 8
    no_reply: bool = False


@frozen
class MigDataWrite(Event):
    command: ClassVar[Command] = Command.MIG_DATA_WRITE
    data: bytes
    argsz: int = 8
    no_reply: bool = False


# ---------------------------------------------------------------- server to client requests


@frozen
class DmaRead(_Dma):
    """The server reads guest memory the client shared without an fd."""

    command: ClassVar[Command] = Command.DMA_READ
    count: int
    no_reply: bool = False


@frozen
class DmaWrite(_Dma):
    command: ClassVar[Command] = Command.DMA_WRITE
    data: bytes
    no_reply: bool = False


# ---------------------------------------------------------------- replies


@frozen
class VersionReply(_Version):
    """`keys`: the capability names to send (None: all of them); received, the names sent."""

    command: ClassVar[Command] = Command.VERSION
    keys: frozenset[str] | None = None


@frozen
class Ack(Event):
    """The payload-less reply that DMA_MAP, SET_IRQS and DEVICE_RESET get; hence the field."""

    command: Command


@frozen
class DmaUnmapReply(_DmaRange):
    command: ClassVar[Command] = Command.DMA_UNMAP


@frozen
class DeviceInfo(Event):
    command: ClassVar[Command] = Command.DEVICE_GET_INFO
    flags: int
    num_regions: int
    num_irqs: int


@frozen
class SparseMmapCap:
    """The parts of a region the client may mmap, as (offset, size) pairs."""

    areas: tuple[tuple[int, int], ...]


@frozen
class RawRegionCap:
    """A region capability we carry without interpreting (type capabilities and the like)."""

    id: int
    version: int
    body: bytes


RegionCap = SparseMmapCap | RawRegionCap


@frozen
class RegionInfo(Event):
    """`argsz`, sending: the argsz the client asked with. When the full reply (32 bytes of info
    plus the capability chain) needs more, only the info goes out, carrying the needed argsz,
    without the CAPS flag and with cap_offset 0: the client asks again with a bigger argsz.
    Receiving: the argsz the server said the full reply needs."""

    command: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    index: int
    flags: int
    size: int
    offset: int = 0
    caps: tuple[RegionCap, ...] = ()
    fd: int | None = None
    argsz: int = 32


@frozen
class IoFdSubregion:
    """One ioeventfd or ioregionfd of a REGION_IO_FDS reply; `fd_index` indexes its fds."""

    offset: int
    size: int
    fd_index: int
    type: int
    flags: int
    data: int


@frozen
class RegionIoFds(Event):
    command: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS
    index: int
    subregions: tuple[IoFdSubregion, ...] = ()
    fds: tuple[int, ...] = ()
    argsz: int = 16


@frozen
class IrqInfo(Event):
    command: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO
    index: int
    flags: int
    count: int


@frozen
class RegionReadReply(_Access):
    """The data a trapped read returns; its wire `count` is `len(data)`."""

    command: ClassVar[Command] = Command.REGION_READ
    data: bytes


@frozen
class RegionWriteReply(_Access):
    command: ClassVar[Command] = Command.REGION_WRITE
    count: int


@frozen
class RegionWriteMultiReply(Event):
    """`wr_cnt`: how many of the batch's writes were done."""

    command: ClassVar[Command] = Command.REGION_WRITE_MULTI
    wr_cnt: int


@frozen
class DeviceFeatureReply(_Feature):
    command: ClassVar[Command] = Command.DEVICE_FEATURE


@frozen
class MigDataReadReply(Event):
    command: ClassVar[Command] = Command.MIG_DATA_READ
    data: bytes


@frozen
class MigDataWriteReply(Event):
    command: ClassVar[Command] = Command.MIG_DATA_WRITE
    size: int


@frozen
class DmaReadReply(_Dma):
    command: ClassVar[Command] = Command.DMA_READ
    data: bytes


@frozen
class DmaWriteReply(_Dma):
    command: ClassVar[Command] = Command.DMA_WRITE
    count: int


@frozen
class ErrorReply(Event):
    """A reply with the ERROR flag: the header alone, with an errno. `command` is an int
    because the refused request may name a command this side does not know."""

    command: int
    errno: int


# ---------------------------------------------------------------- local events


@frozen
class BadRequest(Event):
    """A well-framed request that cannot be honoured as sent.

    The stream is intact; the receiver should answer `ErrorReply(msg_id, command, errno)`
    unless `no_reply` is set. Any fds that came with it were already closed.
    """

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
