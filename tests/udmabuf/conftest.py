"""The udmabuf tests (marker `udmabuf`) need a kernel with udmabuf. Where this process has one
(inside the udmabuf VM, or on such a host) they run as they are. Elsewhere each selected one is
replaced by a stand-in that reports the outcome of the same test id in one run of the udmabuf VM
(tests/udmabuf/vm.py; qemu-configs/udmabuf/run), booted once per session when the first
stand-in runs. If the VM cannot run, they fail with one line saying why: CI must run them, so
they never skip for want of udmabuf.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Generator
from pathlib import Path

import pytest

from .vm import MARKER, RUN_KEY, WORKDIR_KEY, VmItem, runs_here, stand_in


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(session: pytest.Session,
                                  items: list[pytest.Item]) -> Generator[None, None, None]:
    """Around every other selection (-m, -k, --deselect, the xen_guest deselection):

    before it, a udmabuf test that will boot the VM becomes a `qemu` test too, so that
    `-m "not qemu"` (no guest boots) leaves it out and `-m qemu` takes it in; after it, the
    selected ones are swapped for their stand-ins.
    """
    if runs_here():
        return (yield)
    for item in items:
        if item.get_closest_marker(MARKER):
            item.add_marker("qemu")
    result = yield
    items[:] = [stand_in(item) if item.get_closest_marker(MARKER) else item for item in items]
    if any(isinstance(item, VmItem) for item in items):
        session.config.stash[WORKDIR_KEY] = Path(tempfile.mkdtemp(prefix="udmabuf-vm."))
    return result


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The run's directory goes unless something failed there (then its console and report
    stay, and the failures name it)."""
    workdir = session.config.stash.get(WORKDIR_KEY, None)
    run = session.config.stash.get(RUN_KEY, None)
    if workdir is None:
        return
    if run is None or (not run.error and all(o.kind != "failed" for o in run.outcomes.values())):
        shutil.rmtree(workdir, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """What the VM cost: the boot, Python's start over 9p and the tests, in all."""
    run = terminalreporter.config.stash.get(RUN_KEY, None)
    if run is not None:
        terminalreporter.section("udmabuf VM")
        terminalreporter.write_line(run.summary())
