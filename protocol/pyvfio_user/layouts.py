"""Every vfio-user payload layout, declared once with construct.

These declarations are the single source of truth for field names, order and widths:
`compile_layout` turns each into a precompiled `struct.Struct` plus its field names, kept in
`compiled` (tests hold that module to these declarations), so nothing parses with construct at
run time and the codec does not even import it and the hot messages (REGION_READ/WRITE and
their replies) cost one `unpack_from` / `pack`. Offsets count from the end of the 16-byte
header, as in the specification. A trailing `GreedyBytes` field marks a free tail.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from construct import Bytes, FormatField, GreedyBytes, Int16ul, Int32ul, Int64ul, Renamed, Struct

from pyvfio_user.compiled import Compiled

u16, u32, u64 = Int16ul, Int32ul, Int64ul

Header: Final[Any] = Struct(
    "msg_id" / u16, "command" / u16, "size" / u32, "flags" / u32, "error" / u32
)
VersionFixed: Final[Any] = Struct("major" / u16, "minor" / u16, "data" / GreedyBytes)
DmaMap: Final[Any] = Struct(
    "argsz" / u32, "flags" / u32, "offset" / u64, "address" / u64, "size" / u64
)
DmaUnmap: Final[Any] = Struct("argsz" / u32, "flags" / u32, "address" / u64, "size" / u64)
DeviceInfo: Final[Any] = Struct("argsz" / u32, "flags" / u32, "num_regions" / u32, "num_irqs" / u32)
# cap_offset: where the capability chain starts, counted from the start of this payload.
RegionInfo: Final[Any] = Struct(
    "argsz" / u32, "flags" / u32, "index" / u32, "cap_offset" / u32, "size" / u64, "offset" / u64
)
CapHeader: Final[Any] = Struct("id" / u16, "version" / u16, "next" / u32)
SparseMmapFixed: Final[Any] = Struct("nr_areas" / u32, "reserved" / u32)
SparseMmapArea: Final[Any] = Struct("offset" / u64, "size" / u64)
RegionIoFds: Final[Any] = Struct("argsz" / u32, "flags" / u32, "index" / u32, "count" / u32)
# Both sub-region kinds share one 40-byte shape; the last field is datamatch or user_data.
IoFdSubregion: Final[Any] = Struct(
    "offset" / u64,
    "size" / u64,
    "fd_index" / u32,
    "type" / u32,
    "flags" / u32,
    "padding" / u32,
    "data" / u64,
)
IrqInfo: Final[Any] = Struct("argsz" / u32, "flags" / u32, "index" / u32, "count" / u32)
SetIrqsFixed: Final[Any] = Struct(
    "argsz" / u32, "flags" / u32, "index" / u32, "start" / u32, "count" / u32
)
RegionAccess: Final[Any] = Struct("offset" / u64, "region" / u32, "count" / u32)
DmaAccess: Final[Any] = Struct("address" / u64, "count" / u64)
# QEMU's DMA_WRITE reply differs (a u64 count, as in DmaAccess); this is the specification's.
DmaWriteReply: Final[Any] = Struct("address" / u64, "count" / u32)
WriteMultiCount: Final[Any] = Struct("wr_cnt" / u64)
WriteMultiEntry: Final[Any] = Struct(
    "offset" / u64, "region" / u32, "count" / u32, "data" / Bytes(8)
)
DeviceFeatureFixed: Final[Any] = Struct("argsz" / u32, "flags" / u32)
MigData: Final[Any] = Struct("argsz" / u32, "size" / u32)
NoPayload: Final[Any] = Struct()


def compile_layout(layout: Any) -> Compiled:
    """The `struct.Struct` equivalent of a declaration made of fixed-width fields.

    Only what this module uses is understood (little-endian integers, fixed `Bytes`, one
    trailing `GreedyBytes`); anything else is a mistake in a declaration and fails at import.
    """
    fmt, names, tail = "<", [], False
    for sub in layout.subcons:
        if tail or not isinstance(sub, Renamed):
            raise TypeError(f"{sub!r}: only named fields, and a tail only at the end")
        inner = sub.subcon
        if isinstance(inner, FormatField) and inner.fmtstr[0] == "<":
            fmt += inner.fmtstr[1:]
        elif isinstance(inner, Bytes) and isinstance(inner.length, int):
            fmt += f"{inner.length}s"
        elif inner is GreedyBytes:
            tail = True
            continue
        else:
            raise TypeError(f"field {sub.name!r} has no fixed-width struct equivalent")
        names.append(str(sub.name))
    return Compiled(struct.Struct(fmt), tuple(names), tail)


# Every fixed-size, non-empty declaration by name (the tests hold these to the specification).
SIZES: Final[dict[str, int]] = {
    name: value.sizeof()
    for name, value in list(globals().items())
    if isinstance(value, Struct) and not compile_layout(value).tail and value.subcons
}
