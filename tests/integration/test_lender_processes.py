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

import signal
import subprocess
import time
from pathlib import Path

from tests.integration.lender_processes import (
    FAILED_ACCESSES,
    FAULTS,
    GRANTS,
    LENDER_LOSSES,
    OFFSETS,
    ONES,
    PAGE_INS,
    RESIDENT,
    REVOKES,
    WINDOWS,
    MiB,
    devmodel_maps_and_fds,
    lent_guest,
    pattern,
    processes,
    start_lender,
    wait_for,
)

__all__ = ["processes"]  # a fixture, used by name

REVOKE_WAIT = 30.0
"""How long the random-revocation test keeps accessing, at most, for its revokes to come."""


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
        # At least a second of accesses, and on until more than 50 revokes came under them:
        # a loaded host slows the lender's revocations down, which is no failure (the bound
        # is a last resort, not a timing assertion).
        start = time.monotonic()
        i = 0
        while True:
            now = time.monotonic()
            if now - start >= 1.0 and (
                now - start >= REVOKE_WAIT or guest.counter(REVOKES) > revokes + 50
            ):
                break
            for _ in range(16):
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
