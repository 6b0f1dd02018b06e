"""Numbers the vfio-user specification and <linux/vfio.h> define.

Flag words stay plain integers (masked where read) rather than flag enums: an enum silently
drops or rejects bits we have not heard of, and a strict parser must see them.
"""

from __future__ import annotations

import enum
import struct
from typing import Final


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# Commands the server sends and the client answers; every other command goes the other way.
SERVER_TO_CLIENT: Final = frozenset({Command.DMA_READ, Command.DMA_WRITE})

HEADER: Final = struct.Struct("<HHIII")
HEADER_SIZE: Final = HEADER.size

TYPE_MASK: Final = 0x0F
TYPE_COMMAND: Final = 0
TYPE_REPLY: Final = 1
FLAG_NO_REPLY: Final = 0x10
FLAG_ERROR: Final = 0x20
KNOWN_HEADER_FLAGS: Final = TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR

# DMA_MAP / DMA_UNMAP
DMA_READ_FLAG: Final = 1 << 0
DMA_WRITE_FLAG: Final = 1 << 1
DMA_UNMAP_ALL: Final = 1 << 1

# DEVICE_GET_INFO
DEVICE_FLAGS_RESET: Final = 1 << 0
DEVICE_FLAGS_PCI: Final = 1 << 1

# DEVICE_GET_REGION_INFO
REGION_INFO_FLAG_READ: Final = 1 << 0
REGION_INFO_FLAG_WRITE: Final = 1 << 1
REGION_INFO_FLAG_MMAP: Final = 1 << 2
REGION_INFO_FLAG_CAPS: Final = 1 << 3
REGION_INFO_CAP_SPARSE_MMAP: Final = 1
REGION_INFO_CAP_TYPE: Final = 2

# DEVICE_GET_REGION_IO_FDS
IO_FD_TYPE_IOEVENTFD: Final = 0
IO_FD_TYPE_IOREGIONFD: Final = 1

# DEVICE_GET_IRQ_INFO
IRQ_INFO_EVENTFD: Final = 1 << 0
IRQ_INFO_MASKABLE: Final = 1 << 1
IRQ_INFO_AUTOMASKED: Final = 1 << 2
IRQ_INFO_NORESIZE: Final = 1 << 3

# DEVICE_SET_IRQS
IRQ_SET_DATA_NONE: Final = 1 << 0
IRQ_SET_DATA_BOOL: Final = 1 << 1
IRQ_SET_DATA_EVENTFD: Final = 1 << 2
IRQ_SET_DATA_MASK: Final = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK: Final = 1 << 3
IRQ_SET_ACTION_UNMASK: Final = 1 << 4
IRQ_SET_ACTION_TRIGGER: Final = 1 << 5
IRQ_SET_ACTION_TYPE_MASK: Final = (
    IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER
)

# DEVICE_FEATURE
DEVICE_FEATURE_MASK: Final = 0xFFFF
DEVICE_FEATURE_GET: Final = 1 << 16
DEVICE_FEATURE_SET: Final = 1 << 17
DEVICE_FEATURE_PROBE: Final = 1 << 18


class PciRegion(enum.IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_REGIONS: Final = 9


class PciIrq(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS: Final = 5

# Defaults the specification gives for capabilities a peer leaves out.
DEFAULT_MAX_MSG_FDS: Final = 1
DEFAULT_MAX_DATA_XFER_SIZE: Final = 1 << 20
DEFAULT_MAX_DMA_MAPS: Final = 65535
DEFAULT_PGSIZES: Final = 4096
