"""Fixtures for the xen_guest tests: the provisioned Xen test bed and one shared boot of it.

A boot of Xen under TCG, with guests started from dom0, takes minutes, so the tests share one:
`dom0_suite` boots the test bed once and runs a dom0 script, which leaves each step's output
and exit status in the run's directory; each test checks its own step. On a failure the report
carries the end of the machine's console.

Two profiles (DEVMODEL_XEN, as for scripts/check):
- ci (the default): tests/xen_guest/dom0-ci, one HVM and one PVH guest each running a chain of
  bartest's tests (test_xen_ci.py, marked xen_ci); what CI runs.
- full (DEVMODEL_XEN=full): tests/xen_guest/dom0-suite, about ten guests one after the other,
  one thing checked per guest, and the benchmark (test_xen_guest.py, test_xen_bench.py, marked
  xen_full).
Tests of the other profile are deselected; test_xen_dom0.py's (no profile marker) run in both.

These tests run only when selected by marker (`pytest -m xen_guest`): a plain run, such as
scripts/check's first one, deselects them (see pytest_collection_modifyitems).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..qemu.testbed import Process, Reaper, provision
from .bed import Dom0Run

REPO = Path(__file__).resolve().parents[2]
XEN_CONFIGS = REPO / "qemu-configs" / "xen"
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Profile:
    """What one boot of the Xen suite runs in dom0, and how long the whole boot may take: Xen,
    dom0, the toolstack, every step, power-off. Each guest step has its own bound (dom0/guest
    --timeout), so this only catches a boot that hangs as a whole."""

    name: str
    script: Path
    boot_timeout: float


PROFILES = {
    # Two guests: 3 minutes on the 2-core host at load average 2, 6-9 at 3-7 (docs/xen.md).
    "ci": Profile("ci", HERE / "dom0-ci", 2700.0),
    # Ten guests one after the other: 25-41 minutes on the 2-core development host at load
    # average 6-10 (other test beds beside it).
    "full": Profile("full", HERE / "dom0-suite", 3600.0),
}


def profile() -> Profile:
    """DEVMODEL_XEN=full: the full profile; anything else (unset, 1, ci): the CI profile."""
    return PROFILES["full" if os.environ.get("DEVMODEL_XEN", "").strip() == "full" else "ci"]


READY_LINE = "XENBED-READY"
# dom0-suite's line at the end of each step.
STEP_LINE = re.compile(r"^XENBED-STEP (\S+): exit (\d+) after ([\d.]+) s$", re.MULTILINE)
MARKER = "xen_guest"
# dom0/guest's line when a try of a guest died before /init and is retried.
RETRY_LINE = re.compile(
    r"^guest (\S+): domain (\d+) (?:triple-faulted|crashed|panicked) "
    r"(?:before /init|running bartest) \(TCG\), retry",
    re.MULTILINE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the xen_guest tests unless the marker expression names them (-m xen_guest),
    and then those of the other profile (xen_ci and xen_full mark each profile's; the rest run
    in both)."""
    if MARKER in (config.option.markexpr or ""):
        other = "xen_ci" if profile().name == "full" else "xen_full"
        deselected = [item for item in items if item.get_closest_marker(other)]
    else:
        deselected = [item for item in items if item.get_closest_marker(MARKER)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        gone = {id(item) for item in deselected}
        items[:] = [item for item in items if id(item) not in gone]


@pytest.fixture(scope="session")
def xenbed(pytestconfig: pytest.Config) -> Path:
    """Provision the Xen test bed (and the QEMU one under it), its progress shown live.

    If that fails (no network, no root for the first build), the run stops with one line
    saying so and exit status 1, rather than every test erroring with the same long output
    (which is above, shown live): scripts/check runs this suite in CI, where a Xen bed that
    cannot be built must read as a failure, never as a skip.
    """
    try:
        provision(XEN_CONFIGS / "provision", pytestconfig)
    except pytest.fail.Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        why = next((line.removeprefix("error: ") for line in reversed(lines)
                    if line.startswith("error: ")), lines[-1] if lines else "?")
        pytest.exit(f"the Xen test bed could not be provisioned: {why} "
                    "(DEVMODEL_XEN=0 scripts/check skips the Xen suite; CI needs it)",
                    returncode=1)
    return XEN_CONFIGS


@pytest.fixture(scope="session")
def reaper() -> Iterator[Reaper]:
    r = Reaper()
    yield r
    r.reap()


_runs: list[Dom0Run] = []


@pytest.fixture(scope="session")
def dom0_suite(xenbed: Path, reaper: Reaper, tmp_path_factory: pytest.TempPathFactory
               ) -> Dom0Run:
    """Boot the test bed once and run the profile's script in dom0; QEMU is gone when this
    returns. DEVMODEL_XEN_WORKDIR=DIR keeps the run's files there (CI can archive them)."""
    chosen = profile()
    if saved := os.environ.get("DEVMODEL_XEN_SAVED_RUN"):
        result = saved_run(Path(saved), chosen)
        _runs.append(result)
        return result
    boot_timeout = chosen.boot_timeout
    if keep := os.environ.get("DEVMODEL_XEN_WORKDIR"):
        workdir = Path(keep)
        workdir.mkdir(parents=True, exist_ok=True)
        if any(workdir.iterdir()):
            # An earlier boot's files would pass for this one's.
            pytest.fail(f"DEVMODEL_XEN_WORKDIR={keep} is not empty: give a new directory")
    else:
        workdir = tmp_path_factory.mktemp("xenbed")
    argv = [str(xenbed / "run"), "--workdir", str(workdir), "--script", str(chosen.script),
            "--timeout", f"{boot_timeout:g}"]
    # DEVMODEL_XEN_TCG_THREAD=single: every emulated CPU in one QEMU thread (run --tcg-thread),
    # to see whether dom0's crashing programs come from a multi-threaded TCG race.
    if tcg_thread := os.environ.get("DEVMODEL_XEN_TCG_THREAD"):
        argv += ["--tcg-thread", tcg_thread]
    console = workdir.parent / f"{workdir.name}.console"
    t0 = time.monotonic()
    run = reaper.add(Process("xen-run", argv, workdir.parent / f"{workdir.name}.stderr",
                             stdout_path=console))
    ready: float | None = None
    while run.wait(0.2) is None:
        if ready is None and READY_LINE in run.stdout():
            ready = time.monotonic() - t0
        if time.monotonic() - t0 > boot_timeout + 30:
            break
    rc = run.stop(grace=5)
    result = Dom0Run(workdir=workdir, returncode=rc, console=run.stdout() + run.log(),
                     seconds=time.monotonic() - t0, ready_seconds=ready, profile=chosen.name)
    _runs.append(result)
    return result


def saved_run(workdir: Path, chosen: Profile) -> Dom0Run:
    """DEVMODEL_XEN_SAVED_RUN=DIR: check an earlier boot's directory instead of booting
    (`qemu-configs/xen/run --workdir DIR --script tests/xen_guest/dom0-ci >DIR.console`), to
    read a failure again or work on the checks without a 10-minute boot each time."""
    status = workdir / "status"
    console = workdir.parent / f"{workdir.name}.console"
    return Dom0Run(workdir=workdir,
                   returncode=int(status.read_text()) if status.exists() else None,
                   console=console.read_text(errors="replace") if console.exists() else "",
                   seconds=0.0, ready_seconds=None, profile=chosen.name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the end of the machine's console to a failed test's report."""
    report = yield
    if report.failed and isinstance(item, pytest.Function):
        run = item.funcargs.get("dom0_suite")
        if isinstance(run, Dom0Run):
            report.sections.append(("xen test bed console", run.report()))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How long the boot took, to the toolstack and in all, each step, and each guest's boot
    and how many tries died early under TCG and were retried (dom0/guest)."""
    for run in _runs:
        terminalreporter.section("xen test bed")
        ready = "never" if run.ready_seconds is None else f"{run.ready_seconds:.1f} s"
        terminalreporter.write_line(
            f"one boot ({run.profile} profile, {run.workdir}): dom0 toolstack up after {ready}, "
            f"{run.seconds:.1f} s in all (run exit {run.returncode})")
        steps = STEP_LINE.findall(run.console)
        for name, status, seconds in steps:
            terminalreporter.write_line(f"  step {name}: exit {status}, {seconds} s")
        for name, _, _ in steps:
            path = run.workdir / f"{name}.json"
            if path.exists():
                record = json.loads(path.read_text())
                retries = record.get("retries", 0)
                terminalreporter.write_line(
                    f"  {name} guest: xl create -p {record['create_s']} s, /init reported "
                    f"{record['boot_s']} s after unpause, retries {retries}")
        # A guest that never reported has no record; its retries are in its step's output.
        early = RETRY_LINE.findall(run.console)
        terminalreporter.write_line(
            f"  guests retried after an early death under TCG: {len(early)} time(s)"
            + "".join(f"; {name} (domain {domid})" for name, domid in early))
