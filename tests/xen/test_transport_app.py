"""`devmodel run --transport xen`: on this machine (no Xen) as a process, and the whole app
path in-process with the simulated hypervisor given through `run`'s xen_platform factory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from devmodel import app
from devmodel.config import build_settings
from devmodel.testing import SimHypervisor
from devmodel.xen.server import DEFAULT_SBDF, STATE_KEY
from tests.xen.rig import CMD_MEMORY, DEVICE, VENDOR

BAR0 = 0xC000_0000


@pytest.mark.skipif(os.path.exists("/dev/xen"), reason="this host has Xen")
def test_run_without_xen_exits_1_with_one_line(tmp_path: Path) -> None:
    pidfile = tmp_path / "dm.pid"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "devmodel",
            "run",
            "--transport",
            "xen",
            "--domid",
            "5",
            "--pidfile",
            str(pidfile),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "cannot start" in lines[0]
    assert "domain 5" in lines[0]
    assert not pidfile.exists()


async def test_the_whole_app_serves_a_simulated_guest_and_stops_cleanly() -> None:
    sim = SimHypervisor(domid=9, vcpus=2)
    settings = build_settings(
        {"transport": "xen", "domid": "9", "aperture-size": "1M", "granule": "4K"}
    )
    key = STATE_KEY.format(domid=9)
    built: list[int] = []

    def factory(domid: int) -> SimHypervisor:
        built.append(domid)
        return sim

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: app.run(settings, xen_platform=factory))
        with trio.fail_after(10):
            while sim.xenstore.get(key) != "running":
                await trio.sleep(0.01)
        assert built == [9]
        assert sim.server().pcidevs == {DEFAULT_SBDF}
        cpu = sim.cpus[1]
        with trio.fail_after(10):
            assert await cpu.config_read(0, 4) == VENDOR | DEVICE << 16
            await cpu.config_write(0x10, 4, BAR0)
            await cpu.config_write(0x14, 4, 0)
            await cpu.config_write(0x04, 2, CMD_MEMORY)
            await cpu.write(BAR0 + 0x80, 8, 0xFEEDFACECAFEBEEF)
            assert await cpu.read(BAR0 + 0x80, 8) == 0xFEEDFACECAFEBEEF
            # Stop as libxl does (SIGHUP); trio's signal receiver in run() takes it.
            os.kill(os.getpid(), signal.SIGHUP)
    assert key not in sim.xenstore
    assert all(s.destroyed for s in sim.servers.values())
    assert sim.local_of == {}
    assert sim.closed


async def test_the_app_stops_cleanly_when_its_guest_is_destroyed() -> None:
    """`xl destroy` without the toolstack stopping devmodel: the @releaseDomain watch does,
    with a clean stop (SHUTDOWN reason, server teardown that finds the server gone)."""
    sim = SimHypervisor(domid=9, vcpus=2)
    settings = build_settings(
        {"transport": "xen", "domid": "9", "aperture-size": "1M", "granule": "4K"}
    )
    key = STATE_KEY.format(domid=9)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: app.run(settings, xen_platform=lambda domid: sim))
            while sim.xenstore.get(key) != "running":
                await trio.sleep(0.01)
            sim.destroy_domain()
        # app.run returned by itself: nothing cancelled it.
    assert sim.closed and sim.local_of == {}
    assert sim.calls.count("domain_ended") >= 2
