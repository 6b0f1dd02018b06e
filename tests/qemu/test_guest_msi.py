"""The guest's kernel receives the device's MSI and MSI-X messages, one per doorbell.

bartest's msi test (qemu-configs/guest/bartest.c) is the driver: Debian's kernels have no
VFIO_NOIOMMU, so no stock module lets userspace make the kernel enable MSI on this function.
It programs the MSI capability (sysfs `config`) and the MSI-X table (BAR2) itself, aimed at x86
system vectors whose handlers only count (KVM's posted-interrupt vectors and the APIC error
vector: PIN, PIW, NPI, ERR in /proc/interrupts), and rings BAR2's DOORBELL. Over vfio-user QEMU
emulates both capabilities and devmodel signals the eventfds QEMU attached with SET_IRQS; the
shared single-vCPU guest runs it after irq, so over both vfio-user transports.
"""

from __future__ import annotations

from typing import Any

import pytest

from .testbed import GuestRun

pytestmark = pytest.mark.qemu

ROUNDS = 5  # bartest's default devmodel.irqs: MSI doorbells
MSIX_RUNG = [1, 2, 3, 4]  # MSI-X entry v is rung v + 1 times
TARGETS = ["PIN", "PIW", "NPI", "ERR"]


def msi_line(guest: GuestRun) -> dict[str, Any]:
    line = guest.line("msi")
    assert line.get("error") is None, line
    assert [t["counter"] for t in line["targets"]] == TARGETS, line
    return line


def test_guest_receives_each_msi_once(guest: GuestRun) -> None:
    """MSI (one message, at the first target): each doorbell arrives once, nothing else
    moves."""
    line = msi_line(guest)
    assert line["msi_cap"] == "0x40", line
    assert line["msi_received"] == line["msi_rounds"] == ROUNDS, line
    assert line["msi_counts"] == [ROUNDS, 0, 0, 0], line


def test_guest_receives_each_msix_vector_at_its_own_target(guest: GuestRun) -> None:
    """MSI-X: entry v's doorbells arrive at target v only, as many as were rung; the masked
    doorbell (entry 1) is in the phase's counts once delivered."""
    line = msi_line(guest)
    assert line["msix_cap"] == "0x50" and line["msix_entries"] == 4, line
    assert line["msix_rung"] == line["msix_received"] == sum(MSIX_RUNG), line
    assert line["msix_counts"] == [1, 2 + 1, 3, 4], line


def test_masked_msix_vector_is_held_then_delivered(guest: GuestRun) -> None:
    """A doorbell for a masked entry is not delivered; unmasking delivers it, once (the exact
    counts below would show a late or a second delivery). QEMU emulates the PBA, and while the
    entry is masked it detaches the vector's eventfd (SET_IRQS with no fd): devmodel then holds
    the interrupt pending in its own IRQ table and signals it when QEMU attaches the eventfd
    again at the unmask, so QEMU's PBA, which the guest reads, stays clear throughout."""
    line = msi_line(guest)
    assert line["masked_held"] is True, line
    assert line["masked_delivered"] is True, line
    assert line["masked_pba"] == line["pba_after"] == "0x0", line


def test_every_target_counted_exactly_its_interrupts(guest: GuestRun) -> None:
    line = msi_line(guest)
    assert line["counts"] == line["expected"] == [ROUNDS + 1, 2 + 1, 3, 4], line
    assert line["ok"] is True, line


def test_device_counted_the_messages_it_raised(guest: GuestRun) -> None:
    """BAR2's INTERRUPTS counted every MSI and MSI-X doorbell (the masked one once)."""
    line = msi_line(guest)
    assert line["interrupts_after"] - line["interrupts_before"] == ROUNDS + sum(MSIX_RUNG) + 1
