"""IrqTable: VFIO_DEVICE_SET_IRQS semantics checked with real eventfds."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devmodel.pci.errors import AccessError
from devmodel.pci.irqs import (
    IRQ_FLAGS,
    IrqIndex,
    IrqInfoFlag,
    IrqSetFlag,
    IrqTable,
)

NONE, BOOL, EVENTFD = IrqSetFlag.DATA_NONE, IrqSetFlag.DATA_BOOL, IrqSetFlag.DATA_EVENTFD
MASK, UNMASK, TRIGGER = (
    IrqSetFlag.ACTION_MASK,
    IrqSetFlag.ACTION_UNMASK,
    IrqSetFlag.ACTION_TRIGGER,
)
INTX, MSI, MSIX, ERR, REQ = IrqIndex
NVEC = 4


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def signalled(fd: int) -> int:
    """How many signals are waiting on the eventfd (consumes them)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


@pytest.fixture
def table() -> Iterator[IrqTable]:
    t = IrqTable(msi_vectors=1, msix_vectors=NVEC)
    yield t
    t.close()


# --- info -----------------------------------------------------------------------------------


def test_info(table: IrqTable) -> None:
    E, M, A, N = IrqInfoFlag
    assert table.num_indexes == 5
    assert table.info(INTX) == (E | M | A, 1)
    assert table.info(MSI) == (E | N, 1)
    assert table.info(MSIX) == (E | N, NVEC)
    assert table.info(ERR) == (E | N, 0)
    assert table.info(REQ) == (E | N, 1)
    for bad in (5, -1, 100):
        with pytest.raises(AccessError) as info:
            table.info(bad)
        assert info.value.errno == errno.EINVAL


def test_flag_constants() -> None:
    assert IRQ_FLAGS["VFIO_IRQ_INFO_EVENTFD"] == 1
    assert IRQ_FLAGS["VFIO_IRQ_INFO_NORESIZE"] == 8
    assert IRQ_FLAGS["VFIO_IRQ_SET_DATA_EVENTFD"] == 4
    assert IRQ_FLAGS["VFIO_IRQ_SET_ACTION_TRIGGER"] == 32
    assert len(IRQ_FLAGS) == 10


# --- triggering -----------------------------------------------------------------------------


def test_msi_trigger_signals_eventfd(table: IrqTable) -> None:
    fd = eventfd()
    table.set_irqs(EVENTFD | TRIGGER, MSI, 0, 1, fds=[fd])
    assert table.eventfd(MSI, 0) == fd
    assert table.trigger(MSI)
    assert table.trigger(MSI)
    assert signalled(fd) == 2  # edge: every trigger counts, nothing masks MSI
    assert signalled(fd) == 0


def test_intx_automask_and_unmask(table: IrqTable) -> None:
    fd = eventfd()
    table.set_irqs(EVENTFD | TRIGGER, INTX, 0, 1, fds=[fd])
    assert table.trigger(INTX)
    assert signalled(fd) == 1
    assert table.masked(INTX, 0)  # automasked
    assert not table.trigger(INTX)  # held pending while masked
    assert signalled(fd) == 0 and table.pending(INTX, 0)
    table.set_irqs(NONE | UNMASK, INTX, 0, 1)
    assert signalled(fd) == 1  # the pending one is delivered on unmask ...
    assert table.masked(INTX, 0)  # ... and masks again
    table.set_irqs(NONE | UNMASK, INTX, 0, 1)
    assert signalled(fd) == 0 and not table.masked(INTX, 0)  # nothing pending: just unmasked


def test_intx_explicit_mask_and_bool_unmask(table: IrqTable) -> None:
    fd = eventfd()
    table.set_irqs(EVENTFD | TRIGGER, INTX, 0, 1, fds=[fd])
    table.set_irqs(BOOL | MASK, INTX, 0, 1, data=b"\x01")
    assert not table.trigger(INTX)
    table.clear_pending(INTX)  # the device deasserted before anyone looked
    table.set_irqs(BOOL | UNMASK, INTX, 0, 1, data=b"\x01")
    assert signalled(fd) == 0
    table.set_irqs(BOOL | MASK, INTX, 0, 1, data=b"\x00")  # byte 0: not selected
    assert not table.masked(INTX, 0)


def test_none_and_bool_trigger_are_loopback(table: IrqTable) -> None:
    fds = [eventfd() for _ in range(NVEC)]
    table.set_irqs(EVENTFD | TRIGGER, MSIX, 0, NVEC, fds=fds)
    table.set_irqs(BOOL | TRIGGER, MSIX, 0, NVEC, data=b"\x01\x00\x01\x00")
    assert [signalled(fd) for fd in fds] == [1, 0, 1, 0]
    table.set_irqs(NONE | TRIGGER, MSIX, 1, 2)
    assert [signalled(fd) for fd in fds] == [0, 1, 1, 0]
    table.set_irqs(BOOL | TRIGGER, MSIX, 2, 0, data=b"")  # count 0 with BOOL: nothing at all
    assert [signalled(fd) for fd in fds] == [0, 0, 0, 0]
    assert all(table.eventfd(MSIX, v) == fds[v] for v in range(NVEC))


def test_saturated_eventfd_is_fine(table: IrqTable) -> None:
    fd = eventfd()
    os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)  # the counter's maximum
    table.set_irqs(EVENTFD | TRIGGER, MSI, 0, 1, fds=[fd])
    assert table.trigger(MSI)  # EAGAIN: still signalled, not an error
    assert table.signal_errors == 0


def test_unwritable_descriptor_is_counted_not_raised(table: IrqTable) -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    table.set_irqs(EVENTFD | TRIGGER, MSI, 0, 1, fds=[read_end])
    assert not table.trigger(MSI)
    assert table.signal_errors == 1


# --- attaching, detaching, closing -------------------------------------------------------------


def test_disable_closes_eventfds(table: IrqTable) -> None:
    fds = [eventfd() for _ in range(NVEC)]
    table.set_irqs(EVENTFD | TRIGGER, MSIX, 0, NVEC, fds=fds)
    table.set_irqs(NONE | TRIGGER, MSIX, 0, 0)
    assert all(is_closed(fd) for fd in fds)
    assert all(table.eventfd(MSIX, v) == -1 for v in range(NVEC))


def test_intx_disable_also_drops_mask_and_unmask_fd(table: IrqTable) -> None:
    trigger_fd, unmask_fd = eventfd(), eventfd()
    table.set_irqs(EVENTFD | TRIGGER, INTX, 0, 1, fds=[trigger_fd])
    table.set_irqs(EVENTFD | UNMASK, INTX, 0, 1, fds=[unmask_fd])
    assert table.unmask_eventfd(INTX) == unmask_fd
    table.trigger(INTX)
    table.set_irqs(NONE | TRIGGER, INTX, 0, 0)
    assert is_closed(trigger_fd) and is_closed(unmask_fd)
    assert not table.masked(INTX, 0) and table.unmask_eventfd(INTX) == -1


def test_replacing_an_eventfd_closes_the_old_one(table: IrqTable) -> None:
    old, new = eventfd(), eventfd()
    table.set_irqs(EVENTFD | TRIGGER, MSIX, 2, 1, fds=[old])
    table.set_irqs(EVENTFD | TRIGGER, MSIX, 2, 1, fds=[new])
    assert is_closed(old) and not is_closed(new)
    table.trigger(MSIX, 2)
    assert signalled(new) == 1


def test_eventfd_request_without_fds_detaches(table: IrqTable) -> None:
    # QEMU's client sends a run of fd -1 as DATA_EVENTFD with no descriptors attached.
    fds = [eventfd() for _ in range(NVEC)]
    table.set_irqs(EVENTFD | TRIGGER, MSIX, 0, NVEC, fds=fds)
    table.set_irqs(EVENTFD | TRIGGER, MSIX, 1, 2)
    assert [is_closed(fd) for fd in fds] == [False, True, True, False]
    assert [table.eventfd(MSIX, v) for v in range(NVEC)] == [fds[0], -1, -1, fds[3]]


def test_pending_delivered_when_eventfd_attached(table: IrqTable) -> None:
    assert not table.trigger(MSIX, 1)
    assert table.pending_bits(MSIX) == 0b10
    fd = eventfd()
    table.set_irqs(EVENTFD | TRIGGER, MSIX, 1, 1, fds=[fd])
    assert signalled(fd) == 1
    assert table.pending_bits(MSIX) == 0


def test_reset_keeps_eventfds_and_clears_state(table: IrqTable) -> None:
    fd = eventfd()
    table.set_irqs(EVENTFD | TRIGGER, INTX, 0, 1, fds=[fd])
    table.trigger(INTX)
    table.trigger(INTX)
    assert signalled(fd) == 1
    table.reset()
    assert not table.masked(INTX, 0) and not table.pending(INTX, 0)
    assert table.eventfd(INTX, 0) == fd and not is_closed(fd)
    assert table.trigger(INTX)
    assert signalled(fd) == 1


def test_close_closes_everything_and_is_idempotent() -> None:
    t = IrqTable(msix_vectors=NVEC)
    fds = [eventfd() for _ in range(NVEC + 4)]
    t.set_irqs(EVENTFD | TRIGGER, MSIX, 0, NVEC, fds=fds[:NVEC])
    t.set_irqs(EVENTFD | TRIGGER, INTX, 0, 1, fds=[fds[NVEC]])
    t.set_irqs(EVENTFD | UNMASK, INTX, 0, 1, fds=[fds[NVEC + 1]])
    t.set_irqs(EVENTFD | TRIGGER, MSI, 0, 1, fds=[fds[NVEC + 2]])
    t.set_irqs(EVENTFD | TRIGGER, REQ, 0, 1, fds=[fds[NVEC + 3]])
    t.close()
    assert all(is_closed(fd) for fd in fds)
    t.close()
    assert not t.trigger(MSI)  # still usable: nothing attached, so it stays pending


# --- refusals ---------------------------------------------------------------------------------

REFUSED = [
    pytest.param(1 << 6 | NONE | TRIGGER, MSI, 0, 1, b"", 0, id="unknown-flag"),
    pytest.param(NONE | BOOL | TRIGGER, MSI, 0, 1, b"\x01", 0, id="two-data-types"),
    pytest.param(NONE, MSI, 0, 1, b"", 0, id="no-action"),
    pytest.param(NONE | MASK | UNMASK, INTX, 0, 1, b"", 0, id="two-actions"),
    pytest.param(0, MSI, 0, 1, b"", 0, id="no-flags"),
    pytest.param(NONE | TRIGGER, 5, 0, 1, b"", 0, id="bad-index"),
    pytest.param(NONE | TRIGGER, -1, 0, 1, b"", 0, id="negative-index"),
    pytest.param(NONE | TRIGGER, ERR, 0, 0, b"", 0, id="err-has-no-vectors"),
    pytest.param(NONE | TRIGGER, MSI, 1, 0, b"", 0, id="start-past-end"),
    pytest.param(NONE | TRIGGER, MSIX, 2, NVEC, b"", 0, id="count-past-end"),
    pytest.param(NONE | TRIGGER, MSIX, -1, 1, b"", 0, id="negative-start"),
    pytest.param(BOOL | TRIGGER, MSIX, 0, 2, b"\x01", 0, id="bool-too-short"),
    pytest.param(BOOL | TRIGGER, MSIX, 0, 1, b"\x01\x01", 0, id="bool-too-long"),
    pytest.param(EVENTFD | TRIGGER, MSIX, 0, 2, b"", 1, id="too-few-fds"),
    pytest.param(EVENTFD | TRIGGER, MSIX, 0, 1, b"", 2, id="too-many-fds"),
    pytest.param(NONE | TRIGGER, MSI, 0, 1, b"", 1, id="fds-with-data-none"),
    pytest.param(BOOL | TRIGGER, MSI, 0, 1, b"\x01", 1, id="fds-with-data-bool"),
    pytest.param(NONE | MASK, MSI, 0, 1, b"", 0, id="msi-not-maskable"),
    pytest.param(NONE | UNMASK, MSIX, 0, 1, b"", 0, id="msix-not-maskable"),
    pytest.param(EVENTFD | MASK, INTX, 0, 1, b"", 1, id="eventfd-mask"),
    pytest.param(EVENTFD | UNMASK, INTX, 0, 0, b"", 0, id="unmask-fd-count-0"),
]


@pytest.mark.parametrize(("flags", "index", "start", "count", "data", "nfds"), REFUSED)
def test_refused_requests(
    table: IrqTable, flags: int, index: int, start: int, count: int, data: bytes, nfds: int
) -> None:
    before = [eventfd()]
    table.set_irqs(EVENTFD | TRIGGER, MSI, 0, 1, fds=before)
    fds = [eventfd() for _ in range(nfds)]
    with pytest.raises(AccessError) as info:
        table.set_irqs(flags, index, start, count, data, fds)
    assert info.value.errno == errno.EINVAL
    # Nothing changed, and the caller still owns the refused descriptors.
    assert table.eventfd(MSI, 0) == before[0]
    for fd in fds:
        assert not is_closed(fd)
        os.close(fd)


def test_duplicate_or_negative_fds_refused(table: IrqTable) -> None:
    fd = eventfd()
    for fds in ([fd, fd], [fd, -1]):
        with pytest.raises(AccessError):
            table.set_irqs(EVENTFD | TRIGGER, MSIX, 0, 2, fds=fds)
    assert not is_closed(fd)
    os.close(fd)


@pytest.mark.parametrize(("index", "vector"), [(MSIX, NVEC), (MSI, 1), (ERR, 0), (7, 0)])
def test_trigger_out_of_range(table: IrqTable, index: int, vector: int) -> None:
    with pytest.raises(AccessError):
        table.trigger(index, vector)


def test_direct_mask_of_unmaskable_index_refused(table: IrqTable) -> None:
    with pytest.raises(AccessError):
        table.mask(MSIX, 0)
    with pytest.raises(AccessError):
        table.unmask(MSI, 0)


# --- property: any request sequence is refused cleanly or applied, and never leaks --------------

_request = st.tuples(
    st.integers(0, 0x7F),  # flags, including invalid combinations and an unknown bit
    st.integers(-1, 5),  # index
    st.integers(-1, NVEC + 1),  # start
    st.integers(-1, NVEC + 1),  # count
    st.binary(max_size=NVEC + 1),  # data
    st.integers(0, NVEC + 1),  # how many eventfds come with it
    st.booleans(),  # trigger something afterwards
)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@settings(max_examples=300, deadline=None)
@given(requests=st.lists(_request, max_size=12))
def test_random_requests_never_leak(
    requests: list[tuple[int, int, int, int, bytes, int, bool]],
) -> None:
    baseline = _open_fds()
    t = IrqTable(msix_vectors=NVEC)
    for flags, index, start, count, data, nfds, fire in requests:
        fds = [eventfd() for _ in range(nfds)]
        try:
            t.set_irqs(flags, index, start, count, data, fds)
        except AccessError as exc:
            assert exc.errno == errno.EINVAL
            for fd in fds:
                os.close(fd)
        if fire:
            for i in range(t.num_indexes):
                for v in range(t.info(i)[1]):
                    t.trigger(i, v)
        held = [t.eventfd(i, v) for i in range(t.num_indexes) for v in range(t.info(i)[1])]
        held += [t.unmask_eventfd(i) for i in range(t.num_indexes)]
        held = [fd for fd in held if fd >= 0]
        assert len(set(held)) == len(held)
        assert all(not is_closed(fd) for fd in held)
        assert _open_fds() == baseline + len(held)
    t.close()
    assert _open_fds() == baseline
