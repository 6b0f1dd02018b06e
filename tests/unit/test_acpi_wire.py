"""devmodel_wire.acpi: the SSDT, root tables and RSDP devmodel gives a PVH guest. Round trips,
checksums that always hold, parsers that raise nothing but ProtocolError on any bytes, and
ACPICA's own disassembler (iasl, Debian's acpica-tools) reading the SSDT back."""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmodel_wire.acpi import (
    RSDP_SIGNATURE,
    AcpiError,
    MemoryWindow,
    PciRoot,
    checksum_ok,
    decode_pkg_length,
    eisa_id,
    encode_rsdt,
    encode_table,
    encode_xsdt,
    parse_root_table,
    parse_rsdp,
    parse_table_header,
    pci_root_crs,
    pci_root_ssdt,
    pkg_length,
    rewrite_rsdp,
)
from pyvfio_user.errors import ProtocolError

U32 = st.integers(0, (1 << 32) - 1)
U64 = st.integers(0, (1 << 64) - 1)
ROOT = PciRoot(
    windows=(MemoryWindow(0xF0000000, 0x0B000000), MemoryWindow(256 << 30, 256 << 30, True))
)


def rsdp_bytes(revision: int, rsdt: int, xsdt: int) -> bytes:
    """An RSDP as firmware writes it (the spec's layout, written out here independently)."""
    out = bytearray(36 if revision >= 2 else 20)
    out[0:8] = RSDP_SIGNATURE
    out[9:15] = b"Xen   "
    out[15] = revision
    out[16:20] = rsdt.to_bytes(4, "little")
    out[8] = -sum(out[:20]) & 0xFF
    if revision >= 2:
        out[20:24] = (36).to_bytes(4, "little")
        out[24:32] = xsdt.to_bytes(8, "little")
        out[32] = -sum(out) & 0xFF
    return bytes(out)


def test_eisa_id_of_a_pci_root_is_the_one_every_firmware_uses() -> None:
    # PNP0A03 is 0x030AD041 in every DSDT (QEMU's, hvmloader's).
    assert eisa_id("PNP0A03") == 0x030AD041
    with pytest.raises(ValueError):
        eisa_id("pnp0a03")


@given(st.integers(0, (1 << 28) - 5))
def test_pkg_length_round_trips_and_counts_itself(content: int) -> None:
    encoded = pkg_length(content)
    value, used = decode_pkg_length(encoded + bytes(4))
    assert used == len(encoded)
    assert value == content + len(encoded)
    assert len(encoded) == 1 or value > 0x3F  # the shortest form


@given(st.lists(U64, max_size=40), st.lists(U32, max_size=40))
def test_root_tables_round_trip_with_valid_checksums(xs: list[int], rs: list[int]) -> None:
    xsdt = encode_xsdt(xs)
    assert checksum_ok(xsdt) and parse_root_table(xsdt + b"junk", 8) == xs
    rsdt = encode_rsdt(rs, parse_table_header(xsdt))
    assert checksum_ok(rsdt) and parse_root_table(rsdt, 4) == rs
    assert parse_table_header(rsdt).oem_id == parse_table_header(xsdt).oem_id


@given(st.sampled_from([0, 2]), U32, U64, U32, U64)
def test_rsdp_rewrite_keeps_both_checksums_valid(
    revision: int, rsdt: int, xsdt: int, new_rsdt: int, new_xsdt: int
) -> None:
    old = rsdp_bytes(revision, rsdt, xsdt)
    assert parse_rsdp(old).rsdt_address == rsdt
    new = rewrite_rsdp(
        old, rsdt_address=new_rsdt, xsdt_address=new_xsdt if revision >= 2 else None
    )
    assert len(new) == len(old) and checksum_ok(new[:20])
    parsed = parse_rsdp(new)
    assert parsed.rsdt_address == new_rsdt and parsed.revision == revision
    if revision >= 2:
        assert checksum_ok(new[:36]) and parsed.xsdt_address == new_xsdt
    assert new[9:15] == old[9:15]


@given(st.binary(max_size=80))
def test_parsers_raise_only_protocol_errors_on_random_bytes(data: bytes) -> None:
    for parse in (
        parse_rsdp,
        parse_table_header,
        lambda d: parse_root_table(d, 8),
        lambda d: parse_root_table(d, 4),
        decode_pkg_length,
    ):
        with contextlib.suppress(ProtocolError):
            parse(data)


@given(st.binary(min_size=36, max_size=36), st.integers(0, 35), st.integers(1, 255))
def test_a_damaged_rsdp_is_refused(tail: bytes, at: int, flip: int) -> None:
    good = bytearray(rsdp_bytes(2, 0x1234, 0xFC001000))
    good[at] ^= flip
    with pytest.raises(AcpiError):
        parse_rsdp(bytes(good))


def test_tables_are_refused_when_short_or_misnamed() -> None:
    xsdt = encode_xsdt([1, 2])
    with pytest.raises(AcpiError, match="runs past"):
        parse_root_table(xsdt[:-1], 8)
    with pytest.raises(AcpiError, match="expected RSDT"):
        parse_root_table(xsdt, 4)
    bad = bytearray(xsdt)
    bad[40] ^= 1
    with pytest.raises(AcpiError, match="checksum"):
        parse_root_table(bytes(bad), 8)
    with pytest.raises(AcpiError):
        parse_table_header(encode_table(b"SSDT", b"", revision=2)[:35])


def test_the_resource_template_ends_with_a_checksum_that_sums_to_zero() -> None:
    crs = pci_root_crs(ROOT)
    assert crs[-2] == 0x79 and checksum_ok(crs)
    # WordBusNumber 0-0, IO 0xcf8 x 8, DWordMemory, QWordMemory, end tag.
    assert crs[0] == 0x88 and crs[16] == 0x47 and crs[24] == 0x87 and crs[50] == 0x8A
    assert len(crs) == 16 + 8 + 26 + 46 + 2


@given(
    st.lists(
        st.tuples(st.integers(0, (1 << 40) - 1), st.integers(1, 1 << 40), st.booleans()),
        max_size=4,
    )
)
def test_any_windows_give_a_valid_ssdt(windows: list[tuple[int, int, bool]]) -> None:
    root = PciRoot(windows=tuple(MemoryWindow(b, s, p) for b, s, p in windows))
    ssdt = pci_root_ssdt(root)
    header = parse_table_header(ssdt)
    assert header.signature == b"SSDT" and header.length == len(ssdt) and checksum_ok(ssdt)
    for b, s, _ in windows:
        fmt = "<II" if b + s - 1 < 1 << 32 else "<QQ"
        assert struct.pack(fmt, b, b + s - 1) in ssdt


def test_iasl_disassembles_the_ssdt(tmp_path: Path) -> None:
    """ACPICA's disassembler (the reference AML reader) finds the PCI root and its windows.
    scripts/setup-env installs it (Debian's acpica-tools)."""
    iasl = shutil.which("iasl")
    assert iasl is not None, "iasl is missing: run scripts/setup-env (acpica-tools)"
    aml = tmp_path / "ssdt.aml"
    aml.write_bytes(pci_root_ssdt(ROOT))
    run = subprocess.run([iasl, "-d", str(aml)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    dsl = (tmp_path / "ssdt.dsl").read_text()
    for expected in (
        "Scope (\\_SB)",
        "Device (PCI0)",
        'EisaId ("PNP0A03")',
        "Name (_SEG, Zero)",
        "Name (_BBN, Zero)",
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,",
        "0x0CF8,",
        "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
        "0xF0000000,         // Range Minimum",
        "0xFAFFFFFF,         // Range Maximum",
        "QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Prefetchable, ReadWrite,",
        "0x0000004000000000, // Range Minimum",
        "0x0000007FFFFFFFFF, // Range Maximum",
    ):
        assert expected in dsl, dsl
