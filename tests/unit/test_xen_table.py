"""bench/xen_table.py turns bartest's xbench and xfault lines (as the Xen test bed's guests print
them on their consoles) into the table docs/xen.md shows; bench/run --xen-results prints it.

The lines here have the shape bartest.c gives them; the real ones come from
tests/xen_guest/dom0-bench, which only the xen_guest tests boot.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = str(Path(__file__).resolve().parents[2] / "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import bench_run  # noqa: E402
import xen_table  # noqa: E402


def stats(median: int, count: int = 640) -> dict[str, int]:
    return {"count": count, "median_ns": median, "p99_ns": 2 * median, "min_ns": median // 2,
            "max_ns": 3 * median, "mean_ns": median}


def line(fields: dict[str, Any]) -> str:
    return "noise before DEVMODEL-RESULT " + json.dumps(fields, separators=(",", ":")) + "\n"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    medians = {"devmodel_bar2": 3_000_000, "devmodel_bar0": 3_300_000, "peer_bar0": 500_000}
    out = [line({"test": "enumerate", "ok": True})]
    for vcpus in (1, 2):
        for target, median in medians.items():
            for size in (4, 8):
                out.append(line({"test": "xbench", "ok": True, "vcpus": vcpus,
                                 "target": target, "size": size, "mismatches": 0,
                                 "reads": stats(median * vcpus)}))
        out.append(line({"test": "xbench", "ok": True, "summary": True, "vcpus": vcpus,
                         "ratio": {}}))
    out.append(line({"test": "xfault", "ok": True, "fault": stats(200_000_000, 32),
                     "first_read_resident": stats(0, 0), "resident": stats(4_000_000),
                     "peer": stats(500_000)}))
    console = tmp_path / "log" / "console"
    console.mkdir(parents=True)
    (console / "guest-xenbench.log").write_text("".join(out))
    return tmp_path


def test_rows_give_devmodels_medians_over_the_peers(run_dir: Path) -> None:
    rows = {row.figure: row for row in xen_table.table_rows(run_dir)}
    bar2 = rows["4-byte read, devmodel BAR2 (registers), 1 vCPU"]
    assert (bar2.median, bar2.p99, bar2.count) == (3_000_000, 6_000_000, 640)
    assert bar2.ratio == pytest.approx(6.0)
    two = rows["8-byte read, devmodel BAR0 (lent memory, resident), 2 vCPUs at once"]
    assert two.ratio == pytest.approx(6.6)
    assert rows["4-byte read, C peer BAR0 (xen_ioreq_peer.c), 1 vCPU"].ratio is None
    fault = rows["first read of an evicted window (page-in), devmodel BAR0"]
    assert fault.count == 32 and fault.ratio == pytest.approx(50.0)
    assert fault.peer == "resident"
    assert rows["  the same, against the C peer"].ratio == pytest.approx(400.0)
    assert rows["resident read of those windows, devmodel BAR0"].ratio == pytest.approx(8.0)


def test_the_table_prints_times_and_ratios(run_dir: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    assert xen_table.main([str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "3.00 ms" in table and "6.00x C peer" in table and "50.00x resident" in table


def test_an_empty_directory_says_so(tmp_path: Path) -> None:
    assert "no xen-bench results" in xen_table.format_table(tmp_path)


def test_bench_run_prints_it_after_its_own_table(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"schema": bench_run.SCHEMA, "rows": []}))
    assert bench_run.main(["--results", str(saved), "--xen-results", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.index("figure") < out.index("Xen figure") and "6.00x C peer" in out
