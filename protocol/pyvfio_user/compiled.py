"""The payload layouts of `layouts`, compiled: one `struct.Struct` and the field names each.

`layouts` declares every vfio-user payload with construct and stays the single source of
truth; the codec works from these compiled forms only, so that a process that speaks
vfio-user never imports construct (about 2 MB of memory and 15 ms of start-up per instance, for
declarations that are read only to build this table). Each entry equals
`layouts.compile_layout(layouts.<name>)`: tests/unit/test_vfio_user_wire.py holds them to
that, so a change to a declaration that is not made here too fails the tests.
"""

from __future__ import annotations

from struct import Struct
from typing import Final, NamedTuple


class Compiled(NamedTuple):
    """A layout's fixed part as one precompiled struct, its field names, and whether a free
    tail (a trailing GreedyBytes) follows it."""

    struct: Struct
    names: tuple[str, ...]
    tail: bool


# fmt: off
Header: Final = Compiled(Struct("<HHLLL"), ("msg_id", "command", "size", "flags", "error"), False)
VersionFixed: Final = Compiled(Struct("<HH"), ("major", "minor"), True)
DmaMap: Final = Compiled(
    Struct("<LLQQQ"), ("argsz", "flags", "offset", "address", "size"), False
)
DmaUnmap: Final = Compiled(Struct("<LLQQ"), ("argsz", "flags", "address", "size"), False)
DeviceInfo: Final = Compiled(
    Struct("<LLLL"), ("argsz", "flags", "num_regions", "num_irqs"), False
)
RegionInfo: Final = Compiled(
    Struct("<LLLLQQ"), ("argsz", "flags", "index", "cap_offset", "size", "offset"), False
)
CapHeader: Final = Compiled(Struct("<HHL"), ("id", "version", "next"), False)
SparseMmapFixed: Final = Compiled(Struct("<LL"), ("nr_areas", "reserved"), False)
SparseMmapArea: Final = Compiled(Struct("<QQ"), ("offset", "size"), False)
RegionIoFds: Final = Compiled(Struct("<LLLL"), ("argsz", "flags", "index", "count"), False)
IoFdSubregion: Final = Compiled(
    Struct("<QQLLLLQ"),
    ("offset", "size", "fd_index", "type", "flags", "padding", "data"),
    False,
)
IrqInfo: Final = Compiled(Struct("<LLLL"), ("argsz", "flags", "index", "count"), False)
SetIrqsFixed: Final = Compiled(
    Struct("<LLLLL"), ("argsz", "flags", "index", "start", "count"), False
)
RegionAccess: Final = Compiled(Struct("<QLL"), ("offset", "region", "count"), False)
DmaAccess: Final = Compiled(Struct("<QQ"), ("address", "count"), False)
DmaWriteReply: Final = Compiled(Struct("<QL"), ("address", "count"), False)
WriteMultiCount: Final = Compiled(Struct("<Q"), ("wr_cnt",), False)
WriteMultiEntry: Final = Compiled(
    Struct("<QLL8s"), ("offset", "region", "count", "data"), False
)
DeviceFeatureFixed: Final = Compiled(Struct("<LL"), ("argsz", "flags"), False)
MigData: Final = Compiled(Struct("<LL"), ("argsz", "size"), False)
NoPayload: Final = Compiled(Struct("<"), (), False)
# fmt: on
