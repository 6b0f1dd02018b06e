"""`devmodel run`'s options reach the guest: another PCI ID, a BAR0 too big for 32-bit space."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .testbed import DevmodelServer, GuestRun

pytestmark = pytest.mark.qemu

BIG_APERTURE = 1 << 30


def test_guest_sees_configured_id_and_1g_aperture(
    start_devmodel: Callable[..., DevmodelServer], boot: Callable[..., GuestRun], transport: str
) -> None:
    server = start_devmodel(aperture_size="1G", pci_id="1234:beef", transport=transport)
    run = boot(["enumerate", "boundary"], server=server, append="devmodel.pciid=1234:beef")
    line = run.line("enumerate")
    assert (line["vendor"], line["device"]) == ("0x1234", "0xbeef")
    bar0 = next(bar for bar in line["bars"] if bar["index"] == 0)
    assert bar0["size"] == BIG_APERTURE and bar0["mem64"] and bar0["prefetch"]
    assert int(bar0["start"], 16) % BIG_APERTURE == 0
    boundary = run.line("boundary")
    assert boundary["bar_size"] == BIG_APERTURE
    assert boundary["failed"] == [] and boundary["ok"] is True
    end = run.event("end")
    assert end is not None and end["status"] == 0
