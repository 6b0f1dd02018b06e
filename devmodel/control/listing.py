"""`devmodel ls [DIR]`: every device model on this host, found by its control socket.

A host runs one device model per guest; an operator wants them on one screen, and a stuck one
must not hide the others. So every instance is asked at once (one trio task each) with its own
deadline: one that accepts the connection but does not answer (stopped, wedged) is reported as
such when its deadline passes, never waited on; a socket file nobody listens on any more (the
instance died without removing it) is reported as stale, at once. The fault rate is the
change of the fault count (accesses that found their window not resident) between two
`query-stats` a short interval apart, divided by the change of the instance's own uptime, so
the client's scheduling does not skew it.

Where the sockets are: the launch example (examples/launch/devmodel-launch) puts guest N's
control socket at `$DEVMODEL_RUNDIR/N/control/qmp.sock` (default /run/devmodel). `ls` looks
under DIR, three levels deep at most, for unix sockets that sit in a directory called `control`
or are named `qmp.sock` or `control.sock` (a vfio-user socket is never mistaken for one: its
server waits for the client to speak, and would look hung); a socket may also be named directly.
Only the control protocol is used, so `ls` can do nothing a toolstack could not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import stat
import struct
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from devmodel.control.listing_options import DEFAULT_DIR, INTERVAL, TIMEOUT, add_arguments
from devmodel_wire.control import (
    CAPABILITIES_COMMAND,
    ClientConnection,
    ControlProtocolError,
    ErrorReply,
    EventMessage,
    Greeting,
    Return,
    ServerMessage,
    encode_command,
)
from pyvfio_user.sansio import CLOSED, NEED_DATA

if TYPE_CHECKING:
    import trio

__all__ = [
    "DEFAULT_DIR",
    "Instance",
    "add_arguments",
    "find_sockets",
    "main",
    "probe",
    "probe_all",
    "render",
]

SOCKET_NAMES: Final = frozenset({"qmp.sock", "control.sock"})
MAX_DEPTH: Final = 3
_UCRED: Final = struct.Struct("3i")

# What `state` says; anything but RUNNING leaves the figures empty.
RUNNING: Final = "running"
NOT_ANSWERING: Final = "not answering"
STALE: Final = "stale socket"


@dataclass
class Instance:
    """One control socket and what its instance said (None where it said nothing)."""

    name: str
    socket: str
    state: str = RUNNING
    detail: str = ""
    domid: int | None = None
    pid: int | None = None
    transport: str | None = None
    client_connected: bool | None = None
    lender: str | None = None
    lender_connected: bool | None = None
    leases: int | None = None
    windows: dict[str, int] = field(default_factory=dict)
    faults: int | None = None
    faults_per_second: float | None = None


def default_dir() -> str:
    """The launch example's runtime directory (it honours DEVMODEL_RUNDIR too)."""
    return os.environ.get("DEVMODEL_RUNDIR") or DEFAULT_DIR


# ---------------------------------------------------------------------------- finding sockets


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:
        return False


def _walk(top: Path, depth: int) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            if depth < MAX_DEPTH:
                yield from _walk(path, depth + 1)
        elif _is_socket(path) and (path.name in SOCKET_NAMES or path.parent.name == "control"):
            yield path


def find_sockets(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(name, socket path) for every control socket under or at `paths`; the name is the
    socket's first directory below the one searched (the launch example's domid), or the
    socket's own name when it sits there directly."""
    found: list[tuple[str, str]] = []
    for given in paths:
        start = len(found)
        top = Path(given)
        if _is_socket(top):
            found.append((top.parent.name if top.name in SOCKET_NAMES else top.name, str(top)))
            continue
        for sock in _walk(top, 1):
            parts = sock.relative_to(top).parts
            found.append((parts[0] if len(parts) > 1 else sock.name, str(sock)))
        found[start:] = sorted(found[start:], key=lambda f: _natural(f[0]))
    return found


def _natural(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting domain 3 before domain 12 (digit runs compare as numbers)."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part
    )


# ---------------------------------------------------------------------------- asking


class _Session:
    """A minimal async control client (the blocking devmodel.control.client would need a
    thread per instance; here every instance is a trio task)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.conn = ClientConnection()
        self.ids = 0

    async def message(self) -> ServerMessage:
        while True:
            msg = self.conn.next_event()
            if msg is NEED_DATA:
                self.conn.receive_data(await self.sock.recv(65536))
                continue
            if msg is CLOSED:
                raise ConnectionError("the control socket closed")
            assert not isinstance(msg, type(NEED_DATA))
            return msg

    async def execute(self, name: str) -> object:
        self.ids += 1
        await self.sock.send(encode_command(name, None, self.ids))
        while True:
            msg = await self.message()
            if isinstance(msg, EventMessage):
                continue
            if isinstance(msg, ErrorReply):
                raise ControlProtocolError(f"{name}: {msg.error_class}: {msg.desc}")
            if isinstance(msg, Return):
                return msg.value
            raise ControlProtocolError(f"unexpected {type(msg).__name__} answering {name}")


def _peer_pid(sock: trio.socket.SocketType) -> int | None:
    """The pid of the process that listens (the kernel keeps it from listen(): it answers even
    when that process is stopped)."""
    try:
        pid, _, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return None
    return pid or None


def _process_state(pid: int) -> str:
    """'stopped', 'zombie' or '' from /proc (why an instance may not answer)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            code = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return {"T": "stopped", "t": "stopped (traced)", "Z": "zombie"}.get(code, "")


def _take_status(inst: Instance, status: Mapping[str, object]) -> None:
    domid, pid = status.get("domid"), status.get("pid")
    inst.domid = domid if isinstance(domid, int) else None
    inst.pid = pid if isinstance(pid, int) else inst.pid
    inst.transport = str(status.get("transport", "")) or None
    client = status.get("client_connected")
    inst.client_connected = client if isinstance(client, bool) else None
    lender = status.get("lender")
    if isinstance(lender, dict):
        inst.lender = str(lender.get("kind", "?"))
        connected = lender.get("connected")
        inst.lender_connected = connected if isinstance(connected, bool) else None
    leases = status.get("leases")
    inst.leases = leases if isinstance(leases, int) else None


def _faults(stats: object) -> tuple[int, float] | None:
    """(faults so far, uptime) from a query-stats answer.

    A fault is an access that found its window not resident: the count of the `fault` latency
    histogram. (The `faults` counter is narrower: only the accesses that had to wait for a
    page-in or revoke already under way, so it stays 0 with a lender that answers at once.)
    """
    if not isinstance(stats, dict):
        return None
    latency, uptime = stats.get("latency"), stats.get("uptime")
    if not isinstance(latency, dict) or not isinstance(uptime, int | float):
        return None
    fault = latency.get("fault")
    count = fault.get("count") if isinstance(fault, dict) else None
    return (count, float(uptime)) if isinstance(count, int) else None


async def probe(name: str, path: str, timeout: float, interval: float) -> Instance:
    """Ask one instance; every exchange has `timeout` seconds, the two samples are
    `interval` apart."""
    import trio  # noqa: PLC0415 (the parser imports this module; only `ls` needs trio)

    inst = Instance(name, path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            with trio.fail_after(timeout):
                await sock.connect(path)
        except ConnectionRefusedError:
            inst.state, inst.detail = STALE, "nobody listening"
            return inst
        except trio.TooSlowError:
            inst.state, inst.detail = NOT_ANSWERING, "connect timed out (backlog full)"
            return inst
        except OSError as exc:
            inst.state, inst.detail = STALE, exc.strerror or str(exc)
            return inst
        inst.pid = _peer_pid(sock)
        session = _Session(sock)
        first: object = None
        try:
            with trio.move_on_after(timeout) as scope:
                greeting = await session.message()
                if isinstance(greeting, ErrorReply):  # e.g. too many clients already
                    raise ControlProtocolError(greeting.desc)
                if not isinstance(greeting, Greeting):
                    raise ControlProtocolError("no greeting")
                await session.execute(CAPABILITIES_COMMAND)
                status = await session.execute("query-status")
                if isinstance(status, dict):
                    _take_status(inst, status)
                first = await session.execute("query-stats")
            if scope.cancelled_caught:
                why = _process_state(inst.pid) if inst.pid else ""
                inst.state = NOT_ANSWERING
                inst.detail = f"no answer in {timeout:g} s" + (f", {why}" if why else "")
                return inst
            if isinstance(first, dict):
                windows = first.get("windows")
                if isinstance(windows, dict):
                    inst.windows = {str(k): int(v) for k, v in windows.items()}
            before = _faults(first)
            inst.faults = before[0] if before else None
            # Keep reading meanwhile: events keep coming (thousands a second from a faulting
            # guest), and a client that lets 1024 of them queue up is dropped by the server.
            with trio.move_on_after(interval):
                while True:
                    await session.message()
            with trio.move_on_after(timeout):
                after = _faults(await session.execute("query-stats"))
                if before and after and after[1] > before[1]:
                    inst.faults = after[0]
                    inst.faults_per_second = (after[0] - before[0]) / (after[1] - before[1])
        except (OSError, ConnectionError, ControlProtocolError) as exc:
            inst.state, inst.detail = "error", str(exc)
    return inst


async def probe_all(
    sockets: Sequence[tuple[str, str]], timeout: float = TIMEOUT, interval: float = INTERVAL
) -> list[Instance]:
    """Every instance at once; the answers in the order of `sockets`."""
    import trio  # noqa: PLC0415

    results: list[Instance | None] = [None] * len(sockets)

    async def one(i: int, name: str, path: str) -> None:
        results[i] = await probe(name, path, timeout, interval)

    async with trio.open_nursery() as nursery:
        for i, (name, path) in enumerate(sockets):
            nursery.start_soon(one, i, name, path)
    return [r for r in results if r is not None]


# ---------------------------------------------------------------------------- showing


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _windows(counts: Mapping[str, int]) -> str:
    shown = [f"{state} {n}" for state, n in counts.items() if n]
    return ", ".join(shown) if shown else ("none" if counts else "-")


def _rate(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.1f}"


def render(instances: Sequence[Instance]) -> str:
    from devmodel.repl import table  # noqa: PLC0415 (the REPL's table, not its readline)

    rows = []
    for i in instances:
        if i.state != RUNNING:
            state = f"{i.state} ({i.detail})" if i.detail else i.state
            rows.append([i.name, "-", i.pid or "-", state, "", "", "", "", "", ""])
            continue
        lender = i.lender or "-"
        if i.lender_connected is not None and i.lender != "builtin":
            lender += " (connected)" if i.lender_connected else " (down)"
        client = "-" if i.transport == "xen" else _yes_no(i.client_connected)
        rows.append(
            [
                i.name,
                i.domid if i.domid is not None else "-",
                i.pid or "-",
                i.state,
                i.transport or "-",
                client,
                lender,
                i.leases if i.leases is not None else "-",
                _windows(i.windows),
                _rate(i.faults_per_second),
            ]
        )
    headers = [
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
    return table(headers, rows, right="1279")


# ---------------------------------------------------------------------------- command line


def main(args: argparse.Namespace) -> int:
    paths = args.paths or [default_dir()]
    for p in paths:
        if not os.path.exists(p):
            if not args.paths:  # the default directory: no instance has ever run here
                print(f"no devmodel control sockets ({p} does not exist)")
                return 0
            print(f"devmodel ls: {p}: no such file or directory", file=sys.stderr)
            return 1
    import trio  # noqa: PLC0415

    sockets = find_sockets(paths)
    t0 = time.monotonic()
    instances = trio.run(probe_all, sockets, args.timeout, args.interval) if sockets else []
    took = time.monotonic() - t0
    if args.json:
        print(json.dumps([asdict(i) for i in instances], indent=1))
    elif not instances:
        print(f"no devmodel control sockets under {', '.join(paths)}")
    else:
        print(render(instances))
        answering = sum(i.state == RUNNING for i in instances)
        print(f"\n{len(instances)} instance(s), {answering} answering; asked in {took:.2f} s")
    return 0
