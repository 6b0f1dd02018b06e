"""The reference lender's `--fd-kind dmabuf` without udmabuf: its heap memfds stand in for the
udmabufs it would make, and each device model's engine takes them for dma-bufs (an inspector
naming the exporter "udmabuf", a recording sync). What this shows: the lender lends through
the dma-buf path (fd kind, feature, one buffer per heap) with eviction, page-in and moves;
the engine maps, brackets and unmaps; a borrower without the feature is lent memfds. The same
workload against real udmabufs is tests/udmabuf/test_dmabuf_lender.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from devmodel.leases.dmabuf import DMA_BUF_SYNC_END, udmabuf_missing
from tests.integration.lender_world import STEP, churn, lender_world, mapped_heaps
from tests.unit.dmabuf_support import SyncLog, fake_dmabuf_support

from reference_lender import DmabufUnavailable, ReferenceLender  # isort: skip


def _dup(memfd: int, offset: int, size: int) -> int:
    """The stand-in for udmabuf_create: the heap memfd itself (offset 0, whole heap)."""
    assert offset == 0
    return os.dup(memfd)


async def test_dmabuf_lender_keeps_every_byte_under_eviction_and_moves(tmp_path: Path) -> None:
    log = SyncLog()
    async with lender_world(
        tmp_path,
        support=lambda: fake_dmabuf_support(log),
        fd_kind="dmabuf",
        make_dmabuf=_dup,
        move_probability=0.5,
        poison=True,
    ) as w:
        assert all(s.dmabuf for s in w.lender.sessions)
        assert await churn(w, seed=5) == []
        stats = w.lender.stats
        assert stats.dmabuf_grants > 50 and stats.evictions > 100 and stats.moves > 20
        assert stats.page_in_failures == 0
        for g in w.guests:
            assert g.engine.counters.failed_accesses == 0
        # Every access was bracketed: START before END, in pairs.
        starts = [f for f in log.flags if not f & DMA_BUF_SYNC_END]
        assert len(starts) * 2 == len(log.flags) and len(starts) >= 600
        assert all(
            a & ~DMA_BUF_SYNC_END == b & ~DMA_BUF_SYNC_END and not a & DMA_BUF_SYNC_END
            for a, b in zip(log.flags[::2], log.flags[1::2], strict=True)
        )
        with trio.fail_after(STEP):
            await w.lender.evict_all()
        for g in w.guests:
            assert g.engine.kept_fds == 0 and g.engine.lease_count == 0
        assert mapped_heaps() == 0


async def test_a_borrower_without_the_feature_is_lent_memfds(tmp_path: Path) -> None:
    log = SyncLog()
    async with lender_world(
        tmp_path,
        guest_ids=(1,),
        features=0,
        support=lambda: fake_dmabuf_support(log),
        fd_kind="dmabuf",
        make_dmabuf=_dup,
    ) as w:
        assert [s.dmabuf for s in w.lender.sessions] == [False]
        engine = w.guests[0].engine
        await engine.write(0, b"memfd!!!")
        assert await engine.read(0, 8) == b"memfd!!!"
        assert w.lender.stats.dmabuf_grants == 0 and log.calls == []
        assert all(win.mem is None for win in engine.windows())


def test_dmabuf_lender_fails_clearly_without_udmabuf() -> None:
    missing = udmabuf_missing()
    if missing is None:
        pytest.skip("this kernel has udmabuf: tests/udmabuf/ covers the lender there")
    with pytest.raises(DmabufUnavailable, match="udmabuf"):
        ReferenceLender(64 << 10, fd_kind="dmabuf")
