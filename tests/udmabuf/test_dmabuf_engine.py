"""The lease engine serving real udmabufs (marker `udmabuf`): mapped range, sync-bracketed
accesses that reach the lender's pages, and the revoke guarantee (docs/lease-protocol.md 9.3):
after REVOKED no mapping and no fd of the buffer is left, and poison the lender writes then
never reaches the guest."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from devmodel.leases.dmabuf import udmabuf_create, udmabuf_missing
from devmodel.leases.engine import LeaseEngine
from devmodel.testing import FakeLender, make_engine, memfd, pattern, spawn
from devmodel_wire.lease.constants import FdKind, PageInStatus, RevokeMode

MISSING = udmabuf_missing()
pytestmark = [
    pytest.mark.udmabuf,
    pytest.mark.skipif(MISSING is not None, reason=f"needs udmabuf: {MISSING}"),
]

PAGE = 4096
APERTURE = 1 << 20
DMABUF = int(FdKind.DMABUF)


def dmabuf_mappings() -> list[int]:
    """Sizes of this process's mappings of dma-bufs."""
    sizes = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "/dmabuf:" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                sizes.append(hi - lo)
    return sizes


def dmabuf_fds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "/dmabuf:" in os.readlink(f"/proc/self/fd/{name}"):
                found.add(int(name))
    return found


class Rig:
    def __init__(self) -> None:
        self.engine: LeaseEngine = make_engine(APERTURE)
        self.lender = FakeLender(self.engine)

    def udmabuf(self, size: int, name: str, fill: bytes = b"") -> tuple[int, int]:
        """(memfd, udmabuf of all of it), both closed at the end of the test."""
        heap = self.lender.own(memfd(size, name, fill=fill))
        return heap, self.lender.own(udmabuf_create(heap, 0, size))


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.engine.close()
    r.lender.close()


async def test_udmabuf_lease_is_served_through_a_mapping_of_its_range(rig: Rig) -> None:
    e = rig.engine
    contents = pattern(4, 16 * PAGE)
    heap, buf = rig.udmabuf(16 * PAGE, "engine-heap", contents)
    rig.lender.grant(32 * PAGE, 4 * PAGE, buf, 8 * PAGE, flags=DMABUF)
    assert dmabuf_mappings() == [4 * PAGE]
    assert await e.read(33 * PAGE + 16, 8) == contents[9 * PAGE + 16 : 9 * PAGE + 24]
    await e.write(35 * PAGE, b"udmabuf!")
    assert os.pread(heap, 8, 11 * PAGE) == b"udmabuf!"
    assert e.counters.failed_accesses == 0


async def test_after_revoked_nothing_maps_or_holds_the_buffer_and_poison_stays_out(
    rig: Rig,
) -> None:
    e, lender = rig.engine, rig.lender
    contents = pattern(9, 4 * PAGE)
    old_heap, old = rig.udmabuf(4 * PAGE, "engine-old", contents)
    mine = dmabuf_fds()
    lease = lender.grant(8 * PAGE, 4 * PAGE, old, 0, flags=DMABUF)
    assert await e.read(9 * PAGE, 8) == contents[PAGE : PAGE + 8]
    # The engine's kept fd, and the one Python's mmap keeps with the mapping.
    assert len(dmabuf_fds() - mine) == 2 and dmabuf_mappings() == [4 * PAGE]

    await e.revoke(lease, RevokeMode.EVICT)
    assert dmabuf_mappings() == [] and dmabuf_fds() == mine and e.kept_fds == 0
    os.pwrite(old_heap, b"\xde\xad" * (2 * PAGE), 0)  # the lender reuses the pages at once

    new_heap, new = rig.udmabuf(16 * PAGE, "engine-new", bytes(16 * PAGE))
    os.pwrite(new_heap, contents, 12 * PAGE)
    async with trio.open_nursery() as nursery:
        boxes = [spawn(nursery, e.read, 8 * PAGE + i * PAGE + 8, 8) for i in range(4)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(lender.page_ins) == 1
        pi = lender.take()
        lender.grant(pi.offset, pi.length, new, 12 * PAGE, flags=DMABUF)
        e.page_in_done(pi.request_id, PageInStatus.OK)
    for i, box in enumerate(boxes):
        assert box.get() == contents[i * PAGE + 8 : i * PAGE + 16]
    for at in range(8 * PAGE, 12 * PAGE, 512):
        assert await e.read(at, 8) != b"\xde\xad" * 4
    await e.revoke(lender.granted[-1], RevokeMode.RELEASE)
    assert dmabuf_mappings() == [] and e.kept_fds == 0
    assert e.counters.failed_accesses == 0


async def test_lender_lost_drops_every_udmabuf_mapping(rig: Rig) -> None:
    e = rig.engine
    _, buf = rig.udmabuf(8 * PAGE, "engine-lost")
    for i in range(8):
        rig.lender.grant(i * PAGE, PAGE, buf, i * PAGE, flags=DMABUF)
    assert dmabuf_mappings() == [PAGE] * 8
    e.lender_lost()
    assert dmabuf_mappings() == [] and e.kept_fds == 0
    assert await e.read(0, 8) == b"\xff" * 8
