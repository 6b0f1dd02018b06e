"""The aperture map's screen: whatever the aperture and the terminal, it fits, says what one cell
covers, and names every state in its legend."""

from __future__ import annotations

import dataclasses
import datetime
import io

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from devmodel.mapview import GLYPHS, RESERVED_LINES, grid_shape, render
from devmodel_wire.aperture_map import (
    URGENCY,
    ApertureMap,
    Cell,
    PageIn,
    cell_windows,
)

MiB = 1 << 20


def a_map(windows: int, cells: int, page_ins: int = 0) -> ApertureMap:
    per = cell_windows(windows, cells)
    n = -(-windows // per)
    states = [Cell(URGENCY[i % len(URGENCY)], whole=i % 3 > 0) for i in range(n)]
    return ApertureMap(
        size=windows * 2 * MiB,
        granule=2 * MiB,
        cell_windows=per,
        cells=tuple(Cell("vacant") if c.state == "vacant" else c for c in states),
        states={s: windows // len(URGENCY) for s in URGENCY},
        page_ins=tuple(PageIn(i, i * 2 * MiB, 2 * MiB, 1) for i in range(page_ins)),
        counters={"faults": 10, "page_ins": 9, "revokes": 8, "grants": 7},
        uptime=10.0,
        in_flight=0,
    )


def plain(text: object, width: int) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(text)
    return out.getvalue().rstrip("\n").split("\n")


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 1 << 17), st.integers(20, 240), st.integers(RESERVED_LINES + 1, 80))
def test_the_screen_fits_the_terminal(windows: int, width: int, height: int) -> None:
    per_row, rows = grid_shape(width, height)
    m = a_map(windows, per_row * rows, page_ins=8)
    lines = plain(render(m, width, height, events=["e1", "e2", "e3"]), width)
    assert len(lines) <= height
    assert all(len(line) < width for line in lines)
    if width >= 80:
        assert f"one cell = {m.cell_windows} window" in lines[0]


def test_80x24_with_32768_windows_is_16_rows_of_64_cells_of_32_windows() -> None:
    per_row, rows = grid_shape(80, 24)
    m = a_map(32768, per_row * rows)
    earlier = dataclasses.replace(
        m, uptime=8.0, counters={"faults": 0, "page_ins": 1, "revokes": 0}
    )
    when = datetime.datetime(2026, 1, 1, 12, 0, 0)
    lines = plain(render(m, 80, 24, previous=earlier, now=when), 80)
    assert lines[0].startswith("BAR0 64G: 32768 windows of 2M; one cell = 32 windows (64M)")
    assert lines[0].endswith("12:00:00")
    assert [line[:6] for line in lines[1:17]] == [
        f"{f'{4 * i}G' if i else '0':>5} " for i in range(16)
    ]
    assert all(len(line) == 70 for line in lines[1:17])
    legend = lines[17]
    for state in URGENCY:
        assert f"{GLYPHS[state][0]} {state}" in legend
    assert "faults 5.0/s  page-ins 4.0/s  revokes 4.0/s" in "\n".join(lines)
