"""The guest's kernel sees the device's interrupts: INTx through uio_pci_generic.

bartest's irq test (qemu-configs/guest/bartest.c) binds the function to uio_pci_generic, the
kernel's generic driver for PCI 2.3 INTx masking, rings BAR2's DOORBELL and waits on /dev/uioN
for each interrupt; it runs in the shared single-vCPU guest, so over both vfio-user transports.
"""

from __future__ import annotations

import pytest

from .testbed import GuestRun

pytestmark = pytest.mark.qemu

ROUNDS = 5  # bartest's default devmodel.irqs


def test_guest_receives_each_doorbell_interrupt_once(guest: GuestRun) -> None:
    line = guest.line("irq")
    assert line.get("error") is None, line
    assert line["received"] == ROUNDS
    # uio's count after each round: one interrupt per doorbell, none lost, no storm.
    assert line["icounts"] == list(range(1, ROUNDS + 1))
    assert line["ok"] is True


def test_guest_handler_saw_interrupt_status_and_masked_the_pin(guest: GuestRun) -> None:
    """uio_pci_generic claims the interrupt only when config status' Interrupt Status bit is
    set and masks it with Interrupt Disable; IRQ_STATUS clears both once acknowledged."""
    line = guest.line("irq")
    assert line["flagged"] == ROUNDS
    assert line["cleared"] == ROUNDS


def test_doorbell_while_the_pin_is_masked_is_held_then_delivered(guest: GuestRun) -> None:
    """Rung with Interrupt Disable set: the device asserts (status bits set), and clearing
    Interrupt Disable delivers it, once (uio's count is then ROUNDS + 1)."""
    line = guest.line("irq")
    assert line["masked_held"] is True
    assert line["masked_delivered"] is True


def test_device_counted_the_interrupts_it_raised(guest: GuestRun) -> None:
    line = guest.line("irq")
    raised = ROUNDS + 1  # the rounds and the masked doorbell
    assert line["interrupts_after"] - line["interrupts_before"] == raised
    assert guest.server is not None
    counters = guest.server.counters()
    assert counters is not None, "the device model did not stop cleanly"
    # The same guest runs the msi test afterwards (test_guest_msi.py): its interrupts too.
    msi = guest.line("msi")
    assert counters["interrupts"] == raised + msi["interrupts_after"] - msi["interrupts_before"]
