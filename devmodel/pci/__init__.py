"""The transport-neutral PCI function: identity, config space, BARs, registers, interrupts."""

from devmodel.pci.config_space import ConfigSpace
from devmodel.pci.errors import AccessError
from devmodel.pci.function import PciFunction
from devmodel.pci.identity import PciIdentity, parse_pci_id
from devmodel.pci.irqs import IRQ_FLAGS, IrqIndex, IrqInfoFlag, IrqSetFlag, IrqTable
from devmodel.pci.registers import Feature, RegisterBlock

__all__ = [
    "IRQ_FLAGS",
    "AccessError",
    "ConfigSpace",
    "Feature",
    "IrqIndex",
    "IrqInfoFlag",
    "IrqSetFlag",
    "IrqTable",
    "PciFunction",
    "PciIdentity",
    "RegisterBlock",
    "parse_pci_id",
]
