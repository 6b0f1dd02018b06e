"""The aperture map: folding windows into cells, the run-length codes, the checked reply, and
`query-map` on an instance whose windows move."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devmodel_wire.aperture_map import (
    CODES,
    MAX_CELLS,
    URGENCY,
    Cell,
    aggregate,
    cell_windows,
    decode_cells,
    encode_cells,
    parse_reply,
)
from devmodel_wire.control import ControlProtocolError
from tests.unit.control_support import MiB, call, make

STATES = URGENCY[1:]  # what a stored window can be (vacant ones are not stored)


@st.composite
def apertures(draw: st.DrawFn) -> tuple[int, list[str | None]]:
    """A granule count and, per granule, its window's state (None: vacant)."""
    n = draw(st.integers(1, 3000))
    states = draw(st.lists(st.one_of(st.none(), st.sampled_from(STATES)), min_size=n, max_size=n))
    return n, states


def runs_of(states: list[str | None], granule: int) -> list[tuple[int, int, str]]:
    return [(i * granule, (i + 1) * granule, s) for i, s in enumerate(states) if s is not None]


@settings(deadline=None)
@given(apertures(), st.integers(1, 2000))
def test_cells_fit_the_grid_and_show_the_most_urgent_state(
    aperture: tuple[int, list[str | None]], grid: int
) -> None:
    n, states = aperture
    granule = 4096
    per = cell_windows(n, grid)
    assert per & (per - 1) == 0 and -(-n // per) <= grid
    assert per == 1 or -(-n // (per // 2)) > grid  # the finest cells that fit
    cells = aggregate(runs_of(states, granule), n * granule, per * granule)
    assert len(cells) == -(-n // per) <= grid
    for i, cell in enumerate(cells):
        covered = [s or "vacant" for s in states[i * per : (i + 1) * per]]
        top = max(covered, key=URGENCY.index)
        assert cell.state == top
        assert cell.whole == all(s == top for s in covered)


@settings(deadline=None)
@given(apertures(), st.integers(1, 64))
def test_windows_of_several_granules_fold_like_their_granules(
    aperture: tuple[int, list[str | None]], per: int
) -> None:
    """A window spanning cells counts in each: the same cells as granule by granule."""
    n, states = aperture
    merged: list[tuple[int, int, str]] = []
    for start, end, state in runs_of(states, 1):
        if merged and merged[-1][1] == start and merged[-1][2] == state:
            merged[-1] = (merged[-1][0], end, state)
        else:
            merged.append((start, end, state))
    assert aggregate(merged, n, per) == aggregate(runs_of(states, 1), n, per)


cells_st = st.lists(
    st.builds(Cell, st.sampled_from(URGENCY), st.booleans()).map(
        lambda c: Cell("vacant") if c.state == "vacant" else c
    ),
    max_size=500,
)


@given(cells_st)
def test_run_length_codes_round_trip(cells: list[Cell]) -> None:
    text = encode_cells(cells)
    assert decode_cells(text) == cells
    assert len(text) <= 2 * len(cells) + 1 and text.isascii()


def test_the_codes_read_as_documented() -> None:
    assert decode_cells("12R3e.P") == [Cell("resident")] * 12 + [
        Cell("evicted", whole=False)
    ] * 3 + [Cell("vacant"), Cell("paging-in")]
    assert set(CODES) == set(URGENCY)
    assert encode_cells([Cell("lost", whole=False)] * 2 + [Cell("vacant")]) == "2l."


@given(st.text(alphabet="0123456789.RrEeVvPpLlXx é", max_size=40))
def test_any_text_decodes_or_raises_the_protocol_error(text: str) -> None:
    try:
        cells = decode_cells(text, limit=1000)
    except ControlProtocolError:
        return
    assert len(cells) <= 1000
    assert encode_cells(cells) == encode_cells(decode_cells(encode_cells(cells)))


@pytest.mark.parametrize("text", ["0R", "R0", "1234567R", "Q", "5", "99999R"])
def test_bad_run_lengths_are_refused(text: str) -> None:
    with pytest.raises(ControlProtocolError):
        decode_cells(text, limit=1000)


def good_reply() -> dict[str, Any]:
    return {
        "size": 64 * MiB,
        "granule": 2 * MiB,
        "cell_windows": 2,
        "map": "14R2e",
        "states": {"vacant": 0, "resident": 30, "evicted": 2},
        "page_ins": [{"request": 3, "offset": 0, "length": 2 * MiB, "waiters": 1}],
        "counters": {"faults": 1, "page_ins": 1, "revokes": 2, "grants": 33},
        "uptime": 1.5,
        "in_flight": 1,
    }


def test_a_reply_is_checked_whole() -> None:
    m = parse_reply(good_reply())
    assert m.windows == 32 and m.cell_bytes == 4 * MiB and len(m.cells) == 16
    assert m.page_ins[0].waiters == 1 and m.counters["revokes"] == 2
    for key, bad in [
        ("map", "15R"),
        ("cell_windows", 3),
        ("size", 0),
        ("granule", True),
        ("states", {"weird": 1}),
        ("page_ins", [{"request": 1}]),
        ("uptime", "soon"),
        ("counters", []),
    ]:
        with pytest.raises(ControlProtocolError):
            parse_reply({**good_reply(), key: bad})
    with pytest.raises(ControlProtocolError):
        parse_reply({**good_reply(), "granule": 1, "size": 1 << 40})  # too many cells


scalars = st.none() | st.booleans() | st.integers(-5, 1 << 40) | st.floats(0, 10)
json_values = (
    scalars
    | st.text("0123456789Rre.", max_size=8)
    | st.lists(scalars, max_size=3)
    | (
        st.dictionaries(
            st.sampled_from(["request", "offset", "length", "waiters", "resident"]), scalars
        )
    )
    | st.lists(st.dictionaries(st.sampled_from(["request", "offset", "waiters"]), scalars))
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(good_reply())), json_values))
def test_any_reply_parses_or_raises_the_protocol_error(changes: dict[str, object]) -> None:
    try:
        m = parse_reply({**good_reply(), **changes})
    except ControlProtocolError:
        return
    assert len(m.cells) == -(-m.windows // m.cell_windows) <= MAX_CELLS


async def test_query_map_follows_the_windows() -> None:
    engine, _lender, inst = make()  # 8 MiB of 2 MiB windows, all resident
    value = await call(inst, "query-map")
    m = parse_reply(json.loads(json.dumps(value)))
    assert [c.code for c in m.cells] == ["R"] * 4 and m.states["resident"] == 4
    await call(inst, "evict", offset=2 * MiB)
    m = parse_reply(await call(inst, "query-map", cells=2))
    assert m.cell_windows == 2 and [c.code for c in m.cells] == ["e", "R"]
    assert m.states == {
        "vacant": 0,
        "resident": 3,
        "revoking": 0,
        "evicted": 1,
        "paging-in": 0,
        "lost": 0,
    }
    assert m.counters["revokes"] == 1
    assert await engine.read(2 * MiB, 4)  # the fault pages it back in
    m = parse_reply(await call(inst, "query-map"))
    assert [c.code for c in m.cells] == ["R"] * 4 and m.counters["page_ins"] == 1


async def test_query_map_bounds_its_cells() -> None:
    _engine, _lender, inst = make()
    from devmodel_wire.control import CommandFailed  # noqa: PLC0415

    with pytest.raises(CommandFailed):
        await call(inst, "query-map", cells=MAX_CELLS + 1)
    with pytest.raises(CommandFailed):
        await call(inst, "query-map", cells=0)
