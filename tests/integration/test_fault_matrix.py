"""The fault matrix (docs/robustness.md): real processes, one fault each.

Three processes in each case: `devmodel run` as a toolstack starts it, a lender
(tests/integration/fault_lender.py, which misbehaves on purpose exactly where the case says),
and a vfio-user client playing QEMU (devmodel.testing.VfioUserClient, in this process or in a
child process that is killed). What each case checks is what the documentation promises the
guest: devmodel stays up (or exits cleanly, with its log saying why), no access is answered
later than its deadline plus slack (QEMU gives up on a reply after 5 s), and no read ever
returns a page the lender got back (the lender poisons every page it gets back).

Timing is asserted loosely: an access bounded by a 1 s page-in deadline must be answered
within `BOUND` (4.5 s, under QEMU's 5 s reply timeout), however slow the machine; a failure
that should be immediate is only checked to be well under the deadline where a slow machine
cannot make it flaky.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devmodel.control.client import ControlClient
from devmodel.testing import VfioUserClient
from tests.integration.launching import Launched, launch

FAULT_LENDER = Path(__file__).with_name("fault_lender.py")
MiB = 1 << 20
GRANULE = 2 * MiB
APERTURE = "16M"
WINDOWS = 8
STALLED = 1  # the window the lender evicts (and whose page-in is the fault)
TIMEOUT = 1.0  # --page-in-timeout
BOUND = 4.5  # an access bounded by the page-in deadline is answered within this (s)
ONES = b"\xff" * 8
POISON = b"POISON!!"
# BAR2 counters (devmodel/pci/registers.py).
PAGE_INS = 0x40
FAILED_ACCESSES = 0x48
LENDER_LOSSES = 0x80


def tag(window: int) -> bytes:
    return b"win%05d" % window


@dataclass
class FaultLender:
    proc: subprocess.Popen[bytes]
    socket_path: str
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def wait_line(self, prefix: str, timeout: float = 20.0) -> str:
        """The next stdout line starting with `prefix` (earlier other lines are kept)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the lender never said {prefix!r}; it said {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line

    def said(self, prefix: str, timeout: float = 20.0) -> list[str]:
        """The lines starting with `prefix` so far, once there is at least one (or after
        `timeout`): the lender prints after it acts, so its line can reach the reader thread
        after the guest already saw the effect."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.seen if line.startswith(prefix)]
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.01)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
        self.proc.wait()


def _read_lines(lender: FaultLender) -> None:
    assert lender.proc.stdout is not None
    for raw in lender.proc.stdout:
        line = raw.decode().strip()
        lender.seen.append(line)
        lender.lines.put(line)


@pytest.fixture
def lenders(tmp_path: Path) -> Iterator[Callable[..., FaultLender]]:
    """Start fault lenders on tmp_path/lender.sock; every one is killed at the end."""
    started: list[FaultLender] = []

    def start(*args: str) -> FaultLender:
        path = str(tmp_path / "lender.sock")
        n = len(started) + 1
        with (tmp_path / f"lender-{n}.stderr").open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(FAULT_LENDER), "--socket", path, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        lender = FaultLender(proc, path)
        started.append(lender)
        threading.Thread(target=_read_lines, args=(lender,), daemon=True).start()
        lender.wait_line("listening")
        return lender

    try:
        yield start
    finally:
        for lender in started:
            lender.kill()
            if lender.proc.stdout is not None:
                lender.proc.stdout.close()


@pytest.fixture
def devmodels(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    """Start `devmodel run` borrowing from tmp_path/lender.sock; killed at the end."""
    started: list[Launched] = []

    def start(*args: str, **kw: object) -> Launched:
        dm = launch(
            tmp_path,
            "--lender-socket", str(tmp_path / "lender.sock"),
            "--aperture-size", APERTURE,
            "--page-in-timeout", f"{TIMEOUT:g}",
            *args,
            **kw,  # type: ignore[arg-type]
        )  # fmt: skip
        started.append(dm)
        return dm

    try:
        yield start
    finally:
        for dm in started:
            dm.kill()


class Guest:
    """A guest's 8-byte accesses to BAR0 through a vfio-user client, timed."""

    def __init__(self, path: str) -> None:
        self.client = VfioUserClient(path)
        self.client.attach()

    def close(self) -> None:
        self.client.close()

    def read(self, window: int, at: int = 0) -> tuple[bytes, float]:
        t0 = time.monotonic()
        data = self.client.read(0, window * GRANULE + at, 8)
        return data, time.monotonic() - t0

    def write(self, window: int, data: bytes, at: int = 8) -> float:
        t0 = time.monotonic()
        self.client.write(0, window * GRANULE + at, data)
        return time.monotonic() - t0

    def counter(self, offset: int) -> int:
        return self.client.read_u64(2, offset)


@contextlib.contextmanager
def guest_of(dm: Launched) -> Iterator[Guest]:
    guest = Guest(dm.socket_path)
    try:
        yield guest
    finally:
        guest.close()


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run `fn` in a thread (a vCPU's access that will block); its result lands in the list."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def holds_lender_memory(dm: Launched) -> bool:
    """Whether devmodel has an fd of, or a mapping of, the fault lender's memfd."""
    pid = dm.proc.pid
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if "fault-lender" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                return True
    return "fault-lender" in Path(f"/proc/{pid}/maps").read_text()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lent(devmodels: Callable[..., Launched], lender: FaultLender, *args: str) -> Launched:
    """devmodel started against `lender`, once the lender has lent and evicted what it says."""
    dm = devmodels(*args)
    lender.wait_line("evicted")
    return dm


def alive(dm: Launched) -> None:
    assert dm.proc.poll() is None, dm.stderr()
    with dm.control() as ctl:
        status = ctl.execute("query-status")
    assert isinstance(status, dict) and status["running"] is True


# ---------------------------------------------------------------------------- the lender


def test_silent_lender_gets_one_page_in_however_often_the_guest_reads(
    devmodels: Callable[..., Launched], lenders: Callable[..., FaultLender]
) -> None:
    """Issue 14, bug 1, against a real lender process: the lender never answers PAGE_IN and
    the guest reads the evicted window again and again. Each read fails at its own deadline,
    and the lender sees exactly one PAGE_IN (docs/lease-protocol.md 9.4)."""
    lender = lenders("--on-page-in", "ignore")
    dm = lent(devmodels, lender)
    with guest_of(dm) as guest:
        for _ in range(4):
            data, took = guest.read(STALLED)
            assert data == ONES and took < BOUND
            assert guest.read(0)[0] == tag(0)  # the other windows are unaffected
        assert guest.counter(PAGE_INS) == 1
        assert guest.counter(FAILED_ACCESSES) == 4
    assert len(lender.said("page-in")) == 1, lender.seen
    alive(dm)


def test_lender_killed_mid_page_in(
    devmodels: Callable[..., Launched], lenders: Callable[..., FaultLender]
) -> None:
    """The lender dies (SIGKILL) the moment a PAGE_IN reaches it. The waiting read gets the
    failure policy at once (end of stream: the lender is lost, well before the deadline);
    every lent window then reads all-ones; devmodel holds nothing of the lender's memory."""
    lender = lenders("--on-page-in", "kill")
    dm = lent(devmodels, lender)
    with guest_of(dm) as guest:
        assert guest.read(0)[0] == tag(0)
        data, took = guest.read(STALLED)
        assert data == ONES and took < BOUND
        assert lender.proc.wait(10) == -signal.SIGKILL
        assert guest.read(0)[0] == ONES  # lost: the failure policy everywhere
        assert guest.counter(LENDER_LOSSES) == 1
    assert "lender connection ended: the lender closed the connection" in dm.stderr()
    wait_for("devmodel to drop the lender's memory", lambda: not holds_lender_memory(dm))
    alive(dm)


def test_lender_restarted_mid_page_in(
    devmodels: Callable[..., Launched], lenders: Callable[..., FaultLender]
) -> None:
    """The lender is killed while a PAGE_IN is outstanding and a new lender process starts on
    the same socket: devmodel reconnects by itself and the guest is served again, the evicted
    window paged in by the new lender, never a poisoned page."""
    lender = lenders("--on-page-in", "ignore")
    dm = lent(devmodels, lender)
    with guest_of(dm) as guest:
        t, out = in_thread(lambda: guest.read(STALLED))
        lender.wait_line("page-in")
        lender.kill()
        t.join(BOUND)
        assert not t.is_alive() and out[0][0] == ONES  # type: ignore[index]
        restarted = lenders("--on-page-in", "grant")
        restarted.wait_line("evicted")
        wait_for("the guest to be served again", lambda: guest.read(0)[0] == tag(0))
        data, took = guest.read(STALLED)
        assert data == tag(STALLED) and took < BOUND
        assert guest.counter(LENDER_LOSSES) == 1
    assert restarted.said("page-in")
    assert "lender connection ended" in dm.stderr()
    alive(dm)


def test_lender_stopped_mid_page_in(
    devmodels: Callable[..., Launched], lenders: Callable[..., FaultLender]
) -> None:
    """The lender stops (SIGSTOP) the moment a PAGE_IN reaches it: alive but silent. Reads of
    the window fail at their deadline, all waiting on the one PAGE_IN; resident windows are
    served meanwhile; the keepalive then ends the session (PING unanswered) and, once the
    lender is continued, devmodel reconnects and is lent again."""
    lender = lenders("--on-page-in", "stop")
    dm = lent(devmodels, lender)
    with guest_of(dm) as guest:
        for _ in range(2):
            data, took = guest.read(STALLED)
            assert data == ONES and took < BOUND
            assert guest.read(0)[0] == tag(0)
        wait_for("the keepalive to give up", lambda: "did not answer a PING" in dm.stderr())
        assert guest.read(0)[0] == ONES
        lender.signal(signal.SIGCONT)
        wait_for("a new session", lambda: bool(lender.said("session 2", timeout=0)))
        lender.wait_line("evicted")
        wait_for("the guest to be served again", lambda: guest.read(0)[0] == tag(0))
    assert len(lender.said("page-in")) == 1
    alive(dm)


def test_lender_stopped_mid_revoke(
    devmodels: Callable[..., Launched], lenders: Callable[..., FaultLender]
) -> None:
    """The lender stops right after sending REVOKE (before it could read REVOKED). devmodel
    completes the revoke on its side regardless (REVOKED waits in the socket); the revoked
    window's reads fail at their deadline (its PAGE_IN is unanswered), the others are served;
    once continued, the lender poisons the revoked pages and no read ever returns poison."""
    lender = lenders("--on-page-in", "grant", "--stop-after-revoke")
    dm = devmodels()
    lender.wait_line("stopping mid revoke")
    with guest_of(dm) as guest:
        data, took = guest.read(STALLED)
        assert data == ONES and took < BOUND
        assert guest.read(0)[0] == tag(0)
        lender.signal(signal.SIGCONT)
        # It reads REVOKED (and poisons), then the PAGE_IN, which it answers now, late; or
        # the keepalive ended the session first and a new one lends everything again.
        wait_for("a page-in answered", lambda: guest.read(STALLED)[0] != ONES)
        for w in range(WINDOWS):
            assert guest.read(w)[0] == tag(w)
        assert guest.counter(FAILED_ACCESSES) >= 1
    assert lender.said("evicted")  # the lender did see REVOKED, and poisoned
    alive(dm)


# ---------------------------------------------------------------------------- the lender's memory


def test_lender_memfd_without_seals_is_refused(
    devmodels: Callable[..., Launched], lenders: Callable[..., FaultLender]
) -> None:
    """A window granted from a memfd without F_SEAL_SHRINK (which the lender could shrink
    under the guest) is NACKed: that window stays vacant (all-ones, no page-in), the rest is
    served."""
    lender = lenders("--unsealed-window", "2", "--evict", "")
    dm = devmodels()
    assert "FD_NOT_SEALED" in lender.wait_line("nack")
    lender.wait_line("acked")
    with guest_of(dm) as guest:
        data, took = guest.read(2)
        assert data == ONES and took < TIMEOUT  # nothing to wait for
        assert guest.read(3)[0] == tag(3)
        assert guest.counter(PAGE_INS) == 0
    assert "FD_NOT_SEALED" in dm.stderr()
    alive(dm)


def test_lender_cannot_truncate_and_a_late_write_seal_drops_writes(
    devmodels: Callable[..., Launched], lenders: Callable[..., FaultLender]
) -> None:
    """The lender tries to shrink its memfd after granting it (the seal devmodel demanded
    makes the kernel refuse: EPERM), then write-seals it: guest writes are dropped with the
    failure policy (devmodel writes with pwrite, which now fails), reads still work."""
    lender = lenders("--try-truncate", "--seal-write-after-grant", "--evict", "")
    dm = devmodels()
    lender.wait_line("write-sealed")
    assert lender.wait_line("truncate") == "truncate EPERM"
    with guest_of(dm) as guest:
        took = guest.write(0, b"dropped!")
        assert took < BOUND
        assert guest.read(0, at=8)[0] != b"dropped!"
        assert guest.read(0)[0] == tag(0)
        assert guest.counter(FAILED_ACCESSES) >= 1
    assert "lender memory failed" in dm.stderr()
    alive(dm)


# ---------------------------------------------------------------------------- the client


CLIENT_READ = """
import sys
from devmodel.control.client import ControlClient
from devmodel.testing import VfioUserClient
c = VfioUserClient(sys.argv[1])
c.attach()
print("attached", flush=True)
c.read(0, int(sys.argv[2]), 8)
print("answered", flush=True)
"""


def test_vfio_user_client_killed_mid_access(
    devmodels: Callable[..., Launched], lenders: Callable[..., FaultLender]
) -> None:
    """QEMU dies while its read waits for a page-in. devmodel notices the client is gone,
    stays up, and serves the next client; the next client's read of that window waits on the
    same outstanding PAGE_IN (no second one) and fails at its deadline."""
    lender = lenders("--on-page-in", "ignore")
    dm = lent(devmodels, lender)
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT_READ, dm.socket_path, str(STALLED * GRANULE)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline() == b"attached\n"
        lender.wait_line("page-in")
        client.kill()
        client.wait()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        if client.stdout is not None:
            client.stdout.close()
    wait_for("devmodel to see the client gone", lambda: "client gone" in dm.stderr())
    with guest_of(dm) as guest:
        assert guest.read(0)[0] == tag(0)
        data, took = guest.read(STALLED)
        assert data == ONES and took < BOUND
    assert len(lender.said("page-in")) == 1
    assert "Traceback" not in dm.stderr()
    alive(dm)


def test_control_client_that_never_reads_mid_page_in(
    devmodels: Callable[..., Launched], lenders: Callable[..., FaultLender]
) -> None:
    """A control client negotiates, floods commands and never reads a reply, while the guest
    waits on a stalled page-in: the guest's accesses keep their deadlines, devmodel drops the
    client that does not read (its queue full, or not read for too long) and stays up.
    (tests/integration/test_control_socket.py checks the same without a lender.)"""
    lender = lenders("--on-page-in", "ignore")
    dm = lent(devmodels, lender)
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(dm.control_path)
    hog.settimeout(0.2)
    try:
        hog.sendall(b'{"execute":"qmp_capabilities"}\n')
        with guest_of(dm) as guest:
            deadline = time.monotonic() + 30
            while "its send queue is full" not in dm.stderr() and "has not read" not in dm.stderr():
                assert time.monotonic() < deadline, "the client that never reads was kept"
                with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError):
                    hog.sendall(b'{"execute":"query-metrics"}\n' * 50)
                assert guest.read(0)[0] == tag(0)
            data, took = guest.read(STALLED)
            assert data == ONES and took < BOUND
    finally:
        hog.close()
    alive(dm)


# ---------------------------------------------------------------------------- devmodel


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_devmodel_stopped_by_signal_mid_page_in(
    devmodels: Callable[..., Launched], lenders: Callable[..., FaultLender], sig: int
) -> None:
    """SIGTERM or SIGHUP (libxl's) while a read waits for a page-in: a clean stop. The read
    is answered (failure policy) or its connection closed, within the deadline; devmodel
    exits 0, says why, drops the leases and tells the lender BYE (the lender sees the end)."""
    lender = lenders("--on-page-in", "ignore")
    dm = lent(devmodels, lender)
    with guest_of(dm) as guest:
        t, out = in_thread(lambda: guest.read(STALLED))
        lender.wait_line("page-in")
        t0 = time.monotonic()
        dm.proc.send_signal(sig)
        t.join(BOUND)
        assert not t.is_alive()
        assert dm.proc.wait(BOUND) == 0, dm.stderr()
        assert time.monotonic() - t0 < BOUND
    result = out[0]
    assert isinstance(result, Exception) or result[0] == ONES  # type: ignore[index]
    log = dm.stderr()
    assert f"{signal.Signals(sig).name}: stopping" in log
    assert "stopped; counters: {" in log.strip().splitlines()[-1]
    lender.wait_line("bye stopping", timeout=BOUND)


# ---------------------------------------------------------------------------- resources


def test_fd_exhaustion_keeps_devmodel_up(
    devmodels: Callable[..., Launched], lenders: Callable[..., FaultLender]
) -> None:
    """RLIMIT_NOFILE lowered (prlimit) to 3: devmodel cannot open a single new fd. A lender
    GRANT's fd cannot be received (MSG_CTRUNC: the lender session ends, the waiting read gets
    the failure policy within its deadline, reconnecting is retried with backoff); a new
    vfio-user client and a new control client cannot be accepted (they wait in the backlog;
    logged, rate limited, no busy loop). devmodel stays up, and once the limit is back it
    accepts them and is lent again."""
    lender = lenders("--on-page-in", "grant", "--evict", "1,2")
    dm = lent(devmodels, lender)
    pid = dm.proc.pid
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        with guest_of(dm) as guest:
            assert guest.read(1)[0] == tag(1)  # a page-in with an fd, before the limit
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, old[1]))
            data, took = guest.read(2)  # its GRANT's fd cannot be received
            assert data == ONES and took < BOUND
        wait_for("the client to be gone", lambda: "client gone" in dm.stderr())
        waiting = VfioUserClient(dm.socket_path)  # in the backlog: not accepted yet
        waiting.sock.settimeout(30)
        ctl_thread, ctl_out = in_thread(lambda: ControlClient(dm.control_path, timeout=30))
        wait_for("the refusals", lambda: "cannot accept a control client yet" in dm.stderr())
        wait_for("the refusals", lambda: "cannot accept a client yet" in dm.stderr())
        cpu0 = _cpu_seconds(pid)
        time.sleep(1.0)
        assert _cpu_seconds(pid) - cpu0 < 0.5, "devmodel spins on a failing accept"
        assert dm.proc.poll() is None, dm.stderr()
    finally:
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    try:
        waiting.attach()
        wait_for("the lender to lend again", lambda: waiting.read(0, 0, 8) == tag(0))
        ctl_thread.join(30)
        [ctl] = ctl_out
        assert isinstance(ctl, ControlClient), ctl
        with ctl:
            assert isinstance(ctl.execute("query-status"), dict)
    finally:
        waiting.close()
    log = dm.stderr()
    assert "file descriptors were lost (MSG_CTRUNC)" in log
    assert "cannot accept a client yet: Too many open files" in log
    assert "cannot accept a control client yet: Too many open files" in log
    assert "Traceback" not in log
    alive(dm)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
