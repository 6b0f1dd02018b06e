"""The lease connections over a real AF_UNIX stream socketpair with SCM_RIGHTS.

This checks the one assumption the fd association rests on, against the running kernel: a
recvmsg that returns fds ends inside the message whose sendmsg carried them, however small the
receive buffer and however many messages are queued in front.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

import devmodel_wire.lease as lp
from devmodel import testing
from devmodel.leases.grant_checks import check_grant_fd
from devmodel.testing import fd_is_open
from devmodel.unixfds import ancillary_space, recv_nowait, send_nowait
from devmodel_wire.lease.wire import encode
from pyvfio_user.sansio import CLOSED, NEED_DATA, Outgoing
from tests.unit.lease_protocol_support import GRANULE, RW, borrower_hello

MAX_FDS = 4


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def write(sock: socket.socket, out: Outgoing) -> None:
    """One sendmsg per message, the fds with it, as the specification asks of senders."""
    view = memoryview(out.data)
    sent = send_nowait(sock, view, out.fds)
    sock.sendall(view[sent:])


def read_events(
    sock: socket.socket, conn: lp.BorrowerConnection | lp.LenderConnection, bufsize: int
) -> tuple[list[lp.Event | lp.LeaseProtocolError], list[int]]:
    """Read to end of stream, feeding every recvmsg to `conn`; also return every fd received."""
    seen: list[lp.Event | lp.LeaseProtocolError] = []
    received: list[int] = []
    buf = bytearray(bufsize)
    while True:
        n, fds = recv_nowait(sock, buf, ancillary_space(MAX_FDS))  # FdsTruncated: too many
        received += fds
        conn.receive_data(buf[:n], fds)
        while True:
            try:
                got = conn.next_event()
            except lp.LeaseProtocolError as exc:
                seen.append(exc)
                continue
            if got is NEED_DATA:
                break
            if got is CLOSED:
                return seen, received
            assert not isinstance(got, type(CLOSED))
            seen.append(got)


def memfd(content: bytes, size: int) -> int:
    return testing.memfd(size, "lease", fill=content)


def handshake(
    b_sock: socket.socket, l_sock: socket.socket
) -> tuple[lp.BorrowerConnection, lp.LenderConnection]:
    borrower, lender = lp.BorrowerConnection(), lp.LenderConnection()
    write(b_sock, borrower.send(borrower_hello()))
    lender.receive_data(l_sock.recv(4096))
    assert isinstance(lender.next_event(), lp.Hello)
    write(l_sock, lender.send(lender.hello_reply("socket-lender")))
    borrower.receive_data(b_sock.recv(4096))
    assert isinstance(borrower.next_event(), lp.Hello)
    return borrower, lender


@pytest.mark.parametrize("bufsize", [1, 7, 16, 47, 48, 49, 4096, 65536])
def test_grants_arrive_with_their_own_memfd(
    pair: tuple[socket.socket, socket.socket], bufsize: int
) -> None:
    b_sock, l_sock = pair
    borrower, lender = handshake(b_sock, l_sock)
    sent_fds: list[int] = []
    try:
        for lease in range(1, 7):
            fd = memfd(f"lease {lease}".encode(), 2 * GRANULE)
            sent_fds.append(fd)
            # Pings between grants, so that fd-less messages queue in front of fd ones.
            for token in range(lease):
                write(l_sock, lender.send(lp.Ping(lease * 100 + token)))
            write(l_sock, lender.send(lp.Grant(lease, lease * GRANULE, GRANULE, 0, RW, fd)))
        write(l_sock, lender.send(lp.Bye()))
        l_sock.shutdown(socket.SHUT_WR)
    finally:
        for fd in sent_fds:
            os.close(fd)  # the borrower holds its own duplicates now
    seen, received = read_events(b_sock, borrower, bufsize)
    grants = [e for e in seen if isinstance(e, lp.Grant)]
    assert [g.lease_id for g in grants] == list(range(1, 7))
    assert sorted(g.fd for g in grants) == sorted(received)
    for grant in grants:
        try:
            assert os.pread(grant.fd, 16, 0).rstrip(b"\0") == f"lease {grant.lease_id}".encode()
            assert check_grant_fd(grant.fd, fd_offset=0, length=2 * GRANULE, prot=RW) is None
        finally:
            os.close(grant.fd)
    owed = borrower.owed_answers()
    assert {lease for kind, lease in owed if kind is lp.MsgType.GRANT} == set(range(1, 7))
    assert sum(isinstance(e, lp.Ping) for e in seen) == 21
    assert isinstance(seen[-1], lp.Bye)
    assert not [e for e in seen if isinstance(e, lp.LeaseProtocolError)]


def test_a_message_sent_in_pieces_keeps_its_fd(pair: tuple[socket.socket, socket.socket]) -> None:
    b_sock, l_sock = pair
    borrower, lender = handshake(b_sock, l_sock)
    fd = memfd(b"x", GRANULE)
    try:
        out = lender.send(lp.Grant(1, 0, GRANULE, 0, RW, fd))
        send_nowait(l_sock, out.data[:5], [fd])
        l_sock.sendall(out.data[5:])
        write(l_sock, lender.send(lp.Ping(1)))
        l_sock.shutdown(socket.SHUT_WR)
    finally:
        os.close(fd)
    seen, received = read_events(b_sock, borrower, 4096)
    assert len(received) == 1
    grant = seen[0]
    assert isinstance(grant, lp.Grant) and grant.fd == received[0]
    os.close(grant.fd)
    assert seen[1:] == [lp.Ping(1)]


def test_refused_fds_are_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    b_sock, l_sock = pair
    borrower, _ = handshake(b_sock, l_sock)
    a, b = memfd(b"a", GRANULE), memfd(b"b", GRANULE)
    try:
        send_nowait(l_sock, encode(lp.Pong(1)), [a])  # takes no fd
        send_nowait(l_sock, encode(lp.Grant(1, 0, GRANULE, 0, RW, 0)), [a, b])  # two
        l_sock.sendall(encode(lp.Ping(2)))
        l_sock.shutdown(socket.SHUT_WR)
    finally:
        os.close(a)
        os.close(b)
    seen, received = read_events(b_sock, borrower, 4096)
    assert len(received) == 3
    assert not any(map(fd_is_open, received))
    codes = [e.code for e in seen if isinstance(e, lp.LeaseProtocolError)]
    assert codes == [lp.ErrorCode.BAD_FD_COUNT, lp.ErrorCode.BAD_FD_COUNT]
    assert seen[-1] == lp.Ping(2)
