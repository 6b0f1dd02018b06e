"""Xen's public ioreq ABI (public/hvm/ioreq.h, hvm/dm_op.h, memory.h), sans-IO.

An ioreq server shares two kinds of page with Xen: the synchronous page, one 32-byte `ioreq_t`
slot per vCPU, where a trapped access waits for its answer while the vCPU is blocked, and the
buffered page, a ring of posted writes nobody waits for. This module reads and writes both over
a caller-supplied writable buffer (a memoryview of the mapping in production, a bytearray in
the simulator), so the same code is exercised in tests and on Xen.

Every value here is checked against Debian's libxen-dev 4.17 headers by compiling C
(tests/xen/test_abi_headers.py): the header, not this file, is the authority.

Malformed input raises `XenAbiError`. It is non-fatal for one bad synchronous request (the
slot can still be completed, as a bus error would be, and the other slots served) and fatal
for a corrupt buffered ring (nothing in it can be trusted any more).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from pyvfio_user.errors import ProtocolError


class XenAbiError(ProtocolError):
    """Bytes in a shared ioreq page (or values for one) that break Xen's ioreq ABI."""


# ------------------------------------------------------------------------------ constants

PAGE_SIZE: Final = 4096
IOREQ_SIZE: Final = 32
"""sizeof(ioreq_t): one synchronous slot."""
SLOTS_PER_PAGE: Final = PAGE_SIZE // IOREQ_SIZE
IOREQ_READ: Final = 1
IOREQ_WRITE: Final = 0

BUF_IOREQ_SLOTS: Final = 511
"""IOREQ_BUFFER_SLOT_NUM: 511 8-byte slots after the two 4-byte pointers fill the page."""
BUF_IOREQ_SIZE: Final = 8

XENMEM_RESOURCE_IOREQ_SERVER: Final = 0
"""The resource type under which xenforeignmemory_map_resource maps a server's pages."""
FRAME_BUFIOREQ: Final = 0
"""XENMEM_resource_ioreq_server_frame_bufioreq: frame 0 of the resource is the buffered page."""


def frame_ioreq(n: int) -> int:
    """XENMEM_resource_ioreq_server_frame_ioreq(n): the n-th synchronous page's frame."""
    if n < 0:
        raise XenAbiError(f"synchronous ioreq page number {n} is negative")
    return 1 + n


class IoreqState(IntEnum):
    """The `state` bitfield of a synchronous slot (STATE_IOREQ_* / STATE_IORESP_*)."""

    NONE = 0
    READY = 1
    INPROCESS = 2
    RESP_READY = 3


class IoreqType(IntEnum):
    """IOREQ_TYPE_*: what the request is (values 3-6 are unused by Xen)."""

    PIO = 0
    COPY = 1
    PCI_CONFIG = 2
    TIMEOFFSET = 7
    INVALIDATE = 8


class BufioreqMode(IntEnum):
    """HVM_IOREQSRV_BUFIOREQ_*: whether a new server gets a buffered page, and its protocol.

    In ATOMIC mode Xen rewrites both ring pointers with a 64-bit compare-and-swap to keep them
    small, so the consumer must advance read_pointer with an atomic add. Python has no atomic
    store to shared memory; `BufferedRing` therefore needs LEGACY mode, in which Xen only ever
    writes write_pointer and an aligned 32-bit store of read_pointer is safe.
    """

    OFF = 0
    LEGACY = 1
    ATOMIC = 2


class IoRangeType(IntEnum):
    """XEN_DMOP_IO_RANGE_*: the kinds of range an ioreq server claims."""

    PORT = 0
    MEMORY = 1
    PCI = 2


# Plain ints on the hot path: comparing against IntEnum members costs a lookup each time.
_READY: Final = int(IoreqState.READY)
_RESP_READY: Final = int(IoreqState.RESP_READY)
_KNOWN_TYPES: Final = frozenset(int(t) for t in IoreqType)
_ACCESS_TYPES: Final = frozenset(
    int(t) for t in (IoreqType.PIO, IoreqType.COPY, IoreqType.PCI_CONFIG)
)
_POSTED_TYPES: Final = frozenset((IoreqType.PIO, IoreqType.COPY, IoreqType.TIMEOFFSET))
_VALUE_SIZES: Final = frozenset((1, 2, 4, 8))
_U64_MAX: Final = (1 << 64) - 1
_U32_MAX: Final = (1 << 32) - 1

# Byte offsets inside a slot and the buffered page, for single-field reads and writes.
DATA_OFFSET: Final = 8
FLAGS_OFFSET: Final = 30
"""The byte holding state:4, data_is_ptr:1, dir:1, df:1, _pad1:1 (GCC: low bits first)."""
TYPE_OFFSET: Final = 31
READ_POINTER_OFFSET: Final = 0
WRITE_POINTER_OFFSET: Final = 4
BUF_IOREQ_OFFSET: Final = 8

# Hot paths. tests/xen/test_abi_hypothesis.py checks each against layouts.py.
IOREQ: Final = struct.Struct("<QQIIIHBB")
"""addr, data, count, size, vp_eport, _pad0, flag byte, type."""
BUF_IOREQ: Final = struct.Struct("<II")
"""first word (type | pad << 8 | dir << 9 | size << 10 | addr << 12), data."""
POINTERS: Final = struct.Struct("<II")
"""read_pointer, write_pointer."""
_U8: Final = struct.Struct("<B")
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")


# ------------------------------------------------------------------------- synchronous slots


@dataclass(frozen=True, slots=True)
class IoReq:
    """One `ioreq_t`, padding left out (it is written as zero).

    `data` is the value for a write (or where a read's answer goes) unless `data_is_ptr`, in
    which case it is the guest physical address of a buffer of `count` elements of `size`
    bytes; `df` then says the elements go downwards from `addr`.
    """

    addr: int
    data: int
    count: int
    size: int
    vp_eport: int
    state: int
    data_is_ptr: bool
    dir: int
    df: bool
    type: int

    @property
    def is_read(self) -> bool:
        return self.dir == IOREQ_READ


def decode_ioreq(buf: bytes | bytearray | memoryview, offset: int = 0) -> IoReq:
    """The slot at `offset`, as it is: `validate_ioreq` says whether it is servable."""
    try:
        addr, data, count, size, port, _pad0, flags, type_ = IOREQ.unpack_from(buf, offset)
    except struct.error:
        raise XenAbiError(
            f"an ioreq_t needs {IOREQ_SIZE} bytes at offset {offset}, the buffer has {len(buf)}"
        ) from None
    return IoReq(
        addr,
        data,
        count,
        size,
        port,
        flags & 0x0F,
        bool(flags & 0x10),
        (flags >> 5) & 1,
        bool(flags & 0x40),
        type_,
    )


def _check(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise XenAbiError(f"{name}={value} does not fit the {bits}-bit field")


def _flags_byte(state: int, data_is_ptr: bool, dir_: int, df: bool) -> int:
    return state | (data_is_ptr << 4) | (dir_ << 5) | (df << 6)


def encode_ioreq(req: IoReq) -> bytes:
    """The 32 bytes of `req` as Xen lays them out (padding zero)."""
    _check("addr", req.addr, 64)
    _check("data", req.data, 64)
    _check("count", req.count, 32)
    _check("size", req.size, 32)
    _check("vp_eport", req.vp_eport, 32)
    _check("state", req.state, 4)
    _check("dir", req.dir, 1)
    _check("type", req.type, 8)
    flags = _flags_byte(req.state, req.data_is_ptr, req.dir, req.df)
    return IOREQ.pack(req.addr, req.data, req.count, req.size, req.vp_eport, 0, flags, req.type)


def validate_ioreq(req: IoReq) -> None:
    """Raise a non-fatal XenAbiError unless `req` is a request a device model can serve.

    Only what Xen itself guarantees is required: a READY slot, a known type and, for accesses
    (PIO, COPY, PCI_CONFIG), at least one element of a size a register can hold (or, through a
    pointer, of at most a page). INVALIDATE and TIMEOFFSET carry no access to check (Xen
    broadcasts INVALIDATE with count 0).
    """
    if req.state != _READY:
        raise XenAbiError(
            f"slot state is {_state_name(req.state)}, a request must be READY", fatal=False
        )
    if req.type not in _KNOWN_TYPES:
        raise XenAbiError(f"unknown ioreq type {req.type}", fatal=False)
    if req.type not in _ACCESS_TYPES:
        return
    if req.count == 0:
        raise XenAbiError(f"{IoreqType(req.type).name} request with count 0", fatal=False)
    if req.data_is_ptr:
        if not 1 <= req.size <= PAGE_SIZE:
            raise XenAbiError(
                f"{IoreqType(req.type).name} request through a pointer with element size "
                f"{req.size}",
                fatal=False,
            )
    elif req.size not in _VALUE_SIZES:
        raise XenAbiError(
            f"{IoreqType(req.type).name} request of size {req.size}, not 1, 2, 4 or 8",
            fatal=False,
        )


def _state_name(state: int) -> str:
    try:
        return IoreqState(state).name
    except ValueError:
        return str(state)


def slot_offset(vcpu: int) -> int:
    """Where vCPU `vcpu`'s slot starts in the (contiguously mapped) synchronous pages."""
    if vcpu < 0:
        raise XenAbiError(f"vCPU {vcpu} is negative")
    return vcpu * IOREQ_SIZE


def _slot(page: memoryview | bytearray, vcpu: int) -> int:
    offset = slot_offset(vcpu)
    if offset + IOREQ_SIZE > len(page):
        raise XenAbiError(f"vCPU {vcpu}'s slot is beyond the {len(page)}-byte ioreq mapping")
    return offset


def read_slot(page: memoryview | bytearray, vcpu: int) -> IoReq:
    """vCPU `vcpu`'s request. Read it only once `slot_state` has said READY."""
    return decode_ioreq(page, _slot(page, vcpu))


def slot_state(page: memoryview | bytearray, vcpu: int) -> int:
    """The state bitfield alone: what a dispatcher polls before reading the rest."""
    (flags,) = _U8.unpack_from(page, _slot(page, vcpu) + FLAGS_OFFSET)
    return int(flags & 0x0F)


def set_slot_state(page: memoryview | bytearray, vcpu: int, state: int) -> None:
    """Rewrite the state bitfield, keeping data_is_ptr, dir and df (they share its byte)."""
    _check("state", state, 4)
    at = _slot(page, vcpu) + FLAGS_OFFSET
    (flags,) = _U8.unpack_from(page, at)
    _U8.pack_into(page, at, (flags & 0xF0) | state)


def complete_slot(page: memoryview | bytearray, vcpu: int, data: int | None) -> None:
    """Answer vCPU `vcpu`'s request: `data` (a read's value, None for a write), then RESP_READY.

    The order is the protocol. The instant Xen sees IORESP_READY it copies `data` into the
    vCPU and may reuse the slot for that vCPU's next access, so the answer must be in place
    before the state says so: writing the state first would let the guest read whatever the
    slot held before. On x86-64 stores become visible in program order (TSO), and each write
    here is one store in that order, so no explicit barrier is needed; the caller notifies the
    event channel only after this returns.
    """
    at = _slot(page, vcpu)
    if data is not None:
        _check("data", data, 64)
        _U64.pack_into(page, at + DATA_OFFSET, data)
    (flags,) = _U8.unpack_from(page, at + FLAGS_OFFSET)
    _U8.pack_into(page, at + FLAGS_OFFSET, (flags & 0xF0) | _RESP_READY)


FLAG_STATE: Final = 0x0F
"""The flag byte's state bits (FLAGS_OFFSET; `IOREQ`'s seventh field)."""
FLAG_DATA_IS_PTR: Final = 0x10
FLAG_DIR_READ: Final = 0x20
"""dir = IOREQ_READ."""


def answer_slot(page: memoryview | bytearray, at: int, flags: int, data: int | None) -> None:
    """`complete_slot` for a dispatcher that already read the slot at byte offset `at` with
    `IOREQ` (so the offset is known to be inside the page) and holds its flag byte `flags`,
    which Xen leaves alone while a request is in process. Same order: data, then the state.
    `data` must fit 64 bits (a value read from a register of at most 8 bytes does)."""
    if data is not None:
        _U64.pack_into(page, at + DATA_OFFSET, data)
    _U8.pack_into(page, at + FLAGS_OFFSET, (flags & 0xF0) | _RESP_READY)


def write_slot(page: memoryview | bytearray, vcpu: int, req: IoReq) -> None:
    """Fill a slot as Xen does (simulators): everything, then the state byte last."""
    at = _slot(page, vcpu)
    raw = encode_ioreq(req)
    page[at : at + FLAGS_OFFSET] = raw[:FLAGS_OFFSET]
    page[at + TYPE_OFFSET] = raw[TYPE_OFFSET]
    page[at + FLAGS_OFFSET] = raw[FLAGS_OFFSET]


# ------------------------------------------------------------------------- the buffered ring


@dataclass(frozen=True, slots=True)
class BufIoReq:
    """One `buf_ioreq_t`. `size` is in bytes (the 2-bit field holds its log2); `addr` is only
    the low 20 bits of the address (Xen posts writes only below 1 MiB: VGA and the RTC)."""

    type: int
    dir: int
    size: int
    addr: int
    data: int


_SIZE_CODES: Final = {1: 0, 2: 1, 4: 2, 8: 3}


def decode_buf_ioreq(buf: bytes | bytearray | memoryview, offset: int = 0) -> BufIoReq:
    try:
        head, data = BUF_IOREQ.unpack_from(buf, offset)
    except struct.error:
        raise XenAbiError(
            f"a buf_ioreq_t needs {BUF_IOREQ_SIZE} bytes at offset {offset}, "
            f"the buffer has {len(buf)}"
        ) from None
    return BufIoReq(head & 0xFF, (head >> 9) & 1, 1 << ((head >> 10) & 3), head >> 12, data)


def encode_buf_ioreq(req: BufIoReq) -> bytes:
    _check("type", req.type, 8)
    _check("dir", req.dir, 1)
    _check("addr", req.addr, 20)
    _check("data", req.data, 32)
    code = _SIZE_CODES.get(req.size)
    if code is None:
        raise XenAbiError(f"a buffered request of size {req.size}, not 1, 2, 4 or 8")
    return BUF_IOREQ.pack(req.type | (req.dir << 9) | (code << 10) | (req.addr << 12), req.data)


@dataclass(frozen=True, slots=True)
class BufferedWrite:
    """A posted write taken off the ring, an 8-byte one already joined from its two slots."""

    addr: int
    size: int
    data: int
    type: int = IoreqType.COPY


def ring_pointers(page: memoryview | bytearray) -> tuple[int, int]:
    """(read_pointer, write_pointer) of a buffered page."""
    if len(page) < PAGE_SIZE:
        raise XenAbiError(f"a buffered ioreq page is {PAGE_SIZE} bytes, not {len(page)}")
    rd, wr = POINTERS.unpack_from(page, READ_POINTER_OFFSET)
    return int(rd), int(wr)


def _where(pointer: int) -> str:
    """A ring entry named for an error (formatted only then: a drain is on the hot path)."""
    return f"buffered slot {(pointer & _U32_MAX) % BUF_IOREQ_SLOTS}"


def _ring_entry(page: memoryview | bytearray, pointer: int) -> tuple[int, int]:
    head, data = BUF_IOREQ.unpack_from(
        page, BUF_IOREQ_OFFSET + ((pointer & _U32_MAX) % BUF_IOREQ_SLOTS) * BUF_IOREQ_SIZE
    )
    return int(head), int(data)


class BufferedRing:
    """The consumer side of the buffered page (LEGACY mode, see `BufioreqMode`).

    Pointers are free-running 32-bit counters; slot = pointer % 511 on both sides, so the jump
    at 2**32 (not a multiple of 511) is harmless as long as both agree, and "how many entries"
    is the difference modulo 2**32. Xen fills entries before it advances write_pointer, and a
    drain reads write_pointer before the entries (x86-64 does not reorder loads), so every
    entry below the snapshot is complete.
    """

    def __init__(self) -> None:
        self.consumed = 0
        """Slots consumed so far (an 8-byte write counts two), for metrics."""

    def drain(self, page: memoryview | bytearray) -> list[BufferedWrite]:
        """Every posted write between read_pointer and write_pointer, in order.

        The whole batch is checked before read_pointer moves: a corrupt ring raises a fatal
        XenAbiError and is left as found.
        """
        rd, wr = ring_pointers(page)
        pending = (wr - rd) & _U32_MAX
        if pending == 0:
            return []
        if pending > BUF_IOREQ_SLOTS:
            raise XenAbiError(
                f"corrupt buffered ring: write_pointer {wr} is {pending} slots ahead of "
                f"read_pointer {rd}, the ring has {BUF_IOREQ_SLOTS}"
            )
        writes: list[BufferedWrite] = []
        i = 0
        while i < pending:
            head, data = _ring_entry(page, rd + i)
            type_ = head & 0xFF
            size = 1 << ((head >> 10) & 3)
            if (head >> 9) & 1 != IOREQ_WRITE:
                where = _where(rd + i)
                raise XenAbiError(f"corrupt buffered ring: {where} is a read, nobody can answer")
            if type_ not in _POSTED_TYPES:
                raise XenAbiError(f"corrupt buffered ring: {_where(rd + i)} has ioreq type {type_}")
            if size == 8:
                if i + 1 >= pending:
                    where = _where(rd + i)
                    raise XenAbiError(
                        f"corrupt buffered ring: the 8-byte write in {where} is the last entry,"
                        " its second half (the high 32 bits) is missing"
                    )
                _head2, high = _ring_entry(page, rd + i + 1)
                data |= high << 32
                i += 2
            else:
                i += 1
            writes.append(BufferedWrite(head >> 12, size, data, type_))
        _U32.pack_into(page, READ_POINTER_OFFSET, (rd + pending) & _U32_MAX)
        self.consumed += pending
        return writes


def post_buffered_write(
    page: memoryview | bytearray,
    addr: int,
    size: int,
    data: int,
    *,
    type: int = IoreqType.COPY,
    mode: BufioreqMode = BufioreqMode.LEGACY,
) -> bool:
    """Append a posted write as Xen's producer does (for simulators); False if it does not fit.

    Like Xen: an 8-byte write takes two slots (the second repeats the first with the high half
    of the data), a full ring refuses (Xen then sends the access synchronously instead), the
    entries are written before write_pointer moves, and in ATOMIC mode both pointers are then
    brought below 511 together.
    """
    if size not in _SIZE_CODES:
        raise XenAbiError(f"a buffered write of size {size}, not 1, 2, 4 or 8")
    _check("data", data, 8 * size)
    first = encode_buf_ioreq(BufIoReq(type, IOREQ_WRITE, size, addr, data & _U32_MAX))
    slots = 2 if size == 8 else 1
    rd, wr = ring_pointers(page)
    pending = (wr - rd) & _U32_MAX
    if pending > BUF_IOREQ_SLOTS:
        raise XenAbiError(f"corrupt buffered ring: {pending} slots pending")
    if pending + slots > BUF_IOREQ_SLOTS:
        return False
    at = BUF_IOREQ_OFFSET + (wr % BUF_IOREQ_SLOTS) * BUF_IOREQ_SIZE
    page[at : at + BUF_IOREQ_SIZE] = first
    if slots == 2:
        second = encode_buf_ioreq(BufIoReq(type, IOREQ_WRITE, size, addr, data >> 32))
        at = BUF_IOREQ_OFFSET + (((wr + 1) & _U32_MAX) % BUF_IOREQ_SLOTS) * BUF_IOREQ_SIZE
        page[at : at + BUF_IOREQ_SIZE] = second
    wr = (wr + slots) & _U32_MAX
    _U32.pack_into(page, WRITE_POINTER_OFFSET, wr)
    if mode == BufioreqMode.ATOMIC and rd >= BUF_IOREQ_SLOTS:
        n = rd // BUF_IOREQ_SLOTS
        # 32-bit arithmetic, as in Xen: only the difference matters.
        POINTERS.pack_into(
            page,
            READ_POINTER_OFFSET,
            rd - n * BUF_IOREQ_SLOTS,
            (wr - n * BUF_IOREQ_SLOTS) & _U32_MAX,
        )
    return True


# ------------------------------------------------------------------------------------- PCI


@dataclass(frozen=True, slots=True)
class PciConfigAddress:
    """Where a PCI_CONFIG request goes: the `addr` of the ioreq, split up."""

    segment: int
    bus: int
    device: int
    function: int
    offset: int


PCI_CONFIG_SPACE: Final = 4096


def _check_bdf(segment: int, bus: int, device: int, function: int) -> None:
    _check("segment", segment, 16)
    _check("bus", bus, 8)
    _check("device", device, 5)
    _check("function", function, 3)


def decode_pci_config_addr(addr: int) -> PciConfigAddress:
    """SEGMENT[63:48] BUS[47:40] DEV[39:35] FN[34:32] OFFSET[31:0]; the offset must lie in the
    4 KiB extended configuration space (a non-fatal XenAbiError otherwise)."""
    if not 0 <= addr <= _U64_MAX:
        raise XenAbiError(f"PCI config address {addr:#x} is not a 64-bit value", fatal=False)
    offset = addr & _U32_MAX
    if offset >= PCI_CONFIG_SPACE:
        raise XenAbiError(
            f"PCI config offset {offset:#x} is beyond the 4 KiB config space", fatal=False
        )
    return PciConfigAddress(
        addr >> 48, (addr >> 40) & 0xFF, (addr >> 35) & 0x1F, (addr >> 32) & 0x7, offset
    )


def encode_pci_config_addr(segment: int, bus: int, device: int, function: int, offset: int) -> int:
    _check_bdf(segment, bus, device, function)
    if not 0 <= offset < PCI_CONFIG_SPACE:
        raise XenAbiError(f"PCI config offset {offset} is outside 0..4095")
    return (segment << 48) | (bus << 40) | (device << 35) | (function << 32) | offset


def dm_op_sbdf(segment: int, bus: int, device: int, function: int) -> int:
    """XEN_DMOP_PCI_SBDF: the 32-bit SBDF dm_op takes (range-checked, where the macro masks)."""
    _check_bdf(segment, bus, device, function)
    return (segment << 16) | (bus << 8) | (device << 3) | function
