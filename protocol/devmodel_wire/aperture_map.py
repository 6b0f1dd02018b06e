"""The aperture map (`query-map`): BAR0 as a short row of cells, each one state, sans-IO.

A person watching the aperture wants one screen, a few times a second, however many windows
there are: a 64 GiB aperture of 2 MiB granules is 32768 windows, and a page of
`query-windows` per window would be megabytes of JSON per frame. So the instance folds the
windows into at most `cells` cells itself and sends one code per cell, run-length encoded:
a steady aperture costs a few bytes, a busy one a few hundred.

A cell covers a power-of-two number of granules (so that every row of the grid starts at a
round offset and a person can say "one cell is 64 MiB"); its state is the most urgent one of
any byte it covers, in the order of `URGENCY`, and it says whether that state covers the whole
cell or only part of it (the rest being calmer states). Vacant, the calmest, is always whole.

The code of one cell, per state (upper case: the whole cell; lower case: part of it):

    .  vacant          R r  resident        E e  evicted
    V v  revoking      P p  paging-in       L l  lost

The `map` string is a sequence of runs, each an optional decimal count (default 1, never 0)
followed by one code: `"12R3e.P"` is twelve resident cells, three partly evicted ones, one
vacant, one paging-in. `parse_reply` checks a whole `query-map` answer into an `ApertureMap`
and raises `ControlProtocolError` for anything else, so a client never draws a half-read map.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from devmodel_wire.control import ControlProtocolError
from pyvfio_user.frozen import frozen

__all__ = [
    "CODES",
    "MAX_CELLS",
    "URGENCY",
    "ApertureMap",
    "Cell",
    "PageIn",
    "aggregate",
    "cell_windows",
    "decode_cells",
    "encode_cells",
    "parse_reply",
]

# Calmest first. Revoking and paging-in are moments (an access waits on them); lost is an
# error the failure policy answers, so it outranks everything: one lost window in a cell of
# thousands must still show.
URGENCY: Final = ("vacant", "resident", "evicted", "revoking", "paging-in", "lost")
_RANK: Final = {state: rank for rank, state in enumerate(URGENCY)}

# state -> the upper-case code (whole cell); lower case is the partial cell.
CODES: Final = {
    "vacant": ".",
    "resident": "R",
    "evicted": "E",
    "revoking": "V",
    "paging-in": "P",
    "lost": "L",
}
_STATE_OF: Final = {code: state for state, code in CODES.items()}

# A terminal is at most a few hundred cells wide and tall; a bound keeps replies small.
MAX_CELLS: Final = 1 << 16
# Digits in one run's count: enough for MAX_CELLS, and a bound on what a parser accepts.
_MAX_COUNT_DIGITS: Final = 6


@frozen
class Cell:
    """One cell: its most urgent state, and whether that state covers all of it."""

    state: str
    whole: bool = True

    @property
    def code(self) -> str:
        code = CODES[self.state]
        return code if self.whole or code == "." else code.lower()


@frozen
class PageIn:
    """One page-in in flight: the PAGE_IN request, the window it fills, accesses waiting."""

    request: int
    offset: int
    length: int
    waiters: int


@frozen
class ApertureMap:
    """A checked `query-map` answer."""

    size: int
    granule: int
    cell_windows: int  # granules per cell (a power of two)
    cells: tuple[Cell, ...]
    states: dict[str, int]  # granules per state, vacant included
    page_ins: tuple[PageIn, ...]
    counters: dict[str, int]  # faults, page_ins, revokes, grants: totals so far
    uptime: float  # the instance's clock, for rates between two maps
    in_flight: int  # accesses waiting inside the engine

    @property
    def windows(self) -> int:
        return -(-self.size // self.granule)

    @property
    def cell_bytes(self) -> int:
        return self.cell_windows * self.granule


def cell_windows(windows: int, cells: int) -> int:
    """Granules per cell: the smallest power of two that fits `windows` into `cells` cells."""
    if windows < 1 or cells < 1:
        raise ValueError("windows and cells must be positive")
    per = 1
    while -(-windows // per) > cells:
        per *= 2
    return per


def aggregate(runs: Iterable[tuple[int, int, str]], size: int, cell_bytes: int) -> list[Cell]:
    """Fold `runs` (start, end, state; sorted, not overlapping, inside [0, size)) into cells
    of `cell_bytes`: each cell takes the most urgent state of any byte it covers (bytes no run
    covers are vacant), whole if that state covers every byte of the cell.

    One pass over the runs and one over the cells, with plain lists: this runs on the device
    model's event loop, between guest accesses, for every frame of a live map.
    """
    if size < 1 or cell_bytes < 1:
        raise ValueError("size and cell_bytes must be positive")
    n = -(-size // cell_bytes)
    top = [0] * n  # rank of the most urgent state seen (0: none but vacant)
    top_bytes = [0] * n  # bytes in that state
    covered = [0] * n  # bytes covered by any run
    rank_of = _RANK
    for start, end, state in runs:
        rank = rank_of[state]
        first = start // cell_bytes
        if end <= (first + 1) * cell_bytes:  # the common case: a run inside one cell
            length = end - start
            covered[first] += length
            if rank > top[first]:
                top[first] = rank
                top_bytes[first] = length
            elif rank == top[first]:
                top_bytes[first] += length
            continue
        last = (end - 1) // cell_bytes
        for i in range(first, last + 1):
            lo = max(start, i * cell_bytes)
            hi = min(end, (i + 1) * cell_bytes)
            length = hi - lo
            covered[i] += length
            if rank > top[i]:
                top[i] = rank
                top_bytes[i] = length
            elif rank == top[i]:
                top_bytes[i] += length
    cells = []
    for i in range(n):
        cell_len = min(cell_bytes, size - i * cell_bytes)
        rank = top[i]
        if rank == 0:
            cells.append(Cell("vacant"))
        else:
            cells.append(Cell(URGENCY[rank], top_bytes[i] == cell_len))
    return cells


def encode_cells(cells: Sequence[Cell]) -> str:
    """The run-length string of `cells` (module docstring)."""
    out: list[str] = []
    i = 0
    while i < len(cells):
        code = cells[i].code
        j = i + 1
        while j < len(cells) and cells[j].code == code:
            j += 1
        count = j - i
        out.append(code if count == 1 else f"{count}{code}")
        i = j
    return "".join(out)


def decode_cells(text: str, limit: int = MAX_CELLS) -> list[Cell]:
    """The cells of a run-length string; ControlProtocolError if it is not one, or if it
    holds more than `limit` cells (a bound on what a confused peer can make us allocate)."""
    cells: list[Cell] = []
    count = ""
    for ch in text:
        if ch.isascii() and ch.isdigit():
            if not count and ch == "0":
                raise ControlProtocolError("aperture map: a run count starts with 0")
            count += ch
            if len(count) > _MAX_COUNT_DIGITS:
                raise ControlProtocolError("aperture map: a run count is too long")
            continue
        state = _STATE_OF.get(ch.upper()) if ch.isascii() else None
        if state is None:
            raise ControlProtocolError(f"aperture map: unknown cell code {ch!r}")
        cell = Cell(state, whole=ch == "." or ch.isupper())
        times = int(count) if count else 1
        count = ""
        if len(cells) + times > limit:
            raise ControlProtocolError(f"aperture map: more than {limit} cells")
        cells.extend([cell] * times)
    if count:
        raise ControlProtocolError("aperture map: a run count without a code")
    return cells


# ---------------------------------------------------------------------------- the reply


def _int(obj: Mapping[str, object], key: str, minimum: int = 0) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ControlProtocolError(f"aperture map: '{key}' must be an integer >= {minimum}")
    return value


def _counts(obj: Mapping[str, object], key: str) -> dict[str, int]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise ControlProtocolError(f"aperture map: '{key}' must be an object")
    return {str(k): _int(value, k) for k in value}


def parse_reply(value: object) -> ApertureMap:
    """A `query-map` answer, checked: every field present and typed, the cells as many as the
    size and cell say. ControlProtocolError otherwise."""
    if not isinstance(value, dict):
        raise ControlProtocolError("aperture map: the answer is not an object")
    size = _int(value, "size", 1)
    granule = _int(value, "granule", 1)
    per = _int(value, "cell_windows", 1)
    if per & (per - 1):
        raise ControlProtocolError("aperture map: 'cell_windows' is not a power of two")
    text = value.get("map")
    if not isinstance(text, str):
        raise ControlProtocolError("aperture map: 'map' must be a string")
    expected = -(-size // (granule * per))
    if expected > MAX_CELLS:
        raise ControlProtocolError(f"aperture map: more than {MAX_CELLS} cells")
    cells = decode_cells(text, expected)
    if len(cells) != expected:
        raise ControlProtocolError(
            f"aperture map: {len(cells)} cells where the size says {expected}"
        )
    states = _counts(value, "states")
    unknown = set(states) - set(URGENCY)
    if unknown:
        raise ControlProtocolError(f"aperture map: unknown state {sorted(unknown)[0][:32]!r}")
    raw_page_ins = value.get("page_ins")
    if not isinstance(raw_page_ins, list):
        raise ControlProtocolError("aperture map: 'page_ins' must be a list")
    page_ins = []
    for p in raw_page_ins:
        if not isinstance(p, dict):
            raise ControlProtocolError("aperture map: a page-in must be an object")
        page_ins.append(
            PageIn(_int(p, "request"), _int(p, "offset"), _int(p, "length"), _int(p, "waiters"))
        )
    uptime = value.get("uptime")
    if isinstance(uptime, bool) or not isinstance(uptime, int | float) or uptime < 0:
        raise ControlProtocolError("aperture map: 'uptime' must be a number >= 0")
    return ApertureMap(
        size=size,
        granule=granule,
        cell_windows=per,
        cells=tuple(cells),
        states=states,
        page_ins=tuple(page_ins),
        counters=_counts(value, "counters"),
        uptime=float(uptime),
        in_flight=_int(value, "in_flight"),
    )
