"""The Xen test bed: Xen 4.20 under QEMU TCG, its dom0 toolstack, and HVM and PVH guests.

Every test here looks at the one shared boot (conftest's `dom0_suite`): a real hypervisor, not
the simulated one of tests/xen/.
"""

from __future__ import annotations

import re

import pytest

from .dom0run import Dom0Run

pytestmark = pytest.mark.xen_guest


def test_dom0_toolstack_is_up(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: in dom0, `xl info` answers and Xen offers HVM (with HAP,
    which TCG's emulated SVM gives it) and `xl list` shows Domain-0."""
    rc, info = dom0_suite.step("xl-info")
    assert rc == 0, info
    fields = dict(re.findall(r"^(\w+)\s*: (.*)$", info, re.MULTILINE))
    assert fields["xen_version"].startswith("4.20."), info
    assert {"hvm", "hap", "pv"} <= set(fields["virt_caps"].split()), info
    assert int(fields["nr_cpus"]) == 2, info
    rc, listing = dom0_suite.step("xl-list")
    assert rc == 0 and re.search(r"^Domain-0\s+0\s", listing, re.MULTILINE), listing


def test_pvh_guest_boots_to_init(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: `xl create -p` of a PVH guest (Debian's kernel, a busybox
    initramfs, 2 vCPUs), a hook while it is paused, then unpause; its /init reports on its
    console that it is a PVH guest with both vCPUs online."""
    record = dom0_suite.guest("pvh")
    report = record["report"]
    assert report["guest_type"] == "PVH", record
    assert report["cpus"] == "0-1", record
    # No device model: a PVH guest has no PCI config space (Linux says "No config space
    # access function found").
    assert report["pci"] == [], record
    # `guest --before-unpause` ran while the domain was created but paused (state "--p---";
    # VCPUs counts the online ones, 1 until the guest brings up the other).
    paused = (dom0_suite.workdir / "pvh-paused.out").read_text()
    assert re.search(r"^pvh\s+\d+\s+256\s+\d+\s+-*p-*\s", paused, re.MULTILINE), paused


def test_hvm_guest_boots_to_init(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: an HVM guest with hvmloader, SeaBIOS and Debian's QEMU-xen
    as its device model in dom0 (2 vCPUs, serial console to a file) boots to its /init, which
    reports an HVM guest with both vCPUs online and QEMU-xen's i440FX host bridge."""
    record = dom0_suite.guest("hvm")
    report = record["report"]
    assert report["guest_type"] == "HVM", record
    assert report["cpus"] == "0-1", record
    assert "00:00.0 8086:1237" in report["pci"], record


def test_devmodel_opens_xen_handles_in_dom0(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: devmodel, imported in dom0 from the read-only checkout with
    Debian's python3-trio, -construct and -sortedcontainers, loads Xen's tool libraries and
    opens its devicemodel, foreignmemory, evtchn and xenstore handles."""
    rc, output = dom0_suite.step("devmodel-handles")
    assert rc == 0, output
    assert "devmodel opened and closed its Xen handles" in output


def test_run_returns_the_commands_status(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: `run` exits with the status of the command dom0 ran (the
    suite's: the number of steps that failed), after dom0 powered the machine off."""
    steps = ["xl-info", "xl-list", "devmodel-handles", "pvh", "hvm"]
    failed = sum(dom0_suite.step(name)[0] != 0 for name in steps)
    assert dom0_suite.returncode == failed, dom0_suite.report()
    assert f"XENBED-EXIT {failed}" in dom0_suite.console
