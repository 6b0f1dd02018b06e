#!/usr/bin/env python3
"""devmodel end to end: a guest filling and verifying lent memory that a lender keeps taking back.

Three processes, wired the way a toolstack would wire them:

    reference lender (examples/reference_lender.py)   a simulated GPU memory manager whose VRAM
        |  lease protocol                              budget is smaller than the aperture, and
        v                                              which also evicts at random (--revoke-rate)
    devmodel run --lender-socket ...                   the device model
        |  vfio-user
        v
    QEMU (qemu-configs/run-qemu), a Linux guest        bartest's demo test: rounds of fill and
                                                       verify over BAR0 with mixed access sizes

Every round prints one table row: how much was verified, how many bytes came back wrong
(always 0, or devmodel has a bug), the cost of a trapped access, and how many page-ins,
faults and revokes the round caused. Below the table, redrawn a few times a second, the map of
the aperture (`query-map` on the device model's control socket, drawn by devmodel.mapview):
windows the lender evicted, windows paging back in as the guest faults on them, and the rates.
Without a terminal (a pipe, a log) the map is printed after each round instead. From a second
terminal, `devmodel attach CONTROL_SOCKET` then `watch map` shows the same (the demo prints
the socket's path; --control-socket fixes it). Ctrl-C (or --rounds N) stops QEMU, then the
device model (SIGTERM, its final counters are shown), then the lender (its summary is shown).
Every child dies with this program, also on errors and when this program is killed.

    ./scripts/demo                      # provisions the test bed first, then runs this
    examples/demo.py --rounds 3 --smp 2 --revoke-rate 5
    examples/demo.py --builtin-lender   # devmodel lends itself memory: no page-ins at all
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from devmodel import mapview
from devmodel.control.client import ConnectionLost, ControlClient, ControlError
from devmodel.logs import clean
from devmodel.sizes import parse_size
from devmodel_wire.aperture_map import ApertureMap, parse_reply
from devmodel_wire.control import ControlProtocolError, EventMessage

REPO = Path(__file__).resolve().parents[1]
QEMU_CONFIGS = REPO / "qemu-configs"
LENDER = REPO / "examples" / "reference_lender.py"
RESULT_PREFIX = "DEVMODEL-RESULT "
STOPPED_COUNTERS = "stopped; counters: "
MIB = 1 << 20
SPINNER = "|/-\\"


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def fmt_mib(n: int) -> str:
    return f"{n / MIB:g}M" if n % MIB == 0 else f"{n >> 10}K"


# ---------------------------------------------------------------------------- display


class Display:
    """On a terminal, the table and messages scroll while a live panel below them (the status
    line, and the aperture map once there is one) redraws in place: rich's Live display. Not
    on a terminal (logs, CI, a pipe), plain lines, and the map only when `print_map` asks."""

    def __init__(self, stream: IO[str]) -> None:
        self.console = Console(file=stream, highlight=False, soft_wrap=False)
        self.tty = self.console.is_terminal and not self.console.is_dumb_terminal
        self._status = ""
        self._spin = 0
        self._map: Text | None = None
        self._live: Live | None = None
        if self.tty:
            self._live = Live(console=self.console, auto_refresh=False, transient=True)
            self._live.start()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _refresh(self) -> None:
        if self._live is None:
            return
        width = self.console.size.width - 3
        status = Text(f"{SPINNER[self._spin]} {self._status}"[:width])
        parts = [status] if self._map is None else [Text(""), self._map, status]
        self._live.update(Group(*parts), refresh=True)

    def status(self, text: str) -> None:
        self._status = text
        if self.tty:
            self._spin = (self._spin + 1) % 4
            self._refresh()

    def map(self, screen: Text | None) -> None:
        """The live panel's map (a terminal only; `print_map` is for the rest)."""
        self._map = screen
        self._refresh()

    def print_map(self, screen: Text) -> None:
        self.console.print(screen)
        self.console.print()

    def line(self, text: str = "") -> None:
        """A permanent line, above the live panel if there is one (never wrapped by us: a log
        keeps its lines whole, a terminal wraps them as it always did)."""
        self.console.print(Text(text), soft_wrap=True)

    def step(self, what: str, seconds: float) -> None:
        self.line(f"  {what:<44} {seconds:5.1f} s")


class ApertureView:
    """The aperture map of the running device model, through its control socket: asked for
    at most a few times a second, drawn to fit the terminal (or 80x24 without one)."""

    INTERVAL = 0.5

    def __init__(self, path: Path, display: Display) -> None:
        self.path = path
        self.display = display
        self.client: ControlClient | None = None
        self.previous: ApertureMap | None = None
        self.events: deque[str] = deque(maxlen=mapview.EVENT_LINES)
        self.asked = 0.0

    def connect(self) -> None:
        """Connect, with a reader thread that takes every event as it comes: the device model
        drops a client that leaves 1024 events unread, and the lender's first burst of grants
        and evictions alone can be more than that between two maps."""
        self.client = ControlClient(str(self.path), timeout=5)
        self.client.start_reader(self._event)

    def _event(self, event: EventMessage) -> None:
        self.events.append(format_event(event))  # a deque: appended to from the reader thread

    def screen(self) -> Text | None:
        """A fresh map, or None once the device model is gone (the demo goes on without)."""
        if self.client is None:
            return None
        console = self.display.console
        width, height = console.size if self.display.tty else (80, 24)
        # The panel below the table: at most 16 rows of cells (a small aperture has fewer:
        # one cell per window), and room above it for the table's last rows.
        height = min(height - 6, mapview.RESERVED_LINES + 16)
        per_row, rows = mapview.grid_shape(width, height)
        try:
            m = parse_reply(self.client.execute("query-map", {"cells": per_row * rows}))
        except (ConnectionLost, ControlError, ControlProtocolError, OSError, TimeoutError) as exc:
            self.client.close()
            self.client = None
            self.display.line(f"  (no more aperture map: {type(exc).__name__}: {exc})")
            return None
        out = mapview.render(m, width, height, previous=self.previous, events=list(self.events))
        self.previous = m
        return out

    def tick(self) -> None:
        """On a terminal, redraw the live panel's map if it is time."""
        now = time.monotonic()
        if self.display.tty and now - self.asked >= self.INTERVAL:
            self.asked = now
            self.display.map(self.screen())

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def format_event(e: EventMessage) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e.time))
    data = " ".join(f"{k}={v:#x}" if k in ("offset", "length") and isinstance(v, int)
                    else f"{k}={v}" for k, v in e.data.items())
    return clean(f"[{when}] {e.name} {data}".rstrip())


# ---------------------------------------------------------------------------- children


class Child:
    """A child process in its own session (so the terminal's Ctrl-C reaches only us, and we stop
    the children in the right order), killed with its group on stop, SIGTERMed by the kernel if
    we die (setpriv --pdeathsig survives the exec)."""

    def __init__(self, name: str, argv: list[str], workdir: Path, *,
                 stdout: int | None = None) -> None:
        self.name = name
        self.argv = argv
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        setpriv = shutil.which("setpriv")
        full = [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                full, stdin=subprocess.DEVNULL,
                stdout=out if stdout is None else stdout, stderr=err,
                start_new_session=True, cwd=REPO)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> int:
        """`sig`, up to `grace` seconds to exit, then SIGKILL for the whole group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            rc = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait() if rc is None else rc

    def err(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def out(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""


def wait_for_socket(child: Child, path: Path, timeout: float, display: Display,
                    what: str) -> None:
    t0 = time.monotonic()
    while not path.is_socket():
        if not child.running():
            raise DemoError(f"{child.name} exited with status {child.proc.returncode} before "
                            f"listening:\n{tail(child.err())}")
        if time.monotonic() - t0 > timeout:
            raise DemoError(f"{child.name} did not listen on {path} within {timeout:g} s:\n"
                            f"{tail(child.err())}")
        display.status(f"{what} {time.monotonic() - t0:.1f} s")
        time.sleep(0.05)


class DemoError(Exception):
    """Something failed; the message says what, with the relevant log's end."""


def tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------------------- the run


def guest_lines(stream: IO[bytes], out: queue.Queue[str | None], log: IO[bytes]) -> None:
    """Reader thread: the guest console, line by line, into `out` (None at its end) and the
    console log."""
    for raw in stream:
        log.write(raw)
        log.flush()
        out.put(raw.decode(errors="replace").rstrip("\r\n"))
    out.put(None)


def parse_result(line: str) -> dict[str, Any] | None:
    """The result object on a console line; console text may come before or after it."""
    at = line.find(RESULT_PREFIX)
    if at < 0:
        return None
    with contextlib.suppress(json.JSONDecodeError):
        obj, _ = json.JSONDecoder().raw_decode(line, at + len(RESULT_PREFIX))
        if isinstance(obj, dict):
            return obj
    return None


COLUMNS = ("round", "MiB verified", "mismatches", "µs/access", "µs/read", "page-ins",
           "faults", "revokes", "seconds")
WIDTHS = (5, 12, 10, 9, 8, 8, 7, 7, 7)


def row(values: tuple[object, ...]) -> str:
    return "  ".join(f"{v!s:>{w}}" for v, w in zip(values, WIDTHS, strict=True))


class Demo:
    def __init__(self, args: argparse.Namespace, workdir: Path, display: Display) -> None:
        self.args = args
        self.workdir = workdir
        self.display = display
        self.children: list[Child] = []
        self.lender: Child | None = None
        self.devmodel: Child | None = None
        self.qemu: Child | None = None
        self.rounds: list[dict[str, Any]] = []
        self.end: dict[str, Any] | None = None
        self.interrupted = False
        self.devmodel_counters: dict[str, int] | None = None
        self.devmodel_last_line = ""
        self.lender_summary: dict[str, str] = {}
        self.control = (Path(args.control_socket) if args.control_socket
                        else workdir / "control" / "qmp.sock")
        self.view = ApertureView(self.control, display)
        # The table's header again before the next row, after a map came between rows.
        self.header_due = False

    # -- starting

    def start(self) -> None:
        a, d = self.args, self.display
        d.line(f"devmodel demo: BAR0 {fmt_mib(a.aperture)}, "
               + ("built-in lender (no eviction)" if a.builtin_lender else
                  f"reference lender with {fmt_mib(a.vram)} of VRAM, {a.revoke_rate:g} random "
                  f"evictions/s, move probability {a.move_probability:g}")
               + f"; guest with {a.smp} vCPU(s), {fmt_mib(a.bytes)} per round in "
               f"{max(1, a.bytes // a.piece)} pieces")
        t0 = time.monotonic()
        d.status("building the guest image")
        build = subprocess.run([str(QEMU_CONFIGS / "build-initramfs")], check=False,
                               capture_output=True, text=True)
        if build.returncode != 0:
            raise DemoError(f"qemu-configs/build-initramfs failed:\n{tail(build.stderr)}\n"
                            "Provision the test bed first: qemu-configs/provision (as root "
                            "once), or run ./scripts/demo, which does it.")
        self.initrd = build.stdout.strip().splitlines()[-1]
        d.step(f"guest image {Path(self.initrd).name}", time.monotonic() - t0)
        lender_sock = self.workdir / "lender.sock"
        if not a.builtin_lender:
            t0 = time.monotonic()
            argv = [sys.executable, str(LENDER), "--socket", str(lender_sock),
                    "--vram", str(a.vram), "--revoke-rate", f"{a.revoke_rate:g}",
                    "--move-probability", f"{a.move_probability:g}"]
            if a.seed is not None:
                argv += ["--seed", str(a.seed)]
            self.lender = self._spawn("lender", argv)
            wait_for_socket(self.lender, lender_sock, 20, d, "starting the reference lender")
            d.step("reference lender listening", time.monotonic() - t0)
        t0 = time.monotonic()
        dev_sock = self.workdir / "devmodel.sock"
        argv = [sys.executable, "-m", "devmodel", "run", "--socket-path", str(dev_sock),
                "--aperture-size", str(a.aperture), "--control-socket", str(self.control)]
        if not a.builtin_lender:
            argv += ["--lender-socket", str(lender_sock), "--domid", "1"]
        self.devmodel = self._spawn("devmodel", argv)
        wait_for_socket(self.devmodel, dev_sock, 20, d, "starting the device model")
        wait_for_socket(self.devmodel, self.control, 20, d, "starting the device model")
        d.step("device model listening", time.monotonic() - t0)
        try:
            self.view.connect()
        except (OSError, ConnectionLost, ControlError, ControlProtocolError) as exc:
            d.line(f"  (no aperture map: {exc})")
        d.line(f"  watch it from another terminal: {REPO / '.venv' / 'bin' / 'devmodel'} "
               f"attach {self.control}, then: watch map")
        append = (f"devmodel.rounds={a.rounds or 0} devmodel.bytes={a.bytes} "
                  f"devmodel.piece={a.piece}")
        argv = [str(QEMU_CONFIGS / "run-qemu"), "--socket", str(dev_sock), "--smp",
                str(a.smp), "--test", "demo", "--append", append, "--initrd", self.initrd,
                "--timeout", "0"]
        self.qemu = self._spawn("qemu", argv, stdout=subprocess.PIPE)
        self.boot_t0 = time.monotonic()

    def _spawn(self, name: str, argv: list[str], stdout: int | None = None) -> Child:
        child = Child(name, argv, self.workdir, stdout=stdout)
        self.children.append(child)
        return child

    # -- running

    def run(self) -> None:
        assert self.qemu is not None and self.qemu.proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        console = (self.workdir / "console.log").open("wb")
        reader = threading.Thread(target=guest_lines, args=(self.qemu.proc.stdout, lines,
                                                            console), daemon=True)
        reader.start()
        d = self.display
        last_console = ""
        started: float | None = None
        round_t0 = 0.0
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            else:
                if line is None:
                    break
            if line:
                if self.args.console:
                    d.line(f"  | {line}")
                result = parse_result(line)
                if result is None:
                    last_console = line.strip()
                elif result.get("event") == "start":
                    started = time.monotonic()
                    round_t0 = started
                    d.step(f"guest booted (slot {result.get('slot') or '?'}, "
                           f"{result.get('cpus')} vCPUs)", started - self.boot_t0)
                    if not result.get("slot"):
                        raise DemoError("the guest did not find the device")
                elif result.get("test") == "demo":
                    self._round(result)
                    round_t0 = time.monotonic()
                elif result.get("event") == "end":
                    self.end = result
                elif result.get("ok") is False:
                    raise DemoError(f"the guest failed: {result}")
            self.view.tick()
            now = time.monotonic()
            if started is None:
                d.status(f"booting the guest {now - self.boot_t0:4.1f} s  {last_console[:60]}")
            elif self.end is None:
                verified = sum(r["bytes"] for r in self.rounds) / MIB
                wrong = sum(r["mismatches"] for r in self.rounds)
                d.status(f"round {len(self.rounds) + 1}: filling and verifying "
                         f"{now - round_t0:4.1f} s; so far {verified:.2f} MiB verified, "
                         f"{wrong} mismatching  (Ctrl-C stops)")
        console.close()
        rc = self.qemu.stop(grace=5)
        if self.end is None and not self.interrupted:
            raise DemoError(f"QEMU ended (status {rc}) before the guest's end line:\n"
                            f"{tail(self.qemu.err())}")

    def _round(self, r: dict[str, Any]) -> None:
        counters = r.get("counters", {})
        before = self.rounds[-1].get("counters", {}) if self.rounds else {}
        if not self.rounds or self.header_due:
            self.display.line()
            self.display.line(row(COLUMNS))
            self.header_due = False
        self.rounds.append(r)

        def delta(key: str) -> int:
            return int(counters.get(key, 0)) - int(before.get(key, 0))

        self.display.line(row((
            r["round"], f"{r['bytes'] / MIB:.2f}", r["mismatches"],
            f"{r['ns_per_access'] / 1000:.1f}", f"{r['read_ns'] / 1000:.1f}",
            delta("page_ins"), delta("faults"), delta("revokes"), f"{r['ms'] / 1000:.1f}")))
        if r["mismatches"]:
            self.display.line(f"  first mismatch: {r.get('first_mismatch')}")
        if not self.display.tty:  # no live panel: the map after each round instead
            screen = self.view.screen()
            if screen is not None:
                self.display.line()
                self.display.print_map(screen)
                self.header_due = True

    # -- stopping

    def stop(self) -> None:
        """QEMU first (so that the device model never vanishes under a guest access), then the
        device model (it says BYE to the lender), then the lender (it prints its summary)."""
        d = self.display
        self.view.close()
        d.map(None)
        for child in (self.qemu, self.devmodel, self.lender):
            if child is None:
                continue
            d.status(f"stopping {child.name}")
            child.stop(signal.SIGTERM, grace=10)
        for child in self.children:  # anything else, whatever state it is in
            child.stop(signal.SIGKILL, grace=1)
        if self.devmodel is not None:
            lines = self.devmodel.err().strip().splitlines()
            self.devmodel_last_line = lines[-1] if lines else ""
            at = self.devmodel_last_line.find(STOPPED_COUNTERS)
            if at >= 0:
                with contextlib.suppress(ValueError, SyntaxError):
                    value = ast.literal_eval(self.devmodel_last_line[at +
                                                                     len(STOPPED_COUNTERS):])
                    if isinstance(value, dict):
                        self.devmodel_counters = {str(k): int(v) for k, v in value.items()}
        if self.lender is not None:
            out = self.lender.out()
            if "summary:" in out:
                for line in out.split("summary:", 1)[1].splitlines():
                    key, _, value = line.strip().partition(": ")
                    if key:
                        self.lender_summary[key] = value
        d.status("")
        d.close()

    def report(self) -> None:
        d = self.display
        d.line()
        verified = sum(r["bytes"] for r in self.rounds)
        mismatches = sum(r["mismatches"] for r in self.rounds)
        d.line(f"{len(self.rounds)} round(s), {verified / MIB:.2f} MiB verified, "
               f"{mismatches} mismatching byte(s)")
        if self.devmodel_counters is not None:
            c = self.devmodel_counters
            d.line("device model, final counters: " + ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in c.items() if v))
        elif self.devmodel_last_line:
            d.line(f"device model, last log line: {self.devmodel_last_line}")
        if self.lender_summary:
            s = self.lender_summary
            keys = ("grants", "revokes", "evictions", "random_evictions", "page_ins", "moves",
                    "page_in_failures", "vram_peak", "vram_capacity", "protocol_errors")
            d.line("lender summary: " + ", ".join(
                f"{k.replace('_', ' ')} {s[k]}" for k in keys if k in s))
        if self.args.summary_json:
            Path(self.args.summary_json).write_text(json.dumps({
                "rounds": self.rounds, "end": self.end, "interrupted": self.interrupted,
                "devmodel_counters": self.devmodel_counters,
                "devmodel_last_line": self.devmodel_last_line,
                "lender_summary": self.lender_summary,
                "builtin_lender": self.args.builtin_lender}, indent=1) + "\n")

    def ok(self) -> bool:
        """No byte came back wrong, and the guest finished its rounds cleanly (or was stopped
        with Ctrl-C, which is how a demo without --rounds ends)."""
        clean = all(r["mismatches"] == 0 for r in self.rounds)
        if self.interrupted:
            return clean
        return clean and bool(self.rounds) and self.end is not None and self.end["status"] == 0


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="demo.py", description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="The live map of the aperture is drawn below the rounds table. To watch it from "
        "a second terminal instead: `.venv/bin/devmodel attach CONTROL_SOCKET` (the demo prints "
        "the path; --control-socket fixes it), then `watch map` (Ctrl-C ends the view, `exit` "
        "the REPL; the demo goes on).")
    p.add_argument("--rounds", type=int, help="stop after N rounds (default: until Ctrl-C)")
    p.add_argument("--smp", type=int, default=2, help="guest vCPUs (default 2)")
    p.add_argument("--aperture", type=size_arg, default=64 * MIB, metavar="SIZE",
                   help="BAR0 size (default 64M)")
    p.add_argument("--vram", type=size_arg, metavar="SIZE",
                   help="the lender's VRAM budget (default: an eighth of the aperture, so "
                   "that the round's pieces do not all fit)")
    p.add_argument("--revoke-rate", type=float, default=2.0, metavar="R",
                   help="random evictions per second on top of the budget's (default 2)")
    p.add_argument("--move-probability", type=float, default=0.25, metavar="P",
                   help="chance that a page-in lands somewhere else in VRAM (default 0.25)")
    p.add_argument("--seed", type=int, help="the lender's random seed")
    p.add_argument("--builtin-lender", action="store_true",
                   help="no lender process: devmodel lends itself memory (nothing is evicted)")
    p.add_argument("--bytes", type=size_arg, default=1 * MIB, metavar="SIZE",
                   help="bytes filled and verified per round (default 1M: about 10-25 s a "
                   "round under TCG, every trapped read being a socket round trip)")
    p.add_argument("--piece", type=size_arg, default=64 << 10, metavar="SIZE",
                   help="the round's bytes come in pieces of this size spread evenly over the "
                   "aperture, each in another lease window (default 64K)")
    p.add_argument("--control-socket", metavar="PATH",
                   help="the device model's control socket (default: in the working directory); "
                   "its directory must be private (0700) or missing")
    p.add_argument("--console", action="store_true", help="echo the guest console")
    p.add_argument("--keep", action="store_true",
                   help="keep the working directory with every log (it is printed)")
    p.add_argument("--summary-json", metavar="PATH",
                   help="also write the rounds and both summaries to PATH as JSON")
    args = p.parse_args(argv)
    if args.vram is None:
        args.vram = max(args.aperture // 8, 2 * MIB)
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.smp < 1:
        p.error("--smp must be at least 1")
    return args


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="devmodel-demo."))
    try:
        yield path
    finally:
        if keep:
            print(f"logs kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    display = Display(sys.stdout)

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # SIGTERM and SIGHUP end the demo like Ctrl-C

    # Installed explicitly: a shell starts background jobs with SIGINT ignored, and Python then
    # leaves it ignored; the demo must stop cleanly on Ctrl-C, SIGTERM and SIGHUP alike.
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in stops:
        signal.signal(sig, terminate)
    with workdir(args.keep) as work:
        demo = Demo(args, work, display)
        error = ""
        try:
            demo.start()
            demo.run()
        except KeyboardInterrupt:
            demo.interrupted = True
            display.line("interrupted: stopping QEMU, the device model, the lender")
        except DemoError as exc:
            error = str(exc)
        finally:
            # A second Ctrl-C must not leave children behind: ignore it while stopping.
            for sig in stops:
                signal.signal(sig, signal.SIG_IGN)
            demo.stop()
        if error:
            display.line(f"demo failed: {error}")
        demo.report()
        return 0 if demo.ok() and not error else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
