"""The guest reads BAR2's registers, decoded here with the device model's own layout."""

from __future__ import annotations

import pytest

from devmodel.aperture import DEFAULT_GRANULE
from devmodel.pci.registers import INTERFACE_VERSION, MAGIC, REGISTERS, Feature

from .testbed import (
    APERTURE,
    BOUNDARY_READS,
    BOUNDARY_WRITES,
    PATTERN_BYTES,
    TAIL_BYTES,
    GuestRun,
    fill_verify_accesses,
)

pytestmark = pytest.mark.qemu


def decode(line: dict[str, object]) -> dict[str, int]:
    """The registers the guest's dwords cover, by name."""
    dwords = line["dwords"]
    assert isinstance(dwords, list)
    raw = b"".join(int(d, 16).to_bytes(4, "little") for d in dwords)
    return {
        r.name: int.from_bytes(raw[r.offset:r.offset + r.width], "little")
        for r in REGISTERS
        if r.offset + r.width <= len(raw)
    }


def test_guest_reads_identification_registers(guest: GuestRun) -> None:
    regs = decode(guest.line("regs"))
    assert regs["MAGIC"] == MAGIC
    assert regs["VERSION"] == INTERFACE_VERSION
    assert regs["APERTURE_SIZE"] == APERTURE
    assert regs["GRANULE"] == DEFAULT_GRANULE
    defined = sum(int(f) for f in Feature)
    assert regs["FEATURES"] & ~defined == 0, "no undefined feature bits"


def test_guest_sees_exact_counters_of_its_own_accesses(guest: GuestRun) -> None:
    """The regs test runs after pattern and boundary, and nothing else touches BAR0."""
    regs = decode(guest.line("regs"))
    writes, reads = (BOUNDARY_WRITES, BOUNDARY_READS)
    for length in (PATTERN_BYTES, TAIL_BYTES):
        w, r = fill_verify_accesses(length)
        writes, reads = writes + w, reads + r
    assert (regs["TRAPPED_READS"], regs["TRAPPED_WRITES"]) == (reads, writes)
    assert regs["BAD_ACCESSES"] == regs["PROTOCOL_ERRORS"] == 0
    assert regs["PAGE_INS"] == regs["FAILED_ACCESSES"] == 0
    assert regs["CLIENT_CONNECTS"] == 1
    assert regs["RESETS"] >= 1, "QEMU resets the device when the machine starts"


def test_guest_8_byte_register_reads_match_4_byte_ones(guest: GuestRun) -> None:
    line = guest.line("regs")
    dwords = [int(d, 16) for d in line["dwords"]]
    qwords = [int(q, 16) for q in line["qwords"]]
    assert qwords == [lo | hi << 32 for lo, hi in zip(dwords[::2], dwords[1::2], strict=True)]


def test_guest_writes_scratch_register(guest: GuestRun) -> None:
    line = guest.line("regs")
    scratch = line["scratch"]
    assert scratch["read"] == scratch["wrote"]
    assert scratch["read_after"] == scratch["want_after"], "a 1-byte write lands in its lane"
    assert line["ok"] is True
