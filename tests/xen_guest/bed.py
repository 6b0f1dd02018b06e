"""What the xen_guest tests share: one boot's record (Dom0Run), how to read what the guests
and devmodel left in the run's directory, and the checks both profiles make (the full one,
test_xen_guest.py, and the CI one, test_xen_ci.py). Kept out of conftest.py, which holds
fixtures only."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devmodel.pci.registers import REGISTERS

from ..qemu.testbed import tail

RESULT_LINE = re.compile(r"DEVMODEL-RESULT (\{.*\})")


@dataclass
class Dom0Run:
    """One boot of the Xen test bed that ran dom0-suite: its console and its files."""

    workdir: Path
    returncode: int | None
    console: str
    seconds: float
    ready_seconds: float | None
    profile: str = "ci"

    def step(self, name: str) -> tuple[int | None, str]:
        """(exit status, output) of a dom0-suite step; status None if it never finished."""
        status = self.workdir / f"{name}.status"
        output = self.workdir / f"{name}.out"
        rc = int(status.read_text()) if status.exists() else None
        return rc, output.read_text(errors="replace") if output.exists() else ""

    def guest(self, name: str) -> dict[str, Any]:
        """What dom0/guest recorded for guest `name` (its NAME.json); fails if it did not."""
        rc, output = self.step(name)
        path = self.workdir / f"{name}.json"
        assert rc == 0 and path.exists(), (
            f"the {name} guest did not report (step exit {rc}):\n{output}")
        record: dict[str, Any] = json.loads(path.read_text())
        return record

    def report(self) -> str:
        return f"----- console (run exit {self.returncode}) -----\n{tail(self.console)}"

    def console_of(self, name: str) -> str:
        """Guest `name`'s console: xenconsoled's log of its PV console (PVH, and HVM with
        `guest --pv-console`) and its serial file (HVM), whichever it wrote."""
        return "".join(path.read_text(errors="replace") for path in (
            self.workdir / "log" / "console" / f"guest-{name}.log",
            self.workdir / f"{name}.serial") if path.exists())

    def results(self, name: str) -> list[dict[str, Any]]:
        """bartest's `DEVMODEL-RESULT {json}` lines from guest `name`'s console."""
        return [json.loads(m) for m in RESULT_LINE.findall(self.console_of(name))]

    def result(self, name: str, test: str) -> dict[str, Any]:
        """bartest's result line for `test` in guest `name`; fails if there is none."""
        lines = [r for r in self.results(name) if r.get("test") == test]
        assert lines, f"guest {name} printed no {test} result: {self.results(name)}"
        return lines[-1]

    def event(self, name: str, event: str) -> dict[str, Any]:
        """bartest's `{"event": event, ...}` line in guest `name`; fails if there is none."""
        lines = [r for r in self.results(name) if r.get("event") == event]
        assert lines, f"guest {name} printed no {event} event: {self.results(name)}"
        return lines[-1]

    def devmodel_events(self, name: str) -> list[dict[str, Any]]:
        """What `devmodel-bg start --events` recorded from guest `name`'s devmodel: its
        control-socket events, in the order it sent them, between two bookkeeping lines."""
        path = self.workdir / f"{name}.events"
        assert path.exists(), f"no {path.name}: was devmodel started with --events?"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def devmodel_log(self, name: str) -> str:
        path = self.workdir / f"{name}.devmodel.log"
        return path.read_text(errors="replace") if path.exists() else ""


def most_page_ins_at_once(events: list[dict[str, Any]]) -> int:
    """The most page-ins devmodel had outstanding at one moment, from its event stream.

    A page-in is outstanding from its PAGE_IN_REQUESTED until a LEASE_GRANTED covering the
    offset that was asked for (the grant answers it: the accesses waiting on the window are
    served inside it) or its PAGE_IN_FAILED. devmodel starts a page-in only for an access
    that found its window evicted, and on Xen a vCPU has one access outstanding at a time, so
    two page-ins outstanding at once mean two vCPUs were waiting at once.
    """
    pending: dict[int, int] = {}  # request -> offset
    most = 0
    for line in events:
        data = line.get("data", {})
        match line.get("event"):
            case "PAGE_IN_REQUESTED":
                pending[data["request"]] = data["offset"]
                most = max(most, len(pending))
            case "LEASE_GRANTED":
                start, end = data["offset"], data["offset"] + data["length"]
                for request, offset in list(pending.items()):
                    if start <= offset < end:
                        del pending[request]
            case "PAGE_IN_FAILED":
                pending.pop(data["request"], None)
    return most


GIB = 1 << 30
FUNCTION = "1234:10e5"


def decode_regs(line: dict[str, Any]) -> dict[str, int]:
    """BAR2's registers from bartest's regs line, with devmodel's own layout."""
    raw = b"".join(int(d, 16).to_bytes(4, "little") for d in line["dwords"])
    return {
        r.name: int.from_bytes(raw[r.offset : r.offset + r.width], "little")
        for r in REGISTERS
        if r.offset + r.width <= len(raw)
    }


def check_served_guest(
    dom0_suite: Dom0Run, name: str, guest_type: str, bar0_size: int = GIB
) -> dict[str, Any]:
    """What every guest devmodel served shows: the guest's Linux enumerated the function at
    00:1e.0 (1234:10e5, class 0x050000) with a 64-bit prefetchable BAR0 of `bar0_size`."""
    record = dom0_suite.guest(name)
    report = record["report"]
    assert report["guest_type"] == guest_type, record
    assert f"1e.0 {FUNCTION}" in " ".join(report["pci"]), record
    enumerate_ = dom0_suite.result(name, "enumerate")
    assert enumerate_["ok"], enumerate_
    assert (enumerate_["vendor"], enumerate_["device"]) == ("0x1234", "0x10e5"), enumerate_
    assert enumerate_["class"] == "0x050000", enumerate_
    bar0 = next(b for b in enumerate_["bars"] if b["index"] == 0)
    assert bar0["size"] == bar0_size and bar0["mem"] and bar0["mem64"] and bar0["prefetch"], bar0
    assert int(enumerate_["bar0_reg"], 16) & 0xF == 0xC, enumerate_
    return enumerate_


def check_devmodel_log(dom0_suite: Dom0Run, name: str, quiet: bool = True) -> str:
    """devmodel served the guest and, stopped after `xl destroy`, said once, quietly, that the
    ioreq server was already gone (no warning per teardown step). `quiet`: no warning or error
    at all (a guest whose lender was not stopped on purpose); without, no error or traceback."""
    rc, output = dom0_suite.step(f"{name}-stop")
    log = dom0_suite.devmodel_log(name)
    assert rc == 0, output
    assert re.search(r"ioreq server \d+ for domain \d+: 2 vCPU\(s\), PCI 0000:00:1e\.0", log), log
    assert log.count("the ioreq server is already gone") == 1, log
    assert "ERROR" not in log and "Traceback" not in log, log
    if quiet:
        assert "WARNING" not in log, log
    return log


# dom0-suite's churn guests: bartest's churn over these windows and records per window and
# thread (its churn_args), while the lender revokes at random.
CHURN_WINDOWS = 8
CHURN_SLOTS = 8


def check_churn(dom0_suite: Dom0Run, name: str, guest_type: str, bar0_size: int = 16 << 20,
                alone: bool = True) -> str:
    """What a churn guest must show: two writer threads on two vCPUs, no record lost or torn,
    windows revoked, faulted on and paged back in while they wrote, no access answered with
    the failure policy. `alone`: churn was the guest's only test after enumerate, so bartest
    exited 0 and devmodel's log is quiet (in dom0-ci's chain, the watch test after it breaks
    the lender on purpose). Returns a one-line account for the report."""
    check_served_guest(dom0_suite, name, guest_type, bar0_size)
    record = dom0_suite.guest(name)
    if alone:
        assert record["report"].get("bartest") == 0, record
    start = dom0_suite.event(name, "churning")
    assert start["threads"] == 2 and start["cpus"] == 2, start
    assert (start["windows"], start["slots"]) == (CHURN_WINDOWS, CHURN_SLOTS), start
    lines = [r for r in dom0_suite.results(name) if r.get("test") == "churn"]
    threads = sorted((r for r in lines if "thread" in r), key=lambda r: r["thread"])
    summary = next(r for r in lines if r.get("summary"))
    assert [t["thread"] for t in threads] == [0, 1], lines
    assert sorted(t["cpu"] for t in threads) == [0, 1], f"each thread on its own vCPU: {lines}"
    for t in threads:
        assert (t["mismatches"], t["lost"], t["torn"], t["other"]) == (0, 0, 0, 0), t
        assert t["passes"] >= 1 and t["reads"] == t["writes"] > 0, t
        assert t["writes"] == t["passes"] * CHURN_WINDOWS * CHURN_SLOTS, t
    final = summary["final"]
    assert final["records"] == 2 * CHURN_WINDOWS * CHURN_SLOTS == final["reads"], summary
    assert (final["mismatches"], final["lost"], final["torn"], final["other"]) == (
        0, 0, 0, 0), final
    assert summary["ok"] is True, summary
    # The run proves something only if windows really went and came back under the writers.
    churned = dom0_suite.event(name, "churned")
    during = {k: churned["counters"][k] - start["counters"][k]
              for k in ("revokes", "page_ins", "faults", "failed_accesses")}
    assert during["revokes"] > 0 and during["page_ins"] > 0 and during["faults"] > 0, during
    assert summary["counters"]["failed_accesses"] == 0, summary
    if alone:
        log = check_devmodel_log(dom0_suite, name)
        assert re.search(r"'failed_accesses': 0,", log), log
    at_once = most_page_ins_at_once(dom0_suite.devmodel_events(name))
    return (f"{name}: {threads[0]['passes']}+{threads[1]['passes']} passes in {churned['ms']} ms, "
            f"revokes {during['revokes']}, page-ins {during['page_ins']}, faults "
            f"{during['faults']}, at most {at_once} page-ins at once")
