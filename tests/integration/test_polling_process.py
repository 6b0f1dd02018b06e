"""`devmodel run --poll-max-us`: polling off and on serve the same answers (real processes).

With polling on, a client that sends its next request right after each reply is caught by the
spin (POLL_HITS in BAR2 grows) and the time spent is counted (POLL_NS); with it off, the loop
parks every time and the counters stay at 0.
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
            assert hits + misses > 0 and spent > 0
        else:
            assert hits == misses == spent == 0
        assert dm.stop() == 0
    finally:
        if dm.proc.poll() is None:
            dm.proc.kill()
            dm.proc.wait()
