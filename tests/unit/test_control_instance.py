"""devmodel/control/instance.py: the frozen Instance, its Runtime, the lender views."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from devmodel.config import Settings
from devmodel.control import commands
from devmodel.control.instance import BuiltinLenderView, LinkLenderView, Runtime
from devmodel.control.server import ControlClient, Peer
from devmodel.counters import DeviceCounters
from devmodel.leases.engine import LeaseEngine
from devmodel.leases.lender_link import LenderLink
from devmodel_wire.control import Command, ServerConnection
from tests.unit.control_support import MiB, make


def test_the_instance_is_frozen() -> None:
    engine, lender, inst = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        inst.engine = engine  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        inst.lender = BuiltinLenderView(lender)  # type: ignore[misc]
    # What moves while the device model runs lives in the Runtime it holds.
    inst.runtime.status = "running"
    assert inst.runtime.status == "running"
    engine.close()
    lender.close()


def test_the_runtime_counts_events_and_broadcasts_them_once_there_is_a_control_server() -> None:
    runtime = Runtime()
    runtime.emit("LEASE_GRANTED", {"lease": 1})  # no control server yet: counted only
    sent: list[tuple[str, dict[str, object]]] = []

    class Server:
        clients: dict[int, object] = {1: object()}  # noqa: RUF012

        def broadcast(self, name: str, data: dict[str, object]) -> None:
            sent.append((name, data))

    runtime.control = Server()  # type: ignore[assignment]
    runtime.emit("LEASE_GRANTED", {"lease": 2})
    runtime.broadcast("POLICY_CHANGED", {"old": "all-ones", "new": "zeros"})
    assert runtime.events == {"LEASE_GRANTED": 2}  # broadcast() alone does not count
    assert [n for n, _ in sent] == ["LEASE_GRANTED", "POLICY_CHANGED"]
    assert runtime.control_clients() == 1


def test_lender_views_describe_the_lender_each_kind_has() -> None:
    engine, lender, _inst = make()
    builtin = BuiltinLenderView(lender)
    assert builtin.describe() == {"kind": "builtin", "connected": True}
    assert builtin.connected and builtin.revocable_here and builtin.target is lender
    other = LeaseEngine(8 * MiB, 2 * MiB, DeviceCounters())
    link = LenderLink(other, "/nonexistent/lender.sock", 3)
    view = LinkLenderView(link)
    assert not view.connected and not view.revocable_here
    assert view.describe() == {
        "kind": "socket",
        "socket": "/nonexistent/lender.sock",
        "connected": False,
        "sessions": 0,
        "last_end_reason": "",
        "timeouts": {"hello": 2.0, "ping": 2.0, "ping_interval": 5.0, "write": 2.0},
    }
    engine.close()
    lender.close()


async def test_status_reports_the_runtime_and_the_lender_view() -> None:
    engine, lender, inst = make()
    send, receive = trio.open_memory_channel[bytes](10)
    client = ControlClient(1, Peer(1, 0, 0), ServerConnection(), send, receive)
    status = await commands.execute(inst, client, Command("query-status", {}))
    assert isinstance(status, dict)
    assert status["status"] == "starting" and status["running"] is False
    assert status["lender"] == {"kind": "builtin", "connected": True}
    s = inst.settings
    assert (status["aperture_size"], status["granule"]) == (s.aperture_size, s.granule)
    assert status["granule_source"] == s.sources.get("granule", "default")
    inst.runtime.status = "running"
    status = await commands.execute(inst, client, Command("query-status", {}))
    assert isinstance(status, dict) and status["running"] is True
    engine.close()
    lender.close()


def test_commands_see_settings_through_the_instance_not_a_copy() -> None:
    engine, lender, inst = make()
    assert isinstance(inst.settings, Settings)
    assert not [s for s in commands.available(inst) if s.name == "python"]
    inst.settings.debug_console = True  # Settings stay the app's own (mutable) object
    assert [s for s in commands.available(inst) if s.name == "python"]
    engine.close()
    lender.close()
