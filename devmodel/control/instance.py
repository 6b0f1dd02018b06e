"""The running device model as the control commands see it: a frozen `Instance`.

devmodel/app.py builds one `Instance`, once, when everything it names exists; commands can
read it but not rewire it. What does change while the device model runs is kept apart, in
`Runtime` (status, event counts, the control server that broadcasts events), so that what is
fixed and what moves are visible in the types. Commands reach the lender and the transport
through small interfaces (`Lender`, `transport_connected`), not through the objects that run
them, so no command can reach further into the app than it needs.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from devmodel.counters import DeviceCounters
from devmodel.leases.engine import LeaseEngine
from devmodel.metrics.exposition import DevmodelCollector, Gauge
from devmodel.metrics.timing import AccessTiming

if TYPE_CHECKING:
    from devmodel.config import Settings
    from devmodel.control.server import ControlServer
    from devmodel.leases.builtin_lender import BuiltinLender
    from devmodel.leases.lender_link import LenderLink
    from devmodel.pci.function import PciFunction

__all__ = [
    "BuiltinLenderView",
    "Instance",
    "Lender",
    "LinkLenderView",
    "Runtime",
    "device_collector",
]


class Lender(Protocol):
    """The lender, built-in or on a socket, as much as commands need to know of it."""

    @property
    def connected(self) -> bool: ...

    @property
    def revocable_here(self) -> bool:
        """Whether the testing aids may take leases back: only leases the device model lent
        itself (the built-in lender); an external lender owns its leases."""
        ...

    def describe(self) -> dict[str, object]:
        """query-status's `lender` entry: at least `kind` and `connected`."""
        ...

    @property
    def target(self) -> object:
        """The object behind this view, for the debug console only."""
        ...


@dataclass(frozen=True, slots=True)
class BuiltinLenderView:
    """The built-in lender (no --lender-socket): always there, and the device model's own."""

    target: BuiltinLender
    connected: bool = True
    revocable_here: bool = True

    def describe(self) -> dict[str, object]:
        return {"kind": "builtin", "connected": True}


@dataclass(frozen=True, slots=True)
class LinkLenderView:
    """An external lender through the lender link (--lender-socket)."""

    target: LenderLink
    revocable_here: bool = False

    @property
    def connected(self) -> bool:
        return self.target.connected

    def describe(self) -> dict[str, object]:
        link = self.target
        return {
            "kind": "socket",
            "socket": link.path,
            "connected": link.connected,
            "sessions": link.sessions,
            "last_end_reason": link.last_end_reason,
            # The deadlines the link holds the lender to, in seconds (--lender-*-timeout): a
            # session that ended "within N s" can be matched to the setting that ended it.
            "timeouts": {
                "hello": link.hello_timeout,
                "ping": link.ping_timeout,
                "ping_interval": link.ping_interval,
                "write": link.write_timeout,
            },
        }


@dataclass(eq=False, slots=True)
class Runtime:
    """What changes while the device model runs (the one mutable part of an `Instance`)."""

    status: str = "starting"
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    # Set once the control socket exists (it is built with a reference to the Instance).
    control: ControlServer | None = None

    def emit(self, name: str, data: dict[str, object]) -> None:
        """Count an event and send it to every control client (the engine's `on_event`)."""
        self.events[name] += 1
        control = self.control
        if control is not None and control.clients:  # most of the time nobody listens
            control.broadcast(name, data)

    def broadcast(self, name: str, data: dict[str, object]) -> None:
        """Send an event to every control client, uncounted (the commands' own events)."""
        if self.control is not None:
            self.control.broadcast(name, data)

    def control_clients(self) -> int:
        return len(self.control.clients) if self.control is not None else 0


@dataclass(frozen=True, eq=False, slots=True)
class Instance:
    """The running device model as commands see it (built once by devmodel/app.py)."""

    settings: Settings
    engine: LeaseEngine
    counters: DeviceCounters
    timing: AccessTiming
    device: PciFunction
    lender: Lender
    # True while a transport client (QEMU) is attached; always False for the Xen transport.
    transport_connected: Callable[[], bool]
    request_stop: Callable[[str], None]
    metrics: DevmodelCollector
    runtime: Runtime
    metrics_address: tuple[str, int] | None = None
    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)

    def uptime(self) -> float:
        return round(time.monotonic() - self.started_monotonic, 3)


def build_instance(
    settings: Settings,
    engine: LeaseEngine,
    timing: AccessTiming,
    device: PciFunction,
    lender: Lender,
    transport_connected: Callable[[], bool],
    request_stop: Callable[[str], None],
    runtime: Runtime,
    *,
    metrics_address: tuple[str, int] | None = None,
    started: float | None = None,
) -> Instance:
    """The Instance around `engine` (and its counters), with the metrics of those same parts."""
    started = time.time() if started is None else started
    counters = engine.counters
    return Instance(
        settings=settings,
        engine=engine,
        counters=counters,
        timing=timing,
        device=device,
        lender=lender,
        transport_connected=transport_connected,
        request_stop=request_stop,
        metrics=device_collector(
            settings, engine, counters, timing, lender, transport_connected, runtime, started
        ),
        runtime=runtime,
        metrics_address=metrics_address,
        started=started,
    )


def device_collector(
    settings: Settings,
    engine: LeaseEngine,
    counters: DeviceCounters,
    timing: AccessTiming,
    lender: Lender,
    transport_connected: Callable[[], bool],
    runtime: Runtime,
    started: float,
) -> DevmodelCollector:
    """The metrics of one device model: its counters, histograms and live gauges."""

    def gauges() -> Mapping[str, Gauge]:
        return {
            "leases": ("live leases (resident or being revoked)", engine.lease_count),
            "windows": ("aperture windows by state", dict(engine.state_counts())),
            "accesses_in_flight": ("accesses waiting inside the engine", engine.in_flight),
            "transport_client_connected": (
                "1 while a transport client (QEMU) is attached",
                int(transport_connected()),
            ),
            "lender_connected": ("1 while the lender is connected", int(lender.connected)),
            "control_clients": (
                "clients attached to the control socket",
                runtime.control_clients(),
            ),
            "aperture_bytes": ("size of BAR0", engine.size),
            "start_time_seconds": ("when the device model started (unix time)", started),
        }

    labels = {"domid": str(settings.domid)}
    return DevmodelCollector(counters, timing.histograms(), gauges, labels)
