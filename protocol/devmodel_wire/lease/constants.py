"""Numbers fixed by docs/lease-protocol.md: message types, codes, limits.

Every value here is part of the wire contract with lenders written in other languages, so each
enum mirrors a table in the specification and nothing may be renumbered. The code families that
a later minor version may extend (reasons, statuses, error codes) are open sets on the wire:
events carry them as plain ints so that an unknown value survives decoding and can be treated
as the family's generic failure, as the specification requires.
"""

from __future__ import annotations

import enum
from typing import Final

MAGIC: Final = 0x444E454C
"""First field of every HELLO body; the bytes spell b"LEND" on the wire."""

VERSION_MAJOR: Final = 1
VERSION_MINOR: Final = 0

HEADER_SIZE: Final = 16
MAX_MESSAGE_SIZE: Final = 4096
"""Largest legal message, header included; a bigger length field means lost framing."""
MAX_NAME_BYTES: Final = 64
MAX_TEXT_BYTES: Final = 1024
MAX_IN_FLIGHT: Final = 65536
"""Most requests one side may have sent and not yet seen answered, all types together."""
MAX_LEASE_ID: Final = (1 << 64) - 1

GRANULES: Final = (4 << 10, 2 << 20, 1 << 30)
MIN_APERTURE: Final = 1 << 20

PROT_READ: Final = 1
PROT_WRITE: Final = 2
VALID_PROTS: Final = frozenset({PROT_READ, PROT_READ | PROT_WRITE})
FEATURE_DMABUF_GRANTS: Final = 1 << 0
"""HELLO feature bit `dmabuf-grants`: GRANTs may carry a dma-buf instead of a memfd (the
fd kind in the GRANT's flags). A peer that does not offer it is never sent a dma-buf."""
FEATURES_KNOWN: Final = FEATURE_DMABUF_GRANTS
"""Feature bits this implementation defines (docs/lease-protocol.md 6.3)."""
FEATURE_NAMES: Final = {FEATURE_DMABUF_GRANTS: "dmabuf-grants"}

GRANT_FD_KIND_MASK: Final = 0xFF
"""GRANT `flags` bits 0-7: the kind of fd the grant carries (`FdKind`); 0 is a memfd, so a
1.0 grant (flags 0) reads as a memfd grant."""
GRANT_FLAGS_KNOWN: Final = GRANT_FD_KIND_MASK
"""Grant flag bits this implementation defines: the fd kind field, no other bit."""


class FdKind(enum.IntEnum):
    """The fd kind field of a GRANT (`flags & GRANT_FD_KIND_MASK`); a closed family: an
    unknown kind is NACKed UNSUPPORTED_FLAGS."""

    MEMFD = 0
    DMABUF = 1


FD_KIND_FEATURE: Final[dict[int, int]] = {FdKind.MEMFD: 0, FdKind.DMABUF: FEATURE_DMABUF_GRANTS}
"""The feature a session must have agreed on before a grant may carry each fd kind."""
FD_KIND_NAMES: Final[dict[int, str]] = {FdKind.MEMFD: "memfd", FdKind.DMABUF: "dma-buf"}


class MsgType(enum.IntEnum):
    HELLO = 0x0001
    BYE = 0x0002
    ERROR = 0x0003
    PING = 0x0004
    PONG = 0x0005
    GRANT = 0x0010
    GRANT_ACK = 0x0011
    GRANT_NACK = 0x0012
    REVOKE = 0x0013
    REVOKED = 0x0014
    PAGE_IN = 0x0020
    PAGE_IN_DONE = 0x0021


class RevokeMode(enum.IntEnum):
    EVICT = 1
    RELEASE = 2


class Access(enum.IntEnum):
    READ = 1
    WRITE = 2


class ErrorCode(enum.IntEnum):
    UNKNOWN_TYPE = 1
    MALFORMED = 2
    UNEXPECTED = 3
    BAD_FD_COUNT = 4
    UNKNOWN_ID = 5
    DUPLICATE_ID = 6
    OTHER = 255


class NackReason(enum.IntEnum):
    OUTSIDE_APERTURE = 1
    MISALIGNED = 2
    OVERLAPS_LIVE_LEASE = 3
    FD_TOO_SMALL = 4
    FD_NOT_SEALED = 5
    BAD_PROTECTION = 6
    DUPLICATE_LEASE_ID = 7
    TOO_MANY_LEASES = 8
    BAD_FD = 9
    UNSUPPORTED_FLAGS = 10
    NO_RESOURCES = 11
    SHUTTING_DOWN = 12
    OTHER = 255


class ByeReason(enum.IntEnum):
    NORMAL = 0
    UNSUPPORTED_VERSION = 1
    BAD_GEOMETRY = 2
    GUEST_REFUSED = 3
    PROTOCOL_ERROR = 4
    NO_RESOURCES = 5
    TIMEOUT = 6
    INTERNAL_ERROR = 7
    OTHER = 255


class PageInStatus(enum.IntEnum):
    OK = 0
    NO_MEMORY = 1
    NOT_LENT = 2
    INVALID_RANGE = 3
    BUSY = 4
    FAILED = 255


def code_name(family: type[enum.IntEnum], value: int) -> str:
    """Name a wire code for messages and logs without failing on values a newer peer sends."""
    try:
        return family(value).name
    except ValueError:
        return f"{family.__name__}({value})"
