"""The reference lender, a device model borrowing from it and a control client on that device
model, as the lease tests under a real guest start them (no tests here).

Shared by tests/qemu/test_guest_leases.py and tests/qemu/test_guest_soak.py, which differ only
in the lender's options and what they do with the stack.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devmodel.control.client import ControlClient

from .testbed import DevmodelServer, LenderProcess, Reaper

APERTURE = "64M"
GRANULE = 2 << 20
WINDOWS = (64 << 20) // GRANULE
STARTUP_TIMEOUT = 30.0


class LenderStack:
    """Lender, device model and a control client on the device model, started in that order."""

    def __init__(self, reaper: Reaper, tmp_path: Path,
                 start_devmodel: Callable[..., DevmodelServer], *lender_args: str,
                 vram: str, transport: str = "vfio-user",
                 devmodel_args: tuple[str, ...] = ()) -> None:
        work = tmp_path / "lender"
        work.mkdir()
        self.lender = LenderProcess(reaper, work, "--vram", vram, *lender_args)
        self.control_path = tmp_path / "control" / "devmodel.ctl"
        self.server = start_devmodel(
            "--lender-socket", str(self.lender.socket_path), "--granule", str(GRANULE),
            "--control-socket", str(self.control_path), "--domid", "7", *devmodel_args,
            aperture_size=APERTURE, transport=transport)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.control_path.is_socket():
            assert time.monotonic() < deadline, "devmodel never opened its control socket"
            time.sleep(0.02)
        self.control = ControlClient(str(self.control_path))

    def stats(self) -> dict[str, Any]:
        stats = self.control.execute("query-stats")
        assert isinstance(stats, dict)
        return stats

    def stop(self) -> tuple[dict[str, int], dict[str, int]]:
        """Device model, then lender (as the demo does): their final counters."""
        self.control.close()
        assert self.server.stop() == 0, "devmodel exits 0 on SIGTERM"
        counters = self.server.counters()
        assert counters is not None, "devmodel printed no final counters"
        assert self.lender.stop() == 0, "the lender exits 0 on SIGTERM"
        summary = self.lender.summary()
        assert summary is not None, "the lender printed no summary"
        return counters, summary
