"""The device model as a separate process, driven over its real unix socket."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devmodel.testing import ErrorReplyReceived, StallingLender, VfioUserClient
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from tests.integration.launching import DevmodelProcess, start_devmodel
from tests.libvfio_user import raw_exchange, read_raw_reply, recv_exactly

APERTURE = 256 << 20


def test_attach_sequence_describes_the_device(devmodel: DevmodelProcess, transport: str) -> None:
    with VfioUserClient(devmodel.socket_path) as client:
        seen = client.attach()
    version = seen["version"]
    assert (version.major, version.minor) == (0, 0)
    assert version.capabilities.max_msg_fds <= 16
    info = seen["info"]
    assert info.flags == c.DEVICE_FLAGS_PCI | c.DEVICE_FLAGS_RESET
    # Expected difference 1 (README, "Choosing a transport"): libvfio-user counts its
    # migration region (index 9, size 0) among the device's regions.
    regions = 10 if transport == "libvfio-user" else 9
    assert (info.num_regions, info.num_irqs) == (regions, 5)
    bar0 = seen["regions"][0]
    assert bar0.size == APERTURE
    # Never MMAP: a vfio-user mapping cannot be revoked.
    assert not bar0.flags & c.REGION_INFO_FLAG_MMAP
    assert bar0.flags & c.REGION_INFO_FLAG_READ and bar0.flags & c.REGION_INFO_FLAG_WRITE
    assert seen["regions"][1].size == 0  # upper half of the 64-bit BAR0
    assert seen["regions"][2].size == 4096
    assert seen["regions"][7].size >= 256
    config = seen["config"]
    assert struct.unpack_from("<HH", config, 0) == (0x1234, 0x10E5)
    bar0_low = struct.unpack_from("<I", config, 0x10)[0]
    assert bar0_low & 0x7 == 0x4  # memory, 64-bit
    assert bar0_low & 0x8  # prefetchable


@pytest.mark.devmodel_args("--pci-id", "abcd:0123", "--aperture-size", "64M")
def test_options_reach_the_guest(devmodel: DevmodelProcess) -> None:
    with VfioUserClient(devmodel.socket_path) as client:
        seen = client.attach()
    assert struct.unpack_from("<HH", seen["config"], 0) == (0xABCD, 0x0123)
    assert seen["regions"][0].size == 64 << 20


def test_tight_loop_of_8_byte_reads_and_writes(devmodel: DevmodelProcess) -> None:
    rng = random.Random(1)
    model: dict[int, bytes] = {}
    with VfioUserClient(devmodel.socket_path) as client:
        client.attach()
        for _ in range(3000):
            offset = rng.randrange(APERTURE // 8) * 8
            if rng.random() < 0.5:
                data = rng.randbytes(8)
                client.write(0, offset, data)
                model[offset] = data
            else:
                assert client.read(0, offset, 8) == model.get(offset, bytes(8))
        for offset, data in model.items():
            assert client.read(0, offset, 8) == data


def test_every_access_size_at_natural_alignment(devmodel: DevmodelProcess) -> None:
    with VfioUserClient(devmodel.socket_path) as client:
        client.attach()
        base = APERTURE - 64
        for size in (1, 2, 4, 8):
            for i in range(0, 16, size):
                client.write(0, base + i, bytes((base + i + k) & 0xFF for k in range(size)))
            for probe in (1, 2, 4, 8):
                for i in range(0, 16, probe):
                    got = client.read(0, base + i, probe)
                    assert got == bytes((base + i + k) & 0xFF for k in range(probe))


@pytest.mark.parametrize(
    ("offset", "count", "region"),
    [
        (1, 8, 0),  # unaligned
        (2, 4, 0),  # unaligned
        (0, 3, 0),  # odd size
        (0, 16, 0),  # larger than a trapped access
        (APERTURE, 4, 0),  # just past the end
        (APERTURE - 4, 8, 0),  # crosses the end (and unaligned for 8)
        (1 << 62, 8, 0),  # far outside
        (0, 4, 6),  # no ROM
        (0, 4, 8),  # no VGA
        (0, 4, 9),  # no such region
        (0, 4, 4),  # absent BAR
    ],
)
def test_bad_accesses_get_an_error_and_the_stream_survives(
    devmodel: DevmodelProcess, transport: str, offset: int, count: int, region: int
) -> None:
    with VfioUserClient(devmodel.socket_path) as client:
        client.attach()
        client.write(0, 0, b"\x11" * 8)
        if transport == "libvfio-user" and region == 0 and offset + count <= APERTURE:
            # Expected difference 2: an access inside the region that devmodel refuses
            # (unaligned, odd or oversized) is answered by libvfio-user with an error reply
            # that still carries the access's header (offset, region, count) as its payload.
            head = struct.pack("<QII", offset, region, count)
            for msg_id, command, body in (
                (900, c.Command.REGION_READ, head),
                (901, c.Command.REGION_WRITE, head + bytes(count)),
            ):
                rid, flags, err, payload = raw_exchange(client.sock, msg_id, command, body)
                assert (rid, flags, err) == (msg_id, 0x21, errno.EINVAL)  # reply + error bit
                assert payload[:16] == head
        else:
            with pytest.raises(ErrorReplyReceived) as info:
                client.read(region, offset, count)
            assert info.value.reply.errno in (errno.EINVAL, errno.EFAULT)
            with pytest.raises(ErrorReplyReceived):
                client.write(region, offset, bytes(count))
        # A posted bad write gets no reply at all: the next reply must be for the next read.
        client.posted_write(region, offset, bytes(count))
        assert client.read(0, 0, 8) == b"\x11" * 8


def test_count_zero_and_oversized_requests(devmodel: DevmodelProcess, transport: str) -> None:
    with VfioUserClient(devmodel.socket_path) as client:
        client.attach()
        if transport == "libvfio-user":
            # Expected difference 3: libvfio-user answers a count-0 read with success and no
            # payload at all, and an oversized one with EINVAL (not E2BIG).
            assert raw_exchange(client.sock, 500, 9, struct.pack("<QII", 0, 0, 0)) == (
                500, 0x1, 0, b"",
            )  # fmt: skip
            big = raw_exchange(client.sock, 501, 9, struct.pack("<QII", 0, 0, 8 << 20))
            assert big == (501, 0x21, errno.EINVAL, b"")
            assert client.read(0, 0, 4) == bytes(4)
            return
        header = struct.pack("<HHIII", 500, 9, 32, 0, 0)
        client.send_raw(header + struct.pack("<QII", 0, 0, 0))
        reply = client.conn  # the raw reply must be an error for msg 500
        client.conn._pending[500] = 9  # we bypassed the connection; tell it what we asked
        err = client.receive()
        assert isinstance(err, ev.ErrorReply) and err.msg_id == 500 and err.errno == errno.EINVAL
        client.conn._pending[501] = 9
        client.send_raw(
            struct.pack("<HHIII", 501, 9, 32, 0, 0) + struct.pack("<QII", 0, 0, 8 << 20)
        )
        err = client.receive()
        assert isinstance(err, ev.ErrorReply) and err.errno == errno.E2BIG
        assert reply is client.conn
        assert client.read(0, 0, 4) == bytes(4)


def test_posted_writes_are_never_answered(devmodel: DevmodelProcess) -> None:
    with VfioUserClient(devmodel.socket_path) as client:
        client.attach()
        for i in range(2000):
            client.posted_write(0, (i % 512) * 8, struct.pack("<Q", i))
        # If any posted write had been answered, this reply would not match.
        assert struct.unpack("<Q", client.read(0, (1999 % 512) * 8, 8))[0] == 1999


def test_a_stream_sent_in_one_piece_is_served_in_order(devmodel: DevmodelProcess) -> None:
    """Posted writes, reads, a config read and BAR2 writes back to back in one send, as QEMU
    queues a guest's stores: each read sees exactly the writes sent before it (the
    libvfio-user transport plans a whole batch per peek at its socket; the native server reads
    a whole buffer), and the replies come in order."""
    with VfioUserClient(devmodel.socket_path) as client:
        client.attach()
        stream = bytearray()
        reads: list[tuple[int, int | None]] = []  # (msg id, the value it must see)

        def send(event: ev.Event) -> None:
            stream.extend(client.conn.send(event).data)

        def read(offset: int, expect: int | None) -> None:
            msg_id = client.next_id()
            send(ev.RegionRead(msg_id, offset, 0, 8))
            reads.append((msg_id, expect))

        for i in range(300):
            slot = (i % 16) * 8
            send(ev.RegionWrite(client.next_id(), slot, 0, struct.pack("<Q", i), no_reply=True))
            if i % 50 == 49:
                read(slot, i)
                read((i % 16 + 1) * 8, None if i < 16 else i - 15)
                msg_id = client.next_id()
                send(ev.RegionRead(msg_id, 0, c.PciRegion.CONFIG, 4))
                reads.append((msg_id, -1))
        client.send_raw(bytes(stream))
        for msg_id, expect in reads:
            reply = client.receive()
            assert isinstance(reply, ev.RegionReadReply) and reply.msg_id == msg_id, reply
            if expect == -1:
                assert struct.unpack("<HH", reply.data) == (0x1234, 0x10E5)
            elif expect is not None:
                assert struct.unpack("<Q", reply.data)[0] == expect, (msg_id, expect)
        for k in range(16):
            last = max(i for i in range(300) if i % 16 == k)
            assert struct.unpack("<Q", client.read(0, k * 8, 8))[0] == last


def test_write_multi_applies_every_entry(devmodel: DevmodelProcess, transport: str) -> None:
    with VfioUserClient(devmodel.socket_path) as client:
        client.attach()
        writes = tuple(ev.WriteEntry(i * 8, 0, struct.pack("<Q", i * 3)) for i in range(200))
        if transport == "libvfio-user":
            # Expected difference 4: Debian's libvfio-user has no REGION_WRITE_MULTI (EINVAL).
            with pytest.raises(ErrorReplyReceived) as info:
                client.request(ev.RegionWriteMulti(client.next_id(), writes))
            assert info.value.reply.errno == errno.EINVAL
            assert client.read(0, 0, 8) == bytes(8)
            return
        reply = client.request(ev.RegionWriteMulti(client.next_id(), writes))
        assert isinstance(reply, ev.RegionWriteMultiReply) and reply.wr_cnt == 200
        client.send(ev.RegionWriteMulti(client.next_id(), writes[:3], no_reply=True))
        for i in (0, 100, 199):
            assert struct.unpack("<Q", client.read(0, i * 8, 8))[0] == i * 3


def test_fds_are_kept_while_mapped_and_closed_on_unmap_and_disconnect(
    devmodel: DevmodelProcess, transport: str
) -> None:
    baseline = devmodel.settled_fds()
    with VfioUserClient(devmodel.socket_path) as client:
        client.attach()
        connected = devmodel.open_fds()
        memfd = os.memfd_create("guest-ram")
        os.ftruncate(memfd, 1 << 20)
        client.request(ev.DmaMap(client.next_id(), 3, 0, 0x100000, 1 << 20, memfd))
        os.close(memfd)
        assert devmodel.open_fds() == connected + 1
        with pytest.raises(ErrorReplyReceived) as info:
            client.request(ev.DmaMap(client.next_id(), 3, 0, 0x100000, 4096, None))
        # Expected difference 5: an overlapping DMA_MAP is EINVAL from libvfio-user.
        assert info.value.reply.errno == (
            errno.EINVAL if transport == "libvfio-user" else errno.EEXIST
        )
        client.request(ev.DmaUnmap(client.next_id(), 0, 0x100000, 1 << 20))
        assert devmodel.open_fds() == connected
        efd = os.eventfd(0)
        flags = c.IRQ_SET_DATA_EVENTFD | c.IRQ_SET_ACTION_TRIGGER
        client.request(ev.DeviceSetIrqs(client.next_id(), flags, c.PciIrq.INTX, 0, 1, fds=(efd,)))
        os.close(efd)
        memfd = os.memfd_create("more-ram")
        client.request(ev.DmaMap(client.next_id(), 3, 0, 0x200000, 4096, memfd))
        os.close(memfd)
        assert devmodel.open_fds() == connected + 2
    # Disconnect closes the eventfd and the DMA fd the client left behind.
    for _ in range(100):
        if devmodel.open_fds() == baseline:
            break
        time.sleep(0.02)
    assert devmodel.open_fds() == baseline


def test_malformed_framing_drops_the_client_but_not_the_server(
    devmodel: DevmodelProcess, transport: str
) -> None:
    with VfioUserClient(devmodel.socket_path) as client:
        client.attach()
        if transport == "libvfio-user":
            # Expected difference 6: libvfio-user answers a header it cannot use with an
            # error reply (EINVAL) and keeps the client; here the bad message (type 7) and
            # then its 16 payload bytes read as a header of size 0: two error replies.
            client.sock.sendall(struct.pack("<HHIII", 1, 9, 32, 0x7, 0) + bytes(16))
            error = struct.pack("<HHIII", 1, 9, 16, 0x21, errno.EINVAL)
            assert recv_exactly(client.sock, 32) == error + struct.pack(
                "<HHIII", 0, 0, 16, 0x21, errno.EINVAL
            )
        else:
            client.send_raw(struct.pack("<HHIII", 1, 9, 32, 0x7, 0) + bytes(16))  # type 7
            with pytest.raises((ConnectionError, OSError)):
                client.receive()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(devmodel.socket_path)
    raw.sendall(struct.pack("<HHIII", 1, 1, 8, 0, 0))  # size below the header
    assert raw.recv(100) == b""
    raw.close()
    with VfioUserClient(devmodel.socket_path) as client:
        client.attach()
        client.write(0, 8, b"alive!!!")
        assert client.read(0, 8, 8) == b"alive!!!"
    assert devmodel.proc.poll() is None


def test_clients_after_the_first_leave_the_process_as_they_found_it(
    devmodel: DevmodelProcess,
) -> None:
    """Fds and mappings after a client has gone are what they were after the first one had:
    nothing grows per client. (The first one may cost something once: over libvfio-user its
    worker thread leaves glibc's cached thread stack and a malloc arena mapped, 4 mappings;
    the random-revoke soak measures its census after a first client for that reason.)"""

    def census() -> tuple[int, int]:
        maps = Path(f"/proc/{devmodel.proc.pid}/maps").read_text().count("\n")
        return devmodel.open_fds(), maps

    def one_client(i: int) -> None:
        with VfioUserClient(devmodel.socket_path) as client:
            client.attach()
            for k in range(50):
                client.write(0, k * 8, struct.pack("<Q", i))
                assert struct.unpack("<Q", client.read(0, k * 8, 8))[0] == i

    def settled(expected: tuple[int, int] | None) -> tuple[int, int]:
        # The server notices a client's leaving on its own time: wait for the census to stop
        # changing (or to come back to `expected`), within a bound, never a timing assertion.
        deadline = time.monotonic() + 10
        last = census()
        while time.monotonic() < deadline and last != expected:
            time.sleep(0.1)
            now = census()
            if expected is None and now == last:
                break
            last = now
        return last

    one_client(0)
    first = settled(None)
    for i in range(1, 4):
        one_client(i)
        assert settled(first) == first, f"after client {i}"


def test_memory_persists_across_clients(devmodel: DevmodelProcess) -> None:
    with VfioUserClient(devmodel.socket_path) as client:
        client.attach()
        client.write(0, 4096, b"persist!")
    with VfioUserClient(devmodel.socket_path) as client:
        client.attach()
        assert client.read(0, 4096, 8) == b"persist!"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_stop_signals_exit_zero_and_remove_the_socket(
    tmp_path: Path, sig: int, transport: str
) -> None:
    dm = start_devmodel(tmp_path, transport=transport)
    with VfioUserClient(dm.socket_path) as client:
        client.attach()
        assert dm.stop(sig) == 0
    assert not os.path.exists(dm.socket_path)


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path: Path, transport: str) -> None:
    stale = tmp_path / "dev.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # leaves the file, nobody listening
    dm = start_devmodel(tmp_path, transport=transport)
    try:
        argv = [sys.executable, "-m", "devmodel", "run", "--socket-path", dm.socket_path]
        second = subprocess.run(
            [*argv, "--transport", transport],
            capture_output=True,
            check=False,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1, second.stderr
        assert "another process is serving" in second.stderr
    finally:
        status = dm.stop()
        assert status == 0, dm.stderr()


@pytest.mark.parametrize(
    "args",
    [
        ["--aperture-size", "3M"],
        ["--aperture-size", "lots"],
        ["--pci-id", "12345"],
        ["--granule", "8K"],
        [],
    ],
)
def test_bad_options_exit_2_with_one_clear_line(tmp_path: Path, args: list[str]) -> None:
    extra = ["--socket-path", str(tmp_path / "x.sock")] if args else []
    done = subprocess.run(
        [sys.executable, "-m", "devmodel", "run", *extra, *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("devmodel run: error:")


@contextlib.contextmanager
def stalling_lender(
    tmp_path: Path, transport: str, *, page_in_timeout: str
) -> Iterator[tuple[StallingLender, DevmodelProcess]]:
    """devmodel (16M aperture) borrowing from a lender that evicted window 1 and never answers
    its page-in; yields once the eviction happened."""
    lender = StallingLender(tmp_path / "lender.sock", evict=(1,))
    try:
        dm = start_devmodel(
            tmp_path,
            "--aperture-size",
            "16M",
            "--lender-socket",
            str(tmp_path / "lender.sock"),
            "--page-in-timeout",
            page_in_timeout,
            transport=transport,
        )
        assert lender.evicted.wait(10)
        yield lender, dm
    finally:
        lender.close()


def test_graceful_stop_answers_what_the_client_already_sent(
    tmp_path: Path, transport: str
) -> None:
    """QEMU 11.1 aborts when the socket is reset under it (unread requests at close), and a
    vCPU whose request was taken but not answered waits out the whole reply timeout. So a stop
    that lands while a request waits (here: on a page-in the lender never answers) must answer
    that request, and the ones queued behind it, and close cleanly: EOF, not ECONNRESET."""
    with stalling_lender(tmp_path, transport, page_in_timeout="4") as (lender, dm):
        with VfioUserClient(dm.socket_path) as client:
            client.attach()
            client.write(0, 0, b"12345678")
            stuck = client.next_id()
            client.send(ev.RegionRead(stuck, 2 << 20, 0, 8))  # window 1: evicted, never paged in
            queued = []
            for _ in range(20):
                queued.append(client.next_id())
                client.send(ev.RegionRead(queued[-1], 0, 0, 8))
            while not lender.page_ins:
                time.sleep(0.01)
            os.kill(dm.proc.pid, signal.SIGTERM)
            if transport == "libvfio-user":
                # Expected difference 2 again: the error reply carries the read's header.
                rid, flags, err, _ = read_raw_reply(client.sock)
                assert (rid, flags, err) == (stuck, 0x21, errno.EIO)
            else:
                first = client.receive()
                assert isinstance(first, ev.ErrorReply) and first.msg_id == stuck
            # An error reply: the stop answered it. The page-in deadline would have given the
            # failure policy's all-ones data instead (--failure-policy's default).
            answered = []
            with pytest.raises(ConnectionError) as end:
                while True:
                    reply = client.receive()
                    assert isinstance(reply, ev.RegionReadReply), reply
                    assert reply.data == b"12345678"
                    answered.append(reply.msg_id)
            assert not isinstance(end.value, ConnectionResetError)
            assert answered == queued, dm.stderr()
        assert dm.proc.wait(10) == 0


def test_unanswered_page_in_gets_the_failure_policy_and_the_device_goes_on(
    tmp_path: Path, transport: str
) -> None:
    """A fault the lender never answers ends at the page-in deadline in the failure policy's
    answer (all-ones), and the device then serves as before. Under libvfio-user the read waits
    in the worker thread while the trio thread runs the lender link and the deadline."""
    with stalling_lender(tmp_path, transport, page_in_timeout="1") as (lender, dm):
        with VfioUserClient(dm.socket_path) as client:
            client.attach()
            client.write(0, 0, b"resident")
            assert client.read(0, 2 << 20, 8) == b"\xff" * 8  # window 1: never paged in
            assert lender.page_ins
            assert client.read(0, 0, 8) == b"resident"
            # BAR2's failed-access counter (devmodel/pci/registers.py) saw it.
            assert client.read_u64(2, 0x48) == 1
        assert dm.stop() == 0
