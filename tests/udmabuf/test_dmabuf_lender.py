"""The reference lender with `--fd-kind dmabuf` lending real udmabufs (marker `udmabuf`).

In process: two device models (LeaseEngine + LenderLink) share a VRAM budget far smaller than
their apertures, so most accesses evict someone; every byte survives eviction and moves, the
poison written into freed VRAM never shows, and after evicting everything no dma-buf is mapped
or held. As three processes: the reference lender, `devmodel run --lender-socket` and a
vfio-user client playing the guest, reading and writing BAR0 under eviction.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio

from devmodel.leases.dmabuf import udmabuf_missing
from tests.integration.lender_processes import (
    FAILED_ACCESSES,
    OFFSETS,
    PAGE_INS,
    RESIDENT,
    REVOKES,
    WINDOWS,
    devmodel_maps_and_fds,
    lent_guest,
    pattern,
    processes,
    wait_for,
)
from tests.integration.lender_world import STEP, churn, lender_world, mapped_heaps

MISSING = udmabuf_missing()
pytestmark = [
    pytest.mark.udmabuf,
    pytest.mark.skipif(MISSING is not None, reason=f"needs udmabuf: {MISSING}"),
]

__all__ = ["processes"]  # the fixture, used by name


async def test_two_guests_borrow_udmabufs_under_eviction_with_zero_mismatches(
    tmp_path: Path,
) -> None:
    async with lender_world(tmp_path, fd_kind="dmabuf", move_probability=0.5, poison=True) as w:
        assert all(s.dmabuf for s in w.lender.sessions)
        assert len(w.lender.heap_dmabufs) == len(w.lender.heap_fds)
        assert await churn(w, seed=11) == []
        stats = w.lender.stats
        assert stats.dmabuf_grants > 50 and stats.evictions > 100 and stats.moves > 20
        assert stats.page_in_failures == 0
        assert all(g.engine.counters.failed_accesses == 0 for g in w.guests)
        with trio.fail_after(STEP):
            await w.lender.evict_all()
        assert all(g.engine.kept_fds == 0 and g.engine.lease_count == 0 for g in w.guests)
        assert mapped_heaps() == 0


async def test_random_revocations_of_udmabuf_leases_never_fail_an_access(tmp_path: Path) -> None:
    async with lender_world(
        tmp_path, fd_kind="dmabuf", revoke_rate=400.0, move_probability=0.3
    ) as w:
        with trio.fail_after(60):
            assert await churn(w, seed=12, rounds=400) == []
        assert w.lender.stats.random_evictions > 0
        assert all(g.engine.counters.failed_accesses == 0 for g in w.guests)


def test_vfio_user_guest_reads_and_writes_bar0_backed_by_udmabufs(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    args = ("--fd-kind", "dmabuf", "--move-probability", "0.5", "--poison", "--seed", "7")
    with lent_guest(tmp_path, processes, 5, *args) as (lender, dm, guest):
        for w, k, offset in OFFSETS:
            guest.write(offset, pattern(w, k))
        mismatches = [hex(o) for w, k, o in OFFSETS if guest.read(o) != pattern(w, k)]
        assert mismatches == []
        # While leases are live, the device model maps udmabufs (the lender lent dma-bufs).
        assert "/dmabuf:" in devmodel_maps_and_fds(dm)
        revokes = guest.counter(REVOKES)
        page_ins = guest.counter(PAGE_INS)
        lender.proc.send_signal(signal.SIGUSR1)  # evict everything
        wait_for("the lender to revoke", lambda: guest.counter(REVOKES) >= revokes + RESIDENT)
        time.sleep(0.1)
        held = devmodel_maps_and_fds(dm)
        assert "/dmabuf:" not in held and "vram-heap" not in held and "swap-guest" not in held
        mismatches = [hex(o) for w, k, o in OFFSETS if guest.read(o) != pattern(w, k)]
        assert mismatches == []
        assert guest.counter(PAGE_INS) >= page_ins + WINDOWS
        assert guest.counter(FAILED_ACCESSES) == 0
    lender.proc.send_signal(signal.SIGTERM)
    out, _ = lender.proc.communicate(timeout=10)
    assert lender.proc.returncode == 0, lender.stderr()
    summary = out.decode()
    assert int(summary.split("dmabuf_grants:")[1].split()[0]) > 0
