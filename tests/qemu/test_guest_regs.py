"""The guest reads the register block in BAR2."""

from __future__ import annotations

import pytest

from .testbed import GuestRun

pytestmark = pytest.mark.qemu


def test_guest_reads_register_block(guest: GuestRun) -> None:
    line = guest.line("regs")
    dwords = [int(d, 16) for d in line["dwords"]]
    assert line["bar2_size"] == 4096
    assert len(dwords) == 0x60 // 4
    # All-ones is what a failed (master-aborted) read returns.
    assert any(d != 0xFFFFFFFF for d in dwords)
