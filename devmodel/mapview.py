"""The aperture map as a person sees it: `map` and `watch map` in `devmodel attach`, and the
demo's live panel.

It draws one `query-map` answer (devmodel_wire.aperture_map) as a screen that fits the
terminal: a header that says what one cell covers, a grid whose rows start at round offsets,
a legend, the windows per state, the counters that move (as rates per second between two
answers), the page-ins in flight and the last events. Each state has a glyph as well as a
colour, so the map reads the same without colour (NO_COLOR, TERM=dumb, a pipe): rich decides
whether styles reach the output, this module never writes an escape sequence itself.

The grid's shape is decided here, before asking: `grid_shape` says how many cells fit the
terminal, the instance picks the finest power-of-two cell that fits them, and `render` lays
out whatever came back, a row being a power of two of cells so that every row begins at a
round offset (0, 4G, 8G, ...).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Final

from rich.text import Text

from devmodel.sizes import format_size
from devmodel_wire.aperture_map import URGENCY, ApertureMap

__all__ = [
    "GLYPHS",
    "RESERVED_LINES",
    "grid_shape",
    "legend",
    "render",
]

# state -> (glyph of a whole cell, glyph of a cell only partly so, style). Letters for the
# states a person looks for, so that a map without colour still says everything.
GLYPHS: Final[dict[str, tuple[str, str, str]]] = {
    "vacant": (".", ".", "bright_black"),
    "resident": ("#", "+", "green"),
    "evicted": ("E", "e", "blue"),
    "revoking": ("R", "r", "yellow"),
    "paging-in": ("P", "p", "bold magenta"),
    "lost": ("X", "x", "bold red"),
}
# Legend order: what a person watches for first.
_LEGEND_ORDER: Final = ("resident", "evicted", "revoking", "paging-in", "lost", "vacant")
# Lines around the grid: header, two of legend, windows, counters, page-ins, two events.
RESERVED_LINES: Final = 8
EVENT_LINES: Final = 2
# "1023G " before each row: the offset it starts at.
_LABEL: Final = 6
# Counters shown as rates (and as totals when there is no earlier answer to compare with).
_MOVING: Final = (("faults", "faults"), ("page_ins", "page-ins"), ("revokes", "revokes"))


def grid_shape(width: int, height: int) -> tuple[int, int]:
    """Cells per row (a power of two) and rows that fit a `width` x `height` screen, leaving
    the last column free (a character there makes some terminals wrap)."""
    cols = max(1, width - _LABEL - 1)
    per_row = 1 << (cols.bit_length() - 1)
    return per_row, max(1, height - RESERVED_LINES)


def legend() -> Text:
    text = Text("legend: ")
    for state in _LEGEND_ORDER:
        glyph, _, style = GLYPHS[state]
        text.append(glyph, style=style)
        text.append(f" {state}  ")
    text.rstrip()
    return text


def _glyph(state: str, whole: bool) -> tuple[str, str]:
    full, part, style = GLYPHS[state]
    return (full, style) if whole else (part, style + " dim")


def render(
    m: ApertureMap,
    width: int,
    height: int,
    *,
    previous: ApertureMap | None = None,
    events: Sequence[str] | None = (),
    title: str = "BAR0",
    now: datetime.datetime | None = None,
) -> Text:
    """The screen for `m`, at most `width` columns and `height` lines. `events=None` leaves
    the events out (a one-shot map above a prompt: the REPL prints events as they come, and
    the line saved keeps the map's first line on a screen of `height` with the prompt)."""
    per_row, _ = grid_shape(width, height)
    per_row = min(per_row, len(m.cells))
    cover = f"{m.cell_windows} windows ({format_size(m.cell_bytes)})"
    if m.cell_windows == 1:
        cover = f"1 window ({format_size(m.cell_bytes)})"
    lines: list[Text] = []
    header = (
        f"{title} {format_size(m.size)}: {m.windows} windows of {format_size(m.granule)}; "
        f"one cell = {cover}"
    )
    clock = f"{(now or datetime.datetime.now()):%H:%M:%S}"
    if len(header) + 2 + len(clock) < width:
        header = header.ljust(width - 1 - len(clock)) + clock
    lines.append(Text(header, style="bold"))
    row_bytes = per_row * m.cell_bytes
    for first in range(0, len(m.cells), per_row):
        row = Text(f"{format_size(first // per_row * row_bytes):>{_LABEL - 1}} ")
        for cell in m.cells[first : first + per_row]:
            glyph, style = _glyph(cell.state, cell.whole)
            row.append(glyph, style=style)
        lines.append(row)
    lines.append(legend())
    lines.append(Text("        + e r p x: only part of the cell is so (the rest is calmer)"))
    counts = ", ".join(
        f"{m.states[s]} {s}" for s in reversed(URGENCY) if m.states.get(s, 0) or s == "resident"
    )
    lines.append(Text(f"windows: {counts}; accesses waiting {m.in_flight}"))
    lines.append(_counters(m, previous))
    lines.append(_page_ins(m))
    if events is not None:
        shown = list(events)[-EVENT_LINES:]
        lines += [Text(e) for e in shown] or [Text("events: (none yet)")]
    out = Text("\n").join(line[: width - 1] if len(line) >= width else line for line in lines)
    out.no_wrap = True
    out.overflow = "crop"
    return out


def _counters(m: ApertureMap, previous: ApertureMap | None) -> Text:
    dt = m.uptime - previous.uptime if previous is not None else 0.0
    if previous is None or dt <= 0:
        totals = "  ".join(f"{label} {m.counters.get(k, 0)}" for k, label in _MOVING)
        return Text(f"{totals} (totals; `watch map` shows rates)")
    parts = []
    for key, label in _MOVING:
        rate = (m.counters.get(key, 0) - previous.counters.get(key, 0)) / dt
        parts.append(f"{label} {rate:,.1f}/s")
    return Text(
        "  ".join(parts) + f"  (totals {', '.join(str(m.counters.get(k, 0)) for k, _ in _MOVING)})"
    )


def _page_ins(m: ApertureMap) -> Text:
    if not m.page_ins:
        return Text("paging in: none")
    text = Text("paging in: ")
    for i, p in enumerate(m.page_ins):
        if i:
            text.append(", ")
        text.append(f"#{p.request} at {p.offset:#x}", style=GLYPHS["paging-in"][2])
        if p.waiters:
            text.append(f" ({p.waiters} waiting)")
    return text
