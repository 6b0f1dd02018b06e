"""Provisioning a complete test bed again is a quick no-op."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu


def test_provision_again_downloads_nothing(testbed: Path) -> None:
    t0 = time.monotonic()
    out = subprocess.run([str(testbed / "provision")], capture_output=True, text=True,
                         check=False, timeout=60)
    seconds = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == "", "a complete cache builds and prints nothing"
    assert seconds < 2.0
