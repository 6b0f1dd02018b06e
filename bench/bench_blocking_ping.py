"""The device model's own share of a lease round trip: PING -> PONG from a blocking lender.

bench_lease_path.py and bench/run first timed PING -> PONG inside a trio lender (a lock, a
reader task and an Event per PING), whose own scheduling was part of the figure; this script
showed it, with a lender that is one blocking socket, as the vfio-user client is: PING -> PONG,
alternated with a resident read from a blocking vfio-user client, against one `devmodel run`
(this tree's, or `--src DIR`'s). bench/run's lender is now such a one (bench/lean_lender.py).
Usage: bench/bench_blocking_ping.py [--src DIR] [--n N]. Run it for each tree, in turn.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_leases as bl

import devmodel_wire.lease as lp
from devmodel.unixfds import rights
from pyvfio_user.sansio import CLOSED, NEED_DATA


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--src", help="run the devmodel package of this checkout")
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="devmodel-blocking-ping-"))
    cpus = sorted(os.sched_getaffinity(0))
    server, client = {cpus[0]}, {cpus[-1]}
    os.sched_setaffinity(0, client)
    lender_sock, dm_sock = str(tmp / "lender.sock"), str(tmp / "dm.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(lender_sock)
    listener.listen()
    dm = subprocess.Popen(
        bl.devmodel_command(dm_sock, lender_sock, src=args.src),
        preexec_fn=bl.pinned(server),  # noqa: PLW1509
    )
    sock, _ = listener.accept()
    conn = lp.LenderConnection()
    buf = bytearray(64 << 10)

    def event() -> lp.Event:
        while True:
            e = conn.next_event()
            if e is CLOSED:
                raise bl.BenchFailed("devmodel closed the lease socket")
            if e is not NEED_DATA:
                assert not isinstance(e, type(NEED_DATA))
                return e
            n = sock.recv_into(buf)
            conn.receive_data(memoryview(buf)[:n])

    try:
        event()  # HELLO
        sock.sendall(conn.send(conn.hello_reply("blocking")).data)
        home = bl.sealed_memfd(bl.E2E_APERTURE)
        bl.mark_windows(home, bl.E2E_APERTURE, bl.E2E_GRANULE)
        out = conn.send(lp.Grant(1, 0, bl.E2E_GRANULE, 0, bl.RW, home))
        sock.sendmsg([out.data], rights(out.fds))
        if not isinstance(event(), lp.GrantAck):
            raise bl.BenchFailed("the grant was refused")
        bl.wait_for_path(dm_sock, dm)
        reader = bl.RawClient(dm_sock)
        pings: list[float] = []
        reads: list[float] = []
        for i in range(args.n):  # well under devmodel's 5 s keepalive: no PING of its own
            data = conn.send(lp.Ping(i + 1)).data
            t0 = time.perf_counter()
            sock.sendall(data)
            event()
            pings.append(time.perf_counter() - t0)
            reads.append(reader.read(0)[0])
        reader.close()
    finally:
        bl.stop_process(dm)
        sock.close()
        listener.close()
    med, p99 = statistics.median, bl.pct
    print(
        f"{args.src or 'this tree'}: PING -> PONG median {med(pings) * 1e6:.1f} us, "
        f"p99 {p99(pings, 0.99) * 1e6:.1f} us; resident read median {med(reads) * 1e6:.1f} us, "
        f"p99 {p99(reads, 0.99) * 1e6:.1f} us; ratio {med(pings) / med(reads):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
