"""What the xen_guest tests share: one boot's record (Dom0Run) and how to read what the guests
and devmodel left in the run's directory. Kept out of conftest.py, which holds fixtures only."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        """Guest `name`'s console (HVM: its serial file; PVH: xenconsoled's log)."""
        for path in (self.workdir / f"{name}.serial",
                     self.workdir / "log" / "console" / f"guest-{name}.log"):
            if path.exists():
                return path.read_text(errors="replace")
        return ""

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
