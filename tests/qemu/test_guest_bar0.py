"""Guest loads and stores of every size reach the aperture and come back intact."""

from __future__ import annotations

import pytest

from .testbed import (
    ACCESS_SIZES,
    APERTURE,
    PATTERN_BYTES,
    TAIL_BYTES,
    TIMING_ITERS,
    GuestRun,
    fill_verify_accesses,
)

pytestmark = pytest.mark.qemu


def test_guest_pattern_at_start_and_end_of_bar0(guest: GuestRun) -> None:
    lines = {line["range"]: line for line in guest.lines("pattern")}
    assert set(lines) == {"start", "tail"}
    assert (int(lines["start"]["offset"], 16), lines["start"]["bytes"]) == (0, PATTERN_BYTES)
    assert (int(lines["tail"]["offset"], 16), lines["tail"]["bytes"]) == (
        APERTURE - TAIL_BYTES, TAIL_BYTES)
    for line in lines.values():
        assert line["mismatches"] == 0, line.get("first_mismatch")
        assert line["by_size"] == {f"w{w}r{r}": 0 for w in ACCESS_SIZES for r in ACCESS_SIZES}
        assert line["accesses"] == sum(fill_verify_accesses(line["bytes"]))
        assert line["ok"] is True


def test_guest_boundary_accesses_of_every_size(guest: GuestRun) -> None:
    line = guest.line("boundary")
    assert line["bar_size"] == APERTURE
    assert line["failed"] == []
    assert line["failures"] == 0 and line["checks"] == 16


def test_guest_timing_loops_complete(guest: GuestRun) -> None:
    line = guest.line("timing")
    assert line["iters"] == TIMING_ITERS
    for key in ("read4_ns", "read8_ns", "write4_ns", "reg_read4_ns"):
        # A trapped access is tens of microseconds under TCG; 10 ms would mean something stalls.
        assert 0 < line[key] < 10_000_000, key
