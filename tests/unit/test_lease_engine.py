"""The lease engine with real memfds: grant validation, resident access, revoke, page-in,
failure policy, lender loss, and the revoke invariant (DESIGN.md "Lease model",
docs/lease-protocol.md section 9).

Time-dependent behaviour (deadlines, coalescing, slow revokes, forward progress) is in
test_lease_engine_timing.py; the hypothesis state machine in test_lease_engine_state_machine.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from devmodel.leases.backing import GrantRefused
from devmodel.leases.engine import LeaseEngine, UnknownLease, UnmapHook
from devmodel.leases.policy import FailurePolicy
from devmodel.leases.states import IllegalTransition, WindowState
from devmodel.pci.errors import AccessError
from devmodel.testing import (
    F_ADD_SEALS,
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    PAGE,
    RO,
    RW,
    FakeLender,
    RecordedPageIn,
    fd_is_open,
    fds_of_memfd,
    hold_unmaps,
    make_engine,
    memfd,
    memfd_is_mapped,
    pattern,
    spawn,
)
from devmodel_wire.lease.constants import Access, NackReason, PageInStatus
from tests.unit.lease_engine_support import APERTURE, EVICT, RELEASE, S, state


@dataclass
class Rig:
    engine: LeaseEngine
    lender: FakeLender
    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def fd(
        self, size: int, name: str = "lease-test", *, seals: int = F_SEAL_SHRINK, fill: bytes = b""
    ) -> int:
        """A sealed memfd the lender owns (closed at the end of the test)."""
        return self.lender.own(memfd(size, name, seals=seals, fill=fill))

    def state(self, offset: int) -> WindowState:
        return state(self.engine, offset)

    def snapshot(self) -> object:
        """Everything a refused grant must leave as it was."""
        e = self.engine
        return (
            [
                (w.start, w.length, w.state, w.lease_id, w.fd, w.fd_offset, w.prot, w.request_id)
                for w in e.windows()
            ],
            e.lease_count,
            e.kept_fds,
            dict(e._live),
            {k: set(v) for k, v in e._evicted.items()},
            e.counters.as_dict(),
            list(self.events),
        )


@pytest.fixture
def rig() -> Iterator[Rig]:
    engine = make_engine(APERTURE)
    lender = FakeLender(engine)
    r = Rig(engine, lender)
    engine.on_event = lambda name, data: r.events.append((name, data))
    yield r
    engine.close()
    lender.close()


def engine_fds(rig: Rig, name: str) -> list[int]:
    """The fds of memfd `name` held by this process other than the lender's own."""
    own = set(rig.lender._own)
    return [fd for fd in fds_of_memfd(name) if fd not in own]


# ---------------------------------------------------------------------------- grant validation


def _refused(
    rig: Rig,
    reason: NackReason,
    lease: int,
    offset: int,
    length: int,
    fd_offset: int,
    prot: int,
    fd: int,
    flags: int = 0,
) -> None:
    """GRANT(lease, offset, length, fd_offset, prot, fd, flags) is NACKed with `reason`;
    nothing changed and the fd is closed."""
    before = rig.snapshot()
    with pytest.raises(GrantRefused) as info:
        rig.engine.grant(lease, offset, length, fd_offset, prot, fd, flags)
    assert info.value.reason is reason, info.value
    assert str(info.value)  # a text for the GRANT_NACK
    assert not fd_is_open(fd), "a refused grant must close its fd"
    assert rig.snapshot() == before


def test_grant_outside_aperture(rig: Rig) -> None:
    home = rig.fd(2 * APERTURE)
    for offset, length in [
        (APERTURE - PAGE, 2 * PAGE),  # crosses the end
        (APERTURE, PAGE),  # starts at the end
        (-PAGE, 2 * PAGE),
        (0, APERTURE + PAGE),
        (1 << 62, PAGE),
    ]:
        _refused(rig, NackReason.OUTSIDE_APERTURE, 1, offset, length, 0, RW, os.dup(home))


def test_grant_misaligned(rig: Rig) -> None:
    home = rig.fd(APERTURE)
    for offset, length, fd_offset in [
        (PAGE // 2, PAGE, 0),  # offset
        (0, PAGE + 512, 0),  # length
        (0, PAGE, 512),  # fd_offset
        (0, PAGE, PAGE + 1),
    ]:
        _refused(rig, NackReason.MISALIGNED, 1, offset, length, fd_offset, RW, os.dup(home))


def test_grant_of_length_zero_is_misaligned(rig: Rig) -> None:
    # docs/lease-protocol.md 9.2: MISALIGNED "... or `length` is 0".
    _refused(rig, NackReason.MISALIGNED, 1, 0, 0, 0, RW, os.dup(rig.fd(PAGE)))


def test_grant_fd_offset_must_be_granule_aligned() -> None:
    # docs/lease-protocol.md 9.2: MISALIGNED when fd_offset is not a multiple of the granule
    # (a 2 MiB window must come from a 2 MiB-aligned place to be mapped with huge pages).
    granule = 2 << 20
    engine = make_engine(16 << 20, granule)
    lender = FakeLender(engine)
    rig = Rig(engine, lender)
    try:
        home = rig.fd(8 << 20)
        _refused(rig, NackReason.MISALIGNED, 1, 0, granule, PAGE, RW, os.dup(home))
        lender.grant(0, granule, home, granule)
        assert rig.state(0) is S.RESIDENT
    finally:
        engine.close()
        lender.close()


def test_grant_overlapping_a_resident_lease(rig: Rig) -> None:
    home = rig.fd(APERTURE)
    rig.lender.grant(4 * PAGE, 4 * PAGE, home)
    for offset, length in [
        (4 * PAGE, 4 * PAGE),  # the same range
        (0, 5 * PAGE),  # overlaps the first granule
        (7 * PAGE, 2 * PAGE),  # overlaps the last granule
        (5 * PAGE, PAGE),  # inside
        (0, APERTURE),  # around
    ]:
        _refused(rig, NackReason.OVERLAPS_LIVE_LEASE, 9, offset, length, 0, RW, os.dup(home))
    # Adjacent on both sides is fine.
    rig.lender.grant(3 * PAGE, PAGE, home)
    rig.lender.grant(8 * PAGE, PAGE, home)


async def test_grant_overlapping_a_revoking_lease(rig: Rig) -> None:
    home = rig.fd(APERTURE)
    lease = rig.lender.grant(0, 2 * PAGE, home)
    release = hold_unmaps(rig.engine)
    async with trio.open_nursery() as nursery:
        done = spawn(nursery, rig.engine.revoke, lease, EVICT)
        await trio.testing.wait_all_tasks_blocked()
        assert rig.state(0) is S.REVOKING
        # A REVOKE sent but not yet answered: the lease is still live (9.1).
        _refused(rig, NackReason.OVERLAPS_LIVE_LEASE, 9, PAGE, PAGE, 0, RW, os.dup(home))
        release.set()
    done.get()
    assert rig.state(0) is S.EVICTED
    rig.lender.grant(PAGE, PAGE, home)


def test_grant_fd_too_small(rig: Rig) -> None:
    small = rig.fd(2 * PAGE)
    _refused(rig, NackReason.FD_TOO_SMALL, 1, 0, 4 * PAGE, 0, RW, os.dup(small))
    _refused(rig, NackReason.FD_TOO_SMALL, 1, 0, 2 * PAGE, PAGE, RW, os.dup(small))
    rig.lender.grant(0, PAGE, small, PAGE)  # exactly fits


def test_grant_fd_not_sealed(rig: Rig) -> None:
    unsealed = rig.fd(APERTURE, seals=0)
    _refused(rig, NackReason.FD_NOT_SEALED, 1, 0, PAGE, 0, RW, os.dup(unsealed))
    grow_only = rig.fd(APERTURE, seals=F_SEAL_GROW)
    _refused(rig, NackReason.FD_NOT_SEALED, 1, 0, PAGE, 0, RO, os.dup(grow_only))


def test_grant_bad_protection(rig: Rig) -> None:
    home = rig.fd(APERTURE)
    for prot in (0, 2, 4, 5, 7, 0xFFFFFFFF):
        _refused(rig, NackReason.BAD_PROTECTION, 1, 0, PAGE, 0, prot, os.dup(home))


def test_grant_duplicate_lease_id(rig: Rig) -> None:
    home = rig.fd(APERTURE)
    rig.engine.grant(5, 0, PAGE, 0, RW, os.dup(home))
    _refused(rig, NackReason.DUPLICATE_LEASE_ID, 5, 8 * PAGE, PAGE, 0, RW, os.dup(home))


async def test_grant_duplicate_of_an_evicted_lease_id(rig: Rig) -> None:
    home = rig.fd(APERTURE)
    rig.engine.grant(5, 0, PAGE, 0, RW, os.dup(home))
    await rig.engine.revoke(5, EVICT)
    _refused(rig, NackReason.DUPLICATE_LEASE_ID, 5, 8 * PAGE, PAGE, 0, RW, os.dup(home))


def test_grant_too_many_leases() -> None:
    engine = make_engine(APERTURE, max_leases=2)
    lender = FakeLender(engine)
    rig = Rig(engine, lender)
    try:
        home = rig.fd(APERTURE)
        lender.grant(0, PAGE, home)
        lender.grant(PAGE, PAGE, home)
        _refused(rig, NackReason.TOO_MANY_LEASES, 9, 2 * PAGE, PAGE, 0, RW, os.dup(home))
    finally:
        engine.close()
        lender.close()


async def test_too_many_leases_counts_live_leases_only() -> None:
    engine = make_engine(APERTURE, max_leases=1)
    lender = FakeLender(engine)
    try:
        home = lender.own(memfd(APERTURE))
        first = lender.grant(0, PAGE, home)
        await engine.revoke(first, EVICT)
        lender.grant(PAGE, PAGE, home)  # the evicted one holds nothing
    finally:
        engine.close()
        lender.close()


def test_grant_bad_fd(rig: Rig) -> None:
    # A closed fd number.
    closed = os.dup(rig.fd(PAGE))
    os.close(closed)
    _refused(rig, NackReason.BAD_FD, 1, 0, PAGE, 0, RW, closed)
    # Not a regular file: a pipe, a directory.
    r, w = os.pipe()
    os.close(w)
    _refused(rig, NackReason.BAD_FD, 1, 0, PAGE, 0, RO, r)
    _refused(rig, NackReason.BAD_FD, 1, 0, PAGE, 0, RO, os.open("/proc", os.O_RDONLY))
    # Open write-only: the engine cannot even read it.
    home = rig.fd(APERTURE)
    wronly = os.open(f"/proc/self/fd/{home}", os.O_WRONLY)
    _refused(rig, NackReason.BAD_FD, 1, 0, PAGE, 0, RO, wronly)


def test_grant_read_write_of_a_read_only_fd_is_bad_fd(rig: Rig) -> None:
    # docs/lease-protocol.md 9.2: BAD_FD when the fd "is not writable (open read-only, or
    # write-sealed) while prot asks for write"; BAD_PROTECTION is only for prot not 1 or 3.
    home = rig.fd(APERTURE)
    rdonly = os.open(f"/proc/self/fd/{home}", os.O_RDONLY)
    _refused(rig, NackReason.BAD_FD, 1, 0, PAGE, 0, RW, rdonly)
    rig.engine.grant(1, 0, PAGE, 0, RO, os.open(f"/proc/self/fd/{home}", os.O_RDONLY))


@pytest.mark.parametrize("seal", [F_SEAL_WRITE, F_SEAL_FUTURE_WRITE], ids=["write", "future"])
def test_grant_read_write_of_a_write_sealed_fd_is_bad_fd(rig: Rig, seal: int) -> None:
    sealed = rig.fd(APERTURE, seals=F_SEAL_SHRINK | seal)
    _refused(rig, NackReason.BAD_FD, 1, 0, PAGE, 0, RW, os.dup(sealed))
    rig.lender.grant(0, PAGE, sealed, prot=RO)  # read-only is what it is for


def test_grant_unsupported_flags(rig: Rig) -> None:
    home = rig.fd(APERTURE)
    # Bits outside the fd kind field, and fd kinds nobody defined.
    for flags in (0x100, 2, 0xFF, 1 << 31):
        _refused(rig, NackReason.UNSUPPORTED_FLAGS, 1, 0, PAGE, 0, RW, os.dup(home), flags=flags)


def test_grant_of_a_memfd_called_a_dma_buf_is_bad_fd(rig: Rig) -> None:
    # fd kind 1 (dma-buf) is known, but a memfd has no exporter for fdinfo to name.
    home = rig.fd(APERTURE)
    _refused(rig, NackReason.BAD_FD, 1, 0, PAGE, 0, RW, os.dup(home), flags=1)


def test_accepted_grant(rig: Rig) -> None:
    home = rig.fd(APERTURE)
    lease = rig.lender.grant(2 * PAGE, 3 * PAGE, home, 7 * PAGE, RO)
    w = rig.engine.window_at(3 * PAGE)
    assert w is not None
    assert (w.start, w.length, w.state, w.lease_id, w.fd_offset, w.prot) == (
        2 * PAGE,
        3 * PAGE,
        S.RESIDENT,
        lease,
        7 * PAGE,
        RO,
    )
    assert fd_is_open(w.fd) and w.fd != home
    assert rig.engine.lease_count == 1 and rig.engine.kept_fds == 1
    assert rig.engine.counters.grants == 1
    assert rig.engine.window_at(2 * PAGE - 1) is None
    assert rig.engine.window_at(5 * PAGE) is None
    assert rig.events == [
        ("LEASE_GRANTED", {"lease": lease, "offset": 2 * PAGE, "length": 3 * PAGE})
    ]


def test_leases_on_one_file_share_one_kept_fd(rig: Rig) -> None:
    home = rig.fd(APERTURE, "shared-file")
    other = rig.fd(APERTURE, "other-file")
    for i in range(10):
        rig.lender.grant(i * PAGE, PAGE, home)
    assert rig.engine.kept_fds == 1
    assert len(engine_fds(rig, "shared-file")) == 1  # the nine duplicates were closed
    rig.lender.grant(20 * PAGE, PAGE, other)
    assert rig.engine.kept_fds == 2


# ---------------------------------------------------------------------------- resident access


@pytest.mark.parametrize("size", [1, 2, 4, 8])
async def test_resident_reads_and_writes_go_to_the_memfd_at_fd_offset(rig: Rig, size: int) -> None:
    backing = rig.fd(64 * PAGE, fill=pattern(3, 64 * PAGE))
    rig.lender.grant(16 * PAGE, 4 * PAGE, backing, 40 * PAGE)
    at = 16 * PAGE + PAGE + 8 * size  # aperture offset; naturally aligned
    where = 40 * PAGE + PAGE + 8 * size  # the same byte in the memfd
    assert await rig.engine.read(at, size) == os.pread(backing, size, where)
    data = bytes(range(0xA0, 0xA0 + size))
    await rig.engine.write(at, data)
    assert os.pread(backing, size, where) == data
    # The lender writing its memory is seen at once: no copy, no cache.
    os.pwrite(backing, b"\x5a" * size, where)
    assert await rig.engine.read(at, size) == b"\x5a" * size
    # Nothing else moved.
    assert os.pread(backing, PAGE, 40 * PAGE) == pattern(3, 64 * PAGE)[40 * PAGE : 41 * PAGE]
    c = rig.engine.counters
    assert (c.failed_accesses, c.faults, c.page_ins) == (0, 0, 0)


async def test_first_and_last_byte_of_a_window(rig: Rig) -> None:
    backing = rig.fd(8 * PAGE, fill=pattern(5, 8 * PAGE))
    rig.lender.grant(PAGE, 2 * PAGE, backing, 4 * PAGE)
    assert await rig.engine.read(PAGE, 1) == os.pread(backing, 1, 4 * PAGE)
    assert await rig.engine.read(3 * PAGE - 8, 8) == os.pread(backing, 8, 6 * PAGE - 8)
    # Just outside, on both sides: nothing is lent there.
    assert await rig.engine.read(PAGE - 8, 8) == b"\xff" * 8
    assert await rig.engine.read(3 * PAGE, 8) == b"\xff" * 8


# ---------------------------------------------------------------------------- failure policy


@pytest.mark.parametrize("policy", list(FailurePolicy))
async def test_vacant_access_gets_the_policy(policy: FailurePolicy) -> None:
    with policy_engine(policy) as (engine, lender):
        await _expect_policy(engine, policy, 0x1000, 4)
        await _expect_policy(engine, policy, APERTURE - 8, 8)
        assert lender.page_ins == []  # nothing to page in: no PAGE_IN (9.1 "Vacant")
        assert engine.counters.failed_accesses == 4


@contextlib.contextmanager
def policy_engine(policy: FailurePolicy) -> Iterator[tuple[LeaseEngine, FakeLender]]:
    """An engine with `policy` and its FakeLender, both closed at the end."""
    engine = make_engine(APERTURE, policy=policy)
    lender = FakeLender(engine)
    try:
        yield engine, lender
    finally:
        engine.close()
        lender.close()


async def _expect_policy(engine: LeaseEngine, policy: FailurePolicy, at: int, size: int) -> None:
    if policy is FailurePolicy.ERROR:
        with pytest.raises(AccessError) as info:
            await engine.read(at, size)
        assert info.value.errno == errno.EIO
        with pytest.raises(AccessError):
            await engine.write(at, b"\x00" * size)
        return
    fill = b"\xff" if policy is FailurePolicy.ALL_ONES else b"\x00"
    assert await engine.read(at, size) == fill * size
    await engine.write(at, b"\x11" * size)


@pytest.mark.parametrize("policy", list(FailurePolicy))
async def test_release_makes_the_range_vacant(policy: FailurePolicy) -> None:
    with policy_engine(policy) as (engine, lender):
        home = lender.own(memfd(APERTURE, fill=b"\x42" * PAGE))
        lease = lender.grant(0, 2 * PAGE, home)
        assert await engine.read(0, 8) == b"\x42" * 8
        await engine.revoke(lease, RELEASE)
        assert engine.window_at(0) is None
        assert engine.lease_count == 0 and engine.kept_fds == 0
        await _expect_policy(engine, policy, 0, 8)
        assert os.pread(home, 8, 0) == b"\x42" * 8  # the dropped write did not land
        assert lender.page_ins == []
        # The lender may lend the range again.
        lender.grant(0, PAGE, home)
        assert await engine.read(0, 8) == b"\x42" * 8


@pytest.mark.parametrize("policy", list(FailurePolicy))
async def test_write_to_a_read_only_lease_gets_the_policy(policy: FailurePolicy) -> None:
    with policy_engine(policy) as (engine, lender):
        home = lender.own(memfd(APERTURE, fill=b"\x42" * PAGE))
        lender.grant(0, PAGE, home, prot=RO)
        if policy is FailurePolicy.ERROR:
            with pytest.raises(AccessError):
                await engine.write(8, b"\x99" * 8)
        else:
            await engine.write(8, b"\x99" * 8)
        assert engine.write_now(8, b"\x99" * 8) is False  # never in place: awaited, refused
        assert os.pread(home, 8, 8) == b"\x42" * 8
        assert await engine.read(8, 8) == b"\x42" * 8  # reads work
        assert engine.counters.failed_accesses == 1
        assert lender.page_ins == []  # 9.2: a guest error, no PAGE_IN
        assert engine.window_at(0) is not None
        assert engine.window_at(0).state is S.RESIDENT  # type: ignore[union-attr]


async def test_lender_adding_a_write_seal_after_the_grant_gets_the_policy(rig: Rig) -> None:
    # A hostile lender may seal its memfd against writes after we accepted it read-write:
    # the write must get the failure policy, not raise PermissionError out of the engine.
    home = rig.fd(APERTURE, fill=b"\x42" * PAGE)
    rig.lender.grant(0, PAGE, home)
    await rig.engine.write(0, b"\x01" * 8)
    fcntl.fcntl(home, F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
    await rig.engine.write(8, b"\x99" * 8)
    assert os.pread(home, 16, 0) == b"\x01" * 8 + b"\x42" * 8
    assert rig.engine.counters.failed_accesses == 1
    assert await rig.engine.read(8, 8) == b"\x42" * 8


async def test_plain_file_shrunk_under_a_lease_gets_the_policy(
    rig: Rig, tmp_path: os.PathLike[str]
) -> None:
    # A plain file cannot be sealed; pread keeps us safe when it shrinks (no SIGBUS).
    path = os.path.join(tmp_path, "backing")
    with open(path, "wb") as f:
        f.write(b"\x42" * 4 * PAGE)
    fd = rig.lender.own(os.open(path, os.O_RDWR))
    rig.lender.grant(0, 4 * PAGE, fd)
    assert await rig.engine.read(3 * PAGE, 8) == b"\x42" * 8
    os.ftruncate(fd, PAGE)
    assert await rig.engine.read(3 * PAGE, 8) == b"\xff" * 8
    assert rig.engine.counters.failed_accesses == 1
    assert await rig.engine.read(0, 8) == b"\x42" * 8


# ---------------------------------------------------------------------------- revoke and page-in


async def test_evict_then_access_pages_in_once_and_follows_the_move(rig: Rig) -> None:
    e, lender = rig.engine, rig.lender
    first = rig.fd(16 * PAGE, "first-home", fill=pattern(1, 16 * PAGE))
    lease = lender.grant(4 * PAGE, 2 * PAGE, first, 0)
    await e.revoke(lease, EVICT)
    assert rig.state(4 * PAGE) is S.EVICTED and rig.state(5 * PAGE) is S.EVICTED
    assert e.kept_fds == 0 and e.lease_count == 0
    assert lender.page_ins == []  # evicting sends nothing by itself
    # The lender moves the contents elsewhere: another memfd, another offset.
    moved = rig.fd(64 * PAGE, "second-home")
    os.pwrite(moved, os.pread(first, 2 * PAGE, 0), 32 * PAGE)
    os.pwrite(first, b"\xee" * 2 * PAGE, 0)  # and reuses the old pages

    async with trio.open_nursery() as nursery:
        box = spawn(nursery, e.read, 5 * PAGE + 16, 8)
        await trio.testing.wait_all_tasks_blocked()
        assert not box.done
        assert lender.page_ins == [RecordedPageIn(1, 4 * PAGE, 2 * PAGE, Access.READ)]
        assert rig.state(4 * PAGE) is S.PAGING_IN
        lender.answer(lender.take(), moved, 32 * PAGE)
    assert box.get() == pattern(1, 16 * PAGE)[PAGE + 16 : PAGE + 24]
    assert len(lender.page_ins) == 1
    # Later accesses go to the new place; the old memfd is never touched again.
    await e.write(4 * PAGE, b"\x77" * 8)
    assert os.pread(moved, 8, 32 * PAGE) == b"\x77" * 8
    assert os.pread(first, 2 * PAGE, 0) == b"\xee" * 2 * PAGE
    assert await e.read(4 * PAGE + 8, 8) == os.pread(moved, 8, 32 * PAGE + 8)
    c = e.counters
    assert (c.page_ins, c.faults, c.revokes, c.grants, c.failed_accesses) == (1, 1, 1, 2, 0)
    names = [n for n, _ in rig.events]
    assert names == ["LEASE_GRANTED", "LEASE_REVOKED", "PAGE_IN_REQUESTED", "LEASE_GRANTED"]


async def test_write_fault_asks_for_write_access_and_lands_in_the_new_backing(rig: Rig) -> None:
    e, lender = rig.engine, rig.lender
    home = rig.fd(APERTURE)
    lease = lender.grant(0, PAGE, home)
    await e.revoke(lease, EVICT)
    new = rig.fd(PAGE)
    async with trio.open_nursery() as nursery:
        box = spawn(nursery, e.write, 8, b"\x31" * 8)
        await trio.testing.wait_all_tasks_blocked()
        [pi] = lender.page_ins
        assert pi.access is Access.WRITE
        lender.answer(lender.take(), new, 0)
    assert box.get() is None
    assert os.pread(new, 8, 8) == b"\x31" * 8
    assert os.pread(home, 8, 8) == bytes(8)


@pytest.mark.parametrize("write", [False, True])
async def test_a_lender_that_answers_later_is_asked_from_the_fast_paths_miss(
    rig: Rig, write: bool
) -> None:
    """The socket lender's order (LenderPort.answers_later): the fast path's miss sends the
    PAGE_IN and books it, and the access that then awaits waits for it without asking again."""
    e, lender = rig.engine, rig.lender
    lender.answers_later = True
    home = rig.fd(APERTURE, fill=pattern(4, 2 * PAGE))
    lease = lender.grant(0, 2 * PAGE, home)
    await e.revoke(lease, EVICT)
    if write:
        assert e.write_now(PAGE + 8, b"\x42" * 8) is False
    else:
        assert e.read_now(PAGE + 8, 8) is None
    access = Access.WRITE if write else Access.READ
    assert lender.page_ins == [RecordedPageIn(1, 0, 2 * PAGE, access)]
    assert rig.state(0) is S.PAGING_IN and e.outstanding_page_ins() == 1
    # Counted as a fault at once: the access met its memory evicted, whether it waits or not.
    assert e.counters.page_ins == 1 and e.counters.faults == 1
    assert [n for n, _ in rig.events][-1] == "PAGE_IN_REQUESTED"
    async with trio.open_nursery() as nursery:
        if write:
            box = spawn(nursery, e.write, PAGE + 8, b"\x42" * 8)
        else:
            box = spawn(nursery, e.read, PAGE + 8, 8)
        await trio.testing.wait_all_tasks_blocked()
        assert not box.done and len(lender.page_ins) == 1  # it waits on the one PAGE_IN
        lender.answer(lender.take(), home)
    if write:
        assert box.get() is None and os.pread(home, 8, PAGE + 8) == b"\x42" * 8
    else:
        assert box.get() == pattern(4, 2 * PAGE)[PAGE + 8 : PAGE + 16]
    c = e.counters
    assert (c.page_ins, c.faults, c.failed_accesses) == (1, 1, 0)


async def test_an_access_asked_from_the_miss_is_one_fault_however_long_it_waits(rig: Rig) -> None:
    """The fault is counted when the fast path's miss asks: once for that access whether the
    grant beats it to the slow path (libvfio-user's worker hand-off) or it waits there; an
    access that waits beside it on the same page-in is a fault of its own."""
    e, lender = rig.engine, rig.lender
    lender.answers_later = True
    home = rig.fd(APERTURE, fill=pattern(5, 2 * PAGE))
    lease = lender.grant(0, PAGE, home)
    other = lender.grant(PAGE, PAGE, home, PAGE)
    await e.revoke(lease, EVICT)
    await e.revoke(other, EVICT)
    # Answered before the access comes back: it reads resident memory, one fault all the same.
    assert e.read_now(8, 8) is None
    lender.answer(lender.take(), home)
    assert await e.read(8, 8) == pattern(5, 2 * PAGE)[8:16]
    assert (e.counters.faults, e.counters.page_ins) == (1, 1)
    # Two accesses on one page-in: the asking one and one beside it, both waiting.
    assert e.read_now(PAGE, 8) is None
    async with trio.open_nursery() as nursery:
        first = spawn(nursery, e.read, PAGE, 8)
        second = spawn(nursery, e.read, PAGE + 8, 8)
        await trio.testing.wait_all_tasks_blocked()
        assert len(lender.page_ins) == 2  # one PAGE_IN per window
        lender.answer(lender.take(), home, PAGE)
    assert first.get() == pattern(5, 2 * PAGE)[PAGE : PAGE + 8]
    assert second.get() == pattern(5, 2 * PAGE)[PAGE + 8 : PAGE + 16]
    assert (e.counters.faults, e.counters.page_ins) == (3, 2)


async def test_a_miss_does_not_ask_a_lender_that_answers_inside_the_call(rig: Rig) -> None:
    """An in-process lender may grant inside send_page_in: its PAGE_IN is booked first, by the
    slow path, so the fast path's miss leaves the window as it was."""
    e, lender = rig.engine, rig.lender
    home = rig.fd(APERTURE)
    lease = lender.grant(0, PAGE, home)
    await e.revoke(lease, EVICT)
    assert e.read_now(8, 8) is None and e.write_now(8, b"\x01") is False
    assert lender.page_ins == [] and rig.state(0) is S.EVICTED


async def test_page_in_answered_inline_by_an_in_process_lender(rig: Rig) -> None:
    e, lender = rig.engine, rig.lender
    home = rig.fd(APERTURE, fill=pattern(9, 4 * PAGE))
    lender.inline = lambda lender_, pi: lender_.answer(pi, home)
    lease = lender.grant(0, 4 * PAGE, home)
    await e.revoke(lease, EVICT)
    assert await e.read(3 * PAGE, 8) == pattern(9, 4 * PAGE)[3 * PAGE : 3 * PAGE + 8]
    assert len(lender.page_ins) == 1 and e.counters.faults == 0  # never had to wait


async def test_page_in_may_grant_a_larger_range(rig: Rig) -> None:
    e, lender = rig.engine, rig.lender
    home = rig.fd(APERTURE, fill=pattern(2, 16 * PAGE))
    a = lender.grant(4 * PAGE, PAGE, home)
    await e.revoke(a, EVICT)
    async with trio.open_nursery() as nursery:
        box = spawn(nursery, e.read, 4 * PAGE, 8)
        await trio.testing.wait_all_tasks_blocked()
        pi = lender.take()
        lender.grant(0, 8 * PAGE, home)
        e.page_in_done(pi.request_id, PageInStatus.OK)
    assert box.get() == pattern(2, 16 * PAGE)[4 * PAGE : 4 * PAGE + 8]
    w = e.window_at(0)
    assert w is not None and (w.start, w.length, w.state) == (0, 8 * PAGE, S.RESIDENT)
    assert len(list(e.windows())) == 1
    assert a not in e._evicted  # superseded (9.1)


async def test_grant_over_part_of_an_evicted_lease_splits_it(rig: Rig) -> None:
    e, lender = rig.engine, rig.lender
    home = rig.fd(APERTURE)
    a = lender.grant(0, 4 * PAGE, home)
    await e.revoke(a, EVICT)
    b = lender.grant(PAGE, 2 * PAGE, home)
    layout = [(w.start, w.length, w.state, w.lease_id) for w in e.windows()]
    assert layout == [
        (0, PAGE, S.EVICTED, a),
        (PAGE, 2 * PAGE, S.RESIDENT, b),
        (3 * PAGE, PAGE, S.EVICTED, a),
    ]
    assert len(e._evicted[a]) == 2
    await e.revoke(a, EVICT)  # evicting an evicted lease again changes nothing
    assert [(w.start, w.state) for w in e.windows()] == [
        (0, S.EVICTED),
        (PAGE, S.RESIDENT),
        (3 * PAGE, S.EVICTED),
    ]
    # RELEASE drops both evicted pieces and nothing else.
    await e.revoke(a, RELEASE)
    assert [(w.start, w.length, w.lease_id) for w in e.windows()] == [(PAGE, 2 * PAGE, b)]
    with pytest.raises(UnknownLease):
        await e.revoke(a, RELEASE)


async def test_release_of_an_evicted_lease_makes_it_vacant_without_page_in(rig: Rig) -> None:
    e, lender = rig.engine, rig.lender
    home = rig.fd(APERTURE)
    lease = lender.grant(0, PAGE, home)
    await e.revoke(lease, EVICT)
    await e.revoke(lease, RELEASE)
    assert e.window_at(0) is None
    assert await e.read(0, 4) == b"\xff" * 4
    assert lender.page_ins == []
    assert e._evicted == {}


async def test_revoke_of_an_unknown_lease(rig: Rig) -> None:
    with pytest.raises(UnknownLease):
        await rig.engine.revoke(77, EVICT)
    with pytest.raises(UnknownLease):
        await rig.engine.revoke(77, RELEASE)
    assert rig.engine.counters.revokes == 0


async def test_a_second_revoke_of_a_revoking_lease_is_not_silently_accepted(rig: Rig) -> None:
    # The protocol layer answers a duplicate REVOKE with ERROR DUPLICATE_ID before it gets
    # here; if one ever slips through, the engine refuses loudly rather than double-freeing.
    home = rig.fd(APERTURE)
    lease = rig.lender.grant(0, PAGE, home)
    gate = hold_unmaps(rig.engine)
    async with trio.open_nursery() as nursery:
        first = spawn(nursery, rig.engine.revoke, lease, EVICT)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(IllegalTransition):
            await rig.engine.revoke(lease, EVICT)
        gate.set()
    first.get()
    assert rig.state(0) is S.EVICTED and rig.engine.kept_fds == 0


@pytest.mark.parametrize("answers_later", [False, True])
async def test_no_port_or_unreachable_lender_gets_the_policy(rig: Rig, answers_later: bool) -> None:
    """A lender that answers later is asked from the fast path's miss first: that PAGE_IN
    fails silently (nothing booked), and the slow path asks again and reports the failure, so
    either way it is counted and reported once."""
    e, lender = rig.engine, rig.lender
    lender.answers_later = answers_later
    home = rig.fd(APERTURE)
    lease = lender.grant(0, PAGE, home)
    await e.revoke(lease, EVICT)
    lender.reachable = False
    assert await e.read(0, 8) == b"\xff" * 8
    tries = 2 if answers_later else 1
    assert len(lender.page_ins) == tries and rig.state(0) is S.EVICTED
    c = e.counters
    assert (c.page_ins, c.failed_accesses, e.outstanding_page_ins()) == (1, 1, 0)
    assert [n for n, _ in rig.events][-2:] == ["PAGE_IN_REQUESTED", "PAGE_IN_FAILED"]
    e.port = None
    assert await e.read(0, 8) == b"\xff" * 8
    assert len(lender.page_ins) == tries and rig.state(0) is S.EVICTED
    # Reachable again: the next access pages in (answered inline: asked from the slow path).
    e.port = lender
    lender.reachable = True
    lender.answers_later = False
    lender.inline = lambda lender_, pi: lender_.answer(pi, home)
    await e.write(0, b"\x10" * 8)
    assert os.pread(home, 8, 0) == b"\x10" * 8


# ---------------------------------------------------------------------------- lender lost


@pytest.mark.parametrize("policy", list(FailurePolicy))
async def test_lender_lost(policy: FailurePolicy) -> None:
    with policy_engine(policy) as (engine, lender):
        a_fd = lender.own(memfd(APERTURE, "lost-a", fill=b"\x42" * PAGE))
        b_fd = lender.own(memfd(APERTURE, "lost-b"))
        lender.grant(0, 2 * PAGE, a_fd)
        lender.grant(4 * PAGE, PAGE, b_fd)
        evicted = lender.grant(8 * PAGE, PAGE, b_fd)
        await engine.revoke(evicted, EVICT)
        assert engine.kept_fds == 2
        engine.lender_lost()
        assert [(w.start, w.state, w.fd) for w in engine.windows()] == [
            (0, S.LOST, -1),
            (4 * PAGE, S.LOST, -1),
            (8 * PAGE, S.LOST, -1),
        ]
        assert engine.kept_fds == 0 and engine.lease_count == 0
        assert fds_of_memfd("lost-a") == [a_fd] and fds_of_memfd("lost-b") == [b_fd]
        for at in (0, 4 * PAGE, 8 * PAGE):
            await _expect_policy(engine, policy, at, 8)
        assert lender.page_ins == []  # no lender to page in from
        assert os.pread(a_fd, 8, 0) == b"\x42" * 8
        assert engine.counters.lender_losses == 1
        # A new lender (new connection) grants again, over the lost ranges too.
        engine.lender_lost()  # twice is harmless
        lender.grant(0, PAGE, a_fd)
        assert await engine.read(0, 8) == b"\x42" * 8
        assert engine.window_at(PAGE) is not None
        assert engine.window_at(PAGE).state is S.LOST  # type: ignore[union-attr]
        assert engine.kept_fds == 1


async def test_lender_lost_fails_waiting_accesses_and_ends_a_pending_revoke(rig: Rig) -> None:
    e, lender = rig.engine, rig.lender
    home = rig.fd(APERTURE, "lost-waiting")
    paged = lender.grant(0, PAGE, home)
    revoking = lender.grant(4 * PAGE, PAGE, home)
    await e.revoke(paged, EVICT)
    gate = hold_unmaps(e)
    async with trio.open_nursery() as nursery:
        reader = spawn(nursery, e.read, 0, 8)
        await trio.testing.wait_all_tasks_blocked()
        revoke = spawn(nursery, e.revoke, revoking, EVICT)
        await trio.testing.wait_all_tasks_blocked()
        waiter = spawn(nursery, e.read, 4 * PAGE, 8)
        await trio.testing.wait_all_tasks_blocked()
        assert rig.state(0) is S.PAGING_IN and rig.state(4 * PAGE) is S.REVOKING
        e.lender_lost()
        await trio.testing.wait_all_tasks_blocked()
        assert reader.get() == b"\xff" * 8
        assert waiter.get() == b"\xff" * 8
        assert e.kept_fds == 0
        assert fds_of_memfd("lost-waiting") == [home]
        gate.set()
    revoke.get()
    assert rig.state(4 * PAGE) is S.LOST
    # The late answer to the PAGE_IN the lost lender never gave is ignored.
    e.page_in_done(lender.page_ins[0].request_id, PageInStatus.OK)
    assert rig.state(0) is S.LOST


# ---------------------------------------------------------------------------- revoke invariant


async def test_after_revoke_nothing_here_can_reach_the_pages(rig: Rig) -> None:
    """docs/lease-protocol.md 9.3: after REVOKED no fd, no mapping, no access reaches them."""
    e, lender = rig.engine, rig.lender
    name = "revoke-invariant"
    contents = pattern(11, 4 * PAGE)
    old = rig.fd(4 * PAGE, name, fill=contents)
    lease = lender.grant(8 * PAGE, 4 * PAGE, old, 0)
    [kept] = engine_fds(rig, name)
    assert await e.read(9 * PAGE, 8) == contents[PAGE : PAGE + 8]

    await e.revoke(lease, EVICT)
    # The engine's fd is closed (it was the last lease on that file)...
    with pytest.raises(OSError) as info:
        os.fstat(kept)
    assert info.value.errno == errno.EBADF
    assert engine_fds(rig, name) == []
    # ...and nothing maps the memfd.
    assert not memfd_is_mapped(name)
    # The lender reuses the pages at once: poison.
    os.pwrite(old, b"\xde\xad" * (2 * PAGE), 0)

    # The lender's copy of the contents is elsewhere now.
    new = rig.fd(16 * PAGE, "revoke-invariant-new", fill=bytes(16 * PAGE))
    os.pwrite(new, contents, 12 * PAGE)
    async with trio.open_nursery() as nursery:
        boxes = [spawn(nursery, e.read, 8 * PAGE + i * PAGE + 8, 8) for i in range(4)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(lender.page_ins) == 1  # the poison never answered a read
        lender.answer(lender.take(), new, 12 * PAGE)
    for i, box in enumerate(boxes):
        assert box.get() == contents[i * PAGE + 8 : i * PAGE + 16]
    for at in range(8 * PAGE, 12 * PAGE, 512):
        assert await e.read(at, 8) != b"\xde\xad" * 4


async def test_the_kept_fd_closes_with_the_last_lease_on_its_file(rig: Rig) -> None:
    e, lender = rig.engine, rig.lender
    name = "shared-by-two"
    home = rig.fd(APERTURE, name)
    a = lender.grant(0, PAGE, home)
    b = lender.grant(PAGE, PAGE, home)
    [kept] = engine_fds(rig, name)
    await e.revoke(a, EVICT)
    assert fd_is_open(kept) and e.kept_fds == 1  # lease b still uses it
    assert engine_fds(rig, name) == [kept]
    await e.revoke(b, RELEASE)
    assert not fd_is_open(kept) and e.kept_fds == 0
    assert engine_fds(rig, name) == []


async def test_revoke_waits_for_every_unmap_hook_before_dropping_the_fd(rig: Rig) -> None:
    e, lender = rig.engine, rig.lender
    name = "unmap-order"
    home = rig.fd(APERTURE, name)
    lease = lender.grant(2 * PAGE, 2 * PAGE, home)
    seen: list[tuple[str, int, int, bool]] = []

    def hook(tag: str) -> UnmapHook:
        async def unmap(start: int, length: int) -> None:
            await trio.sleep(0)
            # Still REVOKING, the fd still open while the transports unmap.
            w = e.window_at(start)
            assert w is not None and w.state is S.REVOKING
            seen.append((tag, start, length, fd_is_open(w.fd)))

        return unmap

    e.unmap_hooks += [hook("xen"), hook("other")]
    await e.revoke(lease, EVICT)
    assert seen == [("xen", 2 * PAGE, 2 * PAGE, True), ("other", 2 * PAGE, 2 * PAGE, True)]
    assert engine_fds(rig, name) == []


# ---------------------------------------------------------------------------- revoke_now


async def test_revoke_now_takes_a_lease_back_at_once_when_no_hook_must_unmap_it(rig: Rig) -> None:
    # What the lender link does with a REVOKE under vfio-user: no task, REVOKED right away.
    e, lender = rig.engine, rig.lender
    name = "revoke-now"
    home = rig.fd(APERTURE, name)
    lease = lender.grant(0, PAGE, home)
    kept = lender.grant(PAGE, PAGE, home)
    assert e.revoke_now(lease, EVICT) is True
    assert rig.state(0) is S.EVICTED
    assert e.counters.revokes == 1
    assert ("LEASE_REVOKED", {"lease": lease, "mode": "EVICT"}) in rig.events
    # The store still holds the memfd for the other lease, and only once.
    assert len(engine_fds(rig, name)) == 1
    assert e.revoke_now(kept, RELEASE) is True
    assert e.window_at(PAGE) is None
    assert engine_fds(rig, name) == []
    # An evicted lease: RELEASE drops it, EVICT again is a no-op, as with `revoke`.
    assert e.revoke_now(lease, EVICT) is True
    assert e.revoke_now(lease, RELEASE) is True
    assert e.window_at(0) is None
    with pytest.raises(UnknownLease):
        e.revoke_now(lease, EVICT)


async def test_revoke_now_leaves_a_lease_with_unmap_hooks_to_revoke(rig: Rig) -> None:
    e, lender = rig.engine, rig.lender
    home = rig.fd(APERTURE)
    lease = lender.grant(0, PAGE, home)
    unmapped: list[int] = []

    async def unmap(start: int, length: int) -> None:
        unmapped.append(start)

    e.unmap_hooks.append(unmap)
    assert e.revoke_now(lease, EVICT) is False
    assert rig.state(0) is S.RESIDENT and e.counters.revokes == 0  # nothing changed
    await e.revoke(lease, EVICT)
    assert unmapped == [0] and rig.state(0) is S.EVICTED
