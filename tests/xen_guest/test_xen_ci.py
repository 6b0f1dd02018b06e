"""The Xen suite's CI profile: devmodel on a real Xen 4.20 hypervisor (under QEMU TCG), serving
an HVM guest beside QEMU-xen and a PVH guest with no QEMU.

Every test here looks at the one shared boot (conftest's `dom0_suite`, running
tests/xen_guest/dom0-ci): each guest ran one chain of bartest's tests (enumerate, regs,
boundary, irq on HVM only, msi, evict, churn, watch) in one boot, served by its own devmodel
borrowing from its own reference lender in dom0. Each test checks one piece of that chain's
evidence, for each guest type (the `[hvm]` and `[pvh]` variants).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from devmodel.pci.registers import INTERFACE_VERSION, MAGIC

from .bed import GIB, Dom0Run, check_churn, check_served_guest, decode_regs, most_page_ins_at_once

pytestmark = [pytest.mark.xen_guest, pytest.mark.xen_ci]

# dom0-ci's guests, by the parameter that names each test's variant.
GUESTS = {"hvm": ("ci-hvm", "HVM"), "pvh": ("ci-pvh", "PVH")}
GUEST_TYPES = pytest.mark.parametrize("kind", list(GUESTS))


def served(dom0_suite: Dom0Run, kind: str) -> tuple[str, dict[str, Any]]:
    """The guest's name and its enumerate line, after the checks every served guest passes:
    it reported, its Linux enumerated 1234:10e5 at 00:1e.0 with a 1 GiB 64-bit prefetchable
    BAR0."""
    name, guest_type = GUESTS[kind]
    return name, check_served_guest(dom0_suite, name, guest_type, GIB)


def lender_log(dom0_suite: Dom0Run, name: str) -> str:
    path = dom0_suite.workdir / f"{name}.lender.log"
    return path.read_text(errors="replace") if path.exists() else ""


def watcher_log(dom0_suite: Dom0Run, name: str) -> str:
    path = dom0_suite.workdir / f"{name}.watcher.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_real_xen_hvm_guest_enumerates_a_1g_bar_placed_by_hvmloader(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: devmodel, started in dom0 while an HVM guest is paused, is
    its second ioreq server beside QEMU-xen (which keeps the configuration ports: `auto` left
    them to it) at 00:1e.0; hvmloader sizes and places the 1 GiB 64-bit BAR0, and the guest's
    Linux enumerates the function next to QEMU's i440FX host bridge."""
    name, _ = served(dom0_suite, "hvm")
    record = dom0_suite.guest(name)
    assert "00:00.0 8086:1237" in record["report"]["pci"], record
    # hvmloader's own line, on Xen's console (guest_loglvl=all): BAR0 (config offset 0x10) of
    # 1e.0 is 0x40000000 bytes.
    assert re.search(r"\(d\d+\) .*pci dev 1e:0 bar 10 size 040000000", dom0_suite.console), (
        dom0_suite.report())
    log = dom0_suite.devmodel_log(name)
    assert "PCI configuration ports: left to the guest's device model" in log, log
    assert re.search(r"claimed MMIO: .*BAR0 0x[0-9a-f]+-0x[0-9a-f]+", log), log


def test_real_xen_pvh_guest_enumerates_with_no_kernel_option(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: a PVH guest has no QEMU; devmodel answers ports
    0xcf8-0xcff, presents a host bridge and adds a PCI root to the paused guest's ACPI tables,
    so its Linux, with no PCI option on its command line, finds type 1 config access, takes
    bus 0 from ACPI, places BAR0 in the root's 64-bit window and enumerates the function."""
    name, _ = served(dom0_suite, "pvh")
    record = dom0_suite.guest(name)
    assert "00:00.0 1234:10e4" in record["report"]["pci"], record
    cfg = (dom0_suite.workdir / f"{name}.cfg").read_text()
    assert "pci=" not in cfg, cfg
    console = dom0_suite.console_of(name)
    assert "PCI: Using configuration type 1 for base access" in console, console
    assert "No config space access function found" not in console, console
    log = dom0_suite.devmodel_log(name)
    assert "PCI configuration ports: served here (the guest has no device model" in log, log
    assert re.search(r"PVH ACPI: PCI root PCI0 \(bus 0, windows 0xf0000000-0xfaffffff, "
                     r"0x4000000000-0x7fffffffff\) added to the guest's XSDT", log), log
    assert re.search(r"claimed MMIO: .*BAR0 0x40[0-9a-f]{8}-", log), log


@GUEST_TYPES
def test_real_xen_bar_round_trips_at_every_size(dom0_suite: Dom0Run, kind: str) -> None:
    """Runs on the real hypervisor: BAR2's identification registers read back devmodel's
    (magic, version, a 1 GiB aperture, no bad access so far), and bartest's boundary test
    stores and loads 8, 4, 2 and 1 bytes at both ends of BAR0 (lent by the reference lender)
    and reads back what it wrote."""
    name, _ = served(dom0_suite, kind)
    regs = decode_regs(dom0_suite.result(name, "regs"))
    assert regs["MAGIC"] == MAGIC and regs["VERSION"] == INTERFACE_VERSION, regs
    assert regs["APERTURE_SIZE"] == GIB, regs
    assert regs["BAD_ACCESSES"] == regs["PROTOCOL_ERRORS"] == 0, regs
    boundary = dom0_suite.result(name, "boundary")
    assert boundary["ok"] and boundary["failures"] == 0 and boundary["failed"] == [], boundary
    assert boundary["checks"] == 16, boundary


# bartest's default devmodel.irqs: doorbell rounds with the pin unmasked; one more is rung
# with it masked.
IRQ_ROUNDS = 5


def irq_line(dom0_suite: Dom0Run) -> dict[str, Any]:
    """The HVM guest's irq result, after the checks that it ran at all (uio_pci_generic bound
    the function and has a Linux IRQ for it)."""
    name, _ = served(dom0_suite, "hvm")
    line = dom0_suite.result(name, "irq")
    assert line.get("error") is None, line
    assert re.fullmatch(r"/dev/uio\d+", line["uio"]) and line["irq"] > 0, line
    return line


def test_real_xen_hvm_guest_receives_each_doorbell_as_an_intx_interrupt(
        dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: hvmloader routes the function's INTA, the HVM guest's
    Linux binds it to uio_pci_generic, and each ring of BAR2's DOORBELL, which devmodel turns
    into `xendevicemodel_set_pci_intx_level(..., 1)`, arrives once through Xen's virtual
    IOAPIC: uio's count after each round is 1, 2, ... 5 (none lost, no storm)."""
    line = irq_line(dom0_suite)
    assert re.search(r"\(d\d+\) .*pci dev 1e:0 INTA->IRQ\d+", dom0_suite.console), (
        dom0_suite.report())
    assert line["received"] == line["rounds"] == IRQ_ROUNDS, line
    assert line["icounts"] == list(range(1, IRQ_ROUNDS + 1)), line
    assert line["ok"] is True, line


def test_real_xen_hvm_intx_handler_saw_status_and_masked_the_pin(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: uio_pci_generic's handler claims the interrupt only when
    the config status register's Interrupt Status bit is set (devmodel's), and masks the pin
    with Interrupt Disable, which lowers the line; acknowledging in IRQ_STATUS clears both."""
    line = irq_line(dom0_suite)
    assert line["flagged"] == IRQ_ROUNDS and line["cleared"] == IRQ_ROUNDS, line


def test_real_xen_hvm_masked_doorbell_is_held_then_delivered(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: a doorbell rung while Interrupt Disable is set is asserted
    by the device (status bits) but not raised; clearing Interrupt Disable raises the line and
    Xen delivers it, once (uio's count is then one more)."""
    line = irq_line(dom0_suite)
    assert line["masked_held"] is True and line["masked_delivered"] is True, line


def test_real_xen_hvm_devmodel_raised_each_interrupt_once(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: BAR2's INTERRUPTS counted every interrupt the guest rang
    for, and devmodel's own view agrees: its stop line says it raised the INTx line that many
    times through the hypercall, injected no MSI and had no hypercall fail, and its counters
    say as many interrupts."""
    name, _ = GUESTS["hvm"]
    line = irq_line(dom0_suite)
    raised = IRQ_ROUNDS + 1  # the rounds and the masked doorbell
    assert line["interrupts_after"] - line["interrupts_before"] == raised, line
    log = dom0_suite.devmodel_log(name)
    # The msi test runs next in the same guest: its messages are on the same stop line.
    injected = MSI_ROUNDS + sum(MSIX_RUNG) + 1
    assert f"interrupts: INTx raised {raised}, MSI injected {injected}, failed 0" in log, log
    assert re.search(rf"stopped; counters: {{.*'interrupts': {raised + injected}\b", log), log
    assert "cannot set INTx" not in log, log


# bartest's msi test: MSI rung devmodel.irqs (5) times at the first target, MSI-X entry v rung
# v + 1 times at target v, then entry 1 once more while masked.
MSI_ROUNDS = 5
MSIX_RUNG = [1, 2, 3, 4]
MSI_TARGETS = ["PIN", "PIW", "NPI", "ERR"]


def msi_line(dom0_suite: Dom0Run, kind: str) -> dict[str, Any]:
    """The guest's msi result, after the checks that it ran at all (it found the MSI and MSI-X
    capabilities and the four counters in /proc/interrupts)."""
    name, _ = served(dom0_suite, kind)
    line = dom0_suite.result(name, "msi")
    assert line.get("error") is None, line
    assert [t["counter"] for t in line["targets"]] == MSI_TARGETS, line
    assert line["msi_cap"] == "0x40" and line["msix_cap"] == "0x50", line
    return line


@GUEST_TYPES
def test_real_xen_guest_receives_each_msi_once(dom0_suite: Dom0Run, kind: str) -> None:
    """Runs on the real hypervisor: with the MSI capability programmed by the guest, each
    doorbell becomes one `xendevicemodel_inject_msi` of the guest's own address and data, and
    arrives once at the vector it names (nothing else moves)."""
    line = msi_line(dom0_suite, kind)
    assert line["msi_received"] == line["msi_rounds"] == MSI_ROUNDS, line
    assert line["msi_counts"] == [MSI_ROUNDS, 0, 0, 0], line


@GUEST_TYPES
def test_real_xen_guest_receives_each_msix_vector_at_its_own_target(
        dom0_suite: Dom0Run, kind: str) -> None:
    """Runs on the real hypervisor: devmodel composes each MSI-X message from the guest's table
    entry; entry v's doorbells arrive at target v only, as many as were rung."""
    line = msi_line(dom0_suite, kind)
    assert line["msix_rung"] == line["msix_received"] == sum(MSIX_RUNG), line
    assert line["msix_counts"] == [1, 2 + 1, 3, 4], line  # entry 1: and the masked doorbell


@GUEST_TYPES
def test_real_xen_masked_msix_vector_is_held_pending_then_delivered(
        dom0_suite: Dom0Run, kind: str) -> None:
    """Runs on the real hypervisor: a doorbell for a masked entry is not injected but left
    pending in devmodel's PBA; the guest's unmask (a trapped table write) injects it, once."""
    line = msi_line(dom0_suite, kind)
    assert line["masked_held"] is True and int(line["masked_pba"], 16) & 0b10, line
    assert line["masked_delivered"] is True and int(line["pba_after"], 16) & 0b10 == 0, line
    assert line["counts"] == line["expected"] == [MSI_ROUNDS + 1, 2 + 1, 3, 4], line
    assert line["ok"] is True, line


@GUEST_TYPES
def test_real_xen_devmodel_injected_each_msi_once(dom0_suite: Dom0Run, kind: str) -> None:
    """Runs on the real hypervisor: BAR2's INTERRUPTS and devmodel's stop line agree with the
    guest: every MSI and MSI-X doorbell injected once through the hypercall, none failed."""
    name, _ = GUESTS[kind]
    line = msi_line(dom0_suite, kind)
    injected = MSI_ROUNDS + sum(MSIX_RUNG) + 1
    assert line["interrupts_after"] - line["interrupts_before"] == injected, line
    raised = IRQ_ROUNDS + 1 if kind == "hvm" else 0  # the irq test runs on HVM only
    log = dom0_suite.devmodel_log(name)
    assert f"interrupts: INTx raised {raised}, MSI injected {injected}, failed 0" in log, log
    assert "cannot inject MSI" not in log, log


@GUEST_TYPES
def test_real_xen_evicted_windows_fault_back_in_from_the_lender(dom0_suite: Dom0Run,
                                                               kind: str) -> None:
    """Runs on the real hypervisor: devmodel borrows BAR0's memory from the reference lender
    in dom0, which has room for 4 of the guest's 2 MiB windows; bartest writes into 8, so the
    lender evicts, and reading everything back faults the evicted windows in again with their
    contents intact, no access failed."""
    name, _ = served(dom0_suite, kind)
    evict = dom0_suite.result(name, "evict")
    assert evict["ok"] and evict["mismatches"] == 0 and evict["windows"] == 8, evict
    counters = evict["counters"]
    assert counters["revokes"] > 0 and counters["page_ins"] > 0 and counters["faults"] > 0, evict
    assert counters["failed_accesses"] == 0, evict
    log = lender_log(dom0_suite, name)
    assert re.search(r"evict", log) and re.search(r"page-in", log), log


@GUEST_TYPES
def test_real_xen_two_vcpus_write_through_revocation(dom0_suite: Dom0Run, kind: str) -> None:
    """Runs on the real hypervisor: bartest's churn, a writer thread pinned to each of the
    guest's two vCPUs, 8-byte self-checking records in 8 windows read back, while the lender
    revokes a resident window 10 times a second, moves half its page-ins and poisons freed
    VRAM: no record lost, torn or read from a revoked backing (poison), no access fell back to
    the failure policy, windows were revoked, faulted on and paged in under the writers, and
    at some moment both vCPUs waited on page-ins of their own (two outstanding at once in
    devmodel's events: the per-vCPU workers served them concurrently)."""
    name, guest_type = GUESTS[kind]
    account = check_churn(dom0_suite, name, guest_type, GIB, alone=False)
    assert most_page_ins_at_once(dom0_suite.devmodel_events(name)) >= 2, account
    print(account)


@GUEST_TYPES
def test_real_xen_revoke_everything_under_load(dom0_suite: Dom0Run, kind: str) -> None:
    """Runs on the real hypervisor: while both churn writers hammer BAR0, the host makes the
    lender revoke every resident window at once (SIGUSR1, again until one finds windows
    resident); devmodel answers every revoke, the lender says it evicted them before the
    writers stopped, and the churn's records all read back right (the churn test checks them;
    this one that the revoke-all happened under the writers)."""
    name, _ = served(dom0_suite, kind)
    watcher = watcher_log(dom0_suite, name)
    # The watcher sent SIGUSR1 until a revoke-all revoked something, and saw no "churned" line
    # from the guest once the lender said it had: the writers were still running.
    assert re.search(r"revoke-all: [1-9]\d* buffers revoked while churning", watcher), watcher
    evicted = [int(n) for n in re.findall(r"evicted everything: (\d+) buffers",
                                          lender_log(dom0_suite, name))]
    assert any(evicted), (evicted, watcher)
    churn = next(r for r in dom0_suite.results(name) if r.get("test") == "churn"
                 and r.get("summary"))
    assert churn["ok"] and churn["final"]["mismatches"] == 0, churn


@GUEST_TYPES
def test_real_xen_stopped_lender_gets_the_failure_policy(dom0_suite: Dom0Run, kind: str) -> None:
    """Runs on the real hypervisor, last in the chain: after the guest wrote a value, the lender
    evicts everything and is stopped (SIGSTOP); devmodel's liveness PING goes unanswered, it
    declares the lender lost (the guest sees BAR2's LENDER_LOSSES grow), and the guest's next
    read of the evicted value gets the failure policy straight away (all-ones, with the reason
    `the lender is gone`, not a page-in waiting out its deadline); BAR2 still answers."""
    name, _ = served(dom0_suite, kind)
    watch = dom0_suite.result(name, "watch")
    assert watch["ok"] and watch["saw_all_ones"] and watch["good_reads"] == 0, watch
    assert watch["pause_ended_by_counter"] is True, watch
    assert int(watch["bar2_magic_after"], 16) == MAGIC, watch
    assert watch["counters"]["lender_losses"] == 1, watch
    assert watch["counters"]["failed_accesses"] == 1, watch
    watcher = watcher_log(dom0_suite, name)
    assert "evicted everything (SIGUSR1), then stopped (SIGSTOP)" in watcher, watcher
    log = dom0_suite.devmodel_log(name)
    assert "lender connection ended: the lender did not answer a PING within 2 s" in log, log
    assert "read of 8 bytes at 0x2000 failed: the lender is gone" in log, log


@GUEST_TYPES
def test_real_xen_devmodel_stops_cleanly_after_the_guest(dom0_suite: Dom0Run, kind: str) -> None:
    """Runs on the real hypervisor: devmodel served the guest's two vCPUs on their own ports,
    noticed by itself that `xl destroy` ended its guest (xenstore's @releaseDomain watch) and
    stopped, saying once that the ioreq server was already gone, with no error or traceback
    in its log; its lender stopped too."""
    name, _ = served(dom0_suite, kind)
    rc, output = dom0_suite.step(f"{name}-stop")
    assert rc == 0, output
    log = dom0_suite.devmodel_log(name)
    assert re.search(r"ioreq server \d+ for domain \d+: 2 vCPU\(s\), PCI 0000:00:1e\.0", log), log
    gone = re.search(r"domain (\d+) is gone \(@releaseDomain\)", log)
    assert gone, log
    assert f"domain {gone[1]} ended: stopping" in log, log
    assert log.count("the ioreq server is already gone") == 1, log
    assert "stopped; counters: {" in log.strip().splitlines()[-1], log
    assert "ERROR" not in log and "Traceback" not in log, log
    assert "Traceback" not in lender_log(dom0_suite, name), lender_log(dom0_suite, name)


def test_real_xen_run_returns_the_commands_status(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: `run` exits with the status of the command dom0 ran (the
    number of dom0-ci's steps that failed), after dom0 powered the machine off."""
    steps = ["xl-info", "xl-list", "devmodel-handles", "ci-hvm", "ci-hvm-stop", "ci-pvh",
             "ci-pvh-stop"]
    failed = sum(dom0_suite.step(name)[0] != 0 for name in steps)
    assert dom0_suite.returncode == failed, dom0_suite.report()
    assert f"XENBED-EXIT {failed}" in dom0_suite.console
