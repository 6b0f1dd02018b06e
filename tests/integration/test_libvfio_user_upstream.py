"""libvfio-user's own Python test suite (test/py in its source) against the library devmodel
loads: a smoke check that the build scripts/build-libvfio-user made is sound (its callbacks,
its socket transport, its PCI and DMA handling), before devmodel's own tests blame devmodel for
what the library does. About a second: the suite drives the library in process, through ctypes,
with no server or guest.

It needs the source the library was built from next to it (the cache's src/, which the build
script keeps); a library loaded from elsewhere (DEVMODEL_LIBVFIO_USER) skips, saying so. The
suite's own meson wiring runs it the same way: pytest per file with LIBVFIO_SO_DIR set.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.libvfio_user import BUILD, library_path, missing

# What the suite of Debian trixie's copy (QEMU 10.0.x, subprojects/libvfio-user) holds: 21
# files, 196 tests. Fewer means the suite did not run as a whole (a collection that silently
# shrank must not pass).
LEAST_TESTS = 150


def upstream_suite() -> Path:
    library = library_path()
    suite = library.parent.parent / "src" / "test" / "py"
    if not (suite / "libvfio_user.py").is_file():
        missing(f"libvfio-user's own test suite missing: no {suite}/libvfio_user.py next to "
                f"{library}; {BUILD}")
    if not (library.parent / "libvfio-user.so").is_file():
        missing(f"the suite loads LIBVFIO_SO_DIR/libvfio-user.so: {library.parent} has none")
    return suite


def test_libvfio_user_own_python_suite_passes(tmp_path: Path) -> None:
    suite = upstream_suite()
    library = library_path()
    # An empty configuration of its own: the project's pytest settings (plugins, strictness)
    # are not the suite's; the cache directory and the suite's sockets stay out of the tree.
    ini = tmp_path / "pytest.ini"
    ini.write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["LIBVFIO_SO_DIR"] = str(library.parent)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ini),
         "--rootdir", str(tmp_path), str(suite)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"libvfio-user's own suite failed against {library}:\n{out}"
    summary = re.search(r"(\d+) passed", out)
    assert summary is not None, out
    assert int(summary.group(1)) >= LEAST_TESTS, out
    assert not re.search(r"\d+ (failed|error)", out), out
