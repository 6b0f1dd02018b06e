"""The libvfio-user transport's peek: which request the trio thread lets the library serve.

`_plan` decides, from one peek at the socket, how many of the requests there can be served in
the trio thread (their answers queued for the region callbacks, in order) before one must go to
the worker thread, where a callback may wait. Getting it wrong either way is a bug: a request
that may wait, served inline, would have to fail (the trio thread never waits in C); one the
library would block on (not whole in the socket) would block the event loop. No library is
needed: the decision is made before the library is called.
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
LIMIT = 64
NO_REPLY = 0x10
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


def access(
    command: int, region: int, offset: int, count: int, data: bytes = b"", flags: int = 0
) -> bytes:
    body = ACCESS.pack(offset, region, count) + data
    return HEADER.pack(1, command, HEADER.size + len(body), flags, 0) + body


def posted(offset: int, data: bytes) -> bytes:
    """A posted write, as QEMU sends a guest's store to a BAR: no reply owed."""
    return access(WRITE, 0, offset, len(data), data, flags=NO_REPLY)


def test_empty_socket_is_none(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket]
) -> None:
    s = server(backend)
    assert s._plan(pair[1].fileno(), LIMIT) is None
    s._forget_peeker()


def test_resident_read_is_answered_before_the_library_reads_it(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket]
) -> None:
    backend.function.aperture_write_now(8, b"12345678")
    s = server(backend)
    pair[0].sendall(access(READ, 0, 8, 8))
    assert s._plan(pair[1].fileno(), LIMIT) == 1
    assert list(s._planned) == [(0, 8, 8, b"12345678")]
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
    assert s._plan(pair[1].fileno(), LIMIT) == 0
    assert not s._planned
    s._forget_peeker()


def test_a_whole_resident_write_is_applied_and_served_inline(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket]
) -> None:
    s = server(backend)
    pair[0].sendall(access(WRITE, 0, 16, 8, b"abcdefgh"))
    assert s._plan(pair[1].fileno(), LIMIT) == 1
    assert list(s._planned) == [(0, 16, 8, None)]
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
    assert s._plan(pair[1].fileno(), LIMIT) == 0
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
    assert s._plan(pair[1].fileno(), LIMIT) == 1
    s._forget_peeker()


def test_a_refused_bar_access_goes_to_the_worker(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket]
) -> None:
    """An unaligned read is refused the general way (read_now declines it)."""
    s = server(backend)
    pair[0].sendall(access(READ, 0, 1, 8))
    assert s._plan(pair[1].fileno(), LIMIT) == 0
    s._forget_peeker()


# ------------------------------------------------------------------------------------ batches


def test_a_stream_of_posted_writes_is_planned_in_one_peek(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket]
) -> None:
    """A guest's posted writes: one peek plans them all, applied in order (the same offset
    written twice keeps the later value), and every request stays in the socket for the
    library."""
    s = server(backend)
    stream = b"".join(posted(8 * i, bytes([i]) * 8) for i in range(10)) + posted(0, b"last....")
    pair[0].sendall(stream)
    assert s._plan(pair[1].fileno(), LIMIT) == 11
    assert list(s._planned) == [(0, 8 * i, 8, None) for i in range(10)] + [(0, 0, 8, None)]
    assert backend.function.aperture_read_now(0, 8) == b"last...."
    assert backend.function.aperture_read_now(72, 8) == bytes([9]) * 8
    assert len(pair[1].recv(4096, socket.MSG_PEEK)) == len(stream)
    s._forget_peeker()


def test_a_read_planned_after_writes_sees_them(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket]
) -> None:
    s = server(backend)
    pair[0].sendall(posted(16, b"before..") + access(READ, 0, 16, 8) + posted(16, b"after..."))
    assert s._plan(pair[1].fileno(), LIMIT) == 3
    assert list(s._planned) == [(0, 16, 8, None), (0, 16, 8, b"before.."), (0, 16, 8, None)]
    s._forget_peeker()


def test_a_batch_stops_at_its_limit_and_applies_nothing_beyond(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket]
) -> None:
    s = server(backend)
    pair[0].sendall(b"".join(posted(8 * i, b"x" * 8) for i in range(5)))
    assert s._plan(pair[1].fileno(), 3) == 3
    assert backend.function.aperture_read_now(16, 8) == b"x" * 8
    assert backend.function.aperture_read_now(24, 8) == bytes(8), "the 4th is not applied"
    s._forget_peeker()


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (
            access(WRITE, 7, 4, 2, b"\x06\x00"),
            "a config write may change what the next access finds",
        ),
        (HEADER.pack(1, DMA_MAP, 48, 0, 0) + bytes(32), "a control request"),
        (access(READ, 0, 1, 8), "a refused access: the worker answers it"),
    ],
    ids=["config", "control", "refused"],
)
def test_a_batch_ends_before_a_request_that_must_be_served_alone(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket], tail: bytes, reason: str
) -> None:
    s = server(backend)
    pair[0].sendall(posted(0, b"12345678") + tail + posted(40, b"never..."))
    assert s._plan(pair[1].fileno(), LIMIT) == 1, reason
    assert backend.function.aperture_read_now(40, 8) == bytes(8), "nothing after it applied"
    s._forget_peeker()


def test_a_batch_ends_before_a_request_not_whole_yet(
    backend: DeviceBackend, pair: tuple[socket.socket, socket.socket]
) -> None:
    s = server(backend)
    pair[0].sendall(posted(0, b"12345678") + posted(32, b"abcdefgh")[:-2])
    assert s._plan(pair[1].fileno(), LIMIT) == 1
    assert backend.function.aperture_read_now(32, 8) == bytes(8)
    s._forget_peeker()


def test_a_write_that_may_wait_ends_the_batch_unapplied(
    backend: DeviceBackend,
    pair: tuple[socket.socket, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    region = backend.lookup(0)
    write_now = region.write_now
    monkeypatch.setattr(
        region, "write_now", lambda offset, data: offset != 8 and write_now(offset, data)
    )
    s = server(backend)
    pair[0].sendall(posted(0, b"aaaaaaaa") + posted(8, b"bbbbbbbb") + posted(16, b"cccccccc"))
    assert s._plan(pair[1].fileno(), LIMIT) == 1
    assert backend.function.aperture_read_now(16, 8) == bytes(8)
    s._forget_peeker()
    # Alone at the head, it goes to the worker.
    s2 = server(backend)
    pair[1].recv(40)
    assert s2._plan(pair[1].fileno(), LIMIT) == 0
    s2._forget_peeker()


class _FakeLib:
    """vfu_run_ctx returning the given results in turn, recording what each call's callback
    would have been handed."""

    def __init__(self, server: LibVfioUserServer, results: list[int]) -> None:
        self.server = server
        self.results = results
        self.handed: list[object] = []

    def vfu_run_ctx(self, ctx: int) -> int:
        self.handed.append(self.server._prepared)
        return self.results.pop(0)


@pytest.mark.parametrize(
    ("results", "handed", "rc"),
    [
        ([1, 1, 1], 3, 0),  # every planned request served, each with its own answer
        ([1, 0, 1], 2, 0),  # the library served nothing: the rest of the plan is dropped
        ([1, -1, 1], 2, -1),  # an error: the rest dropped, the error passed on
    ],
    ids=["all", "served-nothing", "error"],
)
def test_run_planned_hands_each_request_its_answer_and_stops_on_a_miss(
    backend: DeviceBackend, results: list[int], handed: int, rc: int
) -> None:
    s = server(backend)
    lib = _FakeLib(s, results)
    s.lib = cast(Any, lib)
    plan = [(0, 8 * i, 8, None) for i in range(3)]
    s._planned.extend(plan)
    assert s._run_planned(0)[0] == rc
    assert lib.handed == plan[:handed]
    assert not s._planned and s._prepared is None
