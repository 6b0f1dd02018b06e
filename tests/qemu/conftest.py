"""Fixtures for the qemu tests: the provisioned test bed and a few shared guest boots.

A guest boot costs several seconds under TCG, so the tests share boots: one single-vCPU guest
runs every single-threaded guest test, one two-vCPU guest runs the smp test (each once per
vfio-user transport), and each test function checks its own part of the results. On a
failure the report carries the guest's serial console, QEMU's stderr and the device model's
stderr.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.libvfio_user import TRANSPORT_PARAMS

from .testbed import (
    BOOT_TIMEOUT,
    GUEST_APPEND,
    QEMU_CONFIGS,
    DevmodelServer,
    GuestRun,
    Reaper,
    RunningGuest,
    boot_guest,
    provision,
)

_boots: list[tuple[str, GuestRun]] = []
# Guest runs a test booted through the `boot` fixture, for its failure report.
_RUNS = pytest.StashKey[list[GuestRun]]()
# Guests a test started through the `launch` fixture.
_RUNNING = pytest.StashKey[list[RunningGuest]]()


@pytest.fixture(scope="session")
def testbed(pytestconfig: pytest.Config) -> Path:
    """Provision the QEMU test bed once per session, its progress shown live.

    A cold provisioning takes about 20 s and is worth watching; a warm one prints nothing.
    """
    provision(QEMU_CONFIGS / "provision", pytestconfig)
    return QEMU_CONFIGS


@pytest.fixture(scope="session")
def reaper() -> Iterator[Reaper]:
    """Kills, at the end of the session, any process a failed test left running."""
    r = Reaper()
    yield r
    r.reap()


def _boot(reaper: Reaper, workdir: Path, name: str, tests: list[str], smp: int,
          transport: str = "vfio-user") -> GuestRun:
    """Start a fresh device model, boot a guest against it, then stop the device model.

    The device model is stopped (SIGTERM) as soon as the guest has powered off, so its exit
    status is part of the result.
    """
    error = ""
    try:
        server = DevmodelServer(reaper, workdir, transport=transport)
    except RuntimeError as exc:
        error = str(exc)
    if error:
        pytest.fail(error, pytrace=False)
    run = boot_guest(reaper, workdir, tests, server=server, smp=smp, append=GUEST_APPEND,
                     timeout=BOOT_TIMEOUT)
    run.server_returncode = server.stop()
    _boots.append((name, run))
    if run.event("end") is None:
        logs = "\n".join(f"----- {title} -----\n{text}" for title, text in run.log_sections())
        pytest.fail(f"the {name} guest never printed its end line (run-qemu exit "
                    f"{run.returncode} after {run.seconds:.1f} s)\n{logs}", pytrace=False)
    return run


@pytest.fixture(scope="session", params=TRANSPORT_PARAMS)
def transport(request: pytest.FixtureRequest) -> str:
    """The vfio-user transport a guest's device model serves it with: "vfio-user" (native)
    or "libvfio-user". Every guest test runs over both: the shared boots once per transport,
    the tests that boot their own guest parametrized by taking this fixture. Session-scoped,
    so pytest runs every test of one transport before the other's."""
    return str(request.param)


@pytest.fixture(scope="session")
def guest(testbed: Path, reaper: Reaper, tmp_path_factory: pytest.TempPathFactory,
          transport: str) -> GuestRun:
    """One single-vCPU guest that ran every single-threaded test (one per transport)."""
    return _boot(reaper, tmp_path_factory.mktemp(f"guest-{transport}"),
                 f"single-vCPU ({transport})",
                 ["enumerate", "pattern", "boundary", "regs", "timing", "irq", "msi"], smp=1,
                 transport=transport)


@pytest.fixture(scope="session")
def smp_guest(testbed: Path, reaper: Reaper, tmp_path_factory: pytest.TempPathFactory,
              transport: str) -> GuestRun:
    """A two-vCPU guest running the concurrent test (one per transport)."""
    return _boot(reaper, tmp_path_factory.mktemp(f"smp-guest-{transport}"),
                 f"two-vCPU ({transport})", ["smp"], smp=2, transport=transport)


@pytest.fixture
def start_devmodel(reaper: Reaper, tmp_path: Path) -> Iterator[Callable[..., DevmodelServer]]:
    """A factory for device models with this test's options, stopped when the test ends.

    `start_devmodel("--granule", "4K", aperture_size="1G")`: extra arguments go to
    `devmodel run`; it returns once the socket exists.
    """
    servers: list[DevmodelServer] = []

    def start(*args: str, **kwargs: Any) -> DevmodelServer:
        workdir = tmp_path / f"devmodel{len(servers)}"
        workdir.mkdir()
        servers.append(DevmodelServer(reaper, workdir, *args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def boot(testbed: Path, reaper: Reaper, tmp_path: Path, request: pytest.FixtureRequest
         ) -> Callable[..., GuestRun]:
    """Boot a guest for this test alone: `boot(["enumerate"], server=s, smp=2, append=...)`.

    Takes boot_guest's keyword arguments; every run's logs go into the report if the test
    fails. Prefer the shared `guest` and `smp_guest` boots when their tests suffice: each boot
    costs several seconds.
    """
    runs = request.node.stash.setdefault(_RUNS, [])

    def run(tests: list[str], **kwargs: Any) -> GuestRun:
        workdir = tmp_path / f"guest{len(runs)}"
        workdir.mkdir()
        result = boot_guest(reaper, workdir, tests, timeout=BOOT_TIMEOUT, **kwargs)
        runs.append(result)
        _boots.append((request.node.name, result))
        return result

    return run


@pytest.fixture
def launch(testbed: Path, reaper: Reaper, tmp_path: Path, request: pytest.FixtureRequest
           ) -> Callable[..., RunningGuest]:
    """Start a guest in the background for this test: `launch(["watch"], server=s, ...)`.

    For tests that act while the guest runs (kill or restart the device model between two of
    its result lines). Call `finish()` on what it returns; the logs of a guest still running
    when the test fails go into the report all the same.
    """
    guests = request.node.stash.setdefault(_RUNNING, [])

    def start(tests: list[str], **kwargs: Any) -> RunningGuest:
        workdir = tmp_path / f"launched{len(guests)}"
        workdir.mkdir()
        kwargs.setdefault("timeout", BOOT_TIMEOUT)
        guest = RunningGuest(reaper, workdir, tests, **kwargs)
        guest.on_finish = lambda run: _boots.append((request.node.name, run))
        guests.append(guest)
        return guest

    return start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the logs of the guest a failed test looked at to its report."""
    report = yield
    if report.failed and isinstance(item, pytest.Function):
        runs: list[GuestRun] = [*item.stash.get(_RUNS, [])]
        runs += [g.snapshot(g.qemu.proc.poll()) for g in item.stash.get(_RUNNING, [])]
        sources: list[GuestRun | DevmodelServer] = [*runs]
        sources += [v for v in item.funcargs.values() if isinstance(v, GuestRun | DevmodelServer)]
        for source in sources:
            report.sections.extend(source.log_sections())
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How long each guest took from launch to power-off, and what its timing loops saw."""
    if not _boots:
        return
    terminalreporter.section("qemu guests")
    for name, run in _boots:
        end = run.event("end") or {}
        server = ("" if run.server_returncode is None
                  else f", device model exit {run.server_returncode}")
        retried = (f", after {run.early_deaths} boot(s) that died before /init"
                   if run.early_deaths else "")
        terminalreporter.write_line(
            f"{name}: {run.seconds:.1f} s from launch to exit, guest uptime at its end line "
            f"{end.get('uptime', '?')} s{server}{retried}"
        )
        for line in run.lines("timing") + [r for r in run.lines("smp") if "thread" in r]:
            who = f"thread {line['thread']}" if "thread" in line else "timing"
            terminalreporter.write_line(
                f"  {who}: read4 {line['read4_ns']} ns, read8 {line['read8_ns']} ns, "
                f"posted write4 {line['write4_ns']} ns, BAR2 read4 {line['reg_read4_ns']} ns "
                f"({line['iters']} iterations)"
            )
    deaths = sum(run.early_deaths for _, run in _boots)
    terminalreporter.write_line(
        f"boots whose kernel died before /init under TCG, booted again: {deaths}")

