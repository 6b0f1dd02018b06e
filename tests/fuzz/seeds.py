"""`python -m tests.fuzz.seeds`: writes the seed corpus (tests/fuzz/corpus/<target>/).

Seeds are valid sessions, built with the protocols' own encoders so that they stay valid when
a format changes: each connection state, each driving mode and each message kind has a start,
and the fuzzer mutates from there. Regression seeds (inputs that once found a bug) are written
by hand into the corpus as `regress-*` files and are left alone here.
"""

from __future__ import annotations

import struct

import devmodel_wire.lease as lp
from devmodel_wire import control as ctl
from devmodel_wire import xen
from devmodel_wire.lease.wire import encode as lease_encode
from pyvfio_user import codec
from pyvfio_user import events as ev
from pyvfio_user.constants import Command
from tests.fuzz.common import make_input
from tests.fuzz.target_vfio_user import SMALL
from tests.fuzz.targets import CORPUS
from tests.unit.lease_protocol_support import GRANULE, RW, borrower_hello, lender_hello


def _vfio(*events: ev.Event) -> bytes:
    return b"".join(codec.encode(event)[0] for event in events)


def vfio_user_seeds() -> dict[str, bytes]:
    version = _vfio(ev.VersionRequest(0, 0, 0, SMALL))
    requests = _vfio(
        ev.DeviceGetInfo(1),
        ev.DeviceGetRegionInfo(2, 0, argsz=256),
        ev.DeviceGetRegionIoFds(3, 0, argsz=256),
        ev.DeviceGetIrqInfo(4, 0),
        ev.RegionRead(5, 0x10, 0, 4),
        ev.RegionWrite(6, 0x10, 0, b"\1\2\3\4", True),
        ev.RegionWriteMulti(7, (ev.WriteEntry(0, 0, b"ab"), ev.WriteEntry(8, 0, b"c"))),
        ev.DmaUnmap(8, 0, 0x10000, 4096),
        ev.DeviceReset(9),
        ev.DeviceFeature(10, 0),
        ev.MigDataRead(11, 16),
    )
    dma_map = _vfio(ev.DmaMap(12, 3, 0, 0x10000, 4096))
    set_irqs = _vfio(ev.DeviceSetIrqs(13, 0x24, 0, 0, 2))  # DATA_EVENTFD | TRIGGER, 2 fds
    reads = _vfio(*(ev.RegionRead(i, 8 * i, 0, 8) for i in range(20, 24)))
    dma_replies = _vfio(ev.DmaReadReply(0, 0x1000, bytes(16)), ev.DmaWriteReply(1, 0x2000, 4))
    version_reply = _vfio(ev.VersionReply(0, 0, 0, SMALL, frozenset(SMALL_KEYS)))
    client_replies = _vfio(
        ev.Ack(1, Command.DMA_MAP),
        ev.DmaUnmapReply(2, 0, 0, 4096),
        ev.DeviceInfo(3, 3, 9, 5),
        ev.RegionInfo(4, 2, 7, 4096, 0, argsz=32),
        ev.IrqInfo(6, 0, 1, 1),
        ev.Ack(7, Command.DEVICE_SET_IRQS),
        ev.RegionReadReply(8, 0, 0, bytes(8)),
        ev.RegionWriteReply(9, 0, 0, 2),
        ev.Ack(10, Command.DEVICE_RESET),
        ev.RegionWriteMultiReply(11, 1),
        ev.ErrorReply(12, 16, 95),
        ev.MigDataReadReply(13, b"0123456789abcdef"),
        ev.MigDataWriteReply(14, 3),
    )
    dma_requests = _vfio(ev.DmaRead(0, 0x1000, 8), ev.DmaWrite(1, 0x2000, b"wxyz"))
    return {
        "fresh-server-session": make_input(0, version + requests, eof=True),
        "fresh-server-chunked": make_input(0, version + requests, cuts=[5, 20, 11, 40, 3]),
        "fresh-server-fds": make_input(
            0,
            version + dma_map + set_irqs,
            cuts=[len(version), len(dma_map), len(set_irqs)],
            fd_mask=0b0110,
            two_fds=True,
        ),
        "ready-server-requests": make_input(1, requests + dma_replies),
        "ready-server-next-read": make_input(1, reads + requests, alternate=True, cuts=[32, 7]),
        "ready-server-dma-map-fd": make_input(
            1, dma_map + set_irqs, cuts=[48], fd_mask=0b11, two_fds=True
        ),
        "fresh-client-dma": make_input(2, dma_requests, eof=True),
        "version-pending-client": make_input(3, version_reply + dma_requests, cuts=[16, 30]),
        "ready-client-replies": make_input(4, client_replies, fd_mask=0b1000, cuts=[32, 48, 120]),
    }


SMALL_KEYS = ("max_msg_fds", "max_data_xfer_size", "write_multiple")


def _lease(*events: lp.Event) -> bytes:
    return b"".join(lease_encode(event) for event in events)


def lease_seeds() -> dict[str, bytes]:
    lender_says = _lease(
        lp.Grant(1, 0, GRANULE, 0, RW, 0),
        lp.Grant(2, GRANULE, GRANULE, 0, RW, 0),
        lp.Revoke(1, lp.RevokeMode.EVICT),
        lp.PageInDone(1, lp.PageInStatus.OK),
        lp.Ping(7),
        lp.Pong(1),
        lp.Error(lp.MsgType.PAGE_IN, 2, lp.ErrorCode.OTHER, "no"),
        lp.Bye(lp.ByeReason.NORMAL, "done"),
    )
    borrower_says = _lease(
        lp.GrantAck(1),
        lp.GrantNack(2, lp.NackReason.MISALIGNED, "odd"),
        lp.Revoked(1),
        lp.PageIn(1, 0, GRANULE, lp.Access.READ),
        lp.Ping(9),
        lp.Pong(1),
        lp.Error(lp.MsgType.REVOKE, 3, lp.ErrorCode.UNKNOWN_ID),
        lp.Bye(lp.ByeReason.NORMAL),
    )
    grant = lease_encode(lp.Grant(4, 0, GRANULE, 0, RW, 0))
    return {
        "borrower-handshake": make_input(0, lease_encode(lender_hello()) + lender_says, eof=True),
        "borrower-hello-prefix": make_input(0, lender_says, alternate=True, cuts=[48, 30]),
        "lender-handshake": make_input(1, lease_encode(borrower_hello()) + borrower_says, eof=True),
        "lender-hello-prefix": make_input(1, borrower_says, alternate=True, cuts=[16, 16, 60]),
        "borrower-open-grant-fd": make_input(
            2, grant + lender_says, cuts=[len(grant)], fd_mask=0b1
        ),
        "lender-open": make_input(3, borrower_says, cuts=[9, 31, 64]),
    }


def control_seeds() -> dict[str, bytes]:
    session = (
        ctl.encode_command(ctl.CAPABILITIES_COMMAND)
        + ctl.encode_command("query-status", id=1)
        + b'{"execute":"query-windows","arguments":{"state":"evicted"},"id":[7, "x"]}'
        + b' {"execute":\n "b", "arguments": {"s": "}{\\"\\n"}}\r\n'
        + b"garbage line\n[1, 2]\n"
        + b'{"execute":"x","arguments":{"s":"unterminated\n'
        + b"[" * 40
        + b"]" * 40
        + b"\n"
    )
    replies = (
        ctl.encode_greeting({"qemu": {"major": 9}}, [])
        + ctl.encode_return({})
        + ctl.encode_return([1, {"a": None}], id=1)
        + ctl.encode_error(ctl.ErrorReply(ctl.GENERIC_ERROR, "bad", 2))
        + ctl.encode_event("LEASE_REVOKED", {"lease": 1}, 1.5)
        + b"\r\n\n"
    )
    return {
        "server-small-limit": make_input(0, session + b"{" + b" " * 600, cuts=[30, 100]),
        "server-negotiation": make_input(1, session, eof=True, cuts=[3, 50, 7, 80]),
        "server-negotiated": make_input(2, session[31:]),
        "client-replies": make_input(3, replies, cuts=[40, 10, 90], eof=True),
    }


def xen_seeds() -> dict[str, bytes]:
    slots = b"".join(
        xen.encode_ioreq(xen.IoReq(addr, data, count, size, 3, 1, ptr, dir_, False, type_))
        for addr, data, count, size, ptr, dir_, type_ in [
            (0xFEB00000, 0, 1, 4, False, 1, 1),
            (0xFEB00008, 0x1122334455667788, 1, 8, False, 0, 1),
            (0xCFC, 0, 1, 2, False, 1, 0),
            (xen.encode_pci_config_addr(0, 0, 3, 0, 0x10), 0, 1, 4, False, 1, 2),
            (0x1000, 0x7000, 4, 4, True, 0, 1),
            (0, 0, 0, 0, False, 0, 8),
        ]
    )

    def ring(start: int) -> bytes:
        page = bytearray(xen.PAGE_SIZE)
        struct.pack_into("<II", page, 0, start, start)
        for addr, size, data, type_ in [
            (0xA0000, 1, 0x41, xen.IoreqType.COPY),
            (0xA0002, 2, 0x4142, xen.IoreqType.COPY),
            (0xA0004, 4, 0x41424344, xen.IoreqType.COPY),
            (0xA0008, 8, 0x4142434445464748, xen.IoreqType.COPY),
            (0x70, 1, 0x0A, xen.IoreqType.PIO),
            (0, 8, 0x1234, xen.IoreqType.TIMEOFFSET),
        ]:
            assert xen.post_buffered_write(page, addr, size, data, type=type_)
        return bytes(page).rstrip(b"\0")

    return {
        "sync-page": bytes([0]) + slots,
        "buffered-ring": bytes([1, 0]) + ring(0),
        # Near the wrap of slot numbers (pointer % 511), so that the entries wrap too.
        "buffered-ring-wraps": bytes([1, 1]) + ring(505),
    }


SEEDS = {
    "vfio_user": vfio_user_seeds,
    "lease": lease_seeds,
    "control": control_seeds,
    "xen": xen_seeds,
}


def main() -> None:
    for target, make in SEEDS.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("seed-*"):
            old.unlink()
        for name, data in make().items():
            (folder / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(list(folder.iterdir()))} files")


if __name__ == "__main__":
    main()
