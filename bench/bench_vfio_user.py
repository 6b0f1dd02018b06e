"""Trapped-access benchmark: devmodel against peers measured in the same run.

Prints, for 8-byte REGION_READs of BAR0 over a real unix socket from a client process:
reads per second and per-read latency (median, p99) for
  - devmodel (`devmodel run`, a separate process, the real server),
  - a C server that answers without doing anything (the floor the socket sets),
and the ratio between them; then the device model's own Python time per request (bytes in to
bytes out, measured in-process without the socket), which is what the Xen transport will
pay too. `--poll-max-us 0,50` runs one devmodel per value (adaptive polling off, on) and
alternates them with the floor, so that machine noise hits all alike ("default": no option,
as an older devmodel needs). `--baseline-src DIR` adds a devmodel run from another checkout's
sources (a tree with devmodel/ and protocol/, e.g. `git archive OLD devmodel protocol | tar -x
-C DIR`), alternated with the others: a
before/after comparison in one run.
Usage: bench/bench_vfio_user.py [--reads N] [--poll-max-us LIST] [--baseline-src DIR].
Not a test: machines here are noisy; compare figures from one run, and medians of several.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devmodel.aperture import OwnedMemory
from devmodel.backend import DeviceBackend
from devmodel.counters import DeviceCounters
from devmodel.leases.builtin_lender import BuiltinLender
from devmodel.leases.engine import LeaseEngine
from devmodel.pci.function import PciFunction
from devmodel.pci.identity import PciIdentity
from devmodel.testing import VfioUserClient
from devmodel.transports.vfio_user_requests import VfioUserRequests
from pyvfio_user import events as ev
from pyvfio_user.codec import HEADER_AND_ACCESS
from pyvfio_user.constants import Command

HERE = Path(__file__).resolve().parent

# `python -m devmodel` from another source tree: the editable install's finder is dropped so
# that the tree put first on sys.path is the one imported.
_RUN_FROM = (
    "import runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
    "sys.path[:0] = [{src!r}, {src!r} + '/protocol']; sys.argv[0] = 'devmodel'; "
    "runpy.run_module('devmodel', run_name='__main__', alter_sys=True)"
)


def wait_for(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server for {path} did not start")
        time.sleep(0.01)


def measure_socket(path: str, reads: int, negotiate: bool) -> list[float]:
    """Per-read round trips in seconds, from a blocking client."""
    with VfioUserClient(path) as client:
        if negotiate:
            client.attach()
        sock = client.sock
        buf = bytearray(64)
        samples = []
        perf = time.perf_counter
        for i in range(reads):
            offset = (i % 4096) * 8
            req = HEADER_AND_ACCESS.pack(i & 0xFFFF, Command.REGION_READ, 32, 0, 0, offset, 0, 8)
            t0 = perf()
            sock.sendall(req)
            got = 0
            while got < 40:
                got += sock.recv_into(memoryview(buf)[got:], 40 - got)
            samples.append(perf() - t0)
    return samples


def summarize(name: str, samples: list[float]) -> dict[str, float]:
    samples = samples[len(samples) // 10 :]  # drop warm-up
    med = statistics.median(samples)
    p99 = sorted(samples)[int(len(samples) * 0.99)]
    rate = len(samples) / sum(samples)
    print(
        f"  {name:<28} {rate:>10,.0f} reads/s   "
        f"median {med * 1e6:7.1f} us   p99 {p99 * 1e6:7.1f} us"
    )
    return {"rate": rate, "median": med, "p99": p99}


def own_time_loop(lent: bool = False) -> Callable[[int], float]:
    """A device model and a READY vfio-user connection in this process; returns a function
    that serves n REGION_READs from request bytes to reply bytes and returns the seconds taken.

    The requests go the transport's way: `VfioUserRequests.process` (the coroutine the socket
    loop awaits; it never suspends here, so it is driven with one `send`), with the aperture
    the device model has without a lender (anonymous memory), or with `lent` the lease engine
    with every window lent by the built-in lender (`devmodel run`'s default: a pread per read)."""
    counters = DeviceCounters()
    aperture: Any = OwnedMemory(256 << 20)
    if lent:
        aperture = LeaseEngine(256 << 20, 2 << 20, counters)
        BuiltinLender(aperture, 2 << 20).lend_everything()
    device = PciFunction(PciIdentity(), aperture, counters)
    requests = VfioUserRequests(DeviceBackend(device))
    conn = requests.conn
    # VERSION 0.0 without capabilities, then the reply, to reach the READY state.
    conn.receive_data(struct.pack("<HHIIIHH", 0, 1, 20, 0, 0, 0, 0))
    hello = conn.next_event()
    assert isinstance(hello, ev.VersionRequest)
    conn.send(conn.version_reply(hello))
    requests.slice.deadline = 1 << 62  # no time-slice yield: this loop measures, not serves
    requests_bytes = [
        HEADER_AND_ACCESS.pack(i & 0xFFFF, Command.REGION_READ, 32, 0, 0, (i % 4096) * 8, 0, 8)
        for i in range(1024)
    ]
    out = requests.out
    process = requests.process
    perf = time.perf_counter

    def serve(reads: int) -> float:
        t0 = perf()
        for i in range(reads):
            conn.receive_data(requests_bytes[i & 1023])
            coro = process()
            try:  # noqa: SIM105 (a context manager per read would be measured too)
                coro.send(None)
            except StopIteration:
                pass
            out.clear()  # the transport sends them
        return perf() - t0

    return serve


def device_model_own_time(reads: int) -> float:
    """Python time per REGION_READ from request bytes to reply bytes, without a socket."""
    return own_time_loop()(reads) / reads


def device_model_own_times(reads: int, batch: int = 1000, lent: bool = False) -> list[float]:
    """Like device_model_own_time, as the mean per read of each batch of `batch` reads."""
    serve = own_time_loop(lent)
    return [serve(batch) / batch for _ in range(max(1, reads // batch))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20000)
    parser.add_argument(
        "--poll-max-us",
        default="default",
        help="comma-separated --poll-max-us values, one devmodel each (default: none given)",
    )
    parser.add_argument("--baseline-src", help="also run the devmodel package found in DIR")
    args = parser.parse_args()
    polls = args.poll_max_us.split(",")
    if args.baseline_src:
        polls.insert(0, "baseline")
    tmp = Path(tempfile.mkdtemp(prefix="devmodel-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        echo_bin = tmp / "echo_server"
        subprocess.run(["gcc", "-O2", "-o", str(echo_bin), str(HERE / "echo_server.c")], check=True)
        echo_sock = str(tmp / "echo.sock")
        procs.append(subprocess.Popen([str(echo_bin), echo_sock]))
        wait_for(echo_sock, procs[-1])
        dm_socks: dict[str, str] = {}
        for poll in polls:
            dm_sock = str(tmp / f"dm-{poll}.sock")
            extra = [] if poll in ("default", "baseline") else ["--poll-max-us", poll]
            argv = [sys.executable, "-m", "devmodel", "run", "--socket-path", dm_sock]
            if poll == "baseline":
                argv[1:3] = ["-c", _RUN_FROM.format(src=os.path.abspath(args.baseline_src))]
            procs.append(subprocess.Popen([*argv, "--log-level", "warning", *extra]))
            wait_for(dm_sock, procs[-1])
            dm_socks[poll] = dm_sock
        print(f"8-byte trapped reads over a unix socket, {args.reads} each, one client process:")
        # Alternate them so that machine noise hits all alike.
        dm_samples: dict[str, list[float]] = {poll: [] for poll in polls}
        floor_samples: list[float] = []
        for _ in range(4):
            floor_samples += measure_socket(echo_sock, args.reads // 4, negotiate=False)
            for poll, dm_sock in dm_socks.items():
                dm_samples[poll] += measure_socket(dm_sock, args.reads // 4, negotiate=True)
        floor = summarize("C null server (floor)", floor_samples)
        for poll, samples in dm_samples.items():
            label = {"default": "devmodel", "baseline": "devmodel (baseline)"}.get(
                poll, f"devmodel --poll-max-us {poll}"
            )
            dm = summarize(label, samples)
            print(
                f"  ratio devmodel/floor: throughput {dm['rate'] / floor['rate']:.2f}x, "
                f"median latency {dm['median'] / floor['median']:.2f}x "
                f"(+{(dm['median'] - floor['median']) * 1e6:.1f} us per read)"
            )
        own = device_model_own_time(args.reads * 5)
        print(
            f"device model's own time per REGION_READ (bytes in to bytes out): {own * 1e6:.2f} us"
        )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
