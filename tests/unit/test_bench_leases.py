"""Smoke tests of bench/bench_leases.py: it runs, prints every section, and fails when it must.

No timing is asserted (the machines are noisy); what is checked is that each measurement ran
to the end and that the one hard requirement it reports, a single PAGE_IN for many concurrent
faults on one window, turns into the exit status.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_leases.py"

SECTIONS = [
    "a) fault service latency",
    "in-process (LeaseEngine.read",
    "end to end (vfio-user client process",
    "b) REVOKE -> REVOKED latency",
    "over the lease socket, devmodel idle",
    "over the lease socket, under load",
    "c) PAGE_INs sent for 64 concurrent faults",
    "in-process, 3 rounds: PAGE_INs per round [1]",
    "lender on a socket, 3 rounds: PAGE_INs per round [1], wrong reads 0",
    "d) 5,000 leases",
    "engine.grant",
    "bytes/lease",
    "engine.window_at",
    "resident 8-byte read",
    "0 refused, 0 errors",
]


def load_bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/ is no package: load the script as a module (registered, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("bench_leases", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_every_section() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    missing = [s for s in SECTIONS if s not in done.stdout]
    assert not missing, f"missing {missing} in:\n{done.stdout}"
    assert "FAILED" not in done.stdout
    # Every latency line carries its percentiles and every comparison its ratio.
    assert done.stdout.count("median") >= 20
    assert done.stdout.count("ratio") >= 9


def test_more_than_one_page_in_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_bench(monkeypatch)

    async def two_page_ins(rounds: int, waiters: int) -> list[int]:
        return [1, 2] + [1] * (rounds - 2)

    monkeypatch.setattr(bench, "engine_coalescing", two_page_ins)
    status = bench.main(["--quick", "--repeat", "20", "--leases", "1000"])
    out = capsys.readouterr().out
    assert status == 1
    assert "PAGE_INs per round [1, 2]" in out
    assert "FAILED: concurrent faults on one window must send exactly one PAGE_IN" in out
    assert "d) 1,000 leases" in out  # the run went on to the end all the same
