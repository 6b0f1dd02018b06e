"""File descriptors over unix stream sockets (SCM_RIGHTS), written once for every user.

Both wire protocols pass fds: vfio-user (DMA maps, IRQ eventfds) and the lease protocol (the
memory a lender grants). The kernel's rules are the same for both, and getting one wrong loses
fds or leaks them, so every sender and receiver in the project (the transports, the lender link,
the reference lender, test clients and benchmarks) goes through these few functions:

- A receiver asks for room for more fds than any message carries, with MSG_CMSG_CLOEXEC so that
  a child process never inherits a lent buffer.
- If the kernel still had to drop some (MSG_CTRUNC), the ones that did arrive are closed and
  `FdsTruncated` is raised: a message whose fds went missing can only be misread, and every
  protocol here treats it as fatal for the connection.
- A sender attaches fds to the first `sendmsg` of a message only; the kernel delivers them with
  the first byte of that chunk, which is where both protocols expect them.

The functions work on any object with the `socket.socket` methods (plain sockets, blocking or
not); `recv_async` and `send_all_async` add trio's readiness waits for non-blocking sockets.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
from collections.abc import Sequence
from typing import Final

import trio

__all__ = [
    "ACCEPT_BACKOFF",
    "ACCEPT_SHORTAGES",
    "FD_SIZE",
    "MAX_FDS",
    "MSG_CMSG_CLOEXEC",
    "MSG_CTRUNC",
    "MSG_DONTWAIT",
    "FdsTruncated",
    "ancillary_space",
    "close_fds",
    "fds_from_ancillary",
    "recv_async",
    "recv_nowait",
    "rights",
    "send_all_async",
    "send_nowait",
]

FD_SIZE: Final = array.array("i").itemsize
MAX_FDS: Final = 253
"""SCM_MAX_FD: the most fds Linux passes in one message."""


# accept() failures that say the process or the system is short of fds or memory, not that the
# listener is broken. The connection stays in the backlog, so a listener that retried at once
# would spin at full speed on a socket that stays readable: it logs, waits ACCEPT_BACKOFF and
# tries again (trio.serve_listeners, used for the metrics endpoint, does the same by itself).
ACCEPT_SHORTAGES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF: Final = 0.1


class FdsTruncated(OSError):
    """The kernel dropped file descriptors of a message (MSG_CTRUNC); those received are closed."""


def ancillary_space(max_fds: int = MAX_FDS) -> int:
    """The `ancbufsize` for a recvmsg that can take `max_fds` descriptors."""
    return socket.CMSG_SPACE(max_fds * FD_SIZE)


_DEFAULT_SPACE: Final = ancillary_space()

# socket's MSG_* constants are IntFlag members: `flags & socket.MSG_CTRUNC` goes through the
# enum machinery (~0.7 us here) once per receive, which is once per trapped read, and an IntFlag
# `|` ~0.5 us; with plain ints either is ~20 ns.
MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
MSG_CMSG_CLOEXEC: Final = int(socket.MSG_CMSG_CLOEXEC)
MSG_DONTWAIT: Final = int(socket.MSG_DONTWAIT)


def rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data for `sendmsg` that passes `fds` (nothing for none)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def fds_from_ancillary(ancillary: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    """The fds a recvmsg returned; FdsTruncated (after closing them) if some were dropped."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % FD_SIZE]))
    if flags & MSG_CTRUNC:
        close_fds(fds)
        raise FdsTruncated("file descriptors were truncated in transit (MSG_CTRUNC)")
    return fds


def recv_nowait(
    sock: socket.socket, view: memoryview | bytearray, space: int = _DEFAULT_SPACE
) -> tuple[int, list[int]]:
    """One recvmsg into `view`: (bytes, fds). 0 bytes means the peer closed (a reset too).

    On a non-blocking socket with nothing to read, BlockingIOError propagates.
    """
    try:
        n, ancillary, flags, _ = sock.recvmsg_into([view], space, MSG_CMSG_CLOEXEC)
    except ConnectionResetError:
        return 0, []
    return n, fds_from_ancillary(ancillary, flags)


async def recv_async(
    sock: socket.socket, view: memoryview | bytearray, space: int = _DEFAULT_SPACE
) -> tuple[int, list[int]]:
    """`recv_nowait` on a non-blocking socket, waiting in trio until something arrives."""
    while True:
        try:
            return recv_nowait(sock, view, space)
        except (BlockingIOError, InterruptedError):
            await trio.lowlevel.wait_readable(sock)


def send_nowait(sock: socket.socket, data: bytes | memoryview, fds: Sequence[int] = ()) -> int:
    """One send of `data` (with `fds`, if any): the bytes the kernel took."""
    if fds:
        return sock.sendmsg([data], rights(fds))
    return sock.send(data)


async def send_all_async(
    sock: socket.socket, data: bytes | memoryview, fds: Sequence[int] = ()
) -> None:
    """All of `data` on a non-blocking socket, `fds` with its first bytes; waits in trio."""
    view = memoryview(data)
    while view:
        try:
            sent = send_nowait(sock, view, fds)
        except (BlockingIOError, InterruptedError):
            await trio.lowlevel.wait_writable(sock)
            continue
        fds = ()
        view = view[sent:]
