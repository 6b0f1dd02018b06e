"""The window table against a plain list: lookups and range queries after any history.

The table answers from a remembered window before it bisects, and bisects without the
positional index; both are shortcuts a stale cache or an off-by-one would break silently.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given

from devmodel.leases.states import WindowState
from devmodel.leases.table import WindowTable
from devmodel.leases.window import Window

SLOTS = 32  # granules in the model aperture; windows are 1 to 4 granules


def naive_find(windows: list[Window], offset: int) -> Window | None:
    return next((w for w in windows if w.start <= offset < w.end), None)


def naive_overlapping(windows: list[Window], start: int, end: int) -> list[Window]:
    if end <= start:
        return []  # an empty range meets nothing
    return sorted((w for w in windows if w.start < end and w.end > start), key=lambda w: w.start)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, SLOTS - 1), st.integers(1, 4)),
        st.tuples(st.just("remove"), st.integers(0, 1 << 10), st.just(0)),
        st.tuples(st.just("find"), st.integers(-2, SLOTS + 2), st.just(0)),
        st.tuples(st.just("overlapping"), st.integers(-2, SLOTS + 2), st.integers(0, 6)),
    ),
    max_size=80,
)


@given(operations)
def test_table_answers_as_a_plain_list_does(ops: list[tuple[str, int, int]]) -> None:
    table = WindowTable()
    model: list[Window] = []
    for op, a, b in ops:
        if op == "add":
            w = Window(a, min(b, SLOTS - a), WindowState.RESIDENT)
            if not naive_overlapping(model, w.start, w.end):  # the engine never overlaps
                table.add(w)
                model.append(w)
        elif op == "remove" and model:
            w = model.pop(a % len(model))
            table.remove(w)
        elif op == "find":
            assert table.find(a) is naive_find(model, a)
        elif op == "overlapping":
            got = table.overlapping(a, a + b)
            assert [id(w) for w in got] == [id(w) for w in naive_overlapping(model, a, a + b)]
        assert len(table) == len(model)
        assert [w.start for w in table] == sorted(w.start for w in model)


def test_a_window_replaced_at_the_same_start_is_never_answered() -> None:
    table = WindowTable()
    old = Window(0, 4, WindowState.RESIDENT)
    table.add(old)
    assert table.find(1) is old  # now remembered
    new = Window(0, 2, WindowState.EVICTED)
    table.add(new)  # replaced without remove()
    assert table.find(1) is new
    assert table.find(3) is None


def test_a_removed_window_is_forgotten() -> None:
    table = WindowTable()
    w = Window(8, 4, WindowState.RESIDENT)
    table.add(w)
    assert table.find(9) is w
    table.remove(w)
    assert table.find(9) is None
    assert table.overlapping(0, 100) == []
