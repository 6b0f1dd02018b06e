"""The window table against a plain list: lookups and range queries after any history.

The table is two-level (devmodel/leases/table.py): a dict of blocks, each holding one
window, a short sorted list or one slot per unit. Every form change (a second window in a
block, one past the list's limit, back under half of it, the last one gone) and every window
that spans blocks is a place where a stale slot or an off-by-one would answer wrongly and
silently, as would a remembered window kept past its removal; so the tests run with tiny
blocks and limits, where a few windows cross all of them, next to the real geometry, and look
up every unit boundary after every step.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from devmodel.leases.states import WindowState
from devmodel.leases.table import BLOCK_UNITS, FEW_MAX, WindowTable, _Few, _Slots
from devmodel.leases.window import Window

SLOTS = 48  # units in the model aperture; windows are 1 to 12 units

# (units per block, windows a block keeps as a list): the real ones, and small ones with which
# windows span blocks and blocks change form after a few steps.
GEOMETRIES = [(BLOCK_UNITS, FEW_MAX), (1, 2), (4, 2), (4, 3), (8, 4), (16, 2)]
# Unit sizes: 1, a page, and a granule that is no power of two (its unit is the largest
# power of two dividing it; windows are multiples of the granule).
GRANULES = [1, 4096, 3 * 4096]


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


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, SLOTS - 1), st.integers(1, 12)),
        # A run of one-unit windows from a (where free): crowds blocks into slots quickly.
        st.tuples(st.just("add run"), st.integers(0, SLOTS - 1), st.integers(2, 16)),
        st.tuples(st.just("remove"), st.integers(0, 1 << 10), st.just(0)),
        st.tuples(st.just("remove stale"), st.integers(0, 1 << 10), st.just(0)),
        st.tuples(st.just("overlapping"), st.integers(-2, SLOTS + 2), st.integers(0, 16)),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(
    operations,
    st.sampled_from(GEOMETRIES),
    st.sampled_from(GRANULES),
)
def test_table_answers_as_a_plain_list_does(
    ops: list[tuple[str, int, int]], geometry: tuple[int, int], granule: int
) -> None:
    block_units, few_max = geometry
    table = WindowTable(granule, block_units=block_units, few_max=few_max)
    model: list[Window] = []
    gone: list[Window] = []  # removed windows: removing one again must change nothing
    g = granule
    for op, a, b in ops:
        if op == "add":
            w = Window(a * g, min(b, SLOTS - a) * g, WindowState.RESIDENT)
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
            for unit in range(a, min(a + b, SLOTS)):
                w = Window(unit * g, g, WindowState.EVICTED)
                if not naive_overlapping(model, w.start, w.end):
                    table.add(w)
                    model.append(w)
        elif op == "remove" and model:
            w = model.pop(a % len(model))
            table.remove(w)
            gone.append(w)
        elif op == "remove stale" and gone:
            table.remove(gone[a % len(gone)])
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
        for unit in range(-2, SLOTS + 2):
            for offset in {unit * g, unit * g + g - 1}:
                assert table.find(offset) is naive_find(model, offset), (op, offset)
            for units in (1, 5):
                got = table.overlapping(unit * g, (unit + units) * g)
                assert ids(got) == ids(naive_overlapping(model, unit * g, (unit + units) * g))
        assert ids(table.overlapping(-(1 << 40), 1 << 40)) == ids(
            sorted(model, key=lambda w: w.start)
        )
        assert len(table) == len(model)
        assert ids(list(table)) == ids(sorted(model, key=lambda w: w.start))
        check_form(table, few_max)
    for w in list(model):
        table.remove(w)
    assert len(table) == 0 and table._blocks == {}  # nothing left behind, not even a block


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
