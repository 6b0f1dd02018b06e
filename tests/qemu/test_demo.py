"""The demo (examples/demo.py, behind ./scripts/demo) runs end to end and its numbers hold up.

Small rounds (256 KiB in 16 pieces, each in its own lease window of a 64 MiB aperture, with
8 MiB of VRAM at the lender) keep it to about 20 s, yet every round must page windows back in:
16 windows touched, 4 fit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .testbed import REPO, tail

pytestmark = pytest.mark.qemu

DEMO = REPO / "examples" / "demo.py"
ROUNDS = 2
TIMEOUT = 150.0


def run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--rounds", str(ROUNDS), "--bytes", "256K", "--piece",
         "16K", "--seed", "7", "--summary-json", str(summary), *args],
        capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd=REPO)
    assert summary.exists(), f"no summary (exit {proc.returncode}):\n{tail(proc.stdout)}\n" \
                             f"{tail(proc.stderr)}"
    return proc, json.loads(summary.read_text())


def test_demo_with_the_reference_lender_pages_in_and_loses_nothing(
    testbed: Path, tmp_path: Path
) -> None:
    proc, summary = run_demo(tmp_path)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        assert r["mismatches"] == 0, r.get("first_mismatch")
        assert r["bytes"] == 256 << 10 and r["pieces"] == 16
        assert r["counters"]["failed_accesses"] == 0
    # Every round touches 16 windows with room for 4: it must page in, every round.
    page_ins = [r["counters"]["page_ins"] for r in rounds]
    assert page_ins[0] >= 12 and page_ins[1] - page_ins[0] >= 12, page_ins
    assert summary["end"]["status"] == 0 and not summary["interrupted"]
    counters = summary["devmodel_counters"]
    assert counters is not None, summary["devmodel_last_line"]
    assert counters["page_ins"] >= page_ins[-1] and counters["failed_accesses"] == 0
    assert counters["protocol_errors"] == counters["bad_accesses"] == 0
    lender = summary["lender_summary"]
    assert int(lender["page_ins"]) == counters["page_ins"]
    assert int(lender["page_in_failures"]) == 0 and int(lender["protocol_errors"]) == 0
    # The table and both summaries reach the user.
    assert "mismatches" in proc.stdout and "0 mismatching byte(s)" in proc.stdout
    assert "device model, final counters:" in proc.stdout and "lender summary:" in proc.stdout
    # Without a terminal the aperture map follows each round, in glyphs: 32 windows of 2 MiB,
    # most of them evicted by the lender (8 MiB of VRAM), with its legend.
    maps = re.findall(r"^ +0 ([#+.EeRrPpXx]{32})$", proc.stdout, re.MULTILINE)
    assert len(maps) == ROUNDS, proc.stdout
    assert all(m.count("E") + m.count("P") >= 20 for m in maps), maps
    assert "one cell = 1 window (2M)" in proc.stdout
    assert "legend: # resident  E evicted  R revoking  P paging-in  X lost  . vacant" in proc.stdout
    assert "watch map" in proc.stdout  # how to watch it from a second terminal
