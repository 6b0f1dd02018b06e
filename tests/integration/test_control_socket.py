"""The control socket of a real `devmodel run`: QMP conformance, events from the device,
hostile and slow clients (the guest's accesses are served throughout), metrics over HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from devmodel.control.client import ControlClient, ControlError
from devmodel.testing import VfioUserClient
from tests.integration.launching import Launched, launch
from tests.unit.control_support import split_json_line

MiB = 1 << 20


@pytest.fixture
def dm(tmp_path: Path) -> Iterator[Launched]:
    d = launch(tmp_path, "--aperture-size", "16M", "--domid", "4")
    yield d
    d.kill()


class Raw:
    """A line-level client, to send what a well-behaved client would not."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def line(self) -> dict[str, object] | None:
        while b"\n" not in self.buf:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:  # closed with our unread garbage in its buffer
                return None
            if not data:
                return None
            self.buf += data
        obj, self.buf = split_json_line(self.buf)
        return obj

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, object]:
        while True:
            msg = self.line()
            assert msg is not None, "connection closed"
            if "event" not in msg:
                return msg


def test_permissions(dm: Launched) -> None:
    assert stat.S_IMODE(os.stat(dm.control_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(Path(dm.control_path).parent).st_mode) == 0o700


def test_greeting_negotiation_ids_and_errors(dm: Launched) -> None:
    c = Raw(dm.control_path)
    greeting = c.line()
    assert greeting is not None
    qmp = greeting["QMP"]
    assert isinstance(qmp, dict) and qmp["capabilities"] == []
    assert qmp["version"]["package"].startswith("devmodel ")
    c.send(b'{"execute":"query-status","id":"early"}\n')
    assert c.reply() == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        "id": "early",
    }
    c.send(b'{"execute":"qmp_capabilities","id":0}\n')
    assert c.reply() == {"return": {}, "id": 0}
    c.send(b'{"execute":"query-status","id":[1,{"a":null}]}\n')
    status = c.reply()
    assert status["id"] == [1, {"a": None}]
    assert status["return"]["status"] == "running" and status["return"]["domid"] == 4  # type: ignore[index]
    cases = [
        b"}{",
        b'"just a string"',
        b'{"execute":"query-status","extra":1,"id":5}',
        b'{"execute":"query-windows","arguments":{"limit":"ten"},"id":6}',
        b'{"execute":"query-windows","arguments":{"limit":0},"id":7}',
        b'{"execute":"no-such-thing","id":8}',
        b'{"execute":"evict","arguments":{"offset":1,"all":true},"id":9}',
        b'{"execute":"query-status","arguments":{"x":1},"id":10}',
        b"\xff\xfe\xfd",
        b"[" * 50000,
    ]
    for line in cases:
        c.send(line + b"\n")
        reply = c.reply()
        assert "error" in reply, (line[:40], reply)
        error = reply["error"]
        assert isinstance(error, dict) and set(error) == {"class", "desc"}
    c.send(b'{"execute":"query-version","id":"after"}\n')
    assert c.reply()["id"] == "after"  # the session survived all of that


def test_an_oversized_line_drops_that_client_only(dm: Launched) -> None:
    c = Raw(dm.control_path)
    c.line()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        c.send(b'{"execute":"query-status","arguments":{"pad":"' + b"x" * (1 << 20))
    error = c.line()
    assert error is not None and "longer than" in str(error["error"])
    assert c.line() is None
    with ControlClient(dm.control_path) as ok, VfioUserClient(dm.socket_path) as guest:
        guest.attach()
        guest.write(0, 0, b"12345678")
        assert guest.read(0, 0, 8) == b"12345678"
        assert isinstance(ok.execute("query-status"), dict)


def test_a_client_that_never_reads_cannot_stall_the_device(dm: Launched) -> None:
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(dm.control_path)
    hog.settimeout(0.5)
    hog.sendall(b'{"execute":"qmp_capabilities"}\n')
    with VfioUserClient(dm.socket_path) as guest:
        guest.attach()
        worst = 0.0
        sent = 0
        deadline = time.monotonic() + 20
        with ControlClient(dm.control_path) as watcher:
            while time.monotonic() < deadline:
                try:
                    hog.sendall(b'{"execute":"query-metrics"}\n' * 50)
                    sent += 50
                except (TimeoutError, BrokenPipeError, ConnectionResetError):
                    pass
                start = time.monotonic()
                guest.write(0, 8 * (sent % 1000), sent.to_bytes(8, "little"))
                assert guest.read(0, 8 * (sent % 1000), 8) == sent.to_bytes(8, "little")
                worst = max(worst, time.monotonic() - start)
                stats = watcher.execute("query-stats")
                assert isinstance(stats, dict)
                if stats["control"]["dropped"] >= 1:
                    break
            else:
                pytest.fail("the client that never reads was not dropped")
        assert worst < 1.0, worst
    assert "its send queue is full" in dm.stderr() or "has not read" in dm.stderr()
    hog.close()


def test_events_follow_the_device(dm: Launched) -> None:
    with ControlClient(dm.control_path) as ctl:
        with VfioUserClient(dm.socket_path) as guest:
            guest.attach()
            assert ctl.read_event().name == "CLIENT_CONNECTED"
            guest.write(0, 2 * MiB, b"kept ok!")
            assert ctl.execute("evict", {"offset": 2 * MiB}) == {"evicted": [2]}
            revoked = ctl.read_event()
            assert revoked.name == "LEASE_REVOKED" and revoked.data == {"lease": 2, "mode": "EVICT"}
            assert abs(revoked.time - time.time()) < 60
            windows = ctl.execute("query-windows", {"state": "evicted"})
            assert isinstance(windows, dict) and len(windows["windows"]) == 1
            assert guest.read(0, 2 * MiB, 8) == b"kept ok!"  # paged back in
            names = [ctl.read_event().name, ctl.read_event().name]
            assert names == ["PAGE_IN_REQUESTED", "LEASE_GRANTED"]
        assert ctl.read_event().name == "CLIENT_DISCONNECTED"
        stats = ctl.execute("query-stats")
        assert isinstance(stats, dict)
        assert stats["counters"]["page_ins"] == 1
        latency = stats["latency"]
        assert isinstance(latency, dict)
        assert latency["access"]["count"] == 2 and latency["fault"]["count"] == 1
        assert latency["revoke"]["count"] == 1


def test_several_clients_and_trace(dm: Launched) -> None:
    clients = [ControlClient(dm.control_path) for _ in range(5)]
    try:
        for i, c in enumerate(clients):
            assert isinstance(c.execute("query-status"), dict), i
        assert clients[0].execute("trace", {"enable": True}) == {"trace": True}
        with VfioUserClient(dm.socket_path) as guest:
            guest.attach()
            guest.read(0, 0x1238, 8)
        assert clients[1].execute("trace", {"enable": False}) == {"trace": False}
        for c in clients:
            assert c.read_event().name == "CLIENT_CONNECTED"
    finally:
        for c in clients:
            c.close()
    deadline = time.monotonic() + 5
    while "read 8 at 0x1238" not in dm.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "read 8 at 0x1238" in dm.stderr()


def test_the_debug_console_needs_its_flag(dm: Launched, tmp_path: Path) -> None:
    with ControlClient(dm.control_path) as ctl:
        with pytest.raises(ControlError) as err:
            ctl.execute("python", {"code": "1+1"})
        assert err.value.error_class == "CommandNotFound"
        names = ctl.execute("query-commands")
        assert isinstance(names, list) and "python" not in {c["name"] for c in names}
    debug = launch(tmp_path, "--debug-console", name="debug")
    try:
        with ControlClient(debug.control_path) as ctl:
            answer = ctl.execute("python", {"code": "engine.lease_count"})
            assert answer == {"output": "", "result": "128"}
            tree = ctl.execute("python", {"code": "print(tasks())"})
            assert isinstance(tree, dict) and "ControlServer" in str(tree["output"])
        assert debug.stop() == 0
        log = debug.stderr()
        assert "debug console is enabled" in log
        assert "debug console client 1 (pid" in log and "engine.lease_count" in log
        assert "closed after 2 statement(s)" in log
    finally:
        debug.kill()


def test_metrics_over_http_and_the_control_socket(tmp_path: Path) -> None:
    dm = launch(tmp_path, "--metrics-listen", "127.0.0.1:0", "--domid", "6")
    try:
        with ControlClient(dm.control_path) as ctl:
            status = ctl.execute("query-status")
            assert isinstance(status, dict)
            url = str(status["metrics"])
            text = ctl.execute("query-metrics")
        assert isinstance(text, dict) and 'devmodel_grants_total{domid="6"} 128' in text["text"]
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = response.read().decode()
        assert 'devmodel_leases{domid="6"} 128' in body
        assert "# TYPE devmodel_access_seconds histogram" in body
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=10)
        assert err.value.code == 404
        assert dm.stop() == 0
    finally:
        dm.kill()
