"""What a kernel with udmabuf does, as the dma-buf lease code relies on it.

These run where /dev/udmabuf exists: in the udmabuf VM (tests/udmabuf/conftest.py boots it
when this host has no udmabuf) or on a host that has it. Each one states a fact of Linux's
udmabuf and dma-buf uAPI (include/uapi/linux/udmabuf.h, dma-buf.h) that devmodel and the
reference lender build on, so that a kernel that behaves otherwise fails here first, with the
fact in the test's name rather than deep inside a lease test.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.udmabuf

UDMABUF = "/dev/udmabuf"
PAGE = mmap.PAGESIZE
SIZE = 4 * PAGE


def _iow(kind: str, nr: int, size: int) -> int:
    """_IOW() of asm-generic/ioctl.h: direction write (1) << 30, size << 16, type << 8, nr."""
    return (1 << 30) | (size << 16) | (ord(kind) << 8) | nr


# struct udmabuf_create { __u32 memfd; __u32 flags; __u64 offset; __u64 size; }
UDMABUF_CREATE_FMT = "=IIQQ"
UDMABUF_CREATE = _iow("u", 0x42, struct.calcsize(UDMABUF_CREATE_FMT))
UDMABUF_FLAGS_CLOEXEC = 0x01
# struct dma_buf_sync { __u64 flags; }
DMA_BUF_IOCTL_SYNC = _iow("b", 0, 8)
DMA_BUF_SYNC_READ = 1 << 0
DMA_BUF_SYNC_WRITE = 2 << 0
DMA_BUF_SYNC_RW = DMA_BUF_SYNC_READ | DMA_BUF_SYNC_WRITE
DMA_BUF_SYNC_START = 0 << 2
DMA_BUF_SYNC_END = 1 << 2


def test_ioctl_numbers_are_the_kernel_headers() -> None:
    """The two request numbers as include/uapi/linux/{udmabuf,dma-buf}.h define them."""
    assert UDMABUF_CREATE == 0x40187542
    assert DMA_BUF_IOCTL_SYNC == 0x40086200


@pytest.fixture
def udmabuf_dev() -> Iterator[int]:
    """/dev/udmabuf, open; a missing device is a failure here, never a skip."""
    fd = os.open(UDMABUF, os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def sealed_memfd(size: int = SIZE, seals: int = fcntl.F_SEAL_SHRINK,
                 fill: bytes | None = None) -> int:
    """A memfd of `size` bytes holding `fill` (a repeated pattern by default) with `seals`."""
    fd = os.memfd_create("udmabuf-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    data = fill if fill is not None else bytes(i % 251 for i in range(size))
    os.pwrite(fd, data, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def create(dev: int, memfd: int, offset: int = 0, size: int = SIZE) -> int:
    """UDMABUF_CREATE: the new dma-buf's fd, the ioctl's return value (which fcntl.ioctl
    returns only for a mutable buffer; for bytes it returns the buffer)."""
    arg = bytearray(struct.pack(UDMABUF_CREATE_FMT, memfd, UDMABUF_FLAGS_CLOEXEC, offset, size))
    fd: int = fcntl.ioctl(dev, UDMABUF_CREATE, arg, True)
    return fd


def sync(dmabuf: int, flags: int) -> None:
    fcntl.ioctl(dmabuf, DMA_BUF_IOCTL_SYNC, struct.pack("=Q", flags))


def fdinfo(fd: int) -> dict[str, str]:
    text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":")
                                                  for line in text.splitlines())}


def test_dev_udmabuf_is_the_misc_character_device() -> None:
    st = os.stat(UDMABUF)
    assert (st.st_mode & 0o170000) == 0o020000, "not a character device"
    assert os.major(st.st_rdev) == 10, "not a misc device"


def test_create_from_a_memfd_sealed_against_shrinking(udmabuf_dev: int) -> None:
    memfd = sealed_memfd()
    try:
        dmabuf = create(udmabuf_dev, memfd)
    finally:
        os.close(memfd)
    try:
        assert dmabuf >= 0
        assert fcntl.fcntl(dmabuf, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(dmabuf)


def test_mmap_sees_the_memfds_bytes_both_ways(udmabuf_dev: int) -> None:
    """The dma-buf's pages are the memfd's: written through either, read through the other."""
    memfd = sealed_memfd()
    dmabuf = create(udmabuf_dev, memfd)
    try:
        with mmap.mmap(dmabuf, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            sync(dmabuf, DMA_BUF_SYNC_START | DMA_BUF_SYNC_RW)
            assert m[:] == os.pread(memfd, SIZE, 0)
            m[PAGE:PAGE + 5] = b"hello"
            sync(dmabuf, DMA_BUF_SYNC_END | DMA_BUF_SYNC_RW)
            assert os.pread(memfd, 5, PAGE) == b"hello"
            os.pwrite(memfd, b"world", 3 * PAGE)
            sync(dmabuf, DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ)
            assert m[3 * PAGE:3 * PAGE + 5] == b"world"
            sync(dmabuf, DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ)
    finally:
        os.close(dmabuf)
        os.close(memfd)


def test_a_range_of_the_memfd_maps_from_its_offset(udmabuf_dev: int) -> None:
    memfd = sealed_memfd()
    dmabuf = create(udmabuf_dev, memfd, offset=2 * PAGE, size=PAGE)
    try:
        assert os.lseek(dmabuf, 0, os.SEEK_END) == PAGE
        with mmap.mmap(dmabuf, PAGE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:] == os.pread(memfd, PAGE, 2 * PAGE)
    finally:
        os.close(dmabuf)
        os.close(memfd)


def test_the_pages_outlive_the_memfd(udmabuf_dev: int) -> None:
    """Once created, the dma-buf holds the pages: closing the memfd changes nothing."""
    memfd = sealed_memfd(fill=b"\xa5" * SIZE)
    dmabuf = create(udmabuf_dev, memfd)
    os.close(memfd)
    try:
        with mmap.mmap(dmabuf, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:] == b"\xa5" * SIZE
    finally:
        os.close(dmabuf)


@pytest.mark.parametrize("direction", [DMA_BUF_SYNC_READ, DMA_BUF_SYNC_WRITE, DMA_BUF_SYNC_RW],
                         ids=["read", "write", "rw"])
def test_sync_start_then_end_is_accepted(udmabuf_dev: int, direction: int) -> None:
    memfd = sealed_memfd()
    dmabuf = create(udmabuf_dev, memfd)
    try:
        for _ in range(2):
            sync(dmabuf, DMA_BUF_SYNC_START | direction)
            sync(dmabuf, DMA_BUF_SYNC_END | direction)
    finally:
        os.close(dmabuf)
        os.close(memfd)


def test_sync_end_before_any_start_is_refused(udmabuf_dev: int) -> None:
    """udmabuf builds its scatter list at the first START: an END before it is EINVAL, so a
    bracket must always begin with START (a borrower that ENDs on an error path must know)."""
    memfd = sealed_memfd()
    dmabuf = create(udmabuf_dev, memfd)
    try:
        with pytest.raises(OSError) as exc:
            sync(dmabuf, DMA_BUF_SYNC_END | DMA_BUF_SYNC_RW)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(dmabuf)
        os.close(memfd)


def test_sync_without_a_direction_is_refused(udmabuf_dev: int) -> None:
    """Neither READ nor WRITE: EINVAL (the kernel checks the flags, so a typo cannot pass)."""
    memfd = sealed_memfd()
    dmabuf = create(udmabuf_dev, memfd)
    try:
        with pytest.raises(OSError) as exc:
            sync(dmabuf, DMA_BUF_SYNC_START)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(dmabuf)
        os.close(memfd)


def test_lseek_to_the_end_gives_the_size(udmabuf_dev: int) -> None:
    memfd = sealed_memfd()
    dmabuf = create(udmabuf_dev, memfd)
    try:
        assert os.lseek(dmabuf, 0, os.SEEK_END) == SIZE
        assert os.lseek(dmabuf, 0, os.SEEK_SET) == 0
    finally:
        os.close(dmabuf)
        os.close(memfd)


def test_fdinfo_names_the_exporter_udmabuf(udmabuf_dev: int) -> None:
    memfd = sealed_memfd()
    dmabuf = create(udmabuf_dev, memfd)
    try:
        info = fdinfo(dmabuf)
        assert info.get("exp_name") == "udmabuf", info
        assert int(info["size"]) == SIZE
    finally:
        os.close(dmabuf)
        os.close(memfd)


def test_a_memfd_without_the_shrink_seal_is_refused(udmabuf_dev: int) -> None:
    memfd = sealed_memfd(seals=0)
    try:
        with pytest.raises(OSError) as exc:
            create(udmabuf_dev, memfd)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(memfd)


def test_a_memfd_sealed_against_writes_is_refused(udmabuf_dev: int) -> None:
    """F_SEAL_WRITE is one seal a lender must not add to a memfd it will lend as a dma-buf."""
    memfd = sealed_memfd(seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE)
    try:
        with pytest.raises(OSError) as exc:
            create(udmabuf_dev, memfd)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(memfd)


def test_a_range_past_the_memfds_end_is_refused(udmabuf_dev: int) -> None:
    memfd = sealed_memfd()
    try:
        with pytest.raises(OSError) as exc:
            create(udmabuf_dev, memfd, offset=2 * PAGE, size=SIZE)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(memfd)


def test_a_private_mapping_is_refused(udmabuf_dev: int) -> None:
    """udmabuf maps only MAP_SHARED: a copy-on-write view of lent memory is never made."""
    memfd = sealed_memfd()
    dmabuf = create(udmabuf_dev, memfd)
    try:
        with pytest.raises(OSError) as exc:
            mmap.mmap(dmabuf, SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(dmabuf)
        os.close(memfd)
