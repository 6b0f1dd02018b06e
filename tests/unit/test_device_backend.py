"""The device backend and its region bus with plain calls: no socket, no event channel."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from devmodel.aperture import OwnedMemory
from devmodel.backend import DeviceBackend, MappedRange, Region, RegionBus, backend_for
from devmodel.backend.bus import refusing_region
from devmodel.counters import DeviceCounters
from devmodel.pci import config_space as cs
from devmodel.pci.errors import AccessError
from devmodel.pci.function import PciFunction
from devmodel.pci.identity import PciIdentity
from devmodel.testing import memory_backend

MiB = 1 << 20
APERTURE = 2 * MiB
BAR0_AT = 0x8_0000_0000
BAR2_AT = 0xF000_0000


@pytest.fixture
def backend() -> Iterator[DeviceBackend]:
    with memory_backend(APERTURE) as b:
        yield b


def config_write(b: DeviceBackend, offset: int, value: int, size: int) -> None:
    b.config_write(offset, value.to_bytes(size, "little"))


def program(b: DeviceBackend, bar0: int = BAR0_AT, bar2: int = BAR2_AT) -> None:
    """What firmware does: both BARs, then memory decoding on."""
    config_write(b, cs.BAR_BASE, bar0 & 0xFFFFFFFF, 4)
    config_write(b, cs.BAR_BASE + 4, bar0 >> 32, 4)
    config_write(b, cs.BAR_BASE + 8, bar2, 4)
    config_write(b, cs.COMMAND, cs.CMD_MEMORY, 2)


# --- the bus alone ------------------------------------------------------------------------------


def _region(index: int, size: int, store: dict[int, bytes]) -> Region:
    async def read(offset: int, count: int) -> bytes:
        return store.get(offset, bytes(count))

    async def write(offset: int, data: bytes) -> None:
        store[offset] = data

    return Region(index, f"r{index}", size, read, write)


async def test_bus_routes_by_index_and_by_address_after_one_move() -> None:
    store: dict[int, bytes] = {}
    bus = RegionBus(4)
    bus.register(_region(0, 0x1000, store))
    bus.register(_region(2, 0x100, store))
    told: list[tuple[MappedRange, ...]] = []
    bus.subscribe(told.append)
    await bus.lookup(0).write(8, b"\x01\x02")
    assert await bus.lookup(0).read(8, 2) == b"\x01\x02"
    assert bus.route(0x5000) is None  # nothing decodes yet
    assert bus.move({0: 0x5000, 2: 0x1000}) is True
    assert told == [(MappedRange(0x1000, 0x10FF, 2), MappedRange(0x5000, 0x5FFF, 0))]
    region, offset = bus.route(0x5008) or (None, None)
    assert region is bus.lookup(0) and offset == 8
    assert bus.route(0x5FFF) is not None and bus.route(0x6000) is None
    assert bus.route(0x1100) is None and bus.route(0xFFF) is None
    assert bus.overlapping(0x10F0, 0x2000) == MappedRange(0x1000, 0x10FF, 2)
    assert bus.overlapping(0x2000, 0x5000) is None  # exclusive end
    # The same addresses again change nothing and tell nobody.
    assert bus.move({0: 0x5000}) is False
    assert len(told) == 1
    bus.unsubscribe(told.append)
    bus.move({0: None})
    assert bus.mapped == (MappedRange(0x1000, 0x10FF, 2),)
    assert len(told) == 1


async def test_bus_refuses_unknown_indexes_and_double_registration() -> None:
    bus = RegionBus(3)
    bus.register(refusing_region(1, "hole"))
    with pytest.raises(ValueError, match="already registered"):
        bus.register(refusing_region(1))
    with pytest.raises(ValueError, match="outside the bus"):
        bus.register(refusing_region(3))
    assert bus.get(1) is not None and bus.get(0) is None and bus.get(7) is None
    with pytest.raises(ValueError, match="no region 0"):
        bus.move({0: 0x1000})
    assert bus.move({1: 0x1000}) is False  # a region of size 0 decodes nowhere
    for index in (0, 1, 2, 3, 1 << 31):
        with pytest.raises(AccessError) as info:
            await bus.lookup(index).read(0, 4)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(AccessError):
            await bus.lookup(index).write(0, b"\0")


# --- the backend --------------------------------------------------------------------------------


async def test_a_region_read_reaches_the_aperture(backend: DeviceBackend) -> None:
    await backend.write(0, 64, (0x1122334455667788).to_bytes(8, "little"))
    assert await backend.read(0, 64, 8) == (0x1122334455667788).to_bytes(8, "little")
    assert backend.counters.trapped_reads == 1 and backend.counters.trapped_writes == 1
    assert await backend.read(2, 0, 4) == b"DMDL"  # the register BAR
    vendor = backend.function.identity.vendor_id.to_bytes(2, "little")
    assert await backend.read(7, 0, 2) == vendor == backend.config_read(0, 2)


async def test_a_config_write_moves_bar0_on_the_bus(backend: DeviceBackend) -> None:
    told: list[tuple[MappedRange, ...]] = []
    backend.bus.subscribe(told.append)
    assert not backend.bus.mapped
    program(backend)
    assert backend.bus.mapped == (
        MappedRange(BAR2_AT, BAR2_AT + 4095, 2),
        MappedRange(BAR0_AT, BAR0_AT + APERTURE - 1, 0),
    )
    assert told[-1] == backend.bus.mapped
    await backend.write(0, 8, b"\xaa" * 8)
    where = backend.route(BAR0_AT + 8)
    assert where is not None
    region, offset = where
    assert (region.index, offset) == (0, 8)
    assert await region.read(offset, 8) == b"\xaa" * 8
    # Move BAR0: one config write of its low half is one bus update.
    before = len(told)
    config_write(backend, cs.BAR_BASE, 0x4000_0000, 4)
    assert len(told) == before + 1
    new = (BAR0_AT & ~0xFFFFFFFF) | 0x4000_0000
    assert backend.route(BAR0_AT + 8) is None
    moved = backend.route(new + 8)
    assert moved is not None and moved[0].index == 0
    assert backend.function.bar_address(0) == new
    # Decoding off: nothing on the address bus; a reset does the same.
    config_write(backend, cs.COMMAND, 0, 2)
    assert not backend.bus.mapped and told[-1] == ()
    config_write(backend, cs.COMMAND, cs.CMD_MEMORY, 2)
    assert backend.bus.mapped
    backend.reset()
    assert not backend.bus.mapped and told[-1] == ()


@pytest.mark.parametrize(
    ("index", "offset", "size", "code", "counted"),
    [
        (0, 1, 4, errno.EINVAL, True),  # misaligned
        (0, 0, 3, errno.EINVAL, True),  # bad size
        (0, APERTURE, 8, errno.EFAULT, True),  # past the end
        (1, 0, 4, errno.EINVAL, True),  # upper half of BAR0: no region
        (3, 0, 4, errno.EINVAL, True),  # absent BAR
        (2, 4096, 4, errno.EFAULT, True),  # past the register block
        (7, 256, 4, errno.EFAULT, True),  # past config space
        (6, 0, 4, errno.EINVAL, False),  # ROM: none
        (8, 0, 4, errno.EINVAL, False),  # VGA: none
        (9, 0, 4, errno.EINVAL, False),  # no such region
        (0xFFFF_FFFF, 0, 4, errno.EINVAL, False),
    ],
)
async def test_refused_shapes_keep_their_errno_and_counters(
    backend: DeviceBackend, index: int, offset: int, size: int, code: int, counted: bool
) -> None:
    counters = backend.counters
    for attempt in ("read", "write"):
        before = counters.bad_accesses
        with pytest.raises(AccessError) as info:
            if attempt == "read":
                await backend.read(index, offset, size)
            else:
                await backend.write(index, offset, bytes(size))
        assert info.value.errno == code
        assert counters.bad_accesses == before + (1 if counted else 0)
    assert counters.trapped_reads == counters.trapped_writes == 0


def test_region_sizes(backend: DeviceBackend) -> None:
    sizes = {i: backend.region_size(i) for i in range(10)}
    assert sizes == {0: APERTURE, 1: 0, 2: 4096, 3: 0, 4: 0, 5: 0, 6: 0, 7: 256, 8: 0, 9: None}


def test_overlapping_bar(backend: DeviceBackend) -> None:
    assert backend.overlapping_bar(BAR0_AT, 4096) is None  # not decoding yet
    program(backend)
    assert backend.overlapping_bar(BAR0_AT - 4096, 4097) == MappedRange(
        BAR0_AT, BAR0_AT + APERTURE - 1, 0
    )
    assert backend.overlapping_bar(BAR0_AT - 4096, 4096) is None


def test_the_backend_owns_the_decode_hook_until_closed() -> None:
    function = PciFunction(PciIdentity(), OwnedMemory(APERTURE), DeviceCounters())
    made, owned = backend_for(function)
    assert owned and function.on_decode_change is not None
    same, owned_again = backend_for(made)
    assert same is made and not owned_again
    with pytest.raises(ValueError, match="already reports"):
        DeviceBackend(function)
    made.close()
    assert function.on_decode_change is None
    function.aperture.close()
