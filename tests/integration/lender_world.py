"""The reference lender (examples/) serving in-process device models (no tests here).

One harness for every test that puts real LenderLinks and LeaseEngines in front of the
reference lender: tests/integration/test_lender_reference.py (memfd leases),
tests/integration/test_lender_reference_dmabuf.py (memfds standing in for udmabufs, runs
anywhere) and tests/udmabuf/test_dmabuf_lender.py (real udmabufs, marker `udmabuf`). The lender's
fd kind is one more lender option, so that memfd and dma-buf leases are driven by exactly the
same workload.
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
        """The link as `devmodel run` runs it; cancelling `scope` is the device model stopping."""
        with self.scope:
            await self.link.run()


@dataclass
class World:
    lender: ReferenceLender
    guests: list[Guest]
    nursery: trio.Nursery


@contextlib.asynccontextmanager
async def lender_world(
    tmp_path: Path,
    *,
    guest_ids: tuple[int, ...] = (1, 2),
    features: int = FEATURES_KNOWN,
    support: Callable[[], DmabufSupport] | None = None,
    **lender_options: object,
) -> AsyncIterator[World]:
    """A reference lender (64 KiB of VRAM unless `vram` says otherwise) and one device model
    per guest id, each link offering `features`; `support` makes each engine's DmabufSupport
    (default: the real kernel's). Yields once every guest's session is populated."""
    path = str(tmp_path / "lender.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(8)
    lender = ReferenceLender(**{"vram": 64 * KiB, "seed": 1, **lender_options})  # type: ignore[arg-type]
    guests = []
    for guest_id in guest_ids:
        engine = LeaseEngine(APERTURE, GRANULE, DeviceCounters(), EngineConfig())
        if support is not None:
            engine.dmabuf = support()
        link = LenderLink(engine, path, guest_id, name=f"devmodel-{guest_id}", features=features)
        guests.append(Guest(guest_id, engine, link, trio.CancelScope()))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lender.serve, listener)
            for g in guests:
                nursery.start_soon(g.run)
            with trio.fail_after(STEP):
                while len([s for s in lender.sessions if s.populated.is_set()]) < len(guests):
                    await trio.sleep(0.01)
            yield World(lender, guests, nursery)
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
        lender.close()
        for g in guests:
            g.engine.close()


async def churn(w: World, seed: int, rounds: int = 600) -> list[tuple[int, int]]:
    """Random 8-byte writes over 96 chunks per guest (16 fit in 64 KiB of VRAM: most writes
    evict), then every byte read back; returns the (guest id, offset) of each mismatch (the
    caller wants none). Reads of never-written memory must be zeros, never the poison of freed
    VRAM."""
    rng = random.Random(seed)
    by_id = {g.guest_id: g for g in w.guests}
    model: dict[tuple[int, int], bytes] = {}
    for _ in range(rounds):
        g = rng.choice(w.guests)
        offset = rng.randrange(96) * GRANULE + rng.randrange(GRANULE // 8) * 8
        data = rng.randbytes(8)
        await g.engine.write(offset, data)
        model[g.guest_id, offset] = data
    mismatches = []
    for (guest_id, offset), data in model.items():
        if await by_id[guest_id].engine.read(offset, 8) != data:
            mismatches.append((guest_id, offset))
    for g in w.guests:
        got = await g.engine.read(APERTURE - 8, 8)
        if got != bytes(8) or POISON in got:
            mismatches.append((g.guest_id, APERTURE - 8))
    return mismatches


def mapped_heaps() -> int:
    """How many mappings of the lender's VRAM heaps (memfds vram-heapN, or udmabufs made from
    them: /proc/self/maps names a udmabuf mapping after its dma-buf, "/dmabuf:") exist in
    this process: after every lease is revoked, none may."""
    with open("/proc/self/maps") as maps:
        return sum(("/memfd:vram-heap" in line or "/dmabuf:" in line) for line in maps)
