"""devmodel_wire.xen.ioreq on its own: struct hot paths against the construct declarations, round
trips, slot and ring discipline, malformed input. (The C headers are test_abi_headers.py.)"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmodel_wire.xen import ioreq as x
from devmodel_wire.xen import layouts as lay
from pyvfio_user.errors import ProtocolError

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)

ioreqs = st.builds(
    x.IoReq,
    addr=u64,
    data=u64,
    count=u32,
    size=u32,
    vp_eport=u32,
    state=st.integers(0, 15),
    data_is_ptr=st.booleans(),
    dir=st.integers(0, 1),
    df=st.booleans(),
    type=u8,
)


def ready(**fields: int | bool) -> x.IoReq:
    base: dict[str, int | bool] = {
        "addr": 0xFEB0_0000,
        "data": 0,
        "count": 1,
        "size": 4,
        "vp_eport": 7,
        "state": x.IoreqState.READY,
        "data_is_ptr": False,
        "dir": x.IOREQ_READ,
        "df": False,
        "type": x.IoreqType.COPY,
    }
    base.update(fields)
    return x.IoReq(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------ struct vs construct


def test_sizes() -> None:
    assert x.IOREQ.size == lay.SIZES["Ioreq"] == x.IOREQ_SIZE == 32
    assert x.BUF_IOREQ.size == lay.SIZES["BufIoreq"] == x.BUF_IOREQ_SIZE == 8
    assert x.POINTERS.size == lay.SIZES["Pointers"] == x.BUF_IOREQ_OFFSET
    assert lay.SIZES["BufferedIopage"] == x.PAGE_SIZE
    assert x.SLOTS_PER_PAGE == 128


@given(raw=st.binary(min_size=32, max_size=32))
def test_ioreq_struct_decode_agrees_with_construct(raw: bytes) -> None:
    fast = x.decode_ioreq(raw)
    c = lay.Ioreq.parse(raw)
    assert (fast.addr, fast.data, fast.count, fast.size, fast.vp_eport) == (
        c.addr,
        c.data,
        c.count,
        c.size,
        c.vp_eport,
    )
    assert fast.state == c.flags.state
    assert fast.data_is_ptr == c.flags.data_is_ptr
    assert fast.dir == c.flags.dir
    assert fast.df == c.flags.df
    assert fast.type == c.type


@given(req=ioreqs)
def test_ioreq_struct_encode_agrees_with_construct(req: x.IoReq) -> None:
    built = lay.Ioreq.build(
        {
            "addr": req.addr,
            "data": req.data,
            "count": req.count,
            "size": req.size,
            "vp_eport": req.vp_eport,
            "pad0": 0,
            "flags": {
                "pad1": 0,
                "df": req.df,
                "dir": req.dir,
                "data_is_ptr": req.data_is_ptr,
                "state": req.state,
            },
            "type": req.type,
        }
    )
    assert x.encode_ioreq(req) == built
    assert x.decode_ioreq(built) == req


@given(raw=st.binary(min_size=8, max_size=8))
def test_buf_ioreq_struct_agrees_with_construct(raw: bytes) -> None:
    fast = x.decode_buf_ioreq(raw)
    c = lay.BufIoreq.parse(raw)
    assert fast.type == c.head.type
    assert fast.dir == c.head.dir
    assert fast.size == 1 << c.head.size
    assert fast.addr == c.head.addr
    assert fast.data == c.data
    # Re-encoding drops only the pad bit.
    assert x.encode_buf_ioreq(fast) == bytes([raw[0], raw[1] & ~1]) + raw[2:]


@given(
    type_=u8,
    dir_=st.integers(0, 1),
    size=st.sampled_from([1, 2, 4, 8]),
    addr=st.integers(0, 0xFFFFF),
    data=u32,
)
def test_buf_ioreq_round_trip(type_: int, dir_: int, size: int, addr: int, data: int) -> None:
    req = x.BufIoReq(type_, dir_, size, addr, data)
    raw = x.encode_buf_ioreq(req)
    assert x.decode_buf_ioreq(raw) == req
    c = lay.BufIoreq.parse(raw)
    assert (c.head.type, c.head.dir, 1 << c.head.size, c.head.addr, c.data, c.head.pad) == (
        type_,
        dir_,
        size,
        addr,
        data,
        0,
    )


def test_known_bitfield_bytes() -> None:
    # state READY, data_is_ptr, dir read, df: 0b0111_0001; type COPY.
    raw = x.encode_ioreq(ready(data_is_ptr=True, df=True))
    assert raw[30] == 0x71
    assert raw[31] == 1
    assert raw[28:30] == b"\0\0"
    # type COPY, dir write, size 8 (code 3), addr 0xABCDE: 0xABCDE << 12 | 3 << 10 | 1.
    raw = x.encode_buf_ioreq(x.BufIoReq(1, 0, 8, 0xABCDE, 0x1234))
    assert raw == struct.pack("<II", (0xABCDE << 12) | (3 << 10) | 1, 0x1234)


def test_encode_rejects_values_that_do_not_fit() -> None:
    with pytest.raises(x.XenAbiError, match="state=16"):
        x.encode_ioreq(ready(state=16))
    with pytest.raises(x.XenAbiError, match="addr"):
        x.encode_ioreq(ready(addr=1 << 64))
    with pytest.raises(x.XenAbiError, match="addr"):
        x.encode_buf_ioreq(x.BufIoReq(1, 0, 4, 1 << 20, 0))
    with pytest.raises(x.XenAbiError, match="size 3"):
        x.encode_buf_ioreq(x.BufIoReq(1, 0, 3, 0, 0))


def test_short_buffers() -> None:
    with pytest.raises(x.XenAbiError, match="32 bytes"):
        x.decode_ioreq(bytes(31))
    with pytest.raises(x.XenAbiError, match="8 bytes"):
        x.decode_buf_ioreq(bytes(16), 12)
    assert issubclass(x.XenAbiError, ProtocolError)


# ------------------------------------------------------------------ validation


def test_validate_accepts_ordinary_requests() -> None:
    x.validate_ioreq(ready())
    x.validate_ioreq(ready(type=x.IoreqType.PIO, size=1, addr=0xCFC))
    x.validate_ioreq(ready(data_is_ptr=True, size=4, count=1000))
    x.validate_ioreq(ready(type=x.IoreqType.INVALIDATE, count=0, size=4))
    x.validate_ioreq(ready(type=x.IoreqType.TIMEOFFSET, count=0, size=8))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"state": x.IoreqState.NONE}, "state is NONE"),
        ({"state": x.IoreqState.RESP_READY}, "state is RESP_READY"),
        ({"state": 9}, "state is 9"),
        ({"type": 3}, "unknown ioreq type 3"),
        ({"count": 0}, "COPY request with count 0"),
        ({"size": 3}, "size 3, not 1, 2, 4 or 8"),
        ({"size": 16}, "size 16"),
        ({"size": 0, "type": x.IoreqType.PIO}, "PIO request of size 0"),
        ({"size": 0, "data_is_ptr": True}, "element size 0"),
        ({"size": 8192, "data_is_ptr": True}, "element size 8192"),
    ],
)
def test_validate_rejects(fields: dict[str, int], message: str) -> None:
    with pytest.raises(x.XenAbiError, match=message) as info:
        x.validate_ioreq(ready(**fields))
    assert info.value.fatal is False


# ------------------------------------------------------------------ slots


@given(reqs=st.lists(ioreqs, min_size=1, max_size=8), vcpu=st.integers(0, 7))
def test_slots(reqs: list[x.IoReq], vcpu: int) -> None:
    page = bytearray(x.PAGE_SIZE)
    for n, req in enumerate(reqs):
        x.write_slot(page, n, req)
    for n, req in enumerate(reqs):
        assert x.read_slot(page, n) == req
        assert x.slot_state(page, n) == req.state
    if vcpu >= len(reqs):
        return
    before = bytes(page)
    req = reqs[vcpu]
    x.set_slot_state(page, vcpu, x.IoreqState.INPROCESS)
    assert x.read_slot(page, vcpu) == _with(req, state=x.IoreqState.INPROCESS)
    x.complete_slot(page, vcpu, 0x1122_3344_5566_7788)
    assert x.read_slot(page, vcpu) == _with(
        req, state=x.IoreqState.RESP_READY, data=0x1122_3344_5566_7788
    )
    x.set_slot_state(page, vcpu, req.state)
    x.complete_slot(page, vcpu, None)  # a write: data untouched
    assert x.read_slot(page, vcpu).data == 0x1122_3344_5566_7788
    # Nothing outside the slot moved.
    lo, hi = x.slot_offset(vcpu), x.slot_offset(vcpu) + 32
    assert page[:lo] == before[:lo]
    assert page[hi:] == before[hi:]


def _with(req: x.IoReq, **fields: int) -> x.IoReq:
    values = {name: getattr(req, name) for name in x.IoReq.__dataclass_fields__}
    values.update(fields)
    return x.IoReq(**values)


def test_complete_slot_writes_data_before_state() -> None:
    page = memoryview(bytearray(x.PAGE_SIZE))
    x.write_slot(page, 3, ready())
    order: list[str] = []
    real_u64, real_u8 = x._U64, x._U8

    class Spy:
        def __init__(self, name: str, real: struct.Struct) -> None:
            self.name, self.real = name, real

        def pack_into(self, buf: memoryview, at: int, value: int) -> None:
            order.append(f"{self.name}@{at}")
            self.real.pack_into(buf, at, value)

        def unpack_from(self, buf: memoryview, at: int) -> tuple[int, ...]:
            return self.real.unpack_from(buf, at)

    mp = pytest.MonkeyPatch()
    mp.setattr(x, "_U64", Spy("data", real_u64))
    mp.setattr(x, "_U8", Spy("state", real_u8))
    try:
        x.complete_slot(page, 3, 5)
    finally:
        mp.undo()
    assert order == [f"data@{3 * 32 + 8}", f"state@{3 * 32 + 30}"]
    assert x.read_slot(page, 3).data == 5


def test_slot_bounds() -> None:
    page = bytearray(x.PAGE_SIZE)
    assert x.slot_offset(127) == 4064
    with pytest.raises(x.XenAbiError, match="vCPU 128"):
        x.read_slot(page, 128)
    with pytest.raises(x.XenAbiError, match="negative"):
        x.slot_state(page, -1)
    two = bytearray(2 * x.PAGE_SIZE)
    x.write_slot(two, 200, ready())
    assert x.read_slot(two, 200) == ready()
    with pytest.raises(x.XenAbiError, match="state"):
        x.set_slot_state(page, 0, 16)


def test_frames() -> None:
    assert x.FRAME_BUFIOREQ == 0
    assert [x.frame_ioreq(n) for n in range(3)] == [1, 2, 3]
    assert x.XENMEM_RESOURCE_IOREQ_SERVER == 0


# ------------------------------------------------------------------ buffered ring

writes = st.tuples(
    st.integers(0, 0xFFFFF), st.sampled_from([1, 2, 4, 8]), u64, st.sampled_from([0, 1, 7])
).map(lambda t: x.BufferedWrite(t[0], t[1], t[2] % (1 << (8 * t[1])), t[3]))


@given(
    batches=st.lists(st.lists(writes, max_size=40), max_size=30),
    start=u32,
    mode=st.sampled_from([x.BufioreqMode.LEGACY, x.BufioreqMode.ATOMIC]),
)
def test_ring_round_trip(batches: list[list[x.BufferedWrite]], start: int, mode: int) -> None:
    """Producer and consumer agree across pointer wrap-around and a full ring."""
    page = bytearray(x.PAGE_SIZE)
    x.POINTERS.pack_into(page, 0, start, start)
    ring = x.BufferedRing()
    consumed = 0
    for batch in batches:
        posted = [
            w
            for w in batch
            if x.post_buffered_write(
                page, w.addr, w.size, w.data, type=w.type, mode=x.BufioreqMode(mode)
            )
        ]
        rd, wr = x.ring_pointers(page)
        assert (wr - rd) % (1 << 32) <= x.BUF_IOREQ_SLOTS
        assert ring.drain(page) == posted
        consumed += sum(2 if w.size == 8 else 1 for w in posted)
        rd, wr = x.ring_pointers(page)
        assert rd == wr
        assert ring.drain(page) == []
    assert ring.consumed == consumed


def test_ring_full_refuses() -> None:
    page = bytearray(x.PAGE_SIZE)
    for n in range(x.BUF_IOREQ_SLOTS):
        assert x.post_buffered_write(page, n, 4, n)
    assert not x.post_buffered_write(page, 0, 1, 0)
    drained = x.BufferedRing().drain(page)
    assert [w.addr for w in drained] == list(range(x.BUF_IOREQ_SLOTS))
    assert x.ring_pointers(page) == (511, 511)
    for n in range(255):
        assert x.post_buffered_write(page, n, 8, (n << 32) | n)
    assert not x.post_buffered_write(page, 0, 8, 0)  # one slot left, an 8-byte write needs two
    assert x.post_buffered_write(page, 0, 2, 0xFFFF)


def test_eight_byte_write_joined_from_two_slots() -> None:
    page = bytearray(x.PAGE_SIZE)
    x.POINTERS.pack_into(page, 0, 510, 510)  # straddles the end of the ring
    assert x.post_buffered_write(page, 0xA0000, 8, 0xDEAD_BEEF_0123_4567)
    assert x.decode_buf_ioreq(page, 8 + 510 * 8).data == 0x0123_4567
    assert x.decode_buf_ioreq(page, 8).data == 0xDEAD_BEEF
    assert x.BufferedRing().drain(page) == [x.BufferedWrite(0xA0000, 8, 0xDEAD_BEEF_0123_4567)]


def _corrupt(page: bytearray, message: str) -> None:
    before = bytes(page)
    with pytest.raises(x.XenAbiError, match=message) as info:
        x.BufferedRing().drain(page)
    assert info.value.fatal is True
    assert bytes(page) == before  # nothing consumed


def test_ring_corruption() -> None:
    page = bytearray(x.PAGE_SIZE)
    x.POINTERS.pack_into(page, 0, 10, 10 + 512)
    _corrupt(page, "512 slots ahead")
    x.POINTERS.pack_into(page, 0, 10, 9)  # write_pointer behind read_pointer
    _corrupt(page, "4294967295 slots ahead")

    page = bytearray(x.PAGE_SIZE)
    assert x.post_buffered_write(page, 0x100, 4, 1)
    assert x.post_buffered_write(page, 0x200, 8, 2)
    x.POINTERS.pack_into(page, 0, 0, 2)  # the 8-byte write's second half not published
    _corrupt(page, "second half")

    page = bytearray(x.PAGE_SIZE)
    page[8:16] = x.encode_buf_ioreq(x.BufIoReq(1, x.IOREQ_READ, 4, 0, 0))
    x.POINTERS.pack_into(page, 0, 0, 1)
    _corrupt(page, "is a read")
    page[8:16] = x.encode_buf_ioreq(x.BufIoReq(x.IoreqType.PCI_CONFIG, 0, 4, 0, 0))
    _corrupt(page, "type 2")


def test_short_buffered_page() -> None:
    with pytest.raises(x.XenAbiError, match="4096 bytes, not 8"):
        x.BufferedRing().drain(bytearray(8))
    with pytest.raises(x.XenAbiError, match="4096 bytes"):
        x.post_buffered_write(bytearray(100), 0, 4, 0)


def test_producer_rejects_bad_writes() -> None:
    page = bytearray(x.PAGE_SIZE)
    with pytest.raises(x.XenAbiError, match="size 3"):
        x.post_buffered_write(page, 0, 3, 0)
    with pytest.raises(x.XenAbiError, match="data"):
        x.post_buffered_write(page, 0, 2, 0x10000)
    with pytest.raises(x.XenAbiError, match="addr"):
        x.post_buffered_write(page, 1 << 20, 4, 0)


def test_atomic_mode_keeps_pointers_small() -> None:
    page = bytearray(x.PAGE_SIZE)
    ring = x.BufferedRing()
    for n in range(2000):
        assert x.post_buffered_write(page, n & 0xFFFFF, 4, n, mode=x.BufioreqMode.ATOMIC)
        assert ring.drain(page) == [x.BufferedWrite(n & 0xFFFFF, 4, n)]
    rd, wr = x.ring_pointers(page)
    assert rd == wr < 2 * x.BUF_IOREQ_SLOTS


# ------------------------------------------------------------------ PCI


@given(
    seg=u16,
    bus=u8,
    dev=st.integers(0, 31),
    fn=st.integers(0, 7),
    off=st.integers(0, 4095),
)
def test_pci_config_addr_round_trip(seg: int, bus: int, dev: int, fn: int, off: int) -> None:
    addr = x.encode_pci_config_addr(seg, bus, dev, fn, off)
    assert x.decode_pci_config_addr(addr) == x.PciConfigAddress(seg, bus, dev, fn, off)
    sbdf = x.dm_op_sbdf(seg, bus, dev, fn)
    assert addr >> 32 == sbdf  # the ioreq's upper half is the dm_op SBDF
    assert sbdf == (seg << 16) | (bus << 8) | (dev << 3) | fn


def test_pci_ranges() -> None:
    assert x.encode_pci_config_addr(1, 2, 3, 4, 0x10) == 0x0001_02_1C_0000_0010
    assert x.dm_op_sbdf(0, 0, 3, 0) == 0x18
    for args, message in [
        ((0x10000, 0, 0, 0), "segment"),
        ((0, 256, 0, 0), "bus"),
        ((0, 0, 32, 0), "device"),
        ((0, 0, 0, 8), "function"),
        ((0, 0, -1, 0), "device"),
    ]:
        with pytest.raises(x.XenAbiError, match=message):
            x.dm_op_sbdf(*args)
        with pytest.raises(x.XenAbiError, match=message):
            x.encode_pci_config_addr(*args, 0)
    with pytest.raises(x.XenAbiError, match="offset"):
        x.encode_pci_config_addr(0, 0, 0, 0, 4096)
    with pytest.raises(x.XenAbiError, match="beyond the 4 KiB") as info:
        x.decode_pci_config_addr(0x1000)
    assert info.value.fatal is False
    with pytest.raises(x.XenAbiError, match="64-bit"):
        x.decode_pci_config_addr(1 << 64)
