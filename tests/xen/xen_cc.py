"""Compiling and running the C checks of tests/xen against the installed Xen headers.

Missing tools are a failure, never a skip: these tests are the only thing standing between the
bindings and a silent ABI mismatch, and scripts/setup-env installs what they need.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

C_DIR = Path(__file__).parent / "c"
INCLUDE = Path("/usr/include")
SETUP = "scripts/setup-env installs gcc, libc6-dev and libxen-dev"
# GNU C: Xen's headers use anonymous unions, which strict ISO C refuses.
CFLAGS = ("-std=gnu11", "-O0", "-Wall", "-Wextra", "-Werror")


def require_toolchain(*headers: str) -> str:
    """The path of gcc, after checking that it and `headers` are installed."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail(f"gcc is not installed: {SETUP}", pytrace=False)
    missing = [h for h in headers if not (INCLUDE / h).is_file()]
    if missing:
        pytest.fail(f"Xen headers missing ({', '.join(missing)}): {SETUP}", pytrace=False)
    return gcc


def compile_c(
    source: Path,
    out_dir: Path,
    *,
    headers: tuple[str, ...] = (),
    flags: tuple[str, ...] = (),
    link: tuple[str, ...] = (),
) -> Path:
    """Build `source` into `out_dir` (pytest's tmp_path: nothing lands in the tree)."""
    gcc = require_toolchain(*headers)
    exe = out_dir / source.stem
    cmd = [gcc, *CFLAGS, *flags, "-o", str(exe), str(source), *link]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}",
            pytrace=False,
        )
    return exe


def run(exe: Path, *args: str, stdin: str = "") -> str:
    done = subprocess.run(
        [str(exe), *args], input=stdin, capture_output=True, text=True, check=False, timeout=60
    )
    if done.returncode != 0:
        pytest.fail(f"{exe.name} {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout
