"""The Xen transport's per-request path over the simulated hypervisor, this tree against another.

What it measures: the device model's own time per request, in process. The guest side is a
lean driver on `devmodel.testing.SimHypervisor`: it fills vCPU 0's slot of the shared ioreq page
(READY), notes the time and signals the server's port (the sim's event channel is a real pipe
the transport's trio loop waits on); the time at which the transport calls `evtchn_notify` to
answer ends the sample. So a sample is everything the device model does for one request, from
the event channel becoming readable to the answer's notification: trio's wakeup of the
dispatch loop, reading the port, the slot, any hand-off to another task, the device's work,
the answer. The guest driver's own work is outside it. For posted writes (the buffered ring,
no answer) the sample ends when the write reaches lent memory (a `LeaseEngine` subclass notes
the time after each write; the same extra call for both trees).

Requests, `--requests N` of each per round and tree:
  - `bar2_read`: a trapped 4-byte read of a BAR2 register (the MAGIC register);
  - `bar0_read`: an 8-byte read of resident lent memory in BAR0 (the lease engine);
  - `bar0_write`: an 8-byte write to resident lent memory in BAR0;
  - `posted`: a 4-byte posted write to BAR0 through the buffered ring.

The device is built as `devmodel run` builds it: the lease engine with its timing hook
(AccessTiming), the built-in lender lending everything, the Xen transport's `serve_xen`.

`--baseline-src DIR` (a tree with devmodel/ and protocol/, e.g. `git archive OLD devmodel
protocol | tar -x -C DIR`) measures that tree's devmodel too: each round runs one child process
per tree, in alternating order, so that the machine's noise hits both alike; each child imports
only its tree's devmodel, and this file's driver. Prints the median and p99 of each request kind
per tree, and the ratio new/baseline.

Usage: bench/bench_xen_path.py [--requests N] [--rounds N] [--baseline-src DIR] [--profile]
Not a test: the machines here are noisy; compare figures from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from devmodel.counters import DeviceCounters
from devmodel.leases.builtin_lender import BuiltinLender
from devmodel.leases.engine import LeaseEngine
from devmodel.metrics.timing import AccessTiming
from devmodel.pci.function import PciFunction
from devmodel.pci.identity import PciIdentity
from devmodel.pci.registers import Feature
from devmodel.testing import SimHypervisor
from devmodel.xen.server import XenServer, serve_xen
from devmodel_wire.xen import (
    IOREQ_READ,
    IOREQ_WRITE,
    IoReq,
    IoreqState,
    IoreqType,
    complete_slot,
    encode_ioreq,
    post_buffered_write,
    read_slot,
    set_slot_state,
)
from devmodel_wire.xen.ioreq import IOREQ  # exported by the package only since issue 12

HERE = Path(__file__).resolve().parent
TOP = HERE.parent

KINDS = ("bar2_read", "bar0_read", "bar0_write", "posted")
LABELS = {
    "bar2_read": "trapped BAR2 register read (4 bytes)",
    "bar0_read": "resident BAR0 read (8 bytes, lease engine)",
    "bar0_write": "resident BAR0 write (8 bytes, lease engine)",
    "posted": "posted write to BAR0 (buffered ring)",
}

APERTURE = 1 << 20
GRANULE = 4096
BAR0 = 0x0  # posted writes carry 20-bit addresses: BAR0 must decode below 1 MiB
BAR2 = 0xF000_0000
MAGIC = 0x0  # BAR2 offset of the identification register

# Run this file as a child on another source tree (the editable install's finder dropped,
# that tree first on sys.path), as bench_footprint.py does.
_FROM = (
    "import runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
    "sys.path[:0] = [{src!r}, {src!r} + '/protocol', {bench!r}]; sys.argv[0] = {name!r}; "
    "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
)


# --------------------------------------------------------------------------- the child side


def measure(requests: int, profile: bool = False) -> dict[str, list[int]]:
    """Samples (ns) of each request kind, from this process's devmodel."""
    got: dict[str, list[int]] = {}

    async def main() -> None:
        async with bed() as driver:
            for kind in KINDS:
                await driver.run(kind, requests // 10)  # warm up
                got[kind] = await driver.run(kind, requests)

    if profile:
        prof = cProfile.Profile()
        prof.enable()
        trio.run(main)
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    else:
        trio.run(main)
    return got


STAMP = [0]
"""perf_counter_ns when the device model last answered (notify) or performed a write."""


class StampedEngine(LeaseEngine):
    """Notes when each write is done: the end of a posted write's sample."""

    async def write(self, offset: int, data: bytes) -> None:
        await super().write(offset, data)
        STAMP[0] = time.perf_counter_ns()

    if hasattr(LeaseEngine, "write_now"):  # a tree without it performs every write awaited

        def write_now(self, offset: int, data: bytes) -> bool:
            done: bool = super().write_now(offset, data)
            if done:
                STAMP[0] = time.perf_counter_ns()
            return done


@contextlib.asynccontextmanager
async def bed() -> AsyncIterator[Driver]:
    """The device as `devmodel run` builds it, served over the sim; BARs programmed."""
    counters = DeviceCounters()
    engine = StampedEngine(APERTURE, GRANULE, counters, timing=AccessTiming())
    device = PciFunction(
        PciIdentity(vendor_id=0x1234, device_id=0x10E5), engine, counters, features=Feature.LENT
    )
    lender = BuiltinLender(engine)
    lender.lend_everything()
    sim = SimHypervisor(vcpus=2)
    notify = sim.evtchn_notify

    def stamped_notify(local_port: int) -> None:
        STAMP[0] = time.perf_counter_ns()
        notify(local_port)

    sim.evtchn_notify = stamped_notify  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as nursery:
            xen: XenServer = await nursery.start(
                lambda task_status: serve_xen(
                    device, counters, sim.domid, platform=sim, task_status=task_status
                )
            )
            cpu = sim.cpus[0]
            await cpu.config_write(0x10, 4, BAR0 & 0xFFFFFFFF)
            await cpu.config_write(0x14, 4, BAR0 >> 32)
            await cpu.config_write(0x18, 4, BAR2)
            await cpu.config_write(0x04, 2, 0x2)
            yield Driver(sim, xen)
            nursery.cancel_scope.cancel()
    finally:
        engine.close()
        lender.close()


class Driver:
    """The guest side, lean: vCPU 0's slot filled from pre-encoded bytes, the ring directly."""

    def __init__(self, sim: SimHypervisor, xen: XenServer) -> None:
        self.sim = sim
        self.xen = xen

    async def run(self, kind: str, n: int) -> list[int]:
        sim = self.sim
        server = sim.server()
        now = time.perf_counter_ns
        out: list[int] = []
        if kind == "posted":
            ring = server.bufioreq
            assert ring is not None
            for i in range(n):
                assert post_buffered_write(ring, BAR0 + 8 * (i % 1024), 4, i)
                STAMP[0] = 0
                t0 = now()
                sim.guest_notify(39)  # REMOTE_BUF_PORT
                while not STAMP[0]:
                    await trio.lowlevel.checkpoint()
                out.append(STAMP[0] - t0)
                sim.calls.clear()
            return out
        remote = 40  # vCPU 0's port (REMOTE_PORT_BASE)
        addr, size, direction = {
            "bar2_read": (BAR2 + MAGIC, 4, IOREQ_READ),
            "bar0_read": (BAR0 + 0x100, 8, IOREQ_READ),
            "bar0_write": (BAR0 + 0x200, 8, IOREQ_WRITE),
        }[kind]
        raw = encode_ioreq(
            IoReq(
                addr,
                0x1122334455667788,
                1,
                size,
                remote,
                IoreqState.READY,
                False,
                direction,
                False,
                IoreqType.COPY,
            )
        )
        page = server.ioreq
        notified = sim.notified
        for _ in range(n):
            page[0:32] = raw
            event = trio.Event()
            notified[remote] = event
            t0 = now()
            sim.guest_notify(remote)
            await event.wait()
            out.append(STAMP[0] - t0)
            assert page[30] & 0x0F == IoreqState.RESP_READY
            page[30] &= 0xF0  # the slot free again (STATE_IOREQ_NONE), as Xen leaves it
            sim.calls.clear()
        return out


def steps() -> None:
    """Each step of a request alone, on this tree (timeit, best of 5): where the time goes."""
    # answer_slot is new with issue 12's dispatcher: --steps is for this tree only.
    from devmodel_wire.xen import answer_slot  # noqa: PLC0415

    async def main() -> None:
        async with bed() as driver:
            sim = driver.sim
            server = sim.server()
            page = server.ioreq
            ring = server.bufioreq
            assert ring is not None
            raw = encode_ioreq(
                IoReq(
                    BAR0 + 0x100, 0, 1, 8, 40, IoreqState.READY, False, IOREQ_READ, False,
                    IoreqType.COPY,
                )
            )
            page[0:32] = raw
            xen = driver.xen
            handler = xen.handler
            mmio_now = handler.mmio_now
            local = xen.vcpu_port[0]
            req = read_slot(page, 0)

            def drive_serve() -> None:
                coro = handler.serve(req)
                try:
                    coro.send(None)
                except StopIteration:
                    return
                raise AssertionError("serve suspended")

            def pending_unmask() -> None:
                sim._deliver(local)
                sim.evtchn_pending()
                sim.evtchn_unmask(local)

            def ring_one() -> None:
                post_buffered_write(ring, BAR0 + 0x300, 4, 7)
                xen.posted.drain()

            def post_only() -> None:  # the sim's side of ring_one, to subtract
                post_buffered_write(ring, BAR0 + 0x300, 4, 7)
                xen.ring.drain(ring)

            def drain_only() -> None:  # the protocol's ring parse of one entry
                post_buffered_write(ring, BAR0 + 0x300, 4, 7)

            def flags_answer() -> None:
                answer_slot(page, 0, page[30], 5)
                page[0:32] = raw

            def full_answer() -> None:
                complete_slot(page, 0, 5)
                page[0:32] = raw

            def notify() -> None:
                sim.evtchn_notify(local)

            cases = [
                ("event channel: pending + unmask (sim: a pipe read)", pending_unmask),
                ("slot: read_slot (decode to an IoReq)", lambda: read_slot(page, 0)),
                ("slot: IOREQ.unpack_from (the new dispatcher)", lambda: IOREQ.unpack_from(page)),
                ("slot: set_slot_state INPROCESS", lambda: set_slot_state(page, 0, 1)),
                ("serve (async, driven), resident BAR0 read", drive_serve),
                ("mmio_now, resident BAR0 read", lambda: mmio_now(BAR0 + 0x100, 8, True, 0)),
                ("mmio_now, BAR2 MAGIC read", lambda: mmio_now(BAR2, 4, True, 0)),
                ("mmio_now, resident BAR0 write", lambda: mmio_now(BAR0 + 0x200, 8, False, 1)),
                ("ring: the sim posts one", drain_only),
                ("ring: the sim posts one + BufferedRing.drain", post_only),
                ("ring: the sim posts one + PostedWrites.drain (performed)", ring_one),
                ("answer: complete_slot (+ slot refill)", full_answer),
                ("answer: answer_slot (+ slot refill)", flags_answer),
                ("notify (sim)", notify),
            ]
            for name, fn in cases:
                best = min(timeit.repeat(fn, number=20000, repeat=5)) / 20000
                print(f"{name:54} {best * 1e9:8.0f} ns")
            sim.calls.clear()

    trio.run(main)


def child(requests: int, profile: bool) -> None:
    print(json.dumps(measure(requests, profile)))


# -------------------------------------------------------------------------- the parent side


def run_tree(src: str, requests: int) -> dict[str, list[int]]:
    code = _FROM.format(src=src, bench=str(HERE), name="bench_xen_path", module="bench_xen_path")
    argv = [sys.executable, "-c", code, "--child", "--requests", str(requests)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=src, check=False)
    if done.returncode:
        raise SystemExit(f"{src}: the child failed:\n{done.stderr}")
    result: dict[str, list[int]] = json.loads(done.stdout.splitlines()[-1])
    return result


def pct(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="of each kind per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline-src", help="the older tree to compare with")
    parser.add_argument("--profile", action="store_true", help="cProfile this tree, once")
    parser.add_argument("--steps", action="store_true", help="time each step alone, this tree")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.requests, False)
        return 0
    if args.profile:
        measure(args.requests, profile=True)
        return 0
    if args.steps:
        steps()
        return 0
    trees = {"new": str(TOP)}
    if args.baseline_src:
        trees = {"baseline": os.path.abspath(args.baseline_src), **trees}
    samples: dict[str, dict[str, list[int]]] = {t: {k: [] for k in KINDS} for t in trees}
    medians: dict[str, dict[str, list[float]]] = {t: {k: [] for k in KINDS} for t in trees}
    order = list(trees)
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr)
        for tree in order:
            got = run_tree(trees[tree], args.requests)
            for kind in KINDS:
                samples[tree][kind] += got[kind]
                medians[tree][kind].append(statistics.median(got[kind]) / 1e3)
        order.reverse()
    print(
        f"Xen transport, device model's own time per request (us), {args.rounds} interleaved "
        f"rounds x {args.requests} requests, load {os.getloadavg()[0]:.1f}"
    )
    head = f"{'request':44}" + "".join(f" {t + ' med / p99':>22}" for t in trees)
    if "baseline" in trees:
        head += f" {'ratio (med, p99)':>18}"
    print(head)
    for kind in KINDS:
        line = f"{LABELS[kind]:44}"
        figures = {}
        for tree in trees:
            med = statistics.median(samples[tree][kind]) / 1e3
            p99 = pct(samples[tree][kind], 0.99)
            figures[tree] = (med, p99)
            line += f" {med:9.2f} / {p99:9.2f}"
        if "baseline" in trees:
            (bm, bp), (nm, np_) = figures["baseline"], figures["new"]
            line += f" {nm / bm:8.2f} {np_ / bp:8.2f}"
        print(line)
    print("medians of each round's median:")
    for tree in trees:
        cells = ", ".join(
            f"{kind} {statistics.median(medians[tree][kind]):.2f}" for kind in KINDS
        )
        print(f"  {tree}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
