"""Smoke test of bench/run: a --quick run ends, prints one table, and writes JSON with every
row, each either measured or saying why not, and PNG plots next to it; a later run compares
itself with it.

No timing is asserted (the machines are noisy). --no-build keeps a fresh machine from building
libvfio-user here (a cached build is used when there is one; otherwise its row says so).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "bench" / "run"

ROWS = [
    "trapped_floor",
    "trapped_lvu",
    "trapped_dm_off_vs_lvu",
    "trapped_dm_off_vs_floor",
    "trapped_dm_on_vs_lvu",
    "trapped_dm_on_vs_floor",
    "trapped_dm_lvu",
    "posted_dm",
    "posted_dm_lvu",
    "own_time",
    "resident",
    "resident_idle",
    "resident_warm",
    "ping",
    "fault",
    "fault_idle",
    "fault_warm",
    "lender_own",
    "lvu_resident",
    "lvu_fault",
    "revoke_idle",
    "revoke_reads",
    "ping_reads",
    "revoke_posted",
    "ping_posted",
    "coalesce",
    "fault_alone",
    "fault_64",
    "ready",
    "idle_rss",
    "idle_cpu_off",
    "idle_cpu_on",
]

# Measured on every machine (the others depend on the build: libvfio-user, polling).
ALWAYS = [
    r
    for r in ROWS
    if r not in ("trapped_lvu", "idle_cpu_on") and "_on_" not in r and "lvu" not in r
]


@pytest.mark.slow
def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    done = subprocess.run(
        [str(RUN), "--quick", "--no-build", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ROWS
    for key in ALWAYS:
        assert rows[key]["median"] is not None, rows[key]
    for key, row in rows.items():
        # Measured, or a reason: "not built: ...", "not available in this build ...".
        assert row["median"] is not None or row["note"], key
        assert row["figure"] in done.stdout
    assert rows["trapped_lvu"]["median"] is not None or rows["trapped_lvu"]["note"].startswith(
        "not built: "
    )
    if rows["trapped_dm_on_vs_lvu"]["median"] is None:
        assert rows["trapped_dm_on_vs_lvu"]["note"].startswith("not available in this build")
    assert rows["coalesce"]["passed"] is True
    targeted = (
        "own_time",
        "fault_idle",
        "revoke_idle",
        "revoke_reads",
        "fault_64",
        "ready",
        "idle_rss",
    )
    for key in targeted:
        assert rows[key]["target"] and rows[key]["passed"] in (True, False), key
    assert f"results: {out}" in done.stdout
    # Latency rows keep their distribution, drawn as PNG plots next to the JSON.
    assert rows["fault"]["cdf"] and rows["trapped_floor"]["cdf"]
    for name in ("trapped-read", "fault", "revoke"):
        plot = tmp_path / f"run-{name}.png"
        assert f"plot: {plot}" in done.stdout
        assert plot.read_bytes()[:4] == b"\x89PNG"
    text = tmp_path / "run-plots.txt"
    assert f"text plots: {text}" in done.stdout
    assert text.read_text().startswith("  ") and "trapped-read:" in text.read_text()

    # The JSON shown again against itself: every ratio new/old is 1.
    shown = subprocess.run(
        [str(RUN), "--results", str(out), "--compare", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "new/old" in shown.stdout
    assert shown.stdout.count("1.00x") >= len(ALWAYS)
