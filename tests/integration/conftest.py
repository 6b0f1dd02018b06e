"""Real processes: the device model started as a user would start it, over real sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class DevmodelProcess:
    proc: subprocess.Popen[bytes]
    socket_path: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def settled_fds(self, timeout: float = 5.0) -> int:
        """The fd count once it stops changing (a readiness probe may still be closing)."""
        deadline = time.monotonic() + timeout
        last = self.open_fds()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.open_fds()
            if now == last:
                return now
            last = now
        return last

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def _accepts(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def start_devmodel(tmp_path: Path, *args: str, name: str = "dev.sock") -> DevmodelProcess:
    sock = str(tmp_path / name)
    stderr_path = tmp_path / f"{name}.stderr"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmodel", "run", "--socket-path", sock, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    deadline = time.monotonic() + 20
    # Wait until it accepts: a socket file alone may be a stale one left from before.
    while not _accepts(sock):
        if proc.poll() is not None:
            raise RuntimeError(f"devmodel exited {proc.returncode}: {stderr_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"devmodel did not listen in time: {stderr_path.read_text()}")
        time.sleep(0.02)
    return DevmodelProcess(proc, sock, stderr_path)


@pytest.fixture
def devmodel(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DevmodelProcess]:
    marker = request.node.get_closest_marker("devmodel_args")
    args: tuple[str, ...] = tuple(marker.args) if marker else ()
    dm = start_devmodel(tmp_path, *args)
    try:
        yield dm
    finally:
        if dm.proc.poll() is None:
            os.killpg(dm.proc.pid, signal.SIGKILL)
            dm.proc.wait()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            sys.stderr.write(f"--- devmodel stderr ---\n{dm.stderr()}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
