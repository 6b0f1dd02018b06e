"""The guest sees the devmodel PCI function as the design describes it."""

from __future__ import annotations

import pytest

from devmodel.pci.identity import PciIdentity
from devmodel.pci.registers import REGISTER_BAR_SIZE

from .testbed import APERTURE, GuestRun

pytestmark = pytest.mark.qemu


def test_guest_finds_function_with_its_identity(guest: GuestRun) -> None:
    ident = PciIdentity()
    line = guest.line("enumerate")
    assert int(line["vendor"], 16) == ident.vendor_id
    assert int(line["device"], 16) == ident.device_id
    assert int(line["subsystem_vendor"], 16) == ident.subsystem_vendor_id
    assert int(line["subsystem_device"], 16) == ident.subsystem_id
    assert int(line["class"], 16) == ident.class_code
    assert int(line["revision"], 16) == ident.revision


def test_guest_bar0_is_256m_64bit_prefetchable(guest: GuestRun) -> None:
    line = guest.line("enumerate")
    # Type bits of the BAR register itself: memory, 64-bit (10b), prefetchable.
    assert int(line["bar0_reg"], 16) & 0xF == 0xC
    bars = {bar["index"]: bar for bar in line["bars"]}
    bar0 = bars[0]
    assert bar0["size"] == APERTURE
    assert bar0["mem"] and bar0["mem64"] and bar0["prefetch"] and not bar0["io"]
    assert int(bar0["start"], 16) % APERTURE == 0, "a BAR is aligned to its size"
    # The upper half of the 64-bit BAR0 is not a BAR of its own.
    assert 1 not in bars or bars[1]["size"] == 0
    assert line["ok"] is True


def test_guest_bar2_is_a_4k_register_block(guest: GuestRun) -> None:
    bars = {bar["index"]: bar for bar in guest.line("enumerate")["bars"]}
    assert bars[2]["size"] == REGISTER_BAR_SIZE
    assert bars[2]["mem"] and not bars[2]["io"]


def test_guest_ran_every_test_and_powered_off(guest: GuestRun) -> None:
    assert not [r for r in guest.results if "parse_error" in r]
    start = guest.event("start")
    assert start is not None and start["slot"], "bartest found the function"
    end = guest.event("end")
    assert end is not None and end["status"] == 0, "bartest reported no failed test"
    assert guest.returncode == 0, "QEMU exits 0 when the guest powers off"


def test_device_model_exits_0_on_sigterm_after_the_guest(guest: GuestRun) -> None:
    assert guest.server_returncode == 0
