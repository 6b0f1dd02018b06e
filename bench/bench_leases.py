"""Lease engine benchmark: faults, revokes, page-in coalescing and a million leases.

Every number is printed next to a peer measured in the same run, interleaved with it where the
measurement allows, and as a ratio: the machines here are small and noisy, so only the ratios
and the order of magnitude mean anything.

  a) fault service latency: an 8-byte read of an EVICTED window until it is served by an
     instant lender, next to a read of a RESIDENT window; in-process through
     `LeaseEngine.read`, then end to end (a vfio-user client process, `devmodel run`, the lease
     socket, a lender process);
  b) REVOKE to REVOKED as the lender sees it over the lease socket, idle and while a vfio-user
     client hammers the same window and others, next to a PING/PONG round trip on the socket;
  c) PAGE_INs sent for 64 concurrent faults on one window (must be 1: exit status 1 otherwise);
  d) a million 4 KiB leases: grants per second, bytes per lease and lookup time, against a
     dict of tuples, a bisect over a sorted list and the SortedDict table the engine had
     before its two-level one (`before`: lookups and resident reads of the same windows).

Usage: bench/bench_leases.py [--quick] [--leases N] [--repeat N] [--only-leases]. Not a
test; the smoke test is tests/unit/test_bench_leases.py.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import fcntl
import gc
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio
import trio.testing

import devmodel_wire.lease as lp
from devmodel.counters import DeviceCounters
from devmodel.leases.engine import EngineConfig, LeaseEngine
from devmodel.leases.lender_link import LenderLink
from devmodel.testing import VfioUserClient
from devmodel.unixfds import rights
from devmodel_wire.lease.constants import PROT_READ, PROT_WRITE
from pyvfio_user.codec import HEADER_AND_ACCESS
from pyvfio_user.constants import FLAG_NO_REPLY, Command
from pyvfio_user.sansio import CLOSED, NEED_DATA

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
RW = PROT_READ | PROT_WRITE
GUEST = 7
F_ADD_SEALS: int = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS: int = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SHRINK: int = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW: int = getattr(fcntl, "F_SEAL_GROW", 0x0004)
perf = time.perf_counter

# The end-to-end set-up: a small aperture cut into windows of one granule, one lease each.
E2E_APERTURE = 64 * MiB
E2E_GRANULE = 2 * MiB
HAMMERED = 4  # the load client hammers windows 0..HAMMERED-1
MARK = 0x4D41524B00000000  # window i holds MARK + i in its first 8 bytes


class BenchFailed(Exception):
    """Something the benchmark relies on did not hold (a wrong value, a refused grant)."""


# ---------------------------------------------------------------------------- statistics


def pct(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def show(name: str, samples: Sequence[float], unit: float = 1e-6, label: str = "us") -> float:
    """Print median, p90 and p99 of `samples` (seconds); returns the median."""
    med = statistics.median(samples)
    print(
        f"    {name:<44} median {med / unit:9.2f} {label}   p90 {pct(samples, 0.9) / unit:9.2f}"
        f"   p99 {pct(samples, 0.99) / unit:9.2f}   (n={len(samples)})"
    )
    return med


def show_ratio(
    what: str, subject: float, peer: float, unit: float = 1e-6, label: str = "us"
) -> None:
    print(f"    ratio {what}: {subject / peer:.2f}x ({(subject - peer) / unit:+.2f} {label})")


def show_pair(ratio: str, peer: tuple[str, list[float]], subject: tuple[str, list[float]]) -> None:
    """Show a peer's and a subject's (name, samples), trimmed, and the ratio of the medians."""
    peer_median = show(peer[0], trimmed(peer[1]))
    subject_median = show(subject[0], trimmed(subject[1]))
    show_ratio(ratio, subject_median, peer_median)


def trimmed(samples: list[float]) -> list[float]:
    """Drop the first tenth (warm-up: caches, the allocator, branch predictors)."""
    return samples[len(samples) // 10 :]


# ---------------------------------------------------------------------------- memory files


def sealed_memfd(size: int, name: str = "bench-lender") -> int:
    """A memfd as the protocol wants it: sparse, sealed against shrinking and growing."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
    return fd


def mark_windows(fd: int, size: int, window: int) -> None:
    for i in range(size // window):
        os.pwrite(fd, struct.pack("<Q", MARK + i), i * window)


def expect_mark(data: bytes, index: int, where: str) -> None:
    if data != struct.pack("<Q", MARK + index):
        raise BenchFailed(f"{where}: window {index} read {data.hex()} (not its contents)")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def drive(coro: Coroutine[Any, Any, bytes]) -> bytes:
    """Run a coroutine that never suspends (a resident access) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: bytes = done.value
        return result
    coro.close()
    raise BenchFailed("the access suspended: the window was not resident")


# ---------------------------------------------------------------------------- in-process lender


class InstantPort:
    """An in-process lender as the engine sees it (a `LenderPort`).

    Inline, it answers each PAGE_IN inside `send_page_in` (grant from `home` at fd offset =
    aperture offset, then PAGE_IN_DONE): the fastest lender there can be. Otherwise it only
    records the requests and `answer()` serves them later.
    """

    def __init__(self, engine: LeaseEngine, home: int, *, inline: bool) -> None:
        self.engine = engine
        self.home = home
        self.inline = inline
        self.answers_later = not inline  # LenderPort
        self.page_ins = 0
        self.pending: list[tuple[int, int, int]] = []
        self.next_lease = 1
        engine.port = self

    def grant(self, offset: int, length: int) -> int:
        lease = self.next_lease
        self.next_lease += 1
        self.engine.grant(lease, offset, length, offset, RW, os.dup(self.home))
        return lease

    def send_page_in(self, request_id: int, offset: int, length: int, access: lp.Access) -> bool:
        self.page_ins += 1
        if self.inline:
            self.grant(offset, length)
            self.engine.page_in_done(request_id, lp.PageInStatus.OK)
        else:
            self.pending.append((request_id, offset, length))
        return True

    def answer(self) -> list[int]:
        leases = []
        for request_id, offset, length in self.pending:
            leases.append(self.grant(offset, length))
            self.engine.page_in_done(request_id, lp.PageInStatus.OK)
        self.pending.clear()
        return leases


def small_engine(size: int = E2E_APERTURE, granule: int = E2E_GRANULE) -> LeaseEngine:
    return LeaseEngine(size, granule, DeviceCounters(), EngineConfig())


# ---------------------------------------------------------------------------- the bench lender


@dataclass(slots=True, eq=False)
class _Window:
    index: int
    lease: int = 0
    state: str = "evicted"  # "resident", "revoking" or "evicted", as this lender sees it
    settled: trio.Event = field(default_factory=trio.Event)


class BenchLender:
    """A minimal lender on a real lease-protocol socket: one window = one lease, one memfd.

    It grants every window at the start, answers each PAGE_IN at once (or after
    `page_in_delay`) with GRANTs then PAGE_IN_DONE, and exposes `revoke()` and `ping()`, timed
    from just before the send to the answer's arrival: what a lender would measure.
    """

    def __init__(
        self, aperture: int, granule: int, window: int, *, page_in_delay: float = 0.0
    ) -> None:
        self.aperture = aperture
        self.granule = granule
        self.window = window
        self.page_in_delay = page_in_delay
        self.home = sealed_memfd(aperture)
        mark_windows(self.home, aperture, window)
        self.windows = [_Window(i) for i in range(aperture // window)]
        self.conn = lp.LenderConnection()
        self.ready = trio.Event()
        self.page_ins = 0
        self.grants = 0
        self.acks = 0
        self.nacks = 0
        self.errors = 0
        self._sock: trio.socket.SocketType | None = None
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()
        self._next_lease = 1
        self._next_token = 1
        self._by_lease: dict[int, _Window] = {}
        self._revoked: dict[int, trio.Event] = {}
        self._pongs: dict[int, trio.Event] = {}
        self._buf = bytearray(64 * KiB)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self.conn.close()
        with contextlib.suppress(OSError):
            os.close(self.home)

    def stats(self) -> dict[str, int]:
        return {
            "page_ins": self.page_ins,
            "grants": self.grants,
            "acks": self.acks,
            "nacks": self.nacks,
            "errors": self.errors,
        }

    async def serve(
        self,
        listener: trio.socket.SocketType,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve one borrower until it goes away."""
        task_status.started()
        self._sock, _ = await listener.accept()
        hello = await self._event()
        if not isinstance(hello, lp.Hello):
            raise BenchFailed(f"the borrower opened with {hello!r}")
        await self._send(self.conn.hello_reply("bench-lender"))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for w in self.windows:
                await self._grant(w)
            while True:
                event = await self._event()
                if event is None or isinstance(event, lp.Bye):
                    nursery.cancel_scope.cancel()
                    return
                await self._handle(event)

    async def _event(self) -> lp.Event | None:
        assert self._sock is not None
        while True:
            event = self.conn.next_event()
            if event is CLOSED:
                return None
            if event is not NEED_DATA:
                assert not isinstance(event, type(NEED_DATA))
                return event
            n = await self._sock.recv_into(self._buf)
            self.conn.receive_data(memoryview(self._buf)[:n])

    async def _handle(self, event: lp.Event) -> None:
        if isinstance(event, lp.GrantAck):
            self.acks += 1
            if self.acks == len(self.windows):
                self.ready.set()
        elif isinstance(event, lp.GrantNack):
            self.nacks += 1
            print(f"bench lender: lease {event.lease_id} refused: {event.text}", file=sys.stderr)
        elif isinstance(event, lp.Revoked):
            # Settled here, in message order: a PAGE_IN behind this REVOKED sees it evicted.
            w = self._by_lease[event.lease_id]
            w.state = "evicted"
            w.settled.set()
            self._revoked.pop(event.lease_id).set()
        elif isinstance(event, lp.PageIn):
            self.page_ins += 1
            covered = self._covering(event.offset, event.length)
            if self.page_in_delay or any(w.state == "revoking" for w in covered):
                assert self._nursery is not None
                self._nursery.start_soon(self._page_in, event, covered)
            else:
                await self._page_in(event, covered)
        elif isinstance(event, lp.Ping):
            await self._send(lp.Pong(event.token))
        elif isinstance(event, lp.Pong):
            self._pongs.pop(event.token).set()
        elif isinstance(event, lp.Error):
            self.errors += 1
            print(f"bench lender: the borrower refused something: {event}", file=sys.stderr)

    def _covering(self, offset: int, length: int) -> list[_Window]:
        first, last = offset // self.window, (offset + length - 1) // self.window
        return self.windows[first : last + 1]

    async def _page_in(self, request: lp.PageIn, covered: list[_Window]) -> None:
        if self.page_in_delay:
            await trio.sleep(self.page_in_delay)
        for w in covered:
            while w.state == "revoking":
                await w.settled.wait()
            if w.state == "evicted":
                await self._grant(w)
        await self._send(lp.PageInDone(request.request_id, lp.PageInStatus.OK))

    async def _grant(self, w: _Window) -> None:
        # Decided before the first checkpoint: callers test the state and call this without
        # yielding in between, so two tasks never lend the same window twice. The lock is fair,
        # so GRANTs leave in the order of their (increasing) lease ids.
        lease = self._next_lease
        self._next_lease += 1
        w.lease, w.state = lease, "resident"
        self._by_lease[lease] = w
        self.grants += 1
        start = w.index * self.window
        await self._send(lp.Grant(lease, start, self.window, start, RW, self.home))

    async def _send(self, event: lp.Event) -> None:
        async with self._lock:
            await self._send_locked(event)

    async def _send_locked(self, event: lp.Event) -> None:
        assert self._sock is not None
        out = self.conn.send(event)
        view = memoryview(out.data)
        if out.fds:  # a GRANT: its own sendmsg, carrying its fd (docs/lease-protocol.md 5)
            view = view[await self._sock.sendmsg([view], rights(out.fds)) :]
        while view:
            view = view[await self._sock.send(view) :]

    async def revoke(self, index: int, mode: lp.RevokeMode = lp.RevokeMode.EVICT) -> float:
        """REVOKE the window's lease and wait for REVOKED; seconds from send to answer."""
        w = self.windows[index]
        if w.state != "resident":
            raise BenchFailed(f"window {index} is {w.state}, not resident")
        w.state = "revoking"
        w.settled = trio.Event()
        done = self._revoked[w.lease] = trio.Event()
        t0 = perf()
        await self._send(lp.Revoke(w.lease, mode))
        await done.wait()
        return perf() - t0

    async def regrant(self, index: int) -> None:
        """Lend the window again unless a page-in already did."""
        w = self.windows[index]
        if w.state == "evicted":
            await self._grant(w)

    async def ping(self) -> float:
        token = self._next_token
        self._next_token += 1
        done = self._pongs[token] = trio.Event()
        t0 = perf()
        await self._send(lp.Ping(token))
        await done.wait()
        return perf() - t0

    async def revoke_series(self, index: int, n: int) -> tuple[list[float], list[float]]:
        """n times: revoke the window (timed), lend it again, and a PING (timed, the peer)."""
        revokes, pings = [], []
        for i in range(n):
            if i % 2:
                pings.append(await self.ping())
            revokes.append(await self.revoke(index))
            await self.regrant(index)
            if not i % 2:
                pings.append(await self.ping())
        return revokes, pings


async def listen(path: str) -> trio.socket.SocketType:
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen()
    return listener


# ---------------------------------------------------------------------------- lender process


async def lender_process(path: str) -> None:
    """`--serve-lender PATH`: a BenchLender driven by one JSON line per command on stdin."""
    lender = BenchLender(E2E_APERTURE, E2E_GRANULE, E2E_GRANULE)
    listener = await listen(path)
    stdin = trio.lowlevel.FdStream(os.dup(0))

    def reply(**fields: object) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    async def commands(cancel: trio.CancelScope) -> None:
        buf = b""
        reply(listening=True)
        while True:
            while b"\n" not in buf:
                chunk = await stdin.receive_some()
                if not chunk:
                    cancel.cancel()
                    return
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            words = line.decode().split()
            if words[0] == "ready":
                await lender.ready.wait()
                reply(ok=True)
            elif words[0] == "evict":
                reply(t=await lender.revoke(int(words[1])))
            elif words[0] == "revokes":
                revokes, pings = await lender.revoke_series(int(words[1]), int(words[2]))
                reply(revokes=revokes, pings=pings)
            elif words[0] == "stats":
                reply(**lender.stats())
            else:
                cancel.cancel()
                return

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commands, nursery.cancel_scope)
            await lender.serve(listener)
            nursery.cancel_scope.cancel()
    finally:
        lender.close()
        listener.close()


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child to `cpus` (None: no pinning)."""
    if not cpus:
        return None
    chosen = set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


LENDERS = ("lean", "trio")
"""The lender processes: `lean`, bench/lean_lender.py (blocking calls, what bench/run uses);
`trio`, a BenchLender (`--serve-lender`), the first bench lender, kept to compare with."""


class LenderProcess:
    """The benchmark's handle on a lender process (pinned to `cpus` if given)."""

    def __init__(self, path: str, cpus: set[int] | None = None, kind: str = "lean") -> None:
        if kind not in LENDERS:
            raise ValueError(f"no lender {kind!r}")
        argv = (
            [sys.executable, __file__, "--serve-lender", path]
            if kind == "trio"
            else [sys.executable, str(Path(__file__).with_name("lean_lender.py")), path]
        )
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=pinned(cpus),  # noqa: PLW1509  (the benchmark starts no threads)
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in: IO[str] = self.proc.stdin
        self._out: IO[str] = self.proc.stdout
        self.answer()  # listening

    def answer(self) -> dict[str, Any]:
        line = self._out.readline()
        if not line:
            raise BenchFailed("the lender process ended")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, *words: object) -> dict[str, Any]:
        self._in.write(" ".join(map(str, words)) + "\n")
        self._in.flush()
        return self.answer()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._in.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------- vfio-user client


def read_request(msg_id: int, offset: int) -> bytes:
    return HEADER_AND_ACCESS.pack(msg_id & 0xFFFF, Command.REGION_READ, 32, 0, 0, offset, 0, 8)


def write_request(msg_id: int, offset: int, data: bytes) -> bytes:
    head = HEADER_AND_ACCESS.pack(msg_id & 0xFFFF, Command.REGION_WRITE, 40, 0, 0, offset, 0, 8)
    return head + data


def posted_write_request(msg_id: int, offset: int, data: bytes) -> bytes:
    head = HEADER_AND_ACCESS.pack(
        msg_id & 0xFFFF, Command.REGION_WRITE, 40, FLAG_NO_REPLY, 0, offset, 0, 8
    )
    return head + data


class RawClient:
    """8-byte BAR0 accesses with as little client-side Python as possible (as in
    bench_vfio_user.py), after a real attach sequence."""

    def __init__(self, path: str) -> None:
        self.client = VfioUserClient(path)
        self.client.attach()
        self.sock = self.client.sock
        self.sock.settimeout(10)
        self.buf = bytearray(64)
        self.view = memoryview(self.buf)
        self.msg_id = 1000

    def close(self) -> None:
        self.client.close()

    def _reply(self, size: int) -> None:
        got = 0
        while got < size:
            n = self.sock.recv_into(self.view[got:], size - got)
            if not n:
                raise BenchFailed("devmodel closed the vfio-user connection")
            got += n

    def read(self, offset: int) -> tuple[float, bytes]:
        self.msg_id += 1
        req = read_request(self.msg_id, offset)
        t0 = perf()
        self.sock.sendall(req)
        self._reply(40)
        return perf() - t0, bytes(self.buf[32:40])

    def write(self, offset: int, data: bytes) -> None:
        self.msg_id += 1
        self.sock.sendall(write_request(self.msg_id, offset, data))
        self._reply(32)

    def post(self, offset: int, data: bytes) -> None:
        """A posted write (NO_REPLY): nothing comes back; the next read orders after it."""
        self.msg_id += 1
        self.sock.sendall(posted_write_request(self.msg_id, offset, data))


LOADS = ("rw", "reads", "posted")  # what the load client does per window, see hammer_process


def hammer_process(path: str, load: str = "rw") -> None:
    """`--hammer PATH [--load L]`: access windows 0..HAMMERED-1 until SIGTERM; print the counts.

    Per window visited: `rw` a read and a write (each answered), `reads` a read, `posted` a
    read and a posted write (NO_REPLY, as a guest's writes to a BAR are).
    """
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    client = RawClient(path)
    print(json.dumps({"started": True}), flush=True)
    accesses = wrong = 0
    t0 = perf()
    i = 0
    while not stop:
        index = i % HAMMERED
        _, data = client.read(index * E2E_GRANULE)
        if data != struct.pack("<Q", MARK + index):
            wrong += 1
        if load == "rw":
            client.write(index * E2E_GRANULE + 64, struct.pack("<Q", i))
            accesses += 1
        elif load == "posted":
            client.post(index * E2E_GRANULE + 64, struct.pack("<Q", i))
            accesses += 1
        accesses += 1
        i += 1
    print(json.dumps({"accesses": accesses, "wrong": wrong, "seconds": perf() - t0}), flush=True)
    client.close()


def wait_for_path(path: str, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchFailed(f"nothing listens on {path}")
        time.sleep(0.01)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------- a) faults


async def engine_faults(repeat: int) -> None:
    engine = small_engine()
    home = sealed_memfd(engine.size)
    mark_windows(home, engine.size, engine.granule)
    port = InstantPort(engine, home, inline=True)
    try:
        leases = [port.grant(i * engine.granule, engine.granule) for i in range(2)]
        fault: list[float] = []
        resident: list[float] = []
        for i in range(repeat):
            await engine.revoke(leases[0], lp.RevokeMode.EVICT)
            leases[0] = port.next_lease  # the lease the page-in is about to grant
            for which in (i % 2, 1 - i % 2):
                t0 = perf()
                data = await engine.read(which * engine.granule, 8)
                took = perf() - t0
                expect_mark(data, which, "engine")
                (fault if which == 0 else resident).append(took)
        if port.page_ins != repeat:
            raise BenchFailed(f"{repeat} faults sent {port.page_ins} PAGE_INs")
        print("  in-process (LeaseEngine.read, an inline lender: grant + PAGE_IN_DONE at once):")
        show_faults(resident, fault)
    finally:
        engine.close()
        os.close(home)


def measure_e2e_faults(
    client: RawClient, lender: LenderProcess, repeat: int
) -> tuple[list[float], list[float]]:
    """`repeat` pairs, in alternating order: a read of window 0 just evicted by the lender (a
    fault served by a page-in) and a read of resident window 1; returns (faults, residents)."""
    fault: list[float] = []
    resident: list[float] = []
    for i in range(repeat):
        lender.ask("evict", 0)
        for which in (i % 2, 1 - i % 2):
            index = 0 if which == 0 else 1
            took, data = client.read(index * E2E_GRANULE)
            expect_mark(data, index, "end to end")
            (fault if index == 0 else resident).append(took)
    return fault, resident


def e2e_faults(client: RawClient, lender: LenderProcess, repeat: int) -> None:
    fault, resident = measure_e2e_faults(client, lender, repeat)
    print(
        "  end to end (vfio-user client process -> devmodel run -> lease socket -> lender process):"
    )
    show_faults(resident, fault)


def show_faults(resident: list[float], fault: list[float]) -> None:
    show_pair(
        "fault/resident",
        ("resident window (peer)", resident),
        ("evicted window (fault, page-in, served)", fault),
    )


# ---------------------------------------------------------------------------- b) revokes


async def engine_revokes(repeat: int) -> None:
    engine = small_engine()
    home = sealed_memfd(engine.size)
    port = InstantPort(engine, home, inline=True)
    try:
        samples, reads = [], []
        lease = port.grant(0, engine.granule)
        port.grant(engine.granule, engine.granule)
        for _ in range(repeat):
            t0 = perf()
            await engine.revoke(lease, lp.RevokeMode.EVICT)
            samples.append(perf() - t0)
            lease = port.grant(0, engine.granule)
            t0 = perf()
            await engine.read(engine.granule, 8)
            reads.append(perf() - t0)
        print("  in-process (LeaseEngine.revoke, no transport mappings to remove):")
        show_pair("revoke/read", ("resident read (peer)", reads), ("engine.revoke(EVICT)", samples))
    finally:
        engine.close()
        os.close(home)


def print_revokes(title: str, answer: dict[str, Any]) -> None:
    print(title)
    show_pair(
        "revoke/ping",
        ("PING -> PONG (peer)", answer["pings"]),
        ("REVOKE(EVICT) -> REVOKED", answer["revokes"]),
    )


# ---------------------------------------------------------------------------- c) coalescing


async def read_into(
    engine: LeaseEngine, results: list[bytes], done_at: list[float] | None = None
) -> None:
    results.append(await engine.read(0, 8))
    if done_at is not None:
        done_at.append(time.perf_counter())


@dataclass
class Coalescing:
    """link_coalescing's figures, per round: PAGE_INs of the concurrent faults, the wrong
    reads, one fault alone (seconds), and the slowest of the concurrent faults (seconds, from
    the start of the first)."""

    counts: list[int] = field(default_factory=list)
    wrong: int = 0
    alone: list[float] = field(default_factory=list)
    slowest: list[float] = field(default_factory=list)


async def engine_coalescing(rounds: int, waiters: int) -> list[int]:
    engine = small_engine()
    home = sealed_memfd(engine.size)
    mark_windows(home, engine.size, engine.granule)
    port = InstantPort(engine, home, inline=False)
    counts = []
    try:
        lease = port.grant(0, engine.granule)
        for _ in range(rounds):
            await engine.revoke(lease, lp.RevokeMode.EVICT)
            before = port.page_ins
            results: list[bytes] = []

            async with trio.open_nursery() as nursery:
                for _ in range(waiters):
                    nursery.start_soon(read_into, engine, results)
                await trio.testing.wait_all_tasks_blocked()
                counts.append(port.page_ins - before)
                (lease,) = port.answer()
            if len(results) != waiters:
                raise BenchFailed(f"{len(results)} of {waiters} waiting reads were served")
            for data in results:
                expect_mark(data, 0, "coalesced engine read")
    finally:
        engine.close()
        os.close(home)
    return counts


async def link_coalescing(tmp: Path, rounds: int, waiters: int) -> Coalescing:
    """The engine and its LenderLink in this process, a BenchLender on a real socket that
    answers each PAGE_IN after 5 ms (so that every waiter is waiting when it does). Each round
    times one fault alone, then `waiters` concurrent faults on one window: how many PAGE_INs
    they sent, and when the last of them was served."""
    path = str(tmp / "coalesce.sock")
    listener = await listen(path)
    lender = BenchLender(E2E_APERTURE, E2E_GRANULE, E2E_GRANULE, page_in_delay=0.005)
    engine = small_engine()
    link = LenderLink(engine, path, GUEST)
    got = Coalescing()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lender.serve, listener)
            nursery.start_soon(link.run)
            with trio.fail_after(10):
                await lender.ready.wait()
            for _ in range(rounds):
                for n in (1, waiters):
                    await lender.revoke(0)
                    before = lender.page_ins
                    results: list[bytes] = []
                    done_at: list[float] = []
                    start = time.perf_counter()
                    with trio.fail_after(10):
                        async with trio.open_nursery() as readers:
                            for _ in range(n):
                                readers.start_soon(read_into, engine, results, done_at)
                    took = max(done_at) - start
                    if n == 1:
                        got.alone.append(took)
                        continue
                    got.slowest.append(took)
                    got.counts.append(lender.page_ins - before)
                    got.wrong += sum(r != struct.pack("<Q", MARK) for r in results)
            nursery.cancel_scope.cancel()
    finally:
        engine.close()
        lender.close()
        listener.close()
    return got


async def timed_read(engine: LeaseEngine, results: list[bytes], took: list[float]) -> None:
    start = time.perf_counter()
    results.append(await engine.read(0, 8))
    took.append(time.perf_counter() - start)


async def process_coalescing(
    tmp: Path, rounds: int, waiters: int, cpus: set[int] | None = None, delay: float = 0.005
) -> Coalescing:
    """Concurrent faults against a lender in its own process, as a real one is: the engine
    and its LenderLink in this process, the lean lender (answering each PAGE_IN after `delay`)
    in another, pinned to `cpus`. Each round times one fault alone, then `waiters` concurrent
    faults on one window, each from its own start to its answer; `slowest` is the longest of
    them. (A lender in this loop could only start its delay once every waiter had run up to
    its wait, which the figure would then count.)"""
    path = str(tmp / "coalesce-process.sock")
    lender = LenderProcess(path, cpus)
    engine = small_engine()
    link = LenderLink(engine, path, GUEST)
    got = Coalescing()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            await trio.to_thread.run_sync(lender.ask, "ready")
            await trio.to_thread.run_sync(lender.ask, "delay", delay)
            before = engine.counters.page_ins
            for _ in range(rounds):
                for n in (1, waiters):
                    await trio.to_thread.run_sync(lender.ask, "evict", 0)
                    before = engine.counters.page_ins
                    results: list[bytes] = []
                    took: list[float] = []
                    with trio.fail_after(10):
                        async with trio.open_nursery() as readers:
                            for _ in range(n):
                                readers.start_soon(timed_read, engine, results, took)
                    if n == 1:
                        got.alone.append(took[0])
                        continue
                    got.slowest.append(max(took))
                    got.counts.append(engine.counters.page_ins - before)
                    got.wrong += sum(r != struct.pack("<Q", MARK) for r in results)
            nursery.cancel_scope.cancel()
    finally:
        engine.close()
        lender.stop()
    return got


# ---------------------------------------------------------------------------- d) a million


def big_table(n: int, repeat: int) -> None:
    granule = 4 * KiB
    aperture = max(MiB, 1 << math.ceil(math.log2(n * granule)))
    chunk = max(1000, n // 20)
    print(
        f"d) {n:,} leases of one 4 KiB granule each, aperture {aperture // MiB:,} MiB, "
        f"all from one sparse memfd at fd offset = aperture offset"
    )
    home = sealed_memfd(n * granule, "bench-million")
    engine = LeaseEngine(aperture, granule, DeviceCounters(), EngineConfig(max_leases=n))
    peer: dict[int, tuple[int, int, int, int, int, int]] = {}
    eng_rates, peer_rates = [], []
    eng_mem = peer_mem = 0
    eng_time = peer_time = 0.0
    grant = engine.grant
    dup = os.dup
    try:
        gc.collect()
        # Chunks alternate between the engine and the peer, so both see the same machine; what
        # the process grows by during each chunk is charged to whoever ran it (nothing is freed).
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            m0 = rss()
            t0 = perf()
            for i in range(lo, hi):
                off = i * granule
                grant(i + 1, off, granule, off, RW, dup(home))
            t1 = perf()
            m1 = rss()
            for i in range(lo, hi):
                off = i * granule
                peer[off] = (i + 1, off, granule, off, RW, home)
            t2 = perf()
            m2 = rss()
            eng_rates.append((hi - lo) / (t1 - t0))
            peer_rates.append((hi - lo) / (t2 - t1))
            eng_time += t1 - t0
            peer_time += t2 - t1
            eng_mem += m1 - m0
            peer_mem += m2 - m1
        if engine.lease_count != n or engine.kept_fds != 1:
            raise BenchFailed(f"{engine.lease_count} leases, {engine.kept_fds} kept fds")
        print(f"  grants ({n // chunk} chunks of {chunk:,}, interleaved with the peer's):")
        e_med, p_med = statistics.median(eng_rates), statistics.median(peer_rates)
        print(
            f"    {'engine.grant':<44} {e_med:12,.0f} grants/s (median chunk), "
            f"all {n:,} in {eng_time:.1f} s, {engine.kept_fds} fd kept for them all"
        )
        print(
            f"    {'peer: a dict of 6-tuples':<44} {p_med:12,.0f} inserts/s (median chunk), "
            f"all in {peer_time:.2f} s"
        )
        floor = syscall_floor(home, min(n, 100_000))
        print(
            f"    {'floor: dup+fstat+2 fcntl+close per grant':<44} "
            f"{1 / floor:12,.0f} per s ({floor * 1e6:.2f} us each)"
        )
        print(
            f"    ratio engine/peer: {p_med / e_med:.1f}x slower; "
            f"{e_med * floor:.0%} of a grant is the fd syscalls"
        )
        print("  memory (resident set growth during the chunks above):")
        print(f"    {'engine':<44} {eng_mem / n:9.0f} bytes/lease ({eng_mem / MiB:,.0f} MiB)")
        print(f"    {'peer: a dict of 6-tuples':<44} {peer_mem / n:9.0f} bytes/entry")
        print(f"    ratio engine/peer: {eng_mem / max(peer_mem, 1):.1f}x")
        sample = min(n, 20_000)
        traced = traced_bytes_per_lease(sample)
        print(
            f"    {'engine, tracemalloc over ' + format(sample, ',') + ' leases':<44} "
            f"{traced:9.0f} bytes/lease"
        )
        lookups(engine, peer, n, granule, repeat)
        resident_reads(engine, n, granule, repeat)
    finally:
        engine.close()
        os.close(home)


def syscall_floor(fd: int, n: int) -> float:
    """What validating a received fd costs at least (the engine's FdStore makes these calls)."""
    t0 = perf()
    for _ in range(n):
        d = os.dup(fd)
        os.fstat(d)
        fcntl.fcntl(d, fcntl.F_GETFL)
        fcntl.fcntl(d, F_GET_SEALS)
        os.close(d)
    return (perf() - t0) / n


def traced_bytes_per_lease(n: int) -> float:
    granule = 4 * KiB
    home = sealed_memfd(n * granule, "bench-traced")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        engine = LeaseEngine(1 << 40, granule, DeviceCounters())
        for i in range(n):
            off = i * granule
            engine.grant(i + 1, off, granule, off, RW, os.dup(home))
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    engine.close()
    os.close(home)
    return (after - before) / n


NO_SORTED = "sortedcontainers is not installed (pip install sortedcontainers)"


class SortedTable:
    """The window table as it was before the two-level one (devmodel/leases/table.py): a
    SortedDict by start, searched with `irange`, with the window found last remembered. Kept
    as the benchmark's `before` peer, for lookups only."""

    def __init__(self, windows: Sequence[Any]) -> None:
        from sortedcontainers import SortedDict  # noqa: PLC0415 (a bench extra, may be missing)

        self._by_start: Any = SortedDict((w.start, w) for w in windows)
        self._last: Any = None

    def find(self, offset: int) -> Any:
        w = self._last
        if w is not None and w.start <= offset < w.start + w.length:
            return w
        d = self._by_start
        start = next(d.irange(maximum=offset, reverse=True), None)
        if start is None:
            return None
        w = d[start]
        if offset < start + w.length:
            self._last = w
            return w
        return None

    # The engine's resident access asks for a fast entry (devmodel/leases/table.py); this
    # table has none, so it answers with the window, as the engine did before.
    find_fast = find


def sorted_table(engine: LeaseEngine) -> SortedTable | None:
    """The engine's windows in a SortedTable; None if sortedcontainers is not installed."""
    try:
        return SortedTable(list(engine.windows()))
    except ImportError:
        return None


def lookups(
    engine: LeaseEngine,
    peer: dict[int, tuple[int, int, int, int, int, int]],
    n: int,
    granule: int,
    repeat: int,
) -> None:
    rng = random.Random(4)
    batch = 1000
    offsets: list[int] = []
    starts = list(peer)  # ascending: inserted in order
    values = list(peer.values())
    find = engine.window_at
    get = peer.get
    bisect_right = bisect.bisect_right
    before = sorted_table(engine)

    def by_engine() -> None:
        for off in offsets:
            w = find(off)
            assert w is not None

    def by_before() -> None:
        assert before is not None
        look = before.find
        for off in offsets:
            w = look(off)
            assert w is not None

    def by_bisect() -> None:
        for off in offsets:
            i = bisect_right(starts, off) - 1
            v = values[i]
            assert off < v[1] + v[2]

    def by_dict() -> None:
        for off in offsets:
            assert get(off - off % granule) is not None

    def empty() -> None:
        for off in offsets:
            assert off is not None

    times: dict[str, list[float]] = {}
    runs: list[tuple[str, Callable[[], None]]] = [
        ("engine", by_engine),
        *([("before", by_before)] if before is not None else []),
        ("bisect", by_bisect),
        ("dict", by_dict),
        ("empty", empty),
    ]
    for r in range(max(repeat // 10, 20)):
        # Fresh offsets each round: a guest touching a million leases at random is cache-cold.
        offsets[:] = [rng.randrange(n * granule) for _ in range(batch)]
        for name, fn in runs[r % len(runs) :] + runs[: r % len(runs)]:
            t0 = perf()
            fn()
            times.setdefault(name, []).append((perf() - t0) / batch)
    print(f"  lookup of a random offset ({batch} per batch, per-lookup time, loop included):")
    base = show("the loop alone", times["empty"], 1e-9, "ns")
    p_bisect = show("peer: bisect on a sorted list of starts", times["bisect"], 1e-9, "ns")
    show("peer: dict per granule (not sparse)", times["dict"], 1e-9, "ns")
    if before is not None:
        p_before = show("before: the SortedDict table (SortedTable)", times["before"], 1e-9, "ns")
    else:
        print(f"    {'before: the SortedDict table':<44} not measured: {NO_SORTED}")
    e = show("engine.window_at (WindowTable.find)", times["engine"], 1e-9, "ns")
    show_ratio("engine/bisect (loop excluded)", e - base, p_bisect - base, 1e-9, "ns")
    if before is not None:
        show_ratio("engine/before (loop excluded)", e - base, p_before - base, 1e-9, "ns")


def resident_reads(engine: LeaseEngine, n: int, granule: int, repeat: int) -> None:
    """An 8-byte resident read, full table against a one-lease engine, interleaved; then the
    same windows read through the SortedDict table (`before`), against the one-lease engine
    again. Two loops, not one: `before`'s walk through its SortedDict would evict from the
    caches what the full engine's next read needs, and charge that to it."""
    one = LeaseEngine(engine.size, granule, DeviceCounters())
    home = sealed_memfd(granule, "bench-one")
    one.grant(1, 0, granule, 0, RW, home)
    # The same windows (same fds, same objects) behind the table the engine had before: only
    # the lookup differs. It never grants or revokes, so sharing the windows is safe.
    before: LeaseEngine | None = None
    table = sorted_table(engine)
    if table is not None:
        before = LeaseEngine(engine.size, granule, DeviceCounters())
        before_any: Any = before
        before_any._table = table
    rng = random.Random(5)

    def pairs(subject: LeaseEngine) -> tuple[list[float], list[float]]:
        one_t: list[float] = []
        subject_t: list[float] = []
        for _ in range(max(repeat, 1000)):
            off = rng.randrange(n) * granule
            t0 = perf()
            drive(one.read(0, 8))
            t1 = perf()
            drive(subject.read(off, 8))
            t2 = perf()
            one_t.append(t1 - t0)
            subject_t.append(t2 - t1)
        return one_t, subject_t

    try:
        one_t, full_t = pairs(engine)
        print(f"  resident 8-byte read (LeaseEngine.read), {n:,} leases against one:")
        show_pair(
            "full/one",
            ("engine with one lease (peer)", one_t),
            (f"engine with {n:,} leases", full_t),
        )
        if before is None:
            print(f"    before: the SortedDict table: not measured: {NO_SORTED}")
            return
        one_t, before_t = pairs(before)
        show_pair(
            "before/one",
            ("engine with one lease (peer)", one_t),
            (f"before: SortedDict table, {n:,} leases", before_t),
        )
    finally:
        one.close()


# ---------------------------------------------------------------------------- main


# `python -c` running the devmodel package of another checkout (`src`) instead of this one.
RUN_FROM = (
    "import runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
    "sys.path[:0] = [{src!r}, {src!r} + '/protocol']; sys.argv[0] = 'devmodel'; "
    "runpy.run_module('devmodel', run_name='__main__', alter_sys=True)"
)


def devmodel_command(
    dm_sock: str, lender_sock: str, *extra: str, src: str | None = None
) -> list[str]:
    """`devmodel run` as the end-to-end measurements start it: the small aperture, one lender;
    from the checkout at `src` if given (a baseline to compare with)."""
    how = ["-m", "devmodel"] if src is None else ["-c", RUN_FROM.format(src=os.path.abspath(src))]
    return [
        sys.executable,
        *how,
        "run",
        "--socket-path",
        dm_sock,
        "--lender-socket",
        lender_sock,
        "--domid",
        str(GUEST),
        "--aperture-size",
        str(E2E_APERTURE),
        "--granule",
        str(E2E_GRANULE),
        "--log-level",
        "warning",
        *extra,
    ]


class EndToEnd:
    """A lender process, `devmodel run` borrowing from it, and a vfio-user client attached to
    it, each pinned if CPUs are given (devmodel to `server_cpus`, the others to `client_cpus`).
    A context manager: leaving it stops both processes."""

    def __init__(
        self,
        tmp: Path,
        *,
        server_cpus: set[int] | None = None,
        client_cpus: set[int] | None = None,
        extra: Sequence[str] = (),
        src: str | None = None,
        lender: str = "lean",
    ) -> None:
        self.dm_sock = str(tmp / "dm.sock")
        self.client_cpus = client_cpus
        lender_sock = str(tmp / "lender.sock")
        self.lender = LenderProcess(lender_sock, client_cpus, lender)
        self.client: RawClient | None = None
        try:
            self.devmodel = subprocess.Popen(
                devmodel_command(self.dm_sock, lender_sock, *extra, src=src),
                preexec_fn=pinned(server_cpus),  # noqa: PLW1509
            )
            wait_for_path(self.dm_sock, self.devmodel)
            self.lender.ask("ready")
            self.client = RawClient(self.dm_sock)
        except BaseException:
            self.close()
            raise

    def hammer(self, load: str = "rw") -> subprocess.Popen[str]:
        """Start a load client (`hammer_process`) on the device; it runs until stop_hammer."""
        proc = subprocess.Popen(
            [sys.executable, __file__, "--hammer", self.dm_sock, "--load", load],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=pinned(self.client_cpus),  # noqa: PLW1509
        )
        assert proc.stdout is not None
        if not proc.stdout.readline():
            stop_process(proc)
            raise BenchFailed("the load client did not start")
        return proc

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if getattr(self, "devmodel", None) is not None:
            stop_process(self.devmodel)
        self.lender.stop()

    def __enter__(self) -> EndToEnd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_hammer(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Stop a load client; its counts (accesses, wrong, seconds). Wrong contents fail the run."""
    stop_process(proc)
    assert proc.stdout is not None
    load: dict[str, Any] = json.loads(proc.stdout.readline())
    if load["wrong"]:
        raise BenchFailed(f"the load client read wrong contents {load['wrong']} times")
    return load


LEASE_LOADS = ("reads", "posted")
"""The guest loads a revoke is measured under (hammer_process), after the idle one."""


def lease_round(e2e: EndToEnd, n: int, into: dict[str, list[float]]) -> dict[str, float]:
    """One round of the lease path's figures, `n` samples each, added to `into` under
    fault, resident, revoke, ping, revoke_LOAD and ping_LOAD; returns each load client's
    access rate (accesses/s), so a revoke under load says how hard the guest pushed.

    The faults and resident reads are also split by their place in each pair (see
    `measure_e2e_faults`): `fault_idle` and `resident_idle` came first after the lender's
    evict, to a device model that had parked, as a PING or a REVOKE finds it;
    `fault_warm` and `resident_warm` came right after the other read of the pair."""
    if e2e.client is None:
        e2e.client = RawClient(e2e.dm_sock)
    fault, resident = measure_e2e_faults(e2e.client, e2e.lender, n)
    into["fault"] += fault
    into["resident"] += resident
    # Pair i reads the evicted window first when i is even (measure_e2e_faults).
    into["fault_idle"] += fault[0::2]
    into["fault_warm"] += fault[1::2]
    into["resident_idle"] += resident[1::2]
    into["resident_warm"] += resident[0::2]
    e2e.client.close()
    e2e.client = None  # the load clients take the device's socket
    answer = e2e.lender.ask("revokes", 0, n)
    into["revoke"] += answer["revokes"]
    into["ping"] += answer["pings"]
    rates: dict[str, float] = {}
    for load in LEASE_LOADS:
        hammer = e2e.hammer(load)
        try:
            answer = e2e.lender.ask("revokes", 0, n)
        finally:
            counts = stop_hammer(hammer)
        into[f"revoke_{load}"] += answer["revokes"]
        into[f"ping_{load}"] += answer["pings"]
        rates[load] = counts["accesses"] / counts["seconds"]
    return rates


def e2e(tmp: Path, repeat: int) -> dict[str, Any]:
    """Sections a) and b) through real processes; returns the lender's counters."""
    with EndToEnd(tmp) as setup:
        lender = setup.lender
        assert setup.client is not None
        print("a) fault service latency, 8-byte reads of BAR0, instant lender")
        trio.run(engine_faults, repeat)
        e2e_faults(setup.client, lender, repeat)
        setup.client.close()
        setup.client = None
        print("b) REVOKE -> REVOKED latency")
        trio.run(engine_revokes, repeat)
        print_revokes(
            "  over the lease socket, devmodel idle (lender process, window 0):",
            lender.ask("revokes", 0, repeat),
        )
        hammer = setup.hammer()
        try:
            same = lender.ask("revokes", 0, repeat)
            other = lender.ask("revokes", HAMMERED + 1, repeat)
        finally:
            load = stop_hammer(hammer)
        rate = load["accesses"] / load["seconds"]
        print_revokes(
            f"  over the lease socket, under load (a vfio-user client reading and writing windows "
            f"0-{HAMMERED - 1}, {rate:,.0f} accesses/s), window 0 (hammered):",
            same,
        )
        print_revokes(f"  same load, window {HAMMERED + 1} (not hammered):", other)
        return lender.ask("stats")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--leases", type=int, help="leases for section d (default 1,000,000)")
    parser.add_argument("--repeat", type=int, help="samples per measurement (default 2000)")
    parser.add_argument(
        "--only-leases", action="store_true", help="section d only (the million leases)"
    )
    parser.add_argument("--serve-lender", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--hammer", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--load", choices=LOADS, default="rw", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_lender:
        trio.run(lender_process, args.serve_lender)
        return 0
    if args.hammer:
        hammer_process(args.hammer, args.load)
        return 0
    repeat = args.repeat or (50 if args.quick else 2000)
    leases = args.leases or (5000 if args.quick else 1_000_000)
    print(f"lease engine benchmark: {repeat} samples per measurement, {os.cpu_count()} cpus")
    tmp = Path(tempfile.mkdtemp(prefix="devmodel-bench-leases-"))
    status = 0
    try:
        if args.only_leases:
            big_table(leases, repeat)
            return status
        stats = e2e(tmp, repeat)
        print("c) PAGE_INs sent for 64 concurrent faults on one window (must be 1 each time)")
        rounds = max(3, repeat // 100)
        counts = trio.run(engine_coalescing, rounds, 64)
        print(f"  in-process, {rounds} rounds: PAGE_INs per round {sorted(set(counts))}")
        link = trio.run(link_coalescing, tmp, rounds, 64)
        alone, slowest = statistics.median(link.alone), statistics.median(link.slowest)
        print(
            f"  through the lender link and a lender on a socket, {rounds} rounds: "
            f"PAGE_INs per round {sorted(set(link.counts))}, wrong reads {link.wrong}; "
            f"the last of 64 served {slowest * 1e3:.2f} ms after the first began (the lender "
            f"in this loop starts its delay only once all 64 wait), one fault alone "
            f"{alone * 1e3:.2f} ms"
        )
        proc = trio.run(process_coalescing, tmp, rounds, 64)
        alone, slowest = statistics.median(proc.alone), statistics.median(proc.slowest)
        print(
            f"  against a lender process (answers after 5 ms), {rounds} rounds: PAGE_INs per "
            f"round {sorted(set(proc.counts))}, wrong reads {proc.wrong}; the slowest of 64 "
            f"waited {slowest * 1e3:.2f} ms, one fault alone {alone * 1e3:.2f} ms: "
            f"{slowest / alone:.2f}x (target <= 1.10x; medians)"
        )
        link.counts += proc.counts
        link.wrong += proc.wrong
        if any(c != 1 for c in counts + link.counts) or link.wrong:
            print("  FAILED: concurrent faults on one window must send exactly one PAGE_IN")
            status = 1
        big_table(leases, repeat)
        print(
            f"end-to-end lender counters: {stats['page_ins']} PAGE_INs, {stats['grants']} "
            f"grants, {stats['nacks']} refused, {stats['errors']} errors"
        )
        if stats["nacks"] or stats["errors"]:
            status = 1
    except BenchFailed as exc:
        print(f"FAILED: {exc}")
        status = 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
