"""pyvfio_user.frozen behaves as `@dataclass(frozen=True, slots=True)` does, for what the
protocols' events use: construction (positional, keyword, defaults, default factories, the
errors), equality, hash, repr, immutability, pickling and copying, dataclasses' functions,
pattern matching. Each check runs on a `frozen` class and on its stock-dataclass twin."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmodel_wire import lease
from devmodel_wire.lease import events as lease_events
from pyvfio_user import events as ev
from pyvfio_user.frozen import frozen


@frozen
class Base:
    msg_id: int


@frozen
class Light(Base):
    KIND: ClassVar[int] = 7
    offset: int
    data: bytes = b""
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class StockBase:
    msg_id: int


@dataclass(frozen=True, slots=True)
class Stock(StockBase):
    KIND: ClassVar[int] = 7
    offset: int
    data: bytes = b""
    tags: tuple[str, ...] = field(default_factory=tuple)


def twins(*args: Any, **kwargs: Any) -> tuple[Light, Stock]:
    return Light(*args, **kwargs), Stock(*args, **kwargs)


values = st.tuples(
    st.integers(), st.integers(), st.binary(max_size=4), st.lists(st.text(max_size=2)).map(tuple)
)


@given(values, values)
def test_equality_hash_and_repr_are_the_dataclass_ones(
    a: tuple[Any, ...], b: tuple[Any, ...]
) -> None:
    light_a, stock_a = twins(*a)
    light_b, stock_b = twins(*b)
    assert (light_a == light_b) == (stock_a == stock_b) == (a == b)
    assert (light_a != light_b) == (stock_a != stock_b)
    assert hash(light_a) == hash(stock_a)
    assert repr(light_a) == repr(stock_a).replace("Stock(", "Light(", 1)
    other: object = stock_a
    assert light_a != other and light_a != Base(a[0])  # another class is never equal
    assert dataclasses.astuple(light_a) == dataclasses.astuple(stock_a)


def test_construction_defaults_and_errors() -> None:
    light, stock = twins(1, offset=2)
    assert dataclasses.asdict(light) == dataclasses.asdict(stock)
    assert Light(1, 2).tags is not None and Light(1, 2, b"x", ("t",)).tags == ("t",)
    assert Light.__match_args__ == Stock.__match_args__ == ("msg_id", "offset", "data", "tags")
    assert Light.KIND == 7 and "KIND" not in [f.name for f in dataclasses.fields(Light)]
    wrong: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((1,), {}),
        ((1, 2, b"", (), 5), {}),
        ((1, 2), {"nope": 3}),
    ]
    for args, kwargs in wrong:
        with pytest.raises(TypeError):
            Light(*args, **kwargs)
        with pytest.raises(TypeError):
            Stock(*args, **kwargs)


def test_frozen_slotted_picklable_and_replaceable() -> None:
    light = Light(1, 2, b"ab", ("x",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        light.offset = 3  # type: ignore[misc]  # (and mypy must see it frozen: warn_unused_ignores)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loose: Any = light
        loose.other = 1  # (the stock twin raises TypeError here: a CPython 3.11 bug)
    objects: list[Any] = [light, Stock(1, 2, b"ab", ("x",))]
    for obj in objects:
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.offset = 3
        with pytest.raises(dataclasses.FrozenInstanceError):
            del obj.offset
        assert not hasattr(obj, "__dict__")
        assert pickle.loads(pickle.dumps(obj)) == obj
        assert copy.copy(obj) == obj and copy.deepcopy(obj) == obj
    assert dataclasses.replace(light, offset=9) == Light(1, 9, b"ab", ("x",))
    assert dataclasses.is_dataclass(light)
    match light:
        case Light(1, offset, data=b"ab"):
            assert offset == 2
        case _:
            pytest.fail("no match")


def test_every_event_is_frozen_and_shares_the_methods() -> None:
    """The protocols' events all use `frozen` (a stock dataclass among them would still pass
    every other test, and cost its generated methods again)."""
    classes = [
        c
        for module in (ev, lease_events)
        for c in vars(module).values()
        if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == module.__name__
    ]
    assert len(classes) > 50
    for cls in classes:
        assert cls.__eq__ is Light.__eq__ and cls.__setattr__ is Light.__setattr__, cls
        assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"


def test_the_lease_package_exports_load_at_first_use() -> None:
    """devmodel_wire.lease names its exports lazily; each one resolves, to its module's object."""
    assert sorted(lease._MODULE_OF) == sorted(lease.__all__)
    for name in lease.__all__:
        module = __import__(f"devmodel_wire.lease.{lease._MODULE_OF[name]}", fromlist=[name])
        assert getattr(lease, name) is getattr(module, name)
    assert set(lease.__all__) <= set(dir(lease))
    with pytest.raises(AttributeError):
        lease.Nope  # noqa: B018
