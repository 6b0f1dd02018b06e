"""Transports run the device's put-off work once a guest's answer is out (DeviceBackend.follow_up).

The page-in poll leaves the lender's PAGE_IN_DONE, which follows the GRANT that answered an
access, to be received after that access's reply has gone (devmodel.polling.PageInPoll): if no
transport ran it, the lender link's reader would take it a scheduler pass later, which is
correct but slower. Here the vfio-user transport must run it exactly once each time the client
has its reply and stays quiet (the loop is about to park).
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trio

from devmodel.aperture import OwnedMemory
from devmodel.backend.device import DeviceBackend
from devmodel.counters import DeviceCounters
from devmodel.pci.function import APERTURE_BAR, PciFunction
from devmodel.pci.identity import PciIdentity
from devmodel.testing import VfioUserClient
from devmodel.transports.vfio_user import VfioUserServer

READS = 5
PATIENCE = 10.0  # seconds a step may take on a loaded machine before the test gives up


def test_the_vfio_user_loop_follows_up_after_each_answer(tmp_path: Path) -> None:
    trio.run(_follows_up, tmp_path, 0)
    trio.run(_follows_up, tmp_path, 50_000)  # with the socket's own adaptive polling too


async def _follows_up(tmp_path: Path, poll_max_ns: int) -> None:
    counters = DeviceCounters()
    backend = DeviceBackend(PciFunction(PciIdentity(), OwnedMemory(2 << 20), counters))
    calls: list[int] = []  # at each follow-up: how many BAR0 reads had been served
    lock = threading.Lock()

    def follow_up() -> None:
        with lock:
            calls.append(counters.trapped_reads)

    backend.follow_up = follow_up
    server = VfioUserServer(backend, counters, poll_max_ns=poll_max_ns)
    path = str(tmp_path / f"dev-{poll_max_ns}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def client() -> None:
        with VfioUserClient(path) as c:
            c.attach()
            for i in range(READS):
                assert c.read(APERTURE_BAR, i * 8, 8) == bytes(8)
                # Quiet until the loop, about to park, has run the follow-up ...
                wait_for(functools.partial(calls.__contains__, i + 1), f"after read {i + 1}")
            time.sleep(0.02)  # ... and only the one, however long the quiet lasts

    def wait_for(ready: Callable[[], bool], what: str) -> None:
        end = time.monotonic() + PATIENCE
        while time.monotonic() < end:
            with lock:
                if ready():
                    return
            time.sleep(0.001)
        raise AssertionError(f"waited {PATIENCE:g} s for a follow-up {what}")

    with listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listener)
            await trio.to_thread.run_sync(client)
            nursery.cancel_scope.cancel()
    assert [n for n in calls if n] == list(range(1, READS + 1))
