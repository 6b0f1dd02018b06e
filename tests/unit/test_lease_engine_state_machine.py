"""A hypothesis state machine over the lease engine with real memfds.

The machine plays both the lender and the guest against one `LeaseEngine` and keeps its own
model of the aperture, one entry per granule (VACANT, RESIDENT, EVICTED, PAGING_IN or LOST, and
the lease it belongs to), and of the memory contents the lender holds for every granule. Rules:

- grant: random granule ranges, sometimes overlapping live leases, sometimes broken on purpose
  (misaligned, outside, unsealed, too small, bad prot or flags, wrong kind of fd, duplicate id);
  a NACK must name one of the reasons that apply, change nothing and close the fd;
- revoke EVICT / RELEASE of random lease ids (unknown ones included), sometimes with a slow
  unmap hook and guest accesses arriving while the lease is REVOKING;
- guest accesses (reads and writes of 1 to 8 bytes), several at once on one window; when they
  fault, the lender answers in one of many ways: grant (read-write, read-only, larger, from
  the shared pool or a fresh memfd), grant then evict at once, PAGE_IN_DONE with an error or OK
  without a grant, no answer (the deadline passes; sometimes a late answer follows), an
  unreachable lender, or the lender vanishing meanwhile;
- a PAGE_IN left unanswered stays outstanding (docs/lease-protocol.md 9.4, "Late answers"): its
  window stays PAGING_IN across steps, accesses to it wait to their deadline and send nothing,
  and a later step answers it late (grant, error status, OK without a grant);
- PAGE_IN_DONE with random (stale) request ids and statuses; now and then, lender loss.

Half the examples run with a fake p2m (`FakeP2m`): the Xen fast path as a transport with the
lending hypercall would run it. It really mmaps a resident window (MAP_SHARED, through libc so
that no fd is dup'ed) once a trapped access finds it resident, serves later guest accesses to it
without the engine, and unmaps it from an unmap hook. Without it the /proc/self/maps check would
be empty, since the engine itself never maps lent memory.

When a revoke returns (the engine's REVOKED), nothing in the process may map the range any more,
and the lender then reuses the pages: it overwrites them with poison. Every later read, through
the engine or the p2m, is compared with the model, so a stale fd or mapping that let poison
reach the guest fails the step.

Each step runs in its own `trio.run` under an autojumping MockClock, so deadlines cost nothing;
waits never outlive a step. After every step the invariants are checked: windows never
overlap and match the model granule by granule; every RESIDENT window has a kept, open fd and is
in the live map; EVICTED/LOST ones hold no fd; `kept_fds` equals the distinct (file, access
mode) pairs of live leases; no fd of a lent memfd is open beyond the lender's own and the
engine's kept ones; every live lease's memory holds what the model says; the counters match
what the machine saw (PAGE_INs the fake port got, grants, revokes, failed accesses, waits);
every /proc/self/maps line of a lent memfd is a p2m mapping of a window that is resident now.
Within a step: concurrent faults on one window send exactly one PAGE_IN, and no access outlives
its deadline. At every PAGE_IN the engine sends: no granule it covers is still waiting on an
earlier one (never two outstanding PAGE_INs for a granule, section 9.4; a grant of the granule,
the request's PAGE_IN_DONE, a release of its lease or the lender's loss ends that wait).

Settings: the profile `lease-sm` (300 examples of up to 30 steps, about 12 s) runs in the
normal suite: with fewer, bugs that need three choices to meet (say the ERROR policy, a write
fault and a read-only answer) were caught in only some runs. DEVMODEL_SM_PROFILE=lease-sm-deep
runs 2000 examples of up to 60 steps (minutes); DEVMODEL_SM_EXAMPLES=n overrides the number of
examples of either.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from devmodel.leases.backing import GrantRefused
from devmodel.leases.engine import LeaseEngine, UnknownLease
from devmodel.leases.policy import FailurePolicy
from devmodel.leases.states import WindowState
from devmodel.leases.table import BLOCK_UNITS, FAST_FD_MASK, FEW_MAX, WindowTable
from devmodel.pci.errors import AccessError
from devmodel.testing import (
    F_SEAL_GROW,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    PAGE,
    RO,
    RW,
    Box,
    FakeLender,
    RecordedPageIn,
    fd_is_open,
    file_key,
    make_engine,
    memfd,
    pattern,
    spawn,
)
from devmodel_wire.lease.constants import (
    PROT_WRITE,
    VALID_PROTS,
    Access,
    FdKind,
    NackReason,
    PageInStatus,
    RevokeMode,
)
from tests.unit.lease_table_support import check_fast_entries, check_find_fast

S = WindowState
G = PAGE  # granule
NG = 16  # granules in the aperture: small, so that ranges collide often
APERTURE = NG * G
# (units per block, windows a block keeps as a list) of the engine's window table: the real
# ones (all NG granules in one block), small ones that put windows across blocks, and ones
# whose blocks get crowded (slots and fast entries) with three windows.
TABLE_GEOMETRIES = [(BLOCK_UNITS, FEW_MAX), (2, 2), (4, 3), (4, 2), (8, 2), (16, 2)]
TIMEOUT = 2.0
STEP_LIMIT = 10 * TIMEOUT  # virtual seconds (free under the autojumping clock)
SEALS = F_SEAL_SHRINK | F_SEAL_GROW
PREFIX = "sm-"  # every memfd this machine creates is called sm-something
# What the lender writes into pages it got back: no guest read may ever return it.
POISON = b"POISON!\xa5"

BAD_GRANTS = [
    "misaligned-offset",
    "misaligned-fd-offset",
    "zero-length",
    "unsealed",
    "too-small",
    "bad-prot",
    "flags",
    "pipe",
    "read-only-fd-rw",
    "write-sealed-rw",
    "duplicate-id",
]
ANSWERS = [
    "grant",
    "grant",
    "grant-ro",
    "grant-larger",
    "grant-evict",
    "status",
    "ok-no-grant",
    "none",
    "none",  # twice: the window then waits on it across steps, which later steps explore
    "late",
    "unreachable",
    "lost",
]
ERROR_STATUSES = [
    PageInStatus.NO_MEMORY,
    PageInStatus.NOT_LENT,
    PageInStatus.INVALID_RANGE,
    PageInStatus.BUSY,
    PageInStatus.FAILED,
    200,
]


@dataclass
class Lease:
    """A live lease as the lender knows it."""

    offset: int
    length: int
    fd: int  # the lender's own fd of the backing
    fd_offset: int
    prot: int
    owned: bool  # a memfd made for this lease alone (closed when the lease ends)


@dataclass
class Access_:
    offset: int
    size: int
    data: bytes | None


def run(fn: Callable[[], Awaitable[object]]) -> object:
    """Run one step's trio part. Its virtual time is bounded: the longest step takes about
    TIMEOUT + 0.5 s, and a bug that leaves the machine waiting for something that will never
    come (a PAGE_IN an access should have sent) fails here instead of hanging the test."""

    async def bounded() -> object:
        with trio.fail_after(STEP_LIMIT):
            return await fn()

    return trio.run(bounded, clock=trio.testing.MockClock(autojump_threshold=0))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


@dataclass
class Mapping:
    start: int
    length: int
    lease: int
    addr: int
    writable: bool


class FakeP2m:
    """Resident windows mapped into "the guest" (this process) as a p2m mapper would.

    Python's mmap module would dup the fd and break the fd accounting, so libc's mmap is called
    directly on the engine's own kept fd: a mapping outliving its lease would keep the lender's
    pages reachable, which is exactly what the checks look for.
    """

    def __init__(self, engine: LeaseEngine) -> None:
        self.engine = engine
        self.maps: dict[int, Mapping] = {}
        engine.unmap_hooks.append(self.unmap)

    def find(self, offset: int) -> Mapping | None:
        for m in self.maps.values():
            if m.start <= offset < m.start + m.length:
                return m
        return None

    def overlapping(self, start: int, length: int) -> list[Mapping]:
        return [
            m for m in self.maps.values() if m.start < start + length and start < m.start + m.length
        ]

    def trapped(self, offset: int) -> None:
        """A trapped access ended: map its window if it is resident (`window_trapped`)."""
        w = self.engine.window_at(offset)
        if w is None or w.state is not S.RESIDENT or w.start in self.maps:
            return
        writable = bool(w.prot & PROT_WRITE)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        addr = _libc.mmap(None, w.length, prot, mmap.MAP_SHARED, w.fd, w.fd_offset)
        assert addr not in (None, _MAP_FAILED), os.strerror(ctypes.get_errno())
        self.maps[w.start] = Mapping(w.start, w.length, w.lease_id, addr, writable)

    async def unmap(self, start: int, length: int) -> None:
        await trio.lowlevel.checkpoint()  # a real unmap waits for Xen; REVOKED must wait too
        for m in self.overlapping(start, length):
            self._drop(m)

    def drop_all(self) -> None:
        for m in list(self.maps.values()):
            self._drop(m)

    def _drop(self, m: Mapping) -> None:
        assert _libc.munmap(m.addr, m.length) == 0
        del self.maps[m.start]

    def read(self, m: Mapping, offset: int, size: int) -> bytes:
        return ctypes.string_at(m.addr + offset - m.start, size)

    def write(self, m: Mapping, offset: int, data: bytes) -> None:
        ctypes.memmove(m.addr + offset - m.start, data, len(data))


def _mapped_memfd_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of the machine's memfds."""
    with open("/proc/self/maps", "rb") as maps:
        text = maps.read()
    name = f"/memfd:{PREFIX}".encode()
    if name not in text:  # the usual case, and the file is long: this check runs every step
        return []
    found = []
    for line in text.splitlines():
        if name in line:
            lo, hi = line.split(None, 1)[0].split(b"-")
            found.append((int(lo, 16), int(hi, 16)))
    return found


def _memfd_fds() -> set[int]:
    found = set()
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{entry}").startswith(f"/memfd:{PREFIX}"):
                found.add(int(entry))
    return found


class CheckingLender(FakeLender):
    """The fake lender, telling the machine of every PAGE_IN as it is sent (the machine checks
    that no granule it covers still waits on an earlier one)."""

    def __init__(
        self,
        engine: LeaseEngine,
        on_page_in: Callable[[RecordedPageIn, bool], None],
        answers_later: bool,
    ):
        super().__init__(engine, answers_later=answers_later)
        self.on_page_in = on_page_in

    def send_page_in(self, request_id: int, offset: int, length: int, access: Access) -> bool:
        self.on_page_in(RecordedPageIn(request_id, offset, length, access), self.reachable)
        return super().send_page_in(request_id, offset, length, access)


class LeaseEngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine: LeaseEngine | None = None
        self.p2m: FakeP2m | None = None
        self.leases: dict[int, Lease] = {}
        self.owned: set[int] = set()  # fds the lender holds
        self.states: list[tuple[WindowState, int]] = [(S.VACANT, 0)] * NG
        self.contents = bytearray(APERTURE)
        self.next_lease = 1
        self.ever: list[int] = []  # every lease id handed out
        self.counter = 0
        # PAGE_INs sent and never answered (their deadline passed): request id -> PAGE_IN.
        self.outstanding: dict[int, RecordedPageIn] = {}
        # granule -> the PAGE_IN it waits on (sent, and neither answered for it nor ended).
        self.waiting_on: dict[int, int] = {}
        # PAGE_INs the lender could not take. A lender that answers later is tried twice per
        # access: from the fast path's miss, uncounted, then from the slow path, counted.
        self.unsent = 0
        self.expect = {
            "grants": 0,
            "revokes": 0,
            "failed_accesses": 0,
            "lender_losses": 0,
            "faults": 0,
        }

    # ------------------------------------------------------------------ set-up

    @initialize(
        policy=st.sampled_from(list(FailurePolicy)),
        max_leases=st.sampled_from([3, 1 << 22]),
        p2m=st.booleans(),
        start_with=st.lists(
            st.tuples(st.integers(0, NG - 1), st.integers(1, 3), st.booleans(), st.booleans()),
            max_size=5,
        ),
        table=st.sampled_from(TABLE_GEOMETRIES),
        answers_later=st.booleans(),
    )
    def setup(
        self,
        policy: FailurePolicy,
        max_leases: int,
        p2m: bool,
        start_with: list[tuple[int, int, bool, bool]],
        table: tuple[int, int],
        answers_later: bool,
    ) -> None:
        self.policy = policy
        self.max_leases = max_leases
        self.engine = make_engine(
            APERTURE, G, policy=policy, page_in_timeout=TIMEOUT, max_leases=max_leases
        )
        # The engine's table with small blocks (the engine builds it with the real ones): so
        # that windows span blocks and blocks change form (one window, a list, slots) here too.
        block_units, few_max = table
        self.engine._table = WindowTable(G, size=APERTURE, block_units=block_units, few_max=few_max)
        # answers_later: the lender is asked from the fast path's miss (read_now, write_now),
        # as the socket lender is, or only from the slow path, as an inline one is.
        self.lender = CheckingLender(self.engine, self._page_in_sent_now, answers_later)
        self._wrap_page_in_done()
        if p2m:
            self.p2m = FakeP2m(self.engine)
            self.engine.on_event = self._event
        self.pool = self._own(memfd(APERTURE, f"{PREFIX}pool", seals=SEALS))
        self._populate(start_with)

    def _populate(self, start_with: list[tuple[int, int, bool, bool]]) -> None:
        """Begin with leases, some of them evicted at once: without this most examples spend
        their steps getting to the fault path (a good grant, then an EVICT of just that lease),
        and a bug there would be found only now and then."""

        async def populate() -> None:
            for start, count, via_pool, evict in start_with:
                count = min(count, NG - start)
                if len(self.leases) >= self.max_leases or any(
                    self.states[g][0] is not S.VACANT for g in range(start, start + count)
                ):
                    continue
                offset, length = start * G, count * G
                self.contents[offset : offset + length] = pattern(self.next_lease, length)
                lease = self._grant_range(offset, length, RW, via_pool)
                if evict:
                    await self._revoke(lease, RevokeMode.EVICT)
                    self.expect["revokes"] += 1
                    self._end_lease(lease, RevokeMode.EVICT)

        run(populate)

    def _page_in_sent_now(self, pi: RecordedPageIn, reachable: bool) -> None:
        """The property of section 9.4: never two outstanding PAGE_INs covering a granule."""
        for g in self._granules(pi.offset, pi.length):
            assert g not in self.waiting_on, (
                f"PAGE_IN {pi.request_id} covers granule {g}, which still waits on "
                f"PAGE_IN {self.waiting_on[g]}"
            )
        if reachable:
            for g in self._granules(pi.offset, pi.length):
                self.waiting_on[g] = pi.request_id
        else:
            self.unsent += 1

    def _wrap_page_in_done(self) -> None:
        """Every PAGE_IN_DONE the machine (or its fake lender) gives the engine answers its
        request: no granule waits on it any more."""
        engine = self.e
        page_in_done = engine.page_in_done

        def answered(request_id: int, status: int) -> None:
            page_in_done(request_id, status)
            self.outstanding.pop(request_id, None)
            for g, rid in list(self.waiting_on.items()):
                if rid == request_id:
                    del self.waiting_on[g]

        engine.page_in_done = answered  # type: ignore[method-assign]

    def _event(self, name: str, data: dict[str, object]) -> None:
        # The transport's part of a lost lender: its leases end, so do the guest's mappings.
        if name == "LENDER_LOST" and self.p2m is not None:
            self.p2m.drop_all()

    def teardown(self) -> None:
        try:
            if self.p2m is not None:
                self.p2m.drop_all()
            if self.engine is not None:
                self.engine.close()
                assert self.engine.kept_fds == 0
            for fd in self.owned:
                os.close(fd)
            leaked = _memfd_fds()
        finally:
            # Whatever failed, the next example starts clean: a leaked fd left behind would
            # make hypothesis's replays of that example diverge and hide the real failure.
            for fd in _memfd_fds():
                os.close(fd)
        assert leaked == set(), "an fd of a lent memfd outlived the engine"

    @property
    def e(self) -> LeaseEngine:
        assert self.engine is not None
        return self.engine

    def _own(self, fd: int) -> int:
        self.owned.add(fd)
        return fd

    def _drop(self, fd: int) -> None:
        self.owned.discard(fd)
        os.close(fd)

    def _new_id(self) -> int:
        lease = self.next_lease
        self.next_lease += 1
        self.ever.append(lease)
        return lease

    def _fresh(self, length: int, fill: bytes, *, seals: int = SEALS) -> int:
        return memfd(max(length, G), f"{PREFIX}lease", seals=seals, fill=fill)

    # ------------------------------------------------------------------ model helpers

    def _granules(self, offset: int, length: int) -> range:
        return range(max(offset // G, 0), min(-(-(offset + length) // G), NG))

    def _run(self, g: int) -> tuple[int, int]:
        """The engine window around an EVICTED granule: its lease's contiguous granules."""
        key = self.states[g]
        lo = g
        while lo > 0 and self.states[lo - 1] == key:
            lo -= 1
        hi = g + 1
        while hi < NG and self.states[hi] == key:
            hi += 1
        return lo, hi

    def _policy_read(self, size: int) -> bytes | type[AccessError]:
        if self.policy is FailurePolicy.ALL_ONES:
            return b"\xff" * size
        if self.policy is FailurePolicy.ZEROS:
            return bytes(size)
        return AccessError

    def _check_failed(self, a: Access_, box: Box) -> None:
        self.expect["failed_accesses"] += 1
        if self.policy is FailurePolicy.ERROR:
            assert isinstance(box.error, AccessError), box.error
            assert box.error.errno == errno.EIO
        elif a.data is None:
            assert box.get() == self._policy_read(a.size)
        else:
            assert box.get() is None

    def _check_served(self, a: Access_, box: Box) -> None:
        if a.data is None:
            assert box.get() == bytes(self.contents[a.offset : a.offset + a.size])
        else:
            assert box.get() is None
            self.contents[a.offset : a.offset + a.size] = a.data

    def _became_resident(self, lease: int, rec: Lease) -> None:
        for g in self._granules(rec.offset, rec.length):
            self.states[g] = (S.RESIDENT, lease)
            self.waiting_on.pop(g, None)  # the grant answers the PAGE_IN for this granule
        self.leases[lease] = rec
        self.expect["grants"] += 1

    def _end_lease(self, lease: int, mode: RevokeMode) -> None:
        """The lender's side of REVOKED: its memory must hold what the guest wrote."""
        rec = self.leases.pop(lease)
        got = os.pread(rec.fd, rec.length, rec.fd_offset)
        assert got == bytes(self.contents[rec.offset : rec.offset + rec.length])
        # The pages are the lender's again: it reuses them (the contents live on elsewhere
        # for an EVICT, and a page-in grants them back from there).
        poison = POISON * (rec.length // len(POISON))
        assert os.pwrite(rec.fd, poison, rec.fd_offset) == rec.length
        if rec.owned:
            self._drop(rec.fd)
        for g in self._granules(rec.offset, rec.length):
            assert self.states[g] == (S.RESIDENT, lease)
            self.states[g] = (S.EVICTED, lease) if mode is RevokeMode.EVICT else (S.VACANT, 0)

    def _lose_lender(self) -> None:
        for lease, rec in list(self.leases.items()):
            if rec.owned:
                self._drop(rec.fd)
            del self.leases[lease]
        self.states = [(S.LOST, lid) if s is not S.VACANT else (s, lid) for s, lid in self.states]
        self.expect["lender_losses"] += 1
        # The connection ended: no answer can come to its PAGE_INs any more.
        self.outstanding.clear()
        self.waiting_on.clear()

    def _left_outstanding(self, pi: RecordedPageIn) -> None:
        """A PAGE_IN the lender did not answer in its step: it stays outstanding and the
        granules it covers, evicted until then, wait on it (PAGING_IN)."""
        self.outstanding[pi.request_id] = pi
        for g in self._granules(pi.offset, pi.length):
            state, lease = self.states[g]
            if state is S.EVICTED and self.waiting_on.get(g) == pi.request_id:
                self.states[g] = (S.PAGING_IN, lease)

    def _release_evicted(self, lease: int) -> None:
        """REVOKE(RELEASE) of an evicted lease: its granules become vacant; a PAGE_IN that
        covered them stays outstanding, but nothing waits on it there any more."""
        for g, (s, lid) in enumerate(self.states):
            if lid == lease and s in (S.EVICTED, S.PAGING_IN):
                self.states[g] = (S.VACANT, 0)
                self.waiting_on.pop(g, None)

    def _grant_range(
        self, offset: int, length: int, prot: int, via_pool: bool, *, evict_at_once: bool = False
    ) -> int:
        """The lender grants [offset, offset + length) holding what the model says."""
        fill = bytes(self.contents[offset : offset + length])
        if via_pool:
            os.pwrite(self.pool, fill, offset)
            fd, fd_offset, owned = self.pool, offset, False
        else:
            fd, fd_offset, owned = self._own(self._fresh(length, fill)), 0, True
        lease = self._new_id()
        self.e.grant(lease, offset, length, fd_offset, prot, self._share(fd, prot))
        self._became_resident(lease, Lease(offset, length, fd, fd_offset, prot, owned))
        return lease

    def _share(self, fd: int, prot: int) -> int:
        """The fd to pass: a dup, or a read-only reopen for every other read-only lease.

        Chosen by the lease counter, never by the fd's number: fd numbers differ between
        hypothesis's replays of one example, and a choice made on them makes replays diverge.
        """
        if prot == RO and self.next_lease % 2:
            return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        return os.dup(fd)

    async def _revoke(self, lease: int, mode: RevokeMode) -> None:
        """The engine's revoke of a live lease; its return is REVOKED on the wire."""
        rec = self.leases[lease]
        await self.e.revoke(lease, mode)
        if self.p2m is not None:
            assert not self.p2m.overlapping(rec.offset, rec.length), "REVOKED while mapped"
        self._check_mappings()

    def _spawn_accesses(self, nursery: trio.Nursery, accesses: list[Access_]) -> list[Box]:
        self.started = trio.current_time()
        return [spawn(nursery, self._do, a) for a in accesses]

    def _within_deadline(self, boxes: list[Box]) -> None:
        """However an access ended, it did by its deadline (a vfio-user reply must be sent)."""
        for b in boxes:
            assert b.done and b.finished_at <= self.started + TIMEOUT, (b.finished_at, self.started)

    # ------------------------------------------------------------------ grant

    @rule(
        start=st.integers(0, NG - 1),
        count=st.integers(1, 4),
        prot=st.sampled_from([RW, RW, RO]),
        via_pool=st.booleans(),
        bad=st.one_of(st.none(), st.none(), st.sampled_from(BAD_GRANTS)),
        pick=st.integers(0, 1 << 16),
    )
    def grant(
        self, start: int, count: int, prot: int, via_pool: bool, bad: str | None, pick: int
    ) -> None:
        offset, length = start * G, count * G
        fd_offset = offset if via_pool else 0
        flags = 0
        lease = self.next_lease
        seals = SEALS
        fd_size = APERTURE if via_pool else length
        kind = "memfd"
        if bad == "misaligned-offset":
            offset += 512
        elif bad == "misaligned-fd-offset":
            fd_offset += 512
            fd_size += G
        elif bad == "zero-length":
            length = 0
        elif bad == "unsealed":
            seals, via_pool = 0, False
        elif bad == "too-small":
            via_pool, fd_offset, fd_size = False, 0, length - G // 2
        elif bad == "bad-prot":
            prot = [0, 2, 4, 7, 0xFF][pick % 5]
        elif bad == "flags":
            flags = 1 << (pick % 32)
        elif bad == "pipe":
            kind = "pipe"
        elif bad == "read-only-fd-rw":
            kind, prot = "read-only", RW
        elif bad == "write-sealed-rw":
            seals, via_pool, prot = SEALS | F_SEAL_WRITE, False, RW
        elif bad == "duplicate-id":
            held = sorted(
                {lid for s, lid in self.states if s in (S.RESIDENT, S.EVICTED, S.PAGING_IN)}
            )
            if held:
                lease = held[pick % len(held)]
        if bad in ("unsealed", "too-small", "write-sealed-rw"):
            fd_offset = 0
            fd_size = max(fd_size, G // 2)

        # Every reason that applies (the specification lets the borrower name any of them).
        reasons = set()
        if lease != self.next_lease:
            reasons.add(NackReason.DUPLICATE_LEASE_ID)
        if prot not in VALID_PROTS:
            reasons.add(NackReason.BAD_PROTECTION)
        # flags 1 is fd kind dma-buf: known, but a memfd (or pipe) is no dma-buf (BAD_FD: no
        # exporter names it); every other bit is an unknown kind or reserved.
        dmabuf = flags == FdKind.DMABUF
        if flags and not dmabuf:
            reasons.add(NackReason.UNSUPPORTED_FLAGS)
        if length <= 0 or offset % G or length % G or fd_offset % G:
            reasons.add(NackReason.MISALIGNED)
        if offset + length > APERTURE:
            reasons.add(NackReason.OUTSIDE_APERTURE)
        if len(self.leases) >= self.max_leases:
            reasons.add(NackReason.TOO_MANY_LEASES)
        if any(self.states[g][0] is S.RESIDENT for g in self._granules(offset, length)):
            reasons.add(NackReason.OVERLAPS_LIVE_LEASE)
        if kind == "pipe" or dmabuf:
            reasons.add(NackReason.BAD_FD)
        else:
            if fd_offset + length > fd_size:
                reasons.add(NackReason.FD_TOO_SMALL)
            if not seals & F_SEAL_SHRINK:
                reasons.add(NackReason.FD_NOT_SEALED)
            if prot & PROT_WRITE and (kind == "read-only" or seals & F_SEAL_WRITE):
                reasons.add(NackReason.BAD_FD)

        fill = pattern(self.next_lease, max(length, 0))
        keep = -1
        if kind == "pipe":
            passed, w = os.pipe()
            os.close(w)
        elif via_pool:
            keep = self.pool
            passed = self._share(self.pool, prot) if kind == "memfd" else -1
        else:
            # Exactly fd_size bytes (not rounded up to a granule as _fresh does): a too-small
            # fd must really be too small.
            keep = memfd(fd_size, f"{PREFIX}lease", seals=seals, fill=fill[:fd_size])
            passed = -1
        if passed == -1:
            if kind == "read-only":
                passed = os.open(f"/proc/self/fd/{keep}", os.O_RDONLY | os.O_CLOEXEC)
            else:
                passed = self._share(keep, prot)

        before = self._snapshot()
        try:
            self.e.grant(lease, offset, length, fd_offset, prot, passed, flags)
        except GrantRefused as exc:
            assert reasons, f"a sound grant was refused: {exc}"
            assert exc.reason in reasons, (exc.reason, reasons)
            assert not fd_is_open(passed)
            assert self._snapshot() == before
            if keep not in (-1, self.pool):
                os.close(keep)
            if lease == self.next_lease:
                self.next_lease += 1  # the id is spent either way (section 8)
            return
        assert not reasons, f"the engine accepted a grant it must refuse: {reasons}"
        self._new_id()
        if via_pool:
            os.pwrite(self.pool, fill, fd_offset)
            rec = Lease(offset, length, self.pool, fd_offset, prot, owned=False)
        else:
            rec = Lease(offset, length, self._own(keep), fd_offset, prot, owned=True)
        self.contents[offset : offset + length] = fill
        self._became_resident(lease, rec)

    # ------------------------------------------------------------------ revoke

    @rule(
        pick=st.integers(0, 1 << 16),
        mode=st.sampled_from(list(RevokeMode)),
        slow=st.booleans(),
        waiters=st.lists(
            st.tuples(st.integers(0, G // 8 - 1), st.sampled_from([1, 2, 4, 8]), st.booleans()),
            max_size=3,
            unique_by=lambda t: t[0],
        ),
        answer=st.sampled_from(["grant", "none"]),
        via_pool=st.booleans(),
    )
    def revoke(
        self,
        pick: int,
        mode: RevokeMode,
        slow: bool,
        waiters: list[tuple[int, int, bool]],
        answer: str,
        via_pool: bool,
    ) -> None:
        # Mostly leases that hold something (live ones twice as often), sometimes any id.
        evicted_ids = sorted({lid for s, lid in self.states if s in (S.EVICTED, S.PAGING_IN)})
        live_ids = list(self.leases)
        candidates = [*live_ids, *live_ids, *evicted_ids, *self.ever, 0, self.next_lease + 7]
        lease = candidates[pick % len(candidates)]
        live = lease in self.leases
        evicted = any(lid == lease and s in (S.EVICTED, S.PAGING_IN) for s, lid in self.states)
        if not (live and slow):
            waiters = []

        async def go() -> None:
            e = self.e
            if not live:
                if not evicted:
                    with pytest.raises(UnknownLease):
                        await e.revoke(lease, mode)
                    return
                await e.revoke(lease, mode)
                if mode is RevokeMode.RELEASE:
                    self._release_evicted(lease)
                return
            rec = self.leases[lease]
            if not slow:
                await self._revoke(lease, mode)
                self.expect["revokes"] += 1
                self._end_lease(lease, mode)
                return

            async def slow_unmap(start: int, length: int) -> None:
                assert (start, length) == (rec.offset, rec.length)
                await trio.sleep(0.1)

            e.unmap_hooks.append(slow_unmap)
            try:
                accesses = [
                    self._access_at(rec.offset + slot * 8, size, w) for slot, size, w in waiters
                ]
                page_ins_before = len(self.lender.page_ins)
                unanswered: list[RecordedPageIn] = []
                async with trio.open_nursery() as nursery:
                    revoking = spawn(nursery, self._revoke, lease, mode)
                    await trio.sleep(0.01)
                    assert e.window_at(rec.offset).state is S.REVOKING  # type: ignore[union-attr]
                    self._nothing_served_now(rec.offset, rec.length)
                    boxes = self._spawn_accesses(nursery, accesses)
                    await trio.sleep(0.05)
                    assert not any(b.done for b in boxes)
                    if accesses and mode is RevokeMode.EVICT:
                        pi = await self._page_in_sent()
                        assert revoking.done  # the revoke ended before any page-in
                        self.expect["revokes"] += 1
                        self._end_lease(lease, mode)
                        assert (pi.offset, pi.length) == (rec.offset, rec.length)
                        if answer == "grant":
                            await self._answer_grant(pi, RW, via_pool)
                        else:
                            self.lender.take(pi.request_id)  # never answered: the deadline
                            unanswered.append(pi)
                self.expect["faults"] += len(accesses)
                self._within_deadline(boxes)
                sent = len(self.lender.page_ins) - page_ins_before
                assert sent == (1 if accesses and mode is RevokeMode.EVICT else 0)
                revoking.get()
                if lease in self.leases:
                    self.expect["revokes"] += 1
                    self._end_lease(lease, mode)
                for pi in unanswered:
                    self._left_outstanding(pi)
                served = mode is RevokeMode.EVICT and answer == "grant"
                for a, b in zip(accesses, boxes, strict=True):
                    if served:
                        self._check_served(a, b)
                    else:
                        self._check_failed(a, b)
            finally:
                e.unmap_hooks.remove(slow_unmap)

        run(go)

    # ------------------------------------------------------------------ guest accesses

    def _access_at(self, offset: int, size: int, write: bool) -> Access_:
        self.counter += 1
        data = bytes((self.counter + i * 37) & 0xFF for i in range(size)) if write else None
        return Access_(offset, size, data)

    async def _do(self, a: Access_) -> bytes | None:
        """A guest access: straight to a p2m mapping if there is one, else trapped."""
        p2m = self.p2m
        m = None if p2m is None else p2m.find(a.offset)
        if p2m is not None and m is not None:
            if a.data is None:
                return p2m.read(m, a.offset, a.size)
            if m.writable:
                p2m.write(m, a.offset, a.data)
                return None
        result = None
        if a.data is None:
            result = await self.e.read(a.offset, a.size)
        else:
            await self.e.write(a.offset, a.data)
        if p2m is not None:
            p2m.trapped(a.offset)
        return result

    async def _page_in_sent(self) -> RecordedPageIn:
        """The next PAGE_IN the engine sends, left unanswered: the answer takes it."""
        pi = await self.lender.next_page_in()
        self.lender.unanswered.insert(0, pi)
        return pi

    async def _make_room(self) -> None:
        """Evict the oldest lease while the borrower's lease limit is reached, as an LRU
        lender does before it grants (a grant beyond the limit is NACKed, by design)."""
        while len(self.leases) >= self.max_leases:
            oldest = next(iter(self.leases))
            await self._revoke(oldest, RevokeMode.EVICT)
            self.expect["revokes"] += 1
            self._end_lease(oldest, RevokeMode.EVICT)

    async def _answer_grant(self, pi: RecordedPageIn, prot: int, via_pool: bool) -> int:
        await self._make_room()
        self.lender.take(pi.request_id)
        lease = self._grant_range(pi.offset, pi.length, prot, via_pool)
        self.e.page_in_done(pi.request_id, PageInStatus.OK)
        return lease

    @rule(
        g=st.integers(0, NG - 1),
        where=st.sampled_from(["anywhere", "held", "evicted", "evicted", "waiting"]),
        shape=st.lists(
            st.tuples(st.integers(0, G // 8 - 1), st.sampled_from([1, 2, 4, 8]), st.booleans()),
            min_size=1,
            max_size=4,
            unique_by=lambda t: t[0],
        ),
        answer=st.sampled_from(ANSWERS),
        status=st.sampled_from(ERROR_STATUSES),
        via_pool=st.booleans(),
        policy=st.none() | st.sampled_from(list(FailurePolicy)),
    )
    def access(
        self,
        g: int,
        where: str,
        shape: list[tuple[int, int, bool]],
        answer: str,
        status: int,
        via_pool: bool,
        policy: FailurePolicy | None,
    ) -> None:
        # A device's policy never changes, but the engine reads it at every failure: drawing it
        # here too lets every fault path meet every policy, not one policy per example.
        if policy is not None:
            self.policy = self.e.config.policy = policy
        # Most of the aperture is vacant: aim at granules that hold something, evicted ones
        # (the fault path) most of all, falling back to any granule.
        held = [i for i, (s, _) in enumerate(self.states) if s is not S.VACANT]
        evicted = [i for i in held if self.states[i][0] in (S.EVICTED, S.PAGING_IN)]
        waiting = [i for i in held if self.states[i][0] is S.PAGING_IN]
        among = {
            "anywhere": [],
            "held": held,
            "evicted": evicted or held,
            "waiting": waiting or evicted or held,
        }[where]
        if among:
            g = among[g % len(among)]
        accesses = [self._access_at(g * G + slot * 8, size, w) for slot, size, w in shape]
        state, lease = self.states[g]
        page_ins_before = len(self.lender.page_ins)

        if state is S.PAGING_IN:
            late = answer in ("grant", "grant-ro", "grant-larger", "late")
            self._access_paging_in(g, accesses, late, via_pool)
            return

        if state is not S.EVICTED:

            async def direct() -> list[Box]:
                async with trio.open_nursery() as nursery:
                    boxes = self._spawn_accesses(nursery, accesses)
                return boxes

            boxes: list[Box] = run(direct)  # type: ignore[assignment]
            for a, b in zip(accesses, boxes, strict=True):
                assert b.finished_at == 0  # nothing waited
                writable = state is S.RESIDENT and self.leases[lease].prot & PROT_WRITE
                if state is S.RESIDENT and (a.data is None or writable):
                    self._check_served(a, b)
                else:
                    self._check_failed(a, b)
            assert len(self.lender.page_ins) == page_ins_before
            return

        lo, hi = self._run(g)
        run_offset, run_length = lo * G, (hi - lo) * G
        kinds = {Access.READ if a.data is None else Access.WRITE for a in accesses}
        outcome: dict[str, Any] = {"served": False, "ro": False, "left": None}

        async def faulting() -> list[Box]:
            self.lender.reachable = answer != "unreachable"
            try:
                async with trio.open_nursery() as nursery:
                    boxes = self._spawn_accesses(nursery, accesses)
                    if answer != "unreachable":
                        pi = await self._page_in_sent()
                        assert (pi.offset, pi.length) == (run_offset, run_length)
                        assert pi.access in kinds
                        await self._lender_answers(pi, answer, status, via_pool, outcome)
                return boxes
            finally:
                self.lender.reachable = True

        boxes = run(faulting)  # type: ignore[assignment]
        self._within_deadline(boxes)
        sent = len(self.lender.page_ins) - page_ins_before
        if answer == "unreachable":
            # Nothing to wait for: each access tried its own PAGE_IN and failed at once; a
            # lender that answers later was tried from the fast path's miss first, silently.
            assert sent == len(accesses) * (2 if self.lender.answers_later else 1)
            self.lender.unanswered.clear()
        else:
            assert sent == 1, "concurrent faults on one window must share one PAGE_IN"
            self.expect["faults"] += len(accesses)
        for a, b in zip(accesses, boxes, strict=True):
            if outcome["served"] and not (outcome["ro"] and a.data is not None):
                self._check_served(a, b)
            else:
                self._check_failed(a, b)
        if outcome.get("evict"):
            lease = outcome["evict"]
            self.expect["revokes"] += 1
            self._end_lease(lease, RevokeMode.EVICT)
        if outcome["left"] is not None:
            self._left_outstanding(outcome["left"])

    def _access_paging_in(
        self, g: int, accesses: list[Access_], answer_late: bool, via_pool: bool
    ) -> None:
        """Accesses to a window whose PAGE_IN is still outstanding: they wait on it, send no
        new PAGE_IN, and either its late grant serves them or each fails at its deadline."""
        lo, hi = self._run(g)
        rid = self.waiting_on[g]
        waiting = [i for i, r in self.waiting_on.items() if r == rid]
        page_ins_before = len(self.lender.page_ins)

        async def wait_on_it() -> list[Box]:
            async with trio.open_nursery() as nursery:
                boxes = self._spawn_accesses(nursery, accesses)
                await trio.testing.wait_all_tasks_blocked()
                assert not any(b.done for b in boxes)
                if answer_late:
                    await trio.sleep(TIMEOUT / 2)
                    await self._make_room()
                    self._grant_range(lo * G, (hi - lo) * G, RW, via_pool)
                    self.e.page_in_done(rid, PageInStatus.OK)
            return boxes

        boxes: list[Box] = run(wait_on_it)  # type: ignore[assignment]
        self._within_deadline(boxes)
        assert len(self.lender.page_ins) == page_ins_before, "a second PAGE_IN for a window"
        self.expect["faults"] += len(accesses)
        for a, b in zip(accesses, boxes, strict=True):
            if answer_late:
                self._check_served(a, b)
            else:
                assert b.finished_at == self.started + TIMEOUT  # each to its own deadline
                self._check_failed(a, b)
        if answer_late:
            self._late_done(waiting, PageInStatus.OK)

    def _late_done(self, waiting: list[int], status: int) -> None:
        """The model's side of a late PAGE_IN_DONE: the granules that waited on it and were
        not granted meanwhile are evicted again (vacant for NOT_LENT), as after an answer in
        time."""
        for g in waiting:
            state, lease = self.states[g]
            if state is S.PAGING_IN:
                vacant = status == PageInStatus.NOT_LENT
                self.states[g] = (S.VACANT, 0) if vacant else (S.EVICTED, lease)

    @rule(
        pick=st.integers(0, 1 << 16),
        how=st.sampled_from(["grant", "grant", "status", "ok-no-grant"]),
        status=st.sampled_from(ERROR_STATUSES),
        via_pool=st.booleans(),
    )
    def late_answer(self, pick: int, how: str, status: int, via_pool: bool) -> None:
        """The lender answers, late, a PAGE_IN whose deadline passed in an earlier step."""
        if not self.outstanding:
            return
        rid = sorted(self.outstanding)[pick % len(self.outstanding)]
        waiting = [g for g, r in self.waiting_on.items() if r == rid]
        for g in waiting:
            assert self.states[g][0] is S.PAGING_IN

        async def answer() -> None:
            if how == "grant":
                # Grant what still waits on the request (a real lender grants the range it was
                # asked for; the parts granted since would be NACKed as overlapping).
                runs: list[tuple[int, int]] = []
                for g in sorted(waiting):
                    if runs and runs[-1][1] == g and self.states[g] == self.states[g - 1]:
                        runs[-1] = (runs[-1][0], g + 1)
                    else:
                        runs.append((g, g + 1))
                for lo, hi in runs:
                    await self._make_room()
                    self._grant_range(lo * G, (hi - lo) * G, RW, via_pool)
                self.e.page_in_done(rid, PageInStatus.OK)
            else:
                self.e.page_in_done(rid, status if how == "status" else PageInStatus.OK)

        run(answer)
        assert rid not in self.outstanding and rid not in self.waiting_on.values()
        self._late_done(waiting, status if how == "status" else PageInStatus.OK)

    async def _lender_answers(
        self, pi: RecordedPageIn, answer: str, status: int, via_pool: bool, outcome: dict[str, Any]
    ) -> None:
        e = self.e
        if answer in ("grant", "grant-ro"):
            await self._answer_grant(pi, RO if answer == "grant-ro" else RW, via_pool)
            outcome.update(served=True, ro=answer == "grant-ro")
        elif answer == "grant-larger":
            await self._make_room()
            lo, hi = pi.offset // G, (pi.offset + pi.length) // G
            if lo > 0 and self.states[lo - 1][0] is not S.RESIDENT:
                lo -= 1
            if hi < NG and self.states[hi][0] is not S.RESIDENT:
                hi += 1
            for g in range(lo, hi):
                if self.states[g][0] in (S.VACANT, S.LOST):
                    self.contents[g * G : (g + 1) * G] = pattern(self.next_lease + g, G)
            self.lender.take(pi.request_id)
            self._grant_range(lo * G, (hi - lo) * G, RW, via_pool)
            e.page_in_done(pi.request_id, PageInStatus.OK)
            outcome.update(served=True)
        elif answer == "grant-evict":
            # Grant, evict at once, then PAGE_IN_DONE: the waiters were served by the grant.
            await trio.testing.wait_all_tasks_blocked()
            await self._make_room()
            self.lender.take(pi.request_id)
            lease = self._grant_range(pi.offset, pi.length, RW, via_pool)
            await self._revoke(lease, RevokeMode.EVICT)
            e.page_in_done(pi.request_id, PageInStatus.OK)
            outcome.update(served=True, evict=lease)
        elif answer == "status":
            self.lender.fail(self.lender.take(pi.request_id), status)
            if status == PageInStatus.NOT_LENT:
                for g in range(pi.offset // G, (pi.offset + pi.length) // G):
                    self.states[g] = (S.VACANT, 0)
        elif answer == "ok-no-grant":
            self.lender.fail(self.lender.take(pi.request_id), PageInStatus.OK)
        elif answer == "none":
            self.lender.take(pi.request_id)  # not answered; the deadline passes
            outcome["left"] = pi  # the PAGE_IN stays outstanding
        elif answer == "late":
            t0 = trio.current_time()
            await trio.sleep(TIMEOUT + 0.5)
            assert trio.current_time() - t0 >= TIMEOUT
            for g in range(pi.offset // G, (pi.offset + pi.length) // G):
                assert self.states[g][0] is S.EVICTED
            await self._answer_grant(pi, RW, via_pool)  # a late grant is an ordinary grant
        elif answer == "lost":
            await trio.testing.wait_all_tasks_blocked()
            self.lender.take(pi.request_id)
            e.lender_lost()
            self._lose_lender()
        else:  # pragma: no cover
            raise AssertionError(answer)

    # ------------------------------------------------------------------ lender events

    @rule(
        lost=st.sampled_from([False, False, False, True]),
        rid=st.integers(0, 1 << 16),
        status=st.sampled_from([0, *ERROR_STATUSES]),
        restart_ids=st.booleans(),
    )
    def lender_event(self, lost: bool, rid: int, status: int, restart_ids: bool) -> None:
        """A stale PAGE_IN_DONE, or (rarely: it ends every lease) the lender's loss."""
        if not lost:
            # No PAGE_IN outlives a step: any PAGE_IN_DONE now is late or unknown, and consumed.
            rid %= len(self.lender.page_ins) + 3
            if rid in self.outstanding:
                return  # a late answer: `late_answer` plays those
            before = self._snapshot()
            self.e.page_in_done(rid, status)
            assert self._snapshot() == before
            return
        self.e.lender_lost()
        self._lose_lender()
        if restart_ids:
            self.next_lease = 1  # a new lender connection numbers its leases afresh
            self.ever = []

    # ------------------------------------------------------------------ invariants

    def _snapshot(self) -> object:
        e = self.e
        return (
            [
                (w.start, w.length, w.state, w.lease_id, w.fd, w.fd_offset, w.prot)
                for w in e.windows()
            ],
            dict(e._live),
            {k: set(v) for k, v in e._evicted.items()},
            e.kept_fds,
            e.counters.as_dict(),
        )

    @invariant()
    def windows_match_the_model(self) -> None:
        if self.engine is None:
            return
        e = self.e
        end = 0
        seen = [(S.VACANT, 0)] * NG
        for w in e.windows():
            assert w.start >= end, "windows overlap or are out of order"
            assert w.length > 0 and w.start % G == 0 and w.length % G == 0
            assert w.end <= APERTURE
            # No access waits between steps; only an unanswered PAGE_IN outlives one.
            assert w.state in (S.RESIDENT, S.EVICTED, S.PAGING_IN, S.LOST), w
            assert w.waiters is None  # none, and no empty list left behind
            if w.state is S.PAGING_IN:
                assert w.request_id in self.outstanding, w
            else:
                assert w.request_id == 0, w
            end = w.end
            for g in range(w.start // G, w.end // G):
                seen[g] = (w.state, w.lease_id)
                if w.state is S.PAGING_IN:
                    assert self.waiting_on.get(g) == w.request_id, (g, w)
            assert e.window_at(w.start) is w and e.window_at(w.end - 1) is w
        assert seen == self.states

    def _nothing_served_now(self, offset: int, length: int) -> None:
        """No access reaches [offset, offset + length) without waiting: `read_now` and
        `write_now` (fast entries included) decline, and nothing is written."""
        e = self.e
        # A probe, not an access: a miss must not ask the lender for a page-in here.
        asks, self.lender.answers_later = self.lender.answers_later, False
        try:
            for at in range(offset, offset + length, G // 2):
                assert e.read_now(at, 8) is None, at
                assert e.write_now(at, POISON) is False, at
        finally:
            self.lender.answers_later = asks

    @invariant()
    def fast_entries_match_the_windows(self) -> None:
        """The revoke guarantee as the table's fast entries carry it: after every step each
        entry is what its window calls for (RESIDENT, memfd, this fd and fd_base) or 0, and
        no granule that is not RESIDENT is read or written without a wait."""
        if self.engine is None:
            return
        e = self.e
        table = e._table
        check_fast_entries(table)
        for g in range(NG):
            w = e.window_at(g * G)
            check_find_fast(table, g * G, w)
            if w is None or w.state is not S.RESIDENT:
                self._nothing_served_now(g * G, G)
            elif type(got := table.find_fast(g * G)) is int:
                assert fd_is_open((got >> 1) & FAST_FD_MASK)

    @invariant()
    def fds_belong_to_live_leases_only(self) -> None:
        if self.engine is None:
            return
        e = self.e
        kept = set()
        keys = set()
        live = {}
        for w in e.windows():
            if w.state is S.RESIDENT:
                assert w.fd >= 0 and fd_is_open(w.fd)
                assert e._live.get(w.lease_id) is w
                rec = self.leases[w.lease_id]
                assert (w.fd_offset, w.prot) == (rec.fd_offset, rec.prot)
                kept.add(w.fd)
                keys.add(file_key(w.fd))
                live[w.lease_id] = w
                # The lent memory holds what the guest wrote there.
                got = os.pread(w.fd, w.length, w.fd_offset)
                assert got == bytes(self.contents[w.start : w.end])
            else:
                assert w.fd == -1
                if w.state in (S.EVICTED, S.PAGING_IN):
                    assert w in e._evicted[w.lease_id]
                else:
                    assert all(w not in pieces for pieces in e._evicted.values())
        assert e._live == live
        assert set(live) == set(self.leases)
        assert e.lease_count == len(self.leases)
        assert e.kept_fds == len(keys) == len(kept)
        for pieces in e._evicted.values():
            assert pieces and all(p.state in (S.EVICTED, S.PAGING_IN) for p in pieces)
        # Nothing else in this process holds a lent memfd: no leak, no stale fd.
        assert _memfd_fds() == self.owned | kept

    def _check_mappings(self) -> None:
        """Every mapping of a lent memfd in /proc/self/maps is a p2m mapping the fake holds."""
        maps = [] if self.p2m is None else list(self.p2m.maps.values())
        held = sorted((m.addr, m.addr + m.length) for m in maps)
        merged: list[list[int]] = []
        for lo, hi in held:
            if merged and merged[-1][1] == lo:
                merged[-1][1] = hi
            else:
                merged.append([lo, hi])
        mapped = _mapped_memfd_ranges()
        for lo, hi in mapped:
            assert any(a <= lo and hi <= b for a, b in merged), "a lent page is mapped"
        assert sum(hi - lo for lo, hi in mapped) == sum(hi - lo for lo, hi in held)

    @invariant()
    def mappings_are_of_resident_windows(self) -> None:
        if self.engine is None:
            return
        self._check_mappings()
        if self.p2m is None:
            return
        for m in self.p2m.maps.values():
            w = self.e.window_at(m.start)
            assert w is not None
            assert (w.start, w.length, w.lease_id) == (m.start, m.length, m.lease)
            assert w.state is S.RESIDENT and m.lease in self.leases
            got = self.p2m.read(m, m.start, m.length)
            assert got == bytes(self.contents[m.start : m.start + m.length])

    @invariant()
    def counters_match(self) -> None:
        if self.engine is None:
            return
        c = self.e.counters
        uncounted = self.unsent // 2 if self.lender.answers_later else 0
        assert c.page_ins == len(self.lender.page_ins) - uncounted
        for name, value in self.expect.items():
            assert getattr(c, name) == value, name


# Registered, not loaded: loading would change the settings of every other hypothesis test.
settings.register_profile(
    "lease-sm",
    max_examples=300,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "lease-sm-deep", settings.get_profile("lease-sm"), max_examples=2000, stateful_step_count=60
)
_settings = settings.get_profile(os.environ.get("DEVMODEL_SM_PROFILE", "lease-sm"))
if "DEVMODEL_SM_EXAMPLES" in os.environ:
    _settings = settings(_settings, max_examples=int(os.environ["DEVMODEL_SM_EXAMPLES"]))
LeaseEngineMachine.TestCase.settings = _settings
TestLeaseEngineMachine = LeaseEngineMachine.TestCase
