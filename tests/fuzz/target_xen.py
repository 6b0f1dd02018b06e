"""Fuzz target: Xen's ioreq pages as devmodel reads them (devmodel_wire.xen).

Byte 0 picks what the rest is; there are no chunks or fds here (shared memory, not a stream).

- Even: a synchronous ioreq page (one 32-byte slot per vCPU). Each slot decodes; encoding it
  again gives the slot with its padding cleared; `validate_ioreq` passes or raises a
  non-fatal XenAbiError, and what passes is servable (a known type and, for accesses, a count
  and a size a register or a page can hold); a PCI_CONFIG address splits or is refused
  non-fatally, and what splits encodes back; `read_slot` and `slot_state` agree with the
  decode; `complete_slot` changes only the slot's data and state, and leaves RESP_READY.
- Odd: a buffered page (byte 1 bit 0 set: write_pointer is brought within 600 slots of
  read_pointer, so that most pages reach the entries). `BufferedRing.drain` returns the
  writes and moves read_pointer to write_pointer, touching nothing else, or raises a fatal
  XenAbiError and leaves the page as found; each write is a posted type with an address of
  20 bits; the writes, posted again by Xen's producer (`post_buffered_write`) into an empty
  ring, drain back to themselves.

Nothing but XenAbiError escapes anywhere.
"""

from __future__ import annotations

import struct

from devmodel_wire import xen
from devmodel_wire.xen.ioreq import FLAGS_OFFSET
from pyvfio_user.errors import ProtocolError

POSTED = frozenset({xen.IoreqType.PIO, xen.IoreqType.COPY, xen.IoreqType.TIMEOFFSET})


def _check_slot(page: bytearray, vcpu: int) -> None:
    at = vcpu * xen.IOREQ_SIZE
    raw = bytes(page[at : at + xen.IOREQ_SIZE])
    req = xen.decode_ioreq(raw)
    cleared = bytearray(raw)
    cleared[28:30] = b"\0\0"  # _pad0
    cleared[FLAGS_OFFSET] &= 0x7F  # _pad1, the flag byte's top bit
    assert xen.encode_ioreq(req) == bytes(cleared), (raw.hex(), req)
    assert xen.read_slot(page, vcpu) == req
    assert xen.slot_state(page, vcpu) == req.state
    try:
        xen.validate_ioreq(req)
    except xen.XenAbiError as exc:
        assert not exc.fatal, f"a bad synchronous request is fatal: {exc}"
    else:
        assert req.state == xen.IoreqState.READY
        assert req.type in set(xen.IoreqType), req
        if req.type in (xen.IoreqType.PIO, xen.IoreqType.COPY, xen.IoreqType.PCI_CONFIG):
            assert req.count >= 1, req
            limit = xen.PAGE_SIZE if req.data_is_ptr else 8
            assert 1 <= req.size <= limit, req
        if req.type == xen.IoreqType.PCI_CONFIG:
            try:
                where = xen.decode_pci_config_addr(req.addr)
            except xen.XenAbiError as exc:
                assert not exc.fatal, exc
            else:
                again = xen.encode_pci_config_addr(
                    where.segment, where.bus, where.device, where.function, where.offset
                )
                assert again == req.addr, (hex(req.addr), where)
    answer = req.data ^ 0xFFFF_FFFF_FFFF_FFFF if req.is_read else None
    before = bytes(page)
    xen.complete_slot(page, vcpu, answer)
    done = xen.read_slot(page, vcpu)
    want_data = req.data if answer is None else answer
    assert done.state == xen.IoreqState.RESP_READY, done
    assert done.data == want_data, done
    kept = ("addr", "count", "size", "vp_eport", "data_is_ptr", "dir", "df", "type")
    assert all(getattr(done, f) == getattr(req, f) for f in kept), (req, done)
    end = at + xen.IOREQ_SIZE
    assert page[:at] == before[:at] and page[end:] == before[end:], "another slot changed"


SYNC_SLOTS = 8
"""Slots of a synchronous page looked at: every slot is decoded the same way, and a whole
page (128 slots) would cost speed for no coverage."""


def sync_page(body: bytes) -> None:
    page = bytearray(body[: SYNC_SLOTS * xen.IOREQ_SIZE])
    page += bytes(-len(page) % xen.IOREQ_SIZE)
    for vcpu in range(len(page) // xen.IOREQ_SIZE):
        _check_slot(page, vcpu)
    try:
        xen.read_slot(page, len(page) // xen.IOREQ_SIZE)
    except xen.XenAbiError:
        pass
    else:
        raise AssertionError("a slot beyond the mapping was read")


def buffered_page(body: bytes, near: bool) -> None:
    page = bytearray(body[: xen.PAGE_SIZE].ljust(xen.PAGE_SIZE, b"\0"))
    rd, wr = struct.unpack_from("<II", page)
    if near:
        wr = (rd + wr % 600) & 0xFFFF_FFFF
        struct.pack_into("<I", page, 4, wr)
    before = bytes(page)
    ring = xen.BufferedRing()
    try:
        writes = ring.drain(page)
    except xen.XenAbiError as exc:
        assert exc.fatal, f"a corrupt ring is not fatal: {exc}"
        assert bytes(page) == before, "a refused ring was changed"
        return
    pending = (wr - rd) & 0xFFFF_FFFF
    assert sum(2 if w.size == 8 else 1 for w in writes) == pending, (writes, pending)
    assert ring.consumed == pending
    assert xen.ring_pointers(page) == (wr, wr)
    assert bytes(page[4:]) == before[4:], "drain wrote beyond read_pointer"
    for w in writes:
        assert w.type in POSTED, w
        assert w.size in (1, 2, 4, 8) and 0 <= w.addr < 1 << 20, w
        assert 0 <= w.data < 1 << 64 and (w.size == 8 or w.data < 1 << 32), w
    # Xen's producer, fed the same writes, makes a ring that drains back to them.
    fresh = bytearray(xen.PAGE_SIZE)
    for w in writes:
        data = w.data if w.size == 8 else w.data & 0xFFFF_FFFF
        size_mask = (1 << (8 * w.size)) - 1
        assert xen.post_buffered_write(fresh, w.addr, w.size, data & size_mask, type=w.type)
    again = xen.BufferedRing().drain(fresh)
    assert [(w.addr, w.size, w.type) for w in again] == [(w.addr, w.size, w.type) for w in writes]


def one_input(data: bytes) -> None:
    if not data:
        return
    try:
        if data[0] & 1:
            buffered_page(data[2:], near=len(data) > 1 and bool(data[1] & 1))
        else:
            sync_page(data[1:])
    except xen.XenAbiError as exc:
        raise AssertionError(f"XenAbiError escaped a check that expects none: {exc}") from exc
    except ProtocolError as exc:  # pragma: no cover - a wrong class raised
        raise AssertionError(f"a plain ProtocolError escaped: {exc}") from exc
