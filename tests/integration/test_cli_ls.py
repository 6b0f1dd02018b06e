"""`devmodel ls DIR` over real instances: three running, one of them stopped with SIGSTOP, and
a stale socket; the stopped one is reported as not answering instead of hanging the listing."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from devmodel.control.listing import NOT_ANSWERING, RUNNING, STALE, find_sockets, probe_all
from devmodel.testing import VfioUserClient
from tests.integration.launching import Launched, launch, launched, run_briefly


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[Path, list[Launched]]]:
    """DIR/1, DIR/2, DIR/3: one instance each (domids 1-3), and DIR/9 a stale socket."""
    top = tmp_path / "run"
    started: list[Launched] = []
    try:
        for domid in (1, 2, 3):
            here = top / str(domid)
            here.mkdir(parents=True)
            started.append(launch(here, "--aperture-size", "16M", "--domid", str(domid)))
        stale = top / "9" / "control"
        stale.mkdir(parents=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(str(stale / "qmp.sock"))  # bound, never listening: what a crash leaves
        yield top, started
    finally:
        for dm in started:
            dm.kill()


def test_ls_lists_every_instance_and_does_not_wait_for_a_stopped_one(
    three: tuple[Path, list[Launched]],
) -> None:
    top, (one, two, three_) = three
    with VfioUserClient(one.socket_path) as guest:
        guest.attach()
        os.kill(two.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            found = trio.run(probe_all, find_sockets([str(top)]))
            took = time.monotonic() - t0
            listed = run_briefly("ls", "--json", str(top))
            table = run_briefly("ls", str(top))
        finally:
            os.kill(two.proc.pid, signal.SIGCONT)

    # Asked concurrently, each with its own deadline (0.8 s): the stopped one costs that, once.
    assert took < 2.0, took
    assert [(i.name, i.state) for i in found] == [
        ("1", RUNNING),
        ("2", NOT_ANSWERING),
        ("3", RUNNING),
        ("9", STALE),
    ]

    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert list(rows) == ["1", "2", "3", "9"]
    first, stopped, third, stale = rows["1"], rows["2"], rows["3"], rows["9"]
    assert (first["domid"], first["pid"], first["transport"]) == (1, one.proc.pid, "vfio-user")
    assert first["client_connected"] is True and third["client_connected"] is False
    assert first["lender"] == "builtin" and first["lender_connected"] is True
    assert first["leases"] == 8 and first["windows"]["resident"] == 8
    assert first["faults_per_second"] == 0.0
    assert third["domid"] == 3 and third["pid"] == three_.proc.pid
    # The kernel still names the listener's pid, and /proc says why it is silent.
    assert stopped["state"] == NOT_ANSWERING and stopped["pid"] == two.proc.pid
    assert "stopped" in stopped["detail"]
    assert stale["state"] == STALE and stale["pid"] is None

    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "NAME",
        "DOMID",
        "PID",
        "STATE",
        "TRANSPORT",
        "CLIENT",
        "LENDER",
        "LEASES",
        "WINDOWS",
        "FAULTS/S",
    ]
    assert lines[2].split()[:7] == [
        "1",
        "1",
        str(one.proc.pid),
        "running",
        "vfio-user",
        "yes",
        "builtin",
    ]
    assert "not answering" in lines[3] and "stopped" in lines[3]
    assert lines[5].startswith("9") and "stale socket" in lines[5]
    assert "4 instance(s), 2 answering" in table.stdout


def test_ls_counts_faults_per_second(tmp_path: Path) -> None:
    """Faults between the two samples become a rate (the built-in lender answers page-ins at
    once, so a guest reading evicted windows faults as fast as it can read)."""
    with (
        launched(tmp_path, "--aperture-size", "16M") as dm,
        VfioUserClient(dm.socket_path) as guest,
    ):
        guest.attach()
        control = dm.control()

        async def ask_while_faulting() -> list[float | None]:
            async with trio.open_nursery() as nursery:

                async def fault() -> None:
                    while True:
                        await trio.to_thread.run_sync(control.execute, "evict", {"all": True})
                        for offset in range(0, 16 << 20, 2 << 20):
                            await trio.to_thread.run_sync(guest.read, 0, offset, 8)

                nursery.start_soon(fault)
                found = await probe_all(find_sockets([dm.control_path]), 5.0, 1.0)
                nursery.cancel_scope.cancel()
            return [i.faults_per_second for i in found]

        [rate] = trio.run(ask_while_faulting)
        control.close()
    assert rate is not None and rate > 0


def test_ls_without_instances(tmp_path: Path) -> None:
    empty = run_briefly("ls", str(tmp_path))
    assert (empty.returncode, empty.stdout.strip()) == (
        0,
        f"no devmodel control sockets under {tmp_path}",
    )
    missing = run_briefly("ls", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no such file or directory" in missing.stderr
    default = run_briefly("ls", env={**os.environ, "DEVMODEL_RUNDIR": str(tmp_path / "none")})
    assert default.returncode == 0 and "does not exist" in default.stdout
