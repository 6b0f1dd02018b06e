"""`devmodel attach CONTROL_SOCKET`: the debug REPL of a running device model.

A thin client of the control socket (it can do nothing a toolstack could not), made for people:

- line editing and a history file (GNU readline), tab completion of the commands *the instance
  reports* (`query-commands`), of their argument names and of their allowed values;
- short names and positional arguments (`windows evicted`, `evict 0x200000`, `policy zeros`,
  `trace on`), `key=value` arguments (values are JSON, hex, or sizes like 2M), or raw JSON;
- tables for windows, leases and stats; `-v` echoes every JSON line sent and received;
- events printed as they arrive, above the prompt; `watch stats` redraws a live view (rates per
  second, latency percentiles, the latest events) until Ctrl-C;
- `map` draws the aperture (devmodel.mapview, from one `query-map`), `watch map` redraws it
  in place (rich's Live display) until Ctrl-C; without colour it says the same in glyphs;
- `python` enters the debug console (`py>`), when the instance allows it (--debug-console).

`quit` stops the *device model* (after a confirmation when interactive); `exit` or Ctrl-D
leaves the REPL.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from rich.console import Console
from rich.control import Control
from rich.live import Live
from rich.segment import ControlType
from rich.text import Text

from devmodel import mapview
from devmodel.control.client import ConnectionLost, ControlClient, ControlError
from devmodel.logs import clean
from devmodel.sizes import format_size, parse_size
from devmodel_wire.aperture_map import ApertureMap, parse_reply
from devmodel_wire.control import ControlProtocolError, EventMessage, decode_json

__all__ = [
    "PROMPT",
    "PY_PROMPT",
    "Repl",
    "UsageError",
    "main",
    "parse_value",
    "table",
]

PROMPT: Final = "devmodel> "
PY_PROMPT: Final = "py> "
PY_MORE: Final = "... "
# Back to the start of the line and erase it: room for an event above the prompt.
CLEAR_LINE: Final = Control(
    (ControlType.CARRIAGE_RETURN,), (ControlType.ERASE_IN_LINE, 2)
).segment.text

# Short names -> (command, the argument a first bare word fills, or None).
SHORTCUTS: Final[dict[str, tuple[str, str | None]]] = {
    "status": ("query-status", None),
    "windows": ("query-windows", "state"),
    "leases": ("query-leases", None),
    "stats": ("query-stats", None),
    "config": ("query-config", None),
    "metrics": ("query-metrics", None),
    "commands": ("query-commands", None),
    "policy": ("set-policy", "policy"),
    "set-policy": ("set-policy", "policy"),
    "evict": ("evict", "offset"),
    "revoke": ("revoke", "lease"),
    "trace": ("trace", "enable"),
    "query-windows": ("query-windows", "state"),
}
LOCAL_WORDS: Final = ("help", "exit", "watch", "events", "python", "verbose", "map")
WATCHABLE: Final = ("stats", "status", "windows", "leases", "map")


class Repl:
    def __init__(
        self,
        client: ControlClient,
        *,
        interactive: bool,
        verbose: bool = False,
        show_events: bool = True,
        out: Any = None,
    ) -> None:
        self.client = client
        self.interactive = interactive
        self.verbose = verbose
        self.show_events = show_events
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.prompt = PROMPT
        self.in_input = False
        self.closed: str | None = None
        self.recent_events: deque[EventMessage] = deque(maxlen=8)
        self.watching = False
        self.commands: dict[str, dict[str, Any]] = {}
        self.status: dict[str, Any] = {}
        self.failures = 0
        # Set when the REPL itself closes the connection (no "closed" message then).
        self.leaving = False
        client.on_wire = self._wire

    # ------------------------------------------------------------------ output

    def say(self, text: str = "") -> None:
        with self.lock:
            self.out.write(text + "\n")
            self.out.flush()

    def _wire(self, direction: str, data: bytes) -> None:
        if not self.verbose:
            return
        for line in data.decode(errors="replace").splitlines():
            self._above_prompt(f"{direction} {clean(line)}")

    def _above_prompt(self, text: str) -> None:
        """Print a line while the user may be typing: clear, print, redraw prompt and buffer."""
        with self.lock:
            if self.in_input and self.interactive:
                buf = _line_buffer()
                self.out.write(CLEAR_LINE + text + "\n" + self.prompt + buf)
            else:
                self.out.write(text + "\n")
            self.out.flush()

    def on_event(self, event: EventMessage) -> None:
        self.recent_events.append(event)
        if self.show_events and not self.watching:
            self._above_prompt(format_event(event))

    def on_close(self, exc: BaseException) -> None:
        if self.closed is None and not self.leaving:
            self.closed = "the device model closed the connection"
            if self.in_input:
                # Wake the main thread out of input(): there is nothing left to type to.
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    # ------------------------------------------------------------------ setup

    def load(self) -> None:
        """What the instance offers: its commands (for completion and help) and its status."""
        specs = self.client.execute("query-commands")
        assert isinstance(specs, list)
        self.commands = {str(s["name"]): s for s in specs if isinstance(s, dict)}
        status = self.client.execute("query-status")
        assert isinstance(status, dict)
        self.status = status

    def banner(self) -> str:
        s = self.status
        lender = s.get("lender", {})
        return (
            f"attached to devmodel {s.get('version')} (pid {s.get('pid')}), domain "
            f"{s.get('domid')}, {s.get('status')}, lender {lender.get('kind')}"
            f"{' (connected)' if lender.get('connected') else ''}, {s.get('leases')} leases.\n"
            "'help' lists commands, Tab completes, 'exit' or Ctrl-D leaves."
        )

    # ------------------------------------------------------------------ the loop

    def loop(self) -> int:
        while self.closed is None:
            try:
                line = self._input(PROMPT)
            except EOFError:
                self.say()
                break
            except KeyboardInterrupt:
                if self.closed is not None:
                    self.say()
                    break
                self.say("^C")
                continue
            if self.closed is not None:
                break
            if line.strip() in ("exit", "bye"):
                break
            self.handle(line)
        self.leaving = True
        if self.closed is not None:
            self.say(f"[{self.closed}]")
        return 0

    def _input(self, prompt: str) -> str:
        self.prompt = prompt
        self.in_input = True
        try:
            if self.closed is not None:  # closed while we were busy: nothing to read for
                raise KeyboardInterrupt
            return input(prompt)
        finally:
            self.in_input = False

    def handle(self, line: str) -> None:
        """One REPL line; errors are printed, never raised (the loop goes on)."""
        try:
            self._handle(line.strip())
        except ControlError as exc:
            self.failures += 1
            self.say(f"error: {exc.desc} ({exc.error_class})")
        except UsageError as exc:
            self.failures += 1
            self.say(f"usage: {exc}")
        except (ConnectionLost, OSError, ControlProtocolError) as exc:
            self.failures += 1
            self.closed = f"connection lost: {exc}"
        except TimeoutError:
            self.failures += 1
            self.say("error: no answer from the device model (timed out)")

    def _handle(self, line: str) -> None:
        if not line or line.startswith("#"):
            return
        if line.startswith("{"):
            self._raw(line)
            return
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word == "help":
            self.say(self.help(rest))
        elif word == "verbose":
            self.verbose = rest != "off"
            self.say(f"verbose {'on' if self.verbose else 'off'}")
        elif word == "events":
            self.show_events = rest != "off"
            self.say(f"events {'shown' if self.show_events else 'hidden'}")
        elif word == "watch":
            self.watch(rest)
        elif word == "map":
            if rest:
                raise UsageError("map takes no arguments ('watch map [SECONDS]' redraws it)")
            self.show_map()
        elif word == "python":
            if rest:
                self._python(rest)
            else:
                self.python_console()
        elif word == "quit":
            self.quit()
        else:
            name, args = self.parse(word, rest)
            self.show(name, self.client.execute(name, args, timeout=30))

    def _raw(self, line: str) -> None:
        try:
            decode_json(line.encode())
        except ValueError as exc:
            raise UsageError(f"not JSON: {exc}") from None
        msg = self.client.request(line.encode() + b"\n")
        self.say(
            json.dumps(
                msg.value
                if hasattr(msg, "value")
                else {
                    "error": {
                        "class": getattr(msg, "error_class", ""),
                        "desc": getattr(msg, "desc", ""),
                    }
                },
                indent=2,
            )
        )

    # ------------------------------------------------------------------ parsing

    def parse(self, word: str, rest: str) -> tuple[str, dict[str, object]]:
        name, positional = SHORTCUTS.get(word, (word, None))
        if name not in self.commands:
            raise UsageError(f"unknown command {word!r}; 'help' lists them")
        spec = self.commands[name].get("arguments", {})
        args: dict[str, object] = {}
        for token in rest.split():
            key, eq, value = token.partition("=")
            if eq:
                args[key] = parse_value(value, spec.get(key, {}).get("type"))
            elif word == "evict" and token == "all":
                args["all"] = True
            elif positional is not None and positional not in args:
                args[positional] = parse_value(token, spec.get(positional, {}).get("type"))
            else:
                raise UsageError(f"{word}: unexpected {token!r} (use name=value)")
        return name, args

    # ------------------------------------------------------------------ rendering

    def show(self, name: str, value: object) -> None:
        render = RENDERERS.get(name)
        self.say(render(value) if render else json.dumps(value, indent=2))

    def help(self, topic: str) -> str:
        if topic:
            name = SHORTCUTS.get(topic, (topic, None))[0]
            spec = self.commands.get(name)
            if spec is None:
                return f"no command {topic!r}"
            lines = [f"{name}: {spec.get('help', '')}"]
            for arg, info in spec.get("arguments", {}).items():
                extra = f" one of {', '.join(info['choices'])}" if info.get("choices") else ""
                req = " (required)" if info.get("required") else ""
                lines.append(f"  {arg}={info.get('type')}{req}{extra}  {info.get('help', '')}")
            return "\n".join(lines)
        width = max(len(n) for n in self.commands) + 2
        lines = ["commands of this instance (name key=value ...):"]
        lines += [f"  {n:<{width}}{s.get('help', '')}" for n, s in sorted(self.commands.items())]
        lines += [
            "short forms: status, windows [STATE], leases, stats, config, metrics, "
            "policy POLICY, evict OFFSET|all, revoke LEASE, trace on|off",
            "REPL: help [CMD], map (the aperture), "
            "watch stats|status|windows|leases|map [SECONDS [COUNT]], "
            "events on|off, verbose on|off, python [CODE], {raw JSON}, exit",
        ]
        return "\n".join(lines)

    # ------------------------------------------------------------------ live view

    def watch(self, rest: str) -> None:
        words = rest.split()
        what = words[0] if words else "stats"
        if what not in WATCHABLE:
            raise UsageError(f"watch {' | '.join(WATCHABLE)} [SECONDS [COUNT]]")
        try:
            interval = float(words[1]) if len(words) > 1 else 1.0
            count = int(words[2]) if len(words) > 2 else 0
        except ValueError:
            raise UsageError("watch WHAT [SECONDS [COUNT]]") from None
        interval = max(0.1, interval)
        if what == "map":
            previous_map: ApertureMap | None = None

            def map_screen(console: Console) -> Text:
                nonlocal previous_map
                previous_map, screen = self.map_frame(console, previous_map)
                return screen

            self.redraw(map_screen, interval, count)
            return
        name = SHORTCUTS[what][0]
        previous: tuple[float, dict[str, Any]] | None = None

        def screen(console: Console) -> Text:
            nonlocal previous
            value = self.client.execute(name, {}, timeout=10)
            now = time.monotonic()
            if what == "stats" and isinstance(value, dict):
                body = render_stats(value, previous, now)
                previous = (now, value)
            else:
                body = RENDERERS[name](value)
            header = (
                f"every {interval:g}s: {what} of domain {self.status.get('domid')} "
                f"({datetime.datetime.now():%H:%M:%S}); Ctrl-C stops"
            )
            events = "\n".join(format_event(e) for e in list(self.recent_events)[-5:])
            return Text(f"{header}\n\n{body}\n\nlatest events:\n{events or '  (none)'}")

        self.redraw(screen, interval, count)

    # ------------------------------------------------------------------ the aperture map

    def console(self) -> Console:
        """rich's view of our output: its size (COLUMNS/LINES for a pipe), and whether colour
        and cursor movement may be used (not with NO_COLOR, TERM=dumb or a pipe)."""
        return Console(file=self.out, highlight=False, soft_wrap=False)

    def map_frame(
        self, console: Console, previous: ApertureMap | None, *, events: bool = True
    ) -> tuple[ApertureMap, Text]:
        """One `query-map` sized to the console, and the screen drawn from it."""
        width, height = console.size
        per_row, rows = mapview.grid_shape(width, height)
        m = parse_reply(self.client.execute("query-map", {"cells": per_row * rows}, timeout=10))
        latest = [format_event(e) for e in list(self.recent_events)] if events else None
        title = f"domain {self.status.get('domid')} BAR0"
        return m, mapview.render(m, width, height, previous=previous, events=latest, title=title)

    def show_map(self) -> None:
        console = self.console()
        _, screen = self.map_frame(console, None, events=False)
        with self.lock:
            console.print(screen)

    # ------------------------------------------------------------------ live views

    def redraw(self, frame: Callable[[Console], Text], interval: float, count: int) -> None:
        """`watch`: draw `frame` every `interval` seconds until Ctrl-C (or COUNT frames). On a
        terminal that can move its cursor, in place (rich's Live display, on the alternate
        screen); elsewhere (a dumb terminal, a pipe) one frame after another, so that a log of
        it still reads. Events are not printed meanwhile: the frames show the latest."""
        console = self.console()
        live: Live | None = None
        if console.is_terminal and not console.is_dumb_terminal:
            live = Live(console=console, screen=True, auto_refresh=False, transient=True)
        shown = 0
        self.watching = True
        try:
            with live if live is not None else contextlib.nullcontext():
                while self.closed is None:
                    screen = frame(console)
                    with self.lock:
                        if live is not None:
                            live.update(screen, refresh=True)
                        else:
                            console.print(screen)
                            console.print()
                    shown += 1
                    if count and shown >= count:
                        break
                    time.sleep(interval)
        except KeyboardInterrupt:
            self.say("")
        finally:
            self.watching = False

    # ------------------------------------------------------------------ debug console

    def _python(self, code: str) -> None:
        if "python" not in self.commands:
            raise UsageError("this instance has no debug console (start it with --debug-console)")
        answer = self.client.execute("python", {"code": code}, timeout=30)
        self.say(render_python(answer))

    def python_console(self) -> None:
        if "python" not in self.commands:
            raise UsageError("this instance has no debug console (start it with --debug-console)")
        self.say(
            "debug console: Python runs inside the device model, on its event loop, and "
            "every statement is logged there. Objects: engine, counters, timing, settings, device, "
            "lender (also as link or builtin), windows(), window_at(off), tasks(). "
            "Empty line or Ctrl-D leaves."
        )
        while self.closed is None:
            try:
                line = self._input(PY_PROMPT)
            except EOFError:
                self.say()
                return
            except KeyboardInterrupt:
                if self.closed is not None:
                    return
                self.say("^C")
                continue
            if not line.strip():
                return
            block = [line]
            if line.rstrip().endswith(":"):
                while True:
                    try:
                        more = self._input(PY_MORE)
                    except (EOFError, KeyboardInterrupt):
                        break
                    if not more.strip():
                        break
                    block.append(more)
            self.handle_python("\n".join(block))

    def handle_python(self, code: str) -> None:
        try:
            self._python(code)
        except ControlError as exc:
            self.say(f"error: {exc.desc}")
        except (ConnectionLost, OSError) as exc:
            self.closed = f"connection lost: {exc}"

    # ------------------------------------------------------------------ quit

    def quit(self) -> None:
        if self.interactive:
            try:
                answer = self._input(
                    f"stop the device model of domain {self.status.get('domid')}? [y/N] "
                )
            except (EOFError, KeyboardInterrupt):
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                self.say("not stopped ('exit' leaves the REPL and keeps it running)")
                return
        self.client.execute("quit")
        self.say("stopping the device model")


class UsageError(Exception):
    """A REPL line that cannot be turned into a command."""


# ---------------------------------------------------------------------------- values


def parse_value(text: str, kind: object = None) -> object:
    """A typed argument from a word: on/off and JSON, then hex or sizes (2M), else a string."""
    if kind == "bool" and text.lower() in ("on", "yes", "true", "1"):
        return True
    if kind == "bool" and text.lower() in ("off", "no", "false", "0"):
        return False
    if kind in ("int", "number"):
        with contextlib.suppress(ValueError):
            return int(text, 0)
        with contextlib.suppress(ValueError):
            return parse_size(text)
        if kind == "number":
            with contextlib.suppress(ValueError):
                return float(text)
    if kind in ("str", "str-list"):
        return text.split(",") if kind == "str-list" and "," in text else text
    try:
        return decode_json(text.encode())
    except ValueError:
        return text


# ---------------------------------------------------------------------------- tables


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: str = "") -> str:
    """A plain text table; columns named in `right` (by index letters) align right."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def fmt(row: Sequence[str]) -> str:
        parts = []
        for i, c in enumerate(row):
            parts.append(c.rjust(widths[i]) if str(i) in right else c.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in cells)])


def _hex(v: object) -> str:
    return f"{v:#x}" if isinstance(v, int) else str(v)


def _size(v: object) -> str:
    return format_size(v) if isinstance(v, int) and v > 0 else str(v)


def render_windows(value: object) -> str:
    assert isinstance(value, dict)
    rows = [
        [
            _hex(w["start"]),
            _hex(w["end"]),
            _size(w["length"]),
            w["state"],
            w["lease"],
            w["prot"],
            w.get("waiters", 0),
        ]
        for w in value.get("windows", [])
    ]
    out = table(["START", "END", "SIZE", "STATE", "LEASE", "PROT", "WAITERS"], rows, "24")
    if not rows:
        out += "\n(no windows)"
    if value.get("next") is not None:
        out += f"\nmore: windows cursor={_hex(value['next'])}"
    return out


def render_leases(value: object) -> str:
    assert isinstance(value, dict)
    rows = [
        [
            lease["lease"],
            _hex(lease["start"]),
            _hex(lease["end"]),
            _size(lease["bytes"]),
            lease["windows"],
            lease["state"],
        ]
        for lease in value.get("leases", [])
    ]
    out = table(["LEASE", "START", "END", "SIZE", "WINDOWS", "STATE"], rows, "034")
    out += f"\n{value.get('live', '?')} live lease(s)"
    if value.get("next") is not None:
        out += f"; more: leases cursor={_hex(value['next'])}"
    return out


def render_stats(
    value: dict[str, Any],
    previous: tuple[float, dict[str, Any]] | None = None,
    now: float | None = None,
) -> str:
    counters: dict[str, int] = value.get("counters", {})
    rates: dict[str, str] = {}
    if previous is not None and now is not None and now > previous[0]:
        dt = now - previous[0]
        before = previous[1].get("counters", {})
        rates = {k: f"{(v - before.get(k, 0)) / dt:,.0f}/s" for k, v in counters.items()}
    rows = [[k, f"{v:,}", rates.get(k, "")] for k, v in counters.items()]
    parts = [table(["COUNTER", "VALUE", "RATE"], rows, "12")]
    states = value.get("windows", {})
    parts.append(
        f"leases {value.get('leases')}, windows: "
        + ", ".join(f"{k} {v}" for k, v in states.items())
        + f"; in flight {value.get('in_flight', 0)}; uptime {value.get('uptime', 0):.0f}s"
    )
    lat_rows = []
    for name, h in value.get("latency", {}).items():
        lat_rows.append(
            [
                name,
                f"{h['count']:,}",
                _us(h["mean_us"]),
                _us(h["p50_us"]),
                _us(h["p90_us"]),
                _us(h["p99_us"]),
                _us(h["max_us"]),
            ]
        )
    parts.append(
        table(["LATENCY", "COUNT", "MEAN", "P50", "P90", "P99", "MAX"], lat_rows, "123456")
    )
    return "\n\n".join(parts)


def _us(us: float) -> str:
    if us >= 1000:
        return f"{us / 1000:.2f}ms"
    return f"{us:.1f}us"


def render_status(value: object) -> str:
    assert isinstance(value, dict)
    lines = []
    for k, v in value.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        lines.append(f"{k:<17}{v}")
    return "\n".join(lines)


def _setting(name: str, value: object) -> object:
    if value is None:
        return ""
    return _size(value) if name in ("aperture-size", "granule") else value


def render_config(value: object) -> str:
    assert isinstance(value, dict)
    sources = value.get("sources", {})
    rows = [
        [k, _setting(k, v), sources.get(k, "default")] for k, v in value.get("settings", {}).items()
    ]
    return table(["SETTING", "VALUE", "FROM"], rows)


def render_commands(value: object) -> str:
    assert isinstance(value, list)
    return table(["COMMAND", "HELP"], [[c["name"], c.get("help", "")] for c in value])


def render_metrics(value: object) -> str:
    assert isinstance(value, dict)
    return str(value.get("text", "")).rstrip("\n")


def render_python(value: object) -> str:
    assert isinstance(value, dict)
    parts = [str(value.get("output", "")).rstrip("\n")]
    if "result" in value:
        parts.append(str(value["result"]))
    if "error" in value:
        parts.append(str(value["error"]).rstrip("\n"))
    return "\n".join(p for p in parts if p)


def render_action(value: object) -> str:
    """evict, revoke, set-policy, trace: one line."""
    if not isinstance(value, dict):
        return json.dumps(value)
    if "evicted" in value:
        return f"evicted lease(s): {', '.join(map(str, value['evicted'])) or 'none'}"
    if "revoked" in value:
        return f"revoked ({value.get('mode')}) lease(s): {', '.join(map(str, value['revoked']))}"
    if "policy" in value:
        return f"failure policy: {value.get('old')} -> {value['policy']}"
    if "trace" in value:
        return f"access trace {'on' if value['trace'] else 'off'}"
    return json.dumps(value)


RENDERERS: Final[dict[str, Callable[[Any], str]]] = {
    "evict": render_action,
    "revoke": render_action,
    "set-policy": render_action,
    "trace": render_action,
    "query-windows": render_windows,
    "query-leases": render_leases,
    "query-stats": render_stats,
    "query-status": render_status,
    "query-config": render_config,
    "query-commands": render_commands,
    "query-metrics": render_metrics,
    "python": render_python,
}


def format_event(e: EventMessage) -> str:
    when = datetime.datetime.fromtimestamp(e.time).strftime("%H:%M:%S.%f")[:-3]
    data = " ".join(f"{k}={_hex(v) if k in ('offset', 'length') else v}" for k, v in e.data.items())
    return clean(f"[{when}] {e.name} {data}".rstrip())


# ---------------------------------------------------------------------------- readline


def _line_buffer() -> str:
    try:
        import readline  # noqa: PLC0415

        return readline.get_line_buffer()
    except ImportError:
        return ""


def completions(repl: Repl, line: str, text: str) -> list[str]:
    """What Tab may complete `text` to, given the words before it (`line`)."""
    done = line.split()
    if not done:
        pool = [*repl.commands, *SHORTCUTS, *LOCAL_WORDS, "quit"]
        return sorted({w for w in pool if w.startswith(text)})
    first = done[0]
    if first == "watch":
        return [w for w in WATCHABLE if w.startswith(text)]
    if first in ("help",):
        return sorted(w for w in {*repl.commands, *SHORTCUTS} if w.startswith(text))
    if first in ("events", "verbose"):
        return [w for w in ("on", "off") if w.startswith(text)]
    name, positional = SHORTCUTS.get(first, (first, None))
    spec: dict[str, Any] = repl.commands.get(name, {}).get("arguments", {})
    if "=" in text:
        key, _, partial = text.partition("=")
        choices = spec.get(key, {}).get("choices", [])
        if spec.get(key, {}).get("type") == "bool":
            choices = ["true", "false"]
        return [f"{key}={c}" for c in choices if c.startswith(partial)]
    out = [f"{k}=" for k in spec if k.startswith(text)]
    if positional is not None:
        info = spec.get(positional, {})
        values = list(info.get("choices", []))
        if info.get("type") == "bool":
            values = ["on", "off"]
        if first == "evict":
            values.append("all")
        out += [v for v in values if v.startswith(text)]
    return out


@contextlib.contextmanager
def line_editing(repl: Repl, history: str | None) -> Iterator[None]:
    """readline with completion and a history file, for the REPL's lifetime."""
    try:
        import readline  # noqa: PLC0415
    except ImportError:
        yield
        return
    matches: list[str] = []

    def complete(text: str, state: int) -> str | None:
        nonlocal matches
        if state == 0:
            buf = readline.get_line_buffer()[: readline.get_begidx()]
            # Python's readline appends nothing after a completion; a finished word gets
            # its space here (not `key=`, whose value comes next).
            matches = [m if m.endswith("=") else m + " " for m in completions(repl, buf, text)]
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t")
    readline.parse_and_bind("tab: complete")
    readline.set_history_length(1000)
    if history:
        with contextlib.suppress(OSError):
            readline.read_history_file(history)
    try:
        yield
    finally:
        if history:
            try:
                readline.write_history_file(history)
            except OSError as exc:
                print(
                    f"devmodel attach: cannot write history {history}: {exc.strerror}",
                    file=sys.stderr,
                )
        readline.set_completer(None)


def _history_path(arg: str | None) -> str | None:
    if arg == "none":
        return None
    if arg:
        return arg
    return os.path.join(os.path.expanduser("~"), ".devmodel_history")


def main(args: argparse.Namespace) -> int:
    path = args.control_socket
    try:
        client = ControlClient(path, timeout=10)
    except OSError as exc:
        print(f"devmodel attach: cannot connect to {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (ConnectionLost, ControlProtocolError, ControlError) as exc:
        print(f"devmodel attach: {path}: {exc}", file=sys.stderr)
        return 1
    with client:
        scripted = bool(args.lines)
        repl = Repl(
            client,
            interactive=sys.stdin.isatty() and not scripted,
            verbose=args.verbose,
            show_events=not args.no_events and not scripted,
        )
        try:
            repl.load()
        except (ControlError, ConnectionLost, OSError, TimeoutError) as exc:
            print(f"devmodel attach: {path}: {exc}", file=sys.stderr)
            return 1
        # Events are read as they come, also for -c (where they are not printed): a live view
        # must keep up with bursts, or the device model drops a client with 1024 unread.
        client.start_reader(repl.on_event, repl.on_close)
        if scripted:
            for line in args.lines:
                repl.handle(line)
                if repl.closed:
                    break
            return 1 if repl.failures else 0
        try:
            if repl.interactive:
                repl.say(repl.banner())
                with line_editing(repl, _history_path(args.history)):
                    return repl.loop()
            return repl.loop()
        except KeyboardInterrupt:  # the wake-up for a closed connection, arriving late
            return 0
