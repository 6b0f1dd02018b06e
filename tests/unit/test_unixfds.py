"""devmodel.unixfds over real socketpairs: fds arrive with their bytes, truncation is fatal."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest
import trio

from devmodel import unixfds


def _pipe_fds(n: int) -> list[int]:
    fds: list[int] = []
    for _ in range(n):
        r, w = os.pipe()
        fds.extend((r, w))
    return fds


@contextlib.contextmanager
def _pair_and_pipes(n: int) -> Iterator[tuple[socket.socket, socket.socket, list[int]]]:
    """A socketpair and the fds of `n` pipes to send over it, all closed at the end."""
    a, b = socket.socketpair()
    sent = _pipe_fds(n)
    try:
        yield a, b, sent
    finally:
        unixfds.close_fds(sent)
        a.close()
        b.close()


def test_fds_travel_with_the_first_bytes_and_are_cloexec() -> None:
    with _pair_and_pipes(2) as (a, b, sent):
        assert unixfds.send_nowait(a, b"hello", sent) == 5
        buf = bytearray(64)
        n, fds = unixfds.recv_nowait(b, memoryview(buf))
        assert bytes(buf[:n]) == b"hello"
        assert len(fds) == len(sent)
        for mine, theirs in zip(sent, fds, strict=True):
            assert os.fstat(mine).st_ino == os.fstat(theirs).st_ino
            assert not os.get_inheritable(theirs)
        unixfds.close_fds(fds)


def test_truncated_fds_are_closed_and_raise() -> None:
    with _pair_and_pipes(4) as (a, b, sent):
        before = set(os.listdir("/proc/self/fd"))
        unixfds.send_nowait(a, b"x", sent)
        with pytest.raises(unixfds.FdsTruncated):
            unixfds.recv_nowait(b, bytearray(8), unixfds.ancillary_space(2))
        assert set(os.listdir("/proc/self/fd")) == before


def test_a_reset_reads_as_the_end() -> None:
    a, b = socket.socketpair()
    # Closing with unread data makes the peer's next read fail with ECONNRESET.
    b.send(b"unread")
    a.close()
    try:
        assert unixfds.recv_nowait(b, bytearray(8)) == (0, [])
    finally:
        b.close()


async def test_async_send_and_receive_a_large_message() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    payload = os.urandom(1 << 20)
    (r, w) = os.pipe()
    got = bytearray()
    received: list[int] = []

    async def reader() -> None:
        view = memoryview(bytearray(1 << 16))
        while len(got) < len(payload):
            n, fds = await unixfds.recv_async(b, view)
            assert n
            received.extend(fds)
            got.extend(view[:n])

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await unixfds.send_all_async(a, payload, [r])
        assert bytes(got) == payload
        assert len(received) == 1
        assert os.fstat(received[0]).st_ino == os.fstat(r).st_ino
    finally:
        unixfds.close_fds([r, w, *received])
        a.close()
        b.close()
