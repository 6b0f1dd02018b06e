"""examples/launch/devmodel-launch: the toolstack-style launch script, run for real."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "launch" / "devmodel-launch"


def run(tmp_path: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **extra_env,
        "DEVMODEL": f"{shlex.quote(sys.executable)} -m devmodel",
        "DEVMODEL_RUNDIR": str(tmp_path / "run"),
        "DEVMODEL_READY_TIMEOUT": "30",
    }
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_start_status_stop(tmp_path: Path) -> None:
    try:
        start_status_stop(tmp_path)
    finally:
        pidfile = tmp_path / "run" / "7" / "devmodel.pid"
        if pidfile.exists():  # the test failed half-way: do not leave the process behind
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def start_status_stop(tmp_path: Path) -> None:
    started = run(tmp_path, "start", "7", "--aperture-size", "32M")
    assert started.returncode == 0, started.stderr
    assert "devmodel for domain 7: pid" in started.stdout
    guest = tmp_path / "run" / "7"
    assert (guest / "vfio-user.sock").exists() and (guest / "devmodel.pid").exists()
    assert oct((guest / "control").stat().st_mode & 0o777) == "0o700"
    status = run(tmp_path, "status", "7")
    assert status.returncode == 0, status.stderr
    assert "running" in status.stdout and "domid            7" in status.stdout
    stopped = run(tmp_path, "stop", "7")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    assert not (guest / "vfio-user.sock").exists() and not (guest / "devmodel.pid").exists()
    log = (guest / "devmodel.log").read_text()
    assert "SIGHUP: stopping" in log and " dom7 " in log


def test_start_failure_is_reported(tmp_path: Path) -> None:
    failed = run(tmp_path, "start", "8", "--aperture-size", "3M")
    assert failed.returncode == 1
    assert "did not become ready" in failed.stderr and "aperture size" in failed.stderr


def test_xen_transport_without_xen_is_reported(tmp_path: Path) -> None:
    """DEVMODEL_TRANSPORT=xen starts the ioreq server; on a host without Xen that fails at
    once, and the script shows devmodel's one-line reason instead of waiting out its deadline."""
    failed = run(tmp_path, "start", "9", DEVMODEL_TRANSPORT="xen")
    assert failed.returncode == 1
    assert "did not become ready" in failed.stderr
    assert "cannot open Xen's interfaces for domain 9" in failed.stderr
    assert not (tmp_path / "run" / "9" / "vfio-user.sock").exists()


def test_unknown_transport_is_a_usage_error(tmp_path: Path) -> None:
    failed = run(tmp_path, "start", "9", DEVMODEL_TRANSPORT="virtio")
    assert failed.returncode == 2
    assert "DEVMODEL_TRANSPORT must be vfio-user or xen" in failed.stderr
