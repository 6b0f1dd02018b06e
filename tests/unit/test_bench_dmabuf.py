"""Smoke tests of bench/bench_dmabuf.py where there is no udmabuf: it says why it skips (exit
0), and `--stand-in` prints every row. No timing is asserted. On a kernel with udmabuf the
real rows are tests/udmabuf/test_dmabuf_bench.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devmodel.leases.dmabuf import udmabuf_missing

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_dmabuf.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_without_udmabuf_it_says_what_is_missing_and_exits_0() -> None:
    missing = udmabuf_missing()
    if missing is None:
        pytest.skip("this kernel has udmabuf: the benchmark runs for real here")
    done = run()
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stdout and "/dev/udmabuf" in done.stdout


def test_stand_in_prints_every_row() -> None:
    done = run("--stand-in")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for text in (
        "a) trapped 8-byte read, resident window",
        "b) fault: evicted window",
        "memfd lease (peer)",
        "memfd-as-dma-buf (stand-in) lease",
        "ratio memfd-as-dma-buf (stand-in)/memfd",
    ):
        assert text in out, out
    assert out.count("(n=45)") == 4
