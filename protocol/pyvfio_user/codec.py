"""Payload codecs: events to bytes and back, driven by one table with a row per command.

A row (`Row`) gives, for each direction of a command, a `Spec`: the event class, the layout of
the payload's fixed part (declared with construct in `layouts`, used precompiled to a
`struct.Struct` from `compiled`), the size rule (exactly the fixed part; at least it, with a
free tail; or a tail as long as the fixed part's last field says), how many fds may come with
it, and, only where a message has structure of its own, a decode hook and an encode hook.
One generic `Spec.decode` and one generic `Spec.encode` do the rest, matching wire fields to
event fields by name:

- decoding, an event field takes the wire field of its name; `data` takes the tail, `fd` the
  single fd, `fds` all of them, `no_reply` the header flag, `command` the row's command;
- encoding, a wire field takes the event field of its name; an `argsz` the event lacks is the
  payload's size, a counted tail's length field is `len(data)`, anything else the event lacks
  is 0.

Decoders raise `RequestError` (a non-fatal ProtocolError with the errno to answer). Fd
ownership: a decoder that returns keeps the fds inside the event; one that raises leaves them
to the caller, who closes them.

REGION_READ/WRITE and their replies, the trapped accesses, also get a `fast` decoder or encoder
on their spec: the same messages with one `unpack_from` or `pack` into a direct constructor
call, no dicts and no allocations beyond the event and its bytes. A fast decoder only takes
the well-formed case and hands anything else to the generic one, so every error (and its
message) comes from the table; a test checks both paths agree.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from pyvfio_user import compiled as lay
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user.constants import Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.version import encode_capabilities, parse_capabilities


class RequestError(ProtocolError):
    """A well-framed message that is wrong: answer it with `errno`, keep the stream."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message, fatal=False)
        self.errno = err


class Limits:
    """What a decoder enforces: the receiver's announced transfer and fd limits."""

    __slots__ = ("max_data_xfer_size", "max_msg_fds")

    def __init__(self, max_data_xfer_size: int, max_msg_fds: int) -> None:
        self.max_data_xfer_size = max_data_xfer_size
        self.max_msg_fds = max_msg_fds


NO_LIMITS: Final = Limits(1 << 64, 1 << 16)

# The hot structs, compiled from their declarations (`compiled`, held to `layouts` by the tests).
HEADER: Final = c.HEADER
REGION_ACCESS: Final = lay.RegionAccess.struct
HEADER_AND_ACCESS: Final = struct.Struct(HEADER.format + REGION_ACCESS.format[1:])
WRITE_MULTI_ENTRY: Final = lay.WriteMultiEntry.struct
U64: Final = lay.WriteMultiCount.struct
SPARSE_AREA: Final = lay.SparseMmapArea.struct

MAX_REGION_CAPS: Final = 16
MAX_SPARSE_AREAS: Final = 1024
MAX_IO_FD_SUBREGIONS: Final = 1024

Encoded = tuple[bytes, tuple[int, ...]]
Fields = dict[str, int]


class Incoming(NamedTuple):
    """What a decode hook sees of one message (only cold messages have hooks)."""

    fields: Fields  # the fixed part, by name
    payload: memoryview  # all of it, fixed part included: chains count offsets from its start
    fds: Sequence[int]
    no_reply: bool


# A message's extra structure: checks it (raising RequestError) and returns event fields.
DecodeHook = Callable[[Incoming], Mapping[str, Any]]
# event -> (wire fields it sets itself, tail bytes)
EncodeHook = Callable[[Any], tuple[Fields, bytes]]
Buffer = bytes | bytearray
Header = tuple[int, int, int, int, int]
# (header fields, buffer, payload start, fds, limits) -> event
Decoder = Callable[[Header, Buffer, int, Sequence[int], Limits], ev.Event]


def _bad(message: str, err: int = errno.EINVAL) -> RequestError:
    return RequestError(err, message)


class Size(enum.Enum):
    """How a payload's length relates to its layout's fixed part."""

    EXACT = "exactly the fixed part"
    AT_LEAST = "the fixed part and a free tail"
    COUNTED = "the fixed part and a tail as long as its last field says"


class Fds(NamedTuple):
    """How many file descriptors a message may carry."""

    least: int
    most: int

    def describe(self) -> str:
        if self.most == 0:
            return "none"
        if self.least == self.most:
            return f"exactly {self.most}"
        return f"at most {self.most}"


NO_FDS: Final = Fds(0, 0)


def up_to(n: int) -> Fds:
    return Fds(0, n)


def exactly(n: int) -> Fds:
    return Fds(n, n)


class Spec:
    """One direction of one command: see the module docstring for how the row is read."""

    def __init__(
        self,
        event: type[ev.Event],
        layout: lay.Compiled,
        size: Size = Size.EXACT,
        fds: Fds = NO_FDS,
        *,
        transfer: bool = False,
        decode_hook: DecodeHook | None = None,
        encode_hook: EncodeHook | None = None,
        alternates: tuple[Spec, ...] = (),
    ) -> None:
        compiled = layout
        self.struct: struct.Struct = compiled.struct
        self.names: tuple[str, ...] = compiled.names
        self.fixed_size: int = compiled.struct.size
        self.event = event
        self.size = size
        self.fds = fds
        # The `count` field is a data transfer, bounded by the receiver's max_data_xfer_size.
        self.transfer = transfer
        self.decode_hook = decode_hook
        self.encode_hook = encode_hook
        # Same event, other fixed sizes that peers are known to send (QEMU, older servers).
        self.alternates = {alt.fixed_size: alt for alt in alternates}
        self.args = tuple(f.name for f in dataclasses.fields(event) if f.name != "msg_id")
        self.fd_field = next((n for n in ("fd", "fds") if n in self.args), None)
        # Set by `bind` when the table is built: the row's command and the direction.
        self.command = Command.VERSION
        self.is_reply = False
        self.what = ""
        # What decodes this message: the generic decoder, or for the trapped accesses a
        # specialised one that hands anything unusual back to it.
        self.decode: Decoder = self._decode

    def bind(self, command: Command, is_reply: bool) -> Spec:
        """Tell the spec its place in the table (its row's command and direction)."""
        self.command = command
        self.is_reply = is_reply
        self.what = f"{command.name} reply" if is_reply else command.name
        for alt in self.alternates.values():
            alt.bind(command, is_reply)
        return self

    # ------------------------------------------------------------------ decoding

    def _decode(
        self, hdr: Header, buf: Buffer, start: int, fds: Sequence[int], lim: Limits
    ) -> ev.Event:
        """The event for the message whose payload starts at `buf[start]`, or RequestError.

        The payload is read through a memoryview released before returning or raising, so
        that the caller's buffer stays resizable.
        """
        msg_id, _command, size, flags, _err = hdr
        no_reply = bool(flags & c.FLAG_NO_REPLY) and not self.is_reply
        with memoryview(buf)[start : start + size - c.HEADER_SIZE] as p:
            return self._decode_payload(msg_id, p, fds, no_reply, lim)

    def _decode_payload(
        self, msg_id: int, p: memoryview, fds: Sequence[int], no_reply: bool, lim: Limits
    ) -> ev.Event:
        n = len(p)
        spec = self if n == self.fixed_size else self.alternates.get(n, self)
        fixed = spec.fixed_size
        if n != fixed and (n < fixed or spec.size is Size.EXACT):
            rule = "must be" if spec.size is Size.EXACT else "needs at least"
            noun = "reply" if self.is_reply else "payload"
            raise _bad(f"{self.command.name} {noun} is {n} bytes, {rule} {fixed}")
        if not self.fds.least <= len(fds) <= self.fds.most:
            raise _bad(
                f"{self.what} carries {len(fds)} file descriptor(s); it takes {self.fds.describe()}"
            )
        f = dict(zip(spec.names, spec.struct.unpack_from(p), strict=True))
        if not self.is_reply and f.get("argsz", fixed) < fixed:
            raise _bad(f"{self.what} argsz {f['argsz']} is below the {fixed} bytes it needs")
        if self.transfer:
            _check_transfer(self.command, f["count"], lim)
        if spec.size is Size.COUNTED:
            length = f[spec.names[-1]]
            if n != fixed + length:
                raise _bad(f"{self.what} says {length} bytes but carries {n - fixed}")
        values: dict[str, Any] = {
            "data": bytes(p[fixed:]),
            "fd": fds[0] if fds else None,
            "fds": tuple(fds),
            "no_reply": no_reply,
            "command": self.command,
        }
        values.update(f)
        if spec.decode_hook is not None:
            values.update(spec.decode_hook(Incoming(f, p, fds, no_reply)))
        return self.event(msg_id, *[values.get(name, 0) for name in spec.args])

    # ------------------------------------------------------------------ encoding

    def encode(self, event: Any) -> Encoded:
        """The whole message for `event`, header included, and the fds that go with it."""
        if self.encode_hook is not None:
            given, tail = self.encode_hook(event)
        else:
            given, tail = {}, (event.data if self.size is not Size.EXACT else b"")
        payload_size = self.fixed_size + len(tail)
        counted = self.names[-1] if self.size is Size.COUNTED else None
        values = []
        for name in self.names:
            if name in given:
                values.append(given[name])
            elif name == counted:
                values.append(len(tail))
            elif name in self.args:
                values.append(getattr(event, name))
            else:
                values.append(payload_size if name == "argsz" else 0)
        if self.is_reply:
            flags = c.TYPE_REPLY
        else:
            flags = c.TYPE_COMMAND | (c.FLAG_NO_REPLY if event.no_reply else 0)
        fds: tuple[int, ...] = ()
        if self.fd_field == "fd":
            fds = () if event.fd is None else (event.fd,)
        elif self.fd_field == "fds":
            fds = tuple(event.fds)
        head = header(event.msg_id, self.command, payload_size, flags)
        return head + self.struct.pack(*values) + tail, fds


class Row(NamedTuple):
    """Everything the codec knows about one command."""

    command: Command
    request: Spec
    reply: Spec


def header(msg_id: int, command: int, payload_size: int, flags: int, err: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, c.HEADER_SIZE + payload_size, flags, err)


def _check_transfer(command: Command, count: int, lim: Limits) -> None:
    if count == 0:
        raise _bad(f"{command.name} of 0 bytes")
    if count > lim.max_data_xfer_size:
        raise _bad(
            f"{command.name} of {count} bytes exceeds max_data_xfer_size {lim.max_data_xfer_size}",
            errno.E2BIG,
        )


# ============================================================================ hooks


def _version_decode(m: Incoming) -> Mapping[str, Any]:
    if m.no_reply:
        # Unanswerable, and it would leave the negotiation pending for good.
        raise _bad("VERSION cannot be sent with NO_REPLY")
    caps, keys = parse_capabilities(bytes(m.payload[4:]))
    return {"capabilities": caps, "keys": keys}


def _version_encode(e: ev.VersionRequest | ev.VersionReply) -> tuple[Fields, bytes]:
    keys = e.keys if isinstance(e, ev.VersionReply) else None
    return {}, encode_capabilities(e.capabilities, keys)


def _dma_map_decode(m: Incoming) -> Mapping[str, Any]:
    f = m.fields
    if f["flags"] & ~(c.DMA_READ_FLAG | c.DMA_WRITE_FLAG):
        raise _bad(f"DMA_MAP flags {f['flags']:#x} has unknown bits")
    if f["size"] == 0 or f["address"] + f["size"] > 1 << 64:
        raise _bad(f"DMA_MAP range {f['address']:#x}+{f['size']:#x} is empty or wraps")
    return {}


def _dma_unmap_decode(m: Incoming) -> Mapping[str, Any]:
    f = m.fields
    if f["flags"] & ~c.DMA_UNMAP_ALL:
        raise _bad(f"DMA_UNMAP flags {f['flags']:#x} are not supported (dirty bitmaps are not)")
    if f["flags"] & c.DMA_UNMAP_ALL and (f["address"] or f["size"]):
        raise _bad("DMA_UNMAP with UNMAP_ALL must give address 0 and size 0")
    return {}


def _io_fds_request_decode(m: Incoming) -> Mapping[str, Any]:
    f = m.fields
    if f["flags"]:
        raise _bad(f"DEVICE_GET_REGION_IO_FDS flags must be 0, not {f['flags']:#x}")
    return {}


def _one_bit(value: int) -> bool:
    return value != 0 and value & (value - 1) == 0


def _set_irqs_decode(m: Incoming) -> Mapping[str, Any]:
    f, p, fds = m.fields, m.payload, m.fds
    flags, count, data_len = f["flags"], f["count"], len(p) - 20
    if f["argsz"] != len(p):
        raise _bad(f"SET_IRQS argsz {f['argsz']} does not match its {len(p)}-byte payload")
    data_type = flags & c.IRQ_SET_DATA_MASK
    action = flags & c.IRQ_SET_ACTION_TYPE_MASK
    if flags & ~(c.IRQ_SET_DATA_MASK | c.IRQ_SET_ACTION_TYPE_MASK):
        raise _bad(f"SET_IRQS flags {flags:#x} has unknown bits")
    if not _one_bit(data_type) or not _one_bit(action):
        raise _bad(f"SET_IRQS flags {flags:#x} must name exactly one data type and one action")
    if f["start"] + count > 1 << 32:
        raise _bad("SET_IRQS start + count overflows")
    if data_type == c.IRQ_SET_DATA_BOOL:
        if fds:
            raise _bad(f"SET_IRQS DATA_BOOL carries {len(fds)} file descriptor(s)")
        if data_len != count:
            raise _bad(f"SET_IRQS DATA_BOOL has {data_len} bytes for {count} vectors")
    elif data_len or (data_type == c.IRQ_SET_DATA_NONE and fds):
        raise _bad("SET_IRQS data or fds do not match its data type")
    elif data_type == c.IRQ_SET_DATA_EVENTFD and fds and len(fds) != count:
        raise _bad(f"SET_IRQS DATA_EVENTFD has {len(fds)} fds for {count} vectors")
    return {}


def _write_multi_decode(m: Incoming) -> Mapping[str, Any]:
    f, p = m.fields, m.payload
    wr_cnt = f["wr_cnt"]
    if wr_cnt == 0 or len(p) != 8 + wr_cnt * WRITE_MULTI_ENTRY.size:
        raise _bad(f"REGION_WRITE_MULTI wr_cnt {wr_cnt} does not match its {len(p)}-byte payload")
    writes = []
    for offset, region, count, data in WRITE_MULTI_ENTRY.iter_unpack(p[8:]):
        if not 1 <= count <= 8:
            raise _bad(f"REGION_WRITE_MULTI entry of {count} bytes (must be 1 to 8)")
        writes.append(ev.WriteEntry(offset, region, data[:count]))
    return {"writes": tuple(writes)}


def _write_multi_encode(e: ev.RegionWriteMulti) -> tuple[Fields, bytes]:
    entries = b"".join(
        WRITE_MULTI_ENTRY.pack(w.offset, w.region, len(w.data), w.data) for w in e.writes
    )
    return {"wr_cnt": len(e.writes)}, entries


_CAP_HEADER: Final = lay.CapHeader.struct
_SPARSE_FIXED: Final = lay.SparseMmapFixed.struct
_IO_FD_SUBREGION: Final = lay.IoFdSubregion.struct


def _region_caps(p: memoryview, first: int) -> tuple[ev.RegionCap, ...]:
    caps: list[ev.RegionCap] = []
    at = first
    while at:
        if len(caps) == MAX_REGION_CAPS:
            raise _bad(f"region info has more than {MAX_REGION_CAPS} capabilities")
        if at < 32 or at + 8 > len(p):
            raise _bad(f"region capability at {at} lies outside the {len(p)}-byte reply")
        cap_id, version, nxt = _CAP_HEADER.unpack_from(p, at)
        end = nxt if nxt else len(p)
        if nxt and (nxt <= at or nxt > len(p)):
            raise _bad(f"region capability chain goes from {at} to {nxt}")
        body = p[at + 8 : end]
        if cap_id == c.REGION_INFO_CAP_SPARSE_MMAP:
            if len(body) < 8:
                raise _bad("sparse mmap capability is truncated")
            (nr, _reserved) = _SPARSE_FIXED.unpack_from(body)
            if nr > MAX_SPARSE_AREAS or 8 + 16 * nr > len(body):
                raise _bad(f"sparse mmap capability claims {nr} areas it does not hold")
            areas = tuple(SPARSE_AREA.iter_unpack(body[8 : 8 + 16 * nr]))
            caps.append(ev.SparseMmapCap(areas))
        else:
            caps.append(ev.RawRegionCap(cap_id, version, bytes(body)))
        at = nxt
    return tuple(caps)


def _region_info_decode(m: Incoming) -> Mapping[str, Any]:
    f, p = m.fields, m.payload
    if f["flags"] & c.REGION_INFO_FLAG_CAPS:
        return {"caps": _region_caps(p, f["cap_offset"])}
    if f["cap_offset"]:
        raise _bad("region info has cap_offset without the CAPS flag")
    return {"caps": ()}


def _region_info_encode(e: ev.RegionInfo) -> tuple[Fields, bytes]:
    """The capability chain, left out (with the needed argsz) when the client's is too small."""
    chain = bytearray()
    at = 32
    for i, cap in enumerate(e.caps):
        if isinstance(cap, ev.SparseMmapCap):
            body = _SPARSE_FIXED.pack(len(cap.areas), 0) + b"".join(
                SPARSE_AREA.pack(off, size) for off, size in cap.areas
            )
            cap_id, version = c.REGION_INFO_CAP_SPARSE_MMAP, 1
        else:
            body, cap_id, version = cap.body, cap.id, cap.version
        nxt = at + 8 + len(body) if i + 1 < len(e.caps) else 0
        chain += _CAP_HEADER.pack(cap_id, version, nxt) + body
        at += 8 + len(body)
    needed = 32 + len(chain)
    flags = e.flags & ~c.REGION_INFO_FLAG_CAPS
    if chain and e.argsz >= needed:
        return {"argsz": needed, "flags": flags | c.REGION_INFO_FLAG_CAPS, "cap_offset": 32}, bytes(
            chain
        )
    return {"argsz": needed, "flags": flags}, b""


def _io_fds_decode(m: Incoming) -> Mapping[str, Any]:
    f, p, fds = m.fields, m.payload, m.fds
    count = f["count"]
    if count > MAX_IO_FD_SUBREGIONS or len(p) != 16 + 40 * count:
        raise _bad(f"REGION_IO_FDS reply count {count} does not match {len(p)} bytes")
    subs = []
    for offset, size, fd_index, kind, flags, _pad, data in _IO_FD_SUBREGION.iter_unpack(p[16:]):
        if fd_index >= len(fds):
            raise _bad(f"REGION_IO_FDS sub-region names fd {fd_index} of {len(fds)}")
        subs.append(ev.IoFdSubregion(offset, size, fd_index, kind, flags, data))
    return {"subregions": tuple(subs)}


def _io_fds_encode(e: ev.RegionIoFds) -> tuple[Fields, bytes]:
    subs = b"".join(
        _IO_FD_SUBREGION.pack(s.offset, s.size, s.fd_index, s.type, s.flags, 0, s.data)
        for s in e.subregions
    )
    return {"argsz": 16 + len(subs), "count": len(e.subregions)}, subs


# ============================================================================ the table

EXACT, AT_LEAST, COUNTED = Size.EXACT, Size.AT_LEAST, Size.COUNTED
_NONE = lay.NoPayload

# fmt: off
TABLE: Final[tuple[Row, ...]] = tuple(
    Row(command, request.bind(command, False), reply.bind(command, True))
    for command, request, reply in (
        (Command.VERSION,
            Spec(ev.VersionRequest, lay.VersionFixed, AT_LEAST,
                 decode_hook=_version_decode, encode_hook=_version_encode),
            Spec(ev.VersionReply, lay.VersionFixed, AT_LEAST,
                 decode_hook=_version_decode, encode_hook=_version_encode)),
        (Command.DMA_MAP,
            Spec(ev.DmaMap, lay.DmaMap, EXACT, up_to(1), decode_hook=_dma_map_decode),
            Spec(ev.Ack, _NONE)),
        (Command.DMA_UNMAP,
            Spec(ev.DmaUnmap, lay.DmaUnmap, decode_hook=_dma_unmap_decode),
            # Some servers answer with an empty payload; the request's entry is implied.
            Spec(ev.DmaUnmapReply, lay.DmaUnmap, alternates=(Spec(ev.DmaUnmapReply, _NONE),))),
        (Command.DEVICE_GET_INFO,
            Spec(ev.DeviceGetInfo, lay.DeviceInfo),
            Spec(ev.DeviceInfo, lay.DeviceInfo)),
        (Command.DEVICE_GET_REGION_INFO,
            Spec(ev.DeviceGetRegionInfo, lay.RegionInfo),
            Spec(ev.RegionInfo, lay.RegionInfo, AT_LEAST, up_to(1),
                 decode_hook=_region_info_decode, encode_hook=_region_info_encode)),
        (Command.DEVICE_GET_REGION_IO_FDS,
            Spec(ev.DeviceGetRegionIoFds, lay.RegionIoFds, decode_hook=_io_fds_request_decode),
            Spec(ev.RegionIoFds, lay.RegionIoFds, AT_LEAST, up_to(MAX_IO_FD_SUBREGIONS),
                 decode_hook=_io_fds_decode, encode_hook=_io_fds_encode)),
        (Command.DEVICE_GET_IRQ_INFO,
            Spec(ev.DeviceGetIrqInfo, lay.IrqInfo),
            Spec(ev.IrqInfo, lay.IrqInfo)),
        (Command.DEVICE_SET_IRQS,
            Spec(ev.DeviceSetIrqs, lay.SetIrqsFixed, AT_LEAST, up_to(1 << 16),
                 decode_hook=_set_irqs_decode),
            Spec(ev.Ack, _NONE)),
        (Command.REGION_READ,
            Spec(ev.RegionRead, lay.RegionAccess, EXACT, transfer=True),
            Spec(ev.RegionReadReply, lay.RegionAccess, COUNTED)),
        (Command.REGION_WRITE,
            Spec(ev.RegionWrite, lay.RegionAccess, COUNTED, transfer=True),
            Spec(ev.RegionWriteReply, lay.RegionAccess)),
        (Command.DMA_READ,
            Spec(ev.DmaRead, lay.DmaAccess, EXACT, transfer=True),
            Spec(ev.DmaReadReply, lay.DmaAccess, COUNTED)),
        (Command.DMA_WRITE,
            Spec(ev.DmaWrite, lay.DmaAccess, COUNTED, transfer=True),
            # The specification's reply has a u32 count; QEMU's own struct uses a u64.
            Spec(ev.DmaWriteReply, lay.DmaWriteReply,
                 alternates=(Spec(ev.DmaWriteReply, lay.DmaAccess),))),
        (Command.DEVICE_RESET,
            Spec(ev.DeviceReset, _NONE),
            Spec(ev.Ack, _NONE)),
        (Command.REGION_WRITE_MULTI,
            Spec(ev.RegionWriteMulti, lay.WriteMultiCount, AT_LEAST,
                 decode_hook=_write_multi_decode, encode_hook=_write_multi_encode),
            Spec(ev.RegionWriteMultiReply, lay.WriteMultiCount)),
        (Command.DEVICE_FEATURE,
            Spec(ev.DeviceFeature, lay.DeviceFeatureFixed, AT_LEAST),
            Spec(ev.DeviceFeatureReply, lay.DeviceFeatureFixed, AT_LEAST)),
        (Command.MIG_DATA_READ,
            Spec(ev.MigDataRead, lay.MigData),
            Spec(ev.MigDataReadReply, lay.MigData, COUNTED)),
        (Command.MIG_DATA_WRITE,
            Spec(ev.MigDataWrite, lay.MigData, COUNTED),
            Spec(ev.MigDataWriteReply, lay.MigData)),
    )
)
# fmt: on

ROWS: Final[dict[int, Row]] = {row.command: row for row in TABLE}
REQUESTS: Final[dict[int, Spec]] = {row.command: row.request for row in TABLE}
REPLIES: Final[dict[int, Spec]] = {row.command: row.reply for row in TABLE}

# Every event type with one spec (Ack serves three commands: its own field says which).
SPEC_OF: Final[dict[type, Spec]] = {
    spec.event: spec
    for row in TABLE
    for spec in (row.request, row.reply)
    if spec.event is not ev.Ack
}


# ============================================================================ the hot path
# Each function below is its spec's generic decode or encode, specialised for the trapped
# accesses. `tests/unit/test_vfio_user_codec_table.py` checks that they agree.

_READ: Final = int(Command.REGION_READ)
_WRITE: Final = int(Command.REGION_WRITE)
_REQUEST: Final = c.TYPE_COMMAND
_POSTED: Final = c.TYPE_COMMAND | c.FLAG_NO_REPLY
_REPLY: Final = c.TYPE_REPLY


def _fast_region_read(
    hdr: Header, buf: Buffer, start: int, fds: Sequence[int], lim: Limits
) -> ev.Event:
    msg_id, _command, size, flags, _err = hdr
    if size == 32 and not fds:
        offset, region, count = REGION_ACCESS.unpack_from(buf, start)
        if 0 < count <= lim.max_data_xfer_size:
            return ev.RegionRead(msg_id, offset, region, count, flags & c.FLAG_NO_REPLY != 0)
    return REQUESTS[_READ]._decode(hdr, buf, start, fds, lim)


def _fast_region_write(
    hdr: Header, buf: Buffer, start: int, fds: Sequence[int], lim: Limits
) -> ev.Event:
    msg_id, _command, size, flags, _err = hdr
    if size > 32 and not fds:
        offset, region, count = REGION_ACCESS.unpack_from(buf, start)
        if size == 32 + count <= 32 + lim.max_data_xfer_size:
            # A temporary view: one copy, and nothing left holding the buffer.
            data = bytes(memoryview(buf)[start + 16 : start + size - 16])
            return ev.RegionWrite(msg_id, offset, region, data, flags & c.FLAG_NO_REPLY != 0)
    return REQUESTS[_WRITE]._decode(hdr, buf, start, fds, lim)


def _fast_region_read_encode(e: ev.RegionRead) -> Encoded:
    flags = _POSTED if e.no_reply else _REQUEST
    return HEADER_AND_ACCESS.pack(e.msg_id, _READ, 32, flags, 0, e.offset, e.region, e.count), ()


def _fast_region_write_encode(e: ev.RegionWrite) -> Encoded:
    n = len(e.data)
    flags = _POSTED if e.no_reply else _REQUEST
    head = HEADER_AND_ACCESS.pack(e.msg_id, _WRITE, 32 + n, flags, 0, e.offset, e.region, n)
    return head + e.data, ()


def _fast_read_reply_encode(e: ev.RegionReadReply) -> Encoded:
    n = len(e.data)
    head = HEADER_AND_ACCESS.pack(e.msg_id, _READ, 32 + n, _REPLY, 0, e.offset, e.region, n)
    return head + e.data, ()


def _fast_write_reply_encode(e: ev.RegionWriteReply) -> Encoded:
    return HEADER_AND_ACCESS.pack(e.msg_id, _WRITE, 32, _REPLY, 0, e.offset, e.region, e.count), ()


REQUESTS[_READ].decode = _fast_region_read
REQUESTS[_WRITE].decode = _fast_region_write

# ============================================================================ entry points


def _encode_ack(e: ev.Ack) -> Encoded:
    row = ROWS.get(e.command)
    if row is None or row.reply.event is not ev.Ack:
        raise ProtocolError(f"cannot send an Ack to command {e.command}: it has a payload")
    return row.reply.encode(e)


def _encode_error(e: ev.ErrorReply) -> Encoded:
    return header(e.msg_id, e.command, 0, c.TYPE_REPLY | c.FLAG_ERROR, e.errno), ()


ENCODERS: Final[dict[type, Callable[[Any], Encoded]]] = {
    **{cls: spec.encode for cls, spec in SPEC_OF.items()},
    ev.RegionRead: _fast_region_read_encode,
    ev.RegionWrite: _fast_region_write_encode,
    ev.RegionReadReply: _fast_read_reply_encode,
    ev.RegionWriteReply: _fast_write_reply_encode,
    ev.Ack: _encode_ack,
    ev.ErrorReply: _encode_error,
}


def encode(event: Any) -> Encoded:
    """Any event to its wire bytes and the fds that go with them.

    Values that do not fit their fields raise a ProtocolError, so a caller's bug surfaces as
    the one exception type instead of struct.error.
    """
    encoder = ENCODERS.get(type(event))
    if encoder is None:
        raise ProtocolError(f"cannot send {type(event).__name__}: not a vfio-user message")
    try:
        return encoder(event)
    except (struct.error, OverflowError, TypeError) as exc:
        raise ProtocolError(f"cannot encode {type(event).__name__}: {exc}") from None


def decode_message(data: bytes, fds: Sequence[int] = (), limits: Limits = NO_LIMITS) -> Any:
    """Decode one whole message (header and payload), for tools and tests that hold exactly one.

    Error replies and unknown commands are reported as they would be to a connection; state
    (who may send what, which reply answers which request) is the connection's business.
    """
    if len(data) < c.HEADER_SIZE:
        raise ProtocolError(f"{len(data)} bytes cannot hold a {c.HEADER_SIZE}-byte header")
    msg_id, command, size, flags, err = HEADER.unpack_from(data)
    if size != len(data):
        raise ProtocolError(f"header says {size} bytes, the message has {len(data)}")
    row = ROWS.get(command)
    if row is None:
        raise _bad(f"unknown command {command}", errno.ENOSYS)
    if flags & c.TYPE_MASK == c.TYPE_REPLY:
        if flags & c.FLAG_ERROR:
            return ev.ErrorReply(msg_id, command, err)
        return row.reply.decode((msg_id, command, size, flags, err), data, 16, fds, limits)
    return row.request.decode((msg_id, command, size, flags, err), data, 16, fds, limits)
