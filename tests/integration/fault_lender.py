"""A lender process that misbehaves on purpose, for the fault matrix (docs/robustness.md).

    python tests/integration/fault_lender.py --socket PATH [options]

It lends the whole aperture, one lease per granule, every window starting with the 8 bytes
`win%05d` (its index), then evicts the windows named by --evict. After each REVOKED it poisons
the pages it got back (`POISON!!` over the whole window, the contents kept aside), so a guest
read that ever returns poison is a read of a revoked page. What it does with a PAGE_IN is the
fault under test (--on-page-in): answer it (the contents written back, then GRANT and
PAGE_IN_DONE), ignore it forever, stop itself (SIGSTOP) or kill itself (SIGKILL) the moment
it arrives, i.e. exactly mid page-in. --stop-after-revoke stops it right after its REVOKEs
went out, i.e. mid revoke (in its first session only). --unsealed-window grants that window
from a memfd without seals; --seal-write-after-grant adds F_SEAL_WRITE once the grants are
acknowledged; --try-truncate then tries to shrink its sealed memfd (and reports what the
kernel said). It serves one borrower connection after another until killed, so a device
model that reconnects is served again.

Progress goes to stdout, one line each, flushed: `listening`, `session N`, `acked`,
`evicted`, `page-in RID OFFSET`, `nack LEASE REASON`, `truncate RESULT`, `write-sealed`,
`bye TEXT`, `session ended: WHY`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import sys

import devmodel_wire.lease as lp
from devmodel.unixfds import recv_nowait, send_nowait
from pyvfio_user.sansio import CLOSED, NEED_DATA

F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
F_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x0008)
POISON = b"POISON!!"
RW = 3
STOPPED_ONCE: list[bool] = []  # --stop-after-revoke has stopped this process already


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def tag(window: int) -> bytes:
    return b"win%05d" % window


class Session:
    def __init__(self, sock: socket.socket, args: argparse.Namespace) -> None:
        self.sock = sock
        self.args = args
        self.conn = lp.LenderConnection()
        self.granule = 0
        self.windows = 0
        self.memfd = -1
        self.unsealed = -1
        self.next_lease = 1
        self.lease_of: dict[int, int] = {}  # window -> live lease
        self.window_of: dict[int, int] = {}  # lease -> window
        self.acked: set[int] = set()
        self.revoking: set[int] = set()
        self.kept: dict[int, bytes] = {}  # window -> contents of an evicted window
        self.evicted_said = False

    def send(self, event: lp.Event) -> None:
        out = self.conn.send(event)
        data = memoryview(out.data)
        sent = send_nowait(self.sock, data, out.fds)
        self.sock.sendall(data[sent:])

    def grant(self, window: int) -> None:
        lease = self.next_lease
        self.next_lease += 1
        self.lease_of[window] = lease
        self.window_of[lease] = window
        offset = window * self.granule
        unsealed = window == self.args.unsealed_window
        fd = self.unsealed if unsealed else self.memfd
        at = 0 if unsealed else offset
        self.send(lp.Grant(lease, offset, self.granule, at, RW, fd))

    def hello(self, event: lp.Hello) -> None:
        self.send(self.conn.hello_reply(name="fault-lender"))
        self.granule = event.granule
        self.windows = event.aperture_size // event.granule
        self.memfd = os.memfd_create("fault-lender", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, event.aperture_size)
        for w in range(self.windows):
            os.pwrite(self.memfd, tag(w), w * self.granule)
        fcntl.fcntl(self.memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
        if self.args.unsealed_window is not None:
            self.unsealed = os.memfd_create("fault-lender-unsealed", os.MFD_CLOEXEC)
            os.ftruncate(self.unsealed, self.granule)
            os.pwrite(self.unsealed, tag(self.args.unsealed_window), 0)
        for w in range(self.windows):
            self.grant(w)

    def all_acked(self) -> None:
        say("acked")
        if self.args.seal_write_after_grant:
            fcntl.fcntl(self.memfd, F_ADD_SEALS, F_SEAL_WRITE)
            say("write-sealed")
        if self.args.try_truncate:
            try:
                os.ftruncate(self.memfd, self.granule)
                say("truncate done")
            except OSError as exc:
                say(f"truncate {errno_name(exc)}")
        for w in self.args.evict:
            lease = self.lease_of[w]
            self.revoking.add(lease)
            self.send(lp.Revoke(lease, lp.RevokeMode.EVICT))
        if self.args.stop_after_revoke and self.args.evict and not STOPPED_ONCE:
            STOPPED_ONCE.append(True)  # once per process: a later session lends normally
            say("stopping mid revoke")
            os.kill(os.getpid(), signal.SIGSTOP)

    def revoked(self, lease: int) -> None:
        self.revoking.discard(lease)
        w = self.window_of.pop(lease)
        del self.lease_of[w]
        # The pages are the lender's again: keep the contents, poison the pages.
        self.kept[w] = os.pread(self.memfd, self.granule, w * self.granule)
        os.pwrite(self.memfd, POISON * (self.granule // len(POISON)), w * self.granule)
        if not self.revoking and not self.evicted_said:
            self.evicted_said = True
            say("evicted")

    def page_in(self, event: lp.PageIn) -> None:
        say(f"page-in {event.request_id} {event.offset}")
        how = self.args.on_page_in
        if how == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            return  # continued (SIGCONT): as if it had never answered
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "ignore":
            return
        for w in range(event.offset // self.granule, (event.offset + event.length) // self.granule):
            if w in self.kept:
                os.pwrite(self.memfd, self.kept.pop(w), w * self.granule)
            if w not in self.lease_of:
                self.grant(w)
        self.send(lp.PageInDone(event.request_id, lp.PageInStatus.OK))

    def handle(self, event: lp.Event) -> None:
        if isinstance(event, lp.Hello):
            self.hello(event)
        elif isinstance(event, lp.Ping):
            self.send(lp.Pong(event.token))
        elif isinstance(event, lp.GrantAck):
            self.acked.add(event.lease_id)
            if len(self.acked) == self.windows - (self.args.unsealed_window is not None):
                self.all_acked()
        elif isinstance(event, lp.GrantNack):
            say(f"nack {event.lease_id} {lp.NackReason(event.reason).name}")
            window = self.window_of.pop(event.lease_id)
            del self.lease_of[window]
        elif isinstance(event, lp.Revoked):
            self.revoked(event.lease_id)
        elif isinstance(event, lp.PageIn):
            self.page_in(event)

    def run(self) -> None:
        buf = bytearray(65536)
        try:
            while True:
                n, fds = recv_nowait(self.sock, buf)
                if n == 0:
                    say("session ended: end of stream")
                    return
                self.conn.receive_data(buf[:n], fds)
                while True:
                    try:
                        event = self.conn.next_event()
                    except lp.LeaseProtocolError as exc:
                        say(f"protocol error {exc}")
                        if exc.fatal:
                            return
                        continue
                    if event is NEED_DATA:
                        break
                    if event is CLOSED:
                        say("session ended: end of stream")
                        return
                    if isinstance(event, lp.Bye):
                        say(f"bye {event.text}")
                        return
                    assert not isinstance(event, type(NEED_DATA))
                    self.handle(event)
        except OSError as exc:
            say(f"session ended: {exc}")
        finally:
            for fd in (self.memfd, self.unsealed):
                if fd >= 0:
                    os.close(fd)


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True)
    p.add_argument(
        "--on-page-in", choices=["grant", "ignore", "stop", "kill"], default="grant"
    )
    p.add_argument("--evict", type=lambda s: [int(x) for x in s.split(",") if x], default=[1])
    p.add_argument("--stop-after-revoke", action="store_true")
    p.add_argument("--unsealed-window", type=int, default=None)
    p.add_argument("--seal-write-after-grant", action="store_true")
    p.add_argument("--try-truncate", action="store_true")
    args = p.parse_args()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)  # a stale socket of an earlier (killed) lender on this path
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.socket)
    listener.listen(4)
    say("listening")
    sessions = 0
    while True:
        select.select([listener], [], [])
        sock, _ = listener.accept()
        sessions += 1
        say(f"session {sessions}")
        with sock:
            Session(sock, args).run()


if __name__ == "__main__":
    main()
