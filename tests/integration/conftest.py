"""Real processes: the device model started as a user would start it, over real sockets.

The fixtures only; how processes are started is in launching.py. `devmodel` (and `transport`)
run each test over both vfio-user transports: devmodel's own server and libvfio-user's."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.launching import DevmodelProcess, start_devmodel
from tests.libvfio_user import TRANSPORT_PARAMS


@pytest.fixture(params=TRANSPORT_PARAMS)
def transport(request: pytest.FixtureRequest) -> str:
    """The vfio-user transport under test: "vfio-user" (native) or "libvfio-user"."""
    return str(request.param)


@pytest.fixture
def devmodel(
    tmp_path: Path, request: pytest.FixtureRequest, transport: str
) -> Iterator[DevmodelProcess]:
    marker = request.node.get_closest_marker("devmodel_args")
    args: tuple[str, ...] = tuple(marker.args) if marker else ()
    dm = start_devmodel(tmp_path, *args, transport=transport)
    try:
        yield dm
    finally:
        if dm.proc.poll() is None:
            os.killpg(dm.proc.pid, signal.SIGKILL)
            dm.proc.wait()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            sys.stderr.write(f"--- devmodel stderr ---\n{dm.stderr()}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
