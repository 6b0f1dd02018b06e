"""The PCI function every transport drives: config space, BAR0 (the aperture), BAR2 (registers).

Transport-neutral on purpose: the vfio-user server maps REGION_READ/WRITE, config accesses,
DEVICE_RESET and SET_IRQS onto these calls; a Xen ioreq transport routes by `bar_address` and
does the same. Nothing here knows about sockets, messages or event channels.

Regions, by vfio PCI region index:

| index | what | size |
|---|---|---|
| 0 | BAR0: the aperture; 64-bit prefetchable memory (occupies BAR0 and BAR1) | aperture.size |
| 1 | upper half of BAR0, not a region of its own | 0 |
| 2 | BAR2: the register block (`registers.py`); 32-bit memory | 4 KiB |
| 3-5 | absent | 0 |
| 6 | expansion ROM: none | 0 |
| 7 | config space (conventional) | 256 |
| 8 | VGA: none | 0 |

Errors: every refused access raises `AccessError` and bumps `counters.bad_accesses`.
EINVAL for a bad size (not 1/2/4/8), a misaligned access, or a region that does not exist;
EFAULT for a well-formed access outside its region (and any config access beyond 256 bytes).

Interrupts: a BAR2 DOORBELL write calls `raise_interrupt`, which uses the mechanism config
space enables (MSI-X, MSI, else INTx as a level acknowledged in IRQ_STATUS). Over vfio-user it
signals a vector through `irqs` and the client emulates MSI and MSI-X; a transport that must
emulate them itself (Xen) sets `msi_output` and `intx_output` and gets messages and line levels.

The memory-space enable bit is deliberately not checked on BAR accesses: a client only sends
accesses for BARs it decodes, and checking would cost the hot path while risking a wedged
device if a client's view of the command register ever differed. Address-routed transports
use `bar_address`, which is None while decoding is off.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from devmodel.aperture import Aperture
from devmodel.counters import DeviceCounters
from devmodel.pci.config_space import (
    CONFIG_SPACE_SIZE,
    STS_INTERRUPT,
    BarSpec,
    ConfigSpace,
    MsixLayout,
)
from devmodel.pci.errors import AccessError
from devmodel.pci.identity import PciIdentity
from devmodel.pci.irqs import IrqIndex, IrqTable
from devmodel.pci.registers import (
    IRQ_STATUS_INTX,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    MSIX_VECTORS,
    REGISTER_BAR_SIZE,
    VALID_SIZES,
    Feature,
    RegisterBlock,
    shape_error,
)

__all__ = [
    "APERTURE_BAR",
    "NUM_REGIONS",
    "REGION_CONFIG",
    "REGION_ROM",
    "REGION_VGA",
    "REGISTER_BAR",
    "AccessError",
    "PciFunction",
]

APERTURE_BAR = 0
REGISTER_BAR = 2
REGION_ROM = 6
REGION_CONFIG = 7
REGION_VGA = 8
NUM_REGIONS = 9
MSI_VECTORS = 1
NO_FEATURES = Feature(0)


def _not_now(offset: int, size: int) -> None:
    """`read_now` of an aperture without one: every read is awaited."""


def _not_now_write(offset: int, data: bytes) -> bool:
    """`write_now` of an aperture without one: every write is awaited."""
    return False


class PciFunction:
    """One emulated function; BAR0 accesses are the hot path and are kept to a few int ops."""

    __slots__ = (
        "_aperture_read",
        "_aperture_read_now",
        "_aperture_write",
        "_aperture_write_now",
        "_bar0_size",
        "_bars",
        "_intx_asserted",
        "_intx_line",
        "aperture",
        "config",
        "counters",
        "identity",
        "intx_output",
        "irqs",
        "msi_output",
        "on_decode_change",
        "registers",
    )

    def __init__(
        self,
        identity: PciIdentity,
        aperture: Aperture,
        counters: DeviceCounters,
        *,
        features: Feature = NO_FEATURES,
    ) -> None:
        self.identity = identity
        self.aperture = aperture
        self.counters = counters
        self._bars = {
            APERTURE_BAR: BarSpec(APERTURE_BAR, aperture.size, is_64bit=True, prefetchable=True),
            REGISTER_BAR: BarSpec(
                REGISTER_BAR, REGISTER_BAR_SIZE, is_64bit=False, prefetchable=False
            ),
        }
        msix = MsixLayout(MSIX_VECTORS, REGISTER_BAR, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET)
        self.config = ConfigSpace(identity, tuple(self._bars.values()), msix)
        self.irqs = IrqTable(msi_vectors=MSI_VECTORS, msix_vectors=MSIX_VECTORS)
        self.registers = RegisterBlock(
            aperture.size,
            aperture.granule,
            features | Feature.MSI | Feature.MSIX,
            counters,
            self._msix_pending,
            doorbell=self.raise_interrupt,
            irq_status=self._irq_status,
            irq_ack=self._irq_ack,
        )
        # INTA# as the device drives it (the doorbell raises it, IRQ_STATUS clears it), and
        # the line as the guest's interrupt controller sees it (masked by the command register
        # and while MSI or MSI-X is on).
        self._intx_asserted = False
        self._intx_line = False
        # How interrupts leave the function. Unset (vfio-user): by vector, through `irqs`
        # (the client emulates the MSI and MSI-X capabilities and masks by detaching
        # eventfds). Set (Xen): the function is the guest's only MSI/MSI-X emulator, so it
        # composes each message from its capability or table entry, honours the masks and
        # keeps the PBA, and hands out (address, data); `intx_output` gets each change of
        # the INTx line.
        self.msi_output: Callable[[int, int], None] | None = None
        self.intx_output: Callable[[bool], None] | None = None
        # Called after a config write or reset that changed where a BAR decodes (an address,
        # or memory-space enable): address-routed transports (Xen) re-register their ranges.
        self.on_decode_change: Callable[[], None] | None = None
        # Bound once: the hot path must not look these up per access.
        self._bar0_size = aperture.size
        self._aperture_read = aperture.read
        self._aperture_read_now: Callable[[int, int], bytes | None] = getattr(
            aperture, "read_now", _not_now
        )
        self._aperture_write = aperture.write
        self._aperture_write_now: Callable[[int, bytes], bool] = getattr(
            aperture, "write_now", _not_now_write
        )

    def _msix_pending(self) -> int:
        return self.irqs.pending_bits(IrqIndex.MSIX)

    # --- describing regions --------------------------------------------------------------

    def region_size(self, bar: int) -> int:
        """Size of a BAR (0-5) or vfio region index (6 ROM, 7 config, 8 VGA); 0 if absent."""
        spec = self._bars.get(bar)
        if spec is not None:
            return spec.size
        return CONFIG_SPACE_SIZE if bar == REGION_CONFIG else 0

    @property
    def config_size(self) -> int:
        """Config space size: conventional 256 bytes (no extended space, no PCIe capability)."""
        return CONFIG_SPACE_SIZE

    def bar_is_64bit(self, bar: int) -> bool:
        spec = self._bars.get(bar)
        return spec is not None and spec.is_64bit

    def bar_is_prefetchable(self, bar: int) -> bool:
        spec = self._bars.get(bar)
        return spec is not None and spec.prefetchable

    def bar_is_io(self, bar: int) -> bool:
        """Always False: both BARs are memory; there is no I/O space to emulate."""
        return False

    def bar_address(self, bar: int) -> int | None:
        """Guest-programmed BAR address, or None if absent or memory decoding is off."""
        return self.config.bar_address(bar)

    # --- BAR accesses ----------------------------------------------------------------------

    async def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        """Read `size` bytes (1, 2, 4 or 8, naturally aligned) at `offset` in a BAR."""
        if bar == APERTURE_BAR:
            return await self.aperture_read(offset, size)
        if bar == REGISTER_BAR:
            return await self.register_read(offset, size)
        raise self._refused(bar, offset, size)

    async def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        """Write `data` (1, 2, 4 or 8 bytes, naturally aligned) at `offset` in a BAR."""
        if bar == APERTURE_BAR:
            await self.aperture_write(offset, data)
        elif bar == REGISTER_BAR:
            await self.register_write(offset, data)
        else:
            raise self._refused(bar, offset, len(data))

    # One method per BAR, so that a region table can call a BAR without an index to dispatch
    # on (devmodel/backend): BAR0's are the hot path of every trapped access.

    def aperture_read_now(self, offset: int, size: int) -> bytes | None:
        """BAR0 `aperture_read` when it needs no wait (a resident window): the bytes, counted;
        None when it must be awaited (it may wait, or is refused): nothing done, nothing
        counted, and the caller awaits `aperture_read`, which counts and refuses as ever."""
        if (
            size in VALID_SIZES
            and not offset & (size - 1)
            and 0 <= offset <= (self._bar0_size - size)
        ):
            data = self._aperture_read_now(offset, size)
            if data is not None:
                self.counters.trapped_reads += 1
            return data
        return None

    async def aperture_read(self, offset: int, size: int) -> bytes:
        """BAR0: `size` bytes (1, 2, 4 or 8, naturally aligned) of lent memory at `offset`."""
        if (
            size in VALID_SIZES
            and not offset & (size - 1)
            and 0 <= offset <= (self._bar0_size - size)
        ):
            self.counters.trapped_reads += 1
            return await self._aperture_read(offset, size)
        raise self._refused(APERTURE_BAR, offset, size)

    def aperture_write_now(self, offset: int, data: bytes) -> bool:
        """BAR0 `aperture_write` when it needs no wait (a resident writable window): True once
        written, counted; False when it must be awaited (it may wait, or is refused): nothing
        done, nothing counted, and the caller awaits `aperture_write`."""
        size = len(data)
        if (
            size in VALID_SIZES
            and not offset & (size - 1)
            and 0 <= offset <= (self._bar0_size - size)
            and self._aperture_write_now(offset, data)
        ):
            self.counters.trapped_writes += 1
            return True
        return False

    async def aperture_write(self, offset: int, data: bytes) -> None:
        """BAR0: `data` (1, 2, 4 or 8 bytes, naturally aligned) into lent memory at `offset`."""
        size = len(data)
        if (
            size in VALID_SIZES
            and not offset & (size - 1)
            and 0 <= offset <= (self._bar0_size - size)
        ):
            self.counters.trapped_writes += 1
            await self._aperture_write(offset, data)
            return
        raise self._refused(APERTURE_BAR, offset, size)

    async def register_read(self, offset: int, size: int) -> bytes:
        """BAR2: a register read (registers.py has the rules)."""
        try:
            return self.registers.read(offset, size)
        except AccessError:
            self.counters.bad_accesses += 1
            raise

    async def register_write(self, offset: int, data: bytes) -> None:
        """BAR2: a register write (registers.py has the rules)."""
        try:
            self.registers.write(offset, data)
        except AccessError:
            self.counters.bad_accesses += 1
            raise
        if offset >= MSIX_TABLE_OFFSET and self.msi_output is not None:
            self._deliver_pending_msix()

    def register_read_now(self, offset: int, size: int) -> bytes | None:
        """BAR2 `register_read` without a coroutine (registers never wait); None when refused,
        uncounted: the caller then awaits `register_read`, which counts and raises."""
        try:
            return self.registers.read(offset, size)
        except AccessError:
            return None

    def register_write_now(self, offset: int, data: bytes) -> bool:
        """BAR2 `register_write` without a coroutine; False when refused, uncounted (the
        caller then awaits `register_write`). A refused write changes nothing (registers.py
        checks the shape first)."""
        try:
            self.registers.write(offset, data)
        except AccessError:
            return False
        if offset >= MSIX_TABLE_OFFSET and self.msi_output is not None:
            self._deliver_pending_msix()
        return True

    def _refused(self, bar: int, offset: int, size: int) -> AccessError:
        """Count a refused BAR access and build its error (the slow path, off the hot one)."""
        self.counters.bad_accesses += 1
        if bar != APERTURE_BAR:
            return AccessError(errno.EINVAL, f"no memory BAR {bar}")
        error = shape_error(offset, size, self._bar0_size, "BAR0")
        return error or AccessError(errno.EINVAL, f"BAR0: refused {size} bytes at {offset:#x}")

    # --- config space ----------------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> bytes:
        """Any offset and size within the 256 bytes; EFAULT beyond them."""
        try:
            return self.config.read(offset, size)
        except AccessError:
            self.counters.bad_accesses += 1
            raise

    def config_write(self, offset: int, data: bytes) -> None:
        """Write through the config masks; read-only bits never change and never raise."""
        before = self._decode_state()
        try:
            self.config.write(offset, data)
        except AccessError:
            self.counters.bad_accesses += 1
            raise
        self._notify_if_changed(before)
        # The command register (INTx disable, bus mastering) or an MSI/MSI-X enable or mask
        # may have changed what an interrupt does now.
        self._update_intx()
        if self.msi_output is not None:
            self._deliver_pending_msix()

    def _decode_state(self) -> tuple[int | None, ...]:
        return tuple(self.config.bar_address(bar) for bar in self._bars)

    def _notify_if_changed(self, before: tuple[int | None, ...]) -> None:
        if self.on_decode_change is not None and self._decode_state() != before:
            self.on_decode_change()

    # --- lifetime and interrupts ---------------------------------------------------------

    def reset(self) -> None:
        """DEVICE_RESET / FLR: power-on config and registers, aperture contents discarded.

        Counts in `counters.resets` (transports should not count it again). IRQ eventfds
        survive, masks and pending interrupts do not (see irqs.py); INTx is deasserted.
        """
        before = self._decode_state()
        self.config.reset()
        self.registers.reset()
        self.irqs.reset()
        self._intx_asserted = False
        self._update_intx()
        self.aperture.reset()
        self.counters.resets += 1
        self._notify_if_changed(before)

    def raise_interrupt(self, vector: int = 0) -> bool:
        """Signal the guest with whatever its driver enabled; True if it went out at once.

        MSI-X if enabled (vector selects the entry), else MSI (vector 0), else INTx (vector
        0): a level, asserted until software acknowledges it in IRQ_STATUS, masked (not
        forgotten) while the command register disables INTx; True while the line is driven.
        MSI and MSI-X need bus mastering, as on real hardware. A vector the mechanism lacks,
        or a message without bus mastering, raises nothing and is not counted. Masking beyond
        that is the client's over vfio-user (QEMU detaches eventfds), the function's own when
        `msi_output` is set (a masked vector is left pending in the PBA).
        """
        config = self.config
        if config.msix_enabled:
            if not (0 <= vector < MSIX_VECTORS and config.bus_master_enabled):
                return False
            self.counters.interrupts += 1
            if self.msi_output is None:
                return self.irqs.trigger(IrqIndex.MSIX, vector)
            self.irqs.mark_pending(IrqIndex.MSIX, vector)
            return self._deliver_msix(vector)
        if vector != 0:
            return False
        if config.msi_enabled:
            if not config.bus_master_enabled:
                return False
            self.counters.interrupts += 1
            if self.msi_output is None:
                return self.irqs.trigger(IrqIndex.MSI, 0)
            self.msi_output(*config.msi_message())
            return True
        self.counters.interrupts += 1
        self._intx_asserted = True
        config.set_status(STS_INTERRUPT)
        self._update_intx()
        return self._intx_line

    @property
    def intx_asserted(self) -> bool:
        """Whether the device holds INTA# up (IRQ_STATUS bit 0)."""
        return self._intx_asserted

    def _irq_status(self) -> int:
        return IRQ_STATUS_INTX if self._intx_asserted else 0

    def _irq_ack(self, bits: int) -> None:
        """IRQ_STATUS written: a 1 in bit 0 deasserts INTx."""
        if bits & IRQ_STATUS_INTX and self._intx_asserted:
            self._intx_asserted = False
            self.config.clear_status(STS_INTERRUPT)
            self._update_intx()

    def _update_intx(self) -> None:
        """Drive the INTx line from the device's level and what config space allows."""
        config = self.config
        line = (
            self._intx_asserted
            and not config.intx_disabled
            and not config.msi_enabled
            and not config.msix_enabled
        )
        if line == self._intx_line:
            return
        self._intx_line = line
        if self.intx_output is not None:
            self.intx_output(line)
        else:
            self.irqs.set_level(IrqIndex.INTX, 0, line)

    def _deliver_msix(self, vector: int) -> bool:
        """Message model: send a pending MSI-X vector unless a mask holds it (then it stays
        pending, visible in the PBA, and goes out when unmasked)."""
        config = self.config
        address, data, masked = self.registers.msix_entry(vector)
        if masked or config.msix_function_masked or not config.bus_master_enabled:
            return False
        assert self.msi_output is not None
        self.irqs.clear_pending(IrqIndex.MSIX, vector)
        self.msi_output(address, data)
        return True

    def _deliver_pending_msix(self) -> None:
        """Message model: a table entry, the function mask or bus mastering changed."""
        if not self.config.msix_enabled:
            return
        pending = self.irqs.pending_bits(IrqIndex.MSIX)
        vector = 0
        while pending:
            if pending & 1:
                self._deliver_msix(vector)
            pending >>= 1
            vector += 1

    def close(self) -> None:
        """Release the IRQ eventfds. The aperture belongs to whoever created it."""
        self.irqs.close()
