"""The benchmark's lender process: one blocking socket, no event loop, no objects per message.

bench/run times the lease path (PING -> PONG, a fault, REVOKE -> REVOKED) from the lender's
side of the lease socket. Those figures are meant to measure devmodel, so the lender's own
share must be as small as a real lender's could be. The first bench lender was a trio program
(a lock, a reader task and an Event per request, a checkpoint per send): its own scheduling
was up to a third of PING -> PONG (docs/performance.md, "The lease path"). A blocking lender
built on the sans-IO `LenderConnection` still spent ~45 us per PAGE_IN of its own (parse into
an event, the connection's bookkeeping, encode, on a process just woken with cold caches).
This one is what a C lender would do, in Python:

- The HELLO exchange goes through `LenderConnection` (it checks devmodel's HELLO); after it,
  messages are framed and built with the wire module's own structs (`devmodel_wire.lease.wire`:
  the same layouts devmodel parses), one `unpack_from` or `pack` each. devmodel checks every
  message it receives, so a wrong byte here fails the run (a GRANT_NACK or ERROR is counted and
  makes bench/run's fault row fail); tests/unit/test_lean_lender.py compares these bytes with
  the sans-IO encoder's.
- PING and REVOKE: the request is built first, the clock read, the request sent, and the socket
  read until the answer arrives; the sample ends when the `recv` that brought the answer
  returns, before it is parsed. That is the round trip as any lender sees it over the socket.
- PAGE_IN: answered at once, from wherever the lender is waiting (idle in `poll` on the socket
  and its command pipe, or inside another measurement), with one `sendmsg` per GRANT (with its
  memfd) and the PAGE_IN_DONE right after it. The protocol puts a GRANT alone in the `sendmsg`
  that carries its fd (docs/lease-protocol.md 5), so the two cannot share one call. A PAGE_IN
  covering a window this lender is revoking waits until REVOKED arrives, then is served in
  message order, as a lender must. The lender times its own share of each PAGE_IN (arrival to
  the GRANT sent, and to the PAGE_IN_DONE sent): command `own`.
- PING from devmodel (its keepalive): PONG at once.

Driven by one command per line on stdin, answered with one JSON line on stdout (the same
commands as before: `ready`, `evict I`, `revokes I N`, `stats`; and `own`, the lender's own
times per PAGE_IN served since the last `own`, to its GRANT sent and to its PAGE_IN_DONE
sent); bench_leases.LenderProcess starts it. Run as `python bench/lean_lender.py SOCKET-PATH`.
Imports no trio.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import select
import socket
import struct
import sys
import time

import devmodel_wire.lease as lp
from devmodel_wire.lease.constants import HEADER_SIZE, PROT_READ, PROT_WRITE, MsgType
from devmodel_wire.lease.wire import CODE_TEXT_BODY, GRANT_BODY, HEADER, PAGE_IN_BODY, REVOKE_BODY

KiB, MiB = 1 << 10, 1 << 20
RW = PROT_READ | PROT_WRITE
# The set-up bench_leases.EndToEnd starts devmodel with (kept in step with it there).
APERTURE = 64 * MiB
WINDOW = 2 * MiB
MARK = 0x4D41524B00000000  # window i holds MARK + i in its first 8 bytes
F_ADD_SEALS: int = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SHRINK: int = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW: int = getattr(fcntl, "F_SEAL_GROW", 0x0004)
perf = time.perf_counter

RESIDENT, REVOKING, EVICTED = "resident", "revoking", "evicted"

# Message types as plain ints: comparing with an IntEnum member costs a lookup each time.
PING, PONG, BYE, ERROR = int(MsgType.PING), int(MsgType.PONG), int(MsgType.BYE), int(MsgType.ERROR)
GRANT, GRANT_ACK, GRANT_NACK = int(MsgType.GRANT), int(MsgType.GRANT_ACK), int(MsgType.GRANT_NACK)
REVOKE, REVOKED = int(MsgType.REVOKE), int(MsgType.REVOKED)
PAGE_IN, PAGE_IN_DONE = int(MsgType.PAGE_IN), int(MsgType.PAGE_IN_DONE)
EVICT = int(lp.RevokeMode.EVICT)
OK = int(lp.PageInStatus.OK)
_unpack_header = HEADER.unpack_from
_unpack_page_in = PAGE_IN_BODY.unpack_from


def grant_bytes(lease: int, offset: int, length: int, fd_offset: int, prot: int) -> bytes:
    return HEADER.pack(GRANT, 0, HEADER_SIZE + GRANT_BODY.size, lease) + GRANT_BODY.pack(
        offset, length, fd_offset, prot, 0
    )


def page_in_done_bytes(request_id: int) -> bytes:
    """PAGE_IN_DONE OK, no text."""
    return HEADER.pack(
        PAGE_IN_DONE, 0, HEADER_SIZE + CODE_TEXT_BODY.size, request_id
    ) + CODE_TEXT_BODY.pack(OK, 0)


def revoke_bytes(lease: int) -> bytes:
    return HEADER.pack(REVOKE, 0, HEADER_SIZE + REVOKE_BODY.size, lease) + REVOKE_BODY.pack(EVICT)


def ping_bytes(token: int) -> bytes:
    return HEADER.pack(PING, 0, HEADER_SIZE, token)


def pong_bytes(token: int) -> bytes:
    return HEADER.pack(PONG, 0, HEADER_SIZE, token)


class Closed(Exception):
    """devmodel closed the lease socket (or said BYE)."""


class LeanLender:
    """One window = one lease = a slice of one sealed memfd, lent over a blocking socket."""

    def __init__(self, sock: socket.socket, aperture: int = APERTURE, window: int = WINDOW) -> None:
        self.sock = sock
        self.window = window
        self.home = os.memfd_create("bench-lean-lender", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.home, aperture)
        fcntl.fcntl(self.home, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
        for i in range(aperture // window):
            os.pwrite(self.home, struct.pack("<Q", MARK + i), i * window)
        self.rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self.home]))]
        # Seconds a PAGE_IN waits before it is answered (command `delay`): a lender that has
        # to bring the memory back first, so that concurrent faults all wait on one answer.
        self.page_in_delay = 0.0
        count = aperture // window
        self.state = [EVICTED] * count
        self.lease = [0] * count
        self.by_lease: dict[int, int] = {}
        self.deferred: list[tuple[int, int, int]] = []  # PAGE_INs waiting for a REVOKED
        self.rx = bytearray()
        self.buf = bytearray(64 * KiB)
        self.view = memoryview(self.buf)
        self.next_lease = 1
        self.next_token = 1
        self.stats = {"page_ins": 0, "grants": 0, "acks": 0, "nacks": 0, "errors": 0}
        # Seconds per PAGE_IN served at once: to its GRANT sent, to its PAGE_IN_DONE sent.
        self.own_page_in: list[tuple[float, float]] = []
        self._granted = 0.0
        # What `wait_for` waits for, and when its answer's bytes arrived.
        self._want: tuple[int, int] | None = None
        self._arrived = 0.0
        self._got = False

    # -- the socket --------------------------------------------------------------------------

    def send_grant(self, data: bytes) -> None:
        """A GRANT: its own sendmsg, carrying the memfd; the rest, if any, without."""
        sent = self.sock.sendmsg([data], self.rights)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def receive(self) -> None:
        """One blocking receive, then every complete message in it handled."""
        n = self.sock.recv_into(self.buf)
        arrived = perf()
        if not n:
            raise Closed
        rx = self.rx
        rx += self.view[:n]
        pos, end = 0, len(rx)
        while end - pos >= HEADER_SIZE:
            msg_type, _flags, length, msg_id = _unpack_header(rx, pos)
            if length < HEADER_SIZE:
                raise RuntimeError(f"devmodel sent a message of length {length}")
            if end - pos < length:
                break
            self.handle(msg_type, msg_id, rx, pos, arrived)
            pos += length
        del rx[:pos]

    def wait_for(self, msg_type: int, msg_id: int) -> float:
        """Receive until the answer (`msg_type`, `msg_id`) arrives; when its bytes came."""
        self._want, self._got = (msg_type, msg_id), False
        try:
            while not self._got:
                self.receive()
        finally:
            self._want = None
        return self._arrived

    # -- what devmodel sends -----------------------------------------------------------------

    def handle(self, msg_type: int, msg_id: int, rx: bytearray, pos: int, arrived: float) -> None:
        if msg_type == PAGE_IN:
            self.stats["page_ins"] += 1
            offset, length, _access = _unpack_page_in(rx, pos + HEADER_SIZE)
            self._granted = 0.0
            if self.page_in(msg_id, offset, length) and self._granted:
                # The lender's own share of a fault: from the PAGE_IN's arrival to the GRANT's
                # sendmsg returning (what the faulting access waits for: the grant serves it)
                # and to the PAGE_IN_DONE's. A PAGE_IN for memory lent again meanwhile (a
                # load client touched a window between REVOKED and its new GRANT) is answered
                # with PAGE_IN_DONE alone: no GRANT, no sample.
                self.own_page_in.append((self._granted - arrived, perf() - arrived))
        elif msg_type == REVOKED:
            index = self.by_lease.pop(msg_id)
            self.state[index] = EVICTED
            if self._want == (REVOKED, msg_id):
                self._arrived, self._got = arrived, True
            if self.deferred:  # in message order: they were behind this REVOKED
                waiting, self.deferred = self.deferred, []
                for request in waiting:
                    self.page_in(*request)
        elif msg_type == PONG:
            if self._want == (PONG, msg_id):
                self._arrived, self._got = arrived, True
        elif msg_type == PING:
            self.sock.sendall(pong_bytes(msg_id))
        elif msg_type == GRANT_ACK:
            self.stats["acks"] += 1
            if self._want == (GRANT_ACK, msg_id):
                self._arrived, self._got = arrived, True
        elif msg_type == GRANT_NACK:
            self.stats["nacks"] += 1
            print(f"lean lender: lease {msg_id} refused", file=sys.stderr)
        elif msg_type == BYE:
            raise Closed
        else:  # ERROR, or anything a borrower does not send
            self.stats["errors"] += 1
            print(f"lean lender: devmodel sent message type {msg_type:#x}", file=sys.stderr)

    def page_in(self, request_id: int, offset: int, length: int) -> bool:
        """Serve a PAGE_IN at once (True), or keep it until the REVOKED it waits for."""
        window = self.window
        covered = range(offset // window, (offset + length - 1) // window + 1)
        state = self.state
        if any(state[i] == REVOKING for i in covered):
            self.deferred.append((request_id, offset, length))
            return False
        if self.page_in_delay:
            time.sleep(self.page_in_delay)
        for i in covered:
            if state[i] == EVICTED:
                self.grant(i)
        self.sock.sendall(page_in_done_bytes(request_id))
        return True

    # -- what the lender does ----------------------------------------------------------------

    def grant(self, index: int) -> None:
        lease = self.next_lease
        self.next_lease += 1
        self.lease[index], self.state[index] = lease, RESIDENT
        self.by_lease[lease] = index
        self.stats["grants"] += 1
        start = index * self.window
        self.send_grant(grant_bytes(lease, start, self.window, start, RW))
        self._granted = perf()

    def handshake(self) -> None:
        """HELLO both ways through the sans-IO connection (it checks devmodel's), then lend
        every window."""
        conn = lp.LenderConnection()
        while not isinstance(conn.next_event(), lp.Hello):
            n = self.sock.recv_into(self.buf)
            if not n:
                raise Closed
            conn.receive_data(self.view[:n])
        self.sock.sendall(conn.send(conn.hello_reply("bench-lean-lender")).data)
        for i in range(len(self.state)):
            self.grant(i)

    def ready(self) -> None:
        """Wait until devmodel has answered every grant of the start."""
        while self.stats["acks"] + self.stats["nacks"] < len(self.state):
            self.receive()

    def revoke(self, index: int) -> float:
        """REVOKE the window's lease; seconds from the send to REVOKED's arrival."""
        if self.state[index] != RESIDENT:
            raise RuntimeError(f"window {index} is {self.state[index]}, not resident")
        lease = self.lease[index]
        self.state[index] = REVOKING
        data = revoke_bytes(lease)
        t0 = perf()
        self.sock.sendall(data)
        return self.wait_for(REVOKED, lease) - t0

    def ping(self) -> float:
        token = self.next_token
        self.next_token += 1
        data = ping_bytes(token)
        t0 = perf()
        self.sock.sendall(data)
        return self.wait_for(PONG, token) - t0

    def revoke_series(self, index: int, n: int) -> tuple[list[float], list[float]]:
        """n times: revoke the window (timed), lend it again unless a page-in did, and PING
        (timed, the peer), the PING before or after the revoke in turn.

        The new GRANT's GRANT_ACK is awaited before the next request: else that PING or REVOKE
        would be timed behind devmodel's work on the GRANT (receiving its fd, checking it,
        lending it: ~20 us here), which no lender asking on an idle device waits for."""
        revokes, pings = [], []
        for i in range(n):
            if i % 2:
                pings.append(self.ping())
            revokes.append(self.revoke(index))
            if self.state[index] == EVICTED:
                self.grant(index)
                self.wait_for(GRANT_ACK, self.lease[index])
            if not i % 2:
                pings.append(self.ping())
        return revokes, pings


def reply(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def command(lender: LeanLender, words: list[str]) -> bool:
    """Run one command; False to stop."""
    if words[0] == "ready":
        lender.ready()
        reply(ok=True)
    elif words[0] == "evict":
        reply(t=lender.revoke(int(words[1])))
    elif words[0] == "revokes":
        revokes, pings = lender.revoke_series(int(words[1]), int(words[2]))
        reply(revokes=revokes, pings=pings)
    elif words[0] == "delay":
        lender.page_in_delay = float(words[1])
        reply(ok=True)
    elif words[0] == "stats":
        reply(**lender.stats)
    elif words[0] == "own":
        reply(grant=[g for g, _ in lender.own_page_in], done=[d for _, d in lender.own_page_in])
        lender.own_page_in = []
    else:
        return False
    return True


def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    reply(listening=True)
    sock, _ = listener.accept()
    listener.close()
    lender = LeanLender(sock)
    lender.handshake()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(0, select.POLLIN)
    pending = b""
    try:
        while True:
            for fd, _ in poller.poll():
                if fd != 0:
                    lender.receive()
                    continue
                chunk = os.read(0, 4096)
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if not command(lender, line.decode().split()):
                        return
    except Closed:
        return
    finally:
        sock.close()
        os.close(lender.home)


if __name__ == "__main__":
    serve(sys.argv[1])
