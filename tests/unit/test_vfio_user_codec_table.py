"""The codec's table, row by row: coverage, round trips, hostile bytes, and the hot path.

Every row of `codec.TABLE` is exercised in both directions: a valid event of the row's class
encodes and decodes back to itself; random payloads (and random fd counts) raise nothing but
ProtocolError; and the specialised REGION_READ/WRITE decoders and encoders give what the
generic, table-driven ones give for the same input.
"""

from __future__ import annotations

import dataclasses
import inspect
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvfio_user import codec
from pyvfio_user import constants as c
from pyvfio_user import events as ev
from pyvfio_user.constants import Command
from pyvfio_user.errors import ProtocolError
from pyvfio_user.version import Capabilities

CHECK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
small = st.integers(1, 4096)
some_bytes = st.binary(min_size=1, max_size=64)
any_bytes = st.binary(max_size=64)
posted = st.booleans()
fd = st.integers(3, 1000)
KNOWN_CAP_KEYS = frozenset(
    {"max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes", "write_multiple"}
)

capabilities = st.builds(
    Capabilities,
    max_msg_fds=st.integers(0, 253),
    max_data_xfer_size=st.integers(0, 1 << 40),
    max_dma_maps=u32,
    pgsizes=u64,
    write_multiple=st.booleans(),
)


@st.composite
def set_irqs(draw: st.DrawFn, msg_id: int) -> ev.DeviceSetIrqs:
    action = draw(
        st.sampled_from([c.IRQ_SET_ACTION_MASK, c.IRQ_SET_ACTION_UNMASK, c.IRQ_SET_ACTION_TRIGGER])
    )
    kind = draw(st.sampled_from([c.IRQ_SET_DATA_NONE, c.IRQ_SET_DATA_BOOL, c.IRQ_SET_DATA_EVENTFD]))
    count = draw(st.integers(0, 16))
    start = draw(st.integers(0, 1 << 16))
    data = b""
    fds: tuple[int, ...] = ()
    if kind == c.IRQ_SET_DATA_BOOL:
        data = draw(st.binary(min_size=count, max_size=count))
    elif kind == c.IRQ_SET_DATA_EVENTFD and draw(st.booleans()):
        fds = tuple(draw(st.lists(fd, min_size=count, max_size=count)))
    return ev.DeviceSetIrqs(msg_id, action | kind, draw(u32), start, count, data, fds, draw(posted))


@st.composite
def region_info(draw: st.DrawFn, msg_id: int) -> ev.RegionInfo:
    """A reply whose argsz is what its capability chain needs, so that it all travels."""
    sparse = st.builds(ev.SparseMmapCap, st.lists(st.tuples(u64, u64), max_size=4).map(tuple))
    raw = st.builds(ev.RawRegionCap, st.integers(2, 0xFFFF), u16, st.binary(max_size=24))
    caps = tuple(draw(st.lists(st.one_of(sparse, raw), max_size=3)))
    flags = draw(u32) & ~c.REGION_INFO_FLAG_CAPS
    if caps:
        flags |= c.REGION_INFO_FLAG_CAPS
    event = ev.RegionInfo(
        msg_id, draw(u32), flags, draw(u64), draw(u64), caps, draw(st.none() | fd)
    )
    wire, _fds = codec.encode(dataclasses.replace(event, argsz=1 << 31))
    needed: int = struct.unpack_from("<I", wire, 16)[0]
    return dataclasses.replace(event, argsz=needed)


@st.composite
def io_fds(draw: st.DrawFn, msg_id: int) -> ev.RegionIoFds:
    fds = tuple(draw(st.lists(fd, min_size=1, max_size=4)))
    sub = st.builds(ev.IoFdSubregion, u64, u64, st.integers(0, len(fds) - 1), u32, u32, u64)
    subs = tuple(draw(st.lists(sub, max_size=4)))
    return ev.RegionIoFds(msg_id, draw(u32), subs, fds, 16 + 40 * len(subs))


def _argsz(minimum: int) -> st.SearchStrategy[int]:
    return st.integers(minimum, 0xFFFF_FFFF)


write_entry = st.builds(ev.WriteEntry, u64, u32, st.binary(min_size=1, max_size=8))
caps_and_keys = capabilities.map(lambda caps: (caps, KNOWN_CAP_KEYS))


def _strategies(m: st.SearchStrategy[int]) -> dict[type, st.SearchStrategy[Any]]:
    """A strategy of valid events for every event class of the table."""
    return {
        ev.VersionRequest: st.builds(
            lambda i, a, b, ck: ev.VersionRequest(i, a, b, ck[0], ck[1]), m, u16, u16, caps_and_keys
        ),
        ev.VersionReply: st.builds(
            lambda i, a, b, ck: ev.VersionReply(i, a, b, ck[0], ck[1]), m, u16, u16, caps_and_keys
        ),
        ev.DmaMap: st.builds(
            ev.DmaMap,
            m,
            st.integers(0, 3),
            u64,
            st.integers(0, 1 << 62),
            small,
            st.none() | fd,
            posted,
        ),
        ev.DmaUnmap: st.one_of(
            st.builds(ev.DmaUnmap, m, st.just(0), u64, u64, _argsz(24), posted),
            st.builds(
                ev.DmaUnmap, m, st.just(c.DMA_UNMAP_ALL), st.just(0), st.just(0), _argsz(24), posted
            ),
        ),
        ev.DeviceGetInfo: st.builds(ev.DeviceGetInfo, m, _argsz(16), posted),
        ev.DeviceGetRegionInfo: st.builds(ev.DeviceGetRegionInfo, m, u32, _argsz(32), posted),
        ev.DeviceGetRegionIoFds: st.builds(ev.DeviceGetRegionIoFds, m, u32, _argsz(16), posted),
        ev.DeviceGetIrqInfo: st.builds(ev.DeviceGetIrqInfo, m, u32, _argsz(16), posted),
        ev.DeviceSetIrqs: m.flatmap(set_irqs),
        ev.RegionRead: st.builds(ev.RegionRead, m, u64, u32, small, posted),
        ev.RegionWrite: st.builds(ev.RegionWrite, m, u64, u32, some_bytes, posted),
        ev.RegionWriteMulti: st.builds(
            ev.RegionWriteMulti,
            m,
            st.lists(write_entry, min_size=1, max_size=5).map(tuple),
            posted,
        ),
        ev.DeviceReset: st.builds(ev.DeviceReset, m, posted),
        ev.DeviceFeature: st.builds(ev.DeviceFeature, m, u32, any_bytes, _argsz(8), posted),
        ev.MigDataRead: st.builds(ev.MigDataRead, m, u32, _argsz(8), posted),
        ev.MigDataWrite: st.builds(ev.MigDataWrite, m, any_bytes, _argsz(8), posted),
        ev.DmaRead: st.builds(ev.DmaRead, m, u64, small, posted),
        ev.DmaWrite: st.builds(ev.DmaWrite, m, u64, some_bytes, posted),
        ev.DmaUnmapReply: st.builds(ev.DmaUnmapReply, m, u32, u64, u64, u32),
        ev.DeviceInfo: st.builds(ev.DeviceInfo, m, u32, u32, u32),
        ev.RegionInfo: m.flatmap(region_info),
        ev.RegionIoFds: m.flatmap(io_fds),
        ev.IrqInfo: st.builds(ev.IrqInfo, m, u32, u32, u32),
        ev.RegionReadReply: st.builds(ev.RegionReadReply, m, u64, u32, any_bytes),
        ev.RegionWriteReply: st.builds(ev.RegionWriteReply, m, u64, u32, u32),
        ev.RegionWriteMultiReply: st.builds(ev.RegionWriteMultiReply, m, u64),
        ev.DeviceFeatureReply: st.builds(ev.DeviceFeatureReply, m, u32, any_bytes),
        ev.MigDataReadReply: st.builds(ev.MigDataReadReply, m, any_bytes),
        ev.MigDataWriteReply: st.builds(ev.MigDataWriteReply, m, u32),
        ev.DmaReadReply: st.builds(ev.DmaReadReply, m, u64, any_bytes),
        ev.DmaWriteReply: st.builds(ev.DmaWriteReply, m, u64, u32),
    }


STRATEGIES = _strategies(u16)
SPECS = [
    pytest.param(row, spec, id=f"{row.command.name}-{'reply' if spec.is_reply else 'request'}")
    for row in codec.TABLE
    for spec in (row.request, row.reply)
]


def _event(spec: codec.Spec, data: st.DataObject) -> ev.Event:
    if spec.event is ev.Ack:
        return ev.Ack(data.draw(u16), spec.command)
    event: ev.Event = data.draw(STRATEGIES[spec.event])
    return event


# ---------------------------------------------------------------- the table itself


def test_table_covers_every_command_once() -> None:
    assert sorted(row.command for row in codec.TABLE) == sorted(Command)
    assert set(codec.ROWS) == set(codec.REQUESTS) == set(codec.REPLIES) == set(Command)


def test_every_event_class_is_in_the_table_and_knows_its_command() -> None:
    varying = {ev.Ack, ev.ErrorReply, ev.BadRequest}
    messages = {
        cls
        for cls in vars(ev).values()
        if isinstance(cls, type)
        and issubclass(cls, ev.Event)
        and cls.__name__ != "Event"
        and not cls.__name__.startswith("_")
    }
    assert messages - varying == set(codec.SPEC_OF)
    for row in codec.TABLE:
        for spec in (row.request, row.reply):
            assert spec.command is row.command
            if spec.event is not ev.Ack:
                assert spec.event.command is row.command  # type: ignore[attr-defined]


def test_every_event_is_frozen() -> None:
    event = ev.RegionRead(1, 2, 3, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.offset = 5  # type: ignore[misc]
    assert hash(event) == hash(ev.RegionRead(1, 2, 3, 4))


def test_strategies_cover_every_event_of_the_table() -> None:
    assert set(STRATEGIES) == set(codec.SPEC_OF)


# ---------------------------------------------------------------- every row, both ways


@pytest.mark.parametrize(("row", "spec"), SPECS)
@CHECK
@given(data=st.data())
def test_round_trip(row: codec.Row, spec: codec.Spec, data: st.DataObject) -> None:
    """encode, then decode, gives the event back, with its fds."""
    event = _event(spec, data)
    wire, fds = codec.encode(event)
    assert c.HEADER.unpack_from(wire)[1] == row.command
    assert codec.decode_message(wire, fds) == event


@pytest.mark.parametrize(("row", "spec"), SPECS)
@CHECK
@given(data=st.data())
def test_random_payloads_raise_only_protocol_error(
    row: codec.Row, spec: codec.Spec, data: st.DataObject
) -> None:
    """Arbitrary bytes after a correct header, with any number of fds, never crash."""
    fixed = spec.fixed_size
    payload = data.draw(
        st.one_of(
            st.binary(max_size=fixed + 80),
            st.binary(min_size=fixed, max_size=fixed).map(lambda b: b + b"\0" * 8),
        )
    )
    fds = data.draw(st.lists(fd, max_size=3))
    flags = c.TYPE_REPLY if spec.is_reply else data.draw(st.sampled_from([0, c.FLAG_NO_REPLY]))
    wire = struct.pack("<HHIII", 7, row.command, 16 + len(payload), flags, 0) + payload
    limits = codec.Limits(data.draw(st.integers(1, 1 << 20)), 16)
    try:
        event = codec.decode_message(wire, fds, limits)
    except ProtocolError:
        return
    assert isinstance(event, spec.event)


# ---------------------------------------------------------------- hot path = generic path


def _both_decoders(spec: codec.Spec, buf: bytes, fds: list[int], lim: codec.Limits) -> None:
    outcomes: list[object] = []
    for decode in (spec.decode, spec._decode):
        try:
            outcomes.append(decode((3, spec.command, len(buf) + 8, 0, 0), buf, 8, fds, lim))
        except ProtocolError as exc:
            outcomes.append((type(exc), str(exc), getattr(exc, "errno", None)))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("command", [Command.REGION_READ, Command.REGION_WRITE])
@settings(max_examples=300, deadline=None)
@given(
    offset=u64,
    region=u32,
    count=st.one_of(st.integers(0, 80), u32),
    tail=st.binary(max_size=80),
    fds=st.lists(fd, max_size=1),
    limit=st.integers(1, 100),
)
def test_fast_decoders_agree_with_the_table(
    command: Command,
    offset: int,
    region: int,
    count: int,
    tail: bytes,
    fds: list[int],
    limit: int,
) -> None:
    spec = codec.REQUESTS[command]
    assert spec.decode != spec._decode, "the hot commands have a fast decoder"
    payload = codec.REGION_ACCESS.pack(offset, region, count) + tail
    lim = codec.Limits(limit, 16)
    _both_decoders(spec, b"\xaa" * 8 + payload, fds, lim)
    _both_decoders(spec, b"\xaa" * 8 + payload[: len(payload) // 2], fds, lim)


@pytest.mark.parametrize(
    "cls", [ev.RegionRead, ev.RegionWrite, ev.RegionReadReply, ev.RegionWriteReply]
)
@CHECK
@given(data=st.data())
def test_fast_encoders_agree_with_the_table(cls: type[ev.Event], data: st.DataObject) -> None:
    event = data.draw(STRATEGIES[cls])
    fast = codec.ENCODERS[cls]
    generic = codec.SPEC_OF[cls].encode
    assert fast is not generic
    assert fast(event) == generic(event)


@pytest.mark.parametrize(
    "cls", [ev.RegionRead, ev.RegionWrite, ev.RegionReadReply, ev.RegionWriteReply]
)
def test_hot_events_keep_the_dataclass_signature(cls: type[ev.Event]) -> None:
    """Their faster `__init__` takes what the generated one took, positionally or by name."""
    params = list(inspect.signature(cls).parameters.values())
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    assert [p.default for p in params] == [
        inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default for f in fields
    ]
    values = {f.name: i + 1 for i, f in enumerate(fields)}
    assert cls(**values) == cls(*values.values())
    assert [getattr(cls(**values), name) for name in values] == list(values.values())
