"""Byte-exact vfio-user wire checks.

The struct hot paths in `codec` against the construct declarations in `layouts`, and golden
vectors, written out by hand from the specification, for the messages of a QEMU-like attach.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from construct import Struct
from hypothesis import given, settings
from hypothesis import strategies as st

from devmodel.testing import (
    QEMU_CAPS,
    QEMU_KEYS,
    QEMU_VERSION_JSON,
    negotiated_pair,
    one_event,
)
from pyvfio_user import codec, compiled
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user import layouts as lay
from pyvfio_user.connection import ClientConnection, ServerConnection
from pyvfio_user.constants import Command
from pyvfio_user.version import QEMU_MAX_DATA_XFER_SIZE, QEMU_MAX_MSG_FDS, Capabilities

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


# ---------------------------------------------------------------- struct vs construct


def test_struct_sizes_match_declarations() -> None:
    assert codec.HEADER.size == lay.SIZES["Header"] == c.HEADER_SIZE == 16
    assert codec.REGION_ACCESS.size == lay.SIZES["RegionAccess"] == 16
    assert codec.HEADER_AND_ACCESS.size == lay.SIZES["Header"] + lay.SIZES["RegionAccess"]
    assert codec.WRITE_MULTI_ENTRY.size == lay.SIZES["WriteMultiEntry"] == 24
    assert codec.U64.size == lay.SIZES["WriteMultiCount"] == 8


def test_declared_sizes_match_the_specification() -> None:
    assert lay.SIZES == {
        "Header": 16,
        "DmaMap": 32,
        "DmaUnmap": 24,
        "DeviceInfo": 16,
        "RegionInfo": 32,
        "CapHeader": 8,
        "SparseMmapFixed": 8,
        "SparseMmapArea": 16,
        "RegionIoFds": 16,
        "IoFdSubregion": 40,
        "IrqInfo": 16,
        "SetIrqsFixed": 20,
        "RegionAccess": 16,
        "DmaAccess": 16,
        "DmaWriteReply": 12,
        "WriteMultiCount": 8,
        "WriteMultiEntry": 24,
        "DeviceFeatureFixed": 8,
        "MigData": 8,
    }


EDGES = [(0, 0, 0), (1, 2, 3), (2**64 - 1, 2**32 - 1, 2**32 - 1), (0x1234_5678_9ABC_DEF0, 7, 256)]


@pytest.mark.parametrize(("offset", "region", "count"), EDGES)
def test_region_access_edges(offset: int, region: int, count: int) -> None:
    _check_region_access(offset, region, count)


@settings(max_examples=200, deadline=None)
@given(u64, u32, u32)
def test_region_access_matches_construct(offset: int, region: int, count: int) -> None:
    _check_region_access(offset, region, count)


def _check_region_access(offset: int, region: int, count: int) -> None:
    fields = {"offset": offset, "region": region, "count": count}
    built = lay.RegionAccess.build(fields)
    assert codec.REGION_ACCESS.pack(offset, region, count) == built
    assert codec.REGION_ACCESS.unpack(built) == (offset, region, count)
    parsed = lay.RegionAccess.parse(codec.REGION_ACCESS.pack(offset, region, count))
    assert (parsed.offset, parsed.region, parsed.count) == (offset, region, count)


@settings(max_examples=200, deadline=None)
@given(u16, u16, u32, u32, u32, u64, u32, u32)
def test_header_and_access_matches_construct(
    msg_id: int, command: int, size: int, flags: int, err: int, offset: int, region: int, count: int
) -> None:
    header = {"msg_id": msg_id, "command": command, "size": size, "flags": flags, "error": err}
    access = {"offset": offset, "region": region, "count": count}
    built = lay.Header.build(header) + lay.RegionAccess.build(access)
    packed = codec.HEADER_AND_ACCESS.pack(msg_id, command, size, flags, err, offset, region, count)
    assert packed == built
    assert codec.HEADER.pack(msg_id, command, size, flags, err) == lay.Header.build(header)
    assert codec.HEADER_AND_ACCESS.unpack(built) == (
        msg_id, command, size, flags, err, offset, region, count
    )  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(u64, u32, u32, st.binary(min_size=8, max_size=8))
def test_write_multi_entry_matches_construct(
    offset: int, region: int, count: int, data: bytes
) -> None:
    fields = {"offset": offset, "region": region, "count": count, "data": data}
    built = lay.WriteMultiEntry.build(fields)
    assert codec.WRITE_MULTI_ENTRY.pack(offset, region, count, data) == built
    assert codec.WRITE_MULTI_ENTRY.unpack(built) == (offset, region, count, data)
    assert codec.U64.pack(offset) == lay.WriteMultiCount.build({"wr_cnt": offset})


def _construct_header(msg_id: int, command: int, payload: bytes, flags: int) -> bytes:
    fields = {"msg_id": msg_id, "command": command, "size": 16 + len(payload), "flags": flags}
    built: bytes = lay.Header.build({**fields, "error": 0})
    return built + payload


def _access(offset: int, region: int, count: int) -> bytes:
    built: bytes = lay.RegionAccess.build({"offset": offset, "region": region, "count": count})
    return built


@settings(max_examples=100, deadline=None)
@given(u16, u64, u32, st.binary(min_size=1, max_size=64), st.booleans())
def test_hot_path_messages_match_construct(
    msg_id: int, offset: int, region: int, data: bytes, posted: bool
) -> None:
    """Whole messages built by the hot-path encoders equal construct-built ones."""
    command = c.TYPE_COMMAND | (c.FLAG_NO_REPLY if posted else 0)
    n = len(data)
    cases: list[tuple[Any, bytes]] = [
        (
            ev.RegionRead(msg_id, offset, region, n, no_reply=posted),
            _construct_header(msg_id, 9, _access(offset, region, n), command),
        ),
        (
            ev.RegionWrite(msg_id, offset, region, data, no_reply=posted),
            _construct_header(msg_id, 10, _access(offset, region, n) + data, command),
        ),
        (
            ev.RegionReadReply(msg_id, offset, region, data),
            _construct_header(msg_id, 9, _access(offset, region, n) + data, c.TYPE_REPLY),
        ),
        (
            ev.RegionWriteReply(msg_id, offset, region, n),
            _construct_header(msg_id, 10, _access(offset, region, n), c.TYPE_REPLY),
        ),
    ]
    entries = [(offset, region, k + 1, (data * 8)[:8]) for k in range(min(n, 8))]
    multi_payload = lay.WriteMultiCount.build({"wr_cnt": len(entries)}) + b"".join(
        lay.WriteMultiEntry.build({"offset": o, "region": r, "count": k, "data": d})
        for o, r, k, d in entries
    )
    multi = ev.RegionWriteMulti(
        msg_id, tuple(ev.WriteEntry(o, r, d[:k]) for o, r, k, d in entries), no_reply=posted
    )
    # A short entry travels zero-padded to 8 data bytes; build the golden the same way.
    padded = lay.WriteMultiCount.build({"wr_cnt": len(entries)}) + b"".join(
        lay.WriteMultiEntry.build(
            {"offset": o, "region": r, "count": k, "data": d[:k].ljust(8, b"\0")}
        )
        for o, r, k, d in entries
    )
    assert len(multi_payload) == len(padded)
    cases.append((multi, _construct_header(msg_id, 15, padded, command)))
    for event, expected in cases:
        data_out, fds = codec.encode(event)
        assert data_out == expected, type(event).__name__
        assert fds == ()


def test_hot_path_decode_matches_construct_parse() -> None:
    _, server = negotiated_pair()
    data = _construct_header(77, 10, _access(0x1000, 2, 4) + b"\x01\x02\x03\x04", 0x10)
    server.receive_data(data)
    got = one_event(server)
    parsed = lay.RegionAccess.parse(data[16:32])
    assert got == ev.RegionWrite(77, parsed.offset, parsed.region, data[32:], no_reply=True)


# ---------------------------------------------------------------- golden: a QEMU-like attach

QEMU_VERSION_PAYLOAD = b"\x00\x00\x00\x00" + QEMU_VERSION_JSON + b"\0"
QEMU_VERSION_MSG = (
    h("0000 0100") + struct.pack("<I", 16 + len(QEMU_VERSION_PAYLOAD)) + h("00000000 00000000")
) + QEMU_VERSION_PAYLOAD

SERVER_VERSION_REPLY = (
    b'{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,'
    b'"max_dma_maps":65535,"pgsizes":4096,"write_multiple":true}}\0'
)


def test_qemu_version_json_is_what_the_reference_quotes() -> None:
    assert len(QEMU_VERSION_JSON) == 176
    assert QEMU_VERSION_MSG[:16] == h("0000 0100 c5000000 00000000 00000000")
    assert QEMU_VERSION_MSG.endswith(b"true}}\0")


def test_qemu_version_request_golden() -> None:
    server = ServerConnection()
    server.receive_data(QEMU_VERSION_MSG)
    got = one_event(server)
    assert got == ev.VersionRequest(0, 0, 0, QEMU_CAPS, QEMU_KEYS)


def test_qemu_version_reply_golden() -> None:
    server = ServerConnection()
    server.receive_data(QEMU_VERSION_MSG)
    reply = server.version_reply(one_event(server))
    out = server.send(reply)
    payload = b"\0\0\0\0" + SERVER_VERSION_REPLY
    assert (
        out.data
        == h("0000 0100") + struct.pack("<I", 16 + len(payload)) + h("01000000 00000000") + payload
    )
    assert out.fds == ()


def _reply_json(data: bytes) -> tuple[int, int, dict[str, Any]]:
    major, minor = struct.unpack_from("<HH", data, 16)
    blob = data[20:]
    assert blob.endswith(b"\0") and blob.count(b"\0") == 1, "NUL-terminated, once"
    doc = json.loads(blob[:-1])
    assert isinstance(doc, dict) and set(doc) == {"capabilities"}
    caps = doc["capabilities"]
    assert isinstance(caps, dict)
    return major, minor, caps


@pytest.mark.parametrize(
    ("minor", "json_text"),
    [
        (0, QEMU_VERSION_JSON.decode()),
        (0, '{"capabilities":{"max_msg_fds":4}}'),
        (3, '{"capabilities":{"pgsizes":12288,"write_multiple":false}}'),
        (7, '{"capabilities":{"max_data_xfer_size":4096,"max_dma_maps":10,"twin_socket":{}}}'),
        (0, '{"capabilities":{}}'),
        (0, "{}"),
    ],
)
def test_version_reply_names_only_client_keys(minor: int, json_text: str) -> None:
    server = ServerConnection()
    payload = struct.pack("<HH", 0, minor) + json_text.encode() + b"\0"
    server.receive_data(struct.pack("<HHIII", 0, 1, 16 + len(payload), 0, 0) + payload)
    request = one_event(server)
    reply = server.version_reply(request)
    assert isinstance(reply, ev.VersionReply)
    data = server.send(reply).data
    major, rminor, caps = _reply_json(data)
    named = set(json.loads(json_text).get("capabilities", {}))
    assert major == 0
    assert rminor <= minor
    assert set(caps) <= named
    # What QEMU checks in the server's answer.
    assert caps.get("max_msg_fds", 1) <= QEMU_MAX_MSG_FDS
    assert caps.get("max_data_xfer_size", 1 << 20) <= QEMU_MAX_DATA_XFER_SIZE
    assert caps.get("pgsizes", 4096) % 4096 == 0
    assert caps.get("max_dma_maps", 65535) <= 65535
    if "max_dma_maps" in named:
        assert caps["max_dma_maps"] <= json.loads(json_text)["capabilities"]["max_dma_maps"]
    if "write_multiple" in caps:
        assert isinstance(caps["write_multiple"], bool)


def test_version_reply_decodes_at_a_qemu_like_client() -> None:
    client = ClientConnection(QEMU_CAPS)
    server = ServerConnection()
    server.receive_data(client.send(ev.VersionRequest(0, 0, 0, QEMU_CAPS)).data)
    client.receive_data(server.send(server.version_reply(one_event(server))).data)
    reply = one_event(client)
    assert reply == ev.VersionReply(
        0,
        0,
        0,
        Capabilities(16, 1 << 20, 65535, 4096, True),
        frozenset(
            {"max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes", "write_multiple"}
        ),
    )


# Requests as QEMU puts them on the wire, and the event each must decode to. The hex is the
# specification's layout written out by hand: header (id, command, size, flags, error), payload.
GOLDEN_REQUESTS: list[tuple[str, bytes, Any]] = [
    (
        "dma-map-ram",
        h(
            "0100 0200 30000000 00000000 00000000"
            "20000000 03000000 0000000000000000 0000100000000000 0000f07f00000000"
        ),
        ev.DmaMap(1, 3, 0, 0x100000, 0x7FF00000),
    ),
    (
        "dma-map-bios",
        h(
            "0200 0200 30000000 00000000 00000000"
            "20000000 01000000 0000000000000000 0000fcff00000000 0000040000000000"
        ),
        ev.DmaMap(2, 1, 0, 0xFFFC0000, 0x40000),
    ),
    (
        "get-info",
        h("0300 0400 20000000 00000000 00000000 10000000 00000000 00000000 00000000"),
        ev.DeviceGetInfo(3),
    ),
    (
        "get-region-info",
        h(
            "0400 0500 30000000 00000000 00000000"
            "20000000 00000000 02000000 00000000 0000000000000000 0000000000000000"
        ),
        ev.DeviceGetRegionInfo(4, 2),
    ),
    (
        "get-irq-info",
        h("0500 0700 20000000 00000000 00000000 10000000 00000000 03000000 00000000"),
        ev.DeviceGetIrqInfo(5, 3),
    ),
    (
        "config-read-256",
        h("0a00 0900 20000000 00000000 00000000 0000000000000000 07000000 00010000"),
        ev.RegionRead(10, 0, 7, 256),
    ),
    (
        "posted-bar-write",
        h("0b00 0a00 24000000 10000000 00000000 4000000000000000 00000000 04000000 78563412"),
        ev.RegionWrite(11, 0x40, 0, b"\x78\x56\x34\x12", no_reply=True),
    ),
    (
        "command-register-write",
        h("0c00 0a00 22000000 00000000 00000000 0400000000000000 07000000 02000000 0701"),
        ev.RegionWrite(12, 4, 7, b"\x07\x01"),
    ),
    (
        "set-irqs-intx",
        h("0d00 0800 24000000 00000000 00000000 14000000 24000000 00000000 00000000 01000000"),
        ev.DeviceSetIrqs(13, 0x24, 0, 0, 1),
    ),
    (
        "dma-unmap",
        h(
            "0e00 0300 28000000 00000000 00000000"
            "18000000 00000000 0000100000000000 0000f07f00000000"
        ),
        ev.DmaUnmap(14, 0, 0x100000, 0x7FF00000),
    ),
    (
        "write-multi-posted",
        h(
            "0f00 0f00 48000000 10000000 00000000 0200000000000000"
            "0000000000000000 00000000 04000000 0100000000000000"
            "0800000000000000 00000000 02000000 0200000000000000"
        ),
        ev.RegionWriteMulti(
            15, (ev.WriteEntry(0, 0, b"\1\0\0\0"), ev.WriteEntry(8, 0, b"\2\0")), no_reply=True
        ),
    ),
    ("reset", h("1400 0d00 10000000 00000000 00000000"), ev.DeviceReset(20)),
]


@pytest.mark.parametrize(
    ("wire", "event"), [pytest.param(w, e, id=n) for n, w, e in GOLDEN_REQUESTS]
)
def test_golden_request_decodes(wire: bytes, event: Any) -> None:
    _, server = negotiated_pair()
    server.receive_data(wire)
    assert one_event(server) == event


@pytest.mark.parametrize(
    ("wire", "event"), [pytest.param(w, e, id=n) for n, w, e in GOLDEN_REQUESTS]
)
def test_golden_request_encodes(wire: bytes, event: Any) -> None:
    client, _ = negotiated_pair()
    assert client.send(event).data == wire


# (request the server has decoded, the reply event, the reply's exact bytes)
GOLDEN_REPLIES: list[tuple[str, bytes, Any, bytes]] = [
    (
        "dma-map-ack",
        GOLDEN_REQUESTS[0][1],
        ev.Ack(1, Command.DMA_MAP),
        h("0100 0200 10000000 01000000 00000000"),
    ),
    (
        "device-info",
        GOLDEN_REQUESTS[2][1],
        ev.DeviceInfo(3, c.DEVICE_FLAGS_RESET | c.DEVICE_FLAGS_PCI, 9, 5),
        h("0300 0400 20000000 01000000 00000000 10000000 03000000 09000000 05000000"),
    ),
    (
        "region-info-short",
        GOLDEN_REQUESTS[3][1],
        ev.RegionInfo(
            4, 2, 0xF, 0x8000, 0, (ev.SparseMmapCap(((0, 0x1000), (0x3000, 0x2000))),), argsz=32
        ),
        h(
            "0400 0500 30000000 01000000 00000000"
            "50000000 07000000 02000000 00000000 0080000000000000 0000000000000000"
        ),
    ),
    (
        "irq-info",
        GOLDEN_REQUESTS[4][1],
        ev.IrqInfo(5, 3, c.IRQ_INFO_EVENTFD, 1),
        h("0500 0700 20000000 01000000 00000000 10000000 01000000 03000000 01000000"),
    ),
    (
        "config-read-reply",
        h("0a00 0900 20000000 00000000 00000000 3c00000000000000 07000000 04000000"),
        ev.RegionReadReply(10, 0x3C, 7, b"\x0b\x01\x00\x00"),
        h("0a00 0900 24000000 01000000 00000000 3c00000000000000 07000000 04000000 0b010000"),
    ),
    (
        "command-register-write-reply",
        GOLDEN_REQUESTS[7][1],
        ev.RegionWriteReply(12, 4, 7, 2),
        h("0c00 0a00 20000000 01000000 00000000 0400000000000000 07000000 02000000"),
    ),
    (
        "read-error",
        h("0a00 0900 20000000 00000000 00000000 0010000000000000 00000000 04000000"),
        ev.ErrorReply(10, Command.REGION_READ, 14),
        h("0a00 0900 10000000 21000000 0e000000"),
    ),
    (
        "reset-ack",
        GOLDEN_REQUESTS[-1][1],
        ev.Ack(20, Command.DEVICE_RESET),
        h("1400 0d00 10000000 01000000 00000000"),
    ),
]


@pytest.mark.parametrize(
    ("request_wire", "reply", "wire"),
    [pytest.param(q, r, w, id=n) for n, q, r, w in GOLDEN_REPLIES],
)
def test_golden_reply_encodes(request_wire: bytes, reply: Any, wire: bytes) -> None:
    _, server = negotiated_pair()
    server.receive_data(request_wire)
    one_event(server)
    out = server.send(reply)
    assert out.data == wire
    assert out.fds == ()


def test_golden_region_info_full_reply() -> None:
    _, server = negotiated_pair()
    server.receive_data(
        h(
            "0600 0500 30000000 00000000 00000000"
            "50000000 00000000 02000000 00000000 0000000000000000 0000000000000000"
        )
    )
    assert one_event(server) == ev.DeviceGetRegionInfo(6, 2, argsz=0x50)
    cap = ev.SparseMmapCap(((0, 0x1000), (0x3000, 0x2000)))
    out = server.send(ev.RegionInfo(6, 2, 7, 0x8000, 0, (cap,), argsz=0x50))
    assert out.data == h(
        "0600 0500 60000000 01000000 00000000"
        "50000000 0f000000 02000000 20000000 0080000000000000 0000000000000000"
        "0100 0100 00000000 02000000 00000000"
        "0000000000000000 0010000000000000 0030000000000000 0020000000000000"
    )


def test_the_compiled_layouts_are_the_declarations_compiled() -> None:
    """The codec uses `compiled` (no construct import at run time); it must be `layouts`."""
    declared = {n: v for n, v in vars(lay).items() if isinstance(v, Struct)}
    mirrored = {n: v for n, v in vars(compiled).items() if isinstance(v, compiled.Compiled)}
    assert set(declared) == set(mirrored)
    for name, layout in declared.items():
        want = lay.compile_layout(layout)
        got = mirrored[name]
        assert (got.struct.format, got.names, got.tail) == (
            want.struct.format,
            want.names,
            want.tail,
        ), name
