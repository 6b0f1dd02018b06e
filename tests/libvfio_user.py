"""Finding libvfio-user for tests: the shared library and header scripts/build-libvfio-user
installs into the cache (scripts/check runs it), or a skip whose reason names what is missing;
under CI (which builds it, and stops if it cannot) a missing piece fails instead."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import NoReturn

import pytest

from devmodel.transports import libvfio_user_lib as lvu

BUILD = "scripts/build-libvfio-user builds it (scripts/check runs it)"


def missing(reason: str) -> NoReturn:
    """Skip for `reason` on a developer's machine; fail under CI, where the build is part of
    the check and a skip would hide a test that never ran."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: libvfio-user's build must be complete)")
    pytest.skip(reason)


def library_path() -> Path:
    """The .so the transport loads (DEVMODEL_LIBVFIO_USER or the cached build)."""
    try:
        return lvu.load().path
    except lvu.LibVfioUserMissing as exc:
        missing(f"libvfio-user missing: {exc}")


def include_dir() -> Path:
    """The header directory installed next to the library (cache/libvfio-user/include)."""
    include = library_path().parent.parent / "include"
    if not (include / "libvfio-user.h").is_file():
        missing(f"libvfio-user's header missing: no {include}/libvfio-user.h; {BUILD}")
    return include


def available() -> str:
    """'' when the transport can run here, else why not (for skip reasons)."""
    try:
        lvu.load()
    except lvu.LibVfioUserMissing as exc:
        return str(exc)
    return ""


def _transport_params() -> list[object]:
    why = available()
    # Under CI the param is not skipped (as `missing` fails there): the tests run and fail,
    # naming the library that is not there, instead of passing without the transport.
    skip = bool(why) and not os.environ.get("CI")
    return [
        "vfio-user",
        pytest.param(
            "libvfio-user",
            marks=pytest.mark.skipif(skip, reason=f"libvfio-user transport: {why}"),
        ),
    ]


TRANSPORT_PARAMS = _transport_params()
"""Both vfio-user transports, for a fixture's params; the libvfio-user one skips with the
missing piece named when the library is not built here (and, under CI, runs and fails)."""


def raw_exchange(
    sock: socket.socket, msg_id: int, command: int, payload: bytes
) -> tuple[int, int, int, bytes]:
    """Send one request as bytes and read its reply as bytes: (msg_id, flags, errno, payload).

    For the replies the libvfio-user transport gives that pyvfio_user's client rightly refuses
    (an error reply with a payload): the expected differences are asserted on the wire."""
    sock.sendall(struct.pack("<HHIII", msg_id, command, 16 + len(payload), 0, 0) + payload)
    return read_raw_reply(sock)


def read_raw_reply(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """One message read as bytes: (msg_id, flags, errno, payload)."""
    rid, _cmd, size, flags, err = struct.unpack("<HHIII", recv_exactly(sock, 16))
    return rid, flags, err, recv_exactly(sock, size - 16)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data
