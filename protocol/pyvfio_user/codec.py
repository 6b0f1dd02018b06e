"""Payload codecs: events to bytes and back, one entry per command and direction.

Decoders take a payload (the bytes after the header) and the fds that came with the message,
and either return an event or raise `RequestError` (a non-fatal ProtocolError with the errno to
answer). Fd ownership: a decoder that returns keeps the fds inside the event; one that raises
leaves them to the caller, who closes them.

Cold messages go through the compiled construct declarations in `layouts`; REGION_READ/WRITE
and their replies use precompiled `struct.Struct`s.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user import layouts as lay
from pyvfio_user.constants import Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.version import encode_capabilities, parse_capabilities


class RequestError(ProtocolError):
    """A well-framed message that is wrong: answer it with `errno`, keep the stream."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message, fatal=False)
        self.errno = err


# Hot paths. A test checks each against its construct declaration.
HEADER: Final = c.HEADER
REGION_ACCESS: Final = struct.Struct("<QII")
HEADER_AND_ACCESS: Final = struct.Struct("<HHIIIQII")
WRITE_MULTI_ENTRY: Final = struct.Struct("<QII8s")
U64: Final = struct.Struct("<Q")

_C: Final[dict[str, Any]] = {
    name: getattr(lay, name).compile()
    for name in (
        "DmaMap",
        "DmaUnmap",
        "DeviceInfo",
        "RegionInfo",
        "CapHeader",
        "SparseMmapFixed",
        "SparseMmapArea",
        "RegionIoFds",
        "IoFdSubregion",
        "IrqInfo",
        "SetIrqsFixed",
        "DmaAccess",
        "DmaWriteReply",
        "DeviceFeatureFixed",
        "MigData",
    )
}
_SIZE: Final = lay.SIZES

MAX_REGION_CAPS: Final = 16
MAX_SPARSE_AREAS: Final = 1024
MAX_IO_FD_SUBREGIONS: Final = 1024


def _bad(message: str, err: int = errno.EINVAL) -> RequestError:
    return RequestError(err, message)


def _exact(command: Command, payload: memoryview, size: int) -> None:
    if len(payload) != size:
        raise _bad(f"{command.name} payload is {len(payload)} bytes, must be {size}")


def _at_least(command: Command, payload: memoryview, size: int) -> None:
    if len(payload) < size:
        raise _bad(f"{command.name} payload is {len(payload)} bytes, needs at least {size}")


def _no_fds(command: Command, fds: Sequence[int]) -> None:
    if fds:
        raise _bad(f"{command.name} carries {len(fds)} file descriptor(s); it takes none")


def _parse(name: str, payload: memoryview, at: int = 0) -> Any:
    return _C[name].parse(bytes(payload[at : at + _SIZE[name]]))


def _build(name: str, **fields: Any) -> bytes:
    data: bytes = _C[name].build(fields)
    return data


def _argsz(command: Command, argsz: int, minimum: int) -> None:
    if argsz < minimum:
        raise _bad(f"{command.name} argsz {argsz} is below the {minimum} bytes it needs")


# ======================================================================= requests: decoding


class Limits:
    """What a decoder enforces: the receiver's announced transfer and fd limits."""

    __slots__ = ("max_data_xfer_size", "max_msg_fds")

    def __init__(self, max_data_xfer_size: int, max_msg_fds: int) -> None:
        self.max_data_xfer_size = max_data_xfer_size
        self.max_msg_fds = max_msg_fds


RequestDecoder = Callable[[int, memoryview, Sequence[int], bool, Limits], Any]


def _dec_version(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.VersionRequest:
    _no_fds(Command.VERSION, fds)
    if nr:
        # Unanswerable, and it would leave the negotiation pending for good.
        raise _bad("VERSION cannot be sent with NO_REPLY")
    _at_least(Command.VERSION, p, 4)
    major, minor = struct.unpack_from("<HH", p)
    caps, keys = parse_capabilities(bytes(p[4:]))
    return ev.VersionRequest(msg_id, major, minor, caps, keys, nr)


def _dec_dma_map(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.DmaMap:
    _exact(Command.DMA_MAP, p, 32)
    m = _parse("DmaMap", p)
    _argsz(Command.DMA_MAP, m.argsz, 32)
    if m.flags & ~(c.DMA_READ_FLAG | c.DMA_WRITE_FLAG):
        raise _bad(f"DMA_MAP flags {m.flags:#x} has unknown bits")
    if m.size == 0 or m.address + m.size > 1 << 64:
        raise _bad(f"DMA_MAP range {m.address:#x}+{m.size:#x} is empty or wraps")
    if len(fds) > 1:
        raise _bad(f"DMA_MAP carries {len(fds)} fds; it takes at most one")
    return ev.DmaMap(msg_id, m.flags, m.offset, m.address, m.size, fds[0] if fds else None, nr)


def _dec_dma_unmap(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.DmaUnmap:
    _no_fds(Command.DMA_UNMAP, fds)
    _exact(Command.DMA_UNMAP, p, 24)
    m = _parse("DmaUnmap", p)
    _argsz(Command.DMA_UNMAP, m.argsz, 24)
    if m.flags & ~c.DMA_UNMAP_ALL:
        raise _bad(f"DMA_UNMAP flags {m.flags:#x} are not supported (dirty bitmaps are not)")
    if m.flags & c.DMA_UNMAP_ALL and (m.address or m.size):
        raise _bad("DMA_UNMAP with UNMAP_ALL must give address 0 and size 0")
    return ev.DmaUnmap(msg_id, m.flags, m.address, m.size, m.argsz, nr)


def _dec_get_info(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.DeviceGetInfo:
    _no_fds(Command.DEVICE_GET_INFO, fds)
    _exact(Command.DEVICE_GET_INFO, p, 16)
    m = _parse("DeviceInfo", p)
    _argsz(Command.DEVICE_GET_INFO, m.argsz, 16)
    return ev.DeviceGetInfo(msg_id, m.argsz, nr)


def _dec_region_info(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.DeviceGetRegionInfo:
    _no_fds(Command.DEVICE_GET_REGION_INFO, fds)
    _exact(Command.DEVICE_GET_REGION_INFO, p, 32)
    m = _parse("RegionInfo", p)
    _argsz(Command.DEVICE_GET_REGION_INFO, m.argsz, 32)
    return ev.DeviceGetRegionInfo(msg_id, m.index, m.argsz, nr)


def _dec_io_fds(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.DeviceGetRegionIoFds:
    _no_fds(Command.DEVICE_GET_REGION_IO_FDS, fds)
    _exact(Command.DEVICE_GET_REGION_IO_FDS, p, 16)
    m = _parse("RegionIoFds", p)
    _argsz(Command.DEVICE_GET_REGION_IO_FDS, m.argsz, 16)
    if m.flags:
        raise _bad(f"DEVICE_GET_REGION_IO_FDS flags must be 0, not {m.flags:#x}")
    return ev.DeviceGetRegionIoFds(msg_id, m.index, m.argsz, nr)


def _dec_irq_info(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.DeviceGetIrqInfo:
    _no_fds(Command.DEVICE_GET_IRQ_INFO, fds)
    _exact(Command.DEVICE_GET_IRQ_INFO, p, 16)
    m = _parse("IrqInfo", p)
    _argsz(Command.DEVICE_GET_IRQ_INFO, m.argsz, 16)
    return ev.DeviceGetIrqInfo(msg_id, m.index, m.argsz, nr)


def _one_bit(value: int) -> bool:
    return value != 0 and value & (value - 1) == 0


def _dec_set_irqs(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.DeviceSetIrqs:
    cmd = Command.DEVICE_SET_IRQS
    _at_least(cmd, p, 20)
    m = _parse("SetIrqsFixed", p)
    if m.argsz != len(p):
        raise _bad(f"SET_IRQS argsz {m.argsz} does not match its {len(p)}-byte payload")
    data_type = m.flags & c.IRQ_SET_DATA_MASK
    action = m.flags & c.IRQ_SET_ACTION_TYPE_MASK
    if m.flags & ~(c.IRQ_SET_DATA_MASK | c.IRQ_SET_ACTION_TYPE_MASK):
        raise _bad(f"SET_IRQS flags {m.flags:#x} has unknown bits")
    if not _one_bit(data_type) or not _one_bit(action):
        raise _bad(f"SET_IRQS flags {m.flags:#x} must name exactly one data type and one action")
    if m.start + m.count > 1 << 32:
        raise _bad("SET_IRQS start + count overflows")
    data = bytes(p[20:])
    if data_type == c.IRQ_SET_DATA_BOOL:
        _no_fds(cmd, fds)
        if len(data) != m.count:
            raise _bad(f"SET_IRQS DATA_BOOL has {len(data)} bytes for {m.count} vectors")
    elif data or (data_type == c.IRQ_SET_DATA_NONE and fds):
        raise _bad("SET_IRQS data or fds do not match its data type")
    elif data_type == c.IRQ_SET_DATA_EVENTFD and fds and len(fds) != m.count:
        raise _bad(f"SET_IRQS DATA_EVENTFD has {len(fds)} fds for {m.count} vectors")
    return ev.DeviceSetIrqs(msg_id, m.flags, m.index, m.start, m.count, data, tuple(fds), nr)


def _check_count(cmd: Command, count: int, lim: Limits) -> None:
    if count == 0:
        raise _bad(f"{cmd.name} of 0 bytes")
    if count > lim.max_data_xfer_size:
        raise _bad(
            f"{cmd.name} of {count} bytes exceeds max_data_xfer_size {lim.max_data_xfer_size}",
            errno.E2BIG,
        )


def _dec_region_read(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.RegionRead:
    if len(p) != 16 or fds:
        _no_fds(Command.REGION_READ, fds)
        _exact(Command.REGION_READ, p, 16)
    offset, region, count = REGION_ACCESS.unpack_from(p)
    if count == 0 or count > lim.max_data_xfer_size:
        _check_count(Command.REGION_READ, count, lim)
    return ev.RegionRead(msg_id, offset, region, count, nr)


def _dec_region_write(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.RegionWrite:
    if fds:
        _no_fds(Command.REGION_WRITE, fds)
    if len(p) < 16:
        _at_least(Command.REGION_WRITE, p, 16)
    offset, region, count = REGION_ACCESS.unpack_from(p)
    if count == 0 or count > lim.max_data_xfer_size:
        _check_count(Command.REGION_WRITE, count, lim)
    if len(p) != 16 + count:
        raise _bad(f"REGION_WRITE says {count} bytes but carries {len(p) - 16}")
    return ev.RegionWrite(msg_id, offset, region, bytes(p[16:]), nr)


def _dec_reset(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.DeviceReset:
    _no_fds(Command.DEVICE_RESET, fds)
    _exact(Command.DEVICE_RESET, p, 0)
    return ev.DeviceReset(msg_id, nr)


def _dec_write_multi(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.RegionWriteMulti:
    cmd = Command.REGION_WRITE_MULTI
    _no_fds(cmd, fds)
    _at_least(cmd, p, 8)
    (wr_cnt,) = U64.unpack_from(p)
    size = WRITE_MULTI_ENTRY.size
    if wr_cnt == 0 or len(p) != 8 + wr_cnt * size:
        raise _bad(f"REGION_WRITE_MULTI wr_cnt {wr_cnt} does not match its {len(p)}-byte payload")
    writes = []
    for offset, region, count, data in WRITE_MULTI_ENTRY.iter_unpack(p[8:]):
        if not 1 <= count <= 8:
            raise _bad(f"REGION_WRITE_MULTI entry of {count} bytes (must be 1 to 8)")
        writes.append(ev.WriteEntry(offset, region, data[:count]))
    return ev.RegionWriteMulti(msg_id, tuple(writes), nr)


def _dec_feature(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.DeviceFeature:
    _no_fds(Command.DEVICE_FEATURE, fds)
    _at_least(Command.DEVICE_FEATURE, p, 8)
    m = _parse("DeviceFeatureFixed", p)
    _argsz(Command.DEVICE_FEATURE, m.argsz, 8)
    return ev.DeviceFeature(msg_id, m.flags, bytes(p[8:]), m.argsz, nr)


def _dec_mig_read(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.MigDataRead:
    _no_fds(Command.MIG_DATA_READ, fds)
    _exact(Command.MIG_DATA_READ, p, 8)
    m = _parse("MigData", p)
    _argsz(Command.MIG_DATA_READ, m.argsz, 8)
    return ev.MigDataRead(msg_id, m.size, m.argsz, nr)


def _dec_mig_write(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.MigDataWrite:
    _no_fds(Command.MIG_DATA_WRITE, fds)
    _at_least(Command.MIG_DATA_WRITE, p, 8)
    m = _parse("MigData", p)
    _argsz(Command.MIG_DATA_WRITE, m.argsz, 8)
    if m.size != len(p) - 8:
        raise _bad(f"MIG_DATA_WRITE says {m.size} bytes but carries {len(p) - 8}")
    return ev.MigDataWrite(msg_id, bytes(p[8:]), m.argsz, nr)


def _dec_dma_read(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.DmaRead:
    _no_fds(Command.DMA_READ, fds)
    _exact(Command.DMA_READ, p, 16)
    m = _parse("DmaAccess", p)
    _check_count(Command.DMA_READ, m.count, lim)
    return ev.DmaRead(msg_id, m.address, m.count, nr)


def _dec_dma_write(
    msg_id: int, p: memoryview, fds: Sequence[int], nr: bool, lim: Limits
) -> ev.DmaWrite:
    _no_fds(Command.DMA_WRITE, fds)
    _at_least(Command.DMA_WRITE, p, 16)
    m = _parse("DmaAccess", p)
    _check_count(Command.DMA_WRITE, m.count, lim)
    if len(p) != 16 + m.count:
        raise _bad(f"DMA_WRITE says {m.count} bytes but carries {len(p) - 16}")
    return ev.DmaWrite(msg_id, m.address, bytes(p[16:]), nr)


REQUEST_DECODERS: Final[dict[int, RequestDecoder]] = {
    Command.VERSION: _dec_version,
    Command.DMA_MAP: _dec_dma_map,
    Command.DMA_UNMAP: _dec_dma_unmap,
    Command.DEVICE_GET_INFO: _dec_get_info,
    Command.DEVICE_GET_REGION_INFO: _dec_region_info,
    Command.DEVICE_GET_REGION_IO_FDS: _dec_io_fds,
    Command.DEVICE_GET_IRQ_INFO: _dec_irq_info,
    Command.DEVICE_SET_IRQS: _dec_set_irqs,
    Command.REGION_READ: _dec_region_read,
    Command.REGION_WRITE: _dec_region_write,
    Command.DEVICE_RESET: _dec_reset,
    Command.REGION_WRITE_MULTI: _dec_write_multi,
    Command.DEVICE_FEATURE: _dec_feature,
    Command.MIG_DATA_READ: _dec_mig_read,
    Command.MIG_DATA_WRITE: _dec_mig_write,
    Command.DMA_READ: _dec_dma_read,
    Command.DMA_WRITE: _dec_dma_write,
}

# How many fds each request may carry at most (the per-connection max_msg_fds caps it further).
REQUEST_MAX_FDS: Final[dict[int, int]] = {
    Command.DMA_MAP: 1,
    Command.DEVICE_SET_IRQS: 1 << 16,
}

# ========================================================================= replies: decoding

ReplyDecoder = Callable[[int, memoryview, Sequence[int]], Any]


def _reply_exact(command: Command, payload: memoryview, size: int) -> None:
    if len(payload) != size:
        raise _bad(f"{command.name} reply is {len(payload)} bytes, must be {size}")


def _rdec_version(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.VersionReply:
    _no_fds(Command.VERSION, fds)
    _at_least(Command.VERSION, p, 4)
    major, minor = struct.unpack_from("<HH", p)
    caps, keys = parse_capabilities(bytes(p[4:]))
    return ev.VersionReply(msg_id, major, minor, caps, keys)


def _rdec_ack(command: Command) -> ReplyDecoder:
    def decode(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.Ack:
        _no_fds(command, fds)
        _reply_exact(command, p, 0)
        return ev.Ack(msg_id, command)

    return decode


def _rdec_dma_unmap(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.DmaUnmapReply:
    _no_fds(Command.DMA_UNMAP, fds)
    if len(p) == 0:
        # Some servers answer with an empty payload; the request's entry is implied.
        return ev.DmaUnmapReply(msg_id, 0, 0, 0, 0)
    _reply_exact(Command.DMA_UNMAP, p, 24)
    m = _parse("DmaUnmap", p)
    return ev.DmaUnmapReply(msg_id, m.flags, m.address, m.size, m.argsz)


def _rdec_device_info(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.DeviceInfo:
    _no_fds(Command.DEVICE_GET_INFO, fds)
    _reply_exact(Command.DEVICE_GET_INFO, p, 16)
    m = _parse("DeviceInfo", p)
    return ev.DeviceInfo(msg_id, m.flags, m.num_regions, m.num_irqs)


def _decode_caps(p: memoryview, first: int) -> tuple[ev.RegionCap, ...]:
    caps: list[ev.RegionCap] = []
    at = first
    while at:
        if len(caps) == MAX_REGION_CAPS:
            raise _bad(f"region info has more than {MAX_REGION_CAPS} capabilities")
        if at < 32 or at + 8 > len(p):
            raise _bad(f"region capability at {at} lies outside the {len(p)}-byte reply")
        h = _parse("CapHeader", p, at)
        end = h.next if h.next else len(p)
        if h.next and (h.next <= at or h.next > len(p)):
            raise _bad(f"region capability chain goes from {at} to {h.next}")
        body = p[at + 8 : end]
        if h.id == c.REGION_INFO_CAP_SPARSE_MMAP:
            if len(body) < 8:
                raise _bad("sparse mmap capability is truncated")
            nr = _parse("SparseMmapFixed", body).nr_areas
            if nr > MAX_SPARSE_AREAS or 8 + 16 * nr > len(body):
                raise _bad(f"sparse mmap capability claims {nr} areas it does not hold")
            areas = tuple(struct.iter_unpack("<QQ", body[8 : 8 + 16 * nr]))
            caps.append(ev.SparseMmapCap(areas))
        else:
            caps.append(ev.RawRegionCap(h.id, h.version, bytes(body)))
        at = h.next
    return tuple(caps)


def _rdec_region_info(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.RegionInfo:
    _at_least(Command.DEVICE_GET_REGION_INFO, p, 32)
    if len(fds) > 1:
        raise _bad(f"region info reply carries {len(fds)} fds; at most one")
    m = _parse("RegionInfo", p)
    caps: tuple[ev.RegionCap, ...] = ()
    if m.flags & c.REGION_INFO_FLAG_CAPS:
        caps = _decode_caps(p, m.cap_offset)
    elif m.cap_offset:
        raise _bad("region info has cap_offset without the CAPS flag")
    return ev.RegionInfo(
        msg_id, m.index, m.flags, m.size, m.offset, caps, fds[0] if fds else None, m.argsz
    )


def _rdec_io_fds(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.RegionIoFds:
    _at_least(Command.DEVICE_GET_REGION_IO_FDS, p, 16)
    m = _parse("RegionIoFds", p)
    if m.count > MAX_IO_FD_SUBREGIONS or len(p) != 16 + 40 * m.count:
        raise _bad(f"REGION_IO_FDS reply count {m.count} does not match {len(p)} bytes")
    subs = []
    for i in range(m.count):
        s = _parse("IoFdSubregion", p, 16 + 40 * i)
        if s.fd_index >= len(fds):
            raise _bad(f"REGION_IO_FDS sub-region names fd {s.fd_index} of {len(fds)}")
        subs.append(ev.IoFdSubregion(s.offset, s.size, s.fd_index, s.type, s.flags, s.data))
    return ev.RegionIoFds(msg_id, m.index, tuple(subs), tuple(fds), m.argsz)


def _rdec_irq_info(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.IrqInfo:
    _no_fds(Command.DEVICE_GET_IRQ_INFO, fds)
    _reply_exact(Command.DEVICE_GET_IRQ_INFO, p, 16)
    m = _parse("IrqInfo", p)
    return ev.IrqInfo(msg_id, m.index, m.flags, m.count)


def _rdec_region_read(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.RegionReadReply:
    _no_fds(Command.REGION_READ, fds)
    _at_least(Command.REGION_READ, p, 16)
    offset, region, count = REGION_ACCESS.unpack_from(p)
    if len(p) != 16 + count:
        raise _bad(f"REGION_READ reply says {count} bytes but carries {len(p) - 16}")
    return ev.RegionReadReply(msg_id, offset, region, bytes(p[16:]))


def _rdec_region_write(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.RegionWriteReply:
    _no_fds(Command.REGION_WRITE, fds)
    _reply_exact(Command.REGION_WRITE, p, 16)
    offset, region, count = REGION_ACCESS.unpack_from(p)
    return ev.RegionWriteReply(msg_id, offset, region, count)


def _rdec_write_multi(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.RegionWriteMultiReply:
    _no_fds(Command.REGION_WRITE_MULTI, fds)
    _reply_exact(Command.REGION_WRITE_MULTI, p, 8)
    return ev.RegionWriteMultiReply(msg_id, U64.unpack_from(p)[0])


def _rdec_feature(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.DeviceFeatureReply:
    _no_fds(Command.DEVICE_FEATURE, fds)
    _at_least(Command.DEVICE_FEATURE, p, 8)
    m = _parse("DeviceFeatureFixed", p)
    return ev.DeviceFeatureReply(msg_id, m.flags, bytes(p[8:]))


def _rdec_mig_read(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.MigDataReadReply:
    _no_fds(Command.MIG_DATA_READ, fds)
    _at_least(Command.MIG_DATA_READ, p, 8)
    m = _parse("MigData", p)
    if m.size != len(p) - 8:
        raise _bad(f"MIG_DATA_READ reply says {m.size} bytes but carries {len(p) - 8}")
    return ev.MigDataReadReply(msg_id, bytes(p[8:]))


def _rdec_mig_write(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.MigDataWriteReply:
    _no_fds(Command.MIG_DATA_WRITE, fds)
    _reply_exact(Command.MIG_DATA_WRITE, p, 8)
    return ev.MigDataWriteReply(msg_id, _parse("MigData", p).size)


def _rdec_dma_read(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.DmaReadReply:
    _no_fds(Command.DMA_READ, fds)
    _at_least(Command.DMA_READ, p, 16)
    m = _parse("DmaAccess", p)
    if len(p) != 16 + m.count:
        raise _bad(f"DMA_READ reply says {m.count} bytes but carries {len(p) - 16}")
    return ev.DmaReadReply(msg_id, m.address, bytes(p[16:]))


def _rdec_dma_write(msg_id: int, p: memoryview, fds: Sequence[int]) -> ev.DmaWriteReply:
    _no_fds(Command.DMA_WRITE, fds)
    # The specification's reply has a u32 count; QEMU's own struct uses a u64. Take both.
    if len(p) == 16:
        m = _parse("DmaAccess", p)
    else:
        _reply_exact(Command.DMA_WRITE, p, 12)
        m = _parse("DmaWriteReply", p)
    return ev.DmaWriteReply(msg_id, m.address, m.count)


REPLY_DECODERS: Final[dict[int, ReplyDecoder]] = {
    Command.VERSION: _rdec_version,
    Command.DMA_MAP: _rdec_ack(Command.DMA_MAP),
    Command.DMA_UNMAP: _rdec_dma_unmap,
    Command.DEVICE_GET_INFO: _rdec_device_info,
    Command.DEVICE_GET_REGION_INFO: _rdec_region_info,
    Command.DEVICE_GET_REGION_IO_FDS: _rdec_io_fds,
    Command.DEVICE_GET_IRQ_INFO: _rdec_irq_info,
    Command.DEVICE_SET_IRQS: _rdec_ack(Command.DEVICE_SET_IRQS),
    Command.REGION_READ: _rdec_region_read,
    Command.REGION_WRITE: _rdec_region_write,
    Command.DEVICE_RESET: _rdec_ack(Command.DEVICE_RESET),
    Command.REGION_WRITE_MULTI: _rdec_write_multi,
    Command.DEVICE_FEATURE: _rdec_feature,
    Command.MIG_DATA_READ: _rdec_mig_read,
    Command.MIG_DATA_WRITE: _rdec_mig_write,
    Command.DMA_READ: _rdec_dma_read,
    Command.DMA_WRITE: _rdec_dma_write,
}

# ============================================================================== encoding


def header(msg_id: int, command: int, payload_size: int, flags: int, err: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, c.HEADER_SIZE + payload_size, flags, err)


def _flags(kind: int, no_reply: bool) -> int:
    return kind | (c.FLAG_NO_REPLY if no_reply else 0)


def _msg(msg_id: int, command: int, payload: bytes, kind: int, no_reply: bool = False) -> bytes:
    return header(msg_id, command, len(payload), _flags(kind, no_reply)) + payload


def encode_region_info(e: ev.RegionInfo) -> bytes:
    """The reply payload, truncated to the bare info when the client's argsz is too small."""
    chain = bytearray()
    at = 32
    for i, cap in enumerate(e.caps):
        if isinstance(cap, ev.SparseMmapCap):
            body = struct.pack("<II", len(cap.areas), 0) + b"".join(
                struct.pack("<QQ", off, size) for off, size in cap.areas
            )
            cap_id, version = c.REGION_INFO_CAP_SPARSE_MMAP, 1
        else:
            body, cap_id, version = cap.body, cap.id, cap.version
        nxt = at + 8 + len(body) if i + 1 < len(e.caps) else 0
        chain += _build("CapHeader", id=cap_id, version=version, next=nxt) + body
        at += 8 + len(body)
    needed = 32 + len(chain)
    flags = e.flags & ~c.REGION_INFO_FLAG_CAPS
    if chain and e.argsz >= needed:
        flags |= c.REGION_INFO_FLAG_CAPS
        info = _build(
            "RegionInfo",
            argsz=needed,
            flags=flags,
            index=e.index,
            cap_offset=32,
            size=e.size,
            offset=e.offset,
        )
        return info + bytes(chain)
    return _build(
        "RegionInfo",
        argsz=needed,
        flags=flags,
        index=e.index,
        cap_offset=0,
        size=e.size,
        offset=e.offset,
    )


def encode(event: Any) -> tuple[bytes, tuple[int, ...]]:
    """Any event to its wire bytes and the fds that go with them."""
    encoder = ENCODERS.get(type(event))
    if encoder is None:
        raise ProtocolError(f"cannot send {type(event).__name__}: not a vfio-user message")
    return encoder(event)


Encoded = tuple[bytes, tuple[int, ...]]
R, Q = c.TYPE_REPLY, c.TYPE_COMMAND


def _e_region_read_reply(e: ev.RegionReadReply) -> Encoded:
    n = len(e.data)
    return (
        HEADER_AND_ACCESS.pack(e.msg_id, 9, 32 + n, R, 0, e.offset, e.region, n) + e.data,
        (),
    )


def _e_region_write_reply(e: ev.RegionWriteReply) -> Encoded:
    return HEADER_AND_ACCESS.pack(e.msg_id, 10, 32, R, 0, e.offset, e.region, e.count), ()


def _e_region_read(e: ev.RegionRead) -> Encoded:
    return (
        HEADER_AND_ACCESS.pack(
            e.msg_id, 9, 32, _flags(Q, e.no_reply), 0, e.offset, e.region, e.count
        ),
        (),
    )


def _e_region_write(e: ev.RegionWrite) -> Encoded:
    n = len(e.data)
    return (
        HEADER_AND_ACCESS.pack(
            e.msg_id, 10, 32 + n, _flags(Q, e.no_reply), 0, e.offset, e.region, n
        )
        + e.data,
        (),
    )


def _e_version_req(e: ev.VersionRequest) -> Encoded:
    payload = struct.pack("<HH", e.major, e.minor) + encode_capabilities(e.capabilities)
    return _msg(e.msg_id, Command.VERSION, payload, Q, e.no_reply), ()


def _e_version_reply(e: ev.VersionReply) -> Encoded:
    payload = struct.pack("<HH", e.major, e.minor) + encode_capabilities(e.capabilities, e.keys)
    return _msg(e.msg_id, Command.VERSION, payload, R), ()


def _e_dma_map(e: ev.DmaMap) -> Encoded:
    payload = _build(
        "DmaMap", argsz=32, flags=e.flags, offset=e.offset, address=e.address, size=e.size
    )
    fds = () if e.fd is None else (e.fd,)
    return _msg(e.msg_id, Command.DMA_MAP, payload, Q, e.no_reply), fds


def _e_dma_unmap(e: ev.DmaUnmap) -> Encoded:
    payload = _build("DmaUnmap", argsz=e.argsz, flags=e.flags, address=e.address, size=e.size)
    return _msg(e.msg_id, Command.DMA_UNMAP, payload, Q, e.no_reply), ()


def _e_dma_unmap_reply(e: ev.DmaUnmapReply) -> Encoded:
    payload = _build("DmaUnmap", argsz=e.argsz, flags=e.flags, address=e.address, size=e.size)
    return _msg(e.msg_id, Command.DMA_UNMAP, payload, R), ()


def _e_get_info(e: ev.DeviceGetInfo) -> Encoded:
    payload = _build("DeviceInfo", argsz=e.argsz, flags=0, num_regions=0, num_irqs=0)
    return _msg(e.msg_id, Command.DEVICE_GET_INFO, payload, Q, e.no_reply), ()


def _e_device_info(e: ev.DeviceInfo) -> Encoded:
    payload = _build(
        "DeviceInfo", argsz=16, flags=e.flags, num_regions=e.num_regions, num_irqs=e.num_irqs
    )
    return _msg(e.msg_id, Command.DEVICE_GET_INFO, payload, R), ()


def _e_get_region_info(e: ev.DeviceGetRegionInfo) -> Encoded:
    payload = _build(
        "RegionInfo", argsz=e.argsz, flags=0, index=e.index, cap_offset=0, size=0, offset=0
    )
    return _msg(e.msg_id, Command.DEVICE_GET_REGION_INFO, payload, Q, e.no_reply), ()


def _e_region_info(e: ev.RegionInfo) -> Encoded:
    fds = () if e.fd is None else (e.fd,)
    return _msg(e.msg_id, Command.DEVICE_GET_REGION_INFO, encode_region_info(e), R), fds


def _e_get_io_fds(e: ev.DeviceGetRegionIoFds) -> Encoded:
    payload = _build("RegionIoFds", argsz=e.argsz, flags=0, index=e.index, count=0)
    return _msg(e.msg_id, Command.DEVICE_GET_REGION_IO_FDS, payload, Q, e.no_reply), ()


def _e_io_fds(e: ev.RegionIoFds) -> Encoded:
    n = len(e.subregions)
    payload = _build("RegionIoFds", argsz=16 + 40 * n, flags=0, index=e.index, count=n)
    for s in e.subregions:
        payload += _build(
            "IoFdSubregion",
            offset=s.offset,
            size=s.size,
            fd_index=s.fd_index,
            type=s.type,
            flags=s.flags,
            padding=0,
            data=s.data,
        )
    return _msg(e.msg_id, Command.DEVICE_GET_REGION_IO_FDS, payload, R), e.fds


def _e_get_irq_info(e: ev.DeviceGetIrqInfo) -> Encoded:
    payload = _build("IrqInfo", argsz=e.argsz, flags=0, index=e.index, count=0)
    return _msg(e.msg_id, Command.DEVICE_GET_IRQ_INFO, payload, Q, e.no_reply), ()


def _e_irq_info(e: ev.IrqInfo) -> Encoded:
    payload = _build("IrqInfo", argsz=16, flags=e.flags, index=e.index, count=e.count)
    return _msg(e.msg_id, Command.DEVICE_GET_IRQ_INFO, payload, R), ()


def _e_set_irqs(e: ev.DeviceSetIrqs) -> Encoded:
    payload = (
        _build(
            "SetIrqsFixed",
            argsz=20 + len(e.data),
            flags=e.flags,
            index=e.index,
            start=e.start,
            count=e.count,
        )
        + e.data
    )
    return _msg(e.msg_id, Command.DEVICE_SET_IRQS, payload, Q, e.no_reply), e.fds


def _e_ack(e: ev.Ack) -> Encoded:
    return _msg(e.msg_id, e.command, b"", R), ()


def _e_reset(e: ev.DeviceReset) -> Encoded:
    return _msg(e.msg_id, Command.DEVICE_RESET, b"", Q, e.no_reply), ()


def _e_write_multi(e: ev.RegionWriteMulti) -> Encoded:
    parts = [U64.pack(len(e.writes))]
    for w in e.writes:
        parts.append(WRITE_MULTI_ENTRY.pack(w.offset, w.region, len(w.data), w.data))
    return _msg(e.msg_id, Command.REGION_WRITE_MULTI, b"".join(parts), Q, e.no_reply), ()


def _e_write_multi_reply(e: ev.RegionWriteMultiReply) -> Encoded:
    return _msg(e.msg_id, Command.REGION_WRITE_MULTI, U64.pack(e.wr_cnt), R), ()


def _e_feature(e: ev.DeviceFeature) -> Encoded:
    payload = _build("DeviceFeatureFixed", argsz=e.argsz, flags=e.flags) + e.data
    return _msg(e.msg_id, Command.DEVICE_FEATURE, payload, Q, e.no_reply), ()


def _e_feature_reply(e: ev.DeviceFeatureReply) -> Encoded:
    payload = _build("DeviceFeatureFixed", argsz=8 + len(e.data), flags=e.flags) + e.data
    return _msg(e.msg_id, Command.DEVICE_FEATURE, payload, R), ()


def _e_mig_read(e: ev.MigDataRead) -> Encoded:
    payload = _build("MigData", argsz=e.argsz, size=e.size)
    return _msg(e.msg_id, Command.MIG_DATA_READ, payload, Q, e.no_reply), ()


def _e_mig_read_reply(e: ev.MigDataReadReply) -> Encoded:
    payload = _build("MigData", argsz=8 + len(e.data), size=len(e.data)) + e.data
    return _msg(e.msg_id, Command.MIG_DATA_READ, payload, R), ()


def _e_mig_write(e: ev.MigDataWrite) -> Encoded:
    payload = _build("MigData", argsz=e.argsz, size=len(e.data)) + e.data
    return _msg(e.msg_id, Command.MIG_DATA_WRITE, payload, Q, e.no_reply), ()


def _e_mig_write_reply(e: ev.MigDataWriteReply) -> Encoded:
    return _msg(e.msg_id, Command.MIG_DATA_WRITE, _build("MigData", argsz=8, size=e.size), R), ()


def _e_dma_read(e: ev.DmaRead) -> Encoded:
    payload = _build("DmaAccess", address=e.address, count=e.count)
    return _msg(e.msg_id, Command.DMA_READ, payload, Q, e.no_reply), ()


def _e_dma_read_reply(e: ev.DmaReadReply) -> Encoded:
    payload = _build("DmaAccess", address=e.address, count=len(e.data)) + e.data
    return _msg(e.msg_id, Command.DMA_READ, payload, R), ()


def _e_dma_write(e: ev.DmaWrite) -> Encoded:
    payload = _build("DmaAccess", address=e.address, count=len(e.data)) + e.data
    return _msg(e.msg_id, Command.DMA_WRITE, payload, Q, e.no_reply), ()


def _e_dma_write_reply(e: ev.DmaWriteReply) -> Encoded:
    payload = _build("DmaWriteReply", address=e.address, count=e.count)
    return _msg(e.msg_id, Command.DMA_WRITE, payload, R), ()


def _e_error(e: ErrorReplyType) -> Encoded:
    return header(e.msg_id, e.command, 0, c.TYPE_REPLY | c.FLAG_ERROR, e.errno), ()


ErrorReplyType = ev.ErrorReply

ENCODERS: Final[dict[type, Callable[[Any], Encoded]]] = {
    ev.RegionReadReply: _e_region_read_reply,
    ev.RegionWriteReply: _e_region_write_reply,
    ev.RegionRead: _e_region_read,
    ev.RegionWrite: _e_region_write,
    ev.VersionRequest: _e_version_req,
    ev.VersionReply: _e_version_reply,
    ev.DmaMap: _e_dma_map,
    ev.DmaUnmap: _e_dma_unmap,
    ev.DmaUnmapReply: _e_dma_unmap_reply,
    ev.DeviceGetInfo: _e_get_info,
    ev.DeviceInfo: _e_device_info,
    ev.DeviceGetRegionInfo: _e_get_region_info,
    ev.RegionInfo: _e_region_info,
    ev.DeviceGetRegionIoFds: _e_get_io_fds,
    ev.RegionIoFds: _e_io_fds,
    ev.DeviceGetIrqInfo: _e_get_irq_info,
    ev.IrqInfo: _e_irq_info,
    ev.DeviceSetIrqs: _e_set_irqs,
    ev.Ack: _e_ack,
    ev.DeviceReset: _e_reset,
    ev.RegionWriteMulti: _e_write_multi,
    ev.RegionWriteMultiReply: _e_write_multi_reply,
    ev.DeviceFeature: _e_feature,
    ev.DeviceFeatureReply: _e_feature_reply,
    ev.MigDataRead: _e_mig_read,
    ev.MigDataReadReply: _e_mig_read_reply,
    ev.MigDataWrite: _e_mig_write,
    ev.MigDataWriteReply: _e_mig_write_reply,
    ev.DmaRead: _e_dma_read,
    ev.DmaReadReply: _e_dma_read_reply,
    ev.DmaWrite: _e_dma_write,
    ev.DmaWriteReply: _e_dma_write_reply,
    ev.ErrorReply: _e_error,
}
