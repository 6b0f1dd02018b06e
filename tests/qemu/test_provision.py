"""Provisioning a complete test bed again is a no-op: nothing downloaded, built or rewritten."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu


def _cache() -> Path:
    """The test bed's cache, as qemu-configs/provision finds it."""
    base = os.environ.get("DEVMODEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "devmodel")
    return Path(base) / "testbed"


def _entries(cache: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, inode) of every entry in the cache and one level below it: what a rebuild or
    a fresh download would replace. Not `lock`, which every run opens for writing to flock it."""
    seen: dict[str, tuple[int, int]] = {}
    for path in [cache, *cache.iterdir(), *(p for d in cache.iterdir() if d.is_dir()
                                          and not d.is_symlink() for p in d.iterdir())]:
        if path.name == "lock":
            continue
        st = path.lstat()
        seen[str(path.relative_to(cache))] = (st.st_mtime_ns, st.st_ino)
    return seen


def test_provision_again_downloads_nothing(testbed: Path) -> None:
    """Proven by what it leaves, not by how long it took (machines here are noisy): it prints
    nothing and touches no file of the complete cache."""
    cache = _cache()
    before = _entries(cache)
    out = subprocess.run([str(testbed / "provision")], capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == "", "a complete cache builds and prints nothing"
    assert _entries(cache) == before
