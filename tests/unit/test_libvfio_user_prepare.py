"""The libvfio-user transport's peek: which request the trio thread lets the library serve.

`_prepare` decides, from a peek at the socket, whether the next request can be served in the
trio thread (its answer kept for the region callback) or must go to the worker thread, where a
callback may wait. Getting it wrong either way is a bug: a request that may wait, served
inline, would have to fail (the trio thread never waits in C); one the library would block on
(not whole in the socket) would block the event loop. No library is needed: the decision is
made before the library is called.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any, cast

import pytest

from devmodel.backend import DeviceBackend
from devmodel.counters import DeviceCounters
from devmodel.testing import memory_backend
from devmodel.transports.libvfio_user import LibVfioUserServer

READ, WRITE, DMA_MAP = 9, 10, 2
HEADER = struct.Struct("<HHIII")
ACCESS = struct.Struct("<QII")


@pytest.fixture
def backend() -> Iterator[DeviceBackend]:
    with memory_backend(2 << 20) as b:
        yield b


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def server(backend: DeviceBackend) -> LibVfioUserServer:
    return LibVfioUserServer(backend, DeviceCounters(), "/nonexistent", lib=cast(Any, object()))


def access(command: int, region: int, offset: int, count: int, data: bytes = b"") -> bytes:
    body = ACCESS.pack(offset, region, count) + data
    return HEADER.pack(1, command, HEADER.size + len(body), 0, 0) + body


def test_empty_socket_is_none(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket]
) -> None:
    s = server(backend)
    assert s._prepare(pair[1].fileno()) is None
    s._forget_peeker()


def test_resident_read_is_answered_before_the_library_reads_it(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket]
) -> None:
    backend.function.aperture_write_now(8, b"12345678")
    s = server(backend)
    pair[0].sendall(access(READ, 0, 8, 8))
    assert s._prepare(pair[1].fileno()) is True
    assert s._prepared == (0, 8, 8, b"12345678")
    # A peek: the request is still there for the library.
    assert len(pair[1].recv(100, socket.MSG_PEEK)) == 32
    s._forget_peeker()


def test_a_read_that_may_wait_goes_to_the_worker(
    backend: DeviceBackend,
    pair: tuple[socket.socket, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backend.lookup(0), "read_now", lambda offset, size: None)
    s = server(backend)
    pair[0].sendall(access(READ, 0, 0, 8))
    assert s._prepare(pair[1].fileno()) is False
    assert s._prepared is None
    s._forget_peeker()


def test_a_whole_resident_write_is_applied_and_served_inline(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket]
) -> None:
    s = server(backend)
    pair[0].sendall(access(WRITE, 0, 16, 8, b"abcdefgh"))
    assert s._prepare(pair[1].fileno()) is True
    assert s._prepared == (0, 16, 8, None)
    assert backend.function.aperture_read_now(16, 8) == b"abcdefgh"
    s._forget_peeker()


@pytest.mark.parametrize(
    "message",
    [
        access(WRITE, 0, 16, 8, b"abcdefgh")[:-3],  # the payload is not all there yet
        access(READ, 0, 0, 8)[:20],  # nor the access header
        HEADER.pack(1, DMA_MAP, 64, 0, 0) + bytes(8),  # a control request, not whole
        HEADER.pack(1, DMA_MAP, 64 << 10, 0, 0) + bytes(100),  # larger than a peek
    ],
    ids=["write-partial", "read-partial", "control-partial", "control-large"],
)
def test_a_request_not_whole_in_the_socket_goes_to_the_worker(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket], message: bytes
) -> None:
    s = server(backend)
    pair[0].sendall(message)
    assert s._prepare(pair[1].fileno()) is False
    assert backend.function.aperture_read_now(16, 8) == bytes(8)  # nothing applied
    s._forget_peeker()


@pytest.mark.parametrize(
    "message",
    [
        HEADER.pack(1, DMA_MAP, 48, 0, 0) + bytes(32),  # a whole control request
        access(READ, 7, 0, 4),  # config space: never waits
        access(WRITE, 7, 4, 2, b"\x06\x00"),
        access(READ, 9, 0, 4),  # no such region: the library refuses it itself
    ],
    ids=["control", "config-read", "config-write", "no-region"],
)
def test_requests_that_never_wait_are_served_inline(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket], message: bytes
) -> None:
    s = server(backend)
    pair[0].sendall(message)
    assert s._prepare(pair[1].fileno()) is True
    s._forget_peeker()


def test_a_refused_bar_access_goes_to_the_worker(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket]
) -> None:
    """An unaligned read is refused the general way (read_now declines it)."""
    s = server(backend)
    pair[0].sendall(access(READ, 0, 1, 8))
    assert s._prepare(pair[1].fileno()) is False
    s._forget_peeker()
