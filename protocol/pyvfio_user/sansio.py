"""Conventions every connection object in `protocol/` shares (in the manner of h11).

A connection is fed what arrived (`receive_data(data, fds)`; `b""` means the peer closed),
hands out typed events one at a time (`next_event()` returns an event or `NEED_DATA`), and turns
events the caller wants to send into wire bytes plus the file descriptors that travel with them
(`send(event) -> Outgoing`). It never touches a socket; it owns the fds it received until it
hands them out inside an event, and closes the ones it refuses.
"""

from __future__ import annotations

import enum
from typing import Final, NamedTuple


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA: Final = _Sentinel.NEED_DATA
"""next_event(): nothing complete is buffered; feed more bytes."""

CLOSED: Final = _Sentinel.CLOSED
"""next_event(): the peer closed the stream and every buffered event was delivered."""

Sentinel = _Sentinel


class Outgoing(NamedTuple):
    """What `send()` returns: bytes to write and fds to pass with them (SCM_RIGHTS)."""

    data: bytes
    fds: tuple[int, ...] = ()
