"""dma-buf leases next to memfd leases, in one run: a trapped read and a fault.

The rows (in process, `LeaseEngine.read` of 8 bytes, rounds interleaved so that machine noise
hits both kinds alike; the memfd lease is the peer):

  a) trapped read of a resident window: pread on the memfd, against sync-start, a copy from
     the lease's mapping and sync-end on the dma-buf;
  b) fault: the window was just evicted, an inline lender grants it again at once (for the
     dma-buf that includes mapping it) and answers PAGE_IN_DONE, then the read is served;
  c) the floor of b)'s extra work on its own: a DMA_BUF_IOCTL_SYNC pair.

It needs a kernel with udmabuf (/dev/udmabuf): the dma-bufs are udmabufs made from the memfd
the memfd leases use. Elsewhere it prints why it skips and exits 0, unless `--stand-in`, which
measures a memfd mapped in the dma-buf's place with no sync ioctl (the engine's share of the
cost, without the kernel's; the smoke test uses it). Inside the udmabuf VM (tests/udmabuf/)
run it as `python bench/bench_dmabuf.py`.

Usage: bench/bench_dmabuf.py [--quick] [--repeat N] [--stand-in]. Not a test; the smoke test
is tests/unit/test_bench_dmabuf.py.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import struct
import sys
import time
from collections.abc import Sequence

import trio

import devmodel_wire.lease as lp
from devmodel.counters import DeviceCounters
from devmodel.leases.dmabuf import (
    DMA_BUF_SYNC_END,
    DMA_BUF_SYNC_READ,
    DMA_BUF_SYNC_START,
    DmabufSupport,
    dma_buf_sync,
    udmabuf_create,
    udmabuf_missing,
)
from devmodel.leases.engine import EngineConfig, LeaseEngine
from devmodel_wire.lease.checks import DmabufFacts
from devmodel_wire.lease.constants import PROT_READ, PROT_WRITE, FdKind

MiB = 1 << 20
GRANULE = 2 * MiB
WINDOWS = 4  # 0: memfd faulted, 1: memfd resident, 2: dma-buf faulted, 3: dma-buf resident
SIZE = WINDOWS * GRANULE
RW = PROT_READ | PROT_WRITE
MARK = 0x444D414255460000
F_ADD_SEALS: int = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SHRINK: int = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW: int = getattr(fcntl, "F_SEAL_GROW", 0x0004)
perf = time.perf_counter


class BenchFailed(Exception):
    """A read returned the wrong bytes, or a grant was refused."""


def is_dmabuf(window: int) -> bool:
    return window >= 2


class Lender:
    """An inline lender (a `LenderPort`): answers each PAGE_IN inside `send_page_in`, from the
    memfd for windows 0-1 and from the dma-buf for windows 2-3, at fd offset = aperture
    offset."""

    answers_later = False  # inline (LenderPort)

    def __init__(self, engine: LeaseEngine, memfd: int, dmabuf: int) -> None:
        self.engine = engine
        self.memfd = memfd
        self.dmabuf = dmabuf
        self.next_lease = 1
        self.lease_of: dict[int, int] = {}
        engine.port = self

    def grant(self, window: int) -> None:
        lease = self.next_lease
        self.next_lease += 1
        offset = window * GRANULE
        fd, kind = (self.dmabuf, FdKind.DMABUF) if is_dmabuf(window) else (self.memfd, 0)
        self.engine.grant(lease, offset, GRANULE, offset, RW, os.dup(fd), kind)
        self.lease_of[window] = lease

    def send_page_in(self, request_id: int, offset: int, length: int, access: lp.Access) -> bool:
        self.grant(offset // GRANULE)
        self.engine.page_in_done(request_id, lp.PageInStatus.OK)
        return True


def stand_in_support() -> DmabufSupport:
    """A memfd taken for a udmabuf: mapped like one, with no sync ioctl."""

    def inspect(fd: int) -> DmabufFacts:
        return DmabufFacts("udmabuf", os.O_RDWR, os.fstat(fd).st_size)

    def sync(fd: int, flags: int) -> None:
        pass

    return DmabufSupport(inspect=inspect, sync=sync)


def show(name: str, samples: list[float]) -> float:
    samples = samples[len(samples) // 10 :]  # warm-up
    med = statistics.median(samples)
    p99 = sorted(samples)[min(len(samples) - 1, int(len(samples) * 0.99))]
    n = len(samples)
    print(f"    {name:<40} median {med * 1e6:8.2f} us   p99 {p99 * 1e6:8.2f} us   (n={n})")
    return med


def pair(title: str, memfd: list[float], dmabuf: list[float], what: str) -> None:
    print(f"  {title}")
    peer = show("memfd lease (peer)", memfd)
    subject = show(f"{what} lease", dmabuf)
    print(f"    ratio {what}/memfd: {subject / peer:.2f}x (+{(subject - peer) * 1e6:.2f} us)")


async def measure(engine: LeaseEngine, lender: Lender, repeat: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"read-m": [], "read-d": [], "fault-m": [], "fault-d": []}

    async def read(window: int, key: str) -> None:
        t0 = perf()
        data = await engine.read(window * GRANULE, 8)
        took = perf() - t0
        if data != struct.pack("<Q", MARK + window):
            raise BenchFailed(f"window {window} read {data.hex()}")
        times[key].append(took)

    for i in range(repeat):
        for window in (0, 2):
            await engine.revoke(lender.lease_of[window], lp.RevokeMode.EVICT)
        order = [(1, "read-m"), (3, "read-d"), (0, "fault-m"), (2, "fault-d")]
        if i % 2:
            order.reverse()
        for window, key in order:
            await read(window, key)
    return times


def sync_floor(fd: int, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        t0 = perf()
        dma_buf_sync(fd, DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ)
        dma_buf_sync(fd, DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ)
        samples.append(perf() - t0)
    return samples


def run(repeat: int, stand_in: bool) -> int:
    memfd = os.memfd_create("bench-dmabuf-heap", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, SIZE)
    fcntl.fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
    for w in range(WINDOWS):
        os.pwrite(memfd, struct.pack("<Q", MARK + w), w * GRANULE)
    dmabuf = os.dup(memfd) if stand_in else udmabuf_create(memfd, 0, SIZE)
    engine = LeaseEngine(SIZE, GRANULE, DeviceCounters(), EngineConfig())
    if stand_in:
        engine.dmabuf = stand_in_support()
    what = "memfd-as-dma-buf (stand-in)" if stand_in else "udmabuf"
    try:
        lender = Lender(engine, memfd, dmabuf)
        for w in range(WINDOWS):
            lender.grant(w)
        times = trio.run(measure, engine, lender, repeat)
        if engine.counters.failed_accesses:
            raise BenchFailed(f"{engine.counters.failed_accesses} accesses failed")
        print(f"dma-buf lease benchmark: {repeat} samples per row, {what}, {os.cpu_count()} cpus")
        pair("a) trapped 8-byte read, resident window", times["read-m"], times["read-d"], what)
        pair(
            "b) fault: evicted window, inline lender grants again, read served",
            times["fault-m"],
            times["fault-d"],
            what,
        )
        if not stand_in:
            print("  c) floor")
            show("DMA_BUF_IOCTL_SYNC start+end (read)", sync_floor(dmabuf, repeat))
    finally:
        engine.close()
        os.close(dmabuf)
        os.close(memfd)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke test")
    parser.add_argument("--repeat", type=int, help="samples per row (default 2000)")
    parser.add_argument(
        "--stand-in",
        action="store_true",
        help="without udmabuf: a memfd mapped in the dma-buf's place, no sync ioctl",
    )
    args = parser.parse_args(argv)
    repeat = args.repeat or (50 if args.quick else 2000)
    if not args.stand_in:
        missing = udmabuf_missing()
        if missing is not None:
            print(f"dma-buf lease benchmark skipped: {missing}")
            print("  (run it where udmabuf exists, e.g. in the udmabuf test VM; --stand-in")
            print("   measures a memfd in the dma-buf's place)")
            return 0
    try:
        return run(repeat, args.stand_in)
    except BenchFailed as exc:
        print(f"FAILED: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
