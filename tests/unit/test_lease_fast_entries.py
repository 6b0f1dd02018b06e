"""The lease engine's fast entries: where the revoke guarantee lives for a crowded block.

A resident access to a crowded block reads one packed int (fd, fd_base, writable) from the
window table's flat array instead of the window (devmodel/leases/table.py), so that entry must
be 0 from the moment its window stops being RESIDENT. The engine keeps it so structurally: one
method, `LeaseEngine._update`, changes a window's state, fd or mapping and refreshes its entries
in the same step. The first test holds the engine to that (no other code assigns those fields);
the others walk the transitions of a window in a crowded block and check the access's view of
it. The hypothesis tests (test_lease_table.py, test_lease_engine_state_machine.py) check the
entries after every step of random histories.
"""

from __future__ import annotations

import ast
import inspect
import os

import trio

from devmodel.leases import engine as engine_module
from devmodel.leases import table as table_module
from devmodel.leases.engine import LeaseEngine
from devmodel.leases.table import FAST_SHIFT, WindowTable, _Slots
from devmodel.testing import PAGE, RO, RW, hold_unmaps, make_engine, memfd, pattern, spawn
from devmodel_wire.lease.constants import PageInStatus
from tests.unit.lease_engine_support import EVICT, RELEASE, S
from tests.unit.lease_table_support import check_fast_entries

# What a fast entry is made of: a change to any of these must refresh it.
FIELDS = {"state", "fd", "fd_base", "mem", "prot"}
N = 6  # windows in the crowded block (block of 8 units, a list of at most 2)


def test_only_update_changes_what_a_fast_entry_is_made_of() -> None:
    """Every assignment to a window's state, fd, fd_base, mem or prot in the engine is in
    `_update` (which refreshes the entries); the table never assigns them. A new state change
    written as `w.state = ...` elsewhere would leave a stale entry: this test names it."""
    for module, allowed in ((engine_module, {"_update"}), (table_module, set())):
        tree = ast.parse(inspect.getsource(module))
        where: dict[ast.AST, str] = {}  # each assignment -> the innermost function around it
        for node in ast.walk(tree):  # outer functions come before the ones inside them
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    where[inner] = node.name
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            else:
                continue
            function = where.get(node, "<module>")
            while targets:  # what is assigned: attributes, in tuples too (not what indexes)
                t = targets.pop()
                if isinstance(t, ast.Tuple | ast.List):
                    targets += t.elts
                elif isinstance(t, ast.Starred):
                    targets.append(t.value)
                elif isinstance(t, ast.Attribute) and t.attr in FIELDS and function not in allowed:
                    found.append(f"{module.__name__}:{node.lineno} in {function}")
        assert found == [], found


def crowded(size: int = 1 << 20) -> tuple[LeaseEngine, int]:
    """An engine whose first block (8 units) holds N one-granule leases: slots and entries.
    Lease i + 1 is at granule i, from a memfd at fd offset = aperture offset."""
    e = make_engine(size)
    e._table = WindowTable(PAGE, size=size, block_units=8, few_max=2)
    home = memfd(size, fill=pattern(1, N * PAGE))
    for i in range(N):
        e.grant(i + 1, i * PAGE, PAGE, i * PAGE, RW, os.dup(home))
    assert type(e._table._blocks[0]) is _Slots
    return e, home


def entry(e: LeaseEngine, i: int) -> int | None:
    """What the access finds for granule i: the fast entry, or None if it gets the window."""
    got = e._table.find_fast(i * PAGE + 8)
    return got if type(got) is int else None


def test_resident_windows_of_a_crowded_block_are_read_through_their_entries() -> None:
    e, home = crowded()
    try:
        want = pattern(1, N * PAGE)
        for i in range(N):
            got = entry(e, i)
            assert got is not None and got >> FAST_SHIFT == 0  # fd_base 0
            assert e.read_now(i * PAGE + 8, 8) == want[i * PAGE + 8 : i * PAGE + 16]
        assert e.write_now(PAGE + 8, b"written!")
        assert os.pread(home, 8, PAGE + 8) == b"written!"
        check_fast_entries(e._table)
    finally:
        e.close()
        os.close(home)


async def test_a_revoking_window_is_not_accessed_through_its_entry() -> None:
    """While a transport unmaps (REVOKING), the window's entry is 0 and accesses wait; its
    neighbours in the block keep theirs; after REVOKED (EVICT) the lender's pages are its own."""
    e, home = crowded()
    try:
        release = hold_unmaps(e)
        async with trio.open_nursery() as nursery:
            revoking = spawn(nursery, e.revoke, 3, EVICT)
            await trio.testing.wait_all_tasks_blocked()
            assert e.window_at(2 * PAGE).state is S.REVOKING  # type: ignore[union-attr]
            assert entry(e, 2) is None and entry(e, 1) is not None
            assert e.read_now(2 * PAGE, 8) is None
            assert not e.write_now(2 * PAGE, b"too late")
            check_fast_entries(e._table)
            release.set()
        revoking.get()
        os.pwrite(home, b"POISON!!", 2 * PAGE)  # the lender reuses the page
        assert entry(e, 2) is None and e.read_now(2 * PAGE, 8) is None
        check_fast_entries(e._table)
    finally:
        e.close()
        os.close(home)


def test_every_way_out_of_resident_clears_the_entry() -> None:
    e, home = crowded()
    try:
        assert e.revoke_now(1, EVICT)  # EVICTED
        assert e.revoke_now(2, RELEASE)  # gone
        check_fast_entries(e._table)
        assert entry(e, 0) is None and entry(e, 1) is None and entry(e, 2) is not None
        e.grant(7, 0, PAGE, 0, RO, os.dup(home))  # granted again, read-only: readable, not writable
        got = entry(e, 0)
        assert got is not None and not got & 1
        assert e.read_now(0, 8) is not None and not e.write_now(0, b"readonly")
        e.lender_lost()  # LOST, every fd closed
        check_fast_entries(e._table)
        assert all(entry(e, i) is None for i in range(N))
        assert all(e.read_now(i * PAGE, 8) is None for i in range(N))
    finally:
        e.close()
        os.close(home)


async def test_a_granted_piece_gets_its_entry_and_the_rest_keeps_none() -> None:
    """A lease of three granules in a crowded block, evicted, then one granule of it granted
    again (the rest stays EVICTED, split off as windows of their own)."""
    e, home = crowded()
    try:
        assert e.revoke_now(1, RELEASE) and e.revoke_now(2, RELEASE) and e.revoke_now(3, RELEASE)
        e.grant(10, 0, 3 * PAGE, 0, RW, os.dup(home))
        assert all(entry(e, i) is not None for i in range(3))
        assert e.revoke_now(10, EVICT)
        assert all(entry(e, i) is None for i in range(3))
        e.grant(11, PAGE, PAGE, PAGE, RW, os.dup(home))
        assert [entry(e, i) is not None for i in range(3)] == [False, True, False]
        check_fast_entries(e._table)
        e.page_in_done(999, PageInStatus.OK)  # a stale answer changes nothing
        check_fast_entries(e._table)
    finally:
        e.close()
        os.close(home)


def test_an_entry_that_does_not_fit_leaves_the_window_to_the_normal_path() -> None:
    """fd_base beyond the packing (a lease far into its fd): no entry, still served."""
    size = 1 << 20
    e, home = crowded(size)
    far = memfd((1 << 41) + PAGE, fill=b"")
    try:
        assert e.revoke_now(4, RELEASE)
        os.pwrite(far, b"far away", 1 << 41)
        e.grant(20, 3 * PAGE, PAGE, 1 << 41, RW, os.dup(far))
        assert entry(e, 3) is None
        assert e.read_now(3 * PAGE, 8) == b"far away"
        check_fast_entries(e._table)
    finally:
        e.close()
        os.close(far)
        os.close(home)


def test_close_leaves_no_entry_behind() -> None:
    e, home = crowded()
    try:
        e.close()
        assert not any(e._table._entries)
        assert all(e.read_now(i * PAGE, 8) is None for i in range(N))
    finally:
        os.close(home)
