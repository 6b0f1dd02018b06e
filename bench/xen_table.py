"""devmodel's figures through real Xen event channels, from a saved run of xen-bench.

tests/xen_guest/dom0-bench (one boot of the Xen test bed) leaves in its run's directory the
console of the guest bartest ran in (`log/console/guest-xenbench.log`; an HVM guest's is
`xenbench.serial`): xbench (devmodel's BAR2 and BAR0 and
the C peer's BAR0, 4- and 8-byte reads timed one by one in interleaved rounds, on one vCPU and
on two) and xfault (the first read of an evicted window next to resident reads and the
peer's). This prints them as one table: median, p99, count and
the ratio to the peer measured in the same guest at the same time. Under TCG the absolute
numbers are TCG's; the ratio is the figure (docs/xen.md, "Figures through real event
channels").

    bench/xen_table.py DIR                 # DIR: the run's directory (run --workdir)
    bench/run --results OLD.json --xen-results DIR   # after bench/run's own table
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_LINE = re.compile(r"DEVMODEL-RESULT (\{.*\})")
BENCH_GUEST = "xenbench"
TARGETS = {
    "devmodel_bar2": "devmodel BAR2 (registers)",
    "devmodel_bar0": "devmodel BAR0 (lent memory, resident)",
    "peer_bar0": "C peer BAR0 (xen_ioreq_peer.c)",
}


@dataclass
class XenRow:
    """One line of the table; times in ns, `ratio` to the peer's median (None: it is the
    peer, or there was none)."""

    figure: str
    median: float | None
    p99: float | None
    count: int
    ratio: float | None = None
    peer: str = "C peer"


def results(run_dir: Path, guest: str) -> list[dict[str, Any]]:
    """bartest's result lines in a guest's console: a PVH guest's as xenconsoled logs it, an
    HVM guest's serial file."""
    for path in (run_dir / "log" / "console" / f"guest-{guest}.log",
                 run_dir / f"{guest}.serial"):
        if path.exists():
            text = path.read_text(errors="replace")
            return [json.loads(m) for m in RESULT_LINE.findall(text)]
    return []


def xbench_rows(lines: list[dict[str, Any]]) -> list[XenRow]:
    """One row per vCPU count, target and size, devmodel's first, the peer's after them."""
    series = [r for r in lines if r.get("test") == "xbench" and "target" in r]
    peer = {(r["vcpus"], r["size"]): r["reads"]["median_ns"] for r in series
            if r["target"] == "peer_bar0"}
    rows = []
    for r in sorted(series, key=lambda r: (r["vcpus"], r["target"] == "peer_bar0",
                                           r["target"], r["size"])):
        reads = r["reads"]
        vcpus = f"{r['vcpus']} vCPU" + ("s at once" if r["vcpus"] > 1 else "")
        base = peer.get((r["vcpus"], r["size"]))
        ratio = (reads["median_ns"] / base
                 if base and r["target"] != "peer_bar0" else None)
        rows.append(XenRow(f"{r['size']}-byte read, {TARGETS.get(r['target'], r['target'])}, "
                           f"{vcpus}", reads["median_ns"], reads["p99_ns"], reads["count"],
                           ratio))
    return rows


def xfault_rows(lines: list[dict[str, Any]]) -> list[XenRow]:
    """The fault, the resident read of the same windows and the peer's read, 8 bytes each."""
    rows = []
    for r in (r for r in lines if r.get("test") == "xfault" and "fault" in r):
        peer = r["peer"]["median_ns"] if r.get("peer", {}).get("count") else None
        resident = r["resident"]["median_ns"] or None
        for key, figure, base, name in (
            ("fault", "first read of an evicted window (page-in), devmodel BAR0", resident,
             "resident"),
            ("fault", "  the same, against the C peer", peer, "C peer"),
            ("resident", "resident read of those windows, devmodel BAR0", peer, "C peer"),
            ("peer", "8-byte read, C peer BAR0 (same guest)", None, ""),
        ):
            s = r[key]
            if not s["count"]:
                continue
            ratio = s["median_ns"] / base if base else None
            rows.append(XenRow(figure, s["median_ns"], s["p99_ns"], s["count"], ratio, name))
    return rows


def table_rows(run_dir: Path) -> list[XenRow]:
    lines = results(run_dir, BENCH_GUEST)
    return xbench_rows(lines) + xfault_rows(lines)


def fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    if ns < 1e6:
        return f"{ns / 1e3:.1f} us"
    if ns < 1e9:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


def format_table(run_dir: Path) -> str:
    rows = table_rows(run_dir)
    if not rows:
        return (f"no xen-bench results in {run_dir} (looked for bartest's lines in the "
                f"{BENCH_GUEST} guest's console)")
    head = f"{'Xen figure (guest vCPU to dom0, real event channels)':<68} {'median':>9} " \
           f"{'p99':>9} {'count':>6}  ratio"
    out = [head, "-" * len(head)]
    for row in rows:
        ratio = f"{row.ratio:.2f}x {row.peer}" if row.ratio is not None else ""
        out.append(f"{row.figure:<68} {fmt_ns(row.median):>9} {fmt_ns(row.p99):>9} "
                   f"{row.count:>6}  {ratio}".rstrip())
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    print(format_table(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
