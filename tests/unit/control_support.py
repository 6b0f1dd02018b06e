"""What the control tests share: an Instance built as devmodel/app.py builds it, without sockets."""

from __future__ import annotations

import json

import trio

from devmodel.config import Settings
from devmodel.control import commands
from devmodel.control.instance import (
    BuiltinLenderView,
    Instance,
    Lender,
    Runtime,
    build_instance,
)
from devmodel.control.server import ControlClient, Peer
from devmodel.counters import DeviceCounters
from devmodel.leases.builtin_lender import BuiltinLender
from devmodel.leases.engine import LeaseEngine
from devmodel.metrics.timing import AccessTiming
from devmodel.pci.function import PciFunction
from devmodel.pci.identity import PciIdentity
from devmodel.pci.registers import Feature
from devmodel_wire.control import Command, ServerConnection

MiB = 1 << 20


def split_json_line(buf: bytes) -> tuple[dict[str, object], bytes]:
    """The JSON object on the first line of `buf` (which holds a LF), and what follows it."""
    line, _, rest = buf.partition(b"\n")
    obj = json.loads(line)
    assert isinstance(obj, dict)
    return obj, rest


def instance(
    engine: LeaseEngine, timing: AccessTiming, lender: Lender, settings: Settings | None = None
) -> Instance:
    """An Instance as devmodel/app.py builds it, around `engine` (no sockets, no transport)."""
    settings = settings or Settings(socket_path="/x")
    device = PciFunction(PciIdentity(), engine, engine.counters, features=Feature.LENT)
    stops: list[str] = []
    return build_instance(
        settings, engine, timing, device, lender, lambda: False, stops.append, Runtime()
    )


def make() -> tuple[LeaseEngine, BuiltinLender, Instance]:
    counters = DeviceCounters()
    timing = AccessTiming()
    engine = LeaseEngine(8 * MiB, 2 * MiB, counters, timing=timing)
    lender = BuiltinLender(engine, 2 * MiB)
    lender.lend_everything()
    inst = instance(engine, timing, BuiltinLenderView(lender))
    return engine, lender, inst


def client() -> ControlClient:
    send, receive = trio.open_memory_channel[bytes](10)
    return ControlClient(1, Peer(1, 0, 0), ServerConnection(), send, receive)


async def call(inst: Instance, name: str, **args: object) -> object:
    return await commands.execute(inst, client(), Command(name, dict(args)))
