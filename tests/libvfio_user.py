"""Finding libvfio-user for tests: the shared library and header scripts/build-libvfio-user
installs into the cache (scripts/check runs it), or a skip whose reason names what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from devmodel.transports import libvfio_user_lib as lvu

BUILD = "scripts/build-libvfio-user builds it (scripts/check runs it)"


def library_path() -> Path:
    """The .so the transport loads (DEVMODEL_LIBVFIO_USER or the cached build)."""
    try:
        return lvu.load().path
    except lvu.LibVfioUserMissing as exc:
        pytest.skip(f"libvfio-user missing: {exc}")


def include_dir() -> Path:
    """The header directory installed next to the library (cache/libvfio-user/include)."""
    include = library_path().parent.parent / "include"
    if not (include / "libvfio-user.h").is_file():
        pytest.skip(f"libvfio-user's header missing: no {include}/libvfio-user.h; {BUILD}")
    return include


def available() -> str:
    """'' when the transport can run here, else why not (for skip reasons)."""
    try:
        lvu.load()
    except lvu.LibVfioUserMissing as exc:
        return str(exc)
    return ""
