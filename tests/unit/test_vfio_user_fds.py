"""Fd association: the fds fed with a chunk belong to the message holding the chunk's last byte.

A stream of three messages (REGION_READ, DMA_MAP, REGION_WRITE) is fed in arbitrary chunkings;
the fd batch rides on one chosen chunk. Only when that chunk ends inside (or at the end of) the
DMA_MAP does the DMA_MAP get the fd; anywhere else the fd lands on a message that takes none,
which is refused and the fd closed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devmodel.testing import (
    FdBag,
    chunked,
    drain,
    fd_is_open,
    raw,
    ready_server,
    region_read,
)
from pyvfio_user import events as ev
from pyvfio_user.connection import ServerConnection
from pyvfio_user.constants import Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.sansio import NEED_DATA

M1 = region_read(1, 0x10, 7, 4)
M2 = raw(2, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0x100000, 0x1000))
M3 = raw(3, Command.REGION_WRITE, struct.pack("<QII", 4, 7, 2) + b"\x07\x01")
STREAM = M1 + M2 + M3
M2_START, M2_END = len(M1), len(M1) + len(M2)  # M2 is STREAM[M2_START:M2_END]


@pytest.fixture
def bag() -> Iterator[FdBag]:
    fds = FdBag()
    yield fds
    fds.close_all()


def feed(
    server: ServerConnection,
    cuts: list[int],
    fd_chunk_ends: dict[int, list[int]],
    pull_between: bool,
) -> list[Any]:
    """Feed STREAM cut at `cuts`; the chunk ending at offset e carries fd_chunk_ends[e]."""
    events: list[Any] = []
    at = 0
    for chunk in chunked(STREAM, [*cuts, *fd_chunk_ends]):
        at += len(chunk)
        server.receive_data(chunk, fd_chunk_ends.get(at, []))
        if pull_between:
            events.extend(drain(server))
    events.extend(drain(server))
    assert server.next_event() is NEED_DATA
    return events


cuts_st = st.lists(st.integers(1, len(STREAM) - 1), max_size=12)


@settings(max_examples=300, deadline=None)
@given(cuts=cuts_st, end=st.integers(M2_START + 1, M2_END), pull_between=st.booleans())
def test_fd_on_a_chunk_ending_inside_dma_map_goes_to_it(
    cuts: list[int], end: int, pull_between: bool
) -> None:
    fd = os.memfd_create("dma", os.MFD_CLOEXEC)
    try:
        events = feed(ready_server(), cuts, {end: [fd]}, pull_between)
        assert events == [
            ev.RegionRead(1, 0x10, 7, 4),
            ev.DmaMap(2, 3, 0, 0x100000, 0x1000, fd),
            ev.RegionWrite(3, 4, 7, b"\x07\x01"),
        ]
        assert fd_is_open(fd)
    finally:
        os.close(fd)


@settings(max_examples=300, deadline=None)
@given(
    cuts=cuts_st,
    end=st.one_of(st.integers(1, M2_START), st.integers(M2_END + 1, len(STREAM))),
    pull_between=st.booleans(),
)
def test_fd_on_a_chunk_ending_elsewhere_is_refused_and_closed(
    cuts: list[int], end: int, pull_between: bool
) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    events = feed(ready_server(), cuts, {end: [fd]}, pull_between)
    owner = 1 if end <= M2_START else 3
    assert not fd_is_open(fd), "the fd went to a message that takes none: it must be closed"
    assert len(events) == 3
    assert events[1] == ev.DmaMap(2, 3, 0, 0x100000, 0x1000, None)
    bad = events[owner - 1]
    assert isinstance(bad, ev.BadRequest) and bad.msg_id == owner
    other = events[2 if owner == 1 else 0]
    assert not isinstance(other, ev.BadRequest)


@settings(max_examples=200, deadline=None)
@given(
    cuts=cuts_st,
    ends=st.lists(st.integers(M2_START + 1, M2_END), min_size=2, max_size=2, unique=True),
    pull_between=st.booleans(),
)
def test_two_fd_batches_in_one_dma_map_are_refused(
    cuts: list[int], ends: list[int], pull_between: bool
) -> None:
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in ends]
    events = feed(ready_server(), cuts, {e: [fd] for e, fd in zip(ends, fds, strict=True)},
                  pull_between)  # fmt: skip
    assert isinstance(events[1], ev.BadRequest) and events[1].msg_id == 2
    assert not any(fd_is_open(fd) for fd in fds)
    assert isinstance(events[0], ev.RegionRead) and isinstance(events[2], ev.RegionWrite)


def test_fd_batch_with_a_chunk_spanning_messages(bag: FdBag) -> None:
    """One chunk from the middle of M1 to the middle of M3: its fd is M3's, not M2's."""
    server = ready_server()
    fd = bag.memfd()
    server.receive_data(STREAM[:10])
    server.receive_data(STREAM[10 : M2_END + 5], [fd])
    server.receive_data(STREAM[M2_END + 5 :])
    events = drain(server)
    assert events[1] == ev.DmaMap(2, 3, 0, 0x100000, 0x1000, None)
    assert isinstance(events[2], ev.BadRequest)
    assert not fd_is_open(fd)


def test_fd_batch_at_exact_message_boundary(bag: FdBag) -> None:
    """A chunk ending exactly at the end of M2 gives M2 its fd; the next chunk starts M3."""
    server = ready_server()
    fd = bag.memfd()
    server.receive_data(STREAM[:M2_END], [fd])
    events = drain(server)
    assert events == [ev.RegionRead(1, 0x10, 7, 4), ev.DmaMap(2, 3, 0, 0x100000, 0x1000, fd)]
    server.receive_data(STREAM[M2_END:])
    assert drain(server) == [ev.RegionWrite(3, 4, 7, b"\x07\x01")]


def test_several_fds_in_one_batch_go_to_set_irqs(bag: FdBag) -> None:
    server = ready_server()
    fds = [bag.eventfd() for _ in range(3)]
    payload = struct.pack("<IIIII", 20, 0x24, 2, 0, 3)
    message = raw(5, Command.DEVICE_SET_IRQS, payload)
    server.receive_data(STREAM + message[:7])
    server.receive_data(message[7:], fds)
    events = drain(server)
    assert events[-1] == ev.DeviceSetIrqs(5, 0x24, 2, 0, 3, b"", tuple(fds))
    assert all(fd_is_open(fd) for fd in fds)


def test_fd_on_a_message_that_turns_out_fatal_is_closed(bag: FdBag) -> None:
    """A valid DMA_MAP then a broken header in one chunk: the fd is the broken message's."""
    server = ready_server()
    fd = bag.memfd()
    server.receive_data(M2 + raw(9, 9, size=8), [fd])
    assert isinstance(server.next_event(), ev.DmaMap)
    with pytest.raises(ProtocolError):
        server.next_event()
    assert not fd_is_open(fd)


def test_fds_survive_buffer_compaction(bag: FdBag) -> None:
    """Many small messages consumed before an fd arrives: positions stay right."""
    server = ready_server()
    for k in range(3000):  # ~96 KiB, past the framer's compaction threshold
        server.receive_data(region_read(k & 0xFFFF))
        if k % 7 == 0:
            drain(server)
    drain(server)
    fd = bag.memfd()
    server.receive_data(M2[:20])
    server.receive_data(M2[20:], [fd])
    assert drain(server) == [ev.DmaMap(2, 3, 0, 0x100000, 0x1000, fd)]
    # And with a backlog left unconsumed while the fd arrives.
    backlog = b"".join(region_read(k) for k in range(3000))
    fd2 = bag.memfd()
    server.receive_data(backlog + M2[:-1])
    server.receive_data(M2[-1:], [fd2])
    events = drain(server)
    assert len(events) == 3001
    assert events[-1] == ev.DmaMap(2, 3, 0, 0x100000, 0x1000, fd2)
