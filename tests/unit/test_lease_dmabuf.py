"""dma-buf leases without udmabuf: the protocol's fd kind and feature, the borrower's checks,
and the engine's mapping, sync bracketing and revoke, with memfds standing in for dma-bufs.

The same paths against real udmabufs are tests/udmabuf/test_dmabuf_*.py (marker `udmabuf`).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import devmodel_wire.lease as lp
from devmodel.leases.backing import GrantRefused
from devmodel.leases.dmabuf import (
    DMA_BUF_IOCTL_SYNC,
    DMA_BUF_SYNC_END,
    DMA_BUF_SYNC_READ,
    DMA_BUF_SYNC_START,
    DMA_BUF_SYNC_WRITE,
    UDMABUF_CREATE,
    DmabufSupport,
    dmabuf_facts,
    exporter_name,
    udmabuf_missing,
)
from devmodel.leases.engine import LeaseEngine
from devmodel.leases.grant_checks import check_grant_fd
from devmodel.testing import (
    PAGE,
    RO,
    RW,
    FakeLender,
    lender_link_rig,
    make_engine,
    memfd,
    memfd_is_mapped,
    pattern,
    sealed_memfd,
    spawn,
)
from devmodel_wire.lease.checks import (
    DMABUF_EXPORTERS,
    O_RDWR,
    O_WRONLY,
    DmabufFacts,
    check_dmabuf_facts,
    check_grant,
    fd_kind_problem,
)
from devmodel_wire.lease.constants import (
    FEATURE_DMABUF_GRANTS,
    GRANT_FD_KIND_MASK,
    FdKind,
    NackReason,
)
from devmodel_wire.lease.wire import decode_message, encode
from tests.unit.dmabuf_support import SyncLog, fake_dmabuf_support
from tests.unit.lease_engine_support import APERTURE, EVICT, RELEASE, S
from tests.unit.lease_protocol_support import GRANULE, borrower_hello

DMABUF = int(FdKind.DMABUF)
START_R = DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ
END_R = DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ
START_W = DMA_BUF_SYNC_START | DMA_BUF_SYNC_WRITE
END_W = DMA_BUF_SYNC_END | DMA_BUF_SYNC_WRITE

u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)


# ---------------------------------------------------------------------------- the kernel ABI


def test_ioctl_numbers_are_the_kernels() -> None:
    # From linux/udmabuf.h and linux/dma-buf.h, as _IOW() computes them on x86 and arm64.
    assert UDMABUF_CREATE == 0x40187542
    assert DMA_BUF_IOCTL_SYNC == 0x40086200


def test_a_memfd_has_no_exporter_and_is_no_dma_buf() -> None:
    fd = memfd(PAGE)
    try:
        assert exporter_name(fd) is None
        facts = dmabuf_facts(fd)
        assert facts is not None and facts.exporter is None
        # Called a dma-buf, the borrower refuses it: nothing names its exporter.
        assert check_grant_fd(fd, fd_offset=0, length=PAGE, prot=RW, kind=DMABUF) is (
            NackReason.BAD_FD
        )
    finally:
        os.close(fd)


def test_udmabuf_missing_names_the_device(tmp_path: Path) -> None:
    why = udmabuf_missing(str(tmp_path / "udmabuf"))
    assert why is not None and "udmabuf" in why and "missing" in why


# ---------------------------------------------------------------------------- protocol


@given(lease=u64, offset=u64, length=u64, fd_offset=u64, prot=u32, flags=u32)
def test_grant_flags_round_trip_and_carry_the_fd_kind(
    lease: int, offset: int, length: int, fd_offset: int, prot: int, flags: int
) -> None:
    grant = lp.Grant(lease, offset, length, fd_offset, prot, 5, flags)
    got = decode_message(encode(grant), [5])
    assert got == grant
    assert isinstance(got, lp.Grant) and got.fd_kind == flags & GRANT_FD_KIND_MASK


@given(flags=u32, features=u64)
def test_fd_kind_needs_its_feature(flags: int, features: int) -> None:
    kind = flags & 0xFF
    acceptable = flags <= 0xFF and (
        kind == FdKind.MEMFD or (kind == FdKind.DMABUF and bool(features & FEATURE_DMABUF_GRANTS))
    )
    assert (fd_kind_problem(flags, features) is None) == acceptable
    grant = lp.Grant(1, 0, GRANULE, 0, RW, 3, flags)
    reason = check_grant(grant, aperture_size=1 << 30, granule=GRANULE, features=features)
    assert reason == (None if acceptable else NackReason.UNSUPPORTED_FLAGS)


def _session(offered: int, accepted: int) -> tuple[lp.BorrowerConnection, lp.LenderConnection]:
    borrower, lender = lp.BorrowerConnection(), lp.LenderConnection()
    lender.receive_data(borrower.send(borrower_hello(features=offered)).data)
    assert isinstance(lender.next_event(), lp.Hello)
    borrower.receive_data(lender.send(lender.hello_reply("l", features=accepted)).data)
    assert isinstance(borrower.next_event(), lp.Hello)
    return borrower, lender


@given(offered=u64, accepted=u64)
def test_a_peer_that_did_not_accept_dmabuf_grants_is_never_sent_one(
    offered: int, accepted: int
) -> None:
    borrower, lender = _session(offered, accepted)
    agreed = offered & accepted
    assert borrower.features == lender.features == agreed
    dmabuf = lp.Grant(1, 0, GRANULE, 0, RW, 3, DMABUF)
    if agreed & FEATURE_DMABUF_GRANTS:
        borrower.receive_data(lender.send(dmabuf).data, [os.dup(0)])
        got = borrower.next_event()
        assert isinstance(got, lp.Grant) and got.fd_kind == FdKind.DMABUF
        os.close(got.fd)
        assert borrower.check_grant(got) is None
    else:
        with pytest.raises(lp.LeaseProtocolError) as info:
            lender.send(dmabuf)
        assert not info.value.fatal and "feature" in str(info.value)
        assert lender.awaiting_answers() == frozenset()
        # Whatever a buggy lender puts on the wire anyway, the borrower NACKs.
        assert borrower.check_grant(dmabuf) is NackReason.UNSUPPORTED_FLAGS
    # A memfd grant is fine either way.
    assert borrower.check_grant(lp.Grant(2, 0, GRANULE, 0, RW, 3)) is None


def test_a_1_0_lender_leaves_the_feature_out() -> None:
    # A lender that knows no feature answers 0 (6.3): its sessions stay memfd-only.
    borrower, _ = _session(FEATURE_DMABUF_GRANTS, 0)
    assert borrower.features == 0
    grant = lp.Grant(1, 0, GRANULE, 0, RW, 3, DMABUF)
    assert borrower.check_grant(grant) is NackReason.UNSUPPORTED_FLAGS


exporters = st.sampled_from(["udmabuf", "amdgpu", "i915", "", "udmabuf "]) | st.none()


@given(
    exporter=exporters,
    mode=st.sampled_from([os.O_RDONLY, O_WRONLY, O_RDWR]),
    size=st.none() | st.integers(0, 1 << 40),
    fd_offset=st.integers(0, 1 << 40),
    length=st.integers(1, 1 << 40),
    prot=st.sampled_from([1, 3]),
)
def test_dmabuf_facts_verdict(
    exporter: str | None, mode: int, size: int | None, fd_offset: int, length: int, prot: int
) -> None:
    facts = DmabufFacts(exporter, mode, size)
    reason = check_dmabuf_facts(facts, fd_offset=fd_offset, length=length, prot=prot)
    unusable = mode == O_WRONLY or (prot == 3 and mode != O_RDWR) or size is None
    if exporter not in DMABUF_EXPORTERS or unusable:
        assert reason is NackReason.BAD_FD
    elif size is not None and fd_offset + length > size:
        assert reason is NackReason.FD_TOO_SMALL
    else:
        assert reason is None
    # The allow-list is the caller's to widen: then the same facts pass the exporter test.
    if exporter is not None:
        widened = check_dmabuf_facts(
            facts,
            fd_offset=fd_offset,
            length=length,
            prot=prot,
            exporters=frozenset({exporter}),
        )
        if exporter in DMABUF_EXPORTERS:
            assert widened == reason


# ---------------------------------------------------------------------------- engine


class Rig:
    def __init__(self) -> None:
        self.engine: LeaseEngine = make_engine(APERTURE)
        self.lender = FakeLender(self.engine)
        self.sync = SyncLog()
        self.engine.dmabuf = fake_dmabuf_support(self.sync)

    @property
    def support(self) -> DmabufSupport:
        return self.engine.dmabuf

    def buf(self, size: int, name: str, fill: bytes = b"") -> int:
        return self.lender.own(memfd(size, name, fill=fill))


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.engine.close()
    r.lender.close()


def _maps_of(name: str) -> list[tuple[int, int]]:
    """(size, file offset) of every mapping of memfd `name` in this process."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if f"/memfd:{name} " in line:
                span, _perms, offset, *_ = line.split()
                lo, hi = (int(x, 16) for x in span.split("-"))
                found.append((hi - lo, int(offset, 16)))
    return found


async def test_a_dmabuf_lease_maps_only_its_range_and_brackets_every_access(rig: Rig) -> None:
    e, sync = rig.engine, rig.sync
    contents = pattern(3, 8 * PAGE)
    buf = rig.buf(8 * PAGE, "dmabuf-range", contents)
    rig.lender.grant(16 * PAGE, 2 * PAGE, buf, 4 * PAGE, flags=DMABUF)
    w = e.window_at(16 * PAGE)
    assert w is not None and w.mem is not None
    assert _maps_of("dmabuf-range") == [(2 * PAGE, 4 * PAGE)]
    assert sync.calls == []  # a grant touches nothing
    # Every access is bracketed, with the lease's own fd: the fast path...
    assert e.read_now(17 * PAGE + 8, 8) == contents[5 * PAGE + 8 : 5 * PAGE + 16]
    assert sync.calls == [(w.fd, START_R), (w.fd, END_R)]
    sync.calls.clear()
    assert e.write_now(16 * PAGE, b"written!")
    assert sync.flags == [START_W, END_W]
    assert os.pread(buf, 8, 4 * PAGE) == b"written!"  # shared: the lender sees it
    # ...and the awaited access alike.
    sync.calls.clear()
    assert await e.read(16 * PAGE, 8) == b"written!"
    await e.write(17 * PAGE, b"again...")
    assert sync.flags == [START_R, END_R, START_W, END_W]
    # Past the granted range nothing is mapped: an access straddling the end fails.
    assert e.read_now(18 * PAGE - 4, 8) is None
    assert e.counters.failed_accesses == 0


async def test_a_failing_sync_gives_the_failure_policy_not_an_exception(rig: Rig) -> None:
    e, sync = rig.engine, rig.sync
    buf = rig.buf(PAGE, "dmabuf-sync-fails", b"\x11" * PAGE)
    rig.lender.grant(0, PAGE, buf, 0, flags=DMABUF)
    sync.failing = {START_R}
    assert await e.read(0, 8) == b"\xff" * 8
    # The fast path tried, then the slow path; no copy and no END for a START that failed.
    assert sync.flags == [START_R, START_R]
    sync.calls.clear()
    sync.failing = {END_W}
    await e.write(0, b"abcdefgh")
    assert sync.flags == [START_W, END_W, START_W, END_W]
    assert e.counters.failed_accesses == 2


async def test_a_read_only_dmabuf_lease_drops_writes_without_touching_it(rig: Rig) -> None:
    e = rig.engine
    buf = rig.buf(PAGE, "dmabuf-ro", b"\x22" * PAGE)
    rig.lender.grant(0, PAGE, buf, 0, prot=RO, flags=DMABUF)
    await e.write(0, b"nope....")
    assert rig.sync.calls == [] and e.counters.failed_accesses == 1
    assert await e.read(0, 8) == b"\x22" * 8


async def test_revoke_unmaps_and_closes_before_revoked_and_poison_never_shows(rig: Rig) -> None:
    """docs/lease-protocol.md 9.3 for a dma-buf lease: after REVOKED nothing maps the buffer,
    no fd of it is held, and what the lender writes into it afterwards never reaches the guest."""
    e, lender = rig.engine, rig.lender
    name = "dmabuf-poison"
    contents = pattern(7, 4 * PAGE)
    old = rig.buf(4 * PAGE, name, contents)
    lease = lender.grant(8 * PAGE, 4 * PAGE, old, 0, flags=DMABUF)
    w = e.window_at(8 * PAGE)
    assert w is not None
    kept = w.fd
    assert await e.read(9 * PAGE, 8) == contents[PAGE : PAGE + 8]
    assert memfd_is_mapped(name) and len(rig.support.mapped) == 1

    await e.revoke(lease, EVICT)
    assert not memfd_is_mapped(name) and not rig.support.mapped
    with pytest.raises(OSError) as info:
        os.fstat(kept)
    assert info.value.errno == errno.EBADF
    assert e.kept_fds == 0
    os.pwrite(old, b"\xde\xad" * (2 * PAGE), 0)  # the lender reuses the pages at once

    new = rig.buf(16 * PAGE, "dmabuf-poison-new", bytes(16 * PAGE))
    os.pwrite(new, contents, 12 * PAGE)
    async with trio.open_nursery() as nursery:
        boxes = [spawn(nursery, e.read, 8 * PAGE + i * PAGE + 8, 8) for i in range(4)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(lender.page_ins) == 1  # the poison never answered a read
        pi = lender.take()
        lender.grant(pi.offset, pi.length, new, 12 * PAGE, flags=DMABUF)
        e.page_in_done(pi.request_id, lp.PageInStatus.OK)
    for i, box in enumerate(boxes):
        assert box.get() == contents[i * PAGE + 8 : i * PAGE + 16]
    for at in range(8 * PAGE, 12 * PAGE, 512):
        assert await e.read(at, 8) != b"\xde\xad" * 4
    await e.revoke(lender.granted[-1], RELEASE)
    assert not rig.support.mapped and e.kept_fds == 0


async def test_revoke_waits_for_unmap_hooks_with_the_mapping_still_in_place(rig: Rig) -> None:
    e = rig.engine
    buf = rig.buf(PAGE, "dmabuf-hook")
    lease = rig.lender.grant(0, PAGE, buf, 0, flags=DMABUF)
    seen: list[bool] = []

    async def unmap(start: int, length: int) -> None:
        await trio.sleep(0)
        seen.append(memfd_is_mapped("dmabuf-hook"))

    e.unmap_hooks.append(unmap)
    await e.revoke(lease, EVICT)
    assert seen == [True] and not memfd_is_mapped("dmabuf-hook")


async def test_lender_lost_and_close_drop_every_mapping(rig: Rig) -> None:
    e = rig.engine
    buf = rig.buf(4 * PAGE, "dmabuf-lost")
    for i in range(4):
        rig.lender.grant(i * PAGE, PAGE, buf, i * PAGE, flags=DMABUF)
    assert len(_maps_of("dmabuf-lost")) == 4
    e.lender_lost()
    assert _maps_of("dmabuf-lost") == [] and e.kept_fds == 0
    assert await e.read(0, 4) == b"\xff" * 4
    rig.lender.grant(8 * PAGE, PAGE, buf, 0, flags=DMABUF)
    e.close()
    assert _maps_of("dmabuf-lost") == []


def test_refused_dmabufs_are_nacked_closed_and_change_nothing(rig: Rig) -> None:
    e = rig.engine
    buf = rig.buf(2 * PAGE, "dmabuf-refused")
    before = e.kept_fds

    def refused(reason: NackReason, fd: int, length: int = PAGE, prot: int = RW) -> None:
        with pytest.raises(GrantRefused) as info:
            e.grant(1, 0, length, 0, prot, fd, DMABUF)
        assert info.value.reason is reason, info.value
        with pytest.raises(OSError):
            os.fstat(fd)  # consumed
        assert e.kept_fds == before and e.window_at(0) is None and not rig.support.mapped

    refused(NackReason.FD_TOO_SMALL, os.dup(buf), length=4 * PAGE)
    refused(NackReason.BAD_FD, os.open(f"/proc/self/fd/{buf}", os.O_RDONLY))
    # An exporter outside the allow-list.
    e.dmabuf = fake_dmabuf_support(rig.sync, exporter="amdgpu")
    refused(NackReason.BAD_FD, os.dup(buf))
    # An exporter that refuses mmap: a pipe maps nothing.
    r, w = os.pipe()
    os.close(w)
    e.dmabuf = DmabufSupport(inspect=lambda fd: DmabufFacts("udmabuf", os.O_RDWR, 1 << 20))
    refused(NackReason.BAD_FD, r)
    assert rig.sync.calls == []


# ---------------------------------------------------------------------------- lender link


@pytest.mark.parametrize("agreed", [True, False], ids=["dmabuf-grants", "memfd-only"])
async def test_link_takes_dmabuf_grants_only_in_a_session_that_agreed(
    tmp_path: Path, agreed: bool
) -> None:
    async with lender_link_rig(tmp_path) as r:
        sync = SyncLog()
        r.engine.dmabuf = fake_dmabuf_support(sync)
        peer = await r.lender.accept()
        offer = await peer.event()
        assert isinstance(offer, lp.Hello) and offer.features & FEATURE_DMABUF_GRANTS
        features = FEATURE_DMABUF_GRANTS if agreed else 0
        await peer.send(peer.conn.hello_reply("fake", features=features))
        fd = sealed_memfd(2 * PAGE, "link-dmabuf")
        try:
            os.pwrite(fd, b"via dmabuf", PAGE)
            grant = lp.Grant(1, 0, 2 * PAGE, 0, RW, fd, DMABUF)
            if agreed:
                await peer.send(grant)
            else:
                await peer.send_encoded(grant, [fd])  # a lender that breaks the rule
            answer = await peer.event()
        finally:
            os.close(fd)
        if agreed:
            assert answer == lp.GrantAck(1)
            assert await r.engine.read(PAGE, 10) == b"via dmabuf"
            assert sync.flags == [START_R, END_R]
            await peer.revoke(1)
            assert not memfd_is_mapped("link-dmabuf") and r.engine.kept_fds == 0
        else:
            assert isinstance(answer, lp.GrantNack)
            assert answer.reason == NackReason.UNSUPPORTED_FLAGS
            assert r.engine.kept_fds == 0 and r.engine.window_at(0) is None
            assert re.search("flags 0x1", answer.text)
        assert r.engine.window_at(0) is None or r.engine.window_at(0).state is S.EVICTED  # type: ignore[union-attr]
