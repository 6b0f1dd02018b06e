"""The libvfio-user transport's interrupt path, with a stand-in for the library.

libvfio-user is not thread-safe, so `vfu_irq_trigger` may only be called while no worker is
inside the library, or while the worker is parked in one of devmodel's callbacks; otherwise the
signal waits for the worker to come back. A signal the library cannot deliver (no eventfd:
ENOENT) stays pending in the function's IrqTable. The library itself is exercised by
tests/integration/test_interrupts_process.py; this checks the rules, no library needed.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator
from typing import Any, cast

import pytest

from devmodel.backend import DeviceBackend
from devmodel.counters import DeviceCounters
from devmodel.pci.irqs import IrqIndex
from devmodel.testing import memory_backend
from devmodel.transports.libvfio_user import LibVfioUserServer


class FakeLib:
    """Records vfu_irq_trigger calls; fails them with ENOENT while `attached` is False."""

    def __init__(self) -> None:
        self.triggered: list[int] = []
        self.attached = True

    def vfu_irq_trigger(self, ctx: int, vector: int) -> int:
        if not self.attached:
            ctypes.set_errno(errno.ENOENT)
            return -1
        self.triggered.append(vector)
        return 0


@pytest.fixture
def backend() -> Iterator[DeviceBackend]:
    with memory_backend(2 << 20) as b:
        yield b


@pytest.fixture
def lib() -> FakeLib:
    return FakeLib()


@pytest.fixture
def server(backend: DeviceBackend, lib: FakeLib) -> LibVfioUserServer:
    s = LibVfioUserServer(backend, DeviceCounters(), "/nonexistent", lib=cast(Any, lib))
    # What `open` does, without a library: a context, and the table signalling through it.
    s._ctx = 1
    backend.irqs.external = s._signal
    return s


def test_no_client_leaves_the_interrupt_pending(
    backend: DeviceBackend, server: LibVfioUserServer, lib: FakeLib
) -> None:
    backend.function.raise_interrupt()
    assert lib.triggered == []
    assert backend.irqs.pending(IrqIndex.INTX, 0)


def test_idle_library_is_triggered_at_once(
    backend: DeviceBackend, server: LibVfioUserServer, lib: FakeLib
) -> None:
    server.connected = True
    backend.function.raise_interrupt()
    assert lib.triggered == [0]


def test_worker_in_the_library_defers_until_it_is_back(
    backend: DeviceBackend, server: LibVfioUserServer, lib: FakeLib
) -> None:
    server.connected = True
    server._busy = True
    backend.function.raise_interrupt()
    assert lib.triggered == [], "never while another thread is inside the library"
    assert backend.irqs.pending(IrqIndex.INTX, 0)
    server._busy = False
    server._redeliver()  # what the loop does when the worker is back
    assert lib.triggered == [0]


def test_worker_parked_in_a_callback_lets_the_trio_thread_trigger(
    backend: DeviceBackend, server: LibVfioUserServer, lib: FakeLib
) -> None:
    server.connected = True
    server._busy = server._parked = True
    backend.function.raise_interrupt()
    assert lib.triggered == [0]


def test_deferred_signal_without_eventfd_stays_pending(
    backend: DeviceBackend, server: LibVfioUserServer, lib: FakeLib
) -> None:
    server.connected = True
    server._busy = True
    lib.attached = False
    backend.function.raise_interrupt()
    server._busy = False
    server._redeliver()
    assert lib.triggered == []
    assert backend.irqs.pending(IrqIndex.INTX, 0)
    # The client attaches an eventfd (a SET_IRQS the transport saw go by): delivered.
    lib.attached = True
    server._redeliver()
    assert lib.triggered == [0]


def test_client_unmask_refires_a_line_still_asserted(
    backend: DeviceBackend, server: LibVfioUserServer, lib: FakeLib
) -> None:
    server.connected = True
    backend.function.raise_interrupt()
    server._irq_state(1, 0, 1, False)  # the library's IRQ state callback: UNMASK, trio thread
    assert lib.triggered == [0, 0]
    backend.function.register_write_now(0xAC, b"\x01\0\0\0")  # IRQ_STATUS: acknowledged
    server._irq_state(1, 0, 1, False)
    assert lib.triggered == [0, 0]


def test_a_vector_pending_under_another_mechanism_stays_pending(
    backend: DeviceBackend, server: LibVfioUserServer, lib: FakeLib
) -> None:
    """The library keeps one eventfd array for INTx, MSI and MSI-X: after the guest switched
    to MSI-X, an INTx left pending must not fire through MSI-X vector 0's eventfd."""
    server.connected = True
    lib.attached = False
    backend.function.raise_interrupt()  # INTx, no eventfd yet: pending
    fn = backend.function
    fn.config_write(0x04, (0x6).to_bytes(2, "little"))  # memory, bus master
    fn.config_write(0x52, (0x8000).to_bytes(2, "little"))  # MSI-X enable: INTx line drops
    backend.irqs.mark_pending(IrqIndex.INTX, 0)  # even if something left it pending
    lib.attached = True
    server._redeliver()
    assert lib.triggered == []
    fn.raise_interrupt(1)
    assert lib.triggered == [1]


def test_a_new_client_starts_unmasked(
    backend: DeviceBackend, server: LibVfioUserServer, lib: FakeLib
) -> None:
    """INTx is automasked after a signal; if that client leaves before it unmasks, the next
    one must not inherit the mask (it would never hear INTx). As `serve` does on a departure:
    the table forgets the client's state, the device keeps its level, and the next client
    hears the line still up once it has set up its eventfds."""
    server.connected = True
    backend.function.raise_interrupt()
    assert lib.triggered == [0] and backend.irqs.masked(IrqIndex.INTX, 0)
    server.connected = False
    backend.irqs.close()
    assert not backend.irqs.masked(IrqIndex.INTX, 0)
    assert backend.irqs.asserted(IrqIndex.INTX, 0)
    server.connected = True
    server._redeliver()  # after the new client's SET_IRQS: the line still up is signalled
    assert lib.triggered == [0, 0]
    server._redeliver()
    assert lib.triggered == [0, 0], "then automasked until the client unmasks"
