"""The reference lender lending dma-bufs to in-process device models (no tests here).

Shared by tests/integration/test_lender_reference_dmabuf.py (memfds standing in for
udmabufs, runs anywhere) and tests/udmabuf/test_dmabuf_lender.py (real udmabufs, marker
`udmabuf`), so that both drive exactly the same workload.
"""

from __future__ import annotations

import contextlib
import random
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from devmodel.counters import DeviceCounters
from devmodel.leases.dmabuf import DmabufSupport
from devmodel.leases.engine import EngineConfig, LeaseEngine
from devmodel.leases.lender_link import LenderLink
from devmodel_wire.lease.constants import FEATURES_KNOWN

EXAMPLES = str(Path(__file__).resolve().parents[2] / "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

from reference_lender import POISON, ReferenceLender  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
GRANULE = 4 * KiB
APERTURE = 1 * MiB
# A guard against a hang, not a measure: the udmabuf tests run in a VM under TCG on a loaded host
# (tests/udmabuf/conftest.py), where the guests' first grants took more than 10 s.
STEP = 120.0


@dataclass
class Guest:
    guest_id: int
    engine: LeaseEngine
    link: LenderLink
    scope: trio.CancelScope

    async def run(self) -> None:
        with self.scope:
            await self.link.run()


@dataclass
class World:
    lender: ReferenceLender
    guests: list[Guest]


@contextlib.asynccontextmanager
async def dmabuf_world(
    tmp_path: Path,
    *,
    support: Callable[[], DmabufSupport] | None = None,
    guest_features: tuple[int, ...] = (FEATURES_KNOWN, FEATURES_KNOWN),
    **lender_options: object,
) -> AsyncIterator[World]:
    """A reference lender with `fd_kind="dmabuf"` and one device model per entry of
    `guest_features` (the features its link offers); `support` makes each engine's
    DmabufSupport (default: the real kernel's)."""
    path = str(tmp_path / "lender.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(8)
    options: dict[str, object] = {"vram": 64 * KiB, "seed": 1, "fd_kind": "dmabuf"}
    options.update(lender_options)
    lender = ReferenceLender(**options)  # type: ignore[arg-type]
    guests = []
    for number, features in enumerate(guest_features, 1):
        engine = LeaseEngine(APERTURE, GRANULE, DeviceCounters(), EngineConfig())
        if support is not None:
            engine.dmabuf = support()
        link = LenderLink(engine, path, number, name=f"devmodel-{number}", features=features)
        guests.append(Guest(number, engine, link, trio.CancelScope()))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lender.serve, listener)
            for g in guests:
                nursery.start_soon(g.run)
            with trio.fail_after(STEP):
                while len([s for s in lender.sessions if s.populated.is_set()]) < len(guests):
                    await trio.sleep(0.01)
            yield World(lender, guests)
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
        lender.close()
        for g in guests:
            g.engine.close()


async def churn(w: World, seed: int, rounds: int = 600) -> int:
    """Random 8-byte writes over 96 chunks per guest (16 fit in VRAM: most writes evict), then
    every byte read back; returns the number of mismatches (the caller wants 0). Reads of
    never-written memory must be zeros, never the poison of freed VRAM."""
    rng = random.Random(seed)
    model: dict[tuple[int, int], bytes] = {}
    for _ in range(rounds):
        g = rng.choice(w.guests)
        offset = rng.randrange(96) * GRANULE + rng.randrange(GRANULE // 8) * 8
        data = rng.randbytes(8)
        await g.engine.write(offset, data)
        model[g.guest_id, offset] = data
    mismatches = 0
    for (guest_id, offset), data in model.items():
        got = await w.guests[guest_id - 1].engine.read(offset, 8)
        mismatches += got != data
    for g in w.guests:
        got = await g.engine.read(APERTURE - 8, 8)
        mismatches += got != bytes(8) or POISON in got
    return mismatches


def mapped_heaps() -> int:
    """How many mappings of the lender's VRAM heaps (memfds vram-heapN, or udmabufs made from
    them: /proc/self/maps names a udmabuf mapping after its dma-buf, "/dmabuf:") exist in
    this process: after every lease is revoked, none may."""
    with open("/proc/self/maps") as maps:
        return sum(("/memfd:vram-heap" in line or "/dmabuf:" in line) for line in maps)
