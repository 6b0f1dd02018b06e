"""The Xen suite's full profile (DEVMODEL_XEN=full; tests/xen_guest/dom0-suite): Xen 4.20
under QEMU TCG, HVM and PVH guests without and with devmodel, one thing checked per guest.

Every test here looks at the one shared boot (conftest's `dom0_suite`): a real hypervisor, not
the simulated one of tests/xen/. The CI profile (test_xen_ci.py) covers the same ground on two
guests; this one keeps what only it shows (plain guests, PVH with pci=noacpi, the built-in
lender beside QEMU).
"""

from __future__ import annotations

import re

import pytest

from devmodel.pci.registers import INTERFACE_VERSION, MAGIC

from .bed import (
    GIB,
    Dom0Run,
    check_churn,
    check_devmodel_log,
    check_served_guest,
    decode_regs,
    most_page_ins_at_once,
)

pytestmark = [pytest.mark.xen_guest, pytest.mark.xen_full]


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


def test_devmodel_serves_an_hvm_guest_beside_qemu(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: `devmodel run --transport xen --aperture-size 1G`, started
    in dom0 while an HVM guest is paused (QEMU-xen its default device model), is the guest's
    second ioreq server: hvmloader places the BARs, the guest's Linux enumerates the function,
    bartest reads BAR2's identification registers and does BAR0 round trips with the built-in
    lender."""
    check_served_guest(dom0_suite, "hvm-devmodel", "HVM")
    regs = decode_regs(dom0_suite.result("hvm-devmodel", "regs"))
    assert regs["MAGIC"] == MAGIC and regs["VERSION"] == INTERFACE_VERSION, regs
    assert regs["APERTURE_SIZE"] == GIB, regs
    assert regs["BAD_ACCESSES"] == regs["PROTOCOL_ERRORS"] == 0, regs
    boundary = dom0_suite.result("hvm-devmodel", "boundary")
    assert boundary["ok"] and boundary["failures"] == 0, boundary
    log = check_devmodel_log(dom0_suite, "hvm-devmodel")
    assert "PCI configuration ports: left to the guest's device model" in log, log


def test_a_pvh_guest_enumerates_the_function_with_no_kernel_option(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: a PVH guest has no QEMU; devmodel (--pci-config-ports
    auto) claims ports 0xcf8-0xcff, presents a host bridge, and (--pvh-acpi-root auto) adds a
    PCI root to the guest's ACPI tables while it is paused, so the guest's Linux, with no
    special kernel option, finds type 1 config access, takes bus 0 from ACPI, places both BARs
    in the root's windows and enumerates the function; bartest's BAR0 and BAR2 accesses pass."""
    check_served_guest(dom0_suite, "pvh-devmodel", "PVH")
    record = dom0_suite.guest("pvh-devmodel")
    assert "00:00.0 1234:10e4" in record["report"]["pci"], record
    console = dom0_suite.console_of("pvh-devmodel")
    assert "PCI: Using configuration type 1 for base access" in console, console
    assert "No config space access function found" not in console, console
    regs = decode_regs(dom0_suite.result("pvh-devmodel", "regs"))
    assert regs["MAGIC"] == MAGIC and regs["APERTURE_SIZE"] == GIB, regs
    boundary = dom0_suite.result("pvh-devmodel", "boundary")
    assert boundary["ok"] and boundary["failures"] == 0, boundary
    log = check_devmodel_log(dom0_suite, "pvh-devmodel")
    assert "PCI configuration ports: served here (the guest has no device model" in log, log
    assert "serving PCI configuration ports 0xcf8-0xcff and host bridge 00:00.0" in log, log
    assert re.search(r"PVH ACPI: PCI root PCI0 \(bus 0, windows 0xf0000000-0xfaffffff, "
                     r"0x4000000000-0x7fffffffff\) added to the guest's XSDT", log), log
    # Linux placed BAR0 in the 64-bit window and BAR2 in the 32-bit one (no firmware in PVH).
    assert re.search(r"claimed MMIO: .*BAR0 0x40[0-9a-f]{8}-", log), log


def test_a_pvh_guest_with_pci_noacpi_enumerates_the_function(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: with the kernel option `pci=noacpi` Linux ignores ACPI's
    PCI roots (devmodel's included) and scans bus 0 itself through devmodel's configuration ports,
    finds the host bridge and the function, and bartest does the same BAR0 and BAR2 accesses as
    on the HVM guest."""
    check_served_guest(dom0_suite, "pvh-pci-noacpi", "PVH")
    record = dom0_suite.guest("pvh-pci-noacpi")
    assert "00:00.0 1234:10e4" in record["report"]["pci"], record
    regs = decode_regs(dom0_suite.result("pvh-pci-noacpi", "regs"))
    assert regs["MAGIC"] == MAGIC and regs["APERTURE_SIZE"] == GIB, regs
    boundary = dom0_suite.result("pvh-pci-noacpi", "boundary")
    assert boundary["ok"] and boundary["failures"] == 0, boundary
    check_devmodel_log(dom0_suite, "pvh-pci-noacpi")


def test_leases_from_the_reference_lender_are_evicted_and_paged_back_in(
    dom0_suite: Dom0Run,
) -> None:
    """Runs on the real hypervisor: devmodel (a 64 MiB BAR0) borrows its memory from the
    reference lender in dom0, which has 4 MiB of VRAM; the guest writes into 8 windows of
    2 MiB, so the lender evicts to make room, and reading everything back faults the evicted
    windows in again with their contents intact."""
    check_served_guest(dom0_suite, "hvm-lender", "HVM", 64 << 20)
    evict = dom0_suite.result("hvm-lender", "evict")
    assert evict["ok"] and evict["mismatches"] == 0 and evict["windows"] == 8, evict
    counters = evict["counters"]
    assert counters["revokes"] > 0 and counters["page_ins"] > 0, evict
    assert counters["failed_accesses"] == 0, evict
    check_devmodel_log(dom0_suite, "hvm-lender")


def test_a_stopped_lender_is_declared_lost_and_reads_get_all_ones(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: while the guest idles after writing a value, the reference
    lender evicts everything and is stopped (SIGSTOP). devmodel's liveness PING goes
    unanswered for 2 s, so it declares the lender lost, and the guest's next read of the
    evicted value gets the failure policy at once (all-ones with the reason `the lender is
    gone`, not a page-in waiting out its deadline: no time is asserted); the device still
    answers on BAR2 afterwards."""
    watch = dom0_suite.result("hvm-lender-stopped", "watch")
    assert watch["ok"] and watch["saw_all_ones"] and watch["good_reads"] == 0, watch
    assert int(watch["bar2_magic_after"], 16) == MAGIC, watch
    rc, output = dom0_suite.step("hvm-lender-stopped-stop")
    assert rc == 0, output
    assert "evicted everything (SIGUSR1), then stopped (SIGSTOP)" in dom0_suite.console
    log = dom0_suite.devmodel_log("hvm-lender-stopped")
    assert "lender connection ended: the lender did not answer a PING within 2 s" in log, log
    assert "read of 8 bytes at 0x2000 failed: the lender is gone" in log, log
    assert re.search(r"'failed_accesses': 1,.*'lender_losses': 1", log), log
    assert log.count("the ioreq server is already gone") == 1, log


def test_two_vcpus_write_through_random_revocation_on_hvm(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: an HVM guest with 2 vCPUs, devmodel serving a 16 MiB BAR0
    from the reference lender in dom0, which revokes a resident window 10 times a second and
    puts half its page-ins elsewhere in its VRAM. bartest's churn (a writer thread pinned to
    each vCPU, 8-byte self-checking records in 8 windows, each read back) loses and tears no
    record, no access falls back to the failure policy, windows were revoked, faulted on and
    paged in while the threads wrote, and at some moment both vCPUs waited on page-ins of their
    own (two page-ins outstanding at once in devmodel's events)."""
    account = check_churn(dom0_suite, "hvm-churn", "HVM")
    assert most_page_ins_at_once(dom0_suite.devmodel_events("hvm-churn")) >= 2, account
    print(account)


def test_two_vcpus_write_through_random_revocation_on_pvh(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: the same churn on a PVH guest with `pci=noacpi` (no QEMU:
    devmodel serves the configuration ports too), the same lender revoking at random."""
    account = check_churn(dom0_suite, "pvh-churn", "PVH")
    print(account)


def test_run_returns_the_commands_status(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: `run` exits with the status of the command dom0 ran (the
    suite's: the number of steps that failed), after dom0 powered the machine off."""
    steps = ["xl-info", "xl-list", "devmodel-handles", "pvh", "hvm", "hvm-devmodel",
             "hvm-devmodel-stop", "pvh-devmodel", "pvh-devmodel-stop", "pvh-pci-noacpi",
             "pvh-pci-noacpi-stop", "hvm-lender", "hvm-lender-stop", "hvm-lender-stopped",
             "hvm-lender-stopped-stop", "hvm-churn", "hvm-churn-stop", "pvh-churn",
             "pvh-churn-stop"]
    failed = sum(dom0_suite.step(name)[0] != 0 for name in steps)
    assert dom0_suite.returncode == failed, dom0_suite.report()
    assert f"XENBED-EXIT {failed}" in dom0_suite.console
