"""What the lease-engine tests share (this module holds no tests itself)."""

from __future__ import annotations

from devmodel.leases.engine import LeaseEngine
from devmodel.leases.states import WindowState
from devmodel_wire.lease.constants import RevokeMode

S = WindowState
EVICT, RELEASE = RevokeMode.EVICT, RevokeMode.RELEASE
APERTURE = 1 << 20


def state(engine: LeaseEngine, offset: int) -> WindowState:
    """The state of the window at `offset`, VACANT where there is none."""
    w = engine.window_at(offset)
    return S.VACANT if w is None else w.state
