"""A device backend over private memory: the PCI function without a lender or a transport."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from devmodel.aperture import OwnedMemory
from devmodel.backend import DeviceBackend
from devmodel.counters import DeviceCounters
from devmodel.pci.function import PciFunction
from devmodel.pci.identity import PciIdentity


@contextlib.contextmanager
def memory_backend(aperture: int) -> Iterator[DeviceBackend]:
    """A `DeviceBackend` whose BAR0 is `aperture` bytes of owned memory; all of it closed after."""
    function = PciFunction(PciIdentity(), OwnedMemory(aperture), DeviceCounters())
    backend = DeviceBackend(function)
    try:
        yield backend
    finally:
        backend.close()
        function.close()
        function.aperture.close()
