"""bartest.c repeats a few BAR2 offsets (the counters it reports); they must match the device's.

Not a qemu test: it only reads the C source, so it runs with the fast tests and catches a
register move before any guest is booted.
"""

from __future__ import annotations

import re

from devmodel.pci.registers import REGISTER_BY_NAME

from .testbed import QEMU_CONFIGS

BARTEST = QEMU_CONFIGS / "guest" / "bartest.c"


def test_bartest_counter_offsets_match_the_register_layout() -> None:
    source = BARTEST.read_text()
    table = source[source.index("} counters[] = {"):]
    table = table[:table.index("};")]
    entries = re.findall(r'\{"(\w+)", (0x[0-9a-fA-F]+)\}', table)
    assert len(entries) >= 8
    for name, offset in entries:
        register = REGISTER_BY_NAME[name.upper()]
        assert (register.offset, register.width) == (int(offset, 16), 8), name
    granule = re.search(r"#define GRANULE_REG (0x[0-9a-fA-F]+)u", source)
    assert granule is not None
    assert REGISTER_BY_NAME["GRANULE"].offset == int(granule.group(1), 16)


def test_bartest_interrupt_register_offsets_match_the_register_layout() -> None:
    source = BARTEST.read_text()
    for name in ("INTERRUPTS", "DOORBELL", "IRQ_STATUS"):
        define = re.search(rf"#define {name}_REG (0x[0-9a-fA-F]+)u", source)
        assert define is not None, name
        assert REGISTER_BY_NAME[name].offset == int(define.group(1), 16), name
