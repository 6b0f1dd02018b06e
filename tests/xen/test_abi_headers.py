"""devmodel_wire.xen against what GCC makes of Debian's libxen-dev headers (no hypervisor needed).

A C program (c/ioreq_abi.c) prints sizes, offsets and constants, and round-trips sample
requests through the real structs, bitfields included, in both directions. Any difference
from the Python module fails here.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest

from devmodel_wire.xen import ioreq as x
from devmodel_wire.xen import layouts as lay
from tests.xen.xen_cc import C_DIR, INCLUDE, compile_c, run

HEADERS = ("xen/hvm/ioreq.h", "xen/hvm/dm_op.h", "xen/hvm/hvm_op.h", "xen/memory.h", "xenctrl.h")
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1


@pytest.fixture(scope="module")
def abi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(C_DIR / "ioreq_abi.c", tmp_path_factory.mktemp("abi"), headers=HEADERS)


def offsets(declaration: Any) -> dict[str, int]:
    """Byte offsets of a construct Struct's fields (all fixed-size)."""
    at, out = 0, {}
    for sub in declaration.subcons:
        out[sub.name] = at
        at += sub.sizeof()
    return out


def test_layout_and_constants(abi: Path) -> None:
    c = {}
    for line in run(abi).splitlines():
        name, value = line.rsplit(" ", 1)
        c[name] = int(value)
    io = offsets(lay.Ioreq)
    buf = offsets(lay.BufIoreq)
    page = offsets(lay.BufferedIopage)
    expected = {
        "sizeof.ioreq_t": x.IOREQ_SIZE,
        "ioreq_t.addr": io["addr"],
        "ioreq_t.data": x.DATA_OFFSET,
        "ioreq_t.count": io["count"],
        "ioreq_t.size": io["size"],
        "ioreq_t.vp_eport": io["vp_eport"],
        "ioreq_t._pad0": io["pad0"],
        "ioreq_t.type": x.TYPE_OFFSET,
        "sizeof.shared_iopage_t": x.IOREQ_SIZE,  # declared with one slot
        "shared_iopage_t.vcpu_ioreq": x.slot_offset(0),
        "stride.shared_iopage_t.vcpu_ioreq": x.slot_offset(1),
        "sizeof.buf_ioreq_t": x.BUF_IOREQ_SIZE,
        "buf_ioreq_t.type": 0,
        "buf_ioreq_t.data": buf["data"],
        "sizeof.buffered_iopage_t": lay.SIZES["BufferedIopage"],
        "buffered_iopage_t.read_pointer": x.READ_POINTER_OFFSET,
        "buffered_iopage_t.write_pointer": x.WRITE_POINTER_OFFSET,
        "buffered_iopage_t.buf_ioreq": x.BUF_IOREQ_OFFSET,
        "IOREQ_READ": x.IOREQ_READ,
        "IOREQ_WRITE": x.IOREQ_WRITE,
        "STATE_IOREQ_NONE": x.IoreqState.NONE,
        "STATE_IOREQ_READY": x.IoreqState.READY,
        "STATE_IOREQ_INPROCESS": x.IoreqState.INPROCESS,
        "STATE_IORESP_READY": x.IoreqState.RESP_READY,
        "IOREQ_TYPE_PIO": x.IoreqType.PIO,
        "IOREQ_TYPE_COPY": x.IoreqType.COPY,
        "IOREQ_TYPE_PCI_CONFIG": x.IoreqType.PCI_CONFIG,
        "IOREQ_TYPE_TIMEOFFSET": x.IoreqType.TIMEOFFSET,
        "IOREQ_TYPE_INVALIDATE": x.IoreqType.INVALIDATE,
        "IOREQ_BUFFER_SLOT_NUM": x.BUF_IOREQ_SLOTS,
        "HVM_IOREQSRV_BUFIOREQ_OFF": x.BufioreqMode.OFF,
        "HVM_IOREQSRV_BUFIOREQ_LEGACY": x.BufioreqMode.LEGACY,
        "HVM_IOREQSRV_BUFIOREQ_ATOMIC": x.BufioreqMode.ATOMIC,
        "XENMEM_resource_ioreq_server": x.XENMEM_RESOURCE_IOREQ_SERVER,
        "XENMEM_resource_ioreq_server_frame_bufioreq": x.FRAME_BUFIOREQ,
        **{f"XENMEM_resource_ioreq_server_frame_ioreq({n})": x.frame_ioreq(n) for n in range(4)},
        "XC_PAGE_SIZE": x.PAGE_SIZE,
        "XEN_DMOP_IO_RANGE_PORT": x.IoRangeType.PORT,
        "XEN_DMOP_IO_RANGE_MEMORY": x.IoRangeType.MEMORY,
        "XEN_DMOP_IO_RANGE_PCI": x.IoRangeType.PCI,
    }
    assert c == {k: int(v) for k, v in expected.items()}
    # The Python tables agree with themselves as well.
    assert io["data"] == x.DATA_OFFSET
    assert io["flags"] == x.FLAGS_OFFSET
    assert io["type"] == x.TYPE_OFFSET
    assert page == {
        "read_pointer": x.READ_POINTER_OFFSET,
        "write_pointer": x.WRITE_POINTER_OFFSET,
        "buf_ioreq": x.BUF_IOREQ_OFFSET,
    }
    assert x.PAGE_SIZE - x.BUF_IOREQ_OFFSET == x.BUF_IOREQ_SLOTS * x.BUF_IOREQ_SIZE


def sample_ioreqs() -> list[x.IoReq]:
    rng = random.Random(0x10_5EED)
    edges = [
        x.IoReq(0, 0, 0, 0, 0, 0, False, 0, False, 0),
        x.IoReq(U64, U64, U32, U32, U32, 15, True, 1, True, 255),
    ]
    # One field at a time, so a misplaced bitfield shows which one.
    for bit in range(4):
        edges.append(x.IoReq(0, 0, 0, 0, 0, 1 << bit, False, 0, False, 0))
    edges.append(x.IoReq(0, 0, 0, 0, 0, 0, True, 0, False, 0))
    edges.append(x.IoReq(0, 0, 0, 0, 0, 0, False, 1, False, 0))
    edges.append(x.IoReq(0, 0, 0, 0, 0, 0, False, 0, True, 0))
    randoms = [
        x.IoReq(
            rng.getrandbits(64),
            rng.getrandbits(64),
            rng.getrandbits(32),
            rng.getrandbits(32),
            rng.getrandbits(32),
            rng.getrandbits(4),
            bool(rng.getrandbits(1)),
            rng.getrandbits(1),
            bool(rng.getrandbits(1)),
            rng.getrandbits(8),
        )
        for _ in range(300)
    ]
    return edges + randoms


def sample_bufs() -> list[x.BufIoReq]:
    rng = random.Random(0xB0F)
    out = [x.BufIoReq(0, 0, 1, 0, 0), x.BufIoReq(255, 1, 8, 0xFFFFF, U32)]
    out += [x.BufIoReq(0, 0, s, 0, 0) for s in (2, 4, 8)]
    out += [x.BufIoReq(0, 1, 1, 0, 0), x.BufIoReq(0, 0, 1, 1, 0), x.BufIoReq(0, 0, 1, 1 << 19, 0)]
    out += [
        x.BufIoReq(
            rng.getrandbits(8),
            rng.getrandbits(1),
            1 << rng.getrandbits(2),
            rng.getrandbits(20),
            rng.getrandbits(32),
        )
        for _ in range(300)
    ]
    return out


def test_ioreq_bytes_match_gcc(abi: Path) -> None:
    reqs = sample_ioreqs()
    stdin = "".join(
        f"ioreq {r.addr} {r.data} {r.count} {r.size} {r.vp_eport} {r.state} "
        f"{int(r.data_is_ptr)} {r.dir} {int(r.df)} {r.type}\n"
        for r in reqs
    )
    lines = run(abi, "encode", stdin=stdin).split()
    assert len(lines) == len(reqs)
    for req, line in zip(reqs, lines, strict=True):
        from_c = bytes.fromhex(line)
        assert x.encode_ioreq(req) == from_c, req
        assert x.decode_ioreq(from_c) == req
        assert lay.Ioreq.build(lay.Ioreq.parse(from_c)) == from_c


def test_ioreq_fields_match_gcc(abi: Path) -> None:
    rng = random.Random(0xDEC0DE)
    blobs = [bytes(32), b"\xff" * 32] + [rng.randbytes(32) for _ in range(300)]
    blobs += [bytes(30) + bytes([1 << bit]) + b"\0" for bit in range(8)]
    out = run(abi, "decode", stdin="".join(f"ioreq {b.hex()}\n" for b in blobs)).splitlines()
    assert len(out) == len(blobs)
    for blob, line in zip(blobs, out, strict=True):
        r = x.decode_ioreq(blob)
        mine = [r.addr, r.data, r.count, r.size, r.vp_eport, r.state]
        mine += [int(r.data_is_ptr), r.dir, int(r.df), r.type]
        assert [int(v) for v in line.split()] == mine, blob.hex()


def test_buf_ioreq_bytes_match_gcc(abi: Path) -> None:
    reqs = sample_bufs()
    codes = {1: 0, 2: 1, 4: 2, 8: 3}
    stdin = "".join(f"buf {r.type} {r.dir} {codes[r.size]} {r.addr} {r.data}\n" for r in reqs)
    lines = run(abi, "encode", stdin=stdin).split()
    assert len(lines) == len(reqs)
    for req, line in zip(reqs, lines, strict=True):
        from_c = bytes.fromhex(line)
        assert x.encode_buf_ioreq(req) == from_c, req
        assert x.decode_buf_ioreq(from_c) == req


def test_buf_ioreq_fields_match_gcc(abi: Path) -> None:
    rng = random.Random(0xB0FDEC)
    blobs = [bytes(8), b"\xff" * 8] + [rng.randbytes(8) for _ in range(300)]
    blobs += [(1 << bit).to_bytes(8, "little") for bit in range(64)]
    out = run(abi, "decode", stdin="".join(f"buf {b.hex()}\n" for b in blobs)).splitlines()
    assert len(out) == len(blobs)
    for blob, line in zip(blobs, out, strict=True):
        r = x.decode_buf_ioreq(blob)
        t, d, code, addr, data = (int(v) for v in line.split())
        assert (r.type, r.dir, r.size, r.addr, r.data) == (t, d, 1 << code, addr, data), blob


def test_dm_op_sbdf_matches_macro(abi: Path) -> None:
    rng = random.Random(5)
    cases = [(0, 0, 0, 0), (0xFFFF, 0xFF, 31, 7), (1, 2, 3, 4)]
    cases += [(1 << b, 0, 0, 0) for b in range(16)] + [(0, 1 << b, 0, 0) for b in range(8)]
    cases += [(0, 0, 1 << b, 0) for b in range(5)] + [(0, 0, 0, 1 << b) for b in range(3)]
    cases += [
        (rng.getrandbits(16), rng.getrandbits(8), rng.getrandbits(5), rng.getrandbits(3))
        for _ in range(100)
    ]
    stdin = "".join(f"sbdf {s} {b} {d} {f}\n" for s, b, d, f in cases)
    out = run(abi, "encode", stdin=stdin).split()
    assert [int(v) for v in out] == [x.dm_op_sbdf(*case) for case in cases]


def test_pci_config_address_matches_header_comment() -> None:
    """The PCI_CONFIG address layout exists only as a comment in ioreq.h: parse that."""
    text = (INCLUDE / "xen/hvm/ioreq.h").read_text()
    ranges = re.search(r"\*\s*(63\.+48\|.*?)\n\s*\*\s*(SEGMENT.*?)\n", text)
    assert ranges is not None, "the SEGMENT|BUS|DEV|FN|OFFSET comment is gone from ioreq.h"
    bits = [tuple(int(v) for v in re.split(r"\.+", r.strip())) for r in ranges[1].split("|")]
    names = [n.strip() for n in ranges[2].split("|")]
    assert names == ["SEGMENT", "BUS", "DEV", "FN", "OFFSET"]
    fields = ["segment", "bus", "device", "function", "offset"]
    for name, (high, low) in zip(fields, bits, strict=True):
        # A value of all ones in one field lands exactly on that field's bits.
        width = high - low + 1
        value = min((1 << width) - 1, x.PCI_CONFIG_SPACE - 1)
        args = dict.fromkeys(fields, 0) | {name: value}
        addr = x.encode_pci_config_addr(**args)
        assert addr == value << low, name
        assert getattr(x.decode_pci_config_addr(addr), name) == value
    assert [hi - lo + 1 for hi, lo in bits] == [16, 8, 5, 3, 32]
