"""dma-buf leases: the kernel interfaces they need, and the mapping devmodel serves one through.

A memfd lease is read with pread/pwrite (backing.py says why no mapping). A dma-buf has no
read or write file operations: its memory is reached only through mmap, and every CPU access
must be bracketed by DMA_BUF_IOCTL_SYNC (start, then end, each saying read or write) so that
the exporter can keep its caches and its device coherent. So a dma-buf lease is mapped, shared
and only over its granted range, for exactly as long as it is live, and `DmabufMapping` does
each trapped access as sync-start, one copy, sync-end.

The danger of a mapping is SIGBUS: if the exporter takes the pages away under it (a driver that
moves a buffer without a fault handler to follow it, a device unplugged), the next access kills
the process, and Python cannot catch it. devmodel does not try to survive that; it refuses to
map buffers whose exporter could do it. A grant's exporter must be in an allow-list
(`DMABUF_EXPORTERS`, by default only "udmabuf", whose buffers pin the memfd pages they were
made from for as long as the buffer lives: the fd devmodel holds keeps them). What that does
and does not protect is spelled out in docs/lease-protocol.md, section 5.1.

Everything the engine needs from the kernel for dma-bufs goes through `DmabufSupport`, so that
pure-logic tests can stand a memfd in for a dma-buf (its own inspector and sync function) and
check the bracketing and the unmapping without a kernel that has udmabuf.

Also here, because the reference lender, the benchmark and the udmabuf tests share it: making a
udmabuf from a sealed memfd (UDMABUF_CREATE on /dev/udmabuf).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from devmodel_wire.lease.checks import DMABUF_EXPORTERS, DmabufFacts
from devmodel_wire.lease.constants import PROT_WRITE

UDMABUF_DEVICE: Final = "/dev/udmabuf"


def _iow(kind: str, number: int, size: int) -> int:
    """Linux's _IOW(): direction write (1) << 30 | size << 16 | type << 8 | number."""
    return (1 << 30) | (size << 16) | (ord(kind) << 8) | number


_UDMABUF_CREATE_ARG: Final = struct.Struct("<IIQQ")
"""struct udmabuf_create: u32 memfd, u32 flags, u64 offset, u64 size."""
UDMABUF_CREATE: Final = _iow("u", 0x42, _UDMABUF_CREATE_ARG.size)
UDMABUF_FLAGS_CLOEXEC: Final = 0x01

_DMA_BUF_SYNC_ARG: Final = struct.Struct("<Q")
"""struct dma_buf_sync: u64 flags."""
DMA_BUF_IOCTL_SYNC: Final = _iow("b", 0, _DMA_BUF_SYNC_ARG.size)
DMA_BUF_SYNC_READ: Final = 1
DMA_BUF_SYNC_WRITE: Final = 2
DMA_BUF_SYNC_RW: Final = 3
DMA_BUF_SYNC_START: Final = 0
DMA_BUF_SYNC_END: Final = 4

# The four argument buffers an access uses, packed once: the access path packs nothing.
_SYNC_ARGS: Final = {
    flags: _DMA_BUF_SYNC_ARG.pack(flags)
    for flags in (
        DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ,
        DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ,
        DMA_BUF_SYNC_START | DMA_BUF_SYNC_WRITE,
        DMA_BUF_SYNC_END | DMA_BUF_SYNC_WRITE,
        DMA_BUF_SYNC_START | DMA_BUF_SYNC_RW,
        DMA_BUF_SYNC_END | DMA_BUF_SYNC_RW,
    )
}


# ---------------------------------------------------------------------------- kernel calls


def dma_buf_sync(fd: int, flags: int) -> None:
    """DMA_BUF_IOCTL_SYNC on `fd`; raises OSError (EINVAL for bad flags, or the exporter's
    error, e.g. EINTR or EAGAIN while it waits for its device)."""
    arg = _SYNC_ARGS.get(flags)
    fcntl.ioctl(fd, DMA_BUF_IOCTL_SYNC, arg if arg is not None else _DMA_BUF_SYNC_ARG.pack(flags))


def exporter_name(fd: int) -> str | None:
    """The dma-buf's exporter (`exp_name:` in /proc/self/fdinfo), None if the kernel shows none
    (not a dma-buf, or a kernel without dma-buf fdinfo)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key == "exp_name":
                    return value.strip()
    except OSError:
        return None
    return None


def dmabuf_size(fd: int) -> int | None:
    """The buffer's size: a dma-buf answers lseek(SEEK_END) with it (and allows nothing but
    SEEK_SET 0 and SEEK_END 0). None if the fd cannot seek."""
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        return None
    return size


def dmabuf_facts(fd: int) -> DmabufFacts | None:
    """What `check_dmabuf_facts` judges, asked of the kernel; None if `fd` is unusable."""
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        return None
    return DmabufFacts(exporter_name(fd), mode, dmabuf_size(fd))


def udmabuf_missing(device: str = UDMABUF_DEVICE) -> str | None:
    """Why no udmabuf can be made here, or None if /dev/udmabuf opens."""
    if not os.path.exists(device):
        return (
            f"{device} is missing: this kernel has no udmabuf driver "
            "(CONFIG_UDMABUF; try `modprobe udmabuf`)"
        )
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{device} cannot be opened: {exc.strerror}"
    os.close(fd)
    return None


def udmabuf_create(memfd: int, offset: int, size: int, *, device: str = UDMABUF_DEVICE) -> int:
    """A dma-buf (close-on-exec, read-write) of `size` bytes of `memfd` from `offset`.

    The kernel's conditions: `memfd` is a shmem memfd sealed with F_SEAL_SHRINK and not with
    F_SEAL_WRITE; `offset` and `size` are page multiples; `size` is at most the udmabuf
    module's `size_limit_mb` (64 MiB by default). The buffer pins the memfd's pages (it
    allocates the holes), so the memfd must not be hole-punched while the buffer lives:
    the buffer would keep the old pages. Raises OSError (ENOENT if there is no udmabuf).
    """
    dev = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        arg = bytearray(_UDMABUF_CREATE_ARG.pack(memfd, UDMABUF_FLAGS_CLOEXEC, offset, size))
        fd: int = fcntl.ioctl(dev, UDMABUF_CREATE, arg, True)
        return fd
    finally:
        os.close(dev)


# ---------------------------------------------------------------------------- serving

SyncFn = Callable[[int, int], None]
InspectFn = Callable[[int], DmabufFacts | None]


@dataclass(frozen=True, slots=True)
class DmabufSupport:
    """How the engine reaches dma-bufs: which exporters it accepts, how it asks the kernel
    about an fd, and the sync call. Tests replace `inspect` and `sync` to stand a memfd in
    for a dma-buf."""

    exporters: frozenset[str] = DMABUF_EXPORTERS
    inspect: InspectFn = dmabuf_facts
    sync: SyncFn = dma_buf_sync
    mapped: set[DmabufMapping] = field(default_factory=set, compare=False)
    """Every mapping this support made and has not closed: what the poison checks look at."""

    def map(self, fd: int, fd_offset: int, length: int, prot: int) -> DmabufMapping:
        """Map a granted range; raises OSError if the exporter refuses mmap."""
        mapping = DmabufMapping(fd, fd_offset, length, prot, self.sync)
        self.mapped.add(mapping)
        mapping.on_close = self.mapped.discard
        return mapping


class DmabufMapping:
    """One dma-buf lease's mapping: `[fd_offset, fd_offset + length)` of the buffer, shared.

    Every access is bracketed by the sync ioctl on the lease's fd. The mapping exists from the
    grant until `close()`, which the engine calls before it releases the fd and before the
    borrower answers REVOKED: after that, no page of the buffer is mapped in this process.
    """

    __slots__ = ("_map", "_sync", "fd", "fd_offset", "length", "on_close")

    def __init__(self, fd: int, fd_offset: int, length: int, prot: int, sync: SyncFn) -> None:
        mprot = mmap.PROT_READ | (mmap.PROT_WRITE if prot & PROT_WRITE else 0)
        # Python's mmap keeps a dup of `fd`; `close()` closes both that and the mapping.
        self._map: mmap.mmap | None = mmap.mmap(
            fd, length, flags=mmap.MAP_SHARED, prot=mprot, offset=fd_offset
        )
        self._sync = sync
        self.fd = fd
        self.fd_offset = fd_offset
        self.length = length
        self.on_close: Callable[[DmabufMapping], None] | None = None

    @property
    def closed(self) -> bool:
        return self._map is None

    def read(self, at: int, size: int) -> bytes:
        """`size` bytes from `at` (relative to the lease): short if past the lease's end.
        Raises OSError if a sync fails (the copy is not done then) or the mapping is closed."""
        m = self._map
        if m is None:
            raise OSError(9, "the dma-buf lease is unmapped")  # EBADF
        fd, sync = self.fd, self._sync
        sync(fd, DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ)
        try:
            return m[at : at + size]
        finally:
            sync(fd, DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ)

    def write(self, at: int, data: bytes) -> int:
        """Write `data` at `at`; returns how many bytes were written (0 past the lease's end)."""
        m = self._map
        if m is None:
            raise OSError(9, "the dma-buf lease is unmapped")
        end = at + len(data)
        if at < 0 or end > self.length:
            return 0
        fd, sync = self.fd, self._sync
        sync(fd, DMA_BUF_SYNC_START | DMA_BUF_SYNC_WRITE)
        try:
            m[at:end] = data
        finally:
            sync(fd, DMA_BUF_SYNC_END | DMA_BUF_SYNC_WRITE)
        return len(data)

    def close(self) -> None:
        """Unmap (and close the mapping's own dup of the fd); idempotent."""
        m, self._map = self._map, None
        if m is None:
            return
        m.close()
        if self.on_close is not None:
            self.on_close(self)
