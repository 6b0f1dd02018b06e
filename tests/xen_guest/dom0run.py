"""One boot of the Xen test bed that ran dom0-suite, as the xen_guest tests read it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..qemu.testbed import tail


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
