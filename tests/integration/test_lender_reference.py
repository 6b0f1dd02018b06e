"""The reference lender (examples/) in-process, with real LenderLinks and LeaseEngines.

Two guests share a VRAM budget far smaller than their apertures: every access is served,
contents survive eviction and moves byte for byte, poison written into freed VRAM never
reaches a guest, and nothing of a revoked lease stays open in the device model.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from tests.integration.lender_world import APERTURE, GRANULE, KiB, churn, lender_world

from lender_vram import Extent, Heap, Lru, Vram  # isort: skip
from reference_lender import POISON  # isort: skip

# A guard against a hang, not a measure.
STEP = 5.0


def test_heap_allocates_aligned_first_fit_and_coalesces() -> None:
    heap = Heap(64 * KiB)
    a = heap.alloc(8 * KiB, 8 * KiB)
    b = heap.alloc(4 * KiB, 4 * KiB)
    c = heap.alloc(8 * KiB, 8 * KiB)
    assert (a, b, c) == (0, 8 * KiB, 16 * KiB)
    heap.free(8 * KiB, 4 * KiB)
    assert heap.alloc(4 * KiB, 4 * KiB, avoid=8 * KiB) == 12 * KiB
    with pytest.raises(ValueError, match="double free"):
        heap.free(8 * KiB, 4 * KiB)
    heap.free(0, 8 * KiB)
    heap.free(12 * KiB, 4 * KiB)
    heap.free(16 * KiB, 8 * KiB)
    assert heap.holes() == [(0, 64 * KiB)]
    assert heap.alloc_at(20 * KiB, 4 * KiB)
    assert not heap.alloc_at(20 * KiB, 4 * KiB)
    assert heap.free_bytes == 60 * KiB
    assert heap.alloc(64 * KiB, 4 * KiB) is None


def test_vram_goes_home_or_moves_and_keeps_the_budget() -> None:
    rng = random.Random(3)
    vram = Vram(64 * KiB, heaps=4)
    assert (vram.heap_size, vram.capacity) == (16 * KiB, 64 * KiB)
    first = vram.allocate(4 * KiB, 4 * KiB, rng)
    assert first is not None
    vram.release(first)
    assert vram.allocate(4 * KiB, 4 * KiB, rng, home=first) == first
    vram.release(first)
    moved = vram.allocate(4 * KiB, 4 * KiB, rng, home=first, move=True)
    assert moved is not None and moved != first and moved.heap != first.heap
    vram.release(moved)
    # When home is the only room left, staying beats evicting another buffer to move.
    assert vram.allocate(4 * KiB, 4 * KiB, rng, home=first) == first
    others = [vram.allocate(4 * KiB, 4 * KiB, rng) for _ in range(15)]
    vram.release(first)
    assert vram.allocate(4 * KiB, 4 * KiB, rng, home=first, move=True) == first
    for extent in [first, *others]:
        assert extent is not None
        vram.release(extent)
    taken = [vram.allocate(4 * KiB, 4 * KiB, rng) for _ in range(16)]
    assert all(isinstance(e, Extent) for e in taken)
    assert vram.allocate(4 * KiB, 4 * KiB, rng) is None
    assert vram.used == vram.peak == 64 * KiB and vram.free_bytes == 0


def test_lru_orders_by_last_touch() -> None:
    lru: Lru[str] = Lru()
    for key in "abc":
        lru.touch(key)
    lru.touch("a")
    assert list(lru) == ["b", "c", "a"]
    assert lru.oldest() == "b"
    assert lru.oldest(lambda k: k != "b") == "c"
    lru.discard("c")
    assert "c" not in lru and len(lru) == 2


async def test_two_guests_share_a_small_vram_and_keep_every_byte(tmp_path: Path) -> None:
    async with lender_world(tmp_path, move_probability=0.5, poison=True) as w:
        lender = w.lender
        assert lender.stats.staged == 2 * (APERTURE // GRANULE) - 16
        # 2 x 96 chunks written, 16 fit in VRAM: most writes evict someone. Nothing was ever
        # written at the aperture's end: zeros there, never the poison of freed VRAM.
        assert await churn(w, seed=5) == []
        stats = lender.stats
        assert stats.evictions > 100 and stats.moves > 20 and stats.page_in_failures == 0
        assert stats.vram_peak <= stats.vram_capacity == 64 * KiB
        for g in w.guests:
            assert g.engine.counters.failed_accesses == 0
            assert g.engine.counters.page_ins > 50


async def test_evict_all_leaves_no_fd_and_contents_come_back(tmp_path: Path) -> None:
    async with lender_world(tmp_path, poison=True, move_probability=1.0) as w:
        for g in w.guests:
            for i in range(8):
                await g.engine.write(i * GRANULE, f"g{g.guest_id} w{i}".encode().ljust(8))
        assert all(g.engine.kept_fds > 0 for g in w.guests)
        with trio.fail_after(STEP):
            evicted = await w.lender.evict_all()
        assert evicted > 0 and w.lender.resident() == []
        for g in w.guests:
            # After REVOKED the device model holds nothing of the lender's memory.
            assert g.engine.kept_fds == 0 and g.engine.lease_count == 0
        for g in w.guests:
            for i in range(8):
                got = await g.engine.read(i * GRANULE, 8)
                assert got == f"g{g.guest_id} w{i}".encode().ljust(8)
                assert POISON not in got


async def test_evict_one_lease_by_guest_and_id(tmp_path: Path) -> None:
    async with lender_world(tmp_path, guest_ids=(9,)) as w:
        engine = w.guests[0].engine
        await engine.write(0, b"one leas")
        (guest, lease), *_ = [r for r in w.lender.resident() if r[1] == 1]
        assert guest == 9
        assert await w.lender.evict(9, lease)
        assert not await w.lender.evict(9, lease)  # not resident any more
        assert not await w.lender.evict(4, lease)  # no such guest
        before = engine.counters.page_ins
        assert await engine.read(0, 8) == b"one leas"
        assert engine.counters.page_ins == before + 1


async def test_random_revocations_never_fail_an_access(tmp_path: Path) -> None:
    async with lender_world(tmp_path, revoke_rate=400.0, move_probability=0.3) as w:
        rng = random.Random(9)
        model: dict[tuple[int, int], bytes] = {}
        with trio.fail_after(20):
            for i in range(400):
                g = w.guests[i % 2]
                offset = rng.randrange(24) * GRANULE + 8 * (i % 64)
                if rng.random() < 0.5:
                    data = i.to_bytes(8, "little")
                    await g.engine.write(offset, data)
                    model[g.guest_id, offset] = data
                else:
                    expected = model.get((g.guest_id, offset), bytes(8))
                    assert await g.engine.read(offset, 8) == expected
                if i % 20 == 0:
                    await trio.sleep(0.005)  # let the revoker run
        assert w.lender.stats.random_evictions > 0
        assert all(g.engine.counters.failed_accesses == 0 for g in w.guests)


async def test_a_guest_leaving_gives_its_vram_back(tmp_path: Path) -> None:
    async with lender_world(tmp_path) as w:
        lender = w.lender
        assert lender.stats.vram_used == 64 * KiB
        leaving = w.guests[0]
        await leaving.engine.write(0, b"bye bye!")
        # Stop that device model's link: it drops its leases, says BYE, disconnects.
        leaving.scope.cancel()
        with trio.fail_after(STEP):
            while lender.stats.guests_connected == 2:
                await trio.sleep(0.01)
        stay = w.guests[1]
        # The other guest can now have all of the VRAM.
        for i in range(16):
            await stay.engine.write(i * GRANULE, b"mine now")
        assert lender.stats.quarantined == 0
        assert stay.engine.counters.failed_accesses == 0
        assert lender.stats.vram_used == 64 * KiB
        assert all(r[0] == stay.guest_id for r in lender.resident())
