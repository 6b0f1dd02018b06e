"""A stock QMP client drives a real `devmodel run`'s control socket unchanged.

The README says a QMP client needs nothing new; this holds it to that with QEMU's own client
library, qemu.qmp (the one QEMU's iotests and qmp-shell use), not with devmodel's client. It is
asyncio and devmodel is trio, so devmodel runs as a process (as a toolstack starts it) and the
test drives qemu.qmp in an asyncio loop of its own. What qemu.qmp checks on the way: the greeting's
shape, negotiation (`qmp_capabilities` with `arguments: {}`, sent with no newline: QMP is a JSON
stream, not JSON lines), replies routed back by its own string ids, error replies as
ExecuteError with QMP's error class, events with QMP's timestamp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from devmodel.testing import VfioUserClient
from tests.integration.launching import Launched, launch

MiB = 1 << 20
EVENT_WAIT = 10.0


@pytest.fixture
def dm(tmp_path: Path) -> Iterator[Launched]:
    d = launch(tmp_path, "--aperture-size", "16M", "--domid", "9")
    yield d
    d.kill()


async def next_event(listener: EventListener, name: str) -> dict[str, Any]:
    """The next event called `name` (others, such as CLIENT_CONNECTED, are passed over)."""
    async with asyncio.timeout(EVENT_WAIT):
        while True:
            event = await listener.get()
            if event["event"] == name:
                return dict(event)


def guest_reads(socket_path: str, offset: int) -> bytes:
    """Attach as QEMU would and read 8 bytes of BAR0 (blocking: run in a thread)."""
    with VfioUserClient(socket_path) as guest:
        guest.attach()
        return guest.read(0, offset, 8)


async def session(dm: Launched) -> None:
    qmp = QMPClient("devmodel")
    await qmp.connect(dm.control_path)
    try:
        greeting = qmp.greeting
        assert greeting is not None
        assert str(greeting.QMP.version["package"]).startswith("devmodel ")
        assert list(greeting.QMP.capabilities) == []

        status = await qmp.execute("query-status")
        assert isinstance(status, dict)
        assert status["status"] == "running" and status["running"] is True
        assert status["domid"] == 9 and status["pid"] == dm.proc.pid

        page = await qmp.execute("query-windows", {"state": "resident", "limit": 2})
        assert isinstance(page, dict)
        assert [w["start"] for w in page["windows"]] == [0, 2 * MiB]
        assert page["next"] == 4 * MiB

        stats = await qmp.execute("query-stats")
        assert isinstance(stats, dict)
        assert stats["windows"]["resident"] == 8 and "fault" in stats["latency"]

        # Errors: QMP's classes, raised by qemu.qmp as ExecuteError.
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("no-such-command")
        assert err.value.error_class == "CommandNotFound"
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("query-windows", {"limit": "ten"})
        assert err.value.error_class == "GenericError" and "limit" in str(err.value)

        # Events: a testing-aid eviction, then a guest's read that pages the window back in.
        with qmp.listener() as listener:
            assert await qmp.execute("evict", {"offset": 2 * MiB}) == {"evicted": [2]}
            revoked = await next_event(listener, "LEASE_REVOKED")
            assert revoked["data"] == {"lease": 2, "mode": "EVICT"}
            assert set(revoked["timestamp"]) == {"seconds", "microseconds"}
            read = asyncio.create_task(asyncio.to_thread(guest_reads, dm.socket_path, 2 * MiB))
            connected = await next_event(listener, "CLIENT_CONNECTED")
            assert connected["data"]["transport"] == "vfio-user"
            asked = await next_event(listener, "PAGE_IN_REQUESTED")
            assert asked["data"]["offset"] == 2 * MiB
            granted = await next_event(listener, "LEASE_GRANTED")
            assert granted["data"]["offset"] == 2 * MiB
            assert len(await read) == 8

        after = await qmp.execute("query-stats")
        assert isinstance(after, dict) and after["counters"]["page_ins"] == 1
    finally:
        await qmp.disconnect()


def test_qemu_qmp_client_runs_queries_and_receives_events(dm: Launched) -> None:
    asyncio.run(session(dm))
