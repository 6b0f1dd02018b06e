"""The kernel side of dma-buf leases, on a kernel with udmabuf (marker `udmabuf`).

What the pure-logic tests (tests/unit/test_lease_dmabuf.py) had to assume about the kernel:
UDMABUF_CREATE makes a dma-buf from a sealed memfd and refuses an unsealed or write-sealed
one; fdinfo names the exporter "udmabuf"; lseek(SEEK_END) gives the size; the buffer maps
shared at an offset and shows the memfd's pages; DMA_BUF_IOCTL_SYNC takes the flags devmodel
sends (and refuses bad ones with EINVAL, not ENOTTY: the ioctl number is right); and the
borrower's checks accept it as a dma-buf and refuse it as a memfd.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Iterator

import pytest

from devmodel.leases.dmabuf import (
    DMA_BUF_IOCTL_SYNC,
    DMA_BUF_SYNC_END,
    DMA_BUF_SYNC_READ,
    DMA_BUF_SYNC_RW,
    DMA_BUF_SYNC_START,
    DMA_BUF_SYNC_WRITE,
    DmabufMapping,
    dma_buf_sync,
    dmabuf_facts,
    dmabuf_size,
    exporter_name,
    udmabuf_create,
    udmabuf_missing,
)
from devmodel.leases.grant_checks import check_grant_fd
from devmodel.testing import F_ADD_SEALS, F_SEAL_SHRINK, F_SEAL_WRITE, memfd, pattern
from devmodel_wire.lease.constants import FdKind, NackReason

MISSING = udmabuf_missing()
pytestmark = [
    pytest.mark.udmabuf,
    pytest.mark.skipif(MISSING is not None, reason=f"needs udmabuf: {MISSING}"),
]

PAGE = 4096
SIZE = 16 * PAGE
RW = 3


@pytest.fixture
def heap() -> Iterator[int]:
    fd = memfd(SIZE, "lease-heap", fill=pattern(1, SIZE))
    yield fd
    os.close(fd)


def test_udmabuf_is_a_dma_buf_with_exporter_size_and_key(heap: int) -> None:
    buf = udmabuf_create(heap, 4 * PAGE, 8 * PAGE)
    try:
        assert exporter_name(buf) == "udmabuf"
        assert dmabuf_size(buf) == 8 * PAGE
        facts = dmabuf_facts(buf)
        assert facts is not None and facts.access_mode == os.O_RDWR
        assert fcntl.fcntl(buf, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.fstat(buf)  # the store's key comes from fstat
        dmabuf = FdKind.DMABUF
        assert check_grant_fd(buf, fd_offset=0, length=8 * PAGE, prot=RW, kind=dmabuf) is None
        assert check_grant_fd(
            buf, fd_offset=4 * PAGE, length=8 * PAGE, prot=RW, kind=FdKind.DMABUF
        ) is NackReason.FD_TOO_SMALL
        # Sent as a memfd, it is not one: no seals, not a regular file.
        assert check_grant_fd(buf, fd_offset=0, length=PAGE, prot=RW) in (
            NackReason.BAD_FD,
            NackReason.FD_NOT_SEALED,
        )
        # pread, devmodel's memfd path, does not work on a dma-buf: hence the mapping.
        with pytest.raises(OSError):
            os.pread(buf, 8, 0)
    finally:
        os.close(buf)


def test_udmabuf_refuses_unsealed_and_write_sealed_memfds() -> None:
    unsealed = memfd(SIZE, "udmabuf-unsealed", seals=0)
    write_sealed = memfd(SIZE, "udmabuf-wsealed", seals=F_SEAL_SHRINK | F_SEAL_WRITE)
    try:
        for fd in (unsealed, write_sealed):
            with pytest.raises(OSError) as info:
                os.close(udmabuf_create(fd, 0, SIZE))
            assert info.value.errno == errno.EINVAL
        fcntl.fcntl(unsealed, F_ADD_SEALS, F_SEAL_SHRINK)
        os.close(udmabuf_create(unsealed, 0, SIZE))
    finally:
        os.close(unsealed)
        os.close(write_sealed)


def test_mapping_shows_the_memfd_pages_both_ways_with_sync(heap: int) -> None:
    buf = udmabuf_create(heap, 0, SIZE)
    calls: list[int] = []

    def sync(fd: int, flags: int) -> None:
        calls.append(flags)
        dma_buf_sync(fd, flags)

    try:
        m = DmabufMapping(buf, 4 * PAGE, 2 * PAGE, RW, sync)
        try:
            expected = pattern(1, SIZE)[4 * PAGE + 8 : 4 * PAGE + 16]
            assert m.read(8, 8) == expected
            assert m.write(PAGE, b"through!") == 8
            assert os.pread(heap, 8, 5 * PAGE) == b"through!"
            os.pwrite(heap, b"from fd!", 4 * PAGE)
            assert m.read(0, 8) == b"from fd!"
            assert calls == [
                DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ,
                DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ,
                DMA_BUF_SYNC_START | DMA_BUF_SYNC_WRITE,
                DMA_BUF_SYNC_END | DMA_BUF_SYNC_WRITE,
                DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ,
                DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ,
            ]
            with open("/proc/self/maps") as maps:
                spans = [line for line in maps if "/dmabuf:" in line]
            assert len(spans) == 1
            lo, hi = (int(x, 16) for x in spans[0].split()[0].split("-"))
            assert hi - lo == 2 * PAGE  # only the granted range
        finally:
            m.close()
        with open("/proc/self/maps") as maps:
            assert not any("/dmabuf:" in line for line in maps)
    finally:
        os.close(buf)


def test_sync_ioctl_number_and_flags(heap: int) -> None:
    buf = udmabuf_create(heap, 0, SIZE)
    try:
        for flags in (DMA_BUF_SYNC_READ, DMA_BUF_SYNC_WRITE, DMA_BUF_SYNC_RW):
            dma_buf_sync(buf, DMA_BUF_SYNC_START | flags)
            dma_buf_sync(buf, DMA_BUF_SYNC_END | flags)
        with pytest.raises(OSError) as info:
            dma_buf_sync(buf, 0x80)  # an undefined flag: the kernel's EINVAL, not ENOTTY
        assert info.value.errno == errno.EINVAL
        # The same ioctl on a memfd is not a dma-buf's: ENOTTY.
        with pytest.raises(OSError) as info:
            fcntl.ioctl(heap, DMA_BUF_IOCTL_SYNC, bytes(8))
        assert info.value.errno == errno.ENOTTY
    finally:
        os.close(buf)


def test_a_private_mapping_is_refused(heap: int) -> None:
    # udmabuf maps only MAP_SHARED: devmodel never asks for anything else.
    buf = udmabuf_create(heap, 0, SIZE)
    try:
        with pytest.raises(OSError):
            mmap.mmap(buf, PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    finally:
        os.close(buf)
