"""Xen's ioreq layouts (public/hvm/ioreq.h), declared once with construct.

These declarations are the readable source of truth; `ioreq` decodes the hot slots through
precompiled `struct.Struct`s that a hypothesis test proves equivalent, and a compiled C
program proves both equal to what GCC makes of Debian's libxen-dev headers on x86-64.

Bitfields: GCC on x86-64 allocates them from the least significant bit of their storage unit
upwards, and construct's `BitStruct` reads the most significant bit first, so each bitfield
group is declared high bits first. For `buf_ioreq` the 20-bit `addr` shares the first 32-bit
word with `type` and the flag byte, so that word is declared as one little-endian unit
(`ByteSwapped` over a 4-byte `BitStruct`).
"""

from __future__ import annotations

from typing import Any, Final

from construct import (
    Array,
    BitsInteger,
    BitStruct,
    ByteSwapped,
    Flag,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Struct,
)

IoreqFlags: Final[Any] = BitStruct(
    "pad1" / BitsInteger(1),
    "df" / Flag,
    "dir" / BitsInteger(1),
    "data_is_ptr" / Flag,
    "state" / BitsInteger(4),
)
"""The byte at offset 30 of `ioreq_t`: state:4, data_is_ptr:1, dir:1, df:1, _pad1:1."""

Ioreq: Final[Any] = Struct(
    "addr" / Int64ul,
    "data" / Int64ul,
    "count" / Int32ul,
    "size" / Int32ul,
    "vp_eport" / Int32ul,
    "pad0" / Int16ul,
    "flags" / IoreqFlags,
    "type" / Int8ul,
)
"""`ioreq_t`: one slot of the synchronous page, 32 bytes."""

BufIoreqHead: Final[Any] = ByteSwapped(
    BitStruct(
        "addr" / BitsInteger(20),
        "size" / BitsInteger(2),
        "dir" / BitsInteger(1),
        "pad" / BitsInteger(1),
        "type" / BitsInteger(8),
    )
)
"""The first word of `buf_ioreq_t`: type (byte 0), pad:1, dir:1, size:2, then addr:20."""

BufIoreq: Final[Any] = Struct("head" / BufIoreqHead, "data" / Int32ul)
"""`buf_ioreq_t`: one slot of the buffered ring, 8 bytes."""

BufferedIopage: Final[Any] = Struct(
    "read_pointer" / Int32ul,
    "write_pointer" / Int32ul,
    "buf_ioreq" / Array(511, BufIoreq),
)
"""`buffered_iopage_t` as the tools see it (without `__XEN__`'s union): exactly one page."""

Pointers: Final[Any] = Struct("read_pointer" / Int32ul, "write_pointer" / Int32ul)
"""The head of the buffered page alone (what a consumer reads on every drain)."""

SIZES: Final[dict[str, int]] = {
    "Ioreq": Ioreq.sizeof(),
    "BufIoreq": BufIoreq.sizeof(),
    "BufferedIopage": BufferedIopage.sizeof(),
    "Pointers": Pointers.sizeof(),
}
