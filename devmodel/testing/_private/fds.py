"""File descriptors for tests: sealed memfds to lend, and looks at what a process holds open.

Everything here reads this process's own /proc/self: which fds are open, which memfds they
name, and what is mapped, so a test can check that revoked memory is really gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable

# Linux fcntl numbers (stdlib names exist on Linux, but not in every typeshed).
F_ADD_SEALS: int = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SHRINK: int = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW: int = getattr(fcntl, "F_SEAL_GROW", 0x0004)
F_SEAL_WRITE: int = getattr(fcntl, "F_SEAL_WRITE", 0x0008)
F_SEAL_FUTURE_WRITE = 0x0010


def memfd(
    size: int,
    name: str = "lease-test",
    *,
    seals: int = F_SEAL_SHRINK,
    fill: bytes = b"",
) -> int:
    """A memfd of `size` bytes starting with `fill`, carrying `seals` (0: none)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if fill:
            assert os.pwrite(fd, fill, 0) == len(fill)
        if seals:
            fcntl.fcntl(fd, F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sealed_memfd(size: int, name: str = "test-lender", *, seal: bool = True) -> int:
    """A memfd a lender may grant: its size sealed both ways (or not at all, `seal=False`)."""
    return memfd(size, name, seals=F_SEAL_SHRINK | F_SEAL_GROW if seal else 0)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> set[int]:
    """Every fd this process has open."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def _fds_whose_target(matches: Callable[[str], bool]) -> list[int]:
    found = []
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if matches(os.readlink(f"/proc/self/fd/{entry}")):
                found.append(int(entry))
    return found


def fds_naming(text: str) -> list[int]:
    """This process's fds whose target mentions `text` (a memfd shows as "/memfd:NAME")."""
    return _fds_whose_target(lambda target: text in target)


def fds_of_memfd(name: str) -> list[int]:
    """This process's fds that refer to a memfd called `name`."""
    return _fds_whose_target(lambda target: target.startswith(f"/memfd:{name} "))


def mapped(text: str) -> bool:
    """Whether any mapping of this process mentions `text` in /proc/self/maps."""
    with open("/proc/self/maps") as maps:
        return any(text in line for line in maps)


def memfd_is_mapped(name: str) -> bool:
    return mapped(f"/memfd:{name} ")


def file_key(fd: int) -> tuple[int, int, int]:
    """What FdStore de-duplicates on: (device, inode, access mode)."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
