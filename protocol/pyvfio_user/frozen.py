"""`frozen`: a frozen, slotted dataclass whose methods are shared instead of generated per class.

The protocols' typed events are many small immutable classes (pyvfio_user's ~45, the lease
protocol's ~30), and every one loads in every device model: a host runs one per guest.
`@dataclass(frozen=True, slots=True)` generates, compiles and keeps six functions per class
(`__init__`, `__repr__`, `__eq__`, `__hash__`, `__setattr__`, `__delattr__`): about 9 KB of
each instance's memory per class, 0.4 MB for pyvfio_user's events alone (docs/performance.md,
"Footprint of an idle instance"). Here only `__init__` is generated per class (it must have
the class's own signature, and it stores through the slot descriptors, which is also what makes
it fast: a frozen dataclass's `__init__` stores with `object.__setattr__`, about four times a
plain store, a tenth of the device model's time per trapped access once). The other methods
are the same functions for every class, and behave as the generated ones do: equality and hash
over the fields, in order, between instances of the very same class; the dataclass's repr;
`FrozenInstanceError` on any assignment or deletion; pickling and `copy` through the slots.

What dataclasses offer on top stays: `dataclasses.fields`, `replace`, `asdict`, `is_dataclass`,
`__match_args__`, `field(default=..., default_factory=...)`. Type checkers see a frozen
dataclass (`dataclass_transform`, frozen by default).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, Final, TypeVar, dataclass_transform

_T = TypeVar("_T")
_set = object.__setattr__


def _values(obj: object) -> tuple[object, ...]:
    return tuple(getattr(obj, f.name) for f in dataclasses.fields(obj))  # type: ignore[arg-type]


class _Shared:
    """The methods every class of `frozen` shares (copied into each; never a base class)."""

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return _values(self) == _values(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(_values(self))

    def __repr__(self) -> str:
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        body = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields if f.repr)
        return f"{self.__class__.__qualname__}({body})"

    def __setattr__(self, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __getstate__(self) -> list[object]:
        return list(_values(self))

    def __setstate__(self, state: list[object]) -> None:
        for f, value in zip(dataclasses.fields(self), state, strict=True):  # type: ignore[arg-type]
            _set(self, f.name, value)


_SHARED: Final = {
    name: _Shared.__dict__[name]
    for name in (
        "__eq__",
        "__hash__",
        "__repr__",
        "__setattr__",
        "__delattr__",
        "__getstate__",
        "__setstate__",
    )
}


def _init(cls: type) -> Callable[..., None]:
    """The class's `__init__`: its fields in order as parameters, each stored through its slot
    descriptor (bound here, once); a default_factory is called per instance."""
    env: dict[str, Any] = {"_MISSING": dataclasses.MISSING}
    params = []
    body = []
    for f in dataclasses.fields(cls):
        n = f.name
        env[f"_set_{n}"] = getattr(cls, n).__set__
        if f.default is not dataclasses.MISSING:
            env[f"_default_{n}"] = f.default
            params.append(f"{n}=_default_{n}")
        elif f.default_factory is not dataclasses.MISSING:
            env[f"_factory_{n}"] = f.default_factory
            params.append(f"{n}=_MISSING")
            body.append(f"    if {n} is _MISSING: {n} = _factory_{n}()\n")
        else:
            params.append(n)
        body.append(f"    _set_{n}(self, {n})\n")
    exec(f"def __init__(self, {', '.join(params)}):\n{''.join(body) or '    pass'}\n", env)
    init: Callable[..., None] = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def frozen(cls: type[_T]) -> type[_T]:
    """`@dataclass(frozen=True, slots=True)`, with the shared methods above.

    Every class of a hierarchy must use it (a plain dataclass under it would be mutable)."""
    documented = cls.__doc__ is not None
    new = dataclasses.dataclass(slots=True, init=False, repr=False, eq=False)(cls)
    for name, method in _SHARED.items():
        setattr(new, name, method)
    new.__init__ = _init(new)  # type: ignore[method-assign]
    if not documented:  # as dataclass does, from the signature (its own came before __init__)
        new.__doc__ = new.__name__ + str(inspect.signature(new))
    return new
