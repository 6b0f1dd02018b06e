"""`devmodel attach` driven through a pseudo-terminal against a live instance, as a person would:
completion, history, tables, events above the prompt, watch, the debug console, quit."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyte
import pytest

from devmodel.control.client import ControlClient
from devmodel.testing import VfioUserClient
from tests.integration.launching import Launched, launch

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][AB0-2]|\x1b[=>]")


class Terminal:
    """A process on a pty: type into it, wait for what it prints."""

    def __init__(
        self, argv: list[str], env: dict[str, str], size: tuple[int, int] | None = None
    ) -> None:
        self.master, slave = os.openpty()
        if size is not None:  # rows, columns: what the program finds with TIOCGWINSZ
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))

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
            self.pump(min(left, 0.2))

    def pump(self, timeout: float) -> None:
        """Read what the process printed within `timeout` into `seen`."""
        ready, _, _ = select.select([self.master], [], [], timeout)
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


# ---------------------------------------------------------------------------- the aperture map

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def big(tmp_path: Path) -> Iterator[Launched]:
    """64 GiB of 2 MiB windows: 32768 of them, far more than an 80x24 screen has cells."""
    dm = launch(tmp_path, "--aperture-size", "64G", "--domid", "5", ready_timeout=60)
    yield dm
    dm.kill()


class Screen:
    """What an 80x24 terminal shows of a process on `term`'s pty: pyte applies the cursor
    moves, clears and redraws of rich's Live display as a real terminal would."""

    def __init__(self, term: Terminal) -> None:
        self.term = term
        self.screen = pyte.Screen(80, 24)
        self.stream = pyte.ByteStream(self.screen)
        self.fed = 0

    def lines(self) -> list[str]:
        self.term.pump(0.05)
        self.stream.feed(self.term.seen[self.fed :])
        self.fed = len(self.term.seen)
        return [line.rstrip() for line in self.screen.display]

    def wait_for(self, check: Callable[[list[str]], bool], timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if check(lines):
                return lines
            if time.monotonic() > deadline:
                raise AssertionError("screen never matched:\n" + "\n".join(lines))


def grid(lines: list[str]) -> dict[str, str]:
    """The map's rows by their offset label ("0", "4G", ...), once all 16 rows of 64 glyphs and
    the lines below them are on the screen (the screen may be caught halfway through a redraw);
    until then {}."""
    rows = {}
    for line in lines:
        m = re.fullmatch(r"\s*(\d+[KMGT]?) ([#+.EeRrPpXx]+)", line)
        if m:
            rows[m.group(1)] = m.group(2)
    whole = len(rows) == 16 and all(len(r) == 64 for r in rows.values())
    return rows if whole and any(x.startswith("paging in:") for x in lines) else {}


def test_watch_map_follows_revokes_and_faults_on_an_80x24_terminal(
    big: Launched, tmp_path: Path
) -> None:
    env = {**os.environ, "TERM": "xterm-256color", "HOME": str(tmp_path)}
    for name in ("NO_COLOR", "COLUMNS", "LINES", "INPUTRC"):
        env.pop(name, None)
    term = Terminal(
        [sys.executable, "-m", "devmodel", "attach", big.control_path, "--history", "none"],
        env,
        size=(24, 80),
    )
    screen = Screen(term)
    try:
        term.expect(r"devmodel> ")
        term.type("watch map 0.2\n")
        lines = screen.wait_for(lambda s: len(grid(s)) == 16)
        assert "32768 windows of 2M; one cell = 32 windows (64M)" in lines[0]
        assert all(row == "#" * 64 for row in grid(lines).values())
        assert any("legend: # resident  E evicted  R revoking  P paging-in" in x for x in lines)
        # The lender takes two windows back: their cells turn evicted, in place.
        with ControlClient(big.control_path) as ctl:
            ctl.execute("evict", {"offset": 5 * GiB})
            ctl.execute("evict", {"offset": 2 * MiB})
        lines = screen.wait_for(
            lambda s: (
                any("windows: 2 evicted, 32766 resident" in x for x in s)
                and grid(s).get("4G", "")[16:17] == "e"
            )
        )
        rows = grid(lines)
        assert rows["0"] == "e" + "#" * 63 and rows["4G"] == "#" * 16 + "e" + "#" * 47
        screen.wait_for(lambda s: any("LEASE_REVOKED lease=" in x for x in s))  # last events
        # A client faults one back in: that cell is resident again, the other stays evicted.
        with VfioUserClient(big.socket_path) as guest:
            guest.attach()
            guest.read(0, 5 * GiB, 8)
        lines = screen.wait_for(
            lambda s: (
                grid(s).get("4G") == "#" * 64
                and any("windows: 1 evicted, 32767 resident" in x for x in s)
                and any(re.search(r"page-ins \d+\.\d/s .*\(totals \d+, 1, 2\)", x) for x in s)
            )
        )
        assert grid(lines)["0"][0] == "e"
        assert len(lines) == 24 and all(len(x) < 80 for x in lines)
        term.type("\x03")
        term.expect(r"devmodel> ")
        term.type("exit\n")
        assert term.proc.wait(10) == 0
    finally:
        term.close()


def test_map_through_a_pipe_is_glyphs_with_a_legend(big: Launched) -> None:
    with ControlClient(big.control_path) as ctl:
        ctl.execute("evict", {"offset": 63 * GiB})
    env = {**os.environ, "COLUMNS": "80", "LINES": "24", "TERM": "xterm-256color"}
    done = subprocess.run(
        [sys.executable, "-m", "devmodel", "attach", big.control_path, "-c", "map"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout  # a pipe gets no escape sequences, colour or other
    lines = done.stdout.splitlines()
    assert len(lines) <= 24 and all(len(x) < 80 for x in lines)
    assert "BAR0 64G: 32768 windows of 2M; one cell = 32 windows (64M)" in lines[0]
    rows = grid(lines)
    assert len(rows) == 16 and rows["60G"] == "#" * 48 + "e" + "#" * 15
    legend = next(x for x in lines if x.startswith("legend:"))
    for name in ("resident", "evicted", "revoking", "paging-in", "lost", "vacant"):
        assert name in legend


@pytest.mark.parametrize(
    ("term_name", "no_color"), [("xterm-256color", True), ("dumb", False)], ids=["NO_COLOR", "dumb"]
)
def test_map_on_a_terminal_without_colour_is_glyphs(
    big: Launched, tmp_path: Path, term_name: str, no_color: bool
) -> None:
    """NO_COLOR keeps styles such as bold but no colour; a dumb terminal gets no escape at all.
    Either way the glyphs alone carry the states."""
    with ControlClient(big.control_path) as ctl:
        ctl.execute("evict", {"offset": 0})
    env = {**os.environ, "TERM": term_name, "HOME": str(tmp_path)}
    for name in ("NO_COLOR", "COLUMNS", "LINES"):
        env.pop(name, None)
    if no_color:
        env["NO_COLOR"] = "1"
    argv = [sys.executable, "-m", "devmodel", "attach", big.control_path, "-c", "map"]
    term = Terminal(argv, env, size=(24, 80))
    try:
        term.expect(r"paging in: none")
        assert term.proc.wait(10) == 0
        term.pump(0.2)
    finally:
        term.close()
    colours = re.findall(rb"\x1b\[[0-9;]*m", term.seen)
    assert not any(re.search(rb"[\[;](3[0-9]|9[0-7]|38)[;m]", c) for c in colours), colours
    if term_name == "dumb":
        assert b"\x1b" not in term.seen
    text = ANSI.sub(b"", term.seen).decode().replace("\r", "")
    rows = grid([*text.splitlines(), "paging in:"])
    assert rows["0"] == "e" + "#" * 63 and len(rows) == 16
