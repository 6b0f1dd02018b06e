"""devmodel/control/server.py in-process: permissions, peers, limits, slow and hostile clients."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from devmodel.control.server import ControlClient, ControlServer
from devmodel.control.toolstack import StartupError
from devmodel_wire.control import Command, CommandFailed
from tests.unit.control_support import split_json_line


async def echo(client: ControlClient, cmd: Command) -> object:
    if cmd.name == "fail":
        raise CommandFailed("as asked")
    if cmd.name == "crash":
        raise RuntimeError("bug")
    if cmd.name == "big":
        return "x" * 200_000
    return {"name": cmd.name, "arguments": cmd.arguments}


class Peer:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def line(self, timeout: float = 5.0) -> dict[str, object] | None:
        with trio.fail_after(timeout):
            while b"\n" not in self.buf:
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.buf += data
        obj, self.buf = split_json_line(self.buf)
        return obj

    async def send(self, obj: object) -> None:
        await self.stream.send_all(json.dumps(obj).encode() + b"\n")

    async def call(self, name: str, **arguments: object) -> dict[str, object]:
        await self.send({"execute": name, "arguments": arguments, "id": name})
        while True:
            msg = await self.line()
            assert msg is not None
            if "event" not in msg:
                return msg


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **kw: object) -> AsyncIterator[ControlServer]:
    """A ControlServer answering with `echo`, served for the block, closed after it."""
    server = ControlServer(str(tmp_path / "ctl" / "c.sock"), echo, {"package": "t"}, **kw)  # type: ignore[arg-type]
    server.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()
    server.close()


async def attach(server: ControlServer, negotiate: bool = True) -> Peer:
    peer = Peer(await trio.open_unix_socket(server.path))
    greeting = await peer.line()
    assert greeting is not None and "QMP" in greeting
    if negotiate:
        assert (await peer.call("qmp_capabilities"))["return"] == {
            "name": "qmp_capabilities",
            "arguments": {},
        }
    return peer


async def test_socket_and_directory_are_private_and_removed(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "ctl").st_mode) == 0o700
    assert not (tmp_path / "ctl").exists()


def test_a_directory_others_can_enter_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    server = ControlServer(str(shared / "c.sock"), echo, {})
    with pytest.raises(StartupError, match="accessible to group or others"):
        server.open()
    assert not (shared / "c.sock").exists()


async def test_a_peer_of_another_uid_is_refused(tmp_path: Path) -> None:
    async with serving(tmp_path, allowed_uids=frozenset({os.geteuid() + 4242})) as server:
        stream = await trio.open_unix_socket(server.path)
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""  # closed without a greeting
        assert server.refused_peers == 1


async def test_commands_errors_and_bugs(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        peer = await attach(server)
        reply = await peer.call("hello", x=1)
        assert reply == {"return": {"name": "hello", "arguments": {"x": 1}}, "id": "hello"}
        assert await peer.call("fail") == {
            "error": {"class": "GenericError", "desc": "as asked"},
            "id": "fail",
        }
        crash = await peer.call("crash")
        assert crash["error"] == {"class": "GenericError", "desc": "internal error: RuntimeError"}
        assert "return" in await peer.call("still-here")


async def test_events_only_after_negotiation(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        fresh = await attach(server, negotiate=False)
        ready = await attach(server)
        server.broadcast("LEASE_GRANTED", {"lease": 1})
        event = await ready.line()
        assert event is not None and event["event"] == "LEASE_GRANTED"
        ts = event["timestamp"]
        assert isinstance(ts, dict) and set(ts) == {"seconds", "microseconds"}
        await fresh.send({"execute": "x", "id": 1})
        refused = await fresh.line()
        assert refused is not None and refused["error"]["class"] == "CommandNotFound"  # type: ignore[index]


async def test_a_client_that_never_reads_is_dropped_and_others_go_on(tmp_path: Path) -> None:
    async with serving(tmp_path, send_queue=64) as server:
        sleeper = await attach(server)  # negotiates, then never reads again
        good = await attach(server)
        payload = {"blob": "y" * 4000}
        received = 0

        async def keep_reading() -> None:
            nonlocal received
            while True:
                data = await good.stream.receive_some(1 << 20)
                received += data.count(b"\n")

        async with trio.open_nursery() as inner:
            inner.start_soon(keep_reading)
            # The broadcasts never wait, whatever the sleeper does.
            with trio.fail_after(10):
                for i in range(2000):
                    server.broadcast("PAGE_IN_REQUESTED", {"i": i, **payload})
                    await trio.sleep(0)
                while received < 2000:
                    await trio.sleep(0.01)
            inner.cancel_scope.cancel()
        assert server.dropped_clients == 1
        with trio.fail_after(5):
            while len(server.clients) != 1:
                await trio.sleep(0.01)
        assert sleeper.stream.socket.fileno() >= 0
        good.buf = b""
        assert "return" in await good.call("alive")


async def test_a_client_pipelining_without_reading_is_dropped(tmp_path: Path) -> None:
    async with serving(tmp_path, send_queue=16) as server:
        flooder = await attach(server)
        line = b'{"execute":"big"}\n'
        with trio.fail_after(10):
            with trio.move_on_after(3):
                while server.dropped_clients == 0:
                    try:
                        await flooder.stream.send_all(line * 64)
                    except trio.BrokenResourceError:
                        break
        assert server.dropped_clients == 1
        other = await attach(server)
        assert "return" in await other.call("alive")


async def test_an_oversized_line_gets_an_error_then_the_door(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        peer = await attach(server)
        with contextlib.suppress(trio.BrokenResourceError):
            await peer.stream.send_all(b"{" + b" " * (70 << 10))
        error = await peer.line()
        assert error is not None and "longer than" in str(error["error"])
        assert await peer.line() is None


async def test_an_id_beyond_a_float_is_answered_and_the_server_goes_on(tmp_path: Path) -> None:
    """`"id":1e999` once parsed to inf: the reply echoing it raised ValueError out of the
    client's task, which took the control server (and its nursery) down."""
    async with serving(tmp_path) as server:
        peer = await attach(server)
        await peer.stream.send_all(b'{"execute":"query-status","id":1e999}\n')
        error = await peer.line()
        assert error is not None and "out of range" in str(error["error"])
        assert "return" in await peer.call("ok")
        other = await attach(server)
        assert "return" in await other.call("ok")


async def test_too_many_clients(tmp_path: Path) -> None:
    async with serving(tmp_path, max_clients=1) as server:
        first = await attach(server)
        extra = Peer(await trio.open_unix_socket(server.path))
        refusal = await extra.line()
        assert refusal is not None and "too many clients" in str(refusal["error"])
        assert await extra.line() is None
        assert "return" in await first.call("ok")


async def test_pipelined_commands_leave_room_for_the_device(tmp_path: Path) -> None:
    ticks = 0

    async def device() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    async with serving(tmp_path) as server, trio.open_nursery() as nursery:
        peer = await attach(server)
        nursery.start_soon(device)
        await peer.stream.send_all(b'{"execute":"x"}\n' * 2000)
        before = ticks
        for _ in range(2000):
            assert await peer.line() is not None
        assert ticks - before >= 1000  # the device ran between the commands
        nursery.cancel_scope.cancel()
