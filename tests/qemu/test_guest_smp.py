"""Two vCPUs hit BAR0 at once: concurrent trapped accesses stay correct."""

from __future__ import annotations

import pytest

from .testbed import PATTERN_BYTES, GuestRun

pytestmark = pytest.mark.qemu


def test_guest_two_vcpus_fill_and_verify_concurrently(smp_guest: GuestRun) -> None:
    lines = smp_guest.lines("smp")
    threads = sorted((r for r in lines if "thread" in r), key=lambda r: r["thread"])
    summary = [r for r in lines if r.get("summary")]
    assert [t["thread"] for t in threads] == [0, 1]
    assert sorted(t["cpu"] for t in threads) == [0, 1], "each thread pinned to its own vCPU"
    half = PATTERN_BYTES // 2
    assert [(int(t["offset"], 16), t["bytes"]) for t in threads] == [(0, half), (half, half)]
    for t in threads:
        assert t["mismatches"] == 0, t.get("first_mismatch")
        assert t["read4_ns"] > 0 and t["write4_ns"] > 0
    assert summary and summary[0]["ok"] is True and summary[0]["cpus"] == 2
    end = smp_guest.event("end")
    assert end is not None and end["status"] == 0
    assert smp_guest.server_returncode == 0
