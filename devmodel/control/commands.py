"""The control commands: what a toolstack, a monitor or a person can ask a running device model.

Each command is declared once with its arguments (`devmodel_wire.control.Arg`) and a help line;
`query-commands` reports exactly this table, which the REPL uses for completion and help.
Queries never walk more than they return plus what they skip (`limit` caps every page), and
no command waits on anything but the engine, so none can stall the device for long.

`evict` and `revoke` are testing aids: with the built-in lender they take a lease back as a
real lender would (the next access pages it in, or finds the range vacant). With an external
lender they are refused: the lender owns its leases, and revoking behind its back would break
the lease protocol's bookkeeping.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Final

from devmodel import __version__
from devmodel.control import console
from devmodel.control.instance import BuiltinLenderView, Instance, LinkLenderView
from devmodel.control.server import ControlClient
from devmodel.leases.engine import LeaseEngine, UnknownLease
from devmodel.leases.policy import FailurePolicy
from devmodel.leases.states import WindowState
from devmodel.leases.window import Window
from devmodel.metrics.trace import set_tracing
from devmodel_wire.aperture_map import MAX_CELLS, aggregate, cell_windows, encode_cells
from devmodel_wire.control import (
    CAPABILITIES_COMMAND,
    COMMAND_NOT_FOUND,
    NOT_SUPPORTED,
    Arg,
    Command,
    CommandFailed,
    check_arguments,
)
from devmodel_wire.lease.constants import PROT_READ, PROT_WRITE, RevokeMode

__all__ = [
    "COMMANDS",
    "EVENTS",
    "Instance",
    "Spec",
    "available",
    "command",
    "console_closed",
    "execute",
]

log = logging.getLogger("devmodel.control")

# Every event the control socket can send (README, "Attach").
EVENTS: Final = (
    "LEASE_GRANTED",
    "LEASE_REVOKED",
    "LEASE_RELEASED",
    "PAGE_IN_REQUESTED",
    "PAGE_IN_FAILED",
    "REVOKE_DELAYED",
    "LENDER_LOST",
    "CLIENT_CONNECTED",
    "CLIENT_DISCONNECTED",
    "POLICY_CHANGED",
    "SHUTDOWN",
)

DEFAULT_PAGE: Final = 256
MAX_PAGE: Final = 4096
STATES: Final = tuple(s.value for s in WindowState if s is not WindowState.VACANT)


Handler = Callable[[Instance, ControlClient, dict[str, object]], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    handler: Handler
    help: str
    args: dict[str, Arg]
    testing_aid: bool = False
    debug_console: bool = False

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name,
            "help": self.help,
            "arguments": {k: a.describe() for k, a in self.args.items()},
        }
        if self.testing_aid:
            out["testing-aid"] = True
        return out


COMMANDS: dict[str, Spec] = {}


def command(
    name: str,
    help: str,
    args: dict[str, Arg] | None = None,
    *,
    testing_aid: bool = False,
    debug_console: bool = False,
) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = Spec(name, fn, help, args or {}, testing_aid, debug_console)
        return fn

    return register


def available(instance: Instance) -> list[Spec]:
    return [s for s in COMMANDS.values() if not s.debug_console or instance.settings.debug_console]


async def execute(instance: Instance, client: ControlClient, cmd: Command) -> object:
    """Run one command (the ControlServer's executor)."""
    if cmd.name == CAPABILITIES_COMMAND:
        return {}
    spec = COMMANDS.get(cmd.name)
    if spec is None or (spec.debug_console and not instance.settings.debug_console):
        hint = " (start devmodel with --debug-console)" if spec is not None else ""
        raise CommandFailed(
            f"The command {cmd.name[:64]} has not been found{hint}", COMMAND_NOT_FOUND
        )
    args = check_arguments(cmd.arguments, spec.args)
    return await spec.handler(instance, client, args)


# ---------------------------------------------------------------------------- helpers


def _window(w: Window) -> dict[str, object]:
    prot = ("r" if w.prot & PROT_READ else "") + ("w" if w.prot & PROT_WRITE else "")
    out: dict[str, object] = {
        "start": w.start,
        "end": w.end,
        "length": w.length,
        "state": w.state.value,
        "lease": w.lease_id,
        "prot": prot,
        "waiters": len(w.waiters or ()),
    }
    if w.state is WindowState.PAGING_IN:
        out["request"] = w.request_id
    return out


def _windows_from(engine: LeaseEngine, start: int) -> Iterator[Window]:
    """Windows that end after `start`, in order (a skip over the table's sorted iterator)."""
    for w in engine.windows():
        if w.end > start:
            yield w


def _page_args(args: dict[str, object]) -> tuple[int, int]:
    limit = int(args.get("limit", DEFAULT_PAGE))  # type: ignore[call-overload]
    if not 1 <= limit <= MAX_PAGE:
        raise CommandFailed(f"Parameter 'limit' must be from 1 to {MAX_PAGE}")
    cursor = int(args.get("cursor", 0))  # type: ignore[call-overload]
    return limit, cursor


_PAGE_ARGS: Final = {
    "limit": Arg(
        "int",
        minimum=1,
        help=f"at most this many entries (default {DEFAULT_PAGE}, at most {MAX_PAGE})",
    ),
    "cursor": Arg("int", minimum=0, help="resume where the previous page's 'next' said"),
}


# ---------------------------------------------------------------------------- queries


@command("query-status", "whether the device model runs, and its main facts")
async def query_status(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    s = inst.settings
    return {
        # QMP's own query-status shape first, so libxl-style readiness checks work unchanged.
        "status": inst.runtime.status,
        "running": inst.runtime.status == "running",
        "singlestep": False,
        "domid": s.domid,
        "pid": os.getpid(),
        "version": __version__,
        "uptime": inst.uptime(),
        "transport": s.transport,
        "socket": s.socket_path
        if s.socket_path is not None
        else (f"fd {s.fd}" if s.fd is not None else None),
        "client_connected": inst.transport_connected(),
        "lender": inst.lender.describe(),
        "leases": inst.engine.lease_count,
        # The geometry, and whether the granule was given or picked to fit the aperture (no
        # --granule and an aperture smaller than the 2M default: issue 14).
        "aperture_size": s.aperture_size,
        "granule": s.granule,
        "granule_source": s.sources.get("granule", "default"),
        "policy": inst.engine.config.policy.value,
        "debug_console": s.debug_console,
        "metrics": f"http://{inst.metrics_address[0]}:{inst.metrics_address[1]}/metrics"
        if inst.metrics_address
        else None,
    }


@command("query-version", "devmodel's version")
async def query_version(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    return {"devmodel": __version__}


@command(
    "query-windows",
    "windows of the aperture (state and lease), filtered and paginated",
    {
        "state": Arg("str-list", choices=STATES, help="only windows in this state (or states)"),
        "start": Arg("int", minimum=0, help="only windows ending after this offset"),
        "end": Arg("int", minimum=0, help="only windows starting before this offset"),
        **_PAGE_ARGS,
    },
)
async def query_windows(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    limit, cursor = _page_args(args)
    start = max(int(args.get("start", 0)), cursor)  # type: ignore[call-overload]
    end = int(args.get("end", inst.engine.size))  # type: ignore[call-overload]
    states = set(args["state"]) if "state" in args else None  # type: ignore[call-overload]
    found: list[dict[str, object]] = []
    next_cursor: int | None = None
    for w in _windows_from(inst.engine, start):
        if w.start >= end:
            break
        if states is not None and w.state.value not in states:
            continue
        if len(found) == limit:
            next_cursor = w.start
            break
        found.append(_window(w))
    return {"windows": found, "next": next_cursor}


DEFAULT_CELLS: Final = 1024
# Page-ins listed by query-map: a screen has room for a line of them, not for thousands.
MAP_PAGE_INS: Final = 8


@command(
    "query-map",
    "the aperture as at most CELLS cells, each the most urgent state of the windows it covers "
    "(run-length encoded), with counters and page-ins in flight: one small answer per frame "
    "of a live map",
    {
        "cells": Arg(
            "int",
            minimum=1,
            help=f"at most this many cells (default {DEFAULT_CELLS}, at most {MAX_CELLS})",
        ),
    },
)
async def query_map(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    """One walk over the window table, folded into cells here rather than in the client, so
    that 32768 windows cost a reply of a few hundred bytes (devmodel_wire.aperture_map)."""
    cells = int(args.get("cells", DEFAULT_CELLS))  # type: ignore[call-overload]
    if cells > MAX_CELLS:
        raise CommandFailed(f"Parameter 'cells' must be at most {MAX_CELLS}")
    e = inst.engine
    granule = e.granule
    windows = -(-e.size // granule)
    per = cell_windows(windows, cells)
    page_ins: list[dict[str, object]] = []
    # Neighbours in one state are one run: a steady aperture of 32768 windows is a handful of
    # runs for aggregate(). States are compared by identity (an Enum's hash and .value are
    # Python-level calls, too slow for a walk over every window).
    runs: list[tuple[int, int, WindowState]] = []
    run_start = run_end = 0
    run_state: WindowState | None = None
    paging_in = WindowState.PAGING_IN
    for w in e.windows():
        st = w.state
        if st is paging_in and len(page_ins) < MAP_PAGE_INS:
            page_ins.append(
                {
                    "request": w.request_id,
                    "offset": w.start,
                    "length": w.length,
                    "waiters": len(w.waiters or ()),
                }
            )
        if st is run_state and w.start == run_end:
            run_end += w.length
            continue
        if run_state is not None:
            runs.append((run_start, run_end, run_state))
        run_start, run_end, run_state = w.start, w.start + w.length, st
    if run_state is not None:
        runs.append((run_start, run_end, run_state))
    granules = dict.fromkeys(STATES, 0)
    named = [(start, end, state.value) for start, end, state in runs]
    for start, end, name in named:
        granules[name] += (end - start) // granule
    states = {WindowState.VACANT.value: windows - sum(granules.values()), **granules}
    c = inst.counters
    return {
        "size": e.size,
        "granule": granule,
        "cell_windows": per,
        "map": encode_cells(aggregate(named, e.size, per * granule)),
        "states": states,
        "page_ins": page_ins,
        "counters": {
            "faults": c.faults,
            "page_ins": c.page_ins,
            "revokes": c.revokes,
            "grants": c.grants,
        },
        "uptime": inst.uptime(),
        "in_flight": e.in_flight,
    }


@command(
    "query-leases",
    "leases with the windows they cover (live, evicted or paging in), paginated by offset",
    dict(_PAGE_ARGS),
)
async def query_leases(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    limit, cursor = _page_args(args)
    leases: dict[int, dict[str, object]] = {}
    next_cursor: int | None = None
    for w in _windows_from(inst.engine, cursor):
        entry = leases.get(w.lease_id)
        if entry is None:
            if len(leases) == limit:
                next_cursor = w.start
                break
            entry = leases[w.lease_id] = {
                "lease": w.lease_id,
                "start": w.start,
                "end": w.end,
                "bytes": 0,
                "windows": 0,
                "states": [],
            }
        entry["end"] = w.end
        entry["bytes"] = int(entry["bytes"]) + w.length  # type: ignore[call-overload]
        entry["windows"] = int(entry["windows"]) + 1  # type: ignore[call-overload]
        states = entry["states"]
        assert isinstance(states, list)
        if w.state.value not in states:
            states.append(w.state.value)
    for entry in leases.values():
        states = entry.pop("states")
        assert isinstance(states, list)
        entry["state"] = states[0] if len(states) == 1 else "+".join(states)
    return {"leases": list(leases.values()), "live": inst.engine.lease_count, "next": next_cursor}


@command("query-stats", "counters, windows per state, and latency histograms")
async def query_stats(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    e = inst.engine
    return {
        "uptime": inst.uptime(),
        "counters": inst.counters.as_dict(),
        "leases": e.lease_count,
        "windows": e.state_counts(),
        "in_flight": e.in_flight,
        "latency": {h.name: h.as_dict() for h in inst.timing.histograms()},
        "events": dict(inst.runtime.events),
        "control": {
            "clients": inst.runtime.control_clients(),
            "dropped": control.dropped_clients if (control := inst.runtime.control) else 0,
        },
        "client_connected": inst.transport_connected(),
        # Adaptive polling of the vfio-user socket (its counters are the poll_* above).
        "polling": {
            "max_us": inst.settings.poll_max_us,
            "hits": inst.counters.poll_hits,
            "misses": inst.counters.poll_misses,
            "cpu_ns": inst.counters.poll_ns,
            # The lender's socket, polled by accesses waiting for a page-in's GRANT.
            "page_in": {
                "max_us": inst.settings.page_in_poll_max_us,
                "hits": inst.counters.page_in_poll_hits,
                "misses": inst.counters.page_in_poll_misses,
                "cpu_ns": inst.counters.page_in_poll_ns,
            },
        },
    }


@command("query-metrics", "the metrics in Prometheus text exposition format")
async def query_metrics(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    return {"text": inst.metrics.render().decode()}


@command("query-config", "the effective settings, and where each came from")
async def query_config(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    s = inst.settings
    settings = s.as_dict()
    settings["failure-policy"] = inst.engine.config.policy.value
    return {"settings": settings, "sources": dict(s.sources), "config-file": s.config_file}


@command("query-commands", "the commands this instance accepts, with their arguments")
async def query_commands(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    cap = {
        "name": CAPABILITIES_COMMAND,
        "help": "leave capabilities negotiation mode",
        "arguments": {},
    }
    return [cap, *(s.describe() for s in available(inst))]


@command("query-events", "the events this instance can send")
async def query_events(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    return [{"name": n} for n in EVENTS]


# ---------------------------------------------------------------------------- actions


@command(
    "set-policy",
    "what an access gets when its memory cannot be had",
    {"policy": Arg("str", required=True, choices=tuple(p.value for p in FailurePolicy))},
)
async def set_policy(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    old = inst.engine.config.policy
    new = FailurePolicy(args["policy"])
    inst.engine.config.policy = new
    log.info("failure policy %s -> %s (control %s)", old.value, new.value, client.describe())
    inst.runtime.broadcast("POLICY_CHANGED", {"old": old.value, "new": new.value})
    return {"old": old.value, "policy": new.value}


def _builtin_only(inst: Instance, name: str) -> None:
    if not inst.lender.revocable_here:
        raise CommandFailed(
            f"{name} is a testing aid for the built-in lender; with --lender-socket the "
            "lender owns its leases (ask it to revoke instead)",
            NOT_SUPPORTED,
        )


@command(
    "evict",
    "TESTING AID (built-in lender only): take leases back as a lender would; the next access "
    "to them pages them in",
    {
        "offset": Arg("int", minimum=0, help="the lease holding this aperture offset"),
        "lease": Arg("int", minimum=1, help="this lease"),
        "all": Arg("bool", help="every resident lease"),
    },
    testing_aid=True,
)
async def evict(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    _builtin_only(inst, "evict")
    if len(args) != 1:
        raise CommandFailed("evict takes exactly one of 'offset', 'lease', 'all'")
    e = inst.engine
    if args.get("all"):
        targets = sorted({w.lease_id for w in e.windows() if w.state is WindowState.RESIDENT})
    elif "lease" in args:
        targets = [int(args["lease"])]  # type: ignore[call-overload]
    elif "offset" in args:
        w = e.window_at(int(args["offset"]))  # type: ignore[call-overload]
        if w is None or w.state is not WindowState.RESIDENT:
            state = "vacant" if w is None else w.state.value
            raise CommandFailed(f"nothing resident at {int(args['offset']):#x} ({state})")  # type: ignore[call-overload]
        targets = [w.lease_id]
    else:
        raise CommandFailed("evict takes exactly one of 'offset', 'lease', 'all'")
    return {"evicted": await _revoke(inst, client, targets, RevokeMode.EVICT)}


@command(
    "revoke",
    "TESTING AID (built-in lender only): revoke one lease; mode 'release' leaves its range "
    "vacant for good (accesses then get the failure policy)",
    {
        "lease": Arg("int", required=True, minimum=1),
        "mode": Arg("str", choices=("evict", "release"), help="default evict"),
    },
    testing_aid=True,
)
async def revoke(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    _builtin_only(inst, "revoke")
    mode = RevokeMode.RELEASE if args.get("mode") == "release" else RevokeMode.EVICT
    done = await _revoke(inst, client, [int(args["lease"])], mode)  # type: ignore[call-overload]
    return {"revoked": done, "mode": mode.name.lower()}


async def _revoke(
    inst: Instance, client: ControlClient, leases: list[int], mode: RevokeMode
) -> list[int]:
    done: list[int] = []
    for lease in leases:
        try:
            await inst.engine.revoke(lease, mode)
        except UnknownLease:
            if len(leases) == 1:
                raise CommandFailed(f"no lease {lease}") from None
            continue
        done.append(lease)
    log.info("control %s revoked (%s) %d lease(s)", client.describe(), mode.name.lower(), len(done))
    return done


@command(
    "trace",
    "log every access to the aperture at debug level (on the device model's stderr)",
    {"enable": Arg("bool", required=True)},
)
async def trace(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    on = bool(args["enable"])
    set_tracing(inst.engine, on)
    log.info("access trace %s (control %s)", "on" if on else "off", client.describe())
    return {"trace": on}


@command("quit", "stop the device model gracefully (as SIGTERM does) and exit 0")
async def quit_(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    inst.request_stop(f"quit from control {client.describe()}")
    return {}


@command(
    "python",
    "DEBUG CONSOLE (--debug-console only): evaluate Python inside the device model; logged",
    {"code": Arg("str", required=True)},
    debug_console=True,
)
async def python(inst: Instance, client: ControlClient, args: dict[str, object]) -> object:
    code = str(args["code"])
    first = client.console is None
    if client.console is None:
        client.console = console.namespace_for(
            {
                "instance": inst,
                "engine": inst.engine,
                "counters": inst.counters,
                "timing": inst.timing,
                "settings": inst.settings,
                "device": inst.device,
                "lender": inst.lender.target,
                # The names README's debug console section gives: one of them is None.
                "link": inst.lender.target if isinstance(inst.lender, LinkLenderView) else None,
                "builtin": (
                    inst.lender.target if isinstance(inst.lender, BuiltinLenderView) else None
                ),
            },
            {
                "windows": lambda: [_window(w) for w in inst.engine.windows()],
                "window_at": inst.engine.window_at,
            },
        )
    console.log_statement(client.describe(), first, code)
    client.console_statements += 1
    return console.run_statement(client.console, code)


def console_closed(client: ControlClient) -> None:
    """Log the end of a debug-console session (the server's on_disconnect)."""
    if client.console is not None:
        console.log.warning(
            "debug console session of %s closed after %d statement(s)",
            client.describe(),
            client.console_statements,
        )
