"""The three processes of tests/integration/test_lender_processes.py: the reference lender,
`devmodel run --lender-socket` and a vfio-user client playing the guest (no tests here).

Shared with tests/udmabuf/test_dmabuf_lender.py, which runs the same set-up with the lender
lending udmabufs (`--fd-kind dmabuf`).
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
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], domid: int, *lender_args: str
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
