"""devmodel's trapped reads through real Xen event channels, next to a C peer in the same run.

Runs on the real hypervisor: the step `xen-bench` of the shared boot (tests/xen_guest/
dom0-bench) serves a guest (PVH with pci=noacpi) at once by devmodel (borrowing from the
reference lender) and by bench/xen_ioreq_peer.c, a minimal C alternate ioreq server, and
bartest in the guest times reads of both. Not a timed test: under TCG the absolute numbers are
TCG's and the host is shared, so no latency is asserted; these check that every figure was
measured, is sane (ordered, counted, every value read back right) and came from the server it
names, and print the table (bench/xen_table.py).

Part of the full profile (DEVMODEL_XEN=full). With DEVMODEL_XEN_BENCH_DIR=DIR they check an
earlier run's directory instead of booting
(`qemu-configs/xen/run --workdir DIR -- tests/xen_guest/dom0-bench`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from .bed import Dom0Run

BENCH = str(Path(__file__).resolve().parents[2] / "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import xen_table  # noqa: E402

pytestmark = [pytest.mark.xen_guest, pytest.mark.xen_full]

STEP = "xen-bench"
GUEST = "xenbench"
PEER = "1234:10f0"
TARGETS = ("devmodel_bar2", "devmodel_bar0", "peer_bar0")


@pytest.fixture(scope="module")
def bench_run(request: pytest.FixtureRequest) -> Dom0Run:
    """The boot that ran dom0-bench: a saved one, or the shared boot of dom0-suite."""
    saved = os.environ.get("DEVMODEL_XEN_BENCH_DIR")
    if saved:
        return Dom0Run(workdir=Path(saved), returncode=None, console="", seconds=0.0,
                       ready_seconds=None)
    run: Dom0Run = request.getfixturevalue("dom0_suite")
    return run


def guest_record(run: Dom0Run, name: str) -> dict[str, Any]:
    """What dom0/guest recorded for dom0-bench's guest (it reported, or the step's output says
    why not)."""
    path = run.workdir / f"{name}.json"
    assert path.exists(), f"guest {name} did not report:\n{run.step(STEP)[1]}"
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def check_stats(stats: dict[str, Any], what: str) -> None:
    """Counted and ordered. The fastest read may time 0 ns: on the test bed the guest's clock
    did not always move across one trapped read (seen on a PVH guest under a loaded host)."""
    assert stats["count"] > 0 and stats["median_ns"] > 0, (what, stats)
    assert 0 <= stats["min_ns"] <= stats["median_ns"] <= stats["p99_ns"] <= stats["max_ns"], (
        what, stats)


def check_peer_log(run: Dom0Run, name: str, reads: int) -> None:
    """The peer served the guest (its function claimed, its BAR claimed as the guest's firmware
    placed it) and, stopped with SIGTERM, says it served at least the reads bartest timed."""
    log = (run.workdir / f"{name}.peer.log").read_text(errors="replace")
    assert re.search(r"ioreq server \d+ for domain \d+: 2 vCPU\(s\), PCI 0000:00:1d\.0 "
                     rf"{PEER}, serving", log), log
    assert re.search(r"BAR0 at 0x[0-9a-f]+", log), log
    served = re.search(r"stopped; served mmio_reads=(\d+) .* unhandled=(\d+)", log)
    assert served is not None, log
    assert int(served.group(1)) >= reads, (reads, log)


def test_trapped_reads_next_to_the_c_peer(bench_run: Dom0Run) -> None:
    """Runs on the real hypervisor: in one guest served at once by devmodel (00:1e.0) and
    the C peer (00:1d.0), bartest's xbench timed 4- and 8-byte reads of devmodel's BAR2, its
    BAR0 (a resident window lent by the reference lender) and the peer's BAR0 in interleaved
    rounds, on one vCPU and then on two at once; every read returned what its target holds,
    and devmodel's medians have a ratio to the peer's."""
    record = guest_record(bench_run, GUEST)
    assert f"1d.0 {PEER}" in " ".join(record["report"]["pci"]), record
    lines = bench_run.results(GUEST)
    enumerate_ = next(r for r in lines if r.get("test") == "enumerate")
    assert enumerate_["ok"], enumerate_
    peer_reads = 0
    for vcpus in (1, 2):
        series = {(r["target"], r["size"]): r for r in lines
                  if r.get("test") == "xbench" and r.get("vcpus") == vcpus and "target" in r}
        assert set(series) == {(t, s) for t in TARGETS for s in (4, 8)}, (vcpus, lines)
        for key, r in series.items():
            assert r["ok"] and r["mismatches"] == 0, r
            check_stats(r["reads"], f"{key} on {vcpus} vCPU(s)")
        peer_reads += sum(series[("peer_bar0", s)]["reads"]["count"] for s in (4, 8))
        summary = next(r for r in lines if r.get("test") == "xbench" and r.get("summary")
                       and r["vcpus"] == vcpus)
        assert summary["ok"] and summary["peer"].endswith("1d.0"), summary
        assert len(summary["cpus"]) == vcpus, summary
        assert set(summary["ratio"]) == {f"{t}_read{s}" for t in TARGETS[:2] for s in (4, 8)}, (
            summary)
        assert all(v > 0 for v in summary["ratio"].values()), summary
    check_peer_log(bench_run, GUEST, peer_reads)
    print()
    print(xen_table.format_table(bench_run.workdir))


def test_fault_next_to_resident_reads(bench_run: Dom0Run) -> None:
    """Runs on the real hypervisor: devmodel borrows from the reference lender in dom0 with
    room for two of eight windows; bartest's xfault reads each window in turn, so the first read
    of each waits for a page-in (BAR2's FAULTS counter says which did), timed next to resident
    reads of the same windows and the C peer's reads, with no access failed."""
    guest_record(bench_run, GUEST)
    lines = bench_run.results(GUEST)
    xfault = next((r for r in lines if r.get("test") == "xfault"), None)
    assert xfault is not None, lines
    assert xfault["ok"], xfault
    for key in ("fault", "resident", "peer"):
        check_stats(xfault[key], key)
    counters = xfault["counters"]
    assert counters["faults"] >= xfault["fault"]["count"], xfault
    assert counters["page_ins"] > 0 and counters["revokes"] > 0, xfault
    assert counters["failed_accesses"] == 0, xfault
    check_peer_log(bench_run, GUEST, xfault["peer"]["count"])
    print()
    print(xen_table.format_table(bench_run.workdir))


def test_the_bench_step_passed(bench_run: Dom0Run) -> None:
    """Runs on the real hypervisor: dom0-bench's guest reported, and both servers stopped."""
    rc, output = bench_run.step(STEP)
    if rc is None and (bench_run.workdir / "status").exists():
        # A saved run of dom0-bench alone (`run --workdir DIR -- tests/xen_guest/dom0-bench`):
        # its exit status is the run's.
        rc = int((bench_run.workdir / "status").read_text())
    assert rc == 0, output
