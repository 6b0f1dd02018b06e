"""Every vfio-user payload layout, declared once with construct.

These declarations are the readable source of truth: the codecs parse and build the cold
messages through their compiled form, and the hot messages (REGION_READ/WRITE and replies)
through hand-made `struct.Struct`s that a test proves identical to the declarations here.
Offsets count from the end of the 16-byte header, as in the specification.
"""

from __future__ import annotations

from typing import Any, Final

from construct import Bytes, GreedyBytes, Int16ul, Int32ul, Int64ul, Struct

Header: Final[Any] = Struct(
    "msg_id" / Int16ul,
    "command" / Int16ul,
    "size" / Int32ul,
    "flags" / Int32ul,
    "error" / Int32ul,
)

VersionFixed: Final[Any] = Struct("major" / Int16ul, "minor" / Int16ul, "data" / GreedyBytes)

DmaMap: Final[Any] = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "offset" / Int64ul,
    "address" / Int64ul,
    "size" / Int64ul,
)

DmaUnmap: Final[Any] = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "address" / Int64ul,
    "size" / Int64ul,
)

DeviceInfo: Final[Any] = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "num_regions" / Int32ul,
    "num_irqs" / Int32ul,
)

RegionInfo: Final[Any] = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "cap_offset" / Int32ul,
    "size" / Int64ul,
    "offset" / Int64ul,
)

CapHeader: Final[Any] = Struct("id" / Int16ul, "version" / Int16ul, "next" / Int32ul)

SparseMmapFixed: Final[Any] = Struct("nr_areas" / Int32ul, "reserved" / Int32ul)

SparseMmapArea: Final[Any] = Struct("offset" / Int64ul, "size" / Int64ul)

RegionIoFds: Final[Any] = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "count" / Int32ul,
)

# Both sub-region kinds share one 40-byte shape; the last field is datamatch or user_data.
IoFdSubregion: Final[Any] = Struct(
    "offset" / Int64ul,
    "size" / Int64ul,
    "fd_index" / Int32ul,
    "type" / Int32ul,
    "flags" / Int32ul,
    "padding" / Int32ul,
    "data" / Int64ul,
)

IrqInfo: Final[Any] = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "count" / Int32ul,
)

SetIrqsFixed: Final[Any] = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "start" / Int32ul,
    "count" / Int32ul,
)

RegionAccess: Final[Any] = Struct("offset" / Int64ul, "region" / Int32ul, "count" / Int32ul)

DmaAccess: Final[Any] = Struct("address" / Int64ul, "count" / Int64ul)

# QEMU's DMA_WRITE reply differs; this is the specification's (u32 count).
DmaWriteReply: Final[Any] = Struct("address" / Int64ul, "count" / Int32ul)

WriteMultiCount: Final[Any] = Struct("wr_cnt" / Int64ul)

WriteMultiEntry: Final[Any] = Struct(
    "offset" / Int64ul,
    "region" / Int32ul,
    "count" / Int32ul,
    "data" / Bytes(8),
)

DeviceFeatureFixed: Final[Any] = Struct("argsz" / Int32ul, "flags" / Int32ul)

MigData: Final[Any] = Struct("argsz" / Int32ul, "size" / Int32ul)

SIZES: Final[dict[str, int]] = {
    name: layout.sizeof()
    for name, layout in {
        "Header": Header,
        "DmaMap": DmaMap,
        "DmaUnmap": DmaUnmap,
        "DeviceInfo": DeviceInfo,
        "RegionInfo": RegionInfo,
        "CapHeader": CapHeader,
        "SparseMmapFixed": SparseMmapFixed,
        "SparseMmapArea": SparseMmapArea,
        "RegionIoFds": RegionIoFds,
        "IoFdSubregion": IoFdSubregion,
        "IrqInfo": IrqInfo,
        "SetIrqsFixed": SetIrqsFixed,
        "RegionAccess": RegionAccess,
        "DmaAccess": DmaAccess,
        "DmaWriteReply": DmaWriteReply,
        "WriteMultiCount": WriteMultiCount,
        "WriteMultiEntry": WriteMultiEntry,
        "DeviceFeatureFixed": DeviceFeatureFixed,
        "MigData": MigData,
    }.items()
}
