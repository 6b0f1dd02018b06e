"""VERSION payloads and capability negotiation.

Each side's capabilities describe what *it* can receive (fds per message, transfer size) or
keep (DMA maps). The server's reply must name a subset of the keys the client proposed, with
the same major version and a minor version no higher than proposed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from pyvfio_user import constants as c
from pyvfio_user.errors import ProtocolError

MAJOR: Final = 0
MINOR: Final = 0
# The JSON blob is tiny in practice; a cap keeps a hostile peer from making us parse megabytes.
MAX_VERSION_JSON: Final = 64 * 1024
# QEMU's own ceilings on what a server may announce (see shared/reference/vfio-user.md).
QEMU_MAX_MSG_FDS: Final = 16
QEMU_MAX_DATA_XFER_SIZE: Final = 64 << 20


@dataclass(slots=True, frozen=True)
class Capabilities:
    max_msg_fds: int = c.DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = c.DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = c.DEFAULT_MAX_DMA_MAPS
    pgsizes: int = c.DEFAULT_PGSIZES
    write_multiple: bool = False
    # Everything else the peer said, kept verbatim (migration, twin_socket, future keys).
    extra: tuple[tuple[str, str], ...] = ()

    def to_json_object(self, keys: frozenset[str] | None = None) -> dict[str, Any]:
        """The `capabilities` object, limited to `keys` when answering a proposal."""
        caps: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "max_dma_maps": self.max_dma_maps,
            "pgsizes": self.pgsizes,
            "write_multiple": self.write_multiple,
        }
        for key, raw in self.extra:
            caps[key] = json.loads(raw)
        if keys is not None:
            caps = {k: v for k, v in caps.items() if k in keys}
        return caps


def _int_cap(caps: dict[str, Any], key: str, default: int) -> int:
    value = caps.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 64:
        raise ProtocolError(f"VERSION capability {key!r} must be an unsigned integer", fatal=False)
    return value


def parse_capabilities(blob: bytes) -> tuple[Capabilities, frozenset[str]]:
    """Decode the optional NUL-terminated JSON that follows major/minor.

    Returns the capabilities and the set of keys the peer actually named (so a reply can be
    limited to them).
    """
    if not blob:
        return Capabilities(), frozenset()
    if len(blob) > MAX_VERSION_JSON:
        raise ProtocolError(
            f"VERSION data is {len(blob)} bytes, over {MAX_VERSION_JSON}", fatal=False
        )
    nul = blob.find(b"\0")
    if nul < 0:
        raise ProtocolError("VERSION data is not NUL-terminated", fatal=False)
    if any(blob[nul + 1 :]):
        raise ProtocolError("VERSION data has bytes after its terminating NUL", fatal=False)
    try:
        doc = json.loads(blob[:nul].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"VERSION data is not valid UTF-8 JSON: {exc}", fatal=False) from None
    if not isinstance(doc, dict):
        raise ProtocolError("VERSION data must be a JSON object", fatal=False)
    caps = doc.get("capabilities", {})
    if not isinstance(caps, dict):
        raise ProtocolError("VERSION 'capabilities' must be a JSON object", fatal=False)
    write_multiple = caps.get("write_multiple", False)
    if not isinstance(write_multiple, bool):
        raise ProtocolError("VERSION capability 'write_multiple' must be a boolean", fatal=False)
    known = {"max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes", "write_multiple"}
    extra = tuple(
        sorted((k, json.dumps(v, sort_keys=True)) for k, v in caps.items() if k not in known)
    )
    parsed = Capabilities(
        max_msg_fds=_int_cap(caps, "max_msg_fds", c.DEFAULT_MAX_MSG_FDS),
        max_data_xfer_size=_int_cap(caps, "max_data_xfer_size", c.DEFAULT_MAX_DATA_XFER_SIZE),
        max_dma_maps=_int_cap(caps, "max_dma_maps", c.DEFAULT_MAX_DMA_MAPS),
        pgsizes=_int_cap(caps, "pgsizes", c.DEFAULT_PGSIZES),
        write_multiple=write_multiple,
        extra=extra,
    )
    return parsed, frozenset(caps)


def encode_capabilities(caps: Capabilities, keys: frozenset[str] | None = None) -> bytes:
    obj = {"capabilities": caps.to_json_object(keys)}
    return json.dumps(obj, separators=(",", ":")).encode() + b"\0"


def negotiate(
    proposed: Capabilities, proposed_keys: frozenset[str], ours: Capabilities
) -> Capabilities:
    """What a server answers: our own limits, named only where the client named that key.

    write_multiple is on only when both sides want it. pgsizes must share 4 KiB.
    """
    if not proposed.pgsizes & ours.pgsizes:
        raise ProtocolError(
            f"client page sizes {proposed.pgsizes:#x} share none with ours {ours.pgsizes:#x}",
            fatal=False,
        )
    pgsizes = (proposed.pgsizes & ours.pgsizes) if "pgsizes" in proposed_keys else ours.pgsizes
    return Capabilities(
        max_msg_fds=ours.max_msg_fds,
        max_data_xfer_size=ours.max_data_xfer_size,
        max_dma_maps=min(ours.max_dma_maps, proposed.max_dma_maps),
        pgsizes=pgsizes,
        write_multiple=ours.write_multiple and proposed.write_multiple,
    )
