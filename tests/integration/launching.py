"""Starting `devmodel run` as real processes: as a toolstack launches it (`launch`, with a
control socket, a pidfile and --ready-fd) or bare (`start_devmodel`, ready once it accepts)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from devmodel.control.client import ControlClient


@dataclass
class _Process:
    """A `devmodel run` process and the file its stderr goes to."""

    proc: subprocess.Popen[bytes]
    socket_path: str
    stderr_path: Path
    STOP_TIMEOUT: ClassVar[float] = 10.0

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Send `sig` and return the exit status; killed (and TimeoutExpired) if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(self.STOP_TIMEOUT if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@dataclass
class DevmodelProcess(_Process):
    """`devmodel run --socket-path` started bare, ready once its socket accepts."""

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


def _accepts(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def start_devmodel(
    tmp_path: Path, *args: str, name: str = "dev.sock", transport: str = "vfio-user"
) -> DevmodelProcess:
    sock = str(tmp_path / name)
    if transport != "vfio-user":
        args = ("--transport", transport, *args)
    stderr_path = tmp_path / f"{name}.stderr"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devmodel", "run", "--socket-path", sock, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    # Generous: in the udmabuf VM (TCG, Python importing over 9p) on a loaded 2-core host the
    # first devmodel took more than 20 s to listen. A bound for a hang, not a speed test.
    deadline = time.monotonic() + 90
    # Wait until it accepts: a socket file alone may be a stale one left from before.
    while not _accepts(sock):
        if proc.poll() is not None:
            raise RuntimeError(f"devmodel exited {proc.returncode}: {stderr_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"devmodel did not listen in time: {stderr_path.read_text()}")
        time.sleep(0.02)
    return DevmodelProcess(proc, sock, stderr_path)


@dataclass
class Launched(_Process):
    """A `devmodel run` process started the way a toolstack would, ready when returned."""

    tmp: Path
    control_path: str
    pidfile: str
    extra: dict[str, str] = field(default_factory=dict)
    STOP_TIMEOUT: ClassVar[float] = 15.0

    def control(self) -> ControlClient:
        return ControlClient(self.control_path)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def devmodel_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "devmodel", *args]


def launch(
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    name: str = "dm",
    control: bool = True,
    ready_timeout: float = 20.0,
) -> Launched:
    """Start `devmodel run` with a socket, a control socket, a pidfile and --ready-fd; return
    once it said READY (or raise with its stderr)."""
    sock = str(tmp / f"{name}.sock")
    ctl = str(tmp / f"{name}-ctl" / "control.sock")
    pidfile = str(tmp / f"{name}.pid")
    stderr_path = tmp / f"{name}.stderr"
    read_end, write_end = os.pipe()
    argv = ["run", "--socket-path", sock, "--pidfile", pidfile, "--ready-fd", str(write_end)]
    if control:
        argv += ["--control-socket", ctl]
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            devmodel_argv(*argv, *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            pass_fds=(write_end,),
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], ready_timeout)
        said = os.read(read_end, 100) if ready else b""
    finally:
        os.close(read_end)
    if said != b"READY=1\n":
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"devmodel not ready ({said!r}): {stderr_path.read_text()}")
    return Launched(proc, sock, stderr_path, tmp=tmp, control_path=ctl, pidfile=pidfile)


@contextlib.contextmanager
def launched(tmp: Path, *args: str, **kw: object) -> Iterator[Launched]:
    dm = launch(tmp, *args, **kw)  # type: ignore[arg-type]
    try:
        yield dm
    finally:
        dm.kill()


def run_briefly(
    *args: str, timeout: float = 20.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        devmodel_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
    )
