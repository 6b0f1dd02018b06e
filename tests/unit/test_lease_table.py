"""The window table against a plain list: lookups and range queries after any history.

The table is two-level (devmodel/leases/table.py): a dict of blocks, each holding one
window, a short sorted list or one slot per unit. Every form change (a second window in a
block, one past the list's limit, back under half of it, the last one gone) and every window
that spans blocks is a place where a stale slot or an off-by-one would answer wrongly and
silently, as would a remembered window kept past its removal; so the tests run with tiny
blocks and limits, where a few windows cross all of them, next to the real geometry, and look
up every unit boundary after every step.

The fast entries of crowded blocks (fd and fd_base packed in one int, for the resident access)
carry the revoke guarantee: after every step, including changes of a window's state, fd,
fd_base, prot or mapping followed by `refresh`, every unit's entry must be what its window
calls for, 0 outside crowded blocks, and `find_fast` must answer with the window or with that
entry.
"""

from __future__ import annotations

from typing import cast

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from devmodel.leases.dmabuf import DmabufMapping
from devmodel.leases.states import WindowState
from devmodel.leases.table import (
    BLOCK_UNITS,
    FAST_FD_MASK,
    FEW_MAX,
    WindowTable,
    _Few,
    _Slots,
    fast_entry,
)
from devmodel.leases.window import Window
from tests.unit.lease_table_support import check_fast_entries, check_find_fast

SLOTS = 48  # units in the model aperture; windows are 1 to 12 units

# (units per block, windows a block keeps as a list): the real ones, and small ones with which
# windows span blocks and blocks change form after a few steps.
GEOMETRIES = [(BLOCK_UNITS, FEW_MAX), (1, 2), (4, 2), (4, 3), (8, 4), (16, 2)]
# Unit sizes: 1, a page, and a granule that is no power of two (its unit is the largest
# power of two dividing it; windows are multiples of the granule).
GRANULES = [1, 4096, 3 * 4096]


S = WindowState
# A dma-buf lease's mapping, as far as the table cares: something that is not None.
MAPPING = cast(DmabufMapping, object())
# What a window may look like (state, fd, fd_base in units, prot, mapped): the ones with fast
# entries, and each way of having none (not RESIDENT, a mapping, an fd or fd_base that does
# not fit the packing).
VARIANTS: list[tuple[WindowState, int, int, int, bool]] = [
    (S.RESIDENT, 3, 0, 3, False),
    (S.RESIDENT, 9, -5, 1, False),
    (S.RESIDENT, FAST_FD_MASK, 7, 3, False),
    (S.RESIDENT, 1, 1 << 28, 3, False),  # fd_base 2**40 at 4 KiB units: just too far
    (S.RESIDENT, FAST_FD_MASK + 1, 0, 3, False),
    (S.RESIDENT, -1, 0, 3, False),
    (S.RESIDENT, 4, 0, 3, True),
    (S.REVOKING, 3, 0, 3, False),
    (S.EVICTED, -1, 0, 3, False),
    (S.PAGING_IN, -1, 0, 3, False),
    (S.LOST, -1, 0, 1, False),
]


def shape(w: Window, variant: int, unit: int) -> Window:
    """Give `w` the fields of VARIANTS[variant] (fd_base in units of `unit`)."""
    w.state, w.fd, base, w.prot, mapped = VARIANTS[variant % len(VARIANTS)]
    w.fd_base = base * max(unit, 4096)
    w.mem = MAPPING if mapped else None
    return w


def naive_find(windows: list[Window], offset: int) -> Window | None:
    return next((w for w in windows if w.start <= offset < w.end), None)


def naive_overlapping(windows: list[Window], start: int, end: int) -> list[Window]:
    if end <= start:
        return []  # an empty range meets nothing
    return sorted((w for w in windows if w.start < end and w.end > start), key=lambda w: w.start)


def ids(windows: list[Window]) -> list[int]:
    return [id(w) for w in windows]


def check_form(table: WindowTable, few_max: int) -> None:
    """Each block is in the form the table's docstring gives for what it holds."""
    blocks = table._blocks  # the representation is what is under test here
    for v in blocks.values():
        if type(v) is _Few:
            assert 2 <= len(v.windows) <= few_max
            assert v.starts == [w.start for w in v.windows] == sorted(v.starts)
        elif type(v) is _Slots:
            assert v.members == len(v.windows()) > max(few_max // 2, 2)
        else:
            assert type(v) is Window


variants = st.integers(0, len(VARIANTS) - 1)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, SLOTS - 1), st.integers(1, 12), variants),
        # A run of one-unit windows from a (where free): crowds blocks into slots quickly.
        st.tuples(st.just("add run"), st.integers(0, SLOTS - 1), st.integers(2, 16), variants),
        st.tuples(st.just("remove"), st.integers(0, 1 << 10), st.just(0), st.just(0)),
        st.tuples(st.just("remove stale"), st.integers(0, 1 << 10), st.just(0), st.just(0)),
        # A window replaced by another of the same range (the grant that answers a page-in).
        st.tuples(st.just("replace"), st.integers(0, 1 << 10), st.just(0), variants),
        st.tuples(
            st.just("overlapping"), st.integers(-2, SLOTS + 2), st.integers(0, 16), st.just(0)
        ),
        # A window's state, fd, fd_base, prot or mapping changes, then `refresh` (as the
        # engine's _update does); "change stale" does it to a removed window.
        st.tuples(st.just("change"), st.integers(0, 1 << 10), st.just(0), variants),
        st.tuples(st.just("change stale"), st.integers(0, 1 << 10), st.just(0), variants),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(
    operations,
    st.sampled_from(GEOMETRIES),
    st.sampled_from(GRANULES),
    st.booleans(),
)
def test_table_answers_as_a_plain_list_does(
    ops: list[tuple[str, int, int, int]], geometry: tuple[int, int], granule: int, sized: bool
) -> None:
    block_units, few_max = geometry
    g = granule
    # `sized`: with the flat array of fast entries over the aperture, which find_fast reads;
    # without it each crowded block keeps its own.
    size = SLOTS * g if sized else 0
    table = WindowTable(granule, size=size, block_units=block_units, few_max=few_max)
    unit = granule & -granule
    model: list[Window] = []
    gone: list[Window] = []  # removed windows: removing one again must change nothing
    for op, a, b, variant in ops:
        if op == "add":
            w = shape(Window(a * g, min(b, SLOTS - a) * g, S.RESIDENT), variant, unit)
            meets = naive_overlapping(model, w.start, w.end)
            if not meets:  # the engine never overlaps
                table.add(w)
                model.append(w)
            elif [m.start for m in meets] == [w.start]:  # the table replaces a same start
                table.add(w)
                model.remove(meets[0])
                gone.append(meets[0])
                model.append(w)
        elif op == "add run":
            for u in range(a, min(a + b, SLOTS)):
                w = shape(Window(u * g, g, S.EVICTED), variant + u, unit)
                if not naive_overlapping(model, w.start, w.end):
                    table.add(w)
                    model.append(w)
        elif op == "remove" and model:
            w = model.pop(a % len(model))
            table.remove(w)
            gone.append(w)
        elif op == "remove stale" and gone:
            table.remove(gone[a % len(gone)])
        elif op == "replace" and model:
            i = a % len(model)
            old = model[i]
            new = shape(Window(old.start, old.length, S.RESIDENT), variant, unit)
            table.replace(old, new)
            model[i] = new
            gone.append(old)
            with pytest.raises(ValueError):  # it is not there any more
                table.replace(old, shape(Window(old.start, old.length, S.RESIDENT), 0, unit))
        elif op == "change" and model:
            w = shape(model[a % len(model)], variant, unit)
            table.refresh(w)
        elif op == "change stale" and gone:
            # Another window may hold its units now: its entries must stay as they are.
            w = shape(gone[a % len(gone)], variant, unit)
            table.refresh(w)
        elif op == "overlapping":
            got = table.overlapping(a * g, (a + b) * g)
            assert ids(got) == ids(naive_overlapping(model, a * g, (a + b) * g))
            # Ranges that start or end inside a unit (the engine's are whole granules, but
            # nothing in the table relies on it).
            got = table.overlapping(a * g + g // 2, (a + b) * g - g // 2)
            want = naive_overlapping(model, a * g + g // 2, (a + b) * g - g // 2)
            assert ids(got) == ids(want)
        # After every step: every unit's first and last byte, and past both ends; a range
        # from every unit boundary, one unit and five units long.
        for u in range(-2, SLOTS + 2):
            for offset in {u * g, u * g + g - 1}:
                holder = naive_find(model, offset)
                check_find_fast(table, offset, holder)
                assert table.find(offset) is holder, (op, offset)
            for units in (1, 5):
                got = table.overlapping(u * g, (u + units) * g)
                assert ids(got) == ids(naive_overlapping(model, u * g, (u + units) * g))
        check_fast_entries(table)
        assert ids(table.overlapping(-(1 << 40), 1 << 40)) == ids(
            sorted(model, key=lambda w: w.start)
        )
        assert len(table) == len(model)
        assert ids(list(table)) == ids(sorted(model, key=lambda w: w.start))
        check_form(table, few_max)
    for w in list(model):
        table.remove(w)
    assert len(table) == 0 and table._blocks == {}  # nothing left behind, not even a block
    assert not any(table._entries)  # nor an entry


def test_a_crowded_block_answers_with_fast_entries_until_a_window_changes() -> None:
    """The access's view: in a crowded block `find_fast` gives the entry (fd, fd_base,
    writable) of a RESIDENT window and, once `refresh` saw it change, the window again."""
    table = WindowTable(4096, size=1 << 24, block_units=8, few_max=2)
    windows = [Window(i * 4096, 4096, S.RESIDENT, fd=5, prot=3) for i in range(4)]
    for w in windows:
        table.add(w)
    assert form(table) is _Slots
    entry = table.find_fast(2 * 4096 + 8)
    assert entry == fast_entry(windows[2]) == (5 << 1) | 1
    windows[2].state = S.REVOKING
    table.refresh(windows[2])
    assert table.find_fast(2 * 4096 + 8) is windows[2]
    for w in windows[:2]:
        table.remove(w)
    assert form(table) is _Few  # back to a list: every entry of the block is 0
    assert not any(table._entries)
    assert table.find_fast(3 * 4096) is windows[3]


def test_a_window_replaced_at_the_same_start_is_never_answered() -> None:
    table = WindowTable()
    old = Window(0, 4, WindowState.RESIDENT)
    table.add(old)
    assert table.find(1) is old
    new = Window(0, 2, WindowState.EVICTED)
    table.add(new)  # replaced without remove()
    assert table.find(1) is new
    assert table.find(3) is None
    assert len(table) == 1


def test_replace_takes_only_a_held_window_of_the_same_range() -> None:
    table = WindowTable()
    old = Window(0, 4, WindowState.EVICTED)
    table.add(old)
    for start, length in ((0, 2), (0, 8), (2, 2)):
        with pytest.raises(ValueError):
            table.replace(old, Window(start, length, WindowState.RESIDENT))
    assert table.find(3) is old  # refused: nothing changed
    new = Window(0, 4, WindowState.RESIDENT)
    table.replace(old, new)
    assert table.find(0) is table.find(3) is new and len(table) == 1
    with pytest.raises(ValueError):
        table.replace(Window(8, 4, WindowState.EVICTED), Window(8, 4, WindowState.RESIDENT))


def test_a_removed_window_is_forgotten() -> None:
    table = WindowTable()
    w = Window(8, 4, WindowState.RESIDENT)
    table.add(w)
    assert table.find(9) is w
    table.remove(w)
    assert table.find(9) is None
    assert table.overlapping(0, 100) == []


def test_a_large_window_costs_one_entry_per_block_and_is_found_everywhere() -> None:
    """A lease of 1 GiB in 4 KiB granules: 512 blocks of 2 MiB, never 262,144 slots."""
    table = WindowTable(4096)
    big = Window(1 << 30, 1 << 30, WindowState.RESIDENT)
    table.add(big)
    assert len(table._blocks) == (1 << 30) // (BLOCK_UNITS * 4096)
    assert all(v is big for v in table._blocks.values())
    for offset in (1 << 30, (1 << 30) + 12345, (3 << 29) - 1, (2 << 30) - 1):
        assert table.find(offset) is big
    assert table.find((1 << 30) - 1) is None and table.find(2 << 30) is None
    # Small windows around and inside its first and last blocks' neighbours.
    left = Window((1 << 30) - 4096, 4096, WindowState.EVICTED)
    right = Window(2 << 30, 4096, WindowState.EVICTED)
    table.add(left)
    table.add(right)
    assert table.overlapping(0, 3 << 30) == [left, big, right]
    assert table.find((1 << 30) - 1) is left and table.find(2 << 30) is right
    table.remove(big)
    assert [type(v) for v in table._blocks.values()] == [Window, Window]


def form(table: WindowTable) -> type:
    return type(table._blocks[0])


def test_a_crowded_block_gets_slots_and_loses_them_again() -> None:
    table = WindowTable(4096)
    windows = [Window(i * 4096, 4096, WindowState.RESIDENT) for i in range(FEW_MAX + 1)]
    for w in windows[:FEW_MAX]:
        table.add(w)
    assert form(table) is _Few
    table.add(windows[FEW_MAX])
    assert form(table) is _Slots
    for w in windows[: FEW_MAX // 2 + 1]:
        table.remove(w)
    assert form(table) is _Few
    assert list(table) == windows[FEW_MAX // 2 + 1 :]


@pytest.mark.parametrize(
    ("start", "length"), [(4096, 2048), (2048, 4096), (0, 0), (0, -4096), (-4096, 4096 + 1)]
)
def test_a_window_off_the_units_is_refused(start: int, length: int) -> None:
    table = WindowTable(4096)
    with pytest.raises(ValueError, match="units"):
        table.add(Window(start, length, WindowState.RESIDENT))
    assert len(table) == 0


def test_geometry_is_checked() -> None:
    for unit, block_units, few_max in [(0, 512, 32), (1, 3, 32), (1, 0, 32), (1, 512, 1)]:
        with pytest.raises(ValueError, match="geometry"):
            WindowTable(unit, block_units=block_units, few_max=few_max)
    with pytest.raises(ValueError, match="geometry"):
        WindowTable(4096, size=-1)
