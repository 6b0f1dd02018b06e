"""`devmodel run --poll-max-us`: polling off and on serve the same answers (real processes).

With polling off, the loop parks every time and the counters in BAR2 stay at 0. With it on,
whether the spin ever engages depends on the client's turnaround: the budget starts at 0 and
grows only when a message comes within --poll-max-us of the loop finding the socket empty, and
this Python client's turnaround is near 50 us, so on a slow or loaded machine it may never
engage (seen once in CI). What this test asserts with polling on is that the answers are the
same and the counters are consistent (a spin always costs time); that the budget grows, spins
and shrinks as designed is tests/unit/test_polling.py's, on a fake clock.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from devmodel.testing import VfioUserClient
from tests.integration.launching import start_devmodel

POLL_HITS, POLL_MISSES, POLL_NS = 0x88, 0x90, 0x98


@pytest.mark.parametrize("poll", [0, 50])
def test_polling_off_and_on_serve_alike(tmp_path: Path, poll: int) -> None:
    dm = start_devmodel(tmp_path, "--poll-max-us", str(poll), "--aperture-size", "16M")
    try:
        with VfioUserClient(dm.socket_path) as client:
            client.attach()
            for i in range(2000):
                offset = (i * 4104) % (16 << 20) & ~7
                client.write(0, offset, struct.pack("<Q", i))
                assert client.read(0, offset, 8) == struct.pack("<Q", i)
                client.posted_write(0, offset, struct.pack("<Q", ~i & (2**64 - 1)))
                assert client.read(0, offset, 8) == struct.pack("<Q", ~i & (2**64 - 1))
            hits, misses, spent = (client.read_u64(2, r) for r in (POLL_HITS, POLL_MISSES, POLL_NS))
        if poll:
            assert spent > 0 if hits + misses else spent == 0
        else:
            assert hits == misses == spent == 0
        assert dm.stop() == 0
    finally:
        if dm.proc.poll() is None:
            dm.proc.kill()
            dm.proc.wait()
