"""Three real processes: the reference lender, `devmodel run --lender-socket`, a vfio-user client.

Each test runs over both vfio-user transports (the `transport` fixture): the libvfio-user one
serves faults from a worker thread, and the poisoning lender checks that it never reads memory
that was revoked.

The client plays QEMU; the guest-visible counters are read from BAR2 as a guest would. What
is checked is what a guest relies on: contents survive eviction byte for byte (even when the
lender moves them and poisons the memory it freed), a dead lender costs the guest all-ones
reads and dropped writes but never the device, and a restarted lender serves again.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devmodel.testing import VfioUserClient
from tests.integration.launching import DevmodelProcess, start_devmodel

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MiB = 1 << 20
APERTURE = 64 * MiB
GRANULE = 2 * MiB  # devmodel's default
WINDOWS = APERTURE // GRANULE
VRAM = 16 * MiB
RESIDENT = VRAM // GRANULE
ONES = b"\xff" * 8

# BAR2 counters (devmodel/pci/registers.py).
PAGE_INS = 0x40
FAILED_ACCESSES = 0x48
GRANTS = 0x60
REVOKES = 0x70
FAULTS = 0x78
LENDER_LOSSES = 0x80


@dataclass
class LenderProcess:
    proc: subprocess.Popen[bytes]
    socket_path: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def start_lender(tmp_path: Path, *args: str, run: int = 1) -> LenderProcess:
    path = str(tmp_path / "lender.sock")
    stderr_path = tmp_path / f"lender-{run}.stderr"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "reference_lender.py"), "--socket", path, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("listening on"):
        proc.kill()
        raise RuntimeError(f"lender did not start: {line!r} {stderr_path.read_text()}")
    return LenderProcess(proc, path, stderr_path)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every process a test starts, killed at the end whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            _kill(proc)
            if proc.stdout is not None:
                proc.stdout.close()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Guest:
    """What a guest driver would do through the client: 8-byte accesses and counters."""

    def __init__(self, client: VfioUserClient) -> None:
        self.client = client

    def counter(self, offset: int) -> int:
        return self.client.read_u64(2, offset)

    def read(self, offset: int) -> bytes:
        return self.client.read(0, offset, 8)

    def write(self, offset: int, data: bytes) -> None:
        self.client.write(0, offset, data)

    def lent(self) -> bool:
        """The lender lent the whole aperture (resident part and evicted part)."""
        return self.counter(GRANTS) >= WINDOWS and self.counter(REVOKES) >= WINDOWS - RESIDENT


@contextlib.contextmanager
def lent_guest(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    domid: int,
    *lender_args: str,
    transport: str = "vfio-user",
) -> Iterator[tuple[LenderProcess, DevmodelProcess, Guest]]:
    """A lender with 16M of VRAM, a device model with a 64M aperture borrowing from it, and a
    guest attached once the whole aperture has been lent."""
    lender = start_lender(tmp_path, "--vram", "16M", *lender_args)
    processes.append(lender.proc)
    dm = start_devmodel(
        tmp_path,
        "--lender-socket",
        lender.socket_path,
        "--domid",
        str(domid),
        "--aperture-size",
        "64M",
        transport=transport,
    )
    processes.append(dm.proc)
    with VfioUserClient(dm.socket_path) as client:
        client.attach()
        guest = Guest(client)
        wait_for("the aperture to be lent", guest.lent)
        yield lender, dm, guest


def pattern(window: int, k: int) -> bytes:
    return struct.pack("<HHI", window, k, 0x600DF00D)


OFFSETS = [(w, k, w * GRANULE + k * 0x41000 + 8 * k) for w in range(WINDOWS) for k in range(4)]


def devmodel_maps_and_fds(dm: DevmodelProcess) -> str:
    pid = dm.proc.pid
    text = Path(f"/proc/{pid}/maps").read_text()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            text += "\n" + os.readlink(f"/proc/{pid}/fd/{fd}")
    return text


def test_contents_survive_eviction_of_everything(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], transport: str
) -> None:
    with lent_guest(
        tmp_path,
        processes,
        5,
        "--move-probability",
        "0.5",
        "--poison",
        "--seed",
        "7",
        transport=transport,
    ) as (lender, dm, guest):
        for w, k, offset in OFFSETS:
            guest.write(offset, pattern(w, k))
        for w, k, offset in OFFSETS:
            assert guest.read(offset) == pattern(w, k)
        revokes = guest.counter(REVOKES)
        page_ins = guest.counter(PAGE_INS)
        # The lender takes everything back (SIGUSR1: evict all).
        lender.proc.send_signal(signal.SIGUSR1)
        wait_for("the lender to revoke", lambda: guest.counter(REVOKES) >= revokes + RESIDENT)
        time.sleep(0.1)
        assert guest.counter(REVOKES) == revokes + RESIDENT  # all of VRAM was in use
        # After REVOKED nothing of the lender's memory is open or mapped in the device model.
        held = devmodel_maps_and_fds(dm)
        assert "vram-heap" not in held and "swap-guest" not in held
        for w, k, offset in OFFSETS:
            assert guest.read(offset) == pattern(w, k), hex(offset)
        assert guest.counter(PAGE_INS) >= page_ins + WINDOWS
        assert guest.counter(FAULTS) > 0
        assert guest.counter(FAILED_ACCESSES) == 0
        assert guest.counter(LENDER_LOSSES) == 0
    lender.proc.send_signal(signal.SIGTERM)
    out, _ = lender.proc.communicate(timeout=10)
    assert lender.proc.returncode == 0, lender.stderr()
    summary = out.decode()
    assert "summary:" in summary and "evictions:" in summary
    moves = int(summary.split("moves:")[1].split()[0])
    assert moves > 0
    assert dm.proc.poll() is None


def test_lender_killed_then_restarted(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], transport: str
) -> None:
    with lent_guest(tmp_path, processes, 6, transport=transport) as (lender, dm, guest):
        guest.write(0, b"resident")
        guest.write(40 * MiB, b"evicted!")
        assert guest.read(0) == b"resident" and guest.read(40 * MiB) == b"evicted!"
        grants = guest.counter(GRANTS)

        lender.proc.kill()
        lender.proc.wait()
        wait_for("the loss to be noticed", lambda: guest.counter(LENDER_LOSSES) == 1)
        failed = guest.counter(FAILED_ACCESSES)
        assert guest.read(0) == ONES and guest.read(40 * MiB) == ONES
        guest.write(8, b"dropped!")
        assert guest.read(8) == ONES
        assert guest.counter(FAILED_ACCESSES) == failed + 4
        # The device keeps answering, and holds nothing of the dead lender.
        assert guest.client.read_u32(2, 0) == 0x4C444D44
        assert "vram-heap" not in devmodel_maps_and_fds(dm)

        again = start_lender(tmp_path, "--vram", "16M", run=2)
        processes.append(again.proc)
        wait_for("the new lender to grant", lambda: guest.counter(GRANTS) >= grants + WINDOWS)
        wait_for("the aperture to be lent again", lambda: guest.read(40 * MiB) != ONES)
        # A new lender has new memory: what the old one held is gone, the rest serves again.
        assert guest.read(0) == bytes(8)
        guest.write(0, b"new life")
        guest.write(40 * MiB, b"paged in")
        assert guest.read(0) == b"new life" and guest.read(40 * MiB) == b"paged in"
        assert guest.counter(LENDER_LOSSES) == 1
    assert dm.proc.poll() is None
    dm.stop()
    assert dm.proc.returncode == 0


def test_random_revocations_under_a_running_guest(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], transport: str
) -> None:
    with lent_guest(
        tmp_path,
        processes,
        8,
        "--revoke-rate",
        "300",
        "--move-probability",
        "0.5",
        transport=transport,
    ) as (lender, _dm, guest):
        revokes = guest.counter(REVOKES)
        model: dict[int, bytes] = {}
        deadline = time.monotonic() + 1.0
        i = 0
        while time.monotonic() < deadline:
            w, k, offset = OFFSETS[(i * 13) % len(OFFSETS)]
            if i % 2:
                assert guest.read(offset) == model.get(offset, bytes(8))
            else:
                model[offset] = pattern(w, k)
                guest.write(offset, model[offset])
            i += 1
        assert guest.counter(REVOKES) > revokes + 50
        assert guest.counter(FAILED_ACCESSES) == 0
    lender.proc.send_signal(signal.SIGINT)
    out, _ = lender.proc.communicate(timeout=10)
    assert lender.proc.returncode == 0
    assert int(out.decode().split("random_evictions:")[1].split()[0]) > 50
