"""The device backend every transport calls: the PCI function's regions on one bus."""

from devmodel.backend.bus import MappedRange, Region, RegionBus
from devmodel.backend.device import DeviceBackend, backend_for

__all__ = ["DeviceBackend", "MappedRange", "Region", "RegionBus", "backend_for"]
