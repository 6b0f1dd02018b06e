"""`devmodel attach` driven through a pseudo-terminal against a live instance, as a person would:
completion, history, tables, events above the prompt, watch, the debug console, quit."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.launching import Launched, launch

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][AB0-2]|\x1b[=>]")


class Terminal:
    """A process on a pty: type into it, wait for what it prints."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()

        def controlling_terminal() -> None:
            # A session of its own whose controlling terminal is the pty, so that Ctrl-C
            # typed there is a SIGINT, as in a real terminal.
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            preexec_fn=controlling_terminal,  # noqa: PLW1509 (two syscalls, no locks taken)
            close_fds=True,
        )
        os.close(slave)
        self.seen = b""
        self.mark = 0

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """Wait until `pattern` appears after the previous match; returns the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = ANSI.sub(b"", self.seen).decode(errors="replace").replace("\r", "")
            m = rx.search(text, self.mark)
            if m:
                self.mark = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen; screen:\n{text[-3000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # EIO: the other side is gone
                    if self.proc.poll() is not None:
                        time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Launched]:
    dm = launch(tmp_path, "--debug-console", "--aperture-size", "16M", "--domid", "5")
    yield dm
    dm.kill()


def attach(dm: Launched, tmp_path: Path, *extra: str) -> Terminal:
    env = {**os.environ, "TERM": "dumb", "HOME": str(tmp_path), "COLUMNS": "120"}
    env.pop("INPUTRC", None)
    argv = [
        sys.executable,
        "-m",
        "devmodel",
        "attach",
        dm.control_path,
        "--history",
        str(tmp_path / "history"),
        *extra,
    ]
    term = Terminal(argv, env)
    term.expect(r"attached to devmodel [\d.]+ \(pid \d+\), domain 5, running, lender builtin")
    term.expect(r"devmodel> ")
    return term


def test_a_session(instance: Launched, tmp_path: Path) -> None:
    term = attach(instance, tmp_path)
    try:
        # Completion of a command the instance reports, then an argument.
        term.type("wind\t")
        term.expect(r"windows ")
        term.type("lim\t")
        term.expect(r"limit=")
        term.type("2\n")
        term.expect(r"START\s+END\s+SIZE\s+STATE\s+LEASE\s+PROT\s+WAITERS")
        term.expect(r"0x200000\s+0x400000\s+2M\s+resident\s+2\s+rw")
        term.expect(r"more: windows cursor=0x400000")
        # An action and its event, shown as it arrives.
        term.type("evict 0x200000\n")
        term.expect(r"LEASE_REVOKED lease=2 mode=EVICT")
        term.expect(r"evicted lease\(s\): 2")
        term.type("windows evi\t")
        term.expect(r"windows evicted ")
        term.type("\n")
        term.expect(r"0x200000\s+0x400000\s+2M\s+evicted\s+2")
        # Tables for stats; then history: Ctrl-P brings the last line back.
        term.type("stats\n")
        term.expect(r"COUNTER\s+VALUE\s+RATE")
        term.expect(r"revokes\s+1")
        term.expect(r"LATENCY\s+COUNT\s+MEAN\s+P50\s+P90\s+P99\s+MAX")
        term.expect(r"revoke\s+1\s+")
        term.type("\x10\n")
        term.expect(r"stats")
        term.expect(r"COUNTER\s+VALUE\s+RATE")
        # A live view until Ctrl-C.
        term.type("watch stats 0.2\n")
        term.expect(r"every 0.2s: stats of domain 5")
        term.expect(r"every 0.2s: stats of domain 5")
        term.type("\x03")
        term.expect(r"devmodel> ")
        # Errors are one line and the session goes on.
        term.type("policy sometimes\n")
        term.expect(r"error: Parameter 'policy' must be one of all-ones, zeros, error")
        term.type("nonsense\n")
        term.expect(r"usage: unknown command 'nonsense'")
        # The debug console.
        term.type("python\n")
        term.expect(r"debug console: Python runs inside the device model")
        term.expect(r"py> ")
        term.type("engine.lease_count\n")
        term.expect(r"\n7\n")
        term.type("for w in list(engine.windows())[:1]:\n")
        term.expect(r"\.\.\. ")
        term.type("    print('state', w.state.value)\n\n")
        term.expect(r"state resident")
        term.type("\n")
        term.expect(r"devmodel> ")
        term.type("exit\n")
        assert term.proc.wait(10) == 0
    finally:
        term.close()
    history = (tmp_path / "history").read_text()
    assert "evict 0x200000" in history and "stats" in history
    assert instance.proc.poll() is None  # leaving the REPL leaves the device model running
    log = instance.stderr()
    assert "debug console client" in log and "engine.lease_count" in log


def test_verbose_json_and_quit(instance: Launched, tmp_path: Path) -> None:
    term = attach(instance, tmp_path, "-v")
    try:
        term.type("status\n")
        term.expect(r'> \{"execute":"query-status","id":\d+\}')
        term.expect(r'< \{"return":\{"status":"running"')
        term.expect(r"domid\s+5")
        term.type("quit\n")
        term.expect(r"stop the device model of domain 5\? \[y/N\] ")
        term.type("n\n")
        term.expect(r"not stopped")
        assert instance.proc.poll() is None
        term.type("quit\n")
        term.expect(r"\[y/N\] ")
        term.type("y\n")
        term.expect(r"SHUTDOWN reason=quit from control")
        term.expect(r"the device model closed the connection")
        assert term.proc.wait(10) == 0
        assert instance.proc.wait(15) == 0
    finally:
        term.close()


def test_scripted_commands(instance: Launched) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "devmodel",
            "attach",
            instance.control_path,
            "-c",
            "leases limit=2",
            "-c",
            "config",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"LEASE\s+START\s+END\s+SIZE\s+WINDOWS\s+STATE", done.stdout)
    assert "8 live lease(s); more: leases cursor=0x400000" in done.stdout
    assert re.search(r"aperture-size\s+16M\s+command line", done.stdout)
    bad = subprocess.run(
        [sys.executable, "-m", "devmodel", "attach", instance.control_path, "-c", "evict"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 1 and "error:" in bad.stdout


def test_attach_to_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "devmodel", "attach", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("devmodel attach: cannot connect to")
