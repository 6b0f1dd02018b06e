"""Interrupt signalling with VFIO_DEVICE_SET_IRQS semantics, independent of any wire.

The vfio-user server hands `set_irqs` the decoded request and the SCM_RIGHTS descriptors; a Xen
transport can drive the same table from its own interrupt plumbing. The device raises an
interrupt with `trigger`, which writes 1 to the vector's eventfd.

Indexes and what `info` reports (mirroring Linux vfio-pci, so clients take their usual paths):

| index | vectors | flags | why |
|---|---|---|---|
| INTX (0) | 1 | EVENTFD, MASKABLE, AUTOMASKED | level: masked after each trigger until UNMASK |
| MSI (1) | 1 | EVENTFD, NORESIZE | matches the MSI capability (one vector) |
| MSIX (2) | table size | EVENTFD, NORESIZE | QEMU masks a vector by detaching its eventfd |
| ERR (3) | 0 | EVENTFD, NORESIZE | conventional PCI, no AER to report |
| REQ (4) | 1 | EVENTFD, NORESIZE | lets the device model ask the client to release the device |

Deliberate choices:
- DATA_EVENTFD with count N takes either N descriptors or none. None means "detach these
  vectors" (fd -1 in the ioctl): QEMU's client sends runs of -1 as a message without
  descriptors, and does so whenever a guest masks or releases an MSI-X vector.
- A trigger that cannot be delivered (vector masked, or no eventfd attached) leaves the vector
  pending; unmasking it or attaching an eventfd delivers it once. `clear_pending` withdraws it.
  This is what lets the PBA mean something and keeps an interrupt from being lost while QEMU
  has a vector detached.
- Ownership: on success the table owns every descriptor passed to `set_irqs` and closes the
  ones it replaces; if `set_irqs` raises, the caller still owns them all.
- No exclusivity between INTx, MSI and MSI-X is enforced: the client (QEMU) disables one before
  enabling another, and the device picks the mechanism from config space when it raises one.
- `reset` (DEVICE_RESET) clears masks and pending state but keeps eventfds: QEMU tears
  interrupts down before a reset and sets them up again after, so either way is consistent.
- INTx is a level (`set_level`), as a PCI interrupt pin is, signalled the way Linux vfio-pci
  signals it: the eventfd fires when the line rises, the vector is then masked (AUTOMASKED)
  until the client unmasks it (QEMU does after the guest's EOI, which it infers from the
  guest's next BAR access), and an unmask while the line is still asserted fires again. A
  line that falls before the unmask fires nothing more. The client never learns of a falling
  edge: it deasserts its own copy at EOI, and the re-fire tells it the line is still up.
- A transport whose library keeps the eventfds itself (libvfio-user) sets `external`: the
  table then keeps masks, levels and pending bits as ever but signals through that call, which
  says whether the interrupt went out (False: left pending, as with no eventfd attached).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from types import MappingProxyType

from devmodel.pci.errors import AccessError


class IrqIndex(IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class IrqInfoFlag(IntFlag):
    """VFIO_IRQ_INFO_* (the flags of DEVICE_GET_IRQ_INFO)."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlag(IntFlag):
    """VFIO_IRQ_SET_* (the flags of DEVICE_SET_IRQS)."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


DATA_TYPE_MASK = 0b000111
ACTION_TYPE_MASK = 0b111000

# Every flag by its vfio name, for transports and the REPL that deal in plain integers.
IRQ_FLAGS: Mapping[str, int] = MappingProxyType(
    {f"VFIO_IRQ_INFO_{f.name}": int(f) for f in IrqInfoFlag}
    | {f"VFIO_IRQ_SET_{f.name}": int(f) for f in IrqSetFlag}
)

_EVENTFD_ONE = (1).to_bytes(8, "little")


@dataclass(frozen=True, slots=True)
class IrqIndexSpec:
    index: IrqIndex
    count: int
    flags: IrqInfoFlag

    @property
    def maskable(self) -> bool:
        return bool(self.flags & IrqInfoFlag.MASKABLE)

    @property
    def automasked(self) -> bool:
        return bool(self.flags & IrqInfoFlag.AUTOMASKED)


def irq_specs(msi_vectors: int, msix_vectors: int) -> tuple[IrqIndexSpec, ...]:
    """The index table; vector counts must match the MSI and MSI-X capabilities."""
    plain = IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE
    return (
        IrqIndexSpec(
            IrqIndex.INTX, 1, IrqInfoFlag.EVENTFD | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED
        ),
        IrqIndexSpec(IrqIndex.MSI, msi_vectors, plain),
        IrqIndexSpec(IrqIndex.MSIX, msix_vectors, plain),
        IrqIndexSpec(IrqIndex.ERR, 0, plain),
        IrqIndexSpec(IrqIndex.REQ, 1, plain),
    )


def _einval(reason: str) -> AccessError:
    return AccessError(errno.EINVAL, reason)


# (table, index, start, count, DATA_BOOL bytes or None, fds)
_Operation = Callable[["IrqTable", int, int, int, bytes | None, Sequence[int]], None]


class IrqTable:
    """Per-vector eventfd, mask and pending state for every interrupt index."""

    __slots__ = (
        "_asserted",
        "_fds",
        "_masked",
        "_pending",
        "_unmask_fds",
        "external",
        "signal_errors",
        "specs",
    )

    def __init__(self, msi_vectors: int = 1, msix_vectors: int = 4) -> None:
        self.specs = irq_specs(msi_vectors, msix_vectors)
        self._fds = [[-1] * spec.count for spec in self.specs]
        self._masked = [[False] * spec.count for spec in self.specs]
        self._pending = [[False] * spec.count for spec in self.specs]
        # Level-triggered vectors (INTx) whose line the device holds up (see `set_level`).
        self._asserted = [[False] * spec.count for spec in self.specs]
        # Signals instead of the eventfds when set (see the module docstring).
        self.external: Callable[[int, int], bool] | None = None
        # ACTION_UNMASK|DATA_EVENTFD (vfio's resample fd): the client signals it to unmask.
        # The table only keeps it; the transport waits on it and calls `unmask`
        # (devmodel/transports/intx_unmask.py).
        self._unmask_fds = [-1] * len(self.specs)
        # Eventfd writes that failed other than with EAGAIN (a client passed something odd).
        self.signal_errors = 0

    # --- queries -------------------------------------------------------------------------

    @property
    def num_indexes(self) -> int:
        return len(self.specs)

    def _spec(self, index: int) -> IrqIndexSpec:
        if not 0 <= index < len(self.specs):
            raise _einval(f"no IRQ index {index} (the device has {len(self.specs)})")
        return self.specs[index]

    def _vector(self, index: int, vector: int) -> IrqIndexSpec:
        spec = self._spec(index)
        if not 0 <= vector < spec.count:
            raise _einval(f"IRQ index {spec.index.name} has no vector {vector}")
        return spec

    def info(self, index: int) -> tuple[int, int]:
        """(VFIO_IRQ_INFO flags, vector count) for DEVICE_GET_IRQ_INFO."""
        spec = self._spec(index)
        return int(spec.flags), spec.count

    def eventfd(self, index: int, vector: int) -> int:
        """The trigger eventfd attached to a vector, or -1."""
        self._vector(index, vector)
        return self._fds[index][vector]

    def unmask_eventfd(self, index: int) -> int:
        """The eventfd a client signals to unmask the index (INTx only), or -1."""
        self._spec(index)
        return self._unmask_fds[index]

    def masked(self, index: int, vector: int) -> bool:
        self._vector(index, vector)
        return self._masked[index][vector]

    def pending(self, index: int, vector: int) -> bool:
        self._vector(index, vector)
        return self._pending[index][vector]

    def pending_bits(self, index: int) -> int:
        """Pending vectors as a bitmap (bit n = vector n): the MSI-X PBA's contents."""
        self._spec(index)
        return sum(1 << v for v, p in enumerate(self._pending[index]) if p)

    # --- the device side -----------------------------------------------------------------

    def trigger(self, index: int, vector: int = 0) -> bool:
        """Raise an interrupt; True if an eventfd was signalled, False if it is left pending."""
        self._vector(index, vector)
        return self._fire(index, vector)

    def set_level(self, index: int, vector: int, level: bool) -> None:
        """A level-triggered line (INTx) rises or falls; rising signals it (see module doc)."""
        self._vector(index, vector)
        was, self._asserted[index][vector] = self._asserted[index][vector], level
        if level and not was:
            self._fire(index, vector)
        elif not level:
            self._pending[index][vector] = False

    def asserted(self, index: int, vector: int = 0) -> bool:
        self._vector(index, vector)
        return self._asserted[index][vector]

    def mark_pending(self, index: int, vector: int = 0) -> None:
        """Leave a vector pending: deliver it on the next chance (an unmask, an eventfd
        attached, `redeliver`)."""
        self._vector(index, vector)
        self._pending[index][vector] = True

    def redeliver(self, index: int) -> None:
        """Try again every pending (or asserted: a level) unmasked vector of an index: for a
        transport that cannot see eventfds being attached (libvfio-user keeps them) and tries
        after each SET_IRQS. An asserted unmasked level was never signalled (a signal masks
        it), so this is the attach-time signal the native transport gives."""
        self._spec(index)
        for vector, pending in enumerate(self._pending[index]):
            if (pending or self._asserted[index][vector]) and not self._masked[index][vector]:
                self._fire(index, vector)

    def clear_pending(self, index: int, vector: int = 0) -> None:
        """The device withdraws an interrupt that was not delivered yet (INTx deasserted)."""
        self._vector(index, vector)
        self._pending[index][vector] = False

    def mask(self, index: int, vector: int = 0) -> None:
        spec = self._vector(index, vector)
        if not spec.maskable:
            raise _einval(f"IRQ index {spec.index.name} is not maskable")
        self._masked[index][vector] = True

    def unmask(self, index: int, vector: int = 0) -> None:
        """Unmask and deliver what was left pending (the transport calls this on unmask fds)."""
        spec = self._vector(index, vector)
        if not spec.maskable:
            raise _einval(f"IRQ index {spec.index.name} is not maskable")
        self._masked[index][vector] = False
        if self._pending[index][vector] or self._asserted[index][vector]:
            self._fire(index, vector)

    def _fire(self, index: int, vector: int) -> bool:
        if self._masked[index][vector]:
            self._pending[index][vector] = True
            return False
        external = self.external
        if external is not None:
            if not external(index, vector):
                self._pending[index][vector] = True
                return False
            self._pending[index][vector] = False
            if self.specs[index].automasked:
                self._masked[index][vector] = True
            return True
        fd = self._fds[index][vector]
        if fd < 0:
            self._pending[index][vector] = True
            return False
        self._pending[index][vector] = False
        if self.specs[index].automasked:
            self._masked[index][vector] = True
        try:
            os.write(fd, _EVENTFD_ONE)
        except BlockingIOError:
            # The counter is saturated: the reader has an unconsumed signal, which is enough.
            pass
        except OSError:
            self.signal_errors += 1
            return False
        return True

    # --- VFIO_DEVICE_SET_IRQS ------------------------------------------------------------

    def set_irqs(
        self,
        flags: int,
        index: int,
        start: int,
        count: int,
        data: bytes = b"",
        fds: Sequence[int] = (),
    ) -> None:
        """Apply one DEVICE_SET_IRQS request; AccessError(EINVAL) for anything malformed.

        `data` is the per-vector byte array for DATA_BOOL and is ignored otherwise; `fds` are
        the descriptors that came with the request (see the module docstring for ownership).
        """
        if flags & ~(DATA_TYPE_MASK | ACTION_TYPE_MASK):
            raise _einval(f"unknown SET_IRQS flag bits {flags:#x}")
        data_type, action = flags & DATA_TYPE_MASK, flags & ACTION_TYPE_MASK
        if data_type.bit_count() != 1 or action.bit_count() != 1:
            raise _einval(f"SET_IRQS needs exactly one data type and one action, not {flags:#x}")
        spec = self._spec(index)
        if spec.count == 0:
            raise _einval(f"IRQ index {spec.index.name} has no vectors")
        if start < 0 or count < 0 or start >= spec.count or start + count > spec.count:
            raise _einval(
                f"vectors {start}..{start + count} are outside IRQ index {spec.index.name} "
                f"(count {spec.count})"
            )
        operation = _OPERATIONS.get((data_type, action))
        if operation is None:
            raise _einval(f"SET_IRQS {IrqSetFlag(flags)!r} is not supported")
        if action != IrqSetFlag.ACTION_TRIGGER and not spec.maskable:
            raise _einval(f"IRQ index {spec.index.name} is not maskable")
        if data_type == IrqSetFlag.DATA_EVENTFD:
            if len(fds) not in (0, count):
                raise _einval(f"DATA_EVENTFD for {count} vectors came with {len(fds)} fds")
            if any(fd < 0 for fd in fds) or len(set(fds)) != len(fds):
                raise _einval("DATA_EVENTFD descriptors must be distinct and valid")
        elif fds:
            raise _einval(f"{len(fds)} fds came with a request that takes none")
        if data_type == IrqSetFlag.DATA_BOOL and len(data) != count:
            raise _einval(f"DATA_BOOL for {count} vectors came with {len(data)} bytes")
        operation(
            self, index, start, count, data if data_type == IrqSetFlag.DATA_BOOL else None, fds
        )

    @staticmethod
    def _selected(start: int, count: int, data: bytes | None) -> list[int]:
        """Vectors a DATA_NONE (all in range) or DATA_BOOL (nonzero bytes) request names."""
        if data is None:
            return list(range(start, start + count))
        return [start + i for i, flag in enumerate(data) if flag]

    def _op_fire(
        self, index: int, start: int, count: int, data: bytes | None, _: Sequence[int]
    ) -> None:
        if count == 0 and data is None:
            self._disable(index)
            return
        for vector in self._selected(start, count, data):
            self._fire(index, vector)

    def _op_mask(
        self, index: int, start: int, count: int, data: bytes | None, _: Sequence[int]
    ) -> None:
        for vector in self._selected(start, count, data):
            self._masked[index][vector] = True

    def _op_unmask(
        self, index: int, start: int, count: int, data: bytes | None, _: Sequence[int]
    ) -> None:
        for vector in self._selected(start, count, data):
            self.unmask(index, vector)

    def _op_set_triggers(
        self, index: int, start: int, count: int, _: bytes | None, fds: Sequence[int]
    ) -> None:
        vectors = self._fds[index]
        for i in range(count):
            vector = start + i
            new = fds[i] if fds else -1
            old = vectors[vector]
            if old != new:
                vectors[vector] = new
                if old >= 0:
                    os.close(old)
            if new >= 0 and (self._pending[index][vector] or self._asserted[index][vector]):
                self._fire(index, vector)

    def _op_set_unmask(
        self, index: int, _start: int, count: int, _: bytes | None, fds: Sequence[int]
    ) -> None:
        if count != 1:
            raise _einval("an unmask eventfd is set for exactly one vector")
        old, new = self._unmask_fds[index], (fds[0] if fds else -1)
        if old != new:
            self._unmask_fds[index] = new
            if old >= 0:
                os.close(old)

    def _disable(self, index: int) -> None:
        """DATA_NONE|ACTION_TRIGGER with count 0: the whole index off, its eventfds closed."""
        for vector, fd in enumerate(self._fds[index]):
            if fd >= 0:
                os.close(fd)
            self._fds[index][vector] = -1
            self._masked[index][vector] = False
            self._pending[index][vector] = False
        if self._unmask_fds[index] >= 0:
            os.close(self._unmask_fds[index])
            self._unmask_fds[index] = -1

    # --- lifetime ------------------------------------------------------------------------

    def reset(self) -> None:
        """Device reset: masks and pending interrupts go, eventfds stay (see module doc)."""
        for index in range(len(self.specs)):
            count = self.specs[index].count
            self._masked[index] = [False] * count
            self._pending[index] = [False] * count
            self._asserted[index] = [False] * count

    def close(self) -> None:
        """Close every descriptor the table owns; it stays usable, with nothing attached."""
        for index in range(len(self.specs)):
            self._disable(index)


# The decode table of SET_IRQS: (data type, action) -> what to do. Anything missing is EINVAL
# (ACTION_MASK with DATA_EVENTFD has no meaning, as in Linux vfio-pci).
_OPERATIONS: dict[tuple[int, int], _Operation] = {
    (IrqSetFlag.DATA_NONE, IrqSetFlag.ACTION_TRIGGER): IrqTable._op_fire,
    (IrqSetFlag.DATA_BOOL, IrqSetFlag.ACTION_TRIGGER): IrqTable._op_fire,
    (IrqSetFlag.DATA_EVENTFD, IrqSetFlag.ACTION_TRIGGER): IrqTable._op_set_triggers,
    (IrqSetFlag.DATA_NONE, IrqSetFlag.ACTION_MASK): IrqTable._op_mask,
    (IrqSetFlag.DATA_BOOL, IrqSetFlag.ACTION_MASK): IrqTable._op_mask,
    (IrqSetFlag.DATA_NONE, IrqSetFlag.ACTION_UNMASK): IrqTable._op_unmask,
    (IrqSetFlag.DATA_BOOL, IrqSetFlag.ACTION_UNMASK): IrqTable._op_unmask,
    (IrqSetFlag.DATA_EVENTFD, IrqSetFlag.ACTION_UNMASK): IrqTable._op_set_unmask,
}
