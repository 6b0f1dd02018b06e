"""What the window-table and lease-engine tests share about fast entries (no tests here)."""

from __future__ import annotations

from devmodel.leases.states import WindowState
from devmodel.leases.table import FAST_FD_MASK, FAST_SHIFT, WindowTable, _Slots, fast_entry
from devmodel.leases.window import Window


def check_fast_entries(table: WindowTable) -> None:
    """The revoke guarantee as the fast entries carry it (devmodel/leases/table.py): each unit
    of a crowded block has the entry its slot's window calls for (0 unless that window is
    RESIDENT, memfd-backed and fits), and every other unit of the flat array has 0."""
    units = table._units  # the representation is what is under test here
    crowded: dict[int, _Slots] = {}
    for b, v in table._blocks.items():
        if type(v) is _Slots:
            want = [fast_entry(w) for w in v]
            assert list(v.fast) == want, b
            crowded[b] = v
    # `refresh` skips a table whose count says it has no crowded block: the count must be true.
    assert table._crowded == len(crowded)
    if not table._size:
        return
    entries = table._entries
    for b in range(len(entries) // units):
        got = entries[b * units : (b + 1) * units].tolist()
        slots = crowded.get(b)
        if slots is None:
            assert not any(got), f"a non-zero entry in block {b}, which has no slots"
        else:
            assert got == [fast_entry(w) for w in slots], b


def check_find_fast(table: WindowTable, offset: int, want: Window | None) -> None:
    """`find_fast` answers `want` (the window that holds `offset`) or, only for a RESIDENT
    memfd window, its fast entry: fd and fd_base as the window has them now."""
    got = table.find_fast(offset)
    if type(got) is not int:
        assert got is want, offset
        return
    assert want is not None and want.state is WindowState.RESIDENT and want.mem is None
    assert got != 0 and got == fast_entry(want)
    assert (got >> 1) & FAST_FD_MASK == want.fd and got >> FAST_SHIFT == want.fd_base
    assert bool(got & 1) == bool(want.prot & 2)
