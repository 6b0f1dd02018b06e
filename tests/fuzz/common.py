"""What the stream targets share: how a fuzz input becomes chunks with fds, and fd bookkeeping.

An input is a small header followed by the byte stream to feed:

    byte 0   variant: which connection (role, state) the target starts from
    byte 1   bit 0: end the stream (feed b"") after the last chunk
             bits 1-3: how many chunk lengths follow (0-7)
             bit 4: the target's alternate way of driving (e.g. vfio-user's next_read path)
             bit 5: chunks that carry fds carry two instead of one
    byte 2   bit i set: chunk i arrives with fds (as a recvmsg with SCM_RIGHTS returns them)
    then     one byte per chunk length (the value plus one); the rest is the last chunk

The header is short and fixed so that mutations of the stream rarely disturb it, and the seed
corpus (tests/fuzz/seeds.py) can give each state and each driving mode a start.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

HEADER_BYTES = 3


@dataclass
class Plan:
    variant: int = 0
    eof: bool = False
    alternate: bool = False
    fds_per_chunk: int = 1
    fd_mask: int = 0
    chunks: list[bytes] = field(default_factory=list)

    @property
    def stream(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def carries_fds(self) -> bool:
        return any(self.fd_mask >> i & 1 for i in range(len(self.chunks)))

    def fd_chunks(self) -> list[int]:
        """How many fds arrive with each chunk."""
        return [
            self.fds_per_chunk if i < 8 and self.fd_mask >> i & 1 else 0
            for i in range(len(self.chunks))
        ]


def parse_plan(data: bytes) -> Plan:
    head = data[:HEADER_BYTES].ljust(HEADER_BYTES, b"\0")
    variant, options, fd_mask = head
    ncuts = (options >> 1) & 7
    lengths = [n + 1 for n in data[HEADER_BYTES : HEADER_BYTES + ncuts]]
    rest = data[HEADER_BYTES + ncuts :]
    chunks: list[bytes] = []
    at = 0
    for n in lengths:
        if at >= len(rest):
            break
        chunks.append(rest[at : at + n])
        at += n
    if at < len(rest):
        chunks.append(rest[at:])
    return Plan(
        variant=variant,
        eof=bool(options & 1),
        alternate=bool(options & 0x10),
        fds_per_chunk=2 if options & 0x20 else 1,
        fd_mask=fd_mask,
        chunks=chunks,
    )


def make_input(
    variant: int,
    stream: bytes,
    *,
    eof: bool = False,
    alternate: bool = False,
    cuts: list[int] | None = None,
    fd_mask: int = 0,
    two_fds: bool = False,
) -> bytes:
    """The inverse of parse_plan, for seeds and tests: `cuts` are chunk lengths (1-256)."""
    lengths = cuts or []
    if len(lengths) > 7 or not all(1 <= n <= 256 for n in lengths):
        raise ValueError(f"bad chunk lengths {lengths}")
    options = eof | len(lengths) << 1 | alternate << 4 | two_fds << 5
    return bytes([variant, options, fd_mask, *(n - 1 for n in lengths)]) + stream


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class FdLedger:
    """Real fds to feed a connection, made before anything is fed (so that a number the
    connection closes cannot be reused by a later fd of the same input and look open)."""

    def __init__(self, counts: list[int]) -> None:
        self.batches: list[list[int]] = [
            [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)] for n in counts
        ]
        self.fed = [fd for batch in self.batches for fd in batch]

    def check(self, handed_out: set[int]) -> None:
        """After the connection's close(): an fd handed out in an event is still open (it is
        the event's owner's), every other fed fd was closed by the connection."""
        for fd in self.fed:
            if fd in handed_out:
                assert fd_is_open(fd), f"fd {fd} was handed out in an event, then closed"
            else:
                assert not fd_is_open(fd), f"fd {fd} leaked: neither handed out nor closed"

    def release(self) -> None:
        for fd in self.fed:
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def fds_for(plan: Plan) -> Iterator[FdLedger]:
    ledger = FdLedger(plan.fd_chunks())
    try:
        yield ledger
    finally:
        ledger.release()
