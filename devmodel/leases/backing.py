"""The memory behind a lease: lender fds, validated, de-duplicated, read with pread/pwrite.

(dma-buf leases are the exception: a dma-buf cannot be read with pread, so the engine maps
each one; devmodel/leases/dmabuf.py says how it stays safe. The store keeps their fds all the
same, and checks them by their own rules.)

The engine never mmaps lender memory. A lender may shrink a memfd under us; an mmap would then
raise SIGBUS on the next access and kill the device model, while pread simply comes back short
(a lender bug we answer with the failure policy). No mapping also means that after REVOKED no
mapping of the lease can remain anywhere in the process, and that a million leases do not hit
the kernel's map-count limit. Leases backed by the same file share one kept fd.
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass

from devmodel.leases.dmabuf import DmabufSupport
from devmodel_wire.lease.checks import check_dmabuf_facts
from devmodel_wire.lease.constants import PROT_WRITE, FdKind, NackReason

# Linux fcntl numbers; the stdlib exposes them from 3.8 on Linux but typeshed may not.
F_GET_SEALS: int = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SHRINK: int = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_WRITE: int = getattr(fcntl, "F_SEAL_WRITE", 0x0008)
F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; the fcntl module does not export it
PAGE = 4096


FdKey = tuple[int, int, int]
"""What makes two fds the same memory for the store: (st_dev, st_ino, access mode)."""


class GrantRefused(Exception):
    def __init__(self, reason: NackReason, text: str) -> None:
        super().__init__(text)
        self.reason = reason


@dataclass(slots=True)
class _Kept:
    fd: int
    refs: int


class FdStore:
    """Keeps one fd per (file, access mode) with a reference count per lease."""

    def __init__(self, dmabuf: DmabufSupport | None = None) -> None:
        self._by_key: dict[tuple[int, int, int], _Kept] = {}
        self._key_of_fd: dict[int, tuple[int, int, int]] = {}
        self.dmabuf = dmabuf or DmabufSupport()

    def __len__(self) -> int:
        return len(self._by_key)

    def adopt(
        self,
        fd: int,
        fd_offset: int,
        length: int,
        prot: int,
        key: FdKey | None = None,
        kind: int = FdKind.MEMFD,
    ) -> int:
        """Validate `fd` for a lease and return the fd to use; `fd` is consumed either way.

        `key` says that the caller has validated `fd` for this lease already, at least as
        strictly as `_check` would (devmodel.leases.grant_checks.check_grant_fd_key, which the
        lender link runs on every GRANT): the store then asks the kernel nothing again.
        """
        if key is None:
            try:
                st = os.fstat(fd)
                mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            except OSError as exc:
                _close(fd)
                raise GrantRefused(NackReason.BAD_FD, f"fd is not usable: {exc.strerror}") from None
            if kind == FdKind.DMABUF:
                problem = self._check_dmabuf(fd, fd_offset, length, prot)
            else:
                problem = _check(fd, st, mode, fd_offset, length, prot)
            if problem is not None:
                _close(fd)
                raise problem
            key = (st.st_dev, st.st_ino, mode)
        kept = self._by_key.get(key)
        if kept is not None:
            _close(fd)
            kept.refs += 1
            return kept.fd
        self._by_key[key] = _Kept(fd, 1)
        self._key_of_fd[fd] = key
        return fd

    def _check_dmabuf(self, fd: int, fd_offset: int, length: int, prot: int) -> GrantRefused | None:
        facts = self.dmabuf.inspect(fd)
        if facts is None:
            return GrantRefused(NackReason.BAD_FD, "dma-buf fd cannot be inspected")
        reason = check_dmabuf_facts(
            facts, fd_offset=fd_offset, length=length, prot=prot, exporters=self.dmabuf.exporters
        )
        if reason is None:
            return None
        return GrantRefused(
            reason,
            f"dma-buf refused: exporter {facts.exporter!r}, size {facts.size}, "
            f"access mode {facts.access_mode} (accepted exporters: "
            f"{', '.join(sorted(self.dmabuf.exporters))})",
        )

    def release(self, fd: int) -> None:
        """Drop one lease's reference; the fd is closed with the last one."""
        key = self._key_of_fd.get(fd)
        if key is None:
            return
        kept = self._by_key[key]
        kept.refs -= 1
        if kept.refs == 0:
            del self._by_key[key]
            del self._key_of_fd[fd]
            _close(fd)

    def close_all(self) -> None:
        for kept in self._by_key.values():
            _close(kept.fd)
        self._by_key.clear()
        self._key_of_fd.clear()


def _check(
    fd: int, st: os.stat_result, mode: int, fd_offset: int, length: int, prot: int
) -> GrantRefused | None:
    if not stat.S_ISREG(st.st_mode):
        return GrantRefused(NackReason.BAD_FD, "fd is not a memory file (memfd or regular file)")
    if fd_offset % PAGE:
        return GrantRefused(NackReason.MISALIGNED, f"fd offset {fd_offset:#x} is not page aligned")
    if fd_offset + length > st.st_size:
        return GrantRefused(
            NackReason.FD_TOO_SMALL,
            f"fd holds {st.st_size:#x} bytes, the lease needs {fd_offset + length:#x}",
        )
    if mode == os.O_WRONLY or (prot & PROT_WRITE and mode != os.O_RDWR):
        return GrantRefused(NackReason.BAD_FD, "fd access mode does not allow the prot")
    try:
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        seals = None  # not a sealable file (a plain file): pread keeps us safe anyway
    if seals is not None and not seals & F_SEAL_SHRINK:
        return GrantRefused(NackReason.FD_NOT_SEALED, "memfd is not sealed against shrinking")
    if seals is not None and prot & PROT_WRITE and seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        # Every write would fail with EPERM (docs/lease-protocol.md 9.2: BAD_FD).
        return GrantRefused(NackReason.BAD_FD, "memfd is write-sealed, prot asks for write")
    return None


def _close(fd: int) -> None:
    # try/except, not contextlib.suppress: this runs on every GRANT of a kept file, inside
    # the fault that waits for it, and a suppress() is three more calls.
    try:  # noqa: SIM105
        os.close(fd)
    except OSError:
        pass
