"""The Xen test bed: Xen 4.20 under QEMU TCG, its dom0 toolstack, and HVM and PVH guests.

Every test here looks at the one shared boot (conftest's `dom0_suite`): a real hypervisor, not
the simulated one of tests/xen/.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from devmodel.pci.registers import INTERFACE_VERSION, MAGIC, REGISTERS

from .bed import Dom0Run, most_page_ins_at_once

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


def check_devmodel_log(dom0_suite: Dom0Run, name: str) -> str:
    """devmodel served the guest and, stopped after `xl destroy`, said once, quietly, that the
    ioreq server was already gone (no warning per teardown step)."""
    rc, output = dom0_suite.step(f"{name}-stop")
    log = dom0_suite.devmodel_log(name)
    assert rc == 0, output
    assert re.search(r"ioreq server \d+ for domain \d+: 2 vCPU\(s\), PCI 0000:00:1e\.0", log), log
    assert log.count("the ioreq server is already gone") == 1, log
    assert "WARNING" not in log and "ERROR" not in log, log
    return log


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
    evicted value gets the failure policy at once (all-ones, not a stall); the device still
    answers on BAR2 afterwards."""
    watch = dom0_suite.result("hvm-lender-stopped", "watch")
    assert watch["ok"] and watch["saw_all_ones"] and watch["good_reads"] == 0, watch
    assert watch["ms_to_all_ones"] < 1500, watch
    assert int(watch["bar2_magic_after"], 16) == MAGIC, watch
    rc, output = dom0_suite.step("hvm-lender-stopped-stop")
    assert rc == 0, output
    assert "evicted everything (SIGUSR1), then stopped (SIGSTOP)" in dom0_suite.console
    log = dom0_suite.devmodel_log("hvm-lender-stopped")
    assert "lender connection ended: the lender did not answer a PING within 2 s" in log, log
    assert "read of 8 bytes at 0x2000 failed: the lender is gone" in log, log
    assert re.search(r"'failed_accesses': 1,.*'lender_losses': 1", log), log
    assert log.count("the ioreq server is already gone") == 1, log


# dom0-suite's churn guests: bartest's churn over these windows and records per window and
# thread (its churn_args), while the lender revokes at random.
CHURN_WINDOWS = 8
CHURN_SLOTS = 8


def check_churn(dom0_suite: Dom0Run, name: str, guest_type: str) -> str:
    """What a churn guest must show: two writer threads on two vCPUs, no record lost or torn,
    windows revoked, faulted on and paged back in while they wrote, no access answered with
    the failure policy, and a quiet devmodel log. Returns a one-line account for the report."""
    check_served_guest(dom0_suite, name, guest_type, 16 << 20)
    record = dom0_suite.guest(name)
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
    log = check_devmodel_log(dom0_suite, name)
    assert re.search(r"'failed_accesses': 0,", log), log
    at_once = most_page_ins_at_once(dom0_suite.devmodel_events(name))
    return (f"{name}: {threads[0]['passes']}+{threads[1]['passes']} passes in {churned['ms']} ms, "
            f"revokes {during['revokes']}, page-ins {during['page_ins']}, faults "
            f"{during['faults']}, at most {at_once} page-ins at once")


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
