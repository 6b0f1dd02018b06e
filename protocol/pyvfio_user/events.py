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

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from pyvfio_user.constants import Command
from pyvfio_user.version import Capabilities


@dataclass(frozen=True, slots=True)
class Event:
    """The base of every message a connection hands out or takes."""

    msg_id: int


_E = TypeVar("_E", bound=Event)


def _stores_through_slots(cls: type[_E]) -> type[_E]:
    """Give a frozen event an `__init__` that stores each field through its slot descriptor.

    A frozen dataclass's generated `__init__` stores every field with `object.__setattr__`,
    which costs about four times a plain store; for the events of a trapped access (one
    decoded and one built per guest access) that was a tenth of the device model's time per
    access. The replacement has the generated one's signature and does the same stores, with
    the descriptors bound ahead of time. Used on the hot events only.
    """
    names = [f.name for f in fields(cls)]
    env: dict[str, Any] = {f"_set_{n}": getattr(cls, n).__set__ for n in names}
    params = []
    for f in fields(cls):
        if f.default is MISSING:
            params.append(f.name)
        else:
            env[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
    body = "".join(f"    _set_{n}(self, {n})\n" for n in names)
    exec(f"def __init__(self, {', '.join(params)}):\n{body}", env)
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


@dataclass(frozen=True, slots=True)
class _Version(Event):
    """What both VERSION messages say: the protocol version and the sender's capabilities."""

    major: int
    minor: int
    capabilities: Capabilities = field(default_factory=Capabilities)


@dataclass(frozen=True, slots=True)
class _DmaRange(Event):
    """A DMA_UNMAP and its reply: the range (or, with UNMAP_ALL, every range) unmapped."""

    flags: int
    address: int
    size: int
    argsz: int = 24


@dataclass(frozen=True, slots=True)
class _Feature(Event):
    """A DEVICE_FEATURE and its reply; `data` is the feature's own payload, uninterpreted."""

    flags: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class _IndexQuery(Event):
    """A question about one region or IRQ; `argsz` is the room the client has for the answer."""

    index: int
    argsz: int = 16
    no_reply: bool = False


@dataclass(frozen=True, slots=True)
class _Access(Event):
    """Where a trapped access lands: an offset into one of the device's regions."""

    offset: int
    region: int


@dataclass(frozen=True, slots=True)
class _Dma(Event):
    """Where a server's DMA lands: an address in guest memory the client shared."""

    address: int


# ---------------------------------------------------------------- client to server requests


@dataclass(frozen=True, slots=True)
class VersionRequest(_Version):
    """Opens the session; `keys` are the capability names the client sent (a reply may only
    use these), `capabilities` what they said, with the specification's defaults elsewhere."""

    command: ClassVar[Command] = Command.VERSION
    keys: frozenset[str] = frozenset()
    no_reply: bool = False


@dataclass(frozen=True, slots=True)
class DmaMap(Event):
    """Guest memory the client shares; `fd` is None when the server may only use DMA_READ/WRITE."""

    command: ClassVar[Command] = Command.DMA_MAP
    flags: int
    offset: int
    address: int
    size: int
    fd: int | None = None
    no_reply: bool = False


@dataclass(frozen=True, slots=True)
class DmaUnmap(_DmaRange):
    command: ClassVar[Command] = Command.DMA_UNMAP
    no_reply: bool = False


@dataclass(frozen=True, slots=True)
class DeviceGetInfo(Event):
    command: ClassVar[Command] = Command.DEVICE_GET_INFO
    argsz: int = 16
    no_reply: bool = False


@dataclass(frozen=True, slots=True)
class DeviceGetRegionInfo(_IndexQuery):
    """A capability chain that needs more than `argsz` is left out; the client asks again."""

    command: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    argsz: int = 32


@dataclass(frozen=True, slots=True)
class DeviceGetRegionIoFds(_IndexQuery):
    command: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS


@dataclass(frozen=True, slots=True)
class DeviceGetIrqInfo(_IndexQuery):
    command: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO


@dataclass(frozen=True, slots=True)
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


@_stores_through_slots
@dataclass(frozen=True, slots=True)
class RegionRead(_Access):
    """A trapped read: the hot path, decoded with one precompiled struct."""

    command: ClassVar[Command] = Command.REGION_READ
    count: int
    no_reply: bool = False


@_stores_through_slots
@dataclass(frozen=True, slots=True)
class RegionWrite(_Access):
    """A trapped write; QEMU posts most of them (`no_reply`)."""

    command: ClassVar[Command] = Command.REGION_WRITE
    data: bytes
    no_reply: bool = False


@dataclass(frozen=True, slots=True)
class WriteEntry:
    """One write of a REGION_WRITE_MULTI batch (1 to 8 bytes); not a message by itself."""

    offset: int
    region: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RegionWriteMulti(Event):
    command: ClassVar[Command] = Command.REGION_WRITE_MULTI
    writes: tuple[WriteEntry, ...]
    no_reply: bool = False


@dataclass(frozen=True, slots=True)
class DeviceReset(Event):
    command: ClassVar[Command] = Command.DEVICE_RESET
    no_reply: bool = False


@dataclass(frozen=True, slots=True)
class DeviceFeature(_Feature):
    command: ClassVar[Command] = Command.DEVICE_FEATURE
    argsz: int = 8
    no_reply: bool = False


@dataclass(frozen=True, slots=True)
class MigDataRead(Event):
    command: ClassVar[Command] = Command.MIG_DATA_READ
    size: int
    argsz: int = 8
    no_reply: bool = False


@dataclass(frozen=True, slots=True)
class MigDataWrite(Event):
    command: ClassVar[Command] = Command.MIG_DATA_WRITE
    data: bytes
    argsz: int = 8
    no_reply: bool = False


# ---------------------------------------------------------------- server to client requests


@dataclass(frozen=True, slots=True)
class DmaRead(_Dma):
    """The server reads guest memory the client shared without an fd."""

    command: ClassVar[Command] = Command.DMA_READ
    count: int
    no_reply: bool = False


@dataclass(frozen=True, slots=True)
class DmaWrite(_Dma):
    command: ClassVar[Command] = Command.DMA_WRITE
    data: bytes
    no_reply: bool = False


# ---------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class VersionReply(_Version):
    """`keys`: the capability names to send (None: all of them); received, the names sent."""

    command: ClassVar[Command] = Command.VERSION
    keys: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Ack(Event):
    """The payload-less reply that DMA_MAP, SET_IRQS and DEVICE_RESET get; hence the field."""

    command: Command


@dataclass(frozen=True, slots=True)
class DmaUnmapReply(_DmaRange):
    command: ClassVar[Command] = Command.DMA_UNMAP


@dataclass(frozen=True, slots=True)
class DeviceInfo(Event):
    command: ClassVar[Command] = Command.DEVICE_GET_INFO
    flags: int
    num_regions: int
    num_irqs: int


@dataclass(frozen=True, slots=True)
class SparseMmapCap:
    """The parts of a region the client may mmap, as (offset, size) pairs."""

    areas: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class RawRegionCap:
    """A region capability we carry without interpreting (type capabilities and the like)."""

    id: int
    version: int
    body: bytes


RegionCap = SparseMmapCap | RawRegionCap


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class IoFdSubregion:
    """One ioeventfd or ioregionfd of a REGION_IO_FDS reply; `fd_index` indexes its fds."""

    offset: int
    size: int
    fd_index: int
    type: int
    flags: int
    data: int


@dataclass(frozen=True, slots=True)
class RegionIoFds(Event):
    command: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS
    index: int
    subregions: tuple[IoFdSubregion, ...] = ()
    fds: tuple[int, ...] = ()
    argsz: int = 16


@dataclass(frozen=True, slots=True)
class IrqInfo(Event):
    command: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO
    index: int
    flags: int
    count: int


@_stores_through_slots
@dataclass(frozen=True, slots=True)
class RegionReadReply(_Access):
    """The data a trapped read returns; its wire `count` is `len(data)`."""

    command: ClassVar[Command] = Command.REGION_READ
    data: bytes


@_stores_through_slots
@dataclass(frozen=True, slots=True)
class RegionWriteReply(_Access):
    command: ClassVar[Command] = Command.REGION_WRITE
    count: int


@dataclass(frozen=True, slots=True)
class RegionWriteMultiReply(Event):
    """`wr_cnt`: how many of the batch's writes were done."""

    command: ClassVar[Command] = Command.REGION_WRITE_MULTI
    wr_cnt: int


@dataclass(frozen=True, slots=True)
class DeviceFeatureReply(_Feature):
    command: ClassVar[Command] = Command.DEVICE_FEATURE


@dataclass(frozen=True, slots=True)
class MigDataReadReply(Event):
    command: ClassVar[Command] = Command.MIG_DATA_READ
    data: bytes


@dataclass(frozen=True, slots=True)
class MigDataWriteReply(Event):
    command: ClassVar[Command] = Command.MIG_DATA_WRITE
    size: int


@dataclass(frozen=True, slots=True)
class DmaReadReply(_Dma):
    command: ClassVar[Command] = Command.DMA_READ
    data: bytes


@dataclass(frozen=True, slots=True)
class DmaWriteReply(_Dma):
    command: ClassVar[Command] = Command.DMA_WRITE
    count: int


@dataclass(frozen=True, slots=True)
class ErrorReply(Event):
    """A reply with the ERROR flag: the header alone, with an errno. `command` is an int
    because the refused request may name a command this side does not know."""

    command: int
    errno: int


# ---------------------------------------------------------------- local events


@dataclass(frozen=True, slots=True)
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
