"""bench/bench_dmabuf.py on a kernel with udmabuf (marker `udmabuf`): the dma-buf rows next to
the memfd rows, and the sync floor. Runs the benchmark as a smoke test; asserts no timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devmodel.leases.dmabuf import udmabuf_missing

MISSING = udmabuf_missing()
pytestmark = [
    pytest.mark.udmabuf,
    pytest.mark.skipif(MISSING is not None, reason=f"needs udmabuf: {MISSING}"),
]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_dmabuf.py"


def test_bench_prints_udmabuf_rows_next_to_memfd_rows() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    print(out)  # the numbers, for whoever runs `pytest -m udmabuf -s`
    for text in (
        "udmabuf",
        "a) trapped 8-byte read, resident window",
        "b) fault: evicted window",
        "memfd lease (peer)",
        "udmabuf lease",
        "ratio udmabuf/memfd",
        "DMA_BUF_IOCTL_SYNC start+end (read)",
    ):
        assert text in out, out
